"""What the demo's acts share: a one-message conversation and a one-line rendering of text."""

from __future__ import annotations


def ask(question: str) -> list[dict[str, str]]:
    """A one-message conversation."""
    return [{"role": "user", "content": question}]


def one_line(text: str) -> str:
    return text.replace("\n", "⏎")
