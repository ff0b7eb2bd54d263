"""Task streams. A task is a list of (prompt, completion) items practised for some rounds before the next begins.

* ``facts``: new facts, key → value completions the base model cannot know (random values), five or more tasks.
* ``selective``: facts that recur through the whole stream among one-off facts seen in a single task.
* ``styles``: the same requests answered in each agent's own format, one task per agent of one team.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

WORDS = ["alpha", "bravo", "cedar", "delta", "ember", "fjord", "gamma", "harbor", "indigo", "juniper", "kelvin",
         "lumen", "maple", "nectar", "onyx", "pylon", "quartz", "raven", "sierra", "tundra", "umber", "vertex",
         "willow", "xenon", "yonder", "zephyr"]  # fmt: skip
FIELDS = ["port", "timeout", "retries", "region", "bucket", "owner", "level", "limit"]


@dataclass
class Task:
    name: str
    items: list[tuple[str, str]]
    agent: str = "learner"


@dataclass
class Stream:
    name: str
    tasks: list[Task]
    rounds: int  # times each item of a task is learned, interleaved, before the next task begins
    recurring: list[tuple[str, str]] = field(default_factory=list)  # items rehearsed in every task (selective)
    # rewrites of a prompt that ask for the same thing, evaluated at the end (does what was learned generalize?)
    variants: dict[str, Callable[[str], str]] = field(default_factory=dict)


def _fact(rng: random.Random, used: set[str]) -> tuple[str, str]:
    """A getter whose value is an arbitrary word: nothing in the base model's training says which."""
    while True:
        key = f"{rng.choice(WORDS)}_{rng.choice(FIELDS)}"
        if key not in used:
            used.add(key)
            return f"def get_{key}():", f" return '{rng.choice(WORDS)}'"


FACT_VARIANTS: dict[str, Callable[[str], str]] = {
    "comment line": lambda p: "# getter\n" + p,
    "two spaces": lambda p: p.replace("def ", "def  ", 1),
}


def facts(tasks: int = 5, per_task: int = 4, rounds: int = 4, seed: int = 0) -> Stream:
    rng, used = random.Random(seed), set()
    return Stream(
        "facts",
        [Task(f"task {t + 1}", [_fact(rng, used) for _ in range(per_task)]) for t in range(tasks)],
        rounds,
        variants=FACT_VARIANTS,
    )


def selective(tasks: int = 5, per_task: int = 3, recurring: int = 3, rounds: int = 3, seed: int = 1) -> Stream:
    """Every task: its own one-off facts, plus ``recurring`` facts that come back in every task."""
    rng, used = random.Random(seed), set()
    kept = [_fact(rng, used) for _ in range(recurring)]
    return Stream(
        "selective",
        [Task(f"task {t + 1}", [_fact(rng, used) for _ in range(per_task)]) for t in range(tasks)],
        rounds,
        recurring=kept,
    )


STYLE_REQUESTS = ["format the date 2024-03-05:", "format the price 12.5:", "format the count 3:"]
STYLES = {
    "ana": [" 2024-03-05", " 12.50 EUR", " 3 items"],
    "ben": [" 5 March 2024", " €12.50", " three items"],
    "cy": [" 03/05/2024", " EUR 12.5", " n=3"],
}


def styles(rounds: int = 4) -> Stream:
    """One team; each agent wants the same requests answered in its own format (one task per agent)."""
    tasks = [Task(f"{agent}'s style", list(zip(STYLE_REQUESTS, answers)), agent) for agent, answers in STYLES.items()]
    return Stream("styles", tasks, rounds)
