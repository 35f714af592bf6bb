"""orchestrator.journal against a real SQLite file: what is written is what a restart reads."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from orchestrator.journal import Journal, TaskRow, spec_from_json, spec_to_json
from orchestrator.tasks import Priority, Sampling, TaskSpec

SPEC = TaskSpec(
    model_id="tiny-llama",
    prompt="Hello",
    sampling=Sampling(
        max_tokens=8, temperature=0.5, top_p=0.9, top_k=40, seed=7, stop=("\n",), ignore_eos=True
    ),
    priority=Priority.BATCH,
    request_id="req-1",
    max_tokens_defaulted=True,
    tenant="acme",
)


def row(task_id: str) -> TaskRow:
    return TaskRow(
        task_id=task_id,
        seq=0,
        spec=spec_to_json(SPEC),
        correlation_id="corr",
        created_unix_s=1000.0,
        deadline_unix_s=None,
        state="queued",
        pool_id="",
        node_id="",
        outcome=None,
        ended_unix_s=None,
        tokens=[],
    )


def test_spec_round_trips() -> None:
    assert spec_from_json(spec_to_json(SPEC)) == SPEC
    # A rendered chat prompt and its grammar come back as they were: recovery never renders
    # again (the catalog's template may have changed since).
    chat = replace(
        SPEC, prompt="<|im_start|>user\nhi<|im_end|>\n", templated=True, grammar='root ::= "x"'
    )
    assert spec_from_json(spec_to_json(chat)) == chat
    # A spec journaled before those fields existed reads as a plain prompt.
    old = spec_to_json(SPEC)
    del old["templated"], old["grammar"]
    assert spec_from_json(old) == SPEC


async def test_a_task_is_committed_before_its_future_resolves(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db")
    await journal.record_task(row("t1"))
    # Another connection sees the row at once: it is committed, not buffered.
    other = Journal(tmp_path / "j.db")
    assert [r.task_id for r in other.load()] == ["t1"]
    other.close()
    journal.close()


async def test_everything_written_is_read_back_in_order(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db")
    for name in ("a", "b", "c"):
        journal.record_task(row(name))
    journal.record_start("a", "cpu-0", "node-1")
    journal.record_tokens("a", 0, (1, 2), "He")
    journal.record_tokens("a", 2, (3,), "y")
    journal.record_end("a", "succeeded", {"finished": {"reason": "stop"}}, 2000.0)
    journal.record_start("b", "cpu-0", "node-1")
    journal.record_requeue("b")
    journal.forget(["c"])
    await asyncio.to_thread(journal.close)

    rows = {r.task_id: r for r in Journal(tmp_path / "j.db").load()}
    assert list(rows) == ["a", "b"]
    a = rows["a"]
    assert (a.state, a.pool_id, a.node_id) == ("succeeded", "cpu-0", "node-1")
    assert a.tokens == [(0, [1, 2], "He"), (2, [3], "y")]
    assert a.outcome == {"finished": {"reason": "stop"}}
    assert a.ended_unix_s == 2000.0
    assert spec_from_json(a.spec) == SPEC
    assert (rows["b"].state, rows["b"].pool_id) == ("queued", "")


async def test_many_records_share_few_commits(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db")
    await journal.record_task(row("t"))
    before = journal.commits
    for i in range(2000):
        journal.record_tokens("t", i, (i,), "x")
    await asyncio.to_thread(journal.close)
    assert journal.commits - before < 2000  # group commit: batches, not one per token
    assert len(Journal(tmp_path / "j.db").load()[0].tokens) == 2000


async def test_sequence_continues_after_a_restart(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db")
    await journal.record_task(row("first"))
    journal.close()
    journal = Journal(tmp_path / "j.db")
    await journal.record_task(row("second"))
    assert [r.task_id for r in journal.load()] == ["first", "second"]
    journal.close()
