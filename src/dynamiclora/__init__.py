"""DynamicLoRA: a hierarchical LoRA memory that lets many agents learn continuously on one base model."""

from .agent import Agent, GenerationResult
from .circuits import Circuit
from .config import (
    TIERS,
    AdapterConfig,
    DynamicLoRAConfig,
    DynamicsConfig,
    GenerationConfig,
    LearningConfig,
    WaveGenConfig,
)
from .core import DynamicLoRA, join_swarm
from .dynamics.distributed import SwarmGroup
from .errors import (
    ConfigError,
    CorruptStateError,
    DynamicLoRAError,
    GateLostWarning,
    IncompatibleAdapterError,
    PromptTooLongError,
    StateMismatchError,
    SwarmSyncError,
    UnknownAgentError,
    UnknownScopeError,
)
from .hierarchy import ScopeKey, Snapshot
from .learning import LearnResult

__version__ = "0.1.0"

__all__ = [
    "TIERS",
    "AdapterConfig",
    "Agent",
    "Circuit",
    "ConfigError",
    "CorruptStateError",
    "DynamicLoRA",
    "DynamicLoRAConfig",
    "DynamicLoRAError",
    "DynamicsConfig",
    "GateLostWarning",
    "GenerationConfig",
    "GenerationResult",
    "IncompatibleAdapterError",
    "LearnResult",
    "LearningConfig",
    "PromptTooLongError",
    "ScopeKey",
    "Snapshot",
    "StateMismatchError",
    "SwarmGroup",
    "SwarmSyncError",
    "UnknownAgentError",
    "UnknownScopeError",
    "WaveGenConfig",
    "__version__",
    "join_swarm",
]
