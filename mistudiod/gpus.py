"""The daemon's GPU manager: what each NVIDIA GPU is doing, read through NVML (DESIGN.md 4).

A thin layer over nvidia-ml-py (`pynvml`) in the spirit of nvitop. Every NVML query is asked on
its own, and one that fails (a fan on a datacenter GPU is `NotSupported`, a GPU that fell off the
bus is `GpuIsLost`) leaves that one field `None`, rendered "N/A", instead of failing the whole
reading. With no NVML library, no driver or no GPU the monitor says so in `reason` and the daemon
keeps working on the CPU.

This module imports no torch: the daemon imports it at start and must come up fast. Only
`devices_of()` and `gpu_devices()`, which answer the memory preflight, import
`mistudio_core.memory` (and so torch); the daemon calls them in a thread.

NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES, so `index` here is the NVML
index, and `cuda:N` is torch's name for it only when every GPU is visible in that order.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from mistudio_core.memory import DeviceMemory

_GIB = 2**30
# The process lists, each as the calls to try in turn: the unversioned call needs a driver as new
# as pynvml (else NVMLLibraryMismatchError), `_v2` answers on older drivers. A process in both the
# compute and the graphics list is one process.
_PROCESS_QUERIES = (
    ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"),
    ("nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses_v2"),
)
# Every per-GPU field but `index` and `processes`, for a GPU whose handle NVML cannot give.
_GPU_FIELDS = ("name", "uuid", "util_percent", "memory_util_percent", "memory_used",
               "memory_total", "memory_free", "temperature_c", "power_w", "power_limit_w",
               "fan_percent")


def _text(value: Any) -> str:
    """Old pynvml releases return bytes where new ones return str."""
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuMonitor:
    """Reads every GPU's utilisation, memory, temperature, power, fan and processes.

    `nvml` is the pynvml module; tests pass a fake one. By default pynvml is imported here, and
    NVML is initialised once for the monitor's life (`close()` shuts it down), because an init per
    reading would cost more than the reading at 1 Hz.
    """

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml: Any = nvml
        self._initialised = False
        self._count = 0
        self.available = False
        self.reason: str | None = None
        self.driver: str | None = None
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError as error:
                self.reason = f"NVML unavailable: {error}"
                return
        # NVMLLibraryMismatchError (pynvml newer than the driver) is no NVMLError subclass.
        mismatch = getattr(self._nvml, "NVMLLibraryMismatchError", None)
        self._errors: tuple[type[Exception], ...] = (
            (self._nvml.NVMLError, mismatch) if mismatch else (self._nvml.NVMLError,)
        )
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as error:
            self.reason = f"NVML unavailable: {error}"
            return
        self._initialised = True
        try:
            self._count = int(self._nvml.nvmlDeviceGetCount())
        except self._nvml.NVMLError as error:
            self.reason = f"NVML cannot count the GPUs: {error}"
            return
        if self._count == 0:
            self.reason = "no NVIDIA GPU found"
            return
        self.available = True
        self.driver = self._query(lambda: _text(self._nvml.nvmlSystemGetDriverVersion()))

    def _query(self, read: Callable[[], Any]) -> Any:
        """`read()`, or None when NVML cannot answer it."""
        try:
            return read()
        except self._errors:
            return None

    def snapshot(self, owners: dict[int, int] | None = None) -> dict:
        """One reading of every GPU, as plain JSON types for the `gpu.<uuid>` events.

        `owners` maps the pid of each of our workers to its job id, so that every GPU process
        says which job it belongs to (`job_id` None: not ours). Memory is in bytes, power in
        watts; `memory_util_percent` is the share of the memory in use (used / total), not NVML's
        memory-bandwidth figure, because "how full is it" is what placing a job needs.
        """
        return {
            "available": self.available,
            "reason": self.reason,
            "driver": self.driver,
            "gpus": [self._gpu(index, owners or {}) for index in range(self._count)],
            "time": time.time(),
        }

    def _gpu(self, index: int, owners: dict[int, int]) -> dict:
        nvml = self._nvml
        handle = self._query(lambda: nvml.nvmlDeviceGetHandleByIndex(index))
        if handle is None:
            return {"index": index, **dict.fromkeys(_GPU_FIELDS), "processes": None}
        utilization = self._query(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        memory = self._query(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        power = self._query(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        limit = self._query(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        used = int(memory.used) if memory is not None else None
        total = int(memory.total) if memory is not None else None
        return {
            "index": index,
            "name": self._query(lambda: _text(nvml.nvmlDeviceGetName(handle))),
            "uuid": self._query(lambda: _text(nvml.nvmlDeviceGetUUID(handle))),
            "util_percent": int(utilization.gpu) if utilization is not None else None,
            "memory_util_percent": 100.0 * used / total if used is not None and total else None,
            "memory_used": used,
            "memory_total": total,
            "memory_free": int(memory.free) if memory is not None else None,
            "temperature_c": self._query(
                lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            ),
            "power_w": power / 1000 if power is not None else None,
            "power_limit_w": limit / 1000 if limit is not None else None,
            "fan_percent": self._query(lambda: int(nvml.nvmlDeviceGetFanSpeed(handle))),
            "processes": self._processes(handle, owners),
        }

    def _processes(self, handle: Any, owners: dict[int, int]) -> list[dict] | None:
        """The GPU's compute and graphics processes; None only when NVML can list neither."""
        by_pid: dict[int, dict] = {}
        answered = False
        for names in _PROCESS_QUERIES:
            listed = self._first_list(names, handle)
            if listed is None:
                continue
            answered = True
            for process in listed:
                pid = int(process.pid)
                memory = process.usedGpuMemory  # None where the driver cannot tell (WDDM)
                by_pid.setdefault(pid, {
                    "pid": pid,
                    "used_memory": int(memory) if memory is not None else None,
                    "job_id": owners.get(pid),
                })
        return list(by_pid.values()) if answered else None

    def _first_list(self, names: tuple[str, ...], handle: Any) -> list | None:
        """The list from the first of `names` that this pynvml has and NVML answers, or None."""
        for name in names:
            query = getattr(self._nvml, name, None)
            listed = None if query is None else self._query(lambda query=query: query(handle))
            if listed is not None:
                return listed
        return None

    def devices(self) -> list[DeviceMemory]:
        """A fresh reading's devices (`devices_of`); the daemon derives them from its latest
        snapshot instead of taking another reading."""
        return devices_of(self.snapshot())

    def close(self) -> None:
        """Shut NVML down; the monitor reports no GPU afterwards."""
        if self._initialised:
            self._initialised = False
            self.available = False
            self._count = 0
            self.reason = "the GPU monitor is closed"
            self._query(self._nvml.nvmlShutdown)


def _readable_gpus(snapshot: dict) -> list[dict]:
    """The GPUs of a snapshot whose memory NVML could read (the others are left out rather than
    guessed at)."""
    return [gpu for gpu in snapshot.get("gpus") or ()
            if gpu["memory_free"] is not None and gpu["memory_total"] is not None]


def has_gpus(snapshot: dict) -> bool:
    """Whether a snapshot has a GPU to place jobs on (torch-free, unlike `gpu_devices`)."""
    return bool(_readable_gpus(snapshot))


def roomiest_gpu(snapshot: dict) -> str | None:
    """The device name (`cuda:N`) of the GPU with the most free memory, or None without GPUs."""
    gpus = _readable_gpus(snapshot)
    if not gpus:
        return None
    return f"cuda:{max(gpus, key=lambda gpu: gpu['memory_free'])['index']}"


def gpu_devices(snapshot: dict) -> list[DeviceMemory]:
    """Each GPU's free and total memory in a snapshot, for the preflight and the placer."""
    from mistudio_core.memory import DeviceMemory

    return [DeviceMemory(f"cuda:{gpu['index']}", gpu["name"] or f"GPU {gpu['index']}",
                         gpu["memory_free"], gpu["memory_total"])
            for gpu in _readable_gpus(snapshot)]


def devices_of(snapshot: dict) -> list[DeviceMemory]:
    """`gpu_devices(snapshot)`, or CPU RAM (read now) when there is no GPU."""
    from mistudio_core.memory import _cpu_memory

    return gpu_devices(snapshot) or [_cpu_memory()]


def job_gpu_memory(snapshot: dict) -> dict[int, int]:
    """Job id -> the GPU memory NVML sees its worker holding (the snapshot's `owners`).

    Unknown (None) amounts count as 0, and so does a worker NVML does not list (in a container
    with its own pid namespace the pids do not match): the placer then stays cautious.
    """
    used: dict[int, int] = {}
    for gpu in snapshot.get("gpus") or ():
        for process in gpu.get("processes") or ():
            if process["job_id"] is not None and process["used_memory"] is not None:
                used[process["job_id"]] = used.get(process["job_id"], 0) + process["used_memory"]
    return used


def cpu_load() -> dict:
    """The machine's processors and RAM, published beside the GPUs so that a panel has real
    numbers on a CPU-only server (where the jobs run on these). Non-blocking: the CPU share is
    measured since the previous call, so the daemon calls it once per tick and keeps it."""
    memory = psutil.virtual_memory()
    return {"util_percent": psutil.cpu_percent(interval=None), "count": psutil.cpu_count(),
            "load_1m": psutil.getloadavg()[0], "memory_used": int(memory.total - memory.available),
            "memory_total": int(memory.total)}


def _or_na(value: Any, template: str = "{}") -> str:
    return "N/A" if value is None else template.format(value)


def _pair(part: float | None, whole: float | None, template: str, unit: str) -> str:
    """A part of a whole, like "3.1/80.0 GiB"; "N/A" alone when neither number is known."""
    if part is None and whole is None:
        return "N/A"
    return f"{_or_na(part, template)}/{_or_na(whole, template)} {unit}"


def _gib(value: int | None) -> float | None:
    return None if value is None else value / _GIB


def format_gpus(snapshot: dict) -> str:
    """`mistudio gpu` for a person: two lines per GPU, "N/A" for what NVML could not say."""
    if not snapshot["available"]:
        return f"No GPU: {snapshot['reason'] or 'unknown reason'}; jobs run on the CPU."
    lines = [f"NVIDIA driver {_or_na(snapshot['driver'])}"]
    for gpu in snapshot["gpus"]:
        memory = _pair(_gib(gpu["memory_used"]), _gib(gpu["memory_total"]), "{:.1f}", "GiB")
        power = _pair(gpu["power_w"], gpu["power_limit_w"], "{:.0f}", "W")
        lines.append(
            f"GPU {gpu['index']}  {_or_na(gpu['name'])}  util {_or_na(gpu['util_percent'], '{}%')}"
            f"  mem {memory}  temp {_or_na(gpu['temperature_c'], '{}C')}  power {power}"
            f"  fan {_or_na(gpu['fan_percent'], '{}%')}"
        )
        lines.append(f"  processes: {_format_processes(gpu['processes'])}")
    return "\n".join(lines)


def _format_processes(processes: list[dict] | None) -> str:
    if processes is None:
        return "N/A"
    if not processes:
        return "none"
    return ", ".join(
        f"pid {p['pid']}"
        + ("" if p["job_id"] is None else f" (job {p['job_id']})")
        + f" {_or_na(_gib(p['used_memory']), '{:.1f} GiB')}"
        for p in processes
    )
