"""Helpers for the server tests: an app on a tiny model, and a live uvicorn server on loopback."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from dynamiclora.server.launch import free_port

ADMIN = "admin-key-for-tests"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@contextmanager
def live(app):
    """Serve ``app`` on a free loopback port in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not start within 30 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def register(client, agent: str, swarm: str = "team", domain: str = "python") -> dict[str, str]:
    r = client.post("/v1/agents", json={"id": agent, "swarm": swarm, "domain": domain}, headers=ADMIN_HEADERS)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


def state_files(state_dir: Path) -> set[str]:
    return {p.name for p in state_dir.iterdir()}
