"""Key-press latency of the TUI while four training jobs stream live updates (issue 4).

A key press is timed from the moment it enters the app's message queue (where a terminal's key
lands) until the first frame drawn after its effect is in place (the cursor on the next row, the
log shown or hidden): the queueing behind update work, the handling and the redraw, every
widget's render included. The app runs headless at 80x24, as `run_test` runs it, against a
real daemon. (Pilot's own `press` is no clock: it sleeps until the process looks idle.)

Baseline, in the same run: the same app showing the same jobs and curves with nothing streaming
(the link idle, the state filled from the daemon's own snapshot). Phases, each on the dashboard
(moving the cursor in the jobs table) and on a job's detail (showing and hiding its log, which
re-lays out the four charts):
  still      the baseline
  streaming  four training jobs running on the daemon, their metrics, logs, GPU/CPU readings
             and status arriving at the rate they really come (reported, per job)

    python bench/tui_keys.py [--presses 200] [--model demo] [--json]

Target: streaming costs key presses less than 2x the still latency at the median, and p95 stays
under 100 ms, about where a person starts to notice a delay.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import statistics
import tempfile
import time
from pathlib import Path

from _common import emit, environment, log, table, verdict
from daemon_latency import start_daemon
from textual import events

from mistudiod.client import Client
from tui.app import MistudioApp
from tui.widgets.jobs_table import JobsTable

N_JOBS = 4


async def submit_jobs(runtime: Path, model: str, root: Path) -> list[int]:
    """Four long jobs with small steps, so that each reports metrics every second or so."""
    async with Client(runtime, timeout=60) as client:
        ids = []
        for i in range(N_JOBS):
            reply = await client.request("job.submit", {"kind": "train", "params": {
                "model": model, "corpus": "demo", "hook": "layers.1.resid_post",
                "tokens": 10**9, "batch_tokens": 256, "context_size": 64, "expansion": 4,
                "k": 8, "out": str(root / f"sae-{i}"), "checkpoint_every": 10**6}})
            ids.append(reply["job"]["id"])
        deadline = time.time() + 600
        while time.time() < deadline:
            jobs = (await client.request("job.list", {"states": ["running"]}))["jobs"]
            if sum(1 for job in jobs if job["step"] > 0) >= N_JOBS:
                return ids
            await asyncio.sleep(1.0)
    raise SystemExit("the jobs did not reach training in time")


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


async def run(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="tui-keys-"))
    process, runtime = start_daemon(root, N_JOBS)
    try:
        ids = await submit_jobs(runtime, args.model, root)
        log(f"{N_JOBS} jobs training; measuring while they stream", args.json)

        async def connected(app, pilot):
            while not (app.state.connection.connected and len(app.state.running_jobs()) ==
                       N_JOBS and all(len(app.state.series(i)) for i in ids)):
                await pilot.pause(0.1)

        streaming = await measure(MistudioApp(runtime), args.presses, ids[0], connected)
        snapshot = MistudioApp(runtime)  # to copy the daemon's state into the still app

        async def copy_state(app, pilot):
            async with snapshot.run_test(size=(80, 24)) as other:
                await connected(snapshot, other)
            app.state.set_connection(True, snapshot.state.connection.message)
            app.state.apply_status(snapshot.state.status)
            app.state.replace_jobs(list(snapshot.state.jobs.values()))
            for job_id, series in snapshot.state.metrics.items():
                app.state.apply_metrics(job_id, series.points)
            await pilot.pause(0.5)

        log("measuring the still baseline", args.json)
        still = await measure(MistudioApp(runtime, connect=False), args.presses, ids[0],
                              copy_state)
    finally:
        process.terminate()
        process.wait(30)
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
