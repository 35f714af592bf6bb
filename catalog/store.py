"""SQLite storage of the catalog (WAL mode; one file under the data dir).

Synchronous and small: the servicer calls it through ``asyncio.to_thread`` so a slow disk never
stalls the event loop. All writes of one call happen in one transaction.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY,
    source_ref TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    architecture TEXT NOT NULL,
    parameter_count INTEGER NOT NULL,
    file_type TEXT NOT NULL,
    context_length INTEGER NOT NULL,
    block_count INTEGER NOT NULL,
    embedding_length INTEGER NOT NULL,
    state TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    created_unix_ms INTEGER NOT NULL,
    last_used_unix_ms INTEGER NOT NULL DEFAULT 0,
    state_changed_unix_ms INTEGER NOT NULL DEFAULT 0,
    chat_template TEXT NOT NULL DEFAULT '',
    bos_token TEXT NOT NULL DEFAULT '',
    eos_token TEXT NOT NULL DEFAULT '',
    control_tokens TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS replicas (
    model_id TEXT NOT NULL REFERENCES models(model_id) ON DELETE CASCADE,
    node_id TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    last_used_unix_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (model_id, node_id, path)
);
CREATE TABLE IF NOT EXISTS engines (
    node_id TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    backend TEXT NOT NULL,
    build_info TEXT NOT NULL,
    path TEXT NOT NULL,
    gpu_offload INTEGER NOT NULL,
    backend_libraries TEXT NOT NULL,
    checked_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (node_id, name, version)
);
CREATE TABLE IF NOT EXISTS gc_policies (
    node_id TEXT PRIMARY KEY,
    policy_json TEXT NOT NULL
);
"""

# Columns of ``models`` added after its first release (the CREATE TABLE above has them too): a
# catalog from before a column gets it, with its default, when it opens.
_ADDED_MODEL_COLUMNS = (
    ("state_changed_unix_ms", "INTEGER NOT NULL DEFAULT 0"),
    ("chat_template", "TEXT NOT NULL DEFAULT ''"),
    ("bos_token", "TEXT NOT NULL DEFAULT ''"),
    ("eos_token", "TEXT NOT NULL DEFAULT ''"),
    ("control_tokens", "TEXT NOT NULL DEFAULT '[]'"),  # a JSON array of strings
)
_MODEL_COLUMNS = (
    "model_id",
    "source_ref",
    "sha256",
    "size_bytes",
    "architecture",
    "parameter_count",
    "file_type",
    "context_length",
    "block_count",
    "embedding_length",
    "state",
    "pinned",
    "created_unix_ms",
    "chat_template",
    "bos_token",
    "eos_token",
    "control_tokens",
)
"""The columns a registration writes (the others keep their defaults)."""
_INSERT_MODEL = (
    f"INSERT INTO models ({', '.join(_MODEL_COLUMNS)}) "
    f"VALUES ({','.join('?' * len(_MODEL_COLUMNS))})"
)


class ModelState(enum.Enum):
    """Whether new tasks may use a model."""

    ACTIVE = "active"
    RETIRED = "retired"


@dataclass(frozen=True)
class ModelRecord:
    """A model row."""

    model_id: str
    source_ref: str
    sha256: str
    size_bytes: int
    architecture: str
    parameter_count: int
    file_type: str
    context_length: int
    block_count: int
    embedding_length: int
    state: ModelState = ModelState.ACTIVE
    pinned: bool = False
    created_unix_ms: int = 0
    last_used_unix_ms: int = 0
    state_changed_unix_ms: int = 0
    """When the state last changed (0: never since registration)."""
    chat_template: str = ""
    """The file's ``tokenizer.chat_template``; empty when it has none (or the model was
    registered before the catalog recorded it)."""
    bos_token: str = ""
    """Text of the beginning-of-sequence token."""
    eos_token: str = ""
    """Text of the end-of-sequence token."""
    control_tokens: tuple[str, ...] = ()
    """Texts of the vocabulary's control tokens, in vocabulary order."""

    @property
    def has_tokenizer_facts(self) -> bool:
        """Whether any of the tokenizer facts (template, BOS/EOS, control tokens) is known."""
        return bool(self.chat_template or self.bos_token or self.eos_token or self.control_tokens)


@dataclass(frozen=True)
class ReplicaRecord:
    """One copy of a model's file on a node."""

    model_id: str
    node_id: str
    path: str
    size_bytes: int
    last_used_unix_ms: int = field(default=0)


@dataclass(frozen=True)
class EngineRecord:
    """An inference engine installed on a node, as checked there."""

    node_id: str
    name: str
    version: str
    backend: str
    build_info: str
    path: str
    gpu_offload: bool
    backend_libraries: tuple[str, ...] = ()
    checked_unix_ms: int = 0


@dataclass(frozen=True)
class GcPolicy:
    """When model files may be deleted (provisioners/gc.py applies it); stored per node, or
    fleet-wide under node id ''."""

    max_disk_usage_pct: float = 90.0
    min_free_bytes: int = 10 * 1024**3
    keep_active: bool = True
    keep_used_within_days: float = 7.0
    delete_retired_after_days: float = 30.0


class ConflictError(Exception):
    """A model with that id exists with a different file."""


class CatalogStore:
    """The catalog's tables."""

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._conn.executescript(_SCHEMA)
            columns = {row["name"] for row in self._conn.execute("PRAGMA table_info(models)")}
            for name, declaration in _ADDED_MODEL_COLUMNS:
                if name not in columns:  # a catalog from before the column
                    self._conn.execute(f"ALTER TABLE models ADD COLUMN {name} {declaration}")

    def close(self) -> None:
        """Closes the database."""
        with self._lock:
            self._conn.close()

    def register(self, model: ModelRecord, replicas: list[ReplicaRecord]) -> ModelRecord:
        """Inserts the model (or keeps the identical existing one) and adds the replicas.

        The existing record of the same file gets the tokenizer facts of ``model`` when it has
        none: it was registered before the catalog recorded them.

        Raises:
            ConflictError: the id is taken by a file with another sha256.
        """
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                existing = self._get(model.model_id)
                if existing is not None and existing.sha256 != model.sha256:
                    raise ConflictError(
                        f"model {model.model_id} is registered with sha256 {existing.sha256}"
                    )
                if existing is None:
                    self._conn.execute(
                        _INSERT_MODEL,
                        (
                            model.model_id,
                            model.source_ref,
                            model.sha256,
                            model.size_bytes,
                            model.architecture,
                            model.parameter_count,
                            model.file_type,
                            model.context_length,
                            model.block_count,
                            model.embedding_length,
                            model.state.value,
                            int(model.pinned),
                            model.created_unix_ms or _now_ms(),
                            *_tokenizer_columns(model),
                        ),
                    )
                elif model.has_tokenizer_facts and not existing.has_tokenizer_facts:
                    self._conn.execute(
                        "UPDATE models SET chat_template = ?, bos_token = ?, eos_token = ?, "
                        "control_tokens = ? WHERE model_id = ?",
                        (*_tokenizer_columns(model), model.model_id),
                    )
                for rep in replicas:
                    self._conn.execute(
                        "INSERT INTO replicas (model_id, node_id, path, size_bytes) "
                        "VALUES (?,?,?,?) ON CONFLICT DO UPDATE SET size_bytes=excluded.size_bytes",
                        (model.model_id, rep.node_id, rep.path, rep.size_bytes),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            stored = self._get(model.model_id)
        assert stored is not None
        return stored

    def get(self, model_id: str) -> ModelRecord | None:
        """The model, or None."""
        with self._lock:
            return self._get(model_id)

    def list_models(
        self,
        after_id: str,
        limit: int,
        state: ModelState | None = None,
        node_id: str = "",
    ) -> list[ModelRecord]:
        """Up to ``limit`` models with ids greater than ``after_id``, in id order; only those in
        ``state`` and with a copy on ``node_id`` when given."""
        query = "SELECT * FROM models WHERE model_id > ?"
        args: list[object] = [after_id]
        if state is not None:
            query += " AND state = ?"
            args.append(state.value)
        if node_id:
            query += (
                " AND EXISTS (SELECT 1 FROM replicas r"
                " WHERE r.model_id = models.model_id AND r.node_id = ?)"
            )
            args.append(node_id)
        with self._lock:
            rows = self._conn.execute(
                query + " ORDER BY model_id LIMIT ?", (*args, limit)
            ).fetchall()
        return [_model(row) for row in rows]

    def set_state(self, model_id: str, state: ModelState) -> ModelRecord | None:
        """Sets a model's state; the model after, or None when unknown."""
        with self._lock:
            self._conn.execute(
                "UPDATE models SET state = ?, state_changed_unix_ms = ? "
                "WHERE model_id = ? AND state != ?",
                (state.value, _now_ms(), model_id, state.value),
            )
            return self._get(model_id)

    def set_pinned(self, model_id: str, pinned: bool) -> ModelRecord | None:
        """Pins or unpins a model; the model after, or None when unknown."""
        return self._update(model_id, "pinned = ?", int(pinned))

    def _update(self, model_id: str, assignment: str, value: object) -> ModelRecord | None:
        with self._lock:
            self._conn.execute(
                f"UPDATE models SET {assignment} WHERE model_id = ?",  # assignment: our literals
                (value, model_id),
            )
            return self._get(model_id)

    def locate(self, model_id: str, node_id: str = "") -> list[ReplicaRecord]:
        """Replicas of a model, optionally on one node only."""
        query = "SELECT * FROM replicas WHERE model_id = ?"
        args: tuple[str, ...] = (model_id,)
        if node_id:
            query += " AND node_id = ?"
            args += (node_id,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY node_id, path", args).fetchall()
        return [
            ReplicaRecord(
                model_id=row["model_id"],
                node_id=row["node_id"],
                path=row["path"],
                size_bytes=row["size_bytes"],
                last_used_unix_ms=row["last_used_unix_ms"],
            )
            for row in rows
        ]

    def put_engine(self, engine: EngineRecord) -> EngineRecord:
        """Records an engine, replacing the entry of the same node, name and version."""
        checked = engine.checked_unix_ms or _now_ms()
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO engines VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    engine.node_id,
                    engine.name,
                    engine.version,
                    engine.backend,
                    engine.build_info,
                    engine.path,
                    int(engine.gpu_offload),
                    ",".join(engine.backend_libraries),
                    checked,
                ),
            )
        return replace(engine, checked_unix_ms=checked)

    def list_engines(self, node_id: str = "") -> list[EngineRecord]:
        """Engines, of one node or all, by node, name and version."""
        query = "SELECT * FROM engines"
        args: tuple[str, ...] = ()
        if node_id:
            query += " WHERE node_id = ?"
            args = (node_id,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY node_id, name, version", args).fetchall()
        return [
            EngineRecord(
                node_id=row["node_id"],
                name=row["name"],
                version=row["version"],
                backend=row["backend"],
                build_info=row["build_info"],
                path=row["path"],
                gpu_offload=bool(row["gpu_offload"]),
                backend_libraries=tuple(x for x in row["backend_libraries"].split(",") if x),
                checked_unix_ms=row["checked_unix_ms"],
            )
            for row in rows
        ]

    def delete_model(self, model_id: str) -> list[ReplicaRecord] | None:
        """Deletes a model and its replica records; the records as they were, None when the
        model is unknown."""
        replicas = self.locate(model_id)
        with self._lock:
            cursor = self._conn.execute("DELETE FROM models WHERE model_id = ?", (model_id,))
        return replicas if cursor.rowcount else None

    def mark_used(self, node_id: str, model_ids: list[str]) -> None:
        """Sets the last-used time of the models, and of their copies on ``node_id``, to now."""
        if not model_ids:
            return
        now = _now_ms()
        marks = ",".join("?" * len(model_ids))
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    f"UPDATE models SET last_used_unix_ms = ? WHERE model_id IN ({marks})",
                    (now, *model_ids),
                )
                self._conn.execute(
                    "UPDATE replicas SET last_used_unix_ms = ? "
                    f"WHERE node_id = ? AND model_id IN ({marks})",
                    (now, node_id, *model_ids),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def delete_replica(self, model_id: str, node_id: str, path: str) -> bool:
        """Removes one replica record; whether it existed."""
        with self._lock:
            cursor = self._conn.execute(
                "DELETE FROM replicas WHERE model_id = ? AND node_id = ? AND path = ?",
                (model_id, node_id, path),
            )
        return cursor.rowcount > 0

    def gc_policy(self, node_id: str) -> tuple[dict[str, object] | None, bool]:
        """The node's policy (as stored), else the default's; and whether it is the node's own.
        (None, False) when neither was ever set."""
        with self._lock:
            rows = {
                row["node_id"]: row["policy_json"]
                for row in self._conn.execute(
                    "SELECT * FROM gc_policies WHERE node_id IN (?, '')", (node_id,)
                )
            }
        if node_id and node_id in rows:
            return json.loads(rows[node_id]), True
        if "" in rows:
            return json.loads(rows[""]), False
        return None, False

    def set_gc_policy(self, node_id: str, policy: dict[str, object]) -> None:
        """Stores a node's policy ('' for the default)."""
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO gc_policies VALUES (?, ?)",
                (node_id, json.dumps(policy, sort_keys=True)),
            )

    def _get(self, model_id: str) -> ModelRecord | None:
        row = self._conn.execute("SELECT * FROM models WHERE model_id = ?", (model_id,)).fetchone()
        return None if row is None else _model(row)


def _model(row: sqlite3.Row) -> ModelRecord:
    return ModelRecord(
        model_id=row["model_id"],
        source_ref=row["source_ref"],
        sha256=row["sha256"],
        size_bytes=row["size_bytes"],
        architecture=row["architecture"],
        parameter_count=row["parameter_count"],
        file_type=row["file_type"],
        context_length=row["context_length"],
        block_count=row["block_count"],
        embedding_length=row["embedding_length"],
        state=ModelState(row["state"]),
        pinned=bool(row["pinned"]),
        created_unix_ms=row["created_unix_ms"],
        last_used_unix_ms=row["last_used_unix_ms"],
        state_changed_unix_ms=row["state_changed_unix_ms"],
        chat_template=row["chat_template"],
        bos_token=row["bos_token"],
        eos_token=row["eos_token"],
        control_tokens=tuple(json.loads(row["control_tokens"])),
    )


def _tokenizer_columns(model: ModelRecord) -> tuple[str, str, str, str]:
    return (
        model.chat_template,
        model.bos_token,
        model.eos_token,
        json.dumps(list(model.control_tokens), ensure_ascii=False),
    )


def _now_ms() -> int:
    return int(time.time() * 1000)
