"""Reload benchmark: ReloadPool → Ready for a ~1 GiB model, from a cold disk and from the RAM
staging cache, beside the plain llama.cpp load of the same file from a warm page cache.

A real PoolManager (in this process) runs one pool; each round reloads it from a small model to
the big one twice: once with the file evicted from the page cache (posix_fadvise DONTNEED) and
not staged, once with it staged in RAM (the disk copy evicted too, so only RAM can serve it).
It runs twice: as shipped, where every reload takes the pool's warm spare worker (each timed
reload starts once the next spare is ready, as in steady operation), and with
``spare_workers`` off, where every reload starts a worker process.
The plain load is ``llama_cpp.Llama(path)`` in a fresh process with the file in the page cache,
timed around the constructor only. Prints medians and the ratios against the targets (RAM at
least 3x faster than cold disk; RAM within 1.5x of the plain warm load), then one line of JSON.

  .venv/bin/python bench/reload.py                 # CPU pool
  .venv/bin/python bench/reload.py --devices 0     # GPU 0 (scripts/gpu_check.sh runs this)
  .venv/bin/python bench/reload.py --small         # a 170 MiB model, for a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from mesh.errors import NotFoundError  # noqa: E402
from mesh.settings import PoolManagerSettings, PoolSettings  # noqa: E402
from poolmanager.manager import PoolManager, PoolState  # noqa: E402
from provisioners.tiny_model import TinyModelSpec, write_tiny_model  # noqa: E402

RAM_VS_DISK_TARGET = 3.0
RAM_VS_PLAIN_TARGET = 1.5

_PLAIN = r"""
import sys, time, llama_cpp
started = time.perf_counter()
llm = llama_cpp.Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_gpu_layers=int(sys.argv[3]),
                      verbose=False)
loaded = time.perf_counter()
next(iter(llm.generate(llm.tokenize(b"Hi"), temp=0.0)))  # the health check
done = time.perf_counter()
print((loaded - started) * 1000, (done - started) * 1000)
"""


def evict(path: Path) -> None:
    """Drops a file's pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    """Reads a file once so that it sits in the page cache."""
    with open(path, "rb") as handle:
        while handle.read(16 << 20):
            pass


def plain_load_ms(path: Path, n_ctx: int, gpu: bool) -> tuple[float, float]:
    """The constructor alone, and the constructor plus a first token (what a health check
    does, and where a lazily mapped file is really read)."""
    warm(path)
    out = subprocess.run(
        [sys.executable, "-c", _PLAIN, str(path), str(n_ctx), "-1" if gpu else "0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    load, first = out.strip().splitlines()[-1].split()
    return float(load), float(first)


async def wait_spare(pm: PoolManager) -> None:
    """Waits until the pool's spare worker is warm."""
    while not pm.pools["p0"].spare_ready:
        await pm.wait_change(pm.version, 0.5)


async def timed_reload(pm: PoolManager, model_id: str, spare: bool) -> float:
    """ReloadPool → Ready; with spares on, starts once the pool's spare is warm."""
    if spare:
        await wait_spare(pm)
    started = time.perf_counter()
    await pm.reload("p0", model_id, deadline_s=0)
    elapsed = (time.perf_counter() - started) * 1000
    assert pm.pools["p0"].state is PoolState.READY, pm.pools["p0"].last_error
    return elapsed


async def measure(args: argparse.Namespace) -> dict[str, object]:
    models_dir = Path(args.model_dir)
    spec = TinyModelSpec.bench() if args.small else TinyModelSpec.reload_bench()
    big = models_dir / f"{spec.name}.gguf"
    if not big.exists():
        print(f"generating {big} ...", file=sys.stderr)
        write_tiny_model(big, spec)
    small = write_tiny_model(models_dir / "tiny-llama.gguf")
    paths = {"tiny-llama": small, spec.name: big}

    async def locate(model_id: str) -> str:
        if model_id not in paths:
            raise NotFoundError(f"unknown model {model_id}")
        return str(paths[model_id])

    devices = ["cpu"] if args.devices == "cpu" else args.devices.split(",")
    runs: dict[bool, dict[str, list[float]]] = {}
    spare_warm_ms = 0.0
    for spares in (True, False):
        settings = PoolManagerSettings(
            catalog="unused:1",
            pools=[
                PoolSettings(
                    pool_id="p0",
                    model_id="tiny-llama",
                    devices=devices,
                    n_ctx=args.n_ctx,
                    n_threads=2,
                )
            ],
            auto_stage=False,
            staging_budget_bytes=4 * big.stat().st_size,
            spare_workers=spares,
        )
        pm = PoolManager(settings, locate, dict(os.environ), log_level="WARNING")
        await pm.start()
        cold, ram = [], []
        try:
            assert await pm.wait_ready(120), pm.pools["p0"].last_error
            assert pm.staging is not None
            for _ in range(args.rounds):
                await pm.unstage(spec.name)
                evict(big)
                cold.append(await timed_reload(pm, spec.name, spares))
                assert pm.pools["p0"].loaded_from == "disk"
                await timed_reload(pm, "tiny-llama", spares)
                await pm.stage(spec.name)
                evict(big)
                ram.append(await timed_reload(pm, spec.name, spares))
                assert pm.pools["p0"].loaded_from == "staging"
                pool = pm.pools["p0"]
                assert pool.loaded_in_spare is spares
                if spares:  # the figures of the run as shipped
                    estimate, measured = pool.vram_estimate_bytes, pool.vram_measured_bytes
                await timed_reload(pm, "tiny-llama", spares)
            if spares:
                await wait_spare(pm)
                spare = pm.pools["p0"].spare
                spare_warm_ms = spare.warm_ms if spare is not None else 0.0
        finally:
            await pm.stop()
        runs[spares] = {"cold": cold, "ram": ram}
    plains = [plain_load_ms(big, args.n_ctx, devices != ["cpu"]) for _ in range(args.rounds)]
    plain = [p[0] for p in plains]
    plain_first = [p[1] for p in plains]
    cold, ram = runs[True]["cold"], runs[True]["ram"]
    cold_ms, ram_ms, plain_ms, first_ms = (
        statistics.median(x) for x in (cold, ram, plain, plain_first)
    )
    fresh_cold_ms, fresh_ram_ms = (statistics.median(runs[False][k]) for k in ("cold", "ram"))
    return {
        "bench": "reload",
        "model": spec.name,
        "model_bytes": big.stat().st_size,
        "devices": args.devices,
        "rounds": args.rounds,
        "reload_cold_disk_ms": round(cold_ms, 1),
        "reload_ram_ms": round(ram_ms, 1),
        "plain_warm_load_ms": round(plain_ms, 1),
        "plain_warm_load_first_token_ms": round(first_ms, 1),
        "cold_over_ram": round(cold_ms / ram_ms, 2),
        "ram_over_plain": round(ram_ms / plain_ms, 2),
        "ram_over_plain_first_token": round(ram_ms / first_ms, 2),
        "spare_warm_ms": round(spare_warm_ms, 1),
        "without_spare": {
            "reload_cold_disk_ms": round(fresh_cold_ms, 1),
            "reload_ram_ms": round(fresh_ram_ms, 1),
            "cold_over_ram": round(fresh_cold_ms / fresh_ram_ms, 2),
            "ram_over_plain": round(fresh_ram_ms / plain_ms, 2),
        },
        "targets": {"cold_over_ram": RAM_VS_DISK_TARGET, "ram_over_plain": RAM_VS_PLAIN_TARGET},
        "vram_estimate_bytes": estimate,
        "vram_measured_bytes": measured,
        "samples_ms": {
            "cold": cold,
            "ram": ram,
            "plain": plain,
            "plain_first": plain_first,
            "cold_without_spare": runs[False]["cold"],
            "ram_without_spare": runs[False]["ram"],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cpu", help='"cpu" or GPU indexes such as 0 or 0,1')
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--small", action="store_true", help="the 170 MiB model instead of 1 GiB")
    parser.add_argument(
        "--model-dir", default=str(ROOT / "bench" / "results" / "models"), help="model cache"
    )
    args = parser.parse_args()
    figures = asyncio.run(measure(args))
    print(f"model {figures['model']} ({figures['model_bytes']} bytes) on {args.devices}")
    print(f"  ReloadPool → Ready, cold disk   {figures['reload_cold_disk_ms']:>9} ms")
    print(f"  ReloadPool → Ready, RAM staging {figures['reload_ram_ms']:>9} ms")
    print(f"  plain llama.cpp load, warm      {figures['plain_warm_load_ms']:>9} ms")
    print(f"    ... and its first token       {figures['plain_warm_load_first_token_ms']:>9} ms")
    print(
        f"  cold / RAM  = {figures['cold_over_ram']}x (target >= {RAM_VS_DISK_TARGET}x)"
        f"    RAM / plain = {figures['ram_over_plain']}x (target <= {RAM_VS_PLAIN_TARGET}x;"
        f" {figures['ram_over_plain_first_token']}x against load + first token)"
    )
    fresh = figures["without_spare"]
    assert isinstance(fresh, dict)
    print(
        f"  without spare workers: cold disk {fresh['reload_cold_disk_ms']} ms, RAM "
        f"{fresh['reload_ram_ms']} ms (cold / RAM {fresh['cold_over_ram']}x, RAM / plain "
        f"{fresh['ram_over_plain']}x)"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
