"""Costs of the memory dynamics: the learning step against a PEFT LoRA training step of the same rank, the
tick's cost amortized over the interactions between ticks as the number of circuits grows, and the time scales
the five tiers exhibit on a team stream (bench/tiers.py).

Run: ``python benchmarks/dynamics.py`` (``--quick`` for fewer sizes and repeats).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from ..config import DynamicLoRAConfig, DynamicsConfig, LearningConfig
from ..core import DynamicLoRA
from ..testing import tiny_model
from .forward import LAYOUT, build_model, build_stack, model_configs, random_circuit
from .record import arguments, model_suffix, time_interleaved, write
from .tiers import STREAM_TICKS, plot_timescales, tier_timescales, timescale_checks, timescale_table


def learning_step(quick: bool) -> list[dict]:
    """Marginal cost of one gradient step of learn() (rank-8 context circuit, under the full five-tier stack)
    against one PEFT LoRA step (rank 8, all linear layers) on the same model and 64 tokens."""
    from peft import LoraConfig, get_peft_model

    rows = []
    for name, kwargs in model_configs(quick).items():
        base = build_model(kwargs, "cpu")
        ids = torch.randint(1, base.config.vocab_size, (1, 64))
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
        peft_model.train()
        opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)

        def peft_step():
            loss = peft_model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()

        stacks = {}
        for steps in (2, 6):
            dl = build_stack(copy.deepcopy(base), agents=1, swarms=1)
            dl.config.learning.steps_per_learn = steps  # in place: the router holds this object
            stacks[steps] = dl
        prompt, completion = ids[0, :32].tolist(), ids[0, 32:].tolist()

        def learn(steps):
            def call():
                # the first call spawns a gated circuit, later ones train it (its gate is open on its own prompt)
                result = stacks[steps].learner.learn("agent0", prompt, completion, False)
                if not result.trained:
                    raise RuntimeError(f"learn() took no gradient step on {name}: the benchmark measures nothing")

            return call

        repeats = 5 if quick else 9
        res = time_interleaved(
            {"peft step": peft_step, "learn (2 steps)": learn(2), "learn (6 steps)": learn(6)}, repeats, warmup=2
        )
        per_step = (res["learn (6 steps)"]["median_s"] - res["learn (2 steps)"]["median_s"]) / 4
        peft = res["peft step"]["median_s"]
        rows.append(
            {
                "model": name,
                "peft_step_s": peft,
                "learn_step_s": per_step,
                "ratio": per_step / peft,
                "learn_call_6_steps_s": res["learn (6 steps)"]["median_s"],
                "fixed_per_call_s": res["learn (2 steps)"]["median_s"] - 2 * per_step,
            }
        )
    return rows


def tick_cost(quick: bool) -> list[dict]:
    """Tick time against the interactions it is amortized over (tick_interval learn calls)."""
    rows = []
    model, tok = tiny_model("llama")
    sizes = (100, 1000) if quick else (100, 1000, 3000)
    for n in sizes:
        cfg = DynamicLoRAConfig(dynamics=DynamicsConfig(tick_interval=0), learning=LearningConfig(steps_per_learn=6))
        dl = DynamicLoRA(copy.deepcopy(model), tok, cfg)
        g = torch.Generator().manual_seed(0)
        agents = max(1, n // 50)
        circuits = []
        for a in range(agents):
            dl.agent(f"a{a}", swarm=f"s{a % 4}", domain="d")
        for i in range(n):
            tier = "context" if i % 2 == 0 else "agent"
            circuits.append(dl.add_circuit(f"{tier}:a{i % agents}", random_circuit(dl, 1, g), pinned=False))
        rng = torch.Generator().manual_seed(1)
        for _ in range(20):  # some history so that detectors and homeostasis have work
            for c in circuits:
                if float(torch.rand((), generator=rng)) < 0.3:
                    dl.memory.record_use(c)
            dl.tick()
        tick_times = []
        for _ in range(3 if quick else 5):
            for c in circuits:
                if float(torch.rand((), generator=rng)) < 0.3:
                    dl.memory.record_use(c)
            t = time.perf_counter()
            dl.tick()
            tick_times.append(time.perf_counter() - t)
        alice = dl.agent("a0")
        t = time.perf_counter()
        for i in range(5):
            alice.learn("def parse_json(text):", f" return json.loads(text)  # {i}")
        interaction = (time.perf_counter() - t) / 5
        tick = sorted(tick_times)[len(tick_times) // 2]
        interval = DynamicsConfig().tick_interval
        rows.append(
            {
                "circuits": len(dl.hierarchy.all_circuits()),
                "tick_s": tick,
                "interaction_s": interaction,
                "tick_interval": interval,
                "amortized_fraction": tick / interval / interaction,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = arguments(__doc__, argv)
    steps, ticks = learning_step(args.quick), tick_cost(args.quick)
    scales = tier_timescales(STREAM_TICKS, seeds=1 if args.quick else 3)
    checks = {f"{r['model']}: learning step <= 1.5x a PEFT step": r["ratio"] <= 1.5 for r in steps}
    checks.update(
        {
            f"tick with {r['circuits']} circuits <= 10% of an interaction (amortized)": r["amortized_fraction"] <= 0.10
            for r in ticks
        }
    )
    md = [
        "# Memory dynamics: learning step and tick cost (cpu)",
        "",
        "| model | PEFT LoRA step (r=8) | learn() per gradient step | ratio | learn() call, 6 steps "
        "| fixed per call |",
        "|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['model']} | {r['peft_step_s'] * 1e3:.1f} ms | {r['learn_step_s'] * 1e3:.1f} ms | {r['ratio']:.2f}× | "
        f"{r['learn_call_6_steps_s'] * 1e3:.1f} ms | {r['fixed_per_call_s'] * 1e3:.1f} ms |"
        for r in steps
    ]
    md += [
        "",
        "| circuits | tick | learn() interaction | tick interval | tick amortized per interaction |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['circuits']} | {r['tick_s'] * 1e3:.1f} ms | {r['interaction_s'] * 1e3:.1f} ms | {r['tick_interval']} | "
        f"{r['amortized_fraction'] * 100:.2f}% |"
        for r in ticks
    ]
    md += ["", *timescale_table(scales)]
    checks.update(timescale_checks(scales))
    md += ["", "## Targets", ""] + [f"- {'met' if ok else '**missed**'}: {k}" for k, ok in checks.items()]
    name = "dynamics-cpu" + ("-quick" if args.quick else model_suffix())
    write(
        Path(args.out),
        name,
        {
            "parameters": {"layout": LAYOUT, "tokens": 64},
            "learning_step": steps,
            "tick_cost": ticks,
            "timescales": scales,
            "targets": checks,
        },
        "\n".join(md) + "\n",
    )
    plot_timescales(scales, Path(args.out) / f"{name}.png")
    print("\n".join(md))
    return checks


if __name__ == "__main__":
    main()
