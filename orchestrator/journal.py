"""The task journal: every accepted task, its state and its tokens, in SQLite (WAL).

Writes never run on the event loop. Callers append records to a buffer; one writer thread takes
whatever has piled up within ``flush_s`` (20 ms) and commits it in one transaction (group
commit), so a busy token stream costs one small INSERT batch per commit, not one per token, and
the commit of a new task runs after its first token rather than beside it. Records are encoded
(JSON) on the writer thread too; the event loop only appends. ``record_task`` returns a future
that resolves once the task's row is committed: SubmitTask answers only then, so an accepted task
survives the orchestrator being killed. WAL with ``synchronous=NORMAL`` makes a committed
transaction survive a killed process (it is in the OS's file cache); a power cut may lose the
last few commits.

Tokens are journaled as the messages the pool sent (index, ids, text), so a replay yields the
same message boundaries the live stream had, up to the last commit before a crash.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh import logs
from orchestrator.tasks import Priority, Sampling, TaskSpec

_log = logs.get_logger("orchestrator.journal")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    spec TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    created_unix_s REAL NOT NULL,
    deadline_unix_s REAL,
    state TEXT NOT NULL,
    pool_id TEXT NOT NULL DEFAULT '',
    node_id TEXT NOT NULL DEFAULT '',
    outcome TEXT,
    ended_unix_s REAL
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks(state, seq);
CREATE TABLE IF NOT EXISTS tokens (
    task_id TEXT NOT NULL REFERENCES tasks(task_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    token_ids TEXT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (task_id, idx)
);
"""


@dataclass(frozen=True)
class TaskRow:
    """A task as the journal holds it."""

    task_id: str
    seq: int
    spec: dict[str, Any]
    correlation_id: str
    created_unix_s: float
    deadline_unix_s: float | None
    state: str
    pool_id: str
    node_id: str
    outcome: dict[str, Any] | None
    ended_unix_s: float | None
    tokens: list[tuple[int, list[int], str]]


@dataclass
class _Write:
    sql: str
    args: tuple[Any, ...]
    """Parameters; a callable among them is called on the writer thread (deferred encoding)."""
    committed: asyncio.Future[None] | None = None
    """Resolved on its event loop once the write is committed (or has failed, logged)."""


class Journal:
    """Durable record of tasks; one writer thread, group commits."""

    def __init__(self, path: Path, flush_s: float = 0.02) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.flush_s = flush_s
        """Longest a record waits for company before it is committed (unless awaited)."""
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)
        row = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()
        self._seq = int(row[0])
        self._pending: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._urgent = threading.Event()
        self._thread = threading.Thread(target=self._write_loop, name="journal", daemon=True)
        self._thread.start()
        self.commits = 0
        """Transactions committed so far (batches, not records)."""

    def close(self) -> None:
        """Commits what is pending, then closes the file."""
        self._pending.put(None)
        self._urgent.set()
        self._thread.join()
        self._conn.close()

    # --- writes (from the event loop; cheap) ---------------------------------------------

    def record_task(self, row: TaskRow, urgent: bool = True) -> asyncio.Future[None]:
        """Journals a newly accepted task; the future resolves once it is committed.

        ``urgent``: the caller awaits the future, so commit now rather than within flush_s.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        self._pending.put(
            _Write(
                "INSERT OR REPLACE INTO tasks (task_id, seq, spec, correlation_id, created_unix_s,"
                " deadline_unix_s, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    row.task_id,
                    self._seq,
                    lambda: json.dumps(row.spec),
                    row.correlation_id,
                    row.created_unix_s,
                    row.deadline_unix_s,
                    row.state,
                ),
                future,
            )
        )
        if urgent:
            self._urgent.set()
        return future

    def commit_now(self) -> None:
        """Commits what is pending without waiting for the flush interval."""
        self._urgent.set()

    def record_start(self, task_id: str, pool_id: str, node_id: str) -> None:
        """The task started on a pool."""
        self._pending.put(
            _Write(
                "UPDATE tasks SET state = 'running', pool_id = ?, node_id = ? WHERE task_id = ?",
                (pool_id, node_id, task_id),
            )
        )

    def record_tokens(
        self, task_id: str, index: int, token_ids: tuple[int, ...], text: str
    ) -> None:
        """One token message of a running task."""
        self._pending.put(
            _Write(
                "INSERT OR IGNORE INTO tokens (task_id, idx, token_ids, text) VALUES (?, ?, ?, ?)",
                (task_id, index, lambda: json.dumps(token_ids), text),
            )
        )

    def record_end(
        self, task_id: str, state: str, outcome: dict[str, Any], ended_unix_s: float
    ) -> None:
        """The task ended (succeeded, failed or cancelled)."""
        self._pending.put(
            _Write(
                "UPDATE tasks SET state = ?, outcome = ?, ended_unix_s = ? WHERE task_id = ?",
                (state, lambda: json.dumps(outcome), ended_unix_s, task_id),
            )
        )

    def record_requeue(self, task_id: str) -> None:
        """A task goes back to the queue (it emitted nothing before its pool was lost)."""
        self._pending.put(
            _Write(
                "UPDATE tasks SET state = 'queued', pool_id = '', node_id = '' WHERE task_id = ?",
                (task_id,),
            )
        )

    def forget(self, task_ids: list[str]) -> None:
        """Deletes finished tasks past their retention."""
        for task_id in task_ids:
            self._pending.put(_Write("DELETE FROM tasks WHERE task_id = ?", (task_id,)))

    # --- reads (at start, before the writer has anything to do) -------------------------

    def load(self) -> list[TaskRow]:
        """Every journaled task in arrival order, with its tokens."""
        tokens: dict[str, list[tuple[int, list[int], str]]] = {}
        for task_id, idx, ids, text in self._conn.execute(
            "SELECT task_id, idx, token_ids, text FROM tokens ORDER BY task_id, idx"
        ):
            tokens.setdefault(task_id, []).append((idx, json.loads(ids), text))
        rows = []
        for r in self._conn.execute(
            "SELECT task_id, seq, spec, correlation_id, created_unix_s, deadline_unix_s, state,"
            " pool_id, node_id, outcome, ended_unix_s FROM tasks ORDER BY seq"
        ):
            rows.append(
                TaskRow(
                    task_id=r[0],
                    seq=r[1],
                    spec=json.loads(r[2]),
                    correlation_id=r[3],
                    created_unix_s=r[4],
                    deadline_unix_s=r[5],
                    state=r[6],
                    pool_id=r[7],
                    node_id=r[8],
                    outcome=json.loads(r[9]) if r[9] else None,
                    ended_unix_s=r[10],
                    tokens=tokens.get(r[0], []),
                )
            )
        return rows

    # --- the writer thread ----------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            first = self._pending.get()
            # Records nobody waits for gather for up to flush_s, so a commit does not compete
            # with a task's first token for the CPU. The thread sleeps on the urgent event, not
            # on the buffer, so the records appended meanwhile do not wake it one by one; a
            # record a caller awaits (or close) sets the event and is committed at once.
            self._urgent.wait(self.flush_s)
            self._urgent.clear()
            batch = [first]
            while True:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            writes = [w for w in batch if w is not None]
            if writes:
                self._commit(writes)
            if None in batch:
                return

    def _commit(self, writes: list[_Write]) -> None:
        try:
            self._conn.execute("BEGIN")
            # Runs of the same statement (a batch of new tasks, a stream of tokens) go to
            # SQLite in one executemany: one Python call per run rather than per record.
            for sql, run in itertools.groupby(writes, key=lambda w: w.sql):
                self._conn.executemany(
                    sql, [tuple(a() if callable(a) else a for a in w.args) for w in run]
                )
            self._conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error:
            # A full disk or a broken file: the tasks still run, but would not survive a
            # restart; say so loudly rather than stop serving.
            _log.exception("journal write failed; %d records not saved", len(writes))
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        # One wake-up of each waiting event loop per commit, not one per record.
        waiting: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for write in writes:
            if write.committed is not None:
                waiting.setdefault(write.committed.get_loop(), []).append(write.committed)
        for loop, futures in waiting.items():
            try:
                loop.call_soon_threadsafe(_resolve, futures)
            except RuntimeError:
                pass  # that loop has closed: nobody waits any more


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


def spec_to_json(spec: TaskSpec) -> dict[str, Any]:
    """A TaskSpec as JSON-ready data."""
    s = spec.sampling
    return {
        "model_id": spec.model_id,
        "prompt": spec.prompt,
        "sampling": {
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "seed": s.seed,
            "stop": list(s.stop),
            "ignore_eos": s.ignore_eos,
        },
        "priority": int(spec.priority),
        "request_id": spec.request_id,
        "max_tokens_defaulted": spec.max_tokens_defaulted,
        "tenant": spec.tenant,
        "templated": spec.templated,
        "grammar": spec.grammar,
    }


def spec_from_json(data: dict[str, Any]) -> TaskSpec:
    """The inverse of :func:`spec_to_json`."""
    sampling = dict(data["sampling"])
    sampling["stop"] = tuple(sampling.get("stop") or ())
    return TaskSpec(
        model_id=data["model_id"],
        prompt=data["prompt"],
        sampling=Sampling(**sampling),
        priority=Priority(int(data["priority"])),
        request_id=data.get("request_id", ""),
        max_tokens_defaulted=bool(data.get("max_tokens_defaulted")),
        tenant=data.get("tenant", "default"),
        templated=bool(data.get("templated")),
        grammar=data.get("grammar", ""),
    )
