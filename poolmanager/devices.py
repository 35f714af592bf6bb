"""The GPUs of this machine, read through NVML (the ``nvidia-ml-py`` package, module ``pynvml``).

Without NVML (no driver, no GPU) the inventory is empty and says why once in the log: the node
then has no GPU pools, and a pool configured on a GPU is refused with that reason. Tests pass an
in-process fake with the same functions as ``pynvml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh import logs

_log = logs.get_logger("poolmanager.devices")


@dataclass(frozen=True)
class GpuDevice:
    """One GPU as NVML saw it at one moment."""

    index: int
    uuid: str
    name: str
    vram_total_bytes: int
    vram_free_bytes: int
    vram_used_bytes: int
    utilization_pct: int
    compute_capability: str
    """Major.minor, e.g. ``"9.0"``."""


class DeviceInventory:
    """Reads the GPUs through NVML; every call is cheap enough for each state change."""

    def __init__(self, nvml: Any | None = None) -> None:
        """Uses ``nvml`` (a module or object with pynvml's functions), else imports pynvml."""
        self._nvml = nvml
        self.available = False
        """Whether NVML answered; False means no GPUs (see ``unavailable_reason``)."""
        self.unavailable_reason = ""

    def open(self) -> bool:
        """Initialises NVML; False (and a log line saying why) when there is none."""
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:  # the dependency is declared; a broken install only
                self.unavailable_reason = f"nvidia-ml-py is not installed ({exc})"
                _log.warning("no NVML: %s; this node has no GPU pools", self.unavailable_reason)
                return False
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            self.unavailable_reason = f"NVML is not available: {_describe(exc)}"
            _log.warning("%s; this node has no GPU pools", self.unavailable_reason)
            return False
        self.available = True
        return True

    def close(self) -> None:
        """Shuts NVML down."""
        if self.available and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                _log.warning("NVML shutdown failed: %s", _describe(exc))
            self.available = False

    def devices(self) -> list[GpuDevice]:
        """Every GPU NVML can read now; one that fails (fell off the bus, lost) is left out."""
        if not self.available:
            return []
        nvml = self._nvml
        assert nvml is not None
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            _log.error("NVML cannot count the GPUs: %s", _describe(exc))
            return []
        found = []
        for index in range(count):
            try:
                found.append(self._read(index))
            except nvml.NVMLError as exc:
                _log.error("GPU %d cannot be read, left out: %s", index, _describe(exc))
        return found

    def device(self, index: int) -> GpuDevice | None:
        """One GPU, or None when it is missing or cannot be read."""
        if not self.available:
            return None
        assert self._nvml is not None
        try:
            return self._read(index)
        except self._nvml.NVMLError as exc:
            _log.error("GPU %d cannot be read: %s", index, _describe(exc))
            return None

    def process_vram_bytes(self, index: int, pid: int) -> int | None:
        """VRAM a process holds on a GPU, or None when NVML does not say (e.g. in a container
        whose process ids differ from the host's)."""
        if not self.available:
            return None
        nvml = self._nvml
        assert nvml is not None
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except nvml.NVMLError:
            return None
        for process in processes:
            if int(process.pid) == pid:
                used = process.usedGpuMemory
                return None if used is None else int(used)
        return None

    def _read(self, index: int) -> GpuDevice:
        nvml = self._nvml
        assert nvml is not None
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            utilization = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError:  # not supported on some boards; not a reason to lose the GPU
            utilization = 0
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        return GpuDevice(
            index=index,
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)),
            vram_total_bytes=int(memory.total),
            vram_free_bytes=int(memory.free),
            vram_used_bytes=int(memory.used),
            utilization_pct=utilization,
            compute_capability=f"{major}.{minor}",
        )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
