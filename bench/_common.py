"""Helpers shared by the benchmarks: noise-resistant timing, tables and JSON output.

The machines these run on are often shared, so the compute benchmarks (train_step, extract,
quality) trust no absolute time on its own: every figure of theirs that has a target is a ratio
against a baseline measured in the same process, with the candidates and the baseline run in
alternation (A B A B ..., the order rotated every round) and the median of the rounds taken. A
burst of load from another process then hits both sides of a round alike, and the median drops
the rounds it spoiled. The latency benchmarks (daemon_latency, tui_keys) have absolute targets as
well (see README.md).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# Make `python bench/x.py` work from a checkout without installing the package.
_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def synchronizer(device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


class Elapsed(float):
    """Returned by a candidate that times itself (seconds): `interleaved` records it instead of
    the whole call, e.g. the time to a first event, leaving out the wind-down after it."""


def interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    settle_s: float = 0.0,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate over `repeats` rounds; each round runs every
    candidate once, in an order rotated from round to round. `warmup` rounds are discarded. A
    candidate that returns an `Elapsed` is recorded at that time. Each call starts `settle_s`
    after the last one ended (for candidates in other processes: OpenMP's threads spin for a
    few ms after the last op, taking the cores another process needs)."""
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(settle_s)
            sync()
            start = time.perf_counter()
            result = candidates[name]()
            sync()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(float(result) if isinstance(result, Elapsed) else elapsed)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median of the per-round ratios: each round's two timings saw the same load."""
    return median([a / b for a, b in zip(numerator, denominator, strict=True) if b > 0])


def spread(values: Sequence[float]) -> float:
    """Relative spread (interquartile range / median), a rough noise indicator."""
    if len(values) < 4:
        return float("nan")
    q = statistics.quantiles(values, n=4)
    mid = median(values)
    return (q[2] - q[0]) / mid if mid else float("nan")


def environment() -> dict:
    """What the numbers depend on: versions, threads and how loaded the machine was."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def busy_note(env: dict) -> str | None:
    """A warning line when other processes kept the CPUs busy around the start of the run."""
    load, cpus = env.get("load_average_1m"), env.get("cpu_count") or 1
    if load is None or load < cpus - 0.5:
        return None
    return (f"note: the machine was busy (1-min load {load} on {cpus} CPUs); multi-threaded "
            "element-wise ops suffer most from that (threads wait for each other), so ratios "
            "are pessimistic; compare with --threads 1")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table, columns padded, numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def line(values: Sequence[str], raw: Sequence[object] | None = None) -> str:
        out = []
        for i, value in enumerate(values):
            numeric = raw is not None and isinstance(raw[i], int | float)
            out.append(value.rjust(widths[i]) if numeric else value.ljust(widths[i]))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(c, r) for c, r in zip(cells, rows, strict=True))])


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.3f}"
        return f"{value:.4f}"
    return str(value)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def emit(document: dict, text: str, as_json: bool) -> None:
    """Print the readable report (with a note if the machine was busy), or with --json only the
    JSON document (on stdout)."""
    if as_json:
        json.dump(document, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    note = busy_note(document["environment"])
    print(text if note is None else f"{text}\n\n{note}")


def log(message: str, quiet: bool = False) -> None:
    """Progress lines go to stderr so that --json output stays one clean document."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def optional_module(name: str):
    """The module if it can be imported, else None (benchmarks never install anything)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None
