"""Starting ``dynamiclora serve`` as a child process and waiting until it answers (benchmarks, tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(state_dir: Path, model: Path, port: int, admin_key: str, *options: str, timeout_s: float = 300):
    """``dynamiclora serve`` on ``port`` over ``state_dir`` (created on ``model`` if new); returns the process once
    ``/health`` answers. Its stderr goes to ``<state_dir>.stderr.log`` (a pipe nobody reads would fill up and
    block the server once it has logged 64 KiB)."""
    import httpx

    cmd = [sys.executable, "-m", "dynamiclora.cli", "serve", "--state-dir", str(state_dir), "--model", str(model),
           "--port", str(port), *options]  # fmt: skip
    env = {**os.environ, "DYNAMICLORA_ADMIN_KEY": admin_key}
    log = Path(f"{state_dir}.stderr.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"dynamiclora serve exited with {proc.returncode}: {tail}")
    proc.kill()
    raise RuntimeError(f"dynamiclora serve did not answer within {timeout_s:.0f} s")
