"""The TUI's cache, link and formatting, on small hand-checked cases (no terminal, no daemon:
the link talks to a fake one)."""

from __future__ import annotations

import asyncio

import pytest
from textual.app import App
from textual.widgets import Log, Static

from mistudio_core import units
from mistudiod.client import Event
from tui import format
from tui.app import MistudioApp
from tui.link import METRICS_PAGE, DaemonLink
from tui.screens.new_job import FIELDS, INPUTS, SELECTS, preflight_verdict
from tui.state import DaemonState, MetricSeries
from tui.widgets.gpu_panel import GpuPanel
from tui.widgets.jobs_table import short_hook
from tui.widgets.metric_chart import MAX_POINTS, log_ticks, step_ticks, thinned
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
    assert units.parse_count(text) == value


def test_durations_sizes_and_eta():
    assert [units.duration(s) for s in (None, 42, 425, 11_520, 180_000)] == [
        "-", "42s", "7m05s", "3h12m", "2d02h"]
    assert units.size(None) == "N/A" and units.size(3 * 2**30) == "3.0 GiB"
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
    split = _report(False, None)
    split["recommended_split"] = "4bit"
    split["estimates"][1]["split"] = {"shares": [{}, {}], "recommended_batch_tokens": 4096}
    text, fits = preflight_verdict(split, "auto")
    assert fits and text == ("fits split over 2 GPUs with 4-bit: needs 8.0 GiB, batch up to "
                             "4096 tokens")


def test_the_tokens_field_rejects_what_is_not_a_finite_count_without_raising():
    (validator,) = INPUTS["tokens"][3]
    for text in ("inf", "-inf", "nan", "1e400", "-1e400", "0", "-5", "1.5", "abc", "", "1e14"):
        assert not validator.validate(text).is_valid, text
    for text in ("2M", "500k", "1e8", "10_000", "1"):
        assert validator.validate(text).is_valid, text


def test_the_form_takes_its_ranges_defaults_and_choices_from_the_daemons_schema():
    (k,) = INPUTS["k"][3]
    assert (k.minimum, k.maximum) == (FIELDS["k"].min, FIELDS["k"].max)
    assert INPUTS["k"][2] == str(FIELDS["k"].default)
    assert units.parse_count(INPUTS["tokens"][2]) == FIELDS["tokens"].default
    assert SELECTS["arch"][1:] == (FIELDS["arch"].choices, FIELDS["arch"].default)
    assert SELECTS["quantization"][1] == FIELDS["quantization"].choices
    (hook,) = INPUTS["hook"][3]
    assert hook.validate("layers.6.resid_post").is_valid
    assert not hook.validate("layers.6.resid_mid").is_valid
    assert not hook.validate("blocks.6").is_valid


def test_names_read_by_their_last_part():
    assert format.last_part("runs/pythia-l6/") == "pythia-l6"
    assert format.last_part(None) == "-" and format.last_part("/") == "-"
    assert format.model_name({"params": {"model": "EleutherAI/pythia-160m"}}) == "pythia-160m"


def test_thinning_keeps_the_newest_point():
    assert thinned(5) == [0, 1, 2, 3, 4] and thinned(0) == []
    kept = thinned(2 * MAX_POINTS + 1)
    assert kept[-1] == 2 * MAX_POINTS and kept[:3] == [0, 2, 4]


def _state() -> DaemonState:
    return DaemonState(App())


def test_progress_after_a_resume_goes_by_the_new_points_and_a_new_attempt_drops_the_series():
    state = _state()
    job = {"id": 7, "state": "running", "attempt": 1, "step": 0, "total_steps": 1000}
    state.replace_jobs([job])
    state.apply_metrics(7, [{"step": s, "loss": 1.0} for s in (100, 200, 300)])
    assert state.jobs[7]["step"] == 300 and state.jobs[7]["progress"] == pytest.approx(0.3)
    # a new attempt, resumed from its checkpoint at step 200: the cached series goes
    assert state.apply_job({**job, "attempt": 2, "step": 200, "progress": 0.2})
    assert len(state.series(7)) == 0
    state.apply_metrics(7, [{"step": s, "loss": 1.0} for s in (100, 200, 300)], live=False)
    assert state.jobs[7]["step"] == 200  # fetched history does not move progress
    state.apply_metrics(7, [{"step": 225, "loss": 0.9}])
    assert state.jobs[7]["step"] == 225 and state.jobs[7]["last_metrics"]["step"] == 225
    assert state.jobs[7]["progress"] == pytest.approx(0.225)
    assert not state.apply_job({**job, "attempt": 2, "step": 250})


def test_log_entries_merge_by_id_in_order():
    state = _state()
    state.apply_logs(1, [{"id": 5, "message": "e"}, {"id": 6, "message": "f"}])
    state.apply_logs(1, [{"id": 6, "message": "f"}])  # streamed and fetched: kept once
    state.apply_logs(1, [{"id": i, "message": str(i)} for i in range(1, 8)])
    assert [entry["id"] for entry in state.logs[1]] == [1, 2, 3, 4, 5, 6, 7]
    assert state.last_log_id(1) == 7


# ----- the link, against a fake daemon ---------------------------------------------------------


class FakeDaemon:
    """Answers the link's requests from fixed jobs, points and logs, and hands out events."""

    def __init__(self, jobs: list[dict], points: dict | None = None, logs: dict | None = None,
                 events: list[Event] = ()) -> None:
        self.jobs, self.points, self.logs = jobs, points or {}, logs or {}
        self.events = list(events)
        self.requests: list[tuple[str, dict]] = []

    async def request(self, msg_type: str, content: dict | None = None, **_) -> dict:
        content = content or {}
        self.requests.append((msg_type, content))
        if msg_type == "daemon.status":
            return {"pid": 1, "version": "test", "gpus": {"available": False}, "jobs": {}}
        if msg_type == "gpu.status":
            return {"available": False, "reason": "none here", "gpus": []}
        if msg_type == "job.list":
            return {"jobs": self.jobs}
        if msg_type == "job.metrics":
            points = [p for p in self.points.get(content["id"], [])
                      if p["step"] > content["since_step"]]
            return {"points": points[:content["limit"]]}
        if msg_type == "job.logs":
            entries = [e for e in self.logs.get(content["id"], []) if e["id"] > content["since"]]
            return {"logs": entries[:content["limit"]]}
        raise AssertionError(f"unexpected request {msg_type}")

    async def next_event(self, timeout: float | None = None) -> Event | None:
        return self.events.pop(0) if self.events else None

    def asked(self, msg_type: str) -> list[dict]:
        return [content for kind, content in self.requests if kind == msg_type]


def _event(topic: str, content: dict, *, resync: bool = False) -> Event:
    return Event(topic=topic, content=content, seq=0, daemon="d", resync=resync)


def _job(job_id: int, state: str, attempt: int = 1) -> dict:
    return {"id": job_id, "kind": "train", "state": state, "attempt": attempt, "step": 0,
            "total_steps": 100, "params": {}}


def _link(daemon: FakeDaemon) -> DaemonLink:
    link = DaemonLink(_state())
    link.client = daemon
    return link


def test_the_link_resyncs_on_the_first_event_after_a_reconnect_even_without_a_gap():
    daemon = FakeDaemon([_job(1, "running")], events=[
        _event("daemon.status", {"pid": 1}), _event("daemon.status", {"pid": 1})])
    link = _link(daemon)
    link.state.set_connection(False, "disconnected (the daemon stopped answering), retrying")
    asyncio.run(link._follow())
    assert link.resyncs == 1 and link.state.connection.connected


def test_the_link_pages_history_and_keeps_logs_of_watched_jobs_only():
    points = [{"step": s, "loss": 1.0} for s in range(25_000)]
    logs = [{"id": i, "at": 0.0, "level": "info", "message": str(i)} for i in range(1, 2501)]
    daemon = FakeDaemon([_job(1, "running"), _job(2, "running")], {1: points}, {1: logs})
    link = _link(daemon)
    link.state.set_connection(True, "connected")
    link.state.replace_jobs(daemon.jobs)

    async def scenario():
        # the log's tail streamed in before the screen opened: the start is fetched all the same
        link.state.logs[1] = [logs[-1]]
        await link.watch_job(1)
        await link.watch_job(1)  # a second screen on the same job
        link.unwatch_job(1)
        daemon.events = [_event("job.2.log", {"job_id": 2, **logs[0]}),
                         _event("job.1.log", {"job_id": 1, "id": 2501, "at": 0.0,
                                              "level": "info", "message": "new"})]
        await link._apply(daemon.events.pop(0))
        await link._apply(daemon.events.pop(0))

    asyncio.run(scenario())
    assert len(link.state.series(1)) == 25_000
    # pages until a short one; the second screen asks only for what came since
    assert [c["since_step"] for c in daemon.asked("job.metrics")] == [-1, 9_999, 19_999, 24_999]
    assert [c["since"] for c in daemon.asked("job.logs")] == [0, 1000, 2000, 2500]
    assert [e["id"] for e in link.state.logs[1]] == list(range(1, 2502))
    assert 2 not in link.state.logs  # nobody watches job 2
    link.unwatch_job(1)
    assert 1 not in link.watched and 1 not in link.state.logs


def test_a_resync_fetches_the_latest_finished_jobs_and_a_new_attempt_refetches_its_series():
    jobs = [_job(i, "succeeded") for i in range(1, 7)] + [_job(7, "queued")]
    daemon = FakeDaemon(jobs, {i: [{"step": 1, "loss": 0.5}] for i in range(1, 8)})
    link = _link(daemon)
    asyncio.run(link._resync())
    assert sorted(c["id"] for c in daemon.asked("job.metrics")) == [3, 4, 5, 6]
    assert len(link.state.series(6)) == 1 and len(link.state.series(2)) == 0

    daemon.requests.clear()
    link.state.apply_metrics(6, [{"step": 5, "loss": 0.4}])
    asyncio.run(link._apply(_event("job.6.state", {"job": _job(6, "running", attempt=2)})))
    assert daemon.asked("job.metrics") == [{"id": 6, "since_step": -1, "limit": METRICS_PAGE}]
    assert link.state.series(6).steps == [1]


def test_a_job_opened_twice_is_one_screen_and_the_palette_lists_each_command_once():
    async def scenario():
        app = MistudioApp(connect=False)
        async with app.run_test(size=(80, 24)) as pilot:
            notice = app.screen.query_one(GpuPanel).query_one(".gpu-notice", Static)
            assert str(notice.render()).startswith("Waiting for the daemon")
            app.state.apply_status({"gpus": {"available": False, "reason": "no NVML"},
                                    "cpu": {"util_percent": 5.0, "count": 2}})
            await pilot.pause()
            assert str(notice.render()).startswith("No GPU: no NVML")
            app.state.replace_jobs([_job(1, "succeeded"), _job(2, "running")])
            app.open_job(1)
            await pilot.pause()
            depth = len(app.screen_stack)
            app.open_job(1)  # the one shown: nothing happens
            await pilot.pause()
            assert len(app.screen_stack) == depth and app.screen.job_id == 1
            app.open_job(2)  # another job's screen replaces it
            await pilot.pause()
            assert len(app.screen_stack) == depth and app.screen.job_id == 2
            assert list(app.link.watched) == [2]
            titles = [command.title for command in app.get_system_commands(app.screen)]
            assert titles.count("Quit") == 1 and titles.count("Theme") == 1
            assert "Open train job 1 (succeeded)" in titles
            assert "Cancel train job 2 (running)" in titles
            assert "Cancel train job 1 (succeeded)" not in titles

    asyncio.run(scenario())


def test_the_job_log_is_rewritten_when_its_beginning_arrives_after_its_tail():
    def entry(i: int) -> dict:
        return {"id": i, "at": 0.0, "level": "info", "message": f"line {i}"}

    async def scenario():
        app = MistudioApp(connect=False)
        async with app.run_test(size=(80, 24)) as pilot:
            app.state.replace_jobs([_job(1, "running")])
            app.state.apply_logs(1, [entry(5), entry(6)])
            app.open_job(1)
            await pilot.pause()
            log = app.screen.query_one("#job-log", Log)
            assert [line[-6:] for line in log.lines] == ["line 5", "line 6"]
            app.state.apply_logs(1, [entry(i) for i in range(1, 8)])
            await pilot.pause()
            assert [line[-6:] for line in log.lines] == [f"line {i}" for i in range(1, 8)]
            app.state.apply_logs(1, [entry(8)])
            await pilot.pause()
            assert len(log.lines) == 8 and log.lines[-1].endswith("line 8")

    asyncio.run(scenario())
