"""Swarms across processes: three gloo ranks on loopback end every tick with equal shared scopes; a dead rank
makes the others fail with a clear error, their saved state intact."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from dynamiclora import DynamicLoRA
from dynamiclora.testing import tiny_model

WORKER = Path(__file__).with_name("swarm_worker.py")


def launch(mode: str, out: Path, world: int = 3) -> list[tuple[int, str]]:
    """Run ``world`` worker ranks like torchrun would; returns (exit code, output) per rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.setdefault("OMP_NUM_THREADS", "1")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), mode, str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    return [(p.returncode, output) for p, output in zip(procs, outputs)]


def test_three_ranks_end_with_equal_shared_scopes(tmp_path):
    runs = launch("consistent", tmp_path)
    assert [code for code, _ in runs] == [0, 0, 0], runs
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert all(r["differing"] == {} for r in results), results
    assert results[0]["shared"] == results[1]["shared"] == results[2]["shared"]
    assert all(r["swarm_circuits"] == 1 for r in results)  # ranks 0 and 1 resonated; rank 2's lone circuit waits
    assert "consensus" in results[0]["kinds"] and "consensus" in results[1]["kinds"]
    assert "consensus" not in results[2]["kinds"]


def test_a_dead_rank_fails_the_others_clearly_and_their_saved_state_loads(tmp_path):
    runs = launch("dead", tmp_path)
    assert [code for code, _ in runs] == [0, 0, 3], runs
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "exchanging" in result["error"] and "saved state is intact" in result["error"], result
        model, tokenizer = tiny_model("llama")
        restored = DynamicLoRA.load(tmp_path / f"rank{rank}", model=model, tokenizer=tokenizer)
        assert restored.tick_count == 1 and len(restored.hierarchy.scope("swarm:team")) == 1
    assert not (tmp_path / "rank2.json").exists()
