"""How quantities read for a person, shared by the CLI, the daemon's messages and the TUI.

Torch-free and dependency-free, so the terminal UI can use it on a laptop.
"""

from __future__ import annotations

NA = "N/A"  # a value nobody could read (NVML's NotSupported, a metric not reported yet)


def size(n_bytes: float | None) -> str:
    """`512 B`, `3.5 KiB`, `113.9 MiB`, `7.9 GiB`, `1.1 TiB`."""
    if n_bytes is None:
        return NA
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} B"


def count(n: float | None) -> str:
    """`950`, `12.3K`, `300K`, `4.27M`, `8.03B`: three significant digits."""
    if n is None:
        return NA
    n = float(f"{n:.3g}")  # round first, so 999,999 reads 1M, not 1e+03K
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:g}{suffix}"
    return f"{n:g}"


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


def parse_count(text: str) -> int | None:
    """A count as people type it: `4096`, `1_000_000`, `2.5e6`, `10k`, `1M`, `2B`; None if it
    is not a finite whole number."""
    text = text.strip().replace("_", "").replace(",", "")
    multiplier = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(text[-1:].lower(), 1)
    if multiplier != 1:
        text = text[:-1]
    try:
        value = float(text) * multiplier
        return int(value) if value == int(value) else None
    except (ValueError, OverflowError):  # not a number; inf or nan
        return None
