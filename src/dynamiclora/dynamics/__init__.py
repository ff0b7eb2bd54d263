"""Memory dynamics: phases, decay and forgetting, migration upward, homeostasis, measured time scales."""

from .detector import Persistence, persistence
from .memory import Memory, TickReport

__all__ = ["Memory", "Persistence", "TickReport", "persistence"]
