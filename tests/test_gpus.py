"""The GPU manager against a fake NVML (two GPUs, one of them lost) and the real one on this box.

The fake is a module with the pynvml calls the monitor makes, returning fixed numbers, so every
field's conversion (bytes, milliwatts to watts, bytes names) and every "N/A" path is checked
without a GPU.
"""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType, SimpleNamespace

from mistudiod.gpus import (
    GpuMonitor,
    devices_of,
    format_gpus,
    gpu_devices,
    has_gpus,
    job_gpu_memory,
)

GIB = 2**30


class NVMLError(Exception):
    pass


class NVMLLibraryMismatchError(Exception):
    """What pynvml raises for an unversioned call the driver is too old for."""


def fake_nvml(count: int = 2, init_error: bool = False) -> ModuleType:
    """A pynvml with `count` GPUs: GPU 0 has no fan (NotSupported), GPU 1 has fallen off the bus
    (no handle). pid 111 is in both process lists, as a CUDA app that also draws would be; the
    graphics list needs the `_v2` call, as on a driver older than pynvml."""
    nvml = ModuleType("pynvml")
    nvml.shutdowns = 0

    def init() -> None:
        if init_error:
            raise NVMLError("NVML Shared Library Not Found")

    def handle(index: int) -> str:
        if index == 1:
            raise NVMLError("GPU is lost")
        return f"handle{index}"

    def fan(handle: str) -> int:
        raise NVMLError("Not Supported")

    def shutdown() -> None:
        nvml.shutdowns += 1

    def too_new(handle: str) -> list:
        raise NVMLLibraryMismatchError("use a versioned function")

    nvml.__dict__.update(
        NVMLError=NVMLError,
        NVMLLibraryMismatchError=NVMLLibraryMismatchError,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=init,
        nvmlShutdown=shutdown,
        nvmlDeviceGetCount=lambda: count,
        nvmlSystemGetDriverVersion=lambda: b"550.54.15",
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetUUID=lambda h: "GPU-0000",
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=45, memory=12),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(
            used=20 * GIB, total=80 * GIB, free=60 * GIB),
        nvmlDeviceGetTemperature=lambda h, sensor: 62,
        nvmlDeviceGetPowerUsage=lambda h: 210_500,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetFanSpeed=fan,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            SimpleNamespace(pid=111, usedGpuMemory=2 * GIB),
            SimpleNamespace(pid=333, usedGpuMemory=None),
        ],
        nvmlDeviceGetGraphicsRunningProcesses=too_new,
        nvmlDeviceGetGraphicsRunningProcesses_v2=lambda h: [
            SimpleNamespace(pid=111, usedGpuMemory=2 * GIB),
            SimpleNamespace(pid=222, usedGpuMemory=GIB),
        ],
    )
    return nvml


def test_snapshot_converts_units_and_degrades_per_field() -> None:
    monitor = GpuMonitor(fake_nvml())
    snapshot = monitor.snapshot(owners={111: 7})

    assert snapshot["available"] is True and snapshot["reason"] is None
    assert snapshot["driver"] == "550.54.15"
    gpu, lost = snapshot["gpus"]
    assert gpu == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-0000",
        "util_percent": 45,
        "memory_util_percent": 25.0,
        "memory_used": 20 * GIB,
        "memory_total": 80 * GIB,
        "memory_free": 60 * GIB,
        "temperature_c": 62,
        "power_w": 210.5,
        "power_limit_w": 700.0,
        "fan_percent": None,
        "processes": [
            {"pid": 111, "used_memory": 2 * GIB, "job_id": 7},
            {"pid": 333, "used_memory": None, "job_id": None},
            {"pid": 222, "used_memory": GIB, "job_id": None},
        ],
    }
    assert lost["index"] == 1
    assert set(lost) == set(gpu)
    assert all(value is None for key, value in lost.items() if key != "index")


def test_devices_lists_readable_gpus() -> None:
    [device] = GpuMonitor(fake_nvml()).devices()
    assert (device.name, device.label) == ("cuda:0", "NVIDIA H100 80GB HBM3")
    assert (device.free_bytes, device.total_bytes) == (60 * GIB, 80 * GIB)


def test_devices_and_job_memory_come_from_a_snapshot_without_a_new_reading() -> None:
    nvml = fake_nvml()
    snapshot = GpuMonitor(nvml).snapshot(owners={111: 7, 222: 7, 444: 8})
    nvml.nvmlDeviceGetMemoryInfo = None  # a new reading would fail now
    assert has_gpus(snapshot)
    [device] = devices_of(snapshot)
    assert device == gpu_devices(snapshot)[0]
    assert (device.name, device.free_bytes, device.total_bytes) == ("cuda:0", 60 * GIB, 80 * GIB)
    assert job_gpu_memory(snapshot) == {7: 3 * GIB}  # its two processes; job 8 shows no memory
    empty = {"available": False, "reason": "no NVIDIA GPU found", "gpus": []}
    assert not has_gpus(empty) and gpu_devices(empty) == [] and job_gpu_memory(empty) == {}
    [cpu] = devices_of(empty)
    assert cpu.name == "cpu" and cpu.total_bytes > 0


def test_no_gpu_means_cpu() -> None:
    monitor = GpuMonitor(fake_nvml(count=0))
    snapshot = monitor.snapshot()
    assert (snapshot["available"], snapshot["reason"], snapshot["gpus"]) == (
        False, "no NVIDIA GPU found", [])
    [device] = monitor.devices()
    assert device.name == "cpu" and device.total_bytes > 0
    assert format_gpus(snapshot) == "No GPU: no NVIDIA GPU found; jobs run on the CPU."


def test_failed_init_is_reported() -> None:
    monitor = GpuMonitor(fake_nvml(init_error=True))
    assert not monitor.available
    assert monitor.reason == "NVML unavailable: NVML Shared Library Not Found"
    monitor.close()  # nothing was initialised, so nothing to shut down


def test_close_shuts_nvml_down_once() -> None:
    nvml = fake_nvml()
    monitor = GpuMonitor(nvml)
    monitor.close()
    monitor.close()
    assert nvml.shutdowns == 1
    assert monitor.snapshot()["gpus"] == []


def test_format_gpus() -> None:
    text = format_gpus(GpuMonitor(fake_nvml()).snapshot(owners={111: 7}))
    assert text.splitlines() == [
        "NVIDIA driver 550.54.15",
        "GPU 0  NVIDIA H100 80GB HBM3  util 45%  mem 20.0/80.0 GiB  temp 62C  power 210/700 W"
        "  fan N/A",
        "  processes: pid 111 (job 7) 2.0 GiB, pid 333 N/A, pid 222 1.0 GiB",
        "GPU 1  N/A  util N/A  mem N/A  temp N/A  power N/A  fan N/A",
        "  processes: N/A",
    ]


def test_real_nvml_never_crashes() -> None:
    """On a box without a GPU (this one) it reports why; on a GPU box, the GPUs."""
    monitor = GpuMonitor()
    try:
        snapshot = monitor.snapshot()
    finally:
        monitor.close()
    assert snapshot["available"] == bool(snapshot["gpus"])
    if not snapshot["available"]:
        assert snapshot["reason"]
        assert format_gpus(snapshot).endswith("jobs run on the CPU.")
    else:
        assert format_gpus(snapshot).startswith("NVIDIA driver")


def test_import_needs_no_torch() -> None:
    """The daemon imports these at start; torch would add seconds to it."""
    code = "import sys, mistudiod.gpus, mistudiod.metrics; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
