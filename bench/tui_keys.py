"""Key-press latency of the TUI while four training jobs stream live updates (issue 4).

A key press is timed from the moment it enters the app's message queue (where a terminal's key
lands) until the first frame drawn after its effect is in place (the cursor on the next row, the
log shown or hidden): the queueing behind update work, the handling and the redraw, every
widget's render included. The app runs headless at 80x24, as `run_test` runs it, against a
real daemon. (Pilot's own `press` is no clock: it sleeps until the process looks idle.)

Baseline, in the same run: the same app showing the same thing with nothing streaming (the
link idle, the state copied from the streaming app as it was at the end of its phase: the jobs,
their curves and logs, the status, the GPU and CPU readings with their histories). Phases, each
on the dashboard (moving the cursor in the jobs table) and on a job's detail (showing and hiding
its log, which re-lays out the four charts), measured one after the other (not alternated):
  streaming  four training jobs running on the daemon, their metrics, logs, GPU/CPU readings
             and status arriving at the rate they really come (reported, per job)
  still      the baseline

    python bench/tui_keys.py [--presses 200] [--model demo] [--json]

Target: streaming costs key presses less than 2x the still latency at the median, and p95 stays
under 100 ms (an absolute target), about where a person starts to notice a delay. The jobs train
on the demo model and corpus, so the demo model is built first if it is not cached yet (once,
several minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import emit, environment, log, table, verdict
from daemon_latency import prepare_demo_model, start_daemon, submit_training_jobs
from textual import events

from tui.app import MistudioApp
from tui.state import DaemonState
from tui.widgets.jobs_table import JobsTable

N_JOBS = 4
# small steps, so that each job reports metrics every second or so
JOB_PARAMS = {"batch_tokens": 256, "context_size": 64, "k": 8}


class FrameClock:
    """When the app put frames on the terminal: `_display` is where a compositor update (every
    widget's render included) is handed to the driver, also when headless."""

    def __init__(self, app: MistudioApp) -> None:
        self.frames: list[float] = []
        display = app._display

        def timed_display(screen, renderable) -> None:
            display(screen, renderable)
            if renderable is not None:
                self.frames.append(time.perf_counter())

        app._display = timed_display

    def first_after(self, moment: float) -> float | None:
        index = bisect.bisect_right(self.frames, moment)
        return self.frames[index] if index < len(self.frames) else None


async def key_latency(app: MistudioApp, clock: FrameClock, key: str, effect) -> float:
    """From the key entering the app's queue, as a terminal's would, to the first frame drawn
    after the key took effect (`effect()` true; it is polled every millisecond, and the frame
    counted is the first after the last poll that still saw no effect)."""
    start = before_effect = time.perf_counter()
    app.post_message(events.Key(key, None))
    while not effect():
        before_effect = time.perf_counter()
        await asyncio.sleep(0.001)
    while (frame := clock.first_after(before_effect)) is None:
        await asyncio.sleep(0.001)
    return frame - start


async def time_presses(app: MistudioApp, clock: FrameClock, presses: int,
                       screen: str) -> list[float]:
    times = []
    for i in range(presses):
        if screen == "dashboard":
            table = app.screen.query_one(JobsTable)
            key, row = ("down", 1) if i % 2 == 0 else ("up", -1)
            target = table.cursor_row + row

            def effect(table=table, target=target):
                return table.cursor_row == target
        else:
            log = app.screen.query_one("#job-log")
            key, shown = "l", log.display

            def effect(log=log, shown=shown):
                return log.display != shown
        times.append(await key_latency(app, clock, key, effect))
        await asyncio.sleep(0.05)  # a fast typist, not a flood
    return times


async def measure(app: MistudioApp, presses: int, job_id: int, wait) -> dict:
    async with app.run_test(size=(80, 24)) as pilot:
        clock = FrameClock(app)
        await wait(app, pilot)
        app.screen.query_one(JobsTable).focus()
        app.screen.query_one(JobsTable).move_cursor(row=0)
        points_before = sum(len(series) for series in app.state.metrics.values())
        start = time.perf_counter()
        dashboard = await time_presses(app, clock, presses, "dashboard")
        app.open_job(job_id)
        await pilot.pause(0.5)
        detail = await time_presses(app, clock, presses, "detail")
        seconds = time.perf_counter() - start
        points = sum(len(series) for series in app.state.metrics.values()) - points_before
    return {"dashboard": dashboard, "detail": detail, "points_per_job_s":
            points / seconds / N_JOBS}


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"p50_ms": 1e3 * statistics.median(ordered),
            "p95_ms": 1e3 * ordered[int(0.95 * (len(ordered) - 1))],
            "max_ms": 1e3 * ordered[-1]}


def copy_state(source: DaemonState, target: DaemonState) -> None:
    """Everything the source app draws from, frozen into the target: the connection, the status
    and the CPU's history, the GPU readings and their histories, the jobs, curves and logs."""
    target.set_connection(True, source.connection.message)
    if source.status is not None:
        target.apply_status(source.status)
    target.apply_gpu_snapshot({"available": source.gpu_available, "reason": source.gpu_reason,
                               "gpus": [history.reading for history in source.gpus.values()]})
    # the sparklines' histories, not just the last readings
    target.cpu = copy.deepcopy(source.cpu)
    target.gpus = copy.deepcopy(source.gpus)
    target.replace_jobs(list(source.jobs.values()))
    for job_id, series in source.metrics.items():
        target.apply_metrics(job_id, series.points)
    for job_id, entries in source.logs.items():
        target.apply_logs(job_id, entries)
    if target.status is not None:
        target.status_changed.publish(target.status)
    target.gpus_changed.publish(None)


async def run(args) -> dict:
    prepare_demo_model(args.json)
    root = Path(tempfile.mkdtemp(prefix="tui-keys-"))
    process, runtime = start_daemon(root, N_JOBS)
    try:
        ids = await submit_training_jobs(runtime, N_JOBS, args.model, root, **JOB_PARAMS)
        log(f"{N_JOBS} jobs training; measuring while they stream", args.json)

        async def connected(app, pilot):
            while not (app.state.connection.connected and len(app.state.running_jobs()) ==
                       N_JOBS and all(len(app.state.series(i)) for i in ids)):
                await pilot.pause(0.1)

        live = MistudioApp(runtime)
        streaming = await measure(live, args.presses, ids[0], connected)

        async def frozen(app, pilot):
            copy_state(live.state, app.state)
            await pilot.pause(0.5)

        log("measuring the still baseline", args.json)
        still = await measure(MistudioApp(runtime, connect=False), args.presses, ids[0], frozen)
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    return {"still": still, "streaming": streaming}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", type=int, default=200)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    rows, document = [], {"environment": environment(), "presses": args.presses,
                          "points_per_job_s": results["streaming"]["points_per_job_s"]}
    ok = True
    for screen in ("dashboard", "detail"):
        still = summary(results["still"][screen])
        live = summary(results["streaming"][screen])
        ratio = live["p50_ms"] / still["p50_ms"]
        passed = ratio < 2 and live["p95_ms"] < 100
        ok &= passed
        document[screen] = {"still": still, "streaming": live, "p50_ratio": ratio}
        rows.append([screen, f"{still['p50_ms']:.1f}", f"{still['p95_ms']:.1f}",
                     f"{live['p50_ms']:.1f}", f"{live['p95_ms']:.1f}", f"{live['max_ms']:.1f}",
                     f"{ratio:.2f}x", verdict(passed)])
    document["ok"] = ok
    text = table(["screen", "still p50 ms", "still p95", "streaming p50", "p95", "max",
                  "p50 ratio", "target"], rows)
    text += (f"\n\nmetric points per job per second while streaming: "
             f"{document['points_per_job_s']:.2f} ({N_JOBS} jobs)")
    emit(document, text, args.json)


if __name__ == "__main__":
    main()
