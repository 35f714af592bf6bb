"""Chaos soak: a cloud-profile fleet keeps its promises while its processes are killed.

A fleet on loopback (catalog, orchestrator and three pool managers as ``llorch serve``
processes, mTLS between them, TLS and API keys at the client port, batching slots on every
pool) serves a mixed load for ``--duration-s``: clients stream interactive and batch tasks,
chat and plain prompts, through ``Generate`` and through ``SubmitTask`` + ``StreamTask``, and
cancel some part way. One tenant's key is rate limited and the queue is small, so clients are
refused RATE_LIMITED and QUEUE_FULL, with RetryInfo. Every client retries as a client should: a
refusal or a task that failed with RetryInfo waits the delay it was told and submits again; a
broken stream (the orchestrator gone) re-attaches with ``StreamTask`` from where it stopped,
after ``GetTask`` says the task still stands, and drops the tokens it already has by their
index. Meanwhile a chaos loop:

- SIGKILLs a random worker every ``--worker-kill-s`` (jittered);
- SIGKILLs a random pool manager every ``--pool-manager-kill-s`` and restarts it;
- once, at ``--orchestrator-kill-at`` of the run, SIGKILLs the orchestrator and restarts it on
  the same ports and data dir (its journal).

Invariants, the targets (each a count in the JSON, and a boolean under ``invariants``):

- every accepted task ends, finished or with a status: none is still unfinished at its
  deadline (``--task-deadline-s`` after it was accepted);
- no accepted task is lost across the orchestrator restart: every task a client was told of
  before the kill is known after it (a ``Generate`` task admitted within the journal's commit
  window, 20 ms, before the kill may be gone: it is documented so, and counted apart);
- no stream has a duplicate or a missing token index, nor an index that came back with another
  token after a re-attach, and a finished task's tokens add up to its ``tokens_out``;
- every client that retries as told succeeds in the end (each of its jobs finished, or was
  cancelled by the client itself);
- the orchestrator's memory stays bounded: finished tasks are kept ``--finished-ttl-s``, so
  what it holds is bounded by the load, not the run's length; the restarted orchestrator's
  resident set at the end is at most ``--rss-growth-limit`` times what it was once it had
  filled that retention (``rss_settled_mb``).

Also counted: tasks that failed over before their first token, re-attaches, retries by
reason, tasks whose end the restarted orchestrator tells otherwise than the client saw it
(``changed_across_restart``: possible only within the commit window), workers still running
5 s after their pool manager was killed, and workers left once the fleet is stopped. The
services run at WARNING into ``<dir>/fleet/logs`` (``--keep DIR``, ``--log-level INFO``).

Human-readable progress goes to stderr; the last line of stdout is JSON. Exit status 1 when an
invariant is broken (the JSON is printed first).

  .venv/bin/python bench/chaos.py                           # 180 s, tiny model, 10 clients
  .venv/bin/python bench/chaos.py --duration-s 30 --worker-kill-s 3 --pool-manager-kill-s 10
  .venv/bin/python bench/chaos.py --duration-s 600 --clients 16 --seed 7   # a longer soak
  .venv/bin/python bench/chaos.py --model 170m --max-tokens 40 --keep /tmp/chaos --log-level INFO
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from llorch.catalog.v1 import catalog_pb2_grpc
from llorch.common.v1 import common_pb2
from llorch.orchestrator.v1 import control_pb2, control_pb2_grpc, orchestrator_pb2_grpc
from llorch.orchestrator.v1 import orchestrator_pb2 as pb
from relay import write_model  # bench/relay.py

from launch.harness import FleetPki, free_port, start_llorch
from mesh.apikeys import ApiKeyStore
from mesh.server import open_channel
from mesh.tls import TlsFiles, channel_credentials
from provisioners.models import register_local_file

MODELS = {"tiny": "tiny-llama", "170m": "bench-170m"}
NODES = ("node-a", "node-b", "node-c")
WORDS = "the pool queue model token stream river cloud signal worker engine quiet".split()
COMMIT_WINDOW_S = 0.1
"""A Generate task is journaled within 20 ms of its admission (orchestrator/journal.py): one
admitted this close before the orchestrator was killed may be gone after the restart, as
documented (docs/operators.md, "The task journal"). 0.1 s leaves room for scheduling."""
CLIENT_CHANNEL_OPTIONS = [
    # A client reconnects soon after the orchestrator is back, not after gRPC's default
    # backoff (1 s growing to 120 s), which would make the restart look longer than it is.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
RETENTION_MARGIN_S = 2.0
"""A client learns of a task's end a little after the orchestrator records it: a task the
client saw end this much less than ``finished_ttl_s`` ago must still be readable."""
ORPHAN_GRACE_S = 5.0
"""A worker sees its pool manager's death as EOF on its stdin and exits: within this."""
TERMINAL = {pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED}


_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f}] {message}", file=sys.stderr, flush=True)


# ----- processes ---------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; no psutil here)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class ChaosFleet:
    """Catalog, orchestrator and three pool managers as ``llorch serve`` processes, with mTLS;
    any of them can be SIGKILLed and started again as it was."""

    def __init__(self, root: Path, model_id: str, model: Path, args: argparse.Namespace) -> None:
        self.root = root
        self.model_id = model_id
        self.model = model
        self.args = args
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.envs: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.pki = FleetPki(root, NODES)
        self.files = self.pki.files
        self.keys: dict[str, str] = {}
        self.address = f"localhost:{free_port()}"
        self.node_port = f"localhost:{free_port()}"
        self.catalog = ""

    def env(self, name: str) -> dict[str, str]:
        return {
            **self.pki.env(name),
            "LLORCH_LOG_LEVEL": self.args.log_level,
            "GRPC_VERBOSITY": "ERROR",
        }

    def start(self, name: str) -> str:
        """Starts (or starts again) the process ``name`` as it was configured; its address."""
        args, env = self.envs[name]
        proc, address = start_llorch(args, env, self.logs / f"{name}.log")
        self.procs[name] = proc
        return address.replace("127.0.0.1", "localhost")

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    async def boot(self) -> None:
        self.envs["catalog"] = (
            ["serve", "catalog", "--data-dir", str(self.root / "catalog")],
            {**self.env("catalog"), "LLORCH_CATALOG_SERVICE__LISTEN": "127.0.0.1:0"},
        )
        self.catalog = await asyncio.to_thread(self.start, "catalog")
        log(f"catalog ready at {self.catalog}")
        channel = open_channel(self.catalog, tls=self.files("ops"))
        try:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            for node in NODES:
                await register_local_file(stub, self.model_id, self.model, node)
        finally:
            await channel.close()
        keys = ApiKeyStore(self.root / "orch" / "orchestrator" / "keys.db")
        self.keys["team-a"], _ = keys.create("team-a", "client")
        self.keys["team-b"], _ = keys.create("team-b", "client", rate_per_s=self.args.rate_per_s)
        self.keys["ops"], _ = keys.create("ops", "operator")
        keys.close()
        self.envs["orchestrator"] = (
            ["serve", "orchestrator", "--data-dir", str(self.root / "orch")],
            {
                **self.env("orch"),
                "LLORCH_LISTEN": self.address.replace("localhost", "127.0.0.1"),
                "LLORCH_ORCHESTRATOR_SERVICE__CATALOG": self.catalog,
                "LLORCH_ORCHESTRATOR_SERVICE__NODE_LISTEN": self.node_port.replace(
                    "localhost", "127.0.0.1"
                ),
                "LLORCH_ORCHESTRATOR_SERVICE__QUEUE_CAPACITY": str(self.args.queue_capacity),
                "LLORCH_ORCHESTRATOR_SERVICE__FINISHED_TASK_TTL_S": str(self.args.finished_ttl_s),
            },
        )
        await asyncio.to_thread(self.start, "orchestrator")
        log(f"orchestrator ready at {self.address}")
        pools = [
            {
                "pool_id": "cpu-0",
                "model_id": self.model_id,
                "n_threads": 1,
                "slots": self.args.slots,
            }
        ]
        for node in NODES:
            self.envs[node] = (
                ["serve", "poolmanager", "--data-dir", str(self.root / node)],
                {
                    **self.env(node),
                    "LLORCH_POOL_MANAGER__NODE_ID": node,
                    "LLORCH_POOL_MANAGER__CATALOG": self.catalog,
                    "LLORCH_POOL_MANAGER__ORCHESTRATOR": self.node_port,
                    "LLORCH_POOL_MANAGER__POOLS": json.dumps(pools),
                    "LLORCH_POOL_MANAGER__SPARE_WORKERS": "false",
                    "LLORCH_POOL_MANAGER__USAGE_REPORT_S": "3600",
                    # The soak kills workers far more often than any real fault would: the
                    # breaker would (rightly) take the pools out, and the restart backoff
                    # (reset only after breaker_window_s of health) would grow to 30 s.
                    "LLORCH_POOL_MANAGER__BREAKER_CRASHES": "1000",
                    "LLORCH_POOL_MANAGER__RESTART_BACKOFF_MAX_S": "2",
                },
            )
        await asyncio.gather(*(asyncio.to_thread(self.start, n) for n in NODES))

    def channel(self, key: str) -> grpc.aio.Channel:
        credentials = grpc.composite_channel_credentials(
            channel_credentials(TlsFiles(self.files("orch").ca)),
            grpc.access_token_call_credentials(self.keys[key]),
        )
        return grpc.aio.secure_channel(self.address, credentials, options=CLIENT_CHANNEL_OPTIONS)

    def workers(self, node: str) -> list[int]:
        proc = self.procs[node]
        if proc.poll() is not None:
            return []
        return [p for p in children(proc.pid) if "poolmanager.worker" in cmdline(p)]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ----- what the clients saw ----------------------------------------------------------------------


@dataclass
class TokenLog:
    """The tokens of one task as its client put them together, checked as they arrive.

    Within one attach, token messages must follow on without overlap or gap; the first message
    of a re-attach may start before the index asked for (coalesced), and the tokens it repeats
    must be the ones already held.
    """

    ids: list[int] = field(default_factory=list)
    duplicates: int = 0
    missing: int = 0
    conflicts: int = 0
    _expect: int | None = None

    def attach(self) -> None:
        self._expect = None

    def add(self, index: int, token_ids: list[int]) -> None:
        if self._expect is not None:
            if index < self._expect:
                self.duplicates += 1
            elif index > self._expect:
                self.missing += 1
        elif index > len(self.ids):
            self.missing += 1
        self._expect = index + len(token_ids)
        for i, token in enumerate(token_ids):
            at = index + i
            if at < len(self.ids):
                self.conflicts += self.ids[at] != token
            elif at == len(self.ids):
                self.ids.append(token)
            # past a gap: counted as missing above; nothing to append to

    def finish(self, tokens_out: int) -> None:
        """The task finished with ``tokens_out`` tokens: all of them must be here."""
        if tokens_out > len(self.ids):
            self.missing += 1
        elif tokens_out < len(self.ids):
            self.duplicates += 1

    @property
    def broken(self) -> bool:
        return bool(self.duplicates or self.missing or self.conflicts)


@dataclass
class TaskRecord:
    """One accepted task."""

    task_id: str
    via: str
    """``generate`` or ``submit``."""
    accepted_at: float
    deadline: float
    ended: str = ""
    """Once its end is known: SUCCEEDED, CANCELLED or the failing status code's name."""
    ended_at: float | None = None
    lost: bool = False
    lost_in_commit_window: bool = False
    starts: set[str] = field(default_factory=set)
    """The pools it was seen starting on (more than one: it failed over)."""
    tokens: TokenLog = field(default_factory=TokenLog)


@dataclass
class Ledger:
    """Everything the clients and the chaos loop saw."""

    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    refusals: Counter[str] = field(default_factory=Counter)
    """Submissions refused, by reason (no task was accepted)."""
    retries: Counter[str] = field(default_factory=Counter)
    """Waits before trying again, by what was retried."""
    reattaches: int = 0
    jobs_ok: int = 0
    jobs_cancelled: int = 0
    jobs_failed: Counter[str] = field(default_factory=Counter)
    client_failures: Counter[int] = field(default_factory=Counter)
    kills: Counter[str] = field(default_factory=Counter)
    orchestrator_down: tuple[float, float] | None = None
    """(killed at, ready again at), monotonic."""
    checked_after_restart: int = 0
    """Tasks the restarted orchestrator was asked for (all it must still hold)."""
    changed_across_restart: Counter[str] = field(default_factory=Counter)
    """Tasks a client had seen end one way that the restarted orchestrator tells another way."""
    orphaned_workers: int = 0
    """Workers still running ORPHAN_GRACE_S after their pool manager was killed."""
    bereaved: list[tuple[float, list[int]]] = field(default_factory=list)
    """(when, pids): the workers of a pool manager killed then, not yet looked at again."""
    worker_pids: set[int] = field(default_factory=set)
    """Every worker process seen."""
    rss: list[tuple[float, int, float]] = field(default_factory=list)
    """(time, orchestrator pid, MB)."""

    def accept(self, task_id: str, via: str, deadline_s: float) -> TaskRecord:
        now = time.monotonic()
        record = self.tasks.get(task_id)
        if record is None:
            record = self.tasks[task_id] = TaskRecord(task_id, via, now, now + deadline_s)
        return record

    def end(self, record: TaskRecord, how: str) -> None:
        if not record.ended:
            record.ended, record.ended_at = how, time.monotonic()

    def count_orphans(self, before: float) -> None:
        """Counts the workers of pool managers killed before ``before`` that still run."""
        due = [pids for at, pids in self.bereaved if at < before]
        self.bereaved = [(at, pids) for at, pids in self.bereaved if at >= before]
        for pids in due:
            left = [pid for pid in pids if alive(pid)]
            self.orphaned_workers += len(left)
            if left:
                log(f"chaos: workers {left} outlived their pool manager")

    def unknown(self, record: TaskRecord, who: str) -> None:
        """The orchestrator answered NOT_FOUND for an accepted task: lost, or (a Generate task
        admitted just before the orchestrator was killed) gone within the commit window."""
        down = self.orchestrator_down
        if (
            record.via == "generate"
            and down is not None
            and down[0] - COMMIT_WINDOW_S <= record.accepted_at <= down[0]
        ):
            record.lost_in_commit_window = True
        else:
            record.lost = True
        self.end(record, "LOST")
        log(f"{who}: task {record.task_id} ({record.via}) is unknown to the orchestrator")


# ----- clients -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """What an error told its client."""

    code: grpc.StatusCode
    reason: str
    retry_delay_s: float | None
    """RetryInfo's delay, when the error carried one: retry after it."""

    @property
    def transport(self) -> bool:
        """No google.rpc details at all: the connection failed (the orchestrator is gone)."""
        return not self.reason


def refusal(err: grpc.aio.AioRpcError) -> Refusal:
    reason, delay = "", None
    status = rpc_status.from_call(err)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToMilliseconds() / 1000
    return Refusal(err.code(), reason, delay)


def retry_after(r: Refusal, backoff_s: float) -> float | None:
    """Seconds to wait before trying again, or None when the error says not to.

    RetryInfo says when; an error without any details (the connection failed: the orchestrator
    is down) is retried with the client's own backoff.
    """
    if r.retry_delay_s is not None:
        return r.retry_delay_s
    if r.code == grpc.StatusCode.UNAVAILABLE and r.transport:
        return backoff_s
    return None


@dataclass(frozen=True)
class Job:
    """One request a client wants answered; every task submitted for it asks the same."""

    via: str
    """``generate`` (one call) or ``submit`` (SubmitTask, then StreamTask)."""
    priority: int
    text: str
    chat: bool
    """Send ``text`` as a user message after a system one, rather than as the prompt."""
    max_tokens: int
    temperature: float
    cancel_after: int | None
    """Cancel the task once this many tokens arrived (None: let it finish)."""

    def fields(self, model_id: str) -> dict[str, Any]:
        """The request's fields, as GenerateRequest and SubmitTaskRequest both name them."""
        out: dict[str, Any] = {
            "model_id": model_id,
            "sampling": common_pb2.SamplingParams(
                max_tokens=self.max_tokens, temperature=self.temperature, ignore_eos=True
            ),
            "priority": self.priority,
        }
        if self.chat:
            out["messages"] = [
                pb.ChatMessage(role=pb.ROLE_SYSTEM, content="You answer briefly."),
                pb.ChatMessage(role=pb.ROLE_USER, content=self.text),
            ]
        else:
            out["prompt"] = self.text
        return out


class JobFailed(Exception):
    """A job ended without its answer; the message says why."""


class Client:
    """One client: runs jobs one after another until told to stop."""

    def __init__(
        self,
        number: int,
        stub: orchestrator_pb2_grpc.OrchestratorServiceStub,
        ledger: Ledger,
        model_id: str,
        args: argparse.Namespace,
    ) -> None:
        self.number = number
        self.stub = stub
        self.ledger = ledger
        self.model_id = model_id
        self.args = args
        self.rng = random.Random(args.seed * 1000 + number)
        self.jobs = 0

    def job(self) -> Job:
        rng = self.rng
        return Job(
            via="generate" if rng.random() < 0.5 else "submit",
            priority=common_pb2.PRIORITY_BATCH
            if rng.random() < 0.3
            else common_pb2.PRIORITY_INTERACTIVE,
            text=" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24))),
            chat=rng.random() < 0.5,
            max_tokens=rng.randint(16, self.args.max_tokens),
            temperature=rng.choice([0.0, 0.8]),
            cancel_after=rng.randint(1, 8) if rng.random() < self.args.cancel_share else None,
        )

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            job = self.job()
            self.jobs += 1
            try:
                async with asyncio.timeout(self.args.job_budget_s):
                    cancelled = await self.run_job(job)
            except (JobFailed, TimeoutError) as exc:
                why = str(exc) or "job budget spent"
                self.ledger.jobs_failed[why] += 1
                self.ledger.client_failures[self.number] += 1
                log(f"client {self.number}: job failed: {why}")
                continue
            if cancelled:
                self.ledger.jobs_cancelled += 1
            else:
                self.ledger.jobs_ok += 1

    async def run_job(self, job: Job) -> bool:
        """Until the job's answer is complete; True when it ended as the client cancelled it."""
        request_key = f"c{self.number}-j{self.jobs}"
        attempt = 0
        while True:
            attempt += 1
            fields = job.fields(self.model_id)
            outcome = await self.attempt(job, fields, f"{request_key}-a{attempt}")
            if outcome is not None:
                return outcome

    async def attempt(self, job: Job, fields: dict[str, Any], request_id: str) -> bool | None:
        """One task for the job: True/False as ``run_job``, None to submit a new task."""
        backoff = Backoff()
        while True:  # until a task is accepted
            try:
                if job.via == "submit":
                    answer = await self.stub.SubmitTask(
                        pb.SubmitTaskRequest(request_id=request_id, **fields), timeout=10
                    )
                    record = self.ledger.accept(answer.task_id, "submit", self.args.task_deadline_s)
                    return await self.follow(job, record, None)
                call = self.stub.Generate(
                    pb.GenerateRequest(**fields), timeout=self.args.task_deadline_s
                )
                first = await call.read()
                if first is grpc.aio.EOF:
                    raise JobFailed("Generate ended without an event")
                record = self.ledger.accept(
                    first.event.task_id, "generate", self.args.task_deadline_s
                )
                return await self.follow(job, record, (call, first))
            except grpc.aio.AioRpcError as err:
                r = refusal(err)
                delay = retry_after(r, backoff.next())
                if delay is None:
                    raise JobFailed(f"submit refused: {r.code.name} {r.reason}") from None
                self.ledger.refusals[r.reason or r.code.name] += 1
                self.ledger.retries["submit"] += 1
                await asyncio.sleep(delay)

    async def follow(
        self,
        job: Job,
        record: TaskRecord,
        generate: tuple[grpc.aio.UnaryStreamCall, pb.GenerateResponse] | None,
    ) -> bool | None:
        """Reads the task to its end, re-attaching whenever the stream breaks."""
        backoff = Backoff()
        cancel_sent = False
        while True:
            record.tokens.attach()
            live_generate = generate is not None  # cancelling this call cancels the task
            try:
                if generate is not None:
                    call, first = generate
                    generate = None
                    events = _chain(first, call)
                else:
                    from_index = max(0, len(record.tokens.ids) - 2)  # overlap: checked
                    call = self.stub.StreamTask(
                        pb.StreamTaskRequest(task_id=record.task_id, from_index=from_index),
                        timeout=max(1.0, record.deadline - time.monotonic()),
                    )
                    events = _chain(None, call)
                async for response in events:
                    event = response.event
                    kind = event.WhichOneof("kind")
                    if kind == "started":
                        record.starts.add(f"{event.started.node_id}/{event.started.pool_id}")
                    elif kind == "token":
                        record.tokens.add(event.token.index, list(event.token.token_ids))
                        if (
                            job.cancel_after is not None
                            and not cancel_sent
                            and len(record.tokens.ids) >= job.cancel_after
                        ):
                            cancel_sent = True
                            if live_generate:
                                call.cancel()  # the task goes with its call
                                return await self.settle_cancel(record)
                            await self.cancel(record)
                    elif kind == "finished":
                        record.tokens.finish(event.finished.tokens_out)
                        self.ledger.end(record, "SUCCEEDED")
                        return job.cancel_after is not None and cancel_sent
                # A stream ends after Finished or with a status: ending without either is a
                # broken promise of its own.
                raise JobFailed("a stream ended without Finished or a status")
            except grpc.aio.AioRpcError as err:
                r = refusal(err)
            # Where does the task stand? (A status may be the task's end or the connection's.)
            task = await self.get_task(record)
            if task is None:
                return None  # lost (counted): submit it again
            if task.state in (pb.TASK_STATE_QUEUED, pb.TASK_STATE_RUNNING) or (
                task.state == pb.TASK_STATE_SUCCEEDED
            ):
                self.ledger.reattaches += 1
                await asyncio.sleep(backoff.next())
                continue
            if task.state == pb.TASK_STATE_CANCELLED:
                self.ledger.end(record, "CANCELLED")
                if cancel_sent:
                    return True
                raise JobFailed(f"task cancelled by someone else: {task.error.reason}")
            self.ledger.end(record, task.error.code or "FAILED")
            delay = r.retry_delay_s if r.reason == task.error.reason else None
            if not task.error.retriable:
                raise JobFailed(f"task failed: {task.error.code} {task.error.reason}")
            self.ledger.retries[task.error.reason] += 1
            await asyncio.sleep(delay if delay is not None else 1.0)
            return None

    async def cancel(self, record: TaskRecord) -> None:
        backoff = Backoff()
        while True:
            try:
                await self.stub.CancelTask(pb.CancelTaskRequest(task_id=record.task_id), timeout=5)
                return
            except grpc.aio.AioRpcError as err:
                r = refusal(err)
                if r.code == grpc.StatusCode.NOT_FOUND:
                    return  # get_task will say it is lost
                delay = retry_after(r, backoff.next())
                if delay is None:
                    raise JobFailed(f"CancelTask refused: {r.code.name} {r.reason}") from None
                await asyncio.sleep(delay)

    async def settle_cancel(self, record: TaskRecord) -> bool | None:
        """After cancelling a Generate call: its task must end (cancelled, or it had finished)."""
        while True:
            task = await self.get_task(record)
            if task is None:
                return None
            if task.state in TERMINAL:
                name = pb.TaskState.Name(task.state).removeprefix("TASK_STATE_")
                failed = task.state == pb.TASK_STATE_FAILED
                self.ledger.end(record, task.error.code or name if failed else name)
                if task.state == pb.TASK_STATE_FAILED and task.error.retriable:
                    return None  # failed before the cancel landed: the job asks again
                if task.state == pb.TASK_STATE_FAILED:
                    raise JobFailed(f"task failed: {task.error.code} {task.error.reason}")
                return True
            await asyncio.sleep(0.1)

    async def get_task(self, record: TaskRecord) -> pb.Task | None:
        """The task's state; None when the orchestrator does not know it (then it is lost)."""
        backoff = Backoff()
        while True:
            try:
                answer = await self.stub.GetTask(
                    pb.GetTaskRequest(task_id=record.task_id), timeout=5
                )
                return answer.task
            except grpc.aio.AioRpcError as err:
                r = refusal(err)
                if r.code == grpc.StatusCode.NOT_FOUND:
                    self.ledger.unknown(record, f"client {self.number}")
                    return None
                delay = retry_after(r, backoff.next())
                if delay is None:
                    raise JobFailed(f"GetTask refused: {r.code.name} {r.reason}") from None
                self.ledger.retries["get_task"] += 1
                await asyncio.sleep(delay)


async def _chain(first: Any, call: Any) -> Any:
    """``first`` (already read from ``call``, or None), then the rest of ``call``'s messages.
    ``read()`` throughout: gRPC refuses a call read both ways."""
    if first is not None:
        yield first
    while (response := await call.read()) is not grpc.aio.EOF:
        yield response


class Backoff:
    """The client's own backoff, for failures that carry no RetryInfo (a dead connection)."""

    def __init__(self) -> None:
        self.delay_s = 0.1

    def next(self) -> float:
        delay, self.delay_s = self.delay_s, min(self.delay_s * 2, 1.0)
        return delay * random.uniform(0.5, 1.0)


# ----- chaos -------------------------------------------------------------------------------------


async def chaos(
    fleet: ChaosFleet, ledger: Ledger, stub: Any, args: argparse.Namespace, stop: asyncio.Event
) -> None:
    rng = random.Random(args.seed)
    start = time.monotonic()

    def jitter(mean_s: float) -> float:
        return mean_s * rng.uniform(0.5, 1.5)

    next_worker = start + jitter(args.worker_kill_s)
    next_pm = start + jitter(args.pool_manager_kill_s)
    orchestrator_at = start + args.orchestrator_kill_at * args.duration_s
    while not stop.is_set():
        for node in NODES:
            ledger.worker_pids.update(fleet.workers(node))
        now = time.monotonic()
        ledger.count_orphans(now - ORPHAN_GRACE_S)
        if orchestrator_at and now >= orchestrator_at:
            orchestrator_at = 0.0
            await restart_orchestrator(fleet, ledger, stub)
        elif now >= next_pm:
            next_pm = now + jitter(args.pool_manager_kill_s)
            await restart_pool_manager(fleet, ledger, rng.choice(NODES), args.restart_delay_s)
        elif now >= next_worker:
            next_worker = now + jitter(args.worker_kill_s)
            node = rng.choice(NODES)
            pids = fleet.workers(node)
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
                ledger.kills["worker"] += 1
                log(f"chaos: SIGKILL a worker of {node}")
            else:
                ledger.kills["worker_missed"] += 1
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass


async def restart_pool_manager(
    fleet: ChaosFleet, ledger: Ledger, node: str, delay_s: float
) -> None:
    workers = fleet.workers(node)
    fleet.kill(node)
    ledger.kills["pool_manager"] += 1
    log(f"chaos: SIGKILL pool manager {node} (workers {workers})")
    await asyncio.sleep(delay_s)
    await asyncio.to_thread(fleet.start, node)
    log(f"chaos: pool manager {node} started again")
    ledger.bereaved.append((time.monotonic(), workers))


async def restart_orchestrator(fleet: ChaosFleet, ledger: Ledger, stub: Any) -> None:
    killed_at = time.monotonic()
    ledger.orchestrator_down = (killed_at, killed_at)
    # What the clients knew before the kill: every task they were told of, and how the ended
    # ones ended.
    before = {t.task_id: t.ended for t in ledger.tasks.values()}
    fleet.kill("orchestrator")
    ledger.kills["orchestrator"] += 1
    log(f"chaos: SIGKILL the orchestrator ({len(before)} tasks known)")
    await asyncio.sleep(fleet.args.restart_delay_s)
    await asyncio.to_thread(fleet.start, "orchestrator")
    ledger.orchestrator_down = (killed_at, time.monotonic())
    log(f"chaos: orchestrator ready again after {time.monotonic() - killed_at:.1f} s")
    retention_s = fleet.args.finished_ttl_s - RETENTION_MARGIN_S
    for task_id, seen in before.items():
        record = ledger.tasks[task_id]
        if seen == "LOST" or (
            record.ended_at is not None and time.monotonic() - record.ended_at > retention_s
        ):
            continue  # its retention may be over: the orchestrator may have forgotten it
        ledger.checked_after_restart += 1
        answer = await get_task(stub, task_id)
        if answer is None:
            ledger.unknown(record, "chaos")
            continue
        state = pb.TaskState.Name(answer.task.state).removeprefix("TASK_STATE_")
        if seen in ("SUCCEEDED", "CANCELLED") and state != seen:
            ledger.changed_across_restart[f"{seen}->{state}"] += 1


async def get_task(stub: Any, task_id: str) -> pb.GetTaskResponse | None:
    """GetTask, through a dead connection (the operator's key: every tenant's task); None
    when the orchestrator does not know the task."""
    backoff = Backoff()
    while True:
        try:
            answer: pb.GetTaskResponse = await stub.GetTask(
                pb.GetTaskRequest(task_id=task_id), timeout=5
            )
            return answer
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            delay = retry_after(refusal(err), backoff.next())
            if delay is None:
                raise
            await asyncio.sleep(delay)


async def sample_rss(fleet: ChaosFleet, ledger: Ledger, stop: asyncio.Event) -> None:
    while not stop.is_set():
        proc = fleet.procs["orchestrator"]
        mb = rss_mb(proc.pid) if proc.poll() is None else None
        if mb is not None:
            ledger.rss.append((time.monotonic(), proc.pid, mb))
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def progress(ledger: Ledger, started: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 5.0)
        except TimeoutError:
            pass
        ends = Counter(t.ended or "open" for t in ledger.tasks.values())
        rss = ledger.rss[-1][2] if ledger.rss else 0.0
        log(
            f"{time.monotonic() - started:5.0f} s: {len(ledger.tasks)} tasks {dict(ends)}, "
            f"jobs ok {ledger.jobs_ok} cancelled {ledger.jobs_cancelled} failed "
            f"{sum(ledger.jobs_failed.values())}, kills {dict(ledger.kills)}, "
            f"orchestrator {rss:.0f} MB"
        )


# ----- the run -----------------------------------------------------------------------------------


async def wait_for_nodes(fleet: ChaosFleet, timeout_s: float) -> None:
    async with fleet.channel("ops") as channel:
        control = control_pb2_grpc.ControlServiceStub(channel)
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    listed = await control.ListNodes(control_pb2.ListNodesRequest(), timeout=5)
                    if {n.node_id for n in listed.nodes if n.reachable} >= set(NODES):
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)


async def settle(ledger: Ledger, stub: Any) -> None:
    """Tasks whose end no client saw (a client gave up on its job): asks the orchestrator
    until each has ended or its deadline passed."""
    for record in ledger.tasks.values():
        while not record.ended:
            answer = await get_task(stub, record.task_id)
            if answer is None:
                ledger.unknown(record, "settle")
                break
            if answer.task.state in TERMINAL:
                task = answer.task
                how = pb.TaskState.Name(task.state).removeprefix("TASK_STATE_")
                ledger.end(record, task.error.code if how == "FAILED" else how)
                break
            if time.monotonic() > record.deadline:
                break  # hung
            await asyncio.sleep(0.2)


async def soak(fleet: ChaosFleet, ledger: Ledger, args: argparse.Namespace) -> float:
    """The load and the chaos for ``args.duration_s``; returns the seconds the clients took
    to finish their last jobs after that."""
    channels = {key: fleet.channel(key) for key in ("team-a", "team-b", "ops")}
    stubs = {k: orchestrator_pb2_grpc.OrchestratorServiceStub(c) for k, c in channels.items()}
    stop_load, stop_chaos = asyncio.Event(), asyncio.Event()
    started = time.monotonic()
    clients = [
        Client(n, stubs["team-b" if n % 4 == 3 else "team-a"], ledger, fleet.model_id, args)
        for n in range(args.clients)
    ]
    try:
        async with asyncio.TaskGroup() as group:
            for client in clients:
                group.create_task(client.run(stop_load))
            group.create_task(chaos(fleet, ledger, stubs["ops"], args, stop_chaos))
            group.create_task(sample_rss(fleet, ledger, stop_chaos))
            group.create_task(progress(ledger, started, stop_chaos))
            await asyncio.sleep(args.duration_s)
            stop_load.set()  # clients finish the job they are on
            log("load stops; clients finish their jobs")
            stop_chaos.set()
        drained = time.monotonic() - started - args.duration_s
        await settle(ledger, stubs["ops"])
    finally:
        for channel in channels.values():
            await channel.close()
    return drained


def rss_figures(ledger: Ledger, args: argparse.Namespace) -> dict[str, Any]:
    """The orchestrator's resident set: the first process, and the restarted one."""
    pids = list(dict.fromkeys(pid for _, pid, _ in ledger.rss))
    out: dict[str, Any] = {}
    for n, pid in enumerate(pids):
        samples = [(t, mb) for t, p, mb in ledger.rss if p == pid]
        out[f"rss_{n}"] = {
            "start_mb": round(samples[0][1], 1),
            "max_mb": round(max(mb for _, mb in samples), 1),
            "end_mb": round(samples[-1][1], 1),
        }
    last = [(t, mb) for t, p, mb in ledger.rss if pids and p == pids[-1]]
    # Settled: the first sample once the finished-task retention has filled (with some margin),
    # else the middle of the process's life (a short run).
    settle_at = last[0][0] + args.finished_ttl_s + 5 if last else 0.0
    settled = [mb for t, mb in last if t >= settle_at] or [mb for _, mb in last[len(last) // 2 :]]
    out["rss_settled_mb"] = round(settled[0], 1) if settled else 0.0
    out["rss_start_mb"] = out.get("rss_0", {}).get("start_mb", 0.0)
    out["rss_max_mb"] = round(max((mb for *_, mb in ledger.rss), default=0.0), 1)
    out["rss_end_mb"] = round(last[-1][1], 1) if last else 0.0
    return out


def figures(ledger: Ledger, args: argparse.Namespace, drained_s: float) -> dict[str, Any]:
    tasks = list(ledger.tasks.values())
    now = time.monotonic()
    hung = [t for t in tasks if not t.ended and now > t.deadline]
    unsettled = [t for t in tasks if not t.ended and now <= t.deadline]
    failed = Counter(
        t.ended for t in tasks if t.ended not in ("", "SUCCEEDED", "CANCELLED", "LOST")
    )
    broken = [t for t in tasks if t.tokens.broken]
    rss = rss_figures(ledger, args)
    down = ledger.orchestrator_down
    out: dict[str, Any] = {
        "model": MODELS[args.model],
        "duration_s": args.duration_s,
        "clients": args.clients,
        "slots": args.slots,
        "tasks_accepted": len(tasks),
        "tasks_by_way": dict(Counter(t.via for t in tasks)),
        "tasks_finished": sum(t.ended == "SUCCEEDED" for t in tasks),
        "tasks_cancelled": sum(t.ended == "CANCELLED" for t in tasks),
        "tasks_failed": dict(sorted(failed.items())),
        "tasks_hung": len(hung) + len(unsettled),
        "tasks_failed_over": sum(len(t.starts) > 1 for t in tasks),
        "tasks_checked_after_restart": ledger.checked_after_restart,
        "tasks_lost": sum(t.lost for t in tasks),
        "tasks_lost_in_commit_window": sum(t.lost_in_commit_window for t in tasks),
        "changed_across_restart": dict(ledger.changed_across_restart),
        "streams_duplicate_index": sum(t.tokens.duplicates > 0 for t in tasks),
        "streams_missing_index": sum(t.tokens.missing > 0 for t in tasks),
        "streams_conflicting_token": sum(t.tokens.conflicts > 0 for t in tasks),
        "tokens_received": sum(len(t.tokens.ids) for t in tasks),
        "refusals": dict(ledger.refusals),
        "retries": dict(ledger.retries),
        "reattaches": ledger.reattaches,
        "jobs_ok": ledger.jobs_ok,
        "jobs_cancelled": ledger.jobs_cancelled,
        "jobs_failed": dict(ledger.jobs_failed),
        "clients_succeeded": args.clients - len(ledger.client_failures),
        "clients_failed": len(ledger.client_failures),
        "kills": {
            "worker": ledger.kills["worker"],
            "pool_manager": ledger.kills["pool_manager"],
            "orchestrator": ledger.kills["orchestrator"],
        },
        "worker_kills_missed": ledger.kills["worker_missed"],
        "orphaned_workers": ledger.orphaned_workers,
        "orchestrator_down_s": round(down[1] - down[0], 2) if down else 0.0,
        "drain_s": round(drained_s, 1),
        **rss,
    }
    out["invariants"] = {
        "every_task_ended": not hung and not unsettled,
        "no_task_lost": out["tasks_lost"] == 0,
        "streams_intact": not broken,
        "clients_succeeded": not ledger.client_failures,
        "memory_bounded": rss["rss_end_mb"] <= args.rss_growth_limit * rss["rss_settled_mb"],
    }
    for t in broken[:5]:
        log(f"broken stream {t.task_id}: {t.tokens}")
    for t in hung[:5]:
        log(f"hung task {t.task_id} ({t.via})")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=180.0, help="how long the load runs")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slots", type=int, default=2, help="slots per pool")
    parser.add_argument("--max-tokens", type=int, default=200, help="longest answer asked for")
    parser.add_argument("--cancel-share", type=float, default=0.1, help="jobs cancelled midway")
    parser.add_argument(
        "--rate-per-s", type=float, default=2.0, help="team-b's key: tasks/s (every 4th client)"
    )
    parser.add_argument(
        "--queue-capacity",
        type=int,
        default=4,
        help="small, so that clients are refused QUEUE_FULL (with RetryInfo) now and then",
    )
    parser.add_argument("--worker-kill-s", type=float, default=4.0, help="mean between kills")
    parser.add_argument(
        "--pool-manager-kill-s", type=float, default=30.0, help="mean between kills"
    )
    parser.add_argument(
        "--orchestrator-kill-at", type=float, default=0.4, help="share of the run; 0: never"
    )
    parser.add_argument("--restart-delay-s", type=float, default=1.0, help="down time per kill")
    parser.add_argument("--task-deadline-s", type=float, default=60.0)
    parser.add_argument("--job-budget-s", type=float, default=120.0)
    parser.add_argument(
        "--finished-ttl-s", type=float, default=30.0, help="the orchestrator keeps ended tasks"
    )
    parser.add_argument(
        "--rss-growth-limit", type=float, default=1.5, help="end RSS / settled RSS at most"
    )
    parser.add_argument("--keep", type=Path, help="run here and keep the logs")
    parser.add_argument("--log-level", default="WARNING", help="the services' (into their logs)")
    args = parser.parse_args()
    model_id = MODELS[args.model]
    with tempfile.TemporaryDirectory(prefix="llorch-chaos-") as tmp_name:
        root = args.keep or Path(tmp_name)
        path = write_model(Path(tmp_name) / f"{model_id}.gguf", args.model)
        fleet = ChaosFleet(root / "fleet", model_id, path, args)
        ledger = Ledger()
        try:
            booted = time.monotonic()
            asyncio.run(fleet.boot())
            asyncio.run(wait_for_nodes(fleet, 60))
            log(f"fleet ready in {time.monotonic() - booted:.1f} s; soak for {args.duration_s} s")
            drained = asyncio.run(soak(fleet, ledger, args))
        finally:
            fleet.stop()
        ledger.count_orphans(time.monotonic())
        out = figures(ledger, args, drained)
        # Every service is stopped: none of the workers seen may run on.
        out["workers_left"] = sum(alive(pid) for pid in ledger.worker_pids)
    print(json.dumps(out), flush=True)
    return 0 if all(out["invariants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
