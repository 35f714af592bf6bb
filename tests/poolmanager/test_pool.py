"""The pool record's crash breaker and the restart backoff (pure: no worker, no clock)."""

from __future__ import annotations

import pytest

from mesh.settings import PoolSettings
from poolmanager.pool import Backoff, BreakerPolicy, Pool

pytestmark = pytest.mark.timeout(10)


def pool() -> Pool:
    return Pool(PoolSettings(pool_id="p0", model_id="tiny-llama"))


def test_the_breaker_opens_at_the_nth_crash_within_the_window() -> None:
    p, policy = pool(), BreakerPolicy(crashes=3, window_s=60)
    assert not p.count_crash("a", policy, now=0)
    assert not p.count_crash("b", policy, now=10)
    assert p.last_error == "b"
    assert p.count_crash("c", policy, now=20)
    assert p.breaker_open and p.restarts == 3
    assert p.last_error.startswith("circuit breaker open: 3 crashes within 60s; last: c")


def test_crashes_older_than_the_window_are_forgotten() -> None:
    p, policy = pool(), BreakerPolicy(crashes=2, window_s=60)
    assert not p.count_crash("a", policy, now=0)
    assert not p.count_crash("b", policy, now=61)  # the first fell out of the window
    assert not p.breaker_open and p.restarts == 2


def test_reset_closes_the_breaker_and_forgets_the_crashes() -> None:
    p, policy = pool(), BreakerPolicy(crashes=1, window_s=60)
    assert p.count_crash("a", policy, now=0)
    p.reset_breaker()
    assert not p.breaker_open and not p.crash_times
    assert p.restarts == 1  # a count since start, not reset


def test_backoff_doubles_with_jitter_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(initial_s=1.0, max_s=4.0)
    delays = [backoff.next_delay_s() for _ in range(5)]
    for delay, step in zip(delays, [1.0, 2.0, 4.0, 4.0, 4.0], strict=True):
        assert step * 0.5 <= delay <= step
    backoff.reset()
    assert 0.5 <= backoff.next_delay_s() <= 1.0
