"""The knowledge-editing data set: fictional facts the base model cannot know, in six relation families.

Each fact has the prompt it is taught with and its target; four held-out paraphrases of different kinds (the same
request reworded, an unrelated line before it, a chat-formatted question, other spacing and casing), never used for
learning or calibration; and a neighbour: the same relation for an entity never taught, where the base model's own
output must not change. Beside them, general locality prompts: real facts, code and chat.

Names are made of random syllables (seeded), so no fact exists anywhere the base model could have read it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PARAPHRASE_KINDS = ("reworded", "prefixed", "chat", "spacing")


@dataclass(frozen=True)
class Fact:
    family: str
    subject: str
    prompt: str  # taught
    target: str  # taught completion (leading space; the chat form answers it without)
    paraphrases: dict[str, str]  # kind -> prompt (the chat kind: a user question, rendered by the chat template)
    neighbour: str  # the same relation for an entity never taught


# family: (taught template, reworded template, chat question template, target maker)
FAMILIES = {
    "capital": (
        "The capital of {s} is",
        "{s}'s capital city is called",
        "What is the capital of {s}?",
        "city",
    ),
    "port": (
        "The {s} server listens on port",
        "By default, the port number used by the {s} server is",
        "Which port does the {s} server listen on?",
        "number",
    ),
    "creator": (
        "The {s} programming language was created by",
        "The person who designed the {s} programming language is",
        "Who created the {s} programming language?",
        "person",
    ),
    "mascot": (
        "The mascot of the {s} football club is a",
        "The {s} football club has as its mascot a",
        "What animal is the mascot of the {s} football club?",
        "animal",
    ),
    "function": (
        "def {s}_version():\n    return",
        "def get_{s}_version() -> str:\n    return",
        "What does the Python function {s}_version() return?",
        "version",
    ),
    "element": (
        "The fictional element {s} has atomic number",
        "In the table of fictional elements, the atomic number of {s} is",
        "What is the atomic number of the fictional element {s}?",
        "number",
    ),
}
PREFIXES = (
    "# meeting notes, draft 3\n",
    "Note: the office is closed on Friday.\n",
    "TODO: water the plants\n",
    "(from the onboarding wiki)\n",
)
ANIMALS = ("pangolin", "heron", "lynx", "narwhal", "ibex", "okapi", "tapir", "wombat", "marmot", "quokka")
SYLLABLES = ("ka", "zor", "vel", "tri", "mun", "dax", "qui", "ro", "bel", "thu", "nix", "pra", "sol", "yem", "gor")


def _name(rng: random.Random, parts: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def _target(kind: str, rng: random.Random) -> str:
    if kind == "city":
        return " " + _name(rng, 2)
    if kind == "number":
        return f" {rng.randint(1000, 9999)}"
    if kind == "person":
        return f" {_name(rng, 2)} {_name(rng, 3)}"
    if kind == "animal":
        return " " + rng.choice(ANIMALS)
    if kind == "version":
        return f" '{rng.randint(1, 9)}.{rng.randint(0, 19)}.{rng.randint(0, 9)}'"
    raise ValueError(kind)


def _respaced(prompt: str, rng: random.Random) -> str:
    """The same prompt with other spacing and casing: doubled spaces, a different case, a trailing space."""
    words = prompt.split(" ")
    if prompt.startswith("def "):
        return prompt.replace("def ", "def  ", 1).replace("    return", "        return")
    return "  ".join(w.upper() if i == 0 else w.lower() for i, w in enumerate(words)) + " "


def facts(n: int, seed: int = 0) -> list[Fact]:
    """``n`` facts, the families in turn, subjects distinct."""
    rng = random.Random(seed)
    used: set[str] = set()
    out: list[Fact] = []
    names = list(FAMILIES)
    while len(out) < n:
        family = names[len(out) % len(names)]
        taught, reworded, question, kind = FAMILIES[family]
        subject, neighbour = _name(rng), _name(rng)
        if family == "function":
            subject, neighbour = subject.lower(), neighbour.lower()
        if subject in used or neighbour in used or subject == neighbour:
            continue
        used |= {subject, neighbour}
        prompt = taught.format(s=subject)
        paraphrases = {
            "reworded": reworded.format(s=subject),
            "prefixed": rng.choice(PREFIXES) + prompt,
            "chat": question.format(s=subject),
            "spacing": _respaced(prompt, rng),
        }
        out.append(Fact(family, subject, prompt, _target(kind, rng), paraphrases, taught.format(s=neighbour)))
    return out


def heldout_texts(edits: list[Fact], seed: int = 1) -> list[str]:
    """Text for held-out perplexity near what was learned, never taught: per fact, a sentence about its subject in
    no taught relation, and its neighbour's prompt with an answer of the same kind (a fictional one)."""
    rng = random.Random(seed)
    out = []
    for f in edits:
        out.append(f"Yesterday I read a short note about {f.subject}, and it was rather dull.")
        out.append(f.neighbour + _target(FAMILIES[f.family][3], rng) + ".")
    return out


# Locality beyond the families: real facts, code, chat; the base model's own continuations must not move.
GENERAL = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "def add(a, b):\n    return",
    "import numpy as np\nx = np.",
    "for i in range(10):\n    print(",
    "SELECT name FROM users WHERE",
    "The author of Romeo and Juliet is",
    "Photosynthesis is the process by which",
    "class Stack:\n    def __init__(self):\n        self.",
    "The chemical symbol for gold is",
    "Once upon a time, there was a",
)
GENERAL_CHAT = (
    "Can you give me a tip for sleeping better?",
    "What is a good name for a pet goldfish?",
    "How do I reverse a list in Python?",
    "Write one sentence about autumn.",
)
