"""The TUI's cache and formatting, on small hand-checked cases (no terminal, no daemon)."""

from __future__ import annotations

import pytest

from tui import format
from tui.screens.new_job import preflight_verdict
from tui.state import MetricSeries
from tui.widgets.jobs_table import short_hook
from tui.widgets.metric_chart import log_ticks, step_ticks
from tui.widgets.percent_history import history_line


def test_a_repeated_step_replaces_its_point_and_late_points_slot_in_order():
    series = MetricSeries()
    for step, loss in ((25, 0.9), (50, 0.7), (75, 0.6)):
        series.add({"step": step, "loss": loss})
    series.add({"step": 50, "loss": 0.65})  # a resumed run reports step 50 again
    series.add({"step": 60, "loss": 0.62})  # an event that arrived late
    assert series.steps == [25, 50, 60, 75]
    assert series.values("loss") == ([25, 50, 60, 75], [0.9, 0.65, 0.62, 0.6])
    series.add({"step": 100, "l0": 31.0})  # a point without this metric is skipped
    assert series.values("loss")[0] == [25, 50, 60, 75] and series.last_step == 100


@pytest.mark.parametrize(("text", "value"), [
    ("4096", 4096), ("1_000_000", 10**6), ("2.5e6", 2_500_000), ("10k", 10_000),
    ("2M", 2_000_000), ("1B", 10**9), (" 3m ", 3_000_000), ("1.5", None), ("abc", None),
    ("", None), ("M", None)])
def test_counts_as_people_type_them(text, value):
    assert format.parse_count(text) == value


def test_durations_sizes_and_eta():
    assert [format.duration(s) for s in (None, 42, 425, 11_520, 180_000)] == [
        "-", "42s", "7m05s", "3h12m", "2d02h"]
    assert format.size(None) == "N/A" and format.size(3 * 2**30) == "3.0 GiB"
    job = {"state": "running", "elapsed_s": 100.0, "progress": 0.25}
    assert format.eta(job) == pytest.approx(300.0)
    assert format.eta({**job, "progress": 0.0}) is None
    assert format.eta({**job, "state": "succeeded"}) is None


def test_meter_and_history_use_a_fixed_scale():
    assert str(format.meter(0.5, 10)) == "█████░░░░░"
    assert str(format.meter(None, 4)) == "N/A "
    # A flat 2% stays a low line (a self-scaled sparkline would draw it as a wall).
    assert str(history_line([2.0] * 5, 8)) == "   " + "▁" * 5
    assert str(history_line([0, 50, 100], 3)) == "▁▄█"


def test_chart_ticks_and_short_hooks():
    ticks, labels = log_ticks(-2.0, 0.0, count=3)
    assert ticks == [-2.0, -1.0, 0.0] and labels == ["0.01", "0.1", "1"]
    assert step_ticks(25, 2050, count=3) == ([25, 1038, 2050], ["25", "1.04K", "2.05K"])
    assert short_hook("layers.6.resid_post") == "L6 resid_post"
    assert short_hook("blocks.6") == "blocks.6" and short_hook(None) == "-"


def _report(fits_4bit: bool, recommended: str | None) -> dict:
    def estimate(quantization, fits, total):
        return {"quantization": quantization, "fits": fits, "total_bytes": total,
                "recommended_batch_tokens": 65536 if fits else None}

    return {"device": {"name": "cuda:0", "free_bytes": 10 * 2**30},
            "estimates": [estimate("none", False, 30 * 2**30),
                          estimate("4bit", fits_4bit, 8 * 2**30)],
            "recommended_quantization": recommended}


def test_the_preflight_verdict_reads_as_a_sentence():
    text, fits = preflight_verdict(_report(True, "4bit"), "auto")
    assert fits and text == ("fits on GPU 0 with 4-bit: needs 8.0 GiB of 10.0 GiB free, batch "
                             "up to 65536 tokens")
    text, fits = preflight_verdict(_report(True, "4bit"), "none")
    assert not fits and text.startswith("does not fit on GPU 0 with no quantization")
    assert text.endswith("; 4-bit fits")
    text, fits = preflight_verdict(_report(False, None), "auto")
    assert not fits and "in any quantization" in text
