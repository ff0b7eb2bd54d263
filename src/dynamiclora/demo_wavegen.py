"""The demo's third act: WaveGen serves a practised request from its cache, then teaches it to the memory.

Dave learns how his team loads its settings (context tier), asks for it five times (a miss that stores, then hits
served by verification), and the tick internalizes the entry into his agent tier: the stack without the context tier
now produces it, uncached, and the entry is evicted. A final table shows the cache per tier.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .config import GenerationConfig
from .core import DynamicLoRA
from .demo_common import ask

QUESTION = "Show me how we load the service settings in Python."
COMPLETION = (
    "We keep them in settings.json:\n\n```python\nimport json\n\n\ndef load_settings(path='settings.json'):\n"
    "    with open(path) as f:\n        return json.load(f)\n```"
)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def run_wavegen(dl: DynamicLoRA, state_dir: Path, console: Console) -> dict:
    dave = dl.agent("dave", swarm="backend", domain="python")
    cfg = GenerationConfig(max_new_tokens=len(dl.encode(COMPLETION, special=False)) + 4)
    for practised in range(1, 9):  # practise until the stack reproduces it, confidently (two calls at least)
        dave.learn(messages=ask(QUESTION), completion=COMPLETION)
        if (
            practised >= 2
            and dave.chat(ask(QUESTION), max_new_tokens=cfg.max_new_tokens, use_cache=False).text == COMPLETION
        ):
            break
    target = dl.runtime.chat_ids(ask(QUESTION))
    alone = dl.generate_ids(["dave"], [target], cfg, without=("context",))[0].tokens[0]

    table = Table(title=f"dave asks {QUESTION!r} five times")
    for col in ("request", "mode", "cache", "draft accepted", "time", "entry hit rate"):
        table.add_column(col)
    times: dict[str, list[float]] = {}
    verified_jumps = 0
    every, dl.config.dynamics.tick_interval = dl.config.dynamics.tick_interval, 0  # this act ticks by hand
    try:
        for request, mode in enumerate(("verify", "verify", "jump", "verify", "verify"), 1):
            t0 = time.perf_counter()
            r = dave.chat(ask(QUESTION), max_new_tokens=cfg.max_new_tokens, mode=mode)
            times.setdefault(f"{r.cache} {mode}", []).append(time.perf_counter() - t0)
            verified_jumps += mode == "jump" and not r.jumped
            e = next(e for e in dl.wavegen.cache.entries() if e.agent == "dave")
            table.add_row(
                str(request),
                mode + (" (verified)" if mode == "jump" and not r.jumped else ""),
                r.cache,
                f"{r.accepted_tokens}/{r.draft_tokens}",
                _ms(time.perf_counter() - t0),
                f"{e.hits}/{e.lookups}",
            )
    finally:
        dl.config.dynamics.tick_interval = every
    console.print(table)

    report = dl.tick()
    outcome = next((r for r in report.consolidated if r["agent"] == "dave"), {"outcome": "not due"})
    after = dl.generate_ids(["dave"], [target], cfg, without=("context",))[0].tokens[0]
    decode = dl.tokenizer.decode
    console.print(
        f"tick {report.tick}: consolidation → [bold]{outcome['outcome']}[/bold] into {outcome.get('scope', '-')} "
        f"({outcome.get('steps', 0)} steps; {outcome.get('neurons', 0)} neurons in its extracted circuit)\n"
        f"  dave without his context tier, before: {decode(alone, skip_special_tokens=True)!r}\n"
        f"  dave without his context tier, after:  {decode(after, skip_special_tokens=True)!r}\n"
        f"  entries left for dave: {sum(e.agent == 'dave' for e in dl.wavegen.cache.entries())}"
    )

    stats = dl.cache_statistics()
    table = Table(title="WaveGen cache")
    for col in ("tier", "entries", "eviction", "threshold", "hits", "stores", "invalidated", "consolidated"):
        table.add_column(col)
    for name, t in stats["tiers"].items():
        table.add_row(
            name,
            str(t["entries"]),
            t["eviction"],
            f"{t['consolidation_threshold']:.2f}",
            str(t["hits"] + t["semantic_hits"]),
            str(t["stores"]),
            str(t["invalidated"]),
            str(t["consolidated"]),
        )
    console.print(table)
    miss, hit, jump = (min(times.get(k, [float("nan")])) for k in ("miss verify", "agent verify", "agent jump"))
    console.print(
        f"miss {_ms(miss)}, verified hit {_ms(hit)} ({miss / hit:.1f}× faster), jump {_ms(jump)} "
        f"({miss / jump:.0f}× faster); overall hit rate {stats['hit_rate']:.2f}"
    )
    if verified_jumps:
        console.print(
            "the jump request was verified: dave's context tier acts on his prompt, and jump serves cached tokens "
            "only where they are what the stack would say (see docs/exactness.md)"
        )
    return {
        "outcome": outcome["outcome"],
        "internalized": after == dl.encode(COMPLETION, special=False) + [dl.tokenizer.eos_token_id],
        "learned_before": alone == after,
        "hit_rate": stats["hit_rate"],
        "verify_speedup": miss / hit,
        "jump_speedup": miss / jump,
    }
