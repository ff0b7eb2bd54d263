"""Persistence: circuits as safetensors (one content-addressed file per scope), records in SQLite.

Layout of a state directory::

    state.sqlite                 meta, agents, scopes, circuits (WAL mode)
    scopes/<hash of content + circuit ids>.safetensors

A save writes each changed scope to a new file named by its content hash (temporary file, fsync,
rename, fsync of the directory), then replaces every record in one SQLite transaction, and only after
the commit deletes files no committed record points at. A process killed at any moment therefore
leaves either the previous or the new state, both complete. Loading recomputes every scope's content
hash and names the file that is missing or does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .circuits import Circuit, tensor_digest
from .config import DynamicLoRAConfig
from .errors import CorruptStateError, StateMismatchError
from .hierarchy import Scope, ScopeKey

if TYPE_CHECKING:
    from torch import nn

    from .core import DynamicLoRA

FORMAT_VERSION = 1
DB_NAME = "state.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (id TEXT PRIMARY KEY, swarm TEXT NOT NULL, domain TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scopes (tier TEXT NOT NULL, name TEXT NOT NULL, content_hash TEXT NOT NULL,
                                   file TEXT, circuits INTEGER NOT NULL, PRIMARY KEY (tier, name));
CREATE TABLE IF NOT EXISTS circuits (id TEXT PRIMARY KEY, tier TEXT NOT NULL, scope TEXT NOT NULL,
                                     record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS migrations (seq INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS forgotten (seq INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cache_entries (id TEXT NOT NULL, tier TEXT NOT NULL, record TEXT NOT NULL, vector BLOB,
                                          PRIMARY KEY (tier, id));
CREATE TABLE IF NOT EXISTS cache_log (seq INTEGER PRIMARY KEY, record TEXT NOT NULL);
"""
TABLES = ("meta", "agents", "scopes", "circuits", "migrations", "forgotten", "cache_entries", "cache_log")


def _vector_blob(vector: torch.Tensor | None) -> bytes | None:
    return None if vector is None else vector.detach().float().cpu().contiguous().numpy().tobytes()


def _vector(blob: bytes | None) -> torch.Tensor | None:
    return None if blob is None else torch.frombuffer(bytearray(blob), dtype=torch.float32).clone()


def connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.executescript(SCHEMA)
    return con


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, fsync the file, rename it over ``path``, fsync the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


ROUTE = "route"  # a gated circuit's prototypes, stored beside its factors under "<id>//route"


def _tensor_key(circuit_id: str, module: str, which: str) -> str:
    return f"{circuit_id}/{module}/{which}"


def write_scope(scope: Scope, directory: Path) -> str | None:
    """Write a scope's tensors to ``<hash>.safetensors`` unless that file already exists; returns its name.

    The file is addressed by the scope's content hash *and* its circuit ids (the tensors are keyed by id): two
    scopes of equal content but different circuits (e.g. two agents' residuals of one consensus) get two files."""
    if not scope.circuits:
        return None
    digest = scope.content_hash()
    h = hashlib.sha256(digest.encode())
    for cid in sorted(scope.circuits):
        h.update(cid.encode())
    name = f"{h.hexdigest()}.safetensors"
    path = directory / name
    if path.exists():
        return name
    tensors = {}
    for c in scope.circuits.values():
        for module, (a, b) in c.factors.items():
            tensors[_tensor_key(c.id, module, "A")] = a.detach().float().cpu().contiguous()
            tensors[_tensor_key(c.id, module, "B")] = b.detach().float().cpu().contiguous()
        if c.prototypes is not None:
            tensors[_tensor_key(c.id, "", ROUTE)] = c.prototypes.detach().float().cpu().contiguous()
    metadata = {"scope": str(scope.key), "content_hash": digest, "format_version": str(FORMAT_VERSION)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return name


def write_optimizer(tensors: dict[str, torch.Tensor], directory: Path) -> str | None:
    """The context optimizer's moments, content-addressed like the scopes (so a crash cannot mismatch them)."""
    if not tensors:
        return None
    h = hashlib.sha256(b"optimizer")
    for key in sorted(tensors):
        h.update(key.encode())
        tensor_digest(h, tensors[key])
    name = f"optimizer-{h.hexdigest()}.safetensors"
    if not (directory / name).exists():
        atomic_write(directory / name, lambda tmp: save_file(tensors, tmp))
    return name


def read_meta(con: sqlite3.Connection) -> dict[str, str]:
    return dict(con.execute("SELECT key, value FROM meta").fetchall())


def save_state(dl: DynamicLoRA, state_dir: Path, overwrite_other_model: bool = False) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    scope_dir = state_dir / "scopes"
    scope_dir.mkdir(exist_ok=True)
    with closing(connect(state_dir / DB_NAME)) as con:
        meta = read_meta(con)
        if meta and meta.get("base_fingerprint") != dl.base_fingerprint and not overwrite_other_model:
            raise StateMismatchError(
                f"{state_dir} holds a state of another base model ({meta.get('base_model')!r}, fingerprint "
                f"{meta.get('base_fingerprint', '')[:12]}…); save to another directory, or pass "
                "overwrite_other_model=True to replace it"
            )
        files = {key: write_scope(scope, scope_dir) for key, scope in dl.hierarchy.scopes.items()}
        optimizer_file = write_optimizer(dl.learner.state_tensors(), scope_dir)
        new_meta = {
            "format_version": str(FORMAT_VERSION),
            "base_model": dl.model_id,
            "base_fingerprint": dl.base_fingerprint,
            "tokenizer_fingerprint": dl.tokenizer_fingerprint,
            "config": json.dumps(dl.config.to_dict(), sort_keys=True),
            "tick_count": str(dl.tick_count),
            "interactions": str(dl.interactions),
            "dynamics": json.dumps(dl.memory.state(), sort_keys=True),
            "optimizer_file": optimizer_file or "",
            "generator_state": dl.generator.get_state().numpy().tobytes().hex(),
            "wavegen": json.dumps(dl.wavegen.cache.state(), sort_keys=True),
            "router": json.dumps(dl.router.state(), sort_keys=True),
        }
        con.execute("BEGIN IMMEDIATE")
        try:
            for table in TABLES:
                con.execute(f"DELETE FROM {table}")
            con.executemany(
                "INSERT INTO cache_entries VALUES (?, ?, ?, ?)",
                [
                    (e.id, e.tier, json.dumps(e.record(), sort_keys=True), _vector_blob(e.vector))
                    for e in dl.wavegen.cache.entries()
                ],
            )
            logs = (
                ("migrations", dl.memory.migrations),
                ("forgotten", dl.memory.forgotten),
                ("cache_log", dl.wavegen.log),
            )
            for table, log in logs:
                con.executemany(
                    f"INSERT INTO {table} VALUES (?, ?)",
                    [(i, json.dumps(r, sort_keys=True)) for i, r in enumerate(log)],
                )
            con.executemany("INSERT INTO meta VALUES (?, ?)", sorted(new_meta.items()))
            con.executemany(
                "INSERT INTO agents VALUES (?, ?, ?)",
                [(a.id, a.swarm, a.domain) for a in dl.hierarchy.agents.values()],
            )
            con.executemany(
                "INSERT INTO scopes VALUES (?, ?, ?, ?, ?)",
                [(k.tier, k.name, s.content_hash(), files[k], len(s)) for k, s in dl.hierarchy.scopes.items()],
            )
            con.executemany(
                "INSERT INTO circuits VALUES (?, ?, ?, ?)",
                [(c.id, c.tier, c.scope, json.dumps(c.record(), sort_keys=True)) for c in dl.hierarchy.all_circuits()],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        live = {f for f in files.values() if f} | ({optimizer_file} if optimizer_file else set())
    for path in scope_dir.iterdir():  # after the commit: nothing committed points at these
        if path.name not in live and path.suffix == ".safetensors":
            path.unlink(missing_ok=True)
    return state_dir


def load_state(
    cls: type[DynamicLoRA], state_dir: Path, model: nn.Module | None, tokenizer: Any, **kwargs: Any
) -> DynamicLoRA:
    db = state_dir / DB_NAME
    if not db.exists():
        raise CorruptStateError(f"{db} does not exist: {state_dir} is not a saved DynamicLoRA state (see dl.save)")
    try:
        with closing(connect(db)) as con:
            meta = read_meta(con)
            agents = con.execute("SELECT id, swarm, domain FROM agents ORDER BY id").fetchall()
            scopes = con.execute("SELECT tier, name, content_hash, file FROM scopes").fetchall()
            records = [json.loads(r) for (r,) in con.execute("SELECT record FROM circuits").fetchall()]
            logs = {
                t: [json.loads(r) for (r,) in con.execute(f"SELECT record FROM {t} ORDER BY seq")]
                for t in ("migrations", "forgotten", "cache_log")
            }
            cache_rows = con.execute("SELECT record, vector FROM cache_entries").fetchall()
    except sqlite3.DatabaseError as exc:
        raise CorruptStateError(f"{db} is not a readable SQLite database ({exc}); restore it from a backup") from exc
    if not meta:
        raise CorruptStateError(f"{db} holds no committed state; save one with dl.save({str(state_dir)!r})")
    if int(meta["format_version"]) > FORMAT_VERSION:
        raise StateMismatchError(
            f"{state_dir} was written by a newer format ({meta['format_version']}); upgrade dynamiclora to load it"
        )
    config = DynamicLoRAConfig.from_dict(json.loads(meta["config"]))
    if model is None:
        dl = cls.from_pretrained(meta["base_model"], config, **kwargs)
    else:
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with the model to DynamicLoRA.load")
        dl = cls(model, tokenizer, config, model_id=meta["base_model"])
    for what, saved, actual in (
        ("base model", meta["base_fingerprint"], dl.base_fingerprint),
        ("tokenizer", meta["tokenizer_fingerprint"], dl.tokenizer_fingerprint),
    ):
        if saved != actual:
            raise StateMismatchError(
                f"{state_dir} was saved for another {what} (fingerprint {saved[:12]}…, this one is {actual[:12]}…, "
                f"recorded model {meta['base_model']!r}); load it with the {what} it was saved with"
            )
    for agent_id, swarm, domain in agents:
        dl.hierarchy.register(agent_id, swarm, domain)
    by_scope: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_scope.setdefault((r["tier"], r["scope"]), []).append(r)
    for tier, name, digest, file in scopes:
        key = ScopeKey(tier, name)
        scope = dl.hierarchy.scope(key, create=True)
        if file is None:
            continue
        path = state_dir / "scopes" / file
        if not path.exists():
            raise CorruptStateError(f"{path} is missing (scope {key}); the state directory is incomplete")
        try:
            tensors = load_file(path, device=str(dl.device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CorruptStateError(f"{path} (scope {key}) cannot be read: {exc}") from exc
        for r in by_scope.get((tier, name), []):
            prefix = f"{r['id']}/"
            factors: dict[str, list[torch.Tensor]] = {}
            prototypes = None
            for k, t in tensors.items():
                if k.startswith(prefix):
                    module, which = k[len(prefix) :].rsplit("/", 1)
                    if which == ROUTE:
                        prototypes = t.cpu()
                    else:
                        factors.setdefault(module, [None, None])[0 if which == "A" else 1] = t
            if not factors or any(t is None for ab in factors.values() for t in ab):
                raise CorruptStateError(
                    f"{path} (scope {key}) lacks tensors of circuit {r['id']}; the file is "
                    "corrupted or belongs to another state; restore it from a backup"
                )
            circuit = Circuit.from_record(r, {m: (ab[0], ab[1]) for m, ab in factors.items()})
            circuit.prototypes = prototypes
            scope.circuits[r["id"]] = circuit
        scope.touch()
        if scope.content_hash() != digest:
            raise CorruptStateError(
                f"{path} does not match its recorded content hash (scope {key}, expected {digest[:12]}…, "
                f"got {scope.content_hash()[:12]}…): the file is corrupted; restore it from a backup"
            )
    dl.memory.restore(json.loads(meta.get("dynamics", "{}")), logs["migrations"], logs["forgotten"])
    try:
        dl.router.restore(json.loads(meta.get("router", "{}")))
    except ValueError as exc:
        raise StateMismatchError(f"{state_dir}: {exc}") from exc
    if meta.get("optimizer_file"):
        path = state_dir / "scopes" / meta["optimizer_file"]
        try:
            dl.learner.restore(load_file(path))
        except (SafetensorError, OSError) as exc:
            raise CorruptStateError(f"{path} (optimizer state) cannot be read: {exc}") from exc
    if meta.get("generator_state"):
        dl.generator.set_state(torch.frombuffer(bytearray.fromhex(meta["generator_state"]), dtype=torch.uint8))
    dl.tick_count = int(meta.get("tick_count", 0))
    dl.interactions = int(meta.get("interactions", 0))
    from .wavegen import CacheEntry

    entries = [CacheEntry.from_record(json.loads(r), _vector(v)) for r, v in cache_rows]
    dl.wavegen.cache.restore(json.loads(meta.get("wavegen", "{}")), entries, dl.hierarchy)
    dl.wavegen.log = logs["cache_log"]
    return dl
