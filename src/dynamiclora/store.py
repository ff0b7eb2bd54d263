"""Persistence: circuits as safetensors (one content-addressed file per scope), records in SQLite.

Layout of a state directory::

    state.sqlite                 meta, agents, scopes, circuits (WAL mode)
    scopes/<hash of content + circuit ids>.safetensors

A save is incremental: it writes each changed scope to a new file named by its content hash (temporary file,
fsync, rename, fsync of the directory), then, in one SQLite transaction, the rows that changed since the last save
to that directory (changed scopes' circuits, changed and evicted cache entries, new log records, meta), and only
after the commit deletes the files no committed record points at any more. Its cost follows what changed, not the
size of the cache, the number of agents or the age of the logs (each log keeps its newest ``LOG_CAP`` records). A
process killed at any moment leaves either the previous or the new state, both complete. Loading recomputes every
scope's content hash and names the file that is missing or does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .circuits import Circuit, tensor_digest
from .config import DynamicLoRAConfig
from .errors import CorruptStateError, StateMismatchError
from .eventlog import EventLog
from .gates import Gate
from .hierarchy import Clock, Hierarchy, Scope, ScopeKey
from .wavegen.cache import CacheEntry

if TYPE_CHECKING:
    from .dynamics import Memory
    from .learning import ContextLearner
    from .wavegen import WaveController

FORMAT_VERSION = 2  # 2: gates carry their radii (no shared routing statistic)
DB_NAME = "state.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (id TEXT PRIMARY KEY, swarm TEXT NOT NULL, domain TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scopes (tier TEXT NOT NULL, name TEXT NOT NULL, content_hash TEXT NOT NULL,
                                   file TEXT, circuits INTEGER NOT NULL, optimizer TEXT, PRIMARY KEY (tier, name));
CREATE TABLE IF NOT EXISTS circuits (id TEXT PRIMARY KEY, tier TEXT NOT NULL, scope TEXT NOT NULL,
                                     record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS migrations (seq INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS forgotten (seq INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cache_entries (id TEXT NOT NULL, tier TEXT NOT NULL, record TEXT NOT NULL, vector BLOB,
                                          PRIMARY KEY (tier, id));
CREATE TABLE IF NOT EXISTS cache_log (seq INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sharing_log (seq INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requesters (prompt TEXT PRIMARY KEY, seq INTEGER NOT NULL, who TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS circuits_by_scope ON circuits (tier, scope);
"""
TABLES = (
    "meta",
    "agents",
    "scopes",
    "circuits",
    "migrations",
    "forgotten",
    "cache_entries",
    "cache_log",
    "sharing_log",
    "requesters",
)
LOGS = ("migrations", "forgotten", "cache_log", "sharing_log")


def _json(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True)


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


GATE = ("route", "radii")  # a gate's keys and radii, stored beside the factors as "<id>//route", "<id>//radii"
TOKEN_GATE = ("groups", "strict", "ordered")  # and a token gate's prototype of each key, "<id>//groups", and its flags


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
        if c.gate is not None:
            for which, t in c.gate.to_tensors().items():
                tensors[_tensor_key(c.id, "", which)] = t.float().cpu().contiguous()
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


@dataclass
class Parts:
    """The stateful components a state directory holds, and the identity of the model they belong to."""

    hierarchy: Hierarchy
    clock: Clock
    memory: Memory
    wavegen: WaveController
    learner: ContextLearner
    generator: torch.Generator  # the learner's draws (key complements, augmentations)
    usage_sampler: torch.Generator  # which requests sample the merged tiers' usage (the dynamics read it)
    identity: dict[str, str]  # base_model, base_fingerprint, tokenizer_fingerprint, config (JSON)
    device: torch.device


class Writer:
    """Saves one DynamicLoRA to one state directory, writing only what changed since its last save there.

    It remembers, per scope, the (version, records) stamp and files it wrote, which agents and how much of each
    log; the cache reports its changed and removed entries and prompts itself. A save to another directory, or to
    one another writer wrote last (its token is in the meta table), is a full save."""

    def __init__(self) -> None:
        self.state_dir: Path | None = None
        self.token = ""
        self.scopes: dict[ScopeKey, tuple[tuple[int, int], str | None, str | None]] = {}  # stamp, file, optimizer
        self.agents: set[str] = set()
        self.logs: dict[str, int] = {}  # table -> sequence number saved up to (exclusive)
        self.request_seq = 0

    def save(self, dl: Parts, state_dir: Path, overwrite_other_model: bool = False) -> Path:
        state_dir.mkdir(parents=True, exist_ok=True)
        scope_dir = state_dir / "scopes"
        scope_dir.mkdir(exist_ok=True)
        cache = dl.wavegen.cache
        cache.sync(dl.hierarchy)  # entries of changed scopes go now: a saved cache is consistent with its scopes
        with closing(connect(state_dir / DB_NAME)) as con:
            meta = read_meta(con)
            if meta and meta.get("base_fingerprint") != dl.identity["base_fingerprint"] and not overwrite_other_model:
                raise StateMismatchError(
                    f"{state_dir} holds a state of another base model ({meta.get('base_model')!r}, fingerprint "
                    f"{meta.get('base_fingerprint', '')[:12]}…); save to another directory, or pass "
                    "overwrite_other_model=True to replace it"
                )
            full = self.state_dir != state_dir.resolve() or meta.get("writer") != self.token or not self.token
            if full:
                self.__init__()
                self.state_dir, self.token = state_dir.resolve(), os.urandom(8).hex()
            changed = {
                key: scope
                for key, scope in dl.hierarchy.scopes.items()
                if full or key not in self.scopes or self.scopes[key][0] != (scope.version, scope.records)
            }
            files = {}
            for key, scope in changed.items():  # tensors first: files nothing points at yet
                moments = dl.learner.state_tensors(list(scope.circuits.values())) if key.tier == "context" else {}
                files[key] = (write_scope(scope, scope_dir), write_optimizer(moments, scope_dir))
            logs = {
                "migrations": dl.memory.migrations,
                "forgotten": dl.memory.forgotten,
                "cache_log": dl.wavegen.log,
                "sharing_log": dl.memory.sharing.log,
            }
            new_meta = {
                **dl.identity,
                "format_version": str(FORMAT_VERSION),
                "writer": self.token,
                "tick_count": str(dl.clock.tick),
                "interactions": str(dl.clock.interactions),
                "dynamics": json.dumps(dl.memory.state(), sort_keys=True),
                "generator_state": dl.generator.get_state().numpy().tobytes().hex(),
                "usage_sampler_state": dl.usage_sampler.get_state().numpy().tobytes().hex(),
                "wavegen": json.dumps(cache.state(), sort_keys=True),
                "log_totals": json.dumps({t: log.total for t, log in logs.items()}, sort_keys=True),
            }
            removed = [k for k in self.scopes if k not in dl.hierarchy.scopes]  # a deleted agent's tiers
            departed = sorted(self.agents - set(dl.hierarchy.agents))
            entries, gone = cache.take_changes(everything=full)
            prompts, dropped = cache.take_request_changes(everything=full)
            con.execute("BEGIN IMMEDIATE")
            try:
                if full:
                    for table in TABLES:
                        con.execute(f"DELETE FROM {table}")
                con.executemany("DELETE FROM cache_entries WHERE tier = ? AND id = ?", sorted(gone))
                con.executemany(
                    "INSERT OR REPLACE INTO cache_entries VALUES (?, ?, ?, ?)",
                    [(e.id, e.tier, _json(e.record()), _vector_blob(e.vector)) for e in entries],
                )
                con.executemany("DELETE FROM requesters WHERE prompt = ?", [(k,) for k in sorted(dropped)])
                rows = []
                for key, who in prompts:
                    self.request_seq += 1
                    rows.append((key, self.request_seq, json.dumps([list(w) for w in who])))
                con.executemany("INSERT OR REPLACE INTO requesters VALUES (?, ?, ?)", rows)
                for table, log in logs.items():
                    saved = self.logs.get(table, 0)
                    con.executemany(
                        f"INSERT OR REPLACE INTO {table} VALUES (?, ?)",
                        [(seq, _json(r)) for seq, r in log.since(saved)],
                    )
                    con.execute(f"DELETE FROM {table} WHERE seq < ?", (log.first_seq,))
                con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", sorted(new_meta.items()))
                con.executemany(
                    "INSERT OR REPLACE INTO agents VALUES (?, ?, ?)",
                    [(a.id, a.swarm, a.domain) for a in dl.hierarchy.agents.values() if a.id not in self.agents],
                )
                con.executemany("DELETE FROM agents WHERE id = ?", [(a,) for a in departed])
                con.executemany("DELETE FROM scopes WHERE tier = ? AND name = ?", [(k.tier, k.name) for k in removed])
                con.executemany(  # first every changed scope's rows: a circuit may have moved between them
                    "DELETE FROM circuits WHERE tier = ? AND scope = ?",
                    [(k.tier, k.name) for k in [*changed, *removed]],
                )
                for key, scope in changed.items():
                    con.executemany(
                        "INSERT INTO circuits VALUES (?, ?, ?, ?)",
                        [(c.id, c.tier, c.scope, _json(c.record())) for c in scope.circuits.values()],
                    )
                    file, optimizer = files[key]
                    con.execute(
                        "INSERT OR REPLACE INTO scopes VALUES (?, ?, ?, ?, ?, ?)",
                        (key.tier, key.name, scope.content_hash(), file, len(scope), optimizer),
                    )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                cache.restore_changes(entries, gone, prompts, dropped)  # nothing was written: keep them pending
                if full:
                    self.__init__()
                raise
        replaced = set()
        for key in removed:
            _, file, optimizer = self.scopes.pop(key)
            replaced |= {file, optimizer}
        self.agents -= set(departed)
        for key, scope in changed.items():
            old = self.scopes.get(key)
            if old is not None:
                replaced |= {old[1], old[2]} - set(files[key])
            self.scopes[key] = ((scope.version, scope.records), *files[key])
        self.agents |= set(dl.hierarchy.agents)
        self.logs = {t: log.total for t, log in logs.items()}
        live = {f for _, a, b in self.scopes.values() for f in (a, b) if f}
        # after the commit: nothing committed points at these (a full save sweeps every stray file)
        stale = [p for p in scope_dir.iterdir() if p.suffix == ".safetensors"] if full else replaced
        for item in stale:
            name = item.name if isinstance(item, Path) else item
            if name and name not in live:
                (scope_dir / name).unlink(missing_ok=True)
        return state_dir

    def adopt(
        self,
        state_dir: Path,
        token: str,
        hierarchy: Hierarchy,
        files: dict[ScopeKey, tuple[str | None, str | None]],
        logs: dict[str, EventLog],
        request_seq: int,
    ) -> None:
        """Take over a state just loaded from ``state_dir``: what is on disk is what is in memory."""
        self.__init__()
        self.state_dir, self.token = state_dir.resolve(), token
        for key, scope in hierarchy.scopes.items():
            if key in files:
                self.scopes[key] = ((scope.version, scope.records), *files[key])
        self.agents = set(hierarchy.agents)
        self.logs = {t: log.total for t, log in logs.items()}
        self.request_seq = request_seq


@dataclass
class Saved:
    """What a state directory holds, read and checked for format, before any model is built."""

    state_dir: Path
    meta: dict[str, str]
    agents: list[tuple[str, str, str]]
    scopes: list[tuple[str, str, str, str | None, str | None]]
    records: list[dict[str, Any]]
    logs: dict[str, list[dict[str, Any]]]
    cache_rows: list[tuple[str, bytes | None]]
    requesters: list[tuple[str, list[tuple[str, str, str]]]]
    request_seq: int

    @property
    def config(self) -> DynamicLoRAConfig:
        return DynamicLoRAConfig.from_dict(json.loads(self.meta["config"]))


def read_state(state_dir: Path) -> Saved:
    """Read a saved state's records (tensors are read by :func:`restore_state`)."""
    db = state_dir / DB_NAME
    if not db.exists():
        raise CorruptStateError(f"{db} does not exist: {state_dir} is not a saved DynamicLoRA state (see dl.save)")
    try:
        with closing(connect(db)) as con:
            meta = read_meta(con)
            agents = con.execute("SELECT id, swarm, domain FROM agents ORDER BY id").fetchall()
            scopes = con.execute("SELECT tier, name, content_hash, file, optimizer FROM scopes").fetchall()
            records = [json.loads(r) for (r,) in con.execute("SELECT record FROM circuits").fetchall()]
            logs = {t: [json.loads(r) for (r,) in con.execute(f"SELECT record FROM {t} ORDER BY seq")] for t in LOGS}
            cache_rows = con.execute("SELECT record, vector FROM cache_entries").fetchall()
            requesters = [
                (k, [tuple(w) for w in json.loads(who)])
                for k, who in con.execute("SELECT prompt, who FROM requesters ORDER BY seq").fetchall()
            ]
            request_seq = con.execute("SELECT COALESCE(MAX(seq), 0) FROM requesters").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise CorruptStateError(f"{db} is not a readable SQLite database ({exc}); restore it from a backup") from exc
    if not meta:
        raise CorruptStateError(f"{db} holds no committed state; save one with dl.save({str(state_dir)!r})")
    if int(meta["format_version"]) > FORMAT_VERSION:
        raise StateMismatchError(
            f"{state_dir} was written by a newer format ({meta['format_version']}); upgrade dynamiclora to load it"
        )
    if int(meta["format_version"]) < FORMAT_VERSION:
        raise StateMismatchError(
            f"{state_dir} was written by format {meta['format_version']}, whose gates measured distances with a "
            f"statistic shared by all agents; format {FORMAT_VERSION} stores each gate's radii. Load it with "
            "dynamiclora 0.1.0 and re-learn, or start a new state"
        )
    return Saved(state_dir, meta, agents, scopes, records, logs, cache_rows, requesters, request_seq)


def restore_state(saved: Saved, dl: Parts, writer: Writer) -> None:
    """Fill freshly built components with a saved state, checking that it belongs to their model; ``writer``
    takes over the directory (the next save there is incremental)."""
    state_dir, meta = saved.state_dir, saved.meta
    agents, scopes, records, logs = saved.agents, saved.scopes, saved.records, saved.logs
    for what, recorded, actual in (
        ("base model", meta["base_fingerprint"], dl.identity["base_fingerprint"]),
        ("tokenizer", meta["tokenizer_fingerprint"], dl.identity["tokenizer_fingerprint"]),
    ):
        if recorded != actual:
            raise StateMismatchError(
                f"{state_dir} was saved for another {what} (fingerprint {recorded[:12]}…, this one is {actual[:12]}…, "
                f"recorded model {meta['base_model']!r}); load it with the {what} it was saved with"
            )
    for agent_id, swarm, domain in agents:
        dl.hierarchy.register(agent_id, swarm, domain)
    by_scope: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_scope.setdefault((r["tier"], r["scope"]), []).append(r)
    files = {}
    for tier, name, digest, file, optimizer in scopes:
        key = ScopeKey(tier, name)
        scope = dl.hierarchy.scope(key, create=True)
        files[key] = (file, optimizer)
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
            gate: dict[str, torch.Tensor] = {}
            for k, t in tensors.items():
                if k.startswith(prefix):
                    module, which = k[len(prefix) :].rsplit("/", 1)
                    if which in GATE or which in TOKEN_GATE:
                        gate[which] = t.cpu()
                    else:
                        factors.setdefault(module, [None, None])[0 if which == "A" else 1] = t
            if not factors or any(t is None for ab in factors.values() for t in ab):
                raise CorruptStateError(
                    f"{path} (scope {key}) lacks tensors of circuit {r['id']}; the file is "
                    "corrupted or belongs to another state; restore it from a backup"
                )
            circuit = Circuit.from_record(r, {m: (ab[0], ab[1]) for m, ab in factors.items()})
            if gate:
                if set(gate) - set(TOKEN_GATE) != set(GATE):
                    raise CorruptStateError(f"{path} (scope {key}) holds a partial gate of circuit {r['id']}")
                circuit.gate = Gate.restore(gate, r)
            scope.circuits[r["id"]] = circuit
        scope.touch()
        if scope.content_hash() != digest:
            raise CorruptStateError(
                f"{path} does not match its recorded content hash (scope {key}, expected {digest[:12]}…, "
                f"got {scope.content_hash()[:12]}…): the file is corrupted; restore it from a backup"
            )
    totals = json.loads(meta.get("log_totals", "{}"))
    logs = {t: EventLog(records, total=totals.get(t)) for t, records in logs.items()}
    dynamics = json.loads(meta.get("dynamics", "{}"))
    dl.memory.restore(dynamics, logs["migrations"], logs["forgotten"], logs["sharing_log"])
    for key, (_, optimizer) in files.items():
        if optimizer:
            path = state_dir / "scopes" / optimizer
            try:
                dl.learner.restore(load_file(path))
            except (SafetensorError, OSError) as exc:
                raise CorruptStateError(f"{path} (optimizer state of {key}) cannot be read: {exc}") from exc
    for name, generator in (("generator_state", dl.generator), ("usage_sampler_state", dl.usage_sampler)):
        if meta.get(name):  # (a state saved before the usage sampler was kept: it starts from its seed)
            generator.set_state(torch.frombuffer(bytearray.fromhex(meta[name]), dtype=torch.uint8))
    dl.clock.tick = int(meta.get("tick_count", 0))
    dl.clock.interactions = int(meta.get("interactions", 0))
    entries = [CacheEntry.from_record(json.loads(r), _vector(v)) for r, v in saved.cache_rows]
    dl.wavegen.cache.restore(json.loads(meta.get("wavegen", "{}")), entries, saved.requesters, dl.hierarchy)
    dl.wavegen.log = logs["cache_log"]
    writer.adopt(state_dir, meta.get("writer", ""), dl.hierarchy, files, logs, saved.request_seq)
