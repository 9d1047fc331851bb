"""How numbers read on screen: sizes, durations, rates and the "N/A" of a value nobody knows."""

from __future__ import annotations

import time

from rich.text import Text

NA = "N/A"


def size(n_bytes: float | None) -> str:
    if n_bytes is None:
        return NA
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} B"


def duration(seconds: float | None) -> str:
    """`42s`, `7m05s`, `3h12m`, `2d04h`: at most two units, as a table column needs."""
    if seconds is None or seconds < 0:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def count(n: float | None) -> str:
    """`950`, `12.3K`, `300K`, `4.1M`, `2B`."""
    if n is None:
        return NA
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"


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


def model_name(job: dict) -> str:
    """The model as a person calls it: the last part of a path or hub id."""
    model = (job.get("params") or {}).get("model", "")
    return model.rstrip("/").rsplit("/", 1)[-1] or "-"


def meter(fraction: float | None, width: int) -> Text:
    """A bar like nvitop's, `███████░░░░░`, green, then yellow past 60%, red past 85%."""
    if fraction is None:
        return Text(NA.ljust(width), style="dim")
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    style = "red" if fraction > 0.85 else "yellow" if fraction > 0.6 else "green"
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))


def parse_count(text: str) -> int | None:
    """A count as people type it: `4096`, `1_000_000`, `2.5e6`, `10k`, `1M`, `2B`; None if it is
    not one."""
    text = text.strip().replace("_", "").replace(",", "")
    multiplier = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(text[-1:].lower(), 1)
    if multiplier != 1:
        text = text[:-1]
    try:
        value = float(text) * multiplier
    except ValueError:
        return None
    return int(value) if value == int(value) else None
