"""Placement benchmark: how long ``orchestrator.placement.decide`` takes at 8, 64 and 256 pools.

Each size gets a fleet of GPU pools over 4 models (a quarter of the pools hold the task's model,
some busy, some loading, some draining, a few failed or unreachable, every pool able to load
another model), and three kinds of task: one that finds a warm pool, one whose warm pools are
all busy (a wait), and one for a model no pool holds (a swap). Prints the median and p99 time of
one decide() call per size beside the targets (our 1 ms at 256 pools, and the seed's 100 ms) as
ratios, then one line of JSON.

  .venv/bin/python bench/placement.py
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace

from orchestrator.placement import Outcome, PlacementInput, PoolView, decide
from orchestrator.tasks import Priority

TARGET_MS = 1.0  # at 256 pools
SEED_TARGET_MS = 100.0
GIB = 1 << 30
MODELS = ["llama-8b", "qwen-14b", "mistral-7b", "phi-3"]


def fleet(n: int, rng: random.Random) -> tuple[PoolView, ...]:
    pools = []
    for i in range(n):
        total = rng.choice([24, 48, 80]) * GIB
        slots = rng.choice([1, 2, 4])
        pools.append(
            PoolView(
                node_id=f"node-{i // 8:03d}",
                pool_id=f"gpu-{i % 8}",
                model_id=MODELS[i % len(MODELS)],
                ready=rng.random() > 0.05,
                reachable=rng.random() > 0.02,
                slots_total=slots,
                in_flight=rng.randint(0, slots),
                n_ctx=8192,
                failed=rng.random() < 0.02,
                draining=rng.random() < 0.03,
                can_load=True,
                gpu=True,
                vram_total_bytes=total,
                vram_free_bytes=rng.randint(0, total // 4),
                staged_models=frozenset(rng.sample(MODELS, 2)),
                disk_models=frozenset(rng.sample(MODELS, 3)),
            )
        )
    return tuple(pools)


def inputs(pools: tuple[PoolView, ...]) -> dict[str, PlacementInput]:
    base = PlacementInput(
        model_id=MODELS[0],
        tokens_needed=1024,
        pools=pools,
        priority=Priority.INTERACTIVE,
        vram_needed_bytes=10 * GIB,
        waited_s=2.0,
        demand={m: 1 for m in MODELS},
    )
    busy = tuple(
        replace(p, in_flight=p.slots_total) if p.model_id == MODELS[0] else p for p in pools
    )
    return {
        "warm": base,
        "wait": replace(base, pools=busy),
        "swap": replace(base, model_id="new-model", waited_s=60.0),
    }


def time_calls(inp: PlacementInput, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        decide(inp)
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="decide() calls per case")
    args = parser.parse_args()
    rng = random.Random(7)
    results: dict[str, dict[str, object]] = {}
    print(f"{'pools':>6} {'case':<6} {'outcome':<8} {'p50 ms':>9} {'p99 ms':>9}")
    for n in (8, 64, 256):
        cases = inputs(fleet(n, rng))
        per_case: dict[str, object] = {}
        all_times: list[float] = []
        for name, inp in cases.items():
            outcome = decide(inp).outcome
            times = sorted(time_calls(inp, args.calls))
            all_times += times
            p50, p99 = statistics.median(times), times[int(0.99 * (len(times) - 1))]
            per_case[name] = {
                "outcome": outcome.value,
                "p50_ms": round(p50, 4),
                "p99_ms": round(p99, 4),
            }
            print(f"{n:>6} {name:<6} {outcome.value:<8} {p50:>9.4f} {p99:>9.4f}")
        all_times.sort()
        worst_p50 = max(float(c["p50_ms"]) for c in per_case.values())  # type: ignore[index]
        results[str(n)] = {
            "cases": per_case,
            "worst_p50_ms": worst_p50,
            "p99_ms": round(all_times[int(0.99 * (len(all_times) - 1))], 4),
        }
    at_256 = results["256"]["worst_p50_ms"]
    assert isinstance(at_256, float)
    print(
        f"256 pools: worst case p50 {at_256:.4f} ms = {at_256 / TARGET_MS:.3f}x our 1 ms target, "
        f"{at_256 / SEED_TARGET_MS:.5f}x the seed's 100 ms"
    )
    summary = {
        "pools": results,
        "target_ms_at_256": TARGET_MS,
        "ratio_to_target_at_256": round(at_256 / TARGET_MS, 4),
        "ratio_to_seed_target_at_256": round(at_256 / SEED_TARGET_MS, 6),
        "outcomes_ok": all(
            c["outcome"] != Outcome.REJECT.value  # type: ignore[index]
            for r in results.values()
            for c in r["cases"].values()  # type: ignore[union-attr]
        ),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
