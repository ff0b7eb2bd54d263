"""One rank of a distributed swarm, for tests/test_distributed.py (launched like torchrun: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment). Usage: swarm_worker.py consistent|dead OUT_DIR"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from dynamiclora import Circuit, DynamicLoRA, DynamicLoRAConfig, SwarmSyncError, join_swarm
from dynamiclora.config import DynamicsConfig
from dynamiclora.testing import tiny_model


def random_delta(dl: DynamicLoRA, seed: int) -> Circuit:
    g = torch.Generator().manual_seed(seed)
    factors = {
        n: (torch.randn(4, m.in_features, generator=g) * 0.3, torch.randn(m.out_features, 4, generator=g) * 0.3)
        for n, m in dl.layers.items()
    }
    return Circuit(factors=factors, tier="", scope="")


def main(mode: str, out: Path) -> None:
    rank = int(os.environ["RANK"])
    model, tokenizer = tiny_model("llama")
    dl = DynamicLoRA(model, tokenizer, DynamicLoRAConfig(dynamics=DynamicsConfig(tick_interval=0)))
    agent = dl.agent(f"r{rank}", swarm="team", domain="python")
    group = join_swarm(dl, timeout_s=15 if mode == "dead" else 60)
    own = dl.add_circuit(f"agent:r{rank}", random_delta(dl, 7 if rank < 2 else 100 + rank))
    window = dl.memory.window("agent")
    own.series, own.entered_tick = [1] * window, -window
    result: dict = {"rank": rank}
    for tick in range(4):
        agent.learn(f"def f{rank}(x):", f" return x + {tick}")  # local learning between ticks
        for c in dl.hierarchy.scope(f"agent:r{rank}").circuits.values():
            dl.memory.record_use(c)
        if mode == "dead" and tick == 1:
            if rank == 2:
                os._exit(3)  # dies without a word, mid-run
            try:
                dl.tick()
            except SwarmSyncError as exc:
                result["error"] = str(exc)
            break
        dl.tick()
        if mode == "dead":
            dl.save(out / f"rank{rank}")
    if mode == "consistent":
        result["differing"] = group.verify()
        result["shared"] = {
            str(k): s.content_hash()
            for k, s in dl.hierarchy.scopes.items()
            if k.tier != "agent" and k.tier != "context"
        }
        result["swarm_circuits"] = len(dl.hierarchy.scope("swarm:team"))
        result["kinds"] = sorted({m.get("kind") or "migrated" for m in dl.migrations()})
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if mode == "dead":
        os._exit(0)  # the group is broken: skip its teardown
    group.leave()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
