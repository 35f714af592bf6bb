"""The chaos soak runs end to end, short: a cloud-profile fleet on loopback whose workers, pool
managers and orchestrator are SIGKILLed under a mixed load keeps every invariant (no task hung
or lost, every stream's token indexes intact, every retrying client served, the orchestrator's
memory bounded), and the chaos really happened."""

from __future__ import annotations

import pytest

from tests.bench.runner import run_bench


@pytest.mark.timeout(200)
def test_chaos_soak_keeps_its_invariants_while_processes_are_killed() -> None:
    figures = run_bench(
        "chaos.py",
        *("--duration-s", "24", "--clients", "8", "--max-tokens", "120"),
        *("--worker-kill-s", "3", "--pool-manager-kill-s", "10", "--orchestrator-kill-at", "0.4"),
        *("--task-deadline-s", "30", "--job-budget-s", "45", "--finished-ttl-s", "10"),
        timeout_s=180,
    )
    assert figures["invariants"] == {
        "every_task_ended": True,
        "no_task_lost": True,
        "streams_intact": True,
        "clients_succeeded": True,
        "memory_bounded": True,
    }, figures
    kills = figures["kills"]
    assert kills["worker"] >= 1 and kills["pool_manager"] >= 1 and kills["orchestrator"] == 1
    assert figures["tasks_accepted"] > 0 and figures["tasks_finished"] > 0
    assert figures["tasks_hung"] == figures["tasks_lost"] == 0
    assert figures["streams_duplicate_index"] == figures["streams_missing_index"] == 0
    assert figures["clients_failed"] == 0
    assert figures["orphaned_workers"] == figures["workers_left"] == 0
    # The load really was mixed: refusals with RetryInfo (team-b's rate limit) were retried,
    # and some jobs were cancelled part way.
    assert figures["refusals"].get("RATE_LIMITED", 0) > 0 and figures["jobs_cancelled"] > 0
