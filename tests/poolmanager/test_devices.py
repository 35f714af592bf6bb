"""DeviceInventory over the fake NVML: no NVML, no GPU, one, two mixed, and one disappearing."""

from __future__ import annotations

import logging

import pytest

from poolmanager.devices import DeviceInventory
from tests.poolmanager.fake_nvml import GIB, FakeGpu, FakeNvml, rtx_3060, rtx_4090


def test_without_nvml_there_are_no_gpus_and_the_log_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inventory = DeviceInventory(FakeNvml(library=False))
    with caplog.at_level(logging.WARNING):
        assert inventory.open() is False
    assert inventory.devices() == []
    assert "NVMLError_LibraryNotFound" in inventory.unavailable_reason
    assert "no GPU pools" in caplog.text


def test_nvml_without_gpus() -> None:
    inventory = DeviceInventory(FakeNvml([]))
    assert inventory.open() is True
    assert inventory.devices() == []


def test_one_gpu() -> None:
    nvml = FakeNvml([FakeGpu("NVIDIA H100", 80 * GIB, used_bytes=GIB, utilization_pct=37)])
    inventory = DeviceInventory(nvml)
    inventory.open()
    (gpu,) = inventory.devices()
    assert (gpu.index, gpu.name, gpu.uuid) == (0, "NVIDIA H100", "GPU-fake-0")
    assert gpu.vram_total_bytes == 80 * GIB
    assert gpu.vram_used_bytes == GIB
    assert gpu.vram_free_bytes == 79 * GIB
    assert gpu.utilization_pct == 37
    assert gpu.compute_capability == "8.9"


def test_two_mixed_gpus_keep_their_own_sizes() -> None:
    inventory = DeviceInventory(FakeNvml([rtx_4090(), rtx_3060()]))
    inventory.open()
    big, small = inventory.devices()
    assert (big.index, small.index) == (0, 1)
    assert big.vram_total_bytes == 24 * GIB and big.vram_free_bytes == 24 * GIB - GIB // 2
    assert small.vram_total_bytes == 12 * GIB and small.vram_free_bytes == 12 * GIB
    assert (big.compute_capability, small.compute_capability) == ("8.9", "8.6")


def test_a_gpu_that_disappears_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([rtx_4090(), rtx_3060()])
    inventory = DeviceInventory(nvml)
    inventory.open()
    nvml.gpus[0].lost = True
    with caplog.at_level(logging.ERROR):
        devices = inventory.devices()
    assert [d.index for d in devices] == [1]
    assert inventory.device(0) is None
    assert "GPU 0 cannot be read" in caplog.text


def test_process_vram_is_read_per_pid() -> None:
    nvml = FakeNvml([rtx_4090()])
    nvml.gpus[0].processes[4242] = 3 * GIB
    inventory = DeviceInventory(nvml)
    inventory.open()
    assert inventory.process_vram_bytes(0, 4242) == 3 * GIB
    assert inventory.process_vram_bytes(0, 1) is None
    assert inventory.devices()[0].vram_used_bytes == GIB // 2 + 3 * GIB
