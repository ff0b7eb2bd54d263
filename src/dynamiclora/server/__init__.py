"""``dynamiclora serve``: an OpenAI-compatible server with per-agent keys, batching and a dashboard."""

from .app import base_name, create_app, open_state
from .engine import Busy, Engine

__all__ = ["Busy", "Engine", "base_name", "create_app", "open_state"]
