"""Hooks for the schemathesis run (tests/test_openapi_contract.py), loaded through SCHEMATHESIS_HOOKS.

- A generated body names a random model, which is a 404 before anything else runs: a body whose ``model`` is valid
  text names the registered agent instead, so that generation, learning and scoring are reached.
- Valid token budgets are lowered to a few tokens, so that the run stays short.
- A body whose text could exceed the model's context is left out: that bound is in tokens, which no JSON schema
  can state (the tests of bad input cover the 400 it gets). Text is counted in UTF-8 bytes, an upper bound on the
  tokens of a byte-level tokenizer, plus a margin per message for the chat template.
Each change keeps a valid value valid, so valid and invalid cases stay what they were.
"""

from __future__ import annotations

import os

import schemathesis

AGENT = os.environ.get("DYNAMICLORA_TEST_AGENT", "alice")
CONTEXT = int(os.environ.get("DYNAMICLORA_TEST_CONTEXT", "256"))
BUDGETS = ("max_tokens", "max_completion_tokens")
SHORT = 8
PER_MESSAGE = 16  # the tiny chat template's role tags and newline, with room to spare


def _valid_budget(value) -> bool:
    whole = isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    return whole and 1 <= value < CONTEXT  # JSON's 241.0 is an integer too


def _length(value) -> int:
    """An upper bound on the tokens of a prompt, a completion or a conversation (0 for what is not one)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass")) + 2
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return len(value)
        return sum(_length(v) for v in value)  # a conversation (or a list of prompts: one choice each, fewer)
    if isinstance(value, dict):
        return _length(value.get("content")) + PER_MESSAGE
    return 0


@schemathesis.hook
def map_body(context, body):
    if not isinstance(body, dict):
        return body
    model = body.get("model")
    if isinstance(model, str) and 1 <= len(model) <= 200:
        body["model"] = AGENT
    for name in BUDGETS:
        if _valid_budget(body.get(name)):
            body[name] = min(int(body[name]), SHORT)
    return body


@schemathesis.hook
def filter_body(context, body):
    if not isinstance(body, dict):
        return True
    text = sum(_length(body.get(name)) for name in ("prompt", "messages", "completion"))
    return text + SHORT <= CONTEXT
