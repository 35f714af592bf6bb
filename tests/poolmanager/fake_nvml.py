"""An in-process stand-in for ``pynvml`` (machines here have no GPU): the functions
DeviceInventory calls, over a list of GPUs a test can change (fill VRAM, pull a GPU out)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

GIB = 1024**3


class NVMLError(Exception):
    """Base of the fake's errors, like pynvml.NVMLError."""


class NVMLError_LibraryNotFound(NVMLError):
    """No driver library."""


class NVMLError_GpuIsLost(NVMLError):
    """The GPU fell off the bus."""


@dataclass
class FakeGpu:
    """One fake GPU."""

    name: str
    total_bytes: int
    used_bytes: int = 0
    utilization_pct: int = 0
    capability: tuple[int, int] = (8, 9)
    lost: bool = False
    processes: dict[int, int] = field(default_factory=dict)
    """pid → VRAM bytes."""


class FakeNvml:
    """The subset of pynvml that DeviceInventory uses."""

    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu] | None = None, *, library: bool = True) -> None:
        self.gpus = gpus or []
        self.library = library
        self.initialised = False

    def nvmlInit(self) -> None:
        if not self.library:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if index >= len(self.gpus):
            raise NVMLError("Invalid Argument")
        gpu = self.gpus[index]
        if gpu.lost:
            raise NVMLError_GpuIsLost("GPU is lost")
        return gpu

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> SimpleNamespace:
        self._check(gpu)
        used = gpu.used_bytes + sum(gpu.processes.values())
        return SimpleNamespace(total=gpu.total_bytes, used=used, free=gpu.total_bytes - used)

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> SimpleNamespace:
        self._check(gpu)
        return SimpleNamespace(gpu=gpu.utilization_pct, memory=0)

    def nvmlDeviceGetCudaComputeCapability(self, gpu: FakeGpu) -> tuple[int, int]:
        self._check(gpu)
        return gpu.capability

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        self._check(gpu)
        return f"GPU-fake-{self.gpus.index(gpu)}"

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> bytes:
        self._check(gpu)
        return gpu.name.encode()

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        self._check(gpu)
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in gpu.processes.items()]

    @staticmethod
    def _check(gpu: FakeGpu) -> None:
        if gpu.lost:
            raise NVMLError_GpuIsLost("GPU is lost")


def rtx_4090() -> FakeGpu:
    """A 24 GiB card."""
    return FakeGpu("NVIDIA GeForce RTX 4090", 24 * GIB, used_bytes=GIB // 2)


def rtx_3060() -> FakeGpu:
    """A 12 GiB card of an older generation."""
    return FakeGpu("NVIDIA GeForce RTX 3060", 12 * GIB, capability=(8, 6))
