"""The API as described is the API as served: schemathesis, with all its checks, against a live server on loopback.

It reads ``/openapi.json``, generates valid and invalid bodies, parameters and headers for every operation, and
checks that valid requests are accepted, invalid ones rejected with a documented 4xx, responses match their
schemas and status codes, deleted resources are gone, and nothing answers a 5xx. Once with an agent's key (the
agent endpoints) and once with the admin key (registration, ticks, the dashboard, deletion)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from dynamiclora import DynamicLoRA
from dynamiclora.server import create_app
from dynamiclora.testing import tiny_chat_model

from .server_util import ADMIN, ADMIN_HEADERS, live, register

ROOT = Path(__file__).resolve().parent.parent
# a longer or another run: DYNAMICLORA_SCHEMATHESIS_EXAMPLES=200 DYNAMICLORA_SCHEMATHESIS_SEED=3 (environment)
EXAMPLES = os.environ.get("DYNAMICLORA_SCHEMATHESIS_EXAMPLES", "25")
SEED = os.environ.get("DYNAMICLORA_SCHEMATHESIS_SEED", "17")
ADMIN_PATHS = r"^/(v1/agents|v1/tick|dashboard)"


def _schemathesis() -> str | None:
    found = Path(sys.executable).with_name("schemathesis")
    return str(found) if found.exists() else shutil.which("schemathesis")


def _run(cli: str, url: str, key: str, context: int, selection: list[str], report: Path):
    command = [
        cli, "run", f"{url}/openapi.json", "--checks", "all", "-H", f"Authorization: Bearer {key}",
        "--max-examples", EXAMPLES, "--seed", SEED, "--generation-database", "none", "--workers", "1",
        "--continue-on-failure", "--no-color", "--report", "junit", "--report-junit-path", str(report),
        "--request-timeout", "60", *selection,
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "DYNAMICLORA_TEST_AGENT": "alice"}
    env["DYNAMICLORA_TEST_CONTEXT"] = str(context)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=report.parent)


def test_schemathesis_finds_no_failure_in_the_served_api(tmp_path):
    cli = _schemathesis()
    if cli is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    model, tokenizer = tiny_chat_model()
    dl = DynamicLoRA(model, tokenizer)
    app = create_app(dl, tmp_path / "state", admin_key=ADMIN, batch_wait_s=0.01)
    context = dl.runtime.max_positions
    with live(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        key = register(http, "alice")["Authorization"].removeprefix("Bearer ")
        http.post(
            "/v1/learn",
            json={"model": "alice", "prompt": "def f():", "completion": " return 1"},
            headers={"Authorization": f"Bearer {key}"},
        )  # fmt: skip  (a circuit to list and delete)
        runs = {
            "agent": _run(cli, url, key, context, ["--exclude-path-regex", ADMIN_PATHS], tmp_path / "agent.xml"),
            "admin": _run(cli, url, ADMIN, context, ["--include-path-regex", ADMIN_PATHS], tmp_path / "admin.xml"),
        }
        assert http.get("/health", headers=ADMIN_HEADERS).json()["status"] == "ok"
    for name, run in runs.items():
        assert run.returncode == 0, f"schemathesis ({name}'s key) failed:\n{run.stdout[-12000:]}\n{run.stderr[-2000:]}"
