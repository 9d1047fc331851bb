"""How things read on the TUI's screens, beyond the shared units of `mistudio_core.units`
(sizes, counts, durations, "N/A"): a job's running time and ETA, names cut to their last part,
meters and plain numbers."""

from __future__ import annotations

import time

from rich.text import Text

from mistudio_core.units import NA


def number(value: float | None, template: str = "{:.4g}") -> str:
    return NA if value is None else template.format(value)


def elapsed(job: dict) -> float | None:
    """Seconds the job has run, still counting while it runs (from the local time the job was
    last read, not from comparing clocks with the daemon's machine)."""
    if job.get("elapsed_s") is None:
        return None
    if job["state"] != "running" or "received_at" not in job:
        return job["elapsed_s"]
    return job["elapsed_s"] + time.monotonic() - job["received_at"]


def eta(job: dict) -> float | None:
    """Time left at the pace so far; None until there is a pace to go by."""
    progress, spent = job.get("progress") or 0.0, elapsed(job)
    if job["state"] != "running" or not spent or not 0 < progress < 1:
        return None
    return spent * (1 - progress) / progress


def last_part(path: str | None) -> str:
    """The last part of a path or hub id (`runs/pythia-l6/` reads `pythia-l6`); `-` for none."""
    return (path or "").rstrip("/").rsplit("/", 1)[-1] or "-"


def model_name(job: dict) -> str:
    """The model as a person calls it: the last part of a path or hub id."""
    return last_part((job.get("params") or {}).get("model"))


def meter(fraction: float | None, width: int) -> Text:
    """A bar like nvitop's, `███████░░░░░`, green, then yellow past 60%, red past 85%."""
    if fraction is None:
        return Text(NA.ljust(width), style="dim")
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    style = "red" if fraction > 0.85 else "yellow" if fraction > 0.6 else "green"
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))
