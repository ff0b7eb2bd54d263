"""Errors raised at the library's boundaries.

Every error names what is wrong and how to fix it. They subclass the builtin that a caller would
naturally catch (``ValueError``, ``KeyError``) so that generic handlers keep working.
"""

from __future__ import annotations


class DynamicLoRAError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(DynamicLoRAError, ValueError):
    """A configuration field has an invalid value."""


class UnknownAgentError(DynamicLoRAError, KeyError):
    """An agent id that was never registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class UnknownScopeError(DynamicLoRAError, KeyError):
    """A scope (tier + name) that does not exist."""

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownCircuitError(DynamicLoRAError, KeyError):
    """A circuit id that no scope holds."""

    def __str__(self) -> str:
        return str(self.args[0])


class RegistrationError(DynamicLoRAError, ValueError):
    """An agent cannot be registered as asked: a malformed name, or a conflict with what is registered.

    ``field`` names the offending argument; ``conflict`` is True when the request is well-formed but contradicts
    the hierarchy (a swarm lives in one domain; an id keeps its swarm and domain)."""

    def __init__(self, message: str, field: str, conflict: bool = False) -> None:
        super().__init__(message)
        self.field, self.conflict = field, conflict


class InvalidInputError(DynamicLoRAError, ValueError):
    """An argument of a call is malformed (an empty prompt, tensors of the wrong shape, a missing companion)."""


class PromptTooLongError(DynamicLoRAError, ValueError):
    """A prompt (plus the tokens to generate) does not fit the model's context window."""


class StateMismatchError(DynamicLoRAError, ValueError):
    """A saved state belongs to another base model, tokenizer or format version."""


class CorruptStateError(DynamicLoRAError, OSError):
    """A file of a saved state is missing, unreadable or does not match its recorded hash."""


class IncompatibleAdapterError(DynamicLoRAError, ValueError):
    """A PEFT adapter cannot be imported into this model (unknown modules, wrong shapes, ...)."""


class SwarmSyncError(DynamicLoRAError, RuntimeError):
    """Ranks of a distributed swarm could not exchange their tick (a rank died, hung or is out of step)."""


class GateLostWarning(UserWarning):
    """An export wrote gated circuits as always acting: the adapter differs from the memory off their prompts."""
