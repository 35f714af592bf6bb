"""Pool lifecycle on a real PoolManager with real worker processes (CPU pools, the generated
models): drain, reload and rollback, crash supervision and the breaker, staging, and the
VRAM-only refusals on GPUs the fake NVML reports (no GPU here; say why each fake is used)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh.errors import FailedPreconditionError, NotFoundError, UnavailableError
from mesh.settings import PoolManagerSettings, PoolSettings
from poolmanager.devices import DeviceInventory
from poolmanager.execution import ExecFinished, ExecTokens, ExecutionSpec
from poolmanager.manager import PoolManager
from poolmanager.pool import PoolState
from provisioners.tiny_model import TinyModelSpec, write_tiny_model
from tests.poolmanager.fake_nvml import GIB, FakeGpu, FakeNvml

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model id → file: the long-context tiny model, a second one, and a corrupt file."""
    root = tmp_path_factory.mktemp("lifecycle-models")
    corrupt = root / "corrupt.gguf"
    # A GGUF header the reader accepts, then garbage: llama.cpp refuses it at load.
    good = write_tiny_model(root / "tmp.gguf")
    corrupt.write_bytes(good.read_bytes()[:4096] + os.urandom(4096))
    return {
        "tiny-llama": write_tiny_model(root / "tiny.gguf", TinyModelSpec(context_length=32768)),
        "other-llama": write_tiny_model(root / "other.gguf", TinyModelSpec(seed=7)),
        "corrupt": corrupt,
    }


def make_manager(
    tmp_path: Path,
    models: dict[str, Path],
    pools: list[PoolSettings] | None = None,
    nvml: FakeNvml | None = None,
    **settings: object,
) -> PoolManager:
    async def locate(model_id: str) -> str:
        if model_id not in models:
            raise NotFoundError(f"model {model_id} is not registered")
        return str(models[model_id])

    pm_settings = PoolManagerSettings(
        catalog="unused:1",
        pools=pools or [PoolSettings(pool_id="p0", model_id="tiny-llama", n_threads=1)],
        restart_backoff_s=0.05,
        **settings,  # type: ignore[arg-type]
    )
    return PoolManager(
        pm_settings,
        locate,
        dict(os.environ),
        inventory=DeviceInventory(nvml or FakeNvml(library=False)),
        staging_dir=tmp_path / "staging",
    )


@pytest.fixture
async def pm(tmp_path: Path, models: dict[str, Path]) -> AsyncIterator[PoolManager]:
    manager = make_manager(tmp_path, models)
    await manager.start()
    assert await manager.wait_ready(30), manager.pools["p0"].last_error
    yield manager
    await manager.stop()


_counter = iter(range(1_000_000))


def spec(model_id: str = "tiny-llama", max_tokens: int = 8, pool_id: str = "p0") -> ExecutionSpec:
    return ExecutionSpec(
        execution_id=f"e{next(_counter)}",
        task_id="t",
        pool_id=pool_id,
        model_id=model_id,
        prompt="the quick brown fox",
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        seed=1,
        stop=(),
        ignore_eos=True,
    )


async def run(pm: PoolManager, s: ExecutionSpec) -> tuple[int, ExecFinished | None]:
    tokens, finished = 0, None
    async for batch in pm.begin(s).events():
        for event in batch:
            if isinstance(event, ExecTokens):
                tokens += len(event.token_ids)
            elif isinstance(event, ExecFinished):
                finished = event
    return tokens, finished


async def first_token(pm: PoolManager, s: ExecutionSpec) -> tuple[asyncio.Task[object], float]:
    """Starts a long execution; returns once its first token arrived."""
    got = asyncio.Event()

    async def consume() -> object:
        async for batch in pm.begin(s).events():
            if any(isinstance(e, ExecTokens) for e in batch):
                got.set()
        return None

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got.wait(), 20)
    return task, time.monotonic()


async def wait_state(pm: PoolManager, pool_id: str, state: PoolState, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while pm.pools[pool_id].state is not state:
        assert time.monotonic() < end, (pm.pools[pool_id].state, pm.pools[pool_id].last_error)
        await pm.wait_change(pm.version, 0.2)


async def test_drain_lets_short_work_finish_and_unloads(pm: PoolManager) -> None:
    job = asyncio.create_task(run(pm, spec(max_tokens=4)))
    await asyncio.sleep(0)
    report = await pm.drain("p0", deadline_s=20)
    tokens, finished = await job
    assert finished is not None and tokens == 4
    assert (report.finished, report.cancelled) == (1, 0)
    pool = pm.pools["p0"]
    assert pool.state is PoolState.UNLOADED and pool.worker is None


async def test_drain_refuses_new_work_and_ends_the_rest_retriably_at_the_deadline(
    pm: PoolManager,
) -> None:
    long_job, _ = await first_token(pm, spec(max_tokens=30000))
    drain = asyncio.create_task(pm.drain("p0", deadline_s=0.5))
    await wait_state(pm, "p0", PoolState.DRAINING, 5)
    with pytest.raises(UnavailableError) as refused:
        pm.begin(spec())
    assert refused.value.reason == "POOL_DRAINING" and refused.value.retriable
    report = await drain
    with pytest.raises(UnavailableError) as ended:
        await long_job
    assert ended.value.reason == "POOL_DRAINED" and ended.value.retriable
    assert (report.finished, report.cancelled) == (0, 1)
    assert pm.pools["p0"].state is PoolState.UNLOADED


async def test_preload_after_a_drain_reads_the_staged_copy(pm: PoolManager) -> None:
    pool = pm.pools["p0"]
    assert pool.loaded_from == "disk"
    assert pm.staging is not None
    end = time.monotonic() + 10
    while not pm.staging.is_staged("tiny-llama"):  # staged in the background after the load
        assert time.monotonic() < end
        await pm.wait_change(pm.version, 0.2)
    await pm.drain("p0", deadline_s=0)
    await pm.preload("p0")
    assert pool.state is PoolState.READY and pool.loaded_from == "staging"
    assert pm.staging.hits == 1
    tokens, finished = await run(pm, spec(max_tokens=3))
    assert tokens == 3 and finished is not None


async def test_reload_swaps_the_model(pm: PoolManager) -> None:
    old_pid = pm.pools["p0"].worker.pid  # type: ignore[union-attr]
    await pm.reload("p0", "other-llama", deadline_s=5)
    pool = pm.pools["p0"]
    assert (pool.state, pool.model_id, pool.last_error) == (PoolState.READY, "other-llama", "")
    assert pool.worker is not None and pool.worker.pid != old_pid
    tokens, _ = await run(pm, spec("other-llama", max_tokens=3))
    assert tokens == 3
    with pytest.raises(FailedPreconditionError):
        pm.begin(spec("tiny-llama"))


async def test_reload_to_a_corrupt_model_rolls_back(pm: PoolManager) -> None:
    with pytest.raises(FailedPreconditionError) as failed:
        await pm.reload("p0", "corrupt", deadline_s=5)
    assert failed.value.reason == "RELOAD_ROLLED_BACK"
    assert "corrupt" in failed.value.message and "rolled back to tiny-llama" in failed.value.message
    pool = pm.pools["p0"]
    assert (pool.state, pool.model_id) == (PoolState.READY, "tiny-llama")
    assert "rolled back" in pool.last_error
    tokens, _ = await run(pm, spec(max_tokens=3))
    assert tokens == 3


async def test_a_killed_worker_ends_its_execution_retriably_and_restarts(
    pm: PoolManager,
) -> None:
    pool = pm.pools["p0"]
    assert pool.worker is not None
    old_pid = pool.worker.pid
    job, _ = await first_token(pm, spec(max_tokens=30000))
    killed = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(UnavailableError) as ended:
        await job
    assert time.monotonic() - killed < 1.0
    assert ended.value.reason == "WORKER_CRASHED" and ended.value.retriable
    await wait_state(pm, "p0", PoolState.READY, 20)
    assert pool.worker is not None and pool.worker.pid != old_pid
    assert pool.restarts == 1 and not pool.breaker_open
    tokens, _ = await run(pm, spec(max_tokens=3))
    assert tokens == 3


async def test_repeated_crashes_open_the_breaker_until_a_preload(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    pm = make_manager(tmp_path, models, breaker_crashes=3, breaker_window_s=60)
    await pm.start()
    try:
        pool = pm.pools["p0"]
        for _ in range(3):
            await wait_state(pm, "p0", PoolState.READY, 20)
            assert pool.worker is not None
            os.kill(pool.worker.pid, signal.SIGKILL)
            await pool.worker.exited.wait()
        await wait_state(pm, "p0", PoolState.FAILED, 10)
        assert pool.breaker_open and pool.restarts == 3
        assert "circuit breaker open: 3 crashes" in pool.last_error
        await asyncio.sleep(0.3)  # the supervisor has stopped: nothing restarts it
        assert pool.state is PoolState.FAILED and pool.worker is None
        await pm.preload("p0")
        assert pool.state is PoolState.READY and not pool.breaker_open
    finally:
        await pm.stop()


async def test_a_model_too_large_for_the_gpu_is_refused_before_any_load(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    # Fake NVML: a 1 GiB card with 0.5 GiB in use elsewhere. The tiny model needs its weights
    # plus the per-device overhead (768 MiB), so it cannot fit whole.
    nvml = FakeNvml([FakeGpu("NVIDIA T400", GIB, used_bytes=GIB // 2)])
    gpu_pool = PoolSettings(pool_id="g0", model_id="tiny-llama", devices=["0"], n_ctx=512)
    pm = make_manager(tmp_path, models, [gpu_pool], nvml)
    await pm.start()
    try:
        await wait_state(pm, "g0", PoolState.FAILED, 10)
        pool = pm.pools["g0"]
        assert pool.worker is None and pool.restarts == 0  # refused, not retried
        assert "needs" in pool.last_error and f"have {GIB // 2} bytes free" in pool.last_error
        with pytest.raises(FailedPreconditionError) as refused:
            await pm.preload("g0")
        assert refused.value.reason == "VRAM_INSUFFICIENT"
        needed = pool.vram_estimate_bytes
        assert f"needs {needed} bytes" in refused.value.message
        # The KV part names what sized it: a GPU pool's default 8 slots of 512 tokens.
        assert "for 4096 tokens of 8 slots" in refused.value.message
    finally:
        await pm.stop()


async def test_a_reload_that_cannot_fit_is_refused_before_the_pool_is_drained(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    # Fake NVML: a 1 GiB card, 0.5 GiB in use. No GPU here, so a GPU pool never becomes READY
    # for real: the test gives the pool the state of one serving tiny-llama (READY, its worker
    # measured at 0.1 GiB) and asks for a model that cannot fit even once that is unloaded.
    nvml = FakeNvml([FakeGpu("NVIDIA T400", GIB, used_bytes=GIB // 2)])
    gpu_pool = PoolSettings(pool_id="g0", model_id="tiny-llama", devices=["0"], n_ctx=512)
    pm = make_manager(tmp_path, models, [gpu_pool], nvml)
    await pm.start()
    try:
        await wait_state(pm, "g0", PoolState.FAILED, 10)
        pool = pm.pools["g0"]
        pool.state, pool.vram_measured_bytes, pool.vram_estimate_bytes = (
            PoolState.READY,
            GIB // 10,
            GIB // 8,
        )
        with pytest.raises(FailedPreconditionError) as refused:
            await pm.reload("g0", "other-llama", deadline_s=5)
        assert refused.value.reason == "VRAM_INSUFFICIENT"
        assert "refused before draining" in refused.value.message
        assert "the pool keeps serving tiny-llama" in refused.value.message
        # Nothing was touched: same state, model and figures.
        assert (pool.state, pool.model_id) == (PoolState.READY, "tiny-llama")
        assert pool.vram_estimate_bytes == GIB // 8
    finally:
        await pm.stop()


async def test_a_gpu_pool_never_falls_back_to_the_cpu(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    # Fake NVML: a big card, so the estimate passes; the engine here has no GPU offload, and
    # the worker refuses rather than run the model on the CPU.
    nvml = FakeNvml([FakeGpu("NVIDIA H100", 80 * GIB)])
    gpu_pool = PoolSettings(pool_id="g0", model_id="tiny-llama", devices=["0"], n_ctx=512)
    pm = make_manager(tmp_path, models, [gpu_pool], nvml)
    await pm.start()
    try:
        await wait_state(pm, "g0", PoolState.FAILED, 20)
        pool = pm.pools["g0"]
        assert pool.vram_estimate_bytes > 0
        assert "llama.cpp has no GPU to offload to" in pool.last_error and pool.restarts == 0
    finally:
        await pm.stop()


async def test_a_missing_gpu_or_no_nvml_fails_the_pool_with_the_reason(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    pools = [
        PoolSettings(pool_id="g1", model_id="tiny-llama", devices=["1"]),
        PoolSettings(pool_id="c0", model_id="tiny-llama", n_threads=1),
    ]
    pm = make_manager(tmp_path, models, pools, FakeNvml([FakeGpu("NVIDIA L4", 24 * GIB)]))
    await pm.start()
    try:
        await wait_state(pm, "g1", PoolState.FAILED, 10)
        await wait_state(pm, "c0", PoolState.READY, 20)
        assert "GPU 1 of pool g1 is not present" in pm.pools["g1"].last_error
        assert pm.pools["c0"].cpu_only and not pm.pools["g1"].cpu_only
    finally:
        await pm.stop()
    no_nvml = make_manager(tmp_path, models, pools[:1], FakeNvml(library=False))
    await no_nvml.start()
    try:
        await wait_state(no_nvml, "g1", PoolState.FAILED, 10)
        assert "NVML is not available" in no_nvml.pools["g1"].last_error
    finally:
        await no_nvml.stop()


async def test_staging_never_evicts_the_loaded_model(
    pm: PoolManager, models: dict[str, Path]
) -> None:
    assert pm.staging is not None
    end = time.monotonic() + 10
    while not pm.staging.is_staged("tiny-llama"):
        assert time.monotonic() < end
        await pm.wait_change(pm.version, 0.2)
    # Room for one model only: staging another would need the loaded one's bytes.
    pm.staging.budget_bytes = pm.staging.staged_bytes + 1000
    with pytest.raises(Exception, match="in use: tiny-llama"):
        await pm.stage("other-llama")
    with pytest.raises(FailedPreconditionError):
        await pm.unstage("tiny-llama")
    assert pm.staging.is_staged("tiny-llama")
    # Once the pool moved to the other model, the first one may go.
    pm.staging.budget_bytes = 10 * pm.staging.staged_bytes
    await pm.reload("p0", "other-llama", deadline_s=5)
    assert await pm.unstage("tiny-llama") is True


async def wait_spare(pm: PoolManager, pool_id: str = "p0", timeout_s: float = 30) -> int:
    end = time.monotonic() + timeout_s
    while not pm.pools[pool_id].spare_ready:
        assert time.monotonic() < end, "no spare worker became ready"
        await pm.wait_change(pm.version, 0.2)
    spare = pm.pools[pool_id].spare
    assert spare is not None
    return spare.pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); a reaped process does not exist at all.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"


async def test_reloads_and_restarts_take_the_warm_spare_and_a_new_one_follows(
    pm: PoolManager,
) -> None:
    pool = pm.pools["p0"]
    assert not pool.loaded_in_spare  # the first worker had no spare to take
    spare_pid = await wait_spare(pm)
    await pm.reload("p0", "other-llama", deadline_s=5)
    assert pool.worker is not None and pool.worker.pid == spare_pid
    assert pool.loaded_in_spare and pool.model_id == "other-llama"
    tokens, _ = await run(pm, spec("other-llama", max_tokens=3))
    assert tokens == 3
    # A crash restart takes the next spare too.
    next_spare = await wait_spare(pm)
    assert next_spare != spare_pid
    os.kill(spare_pid, signal.SIGKILL)
    await wait_state(pm, "p0", PoolState.LOADING, 5)
    await wait_state(pm, "p0", PoolState.READY, 30)
    assert pool.worker is not None and pool.worker.pid == next_spare and pool.loaded_in_spare


async def test_a_dead_spare_is_passed_over_and_stop_leaves_no_spare(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    manager = make_manager(tmp_path, models)
    await manager.start()
    try:
        assert await manager.wait_ready(30)
        dead = await wait_spare(manager)
        os.kill(dead, signal.SIGKILL)
        for _ in range(500):  # until the manager has reaped it
            if not alive(dead):
                break
            await asyncio.sleep(0.02)
        await manager.reload("p0", "other-llama", deadline_s=5)
        pool = manager.pools["p0"]
        assert not pool.loaded_in_spare and pool.worker is not None and pool.worker.pid != dead
        last = await wait_spare(manager)
    finally:
        await manager.stop()
    assert not alive(last)


async def test_an_unloaded_pool_keeps_no_spare(pm: PoolManager) -> None:
    spare = await wait_spare(pm)
    await pm.drain("p0", deadline_s=0)
    assert pm.pools["p0"].spare is None and not alive(spare)
    await pm.preload("p0")  # a fresh worker, then a new spare
    assert not pm.pools["p0"].loaded_in_spare
    assert await wait_spare(pm) != spare


async def test_spares_can_be_turned_off(tmp_path: Path, models: dict[str, Path]) -> None:
    manager = make_manager(tmp_path, models, spare_workers=False)
    await manager.start()
    try:
        assert await manager.wait_ready(30)
        await asyncio.sleep(1.0)  # time enough for a spare to have started, were it wanted
        assert manager.pools["p0"].spare is None and manager.pools["p0"].spare_task is None
    finally:
        await manager.stop()
