"""The CLI: the demo end to end in fast mode, inspect and export-peft on its state."""

from __future__ import annotations

import json

import pytest

from dynamiclora.cli import main
from dynamiclora.demo import run_demo


def test_fast_demo_end_to_end(tmp_path, capsys):
    report = run_demo(fast=True, state_dir=tmp_path / "state", rounds=6)
    assert report.reproduced == {"alice": True, "bob": True}
    assert report.untouched and report.reload_identical
    assert report.dynamics["migrated"] and report.dynamics["plot"].exists()
    assert report.wavegen["outcome"] == "internalized" and report.wavegen["internalized"], report.wavegen
    assert report.wavegen["hit_rate"] > 0  # (its speed-ups are timings: measured by the benchmark, not asserted)
    out = capsys.readouterr().out
    assert (
        report.team["inherited"] == {"cy": True, "dee": True, "eve": True} and not report.team["other_swarm_inherited"]
    )
    assert "greedy replies after learning" in out and "circuits" in out and "the team scenario" in out

    assert main(["inspect", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out
    assert "context" in out and "alice" in out and "backend" in out
    assert "migrations" in out and "agent:alice" in out and "SCREENED" in out
    assert "cache tiers" in out and "cache consolidations" in out and "internalized" in out


def test_cli_demo_exit_code_and_export(tmp_path, capsys, monkeypatch):
    assert main(["demo", "--fast", "--state-dir", str(tmp_path / "s"), "--rounds", "6"]) == 0
    capsys.readouterr()


def test_inspect_of_a_missing_state_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "is not a saved state" in capsys.readouterr().err


def test_export_peft_cli(tmp_path, capsys):
    from dynamiclora import DynamicLoRA
    from dynamiclora.testing import save_tiny_model

    dl = DynamicLoRA.from_pretrained(save_tiny_model(tmp_path / "base"))
    dl.agent("alice", swarm="s", domain="d").learn("def f(x):", " return x")
    dl.save(tmp_path / "state")
    with pytest.warns(UserWarning, match="gated"):
        assert main(["export-peft", str(tmp_path / "state"), str(tmp_path / "out"), "--agent", "alice"]) == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == dl.config.adapter.circuit_rank
    assert main(["export-peft", str(tmp_path / "state"), str(tmp_path / "none"), "--agent", "alice", "--gated",
                 "exclude"]) == 2  # fmt: skip
    assert "gated ones left out" in capsys.readouterr().err
    assert main(["export-peft", str(tmp_path / "state"), str(tmp_path / "out2"), "--scope", "swarm:s"]) == 2
    assert "holds no circuits" in capsys.readouterr().err


def test_forward_benchmark_quick_writes_its_records(tmp_path):
    from dynamiclora.bench import forward

    checks = forward.main(["--quick", "--out", str(tmp_path), "--repeats", "2"])
    assert checks  # every target evaluated
    record = json.loads((tmp_path / "forward-cpu-quick.json").read_text())
    assert record["machine"]["cores"] and record["versions"]["torch"]
    variants = {r["variant"] for r in record["results"]}
    assert {"base", "stack", "peft-5", "one at a time (8 agents)", "decode batched (8 agents)"} <= variants
    assert (tmp_path / "forward-cpu-quick.md").exists() and (tmp_path / "forward-cpu-quick.png").exists()


def test_reach_benchmark_quick_counts_earlier_gates_each_prompt_reaches(tmp_path):
    from dynamiclora.bench import reach

    record = reach.main(["--quick", "--out", str(tmp_path)])
    assert list(record["rules"]) == list(reach.RULES)
    for rule in record["rules"].values():
        rows = rule["spans"]
        assert [r["edits"] for r in rows][0] == [1, 6] and rows[-1]["edits"][1] == 60
        for r in rows:
            assert 0.0 <= r["prompts_reaching_any"] <= 1.0 and r["reached_per_prompt"] >= r["prompts_reaching_any"]
        assert rows[0]["reached_per_prompt"] <= (6 - 1) / 2  # at most the facts taught before each prompt
        assert all(0.0 <= v <= 1.0 for v in rule["own_gate_reached"].values())
        assert 0.0 <= rule["subject_text_reaching_other"] <= 1.0 and 0.0 <= rule["neighbour_text_reaching_any"] <= 1.0
    # raising the reached gates lowers what later prompts reach on these facts (not in general: a raised gate can
    # make a prompt that would have joined it spawn a circuit of its own, which later prompts may reach)
    both, alike = (record["rules"][r]["spans"] for r in ("look-alike, both ways", "look-alike"))
    assert sum(r["reached_per_prompt"] for r in both) <= sum(r["reached_per_prompt"] for r in alike)
    assert (tmp_path / "reach-cpu-quick.md").exists()


def test_fact_forward_benchmark_quick_routes_new_requests_inside_their_forward(tmp_path):
    from dynamiclora.bench import fact_forward

    record = fact_forward.main(["--quick", "--out", str(tmp_path), "--repeats", "1"])
    assert [r["facts"] for r in record["rows"]] == [10, 60]
    for row in record["rows"]:
        assert 0 < row["circuits"] <= row["facts"] and row["learn_call_s"] > 0
        for mode in ("remembered", "new_request"):
            assert set(row[mode]) == set(fact_forward.KINDS)
        # circuits from the route layer on: a new request needs no route pre-pass (a match within SLACK of its
        # threshold may still take it, hence not all)
        assert all(row["new_request"][k]["routed_inline"] > 0.5 for k in fact_forward.KINDS)
    assert (tmp_path / "fact-forward-cpu-quick.md").exists() and (tmp_path / "fact-forward-cpu-quick.png").exists()


def test_dynamics_benchmark_quick_writes_its_records(tmp_path):
    from dynamiclora.bench import dynamics

    checks = dynamics.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "dynamics-cpu-quick.json").read_text())
    assert record["learning_step"][0]["ratio"] > 0 and len(record["tick_cost"]) == 2
    assert "context" in record["timescales"]["runs"][0]["per_tier"] and checks
    assert (tmp_path / "dynamics-cpu-quick.png").exists()


def test_wavegen_benchmark_quick_writes_its_records(tmp_path):
    from dynamiclora.bench import wavegen

    checks = wavegen.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "wavegen-cpu-quick.json").read_text())
    assert {r["layout"] for r in record["lookups"]} == {"many agents", "one agent"}
    assert record["serving"]["accepted"] == "64/64"  # a fully accepted verify was timed
    assert all(0 < w["hit_rate"] < 1 for w in record["zipf"]) and checks
    assert (tmp_path / "wavegen-cpu-quick.png").exists()


def test_swarm_benchmark_quick_writes_its_records(tmp_path):
    from dynamiclora.bench import swarm

    swarm.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "swarm-cpu-quick.json").read_text())
    assert [m["routing"] for m in record["modes"]] == [True, False]
    for mode in record["modes"]:
        rules = {r["rule"]: r for r in mode["rules"]}
        assert set(rules) == {"resonance", "mean", "ties", "pcgrad"}
        assert rules["resonance"]["contributors_keep_own"] == 1.0  # residuals keep every contributor's own patterns
        assert abs(rules["resonance"]["poison_share"]) < rules["mean"]["poison_share"]
    assert record["memory"]["tensor_bytes_per_agent"] > 0 and (tmp_path / "swarm-cpu-quick.png").exists()


def test_editing_benchmark_quick_writes_its_records(tmp_path):
    from dynamiclora.bench import editing

    editing.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "editing-cpu-quick.json").read_text())
    assert [m["label"] for m in record["methods"]] == [
        "prototype gate (embeddings)",
        "fact circuits: token gate, rank 1 on v_proj, chat variant",
        "WISE-style side memory",
    ]
    assert set(record["methods"][1]["exported"]) >= {"reliability", "locality_general", "forward_ratio"}
    for method in record["methods"]:
        assert [row["edits"] for row in method["rows"]] == [1, 10]
        for row in method["rows"]:
            assert set(row["generalization"]) == {"reworded", "prefixed", "chat", "spacing"}
            assert 0 <= row["locality_general"] <= 1 and row["bytes_per_fact"] > 0
    first = record["methods"][0]["rows"][0]
    assert first["reliability"] == 1.0 and first["locality_general"] == 1.0  # one gated edit: exact elsewhere
    assert first["perplexity_change"] > -0.5
    assert (tmp_path / "editing-cpu-quick.png").exists()


@pytest.mark.slow  # five server processes
def test_server_benchmark_quick_writes_its_records(tmp_path):
    from dynamiclora.bench import server

    checks = server.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "server-cpu-quick.json").read_text())
    runs = {(r["batching"], r["learning"]): r for r in record["runs"]}
    assert all(r["requests"] > 0 for r in runs.values()) and checks["zero failed requests"]
    continuous = runs[("continuous", True)]
    assert continuous["engine"]["scheduler"]["peak_rows"] > 1 and continuous["learns"] > 0  # it did batch and learn
    assert checks["every acknowledged learn survives SIGKILL"] and continuous["restart"]["acknowledged_learns"] > 0
    assert (tmp_path / "server-cpu-quick.png").exists()


def test_continual_benchmark_quick_writes_its_records(tmp_path):
    from dynamiclora.bench import continual

    continual.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "continual-cpu-quick.json").read_text())
    [report] = record["streams"]
    methods = {r["method"] for r in report["results"]}
    assert {"DynamicLoRA", "DynamicLoRA (no routing)", "sequential LoRA (PEFT)"} <= methods and len(methods) == 7
    assert all(len(r["R"]) in (1, 3) for r in report["results"]) and report["base_perplexity"] > 1
    assert set(record["targets"]) and all(isinstance(t["met"], bool) for t in record["targets"].values())
    assert (tmp_path / "continual-cpu-quick.png").exists()


def test_persistence_benchmark_quick_writes_its_records(tmp_path):
    from dynamiclora.bench import persistence

    record = persistence.main(["--quick", "--out", str(tmp_path)])
    assert [c["entries"] for c in record["cases"]] == [0, 1_000, 5_000] and record["targets"]
    assert (tmp_path / "persistence-quick.md").exists() and (tmp_path / "persistence-quick.png").exists()


class CutOff(Exception):
    pass


def test_an_editing_run_cut_off_goes_on_from_its_checkpoint_to_the_figures_of_a_run_never_cut(tmp_path, monkeypatch):
    from dynamiclora.bench import checkpoint, editing

    args = ["--quick", "--methods", "facts-late", "--steps", "2,4", "--tick-interval", "3"]
    whole = editing.main([*args, "--out", str(tmp_path / "whole")])["methods"][0]

    save = checkpoint.Checkpoint.save

    def save_then_stop(self, method, progress):  # the session ends right after the checkpoint at T = 2
        save(self, method, progress)
        raise CutOff

    monkeypatch.setattr(checkpoint.Checkpoint, "save", save_then_stop)
    resumable = [*args, "--checkpoint", str(tmp_path / "checkpoint")]
    with pytest.raises(CutOff):
        editing.main([*resumable, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(checkpoint.Checkpoint, "save", save)
    resumed = editing.main([*resumable, "--out", str(tmp_path / "resumed")])["methods"][0]

    clock = {"learn_s_per_edit", "learn_s_recent", "forward_ratio", "forward_ratio_first"}
    figures = lambda rows: [{k: v for k, v in r.items() if k not in clock} for r in rows]  # noqa: E731
    assert [r["edits"] for r in resumed["rows"]] == [2, 4]
    assert figures(resumed["rows"]) == figures(whole["rows"])
    assert {k: v for k, v in resumed["exported"].items() if k not in clock} == {
        k: v for k, v in whole["exported"].items() if k not in clock
    }
    assert resumed["per_edit"]["learn_calls"] == whole["per_edit"]["learn_calls"]
    assert resumed["per_edit"]["sessions_began_at"] == [0, 2]

    # the finished run's memory measured again from its checkpoint: the same figures, nothing learned
    again = editing.main([*resumable, "--evaluate-again", "--out", str(tmp_path / "again")])["methods"][0]
    assert figures(again["rows"]) == figures(whole["rows"])
    assert again["per_edit"]["learn_calls"] == whole["per_edit"]["learn_calls"]
    with pytest.raises(ValueError, match="no --checkpoint"):  # nothing to measure again: said, not a fresh run
        editing.main([*args, "--evaluate-again", "--out", str(tmp_path / "none")])
