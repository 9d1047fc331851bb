"""The GPU panel, in the spirit of nvitop: per GPU its name, utilization and memory with bars and
histories of the last two minutes, temperature, power and the jobs on it.

Every number NVML could not give reads "N/A". Without NVML or without a GPU the panel says why
in plain words and shows the machine's CPU and RAM instead, since that is where jobs then run.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Static

from mistudio_core import units
from tui import format
from tui.state import DaemonState, GpuHistory
from tui.widgets import in_sight
from tui.widgets.percent_history import PercentHistory

BAR_WIDTH = 12


class DeviceCard(Horizontal):
    """One device: two lines of figures on the left, util and memory histories on the right."""

    def __init__(self, key: str, lines: Text, history: GpuHistory) -> None:
        super().__init__(classes="device-card")
        self.key = key
        self.lines, self.history = lines, history

    def compose(self) -> ComposeResult:
        yield Static(self.lines, classes="device-figures")
        with Vertical(classes="device-history"):
            yield PercentHistory(self.history.util, classes="util-history")
            yield PercentHistory(self.history.memory, classes="memory-history")

    def show(self, lines: Text, history: GpuHistory) -> None:
        """Draw a reading (one that comes before the card is mounted is drawn by compose)."""
        self.lines, self.history = lines, history
        if self.is_mounted:
            self.query_one(".device-figures", Static).update(lines)
            self.query_one(".util-history", PercentHistory).show(history.util)
            self.query_one(".memory-history", PercentHistory).show(history.memory)


class GpuPanel(Widget):
    def __init__(self, state: DaemonState, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = state
        self.border_title = "GPUs"
        self.cards: dict[str, DeviceCard] = {}
        self._stale = False  # something changed while the panel was out of sight

    def compose(self) -> ComposeResult:
        yield Static(classes="gpu-notice")

    def on_mount(self) -> None:
        self.state.gpus_changed.subscribe(self, self._gpus_changed)
        self.state.status_changed.subscribe(self, self._status_changed)
        self.redraw()

    def _gpus_changed(self, uuid: str | None) -> None:
        """A reading of one GPU redraws its card alone; a new list redraws the panel."""
        if not in_sight(self):
            self._stale = True
        elif uuid in self.cards and uuid in self.state.gpus:
            history = self.state.gpus[uuid]
            self.cards[uuid].show(gpu_lines(history.reading), history)
        else:
            self.redraw()

    def _status_changed(self, _: dict) -> None:
        """The status carries the CPU's reading and why there is no GPU: drawn only without
        GPUs."""
        if not self.state.gpus:
            if in_sight(self):
                self.redraw()
            else:
                self._stale = True

    def catch_up(self) -> None:
        """Draw what changed while out of sight."""
        if self._stale:
            self.redraw()

    def redraw(self) -> None:
        self._stale = False
        state = self.state
        notice = self.query_one(".gpu-notice", Static)
        devices: dict[str, tuple[Text, GpuHistory]] = {}
        if state.gpus:
            notice.display = False
            devices = {key: (gpu_lines(history.reading), history)
                       for key, history in sorted(state.gpus.items(),
                                                  key=lambda item: item[1].reading["index"])}
        elif state.status is None:
            notice.display = True
            notice.update("Waiting for the daemon...")
        else:
            notice.display = True
            reason = state.gpu_reason or "no NVIDIA GPU found"
            notice.update(f"No GPU: {reason}. Jobs run on the CPU.")
            if state.cpu:
                devices = {"cpu": (cpu_lines(state.cpu.reading), state.cpu)}
        for key in self.cards.keys() - devices.keys():
            self.cards.pop(key).remove()
        for key, (lines, history) in devices.items():
            if key in self.cards:
                self.cards[key].show(lines, history)
            else:
                self.cards[key] = DeviceCard(key, lines, history)
                self.mount(self.cards[key])


def gpu_lines(gpu: dict) -> Text:
    """`0 NVIDIA H200   util ████░░ 63%  52C  310/700W`
    `                  mem  ███░░ 40.1/139.8 GiB  jobs 7, 9`"""
    jobs = sorted({p["job_id"] for p in gpu.get("processes") or [] if p.get("job_id")})
    return device_lines(
        f"{gpu['index']} {gpu.get('name') or units.NA}", gpu.get("util_percent"),
        f"{format.number(gpu.get('temperature_c'), '{}C')}  "
        f"{format.number(gpu.get('power_w'), '{:.0f}')}/"
        f"{format.number(gpu.get('power_limit_w'), '{:.0f}')}W",
        "mem", gpu.get("memory_used"), gpu.get("memory_total"),
        f"  jobs {', '.join(map(str, jobs))}" if jobs else "")


def cpu_lines(cpu: dict) -> Text:
    """The CPU-only machine: `CPU (16 cores)  util ███░ 23%  load 1.2` and its RAM."""
    return device_lines(f"CPU ({cpu.get('count')} cores)", cpu.get("util_percent"),
                        f"load {format.number(cpu.get('load_1m'), '{:.1f}')}",
                        "RAM", cpu.get("memory_used"), cpu.get("memory_total"))


def device_lines(title: str, util: float | None, util_note: str, memory_name: str,
                 used: int | None, total: int | None, memory_note: str = "") -> Text:
    """Two lines, nvitop-like: the device and its utilization, then its memory."""
    return Text.assemble(
        (f"{title[:18]:<18} ", "bold"),
        "util ", format.meter(None if util is None else util / 100, BAR_WIDTH),
        f" {format.number(util, '{:.0f}%'):>4}  {util_note}\n",
        " " * 19, f"{memory_name:<5}",
        format.meter(None if used is None or not total else used / total, BAR_WIDTH),
        f" {units.size(used)}/{units.size(total)}{memory_note}",
    )
