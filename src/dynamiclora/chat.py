"""What a chat template adds around a conversation, found once per template.

A template wraps the messages in a fixed scaffold: for SmolLM2 a default system prompt and role markers before the
first message, and the end of a turn plus the opened assistant turn after the last. ``ChatFormat`` finds that
scaffold by rendering a sentinel message, so that

- routing pools a prompt's route feature over what the user wrote (``content_span``): a scaffold of 30 tokens
  shared by every conversation would otherwise dominate the mean and bring all conversations within each
  other's gates;
- labels and tables name a conversation by its last user message (``readable``).

Both are functions of the tokenizer (its template is part of its fingerprint) and the prompt alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SENTINEL = "\x00sentinel\x00"


@dataclass(frozen=True)
class Scaffold:
    opener: str  # the text that opens a user message (after the last special token before it)
    closer: str  # the text from the end of the last message up to the opened assistant turn
    prefix: tuple[int, ...]  # tokens before the first message's content (system prompt, role markers)
    suffix: tuple[int, ...]  # tokens of the closer


class ChatFormat:
    """The tokenizer's chat template, seen as a scaffold around message contents."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._found: tuple[str | None, Scaffold | None] = (None, None)

    @property
    def scaffold(self) -> Scaffold | None:
        template = getattr(self.tokenizer, "chat_template", None)
        if template != self._found[0]:  # found once per template (a user may set one after loading)
            self._found = (template, self._find() if template is not None else None)
        return self._found[1]

    def _find(self) -> Scaffold | None:
        tok = self.tokenizer
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": SENTINEL}], tokenize=False, add_generation_prompt=True
        )
        before, found, closer = rendered.partition(SENTINEL)
        if not found:
            return None
        start = max((before.rfind(t) for t in tok.all_special_tokens if t and t in before), default=-1)
        start = start if start >= 0 else before.rfind("\n") + 1  # a template without special tokens
        opener = before[start:]
        if not opener.strip() or not closer.strip():
            return None
        encode = lambda text: tuple(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        # trailing whitespace of the prefix may merge into the content's first token ("<user> " + "where" is
        # "<user>", " where"): the prefix's tokens are those of its text without it
        return Scaffold(opener, closer, encode(before.rstrip()), encode(closer))

    def content_span(self, ids: Sequence[int]) -> tuple[int, int]:
        """[start, end) of the tokens a conversation's author wrote: the scaffold's prefix and suffix left out where
        the prompt carries them; the whole prompt otherwise."""
        s = self.scaffold
        n = len(ids)
        if s is None or n <= len(s.prefix) or tuple(ids[: len(s.prefix)]) != s.prefix:
            return 0, n
        end = n - len(s.suffix) if s.suffix and tuple(ids[n - len(s.suffix) :]) == s.suffix else n
        return (len(s.prefix), end) if end > len(s.prefix) else (0, n)

    def readable(self, ids: Sequence[int]) -> str:
        """The prompt as a person would name it: a conversation's last user message, the decoded text otherwise."""
        s = self.scaffold
        if s is not None:
            text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
            if text.endswith(s.closer) and s.opener in text:
                return text[text.rindex(s.opener) + len(s.opener) : len(text) - len(s.closer)].strip()
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
