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

from tui import format
from tui.state import DaemonState, GpuHistory
from tui.widgets.percent_history import PercentHistory

BAR_WIDTH = 12


class DeviceCard(Horizontal):
    """One device: two lines of figures on the left, util and memory histories on the right."""

    def __init__(self, key: str) -> None:
        super().__init__(classes="device-card")
        self.key = key
        self.latest: tuple[Text, GpuHistory] | None = None
        self.composed = False

    def compose(self) -> ComposeResult:
        yield Static(classes="device-figures")
        with Vertical(classes="device-history"):
            yield PercentHistory(classes="util-history")
            yield PercentHistory(classes="memory-history")

    def on_mount(self) -> None:
        self.composed = True
        if self.latest is not None:
            self.show(*self.latest)

    def show(self, lines: Text, history: GpuHistory) -> None:
        """Draw a reading; one that arrives before the card is composed is drawn on mount."""
        self.latest = (lines, history)
        if self.composed:
            self.query_one(".device-figures", Static).update(lines)
            self.query_one(".util-history", PercentHistory).show(history.util)
            self.query_one(".memory-history", PercentHistory).show(history.memory)


class GpuPanel(Widget):
    def __init__(self, state: DaemonState, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = state
        self.border_title = "GPUs"

    def compose(self) -> ComposeResult:
        yield Static(classes="gpu-notice")

    def on_mount(self) -> None:
        self.state.gpus_changed.subscribe(self, self._redraw)
        self.state.status_changed.subscribe(self, self._redraw)
        self._redraw()

    def _redraw(self, _: object = None) -> None:
        state = self.state
        notice = self.query_one(".gpu-notice", Static)
        if state.gpus:
            notice.display = False
            devices = {key: (gpu_lines(history.reading), history)
                       for key, history in sorted(state.gpus.items(),
                                                  key=lambda item: item[1].reading["index"])}
        else:
            notice.display = True
            reason = state.gpu_reason or "no NVIDIA GPU found"
            notice.update(f"No GPU: {reason}. Jobs run on the CPU.")
            devices = {"cpu": (cpu_lines(state.cpu.reading), state.cpu)} if state.cpu else {}
        cards = {card.key: card for card in self.query(DeviceCard)}
        for key in cards.keys() - devices.keys():
            cards.pop(key).remove()
        for key, (lines, history) in devices.items():
            if key not in cards:
                cards[key] = DeviceCard(key)
                self.mount(cards[key])
            cards[key].show(lines, history)


def gpu_lines(gpu: dict) -> Text:
    """`0 NVIDIA H200   util ████░░ 63%  52C  310/700W`
    `                  mem  ███░░ 40.1/139.8 GiB  jobs 7, 9`"""
    jobs = sorted({p["job_id"] for p in gpu.get("processes") or [] if p.get("job_id")})
    return device_lines(
        f"{gpu['index']} {gpu.get('name') or format.NA}", gpu.get("util_percent"),
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
        f" {format.size(used)}/{format.size(total)}{memory_note}",
    )
