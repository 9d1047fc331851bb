"""The TUI against a real daemon: `App.run_test()` and Pilot drive it as a person would.

Each test starts `mistudiod` on temporary directories and the app on its runtime directory, then
waits for what a person would wait for on screen (a job in the table, points in a chart, the
status line). Covered: the dashboard's jobs and CPU/GPU panel, a job launched from the form (its
corpus uploaded from a local file) whose chart receives points, cancel with confirmation, the
daemon stopped and restarted under a running TUI, and a resync after a gap in the events.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from daemon_process import DaemonProcess
from textual.widgets import Input, Select, Static

from tui.app import MistudioApp
from tui.screens.confirm import ConfirmScreen
from tui.screens.dashboard import DashboardScreen
from tui.screens.job_detail import JobScreen
from tui.screens.new_job import NewJobScreen
from tui.widgets.gpu_panel import DeviceCard, GpuPanel
from tui.widgets.jobs_table import JobsTable
from tui.widgets.metric_chart import MetricChart
from tui.widgets.status_line import StatusLine

pytestmark = pytest.mark.slow
SIZE = (100, 36)


@pytest.fixture(scope="module")
def model_dir(make_tiny_model):
    return str(make_tiny_model("gpt2", n_layers=3))


@pytest.fixture
def daemon(tmp_path):
    process = DaemonProcess(tmp_path).start()
    yield process
    process.stop()


def long_job(model_dir, corpus, out) -> dict:
    """A job that runs for minutes unless cancelled."""
    return {"model": model_dir, "hook": "layers.1.resid_post", "corpus": str(corpus),
            "out": str(out), "tokens": 10**9, "batch_tokens": 256, "context_size": 32,
            "expansion": 2, "k": 4}


async def until(pilot, condition, timeout: float = 60.0, what: str = "the condition"):
    """Let the app run until `condition()` holds, as a person waits for the screen."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.1)


def text_of(widget: Static) -> str:
    return str(widget.render())


def test_the_dashboard_shows_the_jobs_and_the_device_panel(daemon, model_dir, tiny_corpus,
                                                           tmp_path):
    queued = daemon.request("job.submit", {"kind": "train", "params": long_job(
        model_dir, tiny_corpus, tmp_path / "a"), "priority": -1})["job"]

    async def scenario():
        app = MistudioApp(daemon.runtime_dir)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.state.connection.connected, what="the connection")
            assert isinstance(app.screen, DashboardScreen)
            table = app.screen.query_one(JobsTable)
            await until(pilot, lambda: table.row_count == 1, what="the job in the table")
            assert table.get_row_at(0)[0] == queued["id"]
            # Not needed any more: it would train for the rest of the test (still listed).
            await app.link.request("job.cancel", {"id": queued["id"]})
            assert "mistudiod" in text_of(app.screen.query_one(StatusLine))
            panel = app.screen.query_one(GpuPanel)
            await until(pilot, lambda: len(panel.query(DeviceCard)) >= 1, what="a device")
            notice = text_of(panel.query_one(".gpu-notice", Static))
            if app.state.gpu_available:
                assert len(panel.query(DeviceCard)) == len(app.state.gpus)
            else:  # CPU machines say so plainly and show the CPU and RAM instead
                assert notice.startswith("No GPU") and "CPU" in notice
                card = text_of(panel.query_one(DeviceCard).query_one(".device-figures"))
                assert "CPU (" in card and "RAM" in card

    asyncio.run(scenario())


def test_a_job_launched_from_the_form_streams_points_into_its_chart(daemon, model_dir,
                                                                    tiny_corpus):
    async def scenario():
        app = MistudioApp(daemon.runtime_dir)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.state.connection.connected, what="the connection")
            await pilot.press("n")
            form = app.screen
            assert isinstance(form, NewJobScreen)

            # A bad value is flagged as it is typed, and submitting is refused.
            form.query_one("#k", Input).value = "0"
            await pilot.pause()
            assert form.query_one("#k", Input).has_class("-invalid")
            await pilot.press("ctrl+s")
            assert isinstance(app.screen, NewJobScreen)

            # A layer the model does not have is caught once the model is known.
            form.query_one("#model", Input).value = model_dir
            form.query_one("#hook", Input).value = "layers.7.resid_post"
            await until(pilot, lambda: form.model_info is not None, what="the model's check")
            await until(pilot, lambda: "does not exist" in text_of(
                form.query_one("#form-error", Static)), what="the layer error")
            assert form.query_one("#hook", Input).has_class("-daemon-invalid")

            # The corpus is uploaded from a local path and then selected.
            form.query_one("#upload-path", Input).value = str(tiny_corpus)
            await pilot.press("ctrl+o")
            corpus = form.query_one("#corpus", Select)
            await until(pilot, lambda: corpus.value == tiny_corpus.name, what="the upload")

            for name, value in (("hook", "layers.1.resid_post"), ("k", "4"), ("expansion", "2"),
                                ("tokens", "32k"), ("context_size", "32"),
                                ("batch_tokens", "256"), ("out", "from-the-form")):
                form.query_one(f"#{name}", Input).value = value
            await until(pilot, lambda: "fits on" in text_of(form.query_one("#preflight")),
                        what="the memory preflight")
            await until(pilot, lambda: not form.invalid_fields(), what="a valid form")
            await pilot.press("ctrl+s")
            await until(pilot, lambda: isinstance(app.screen, JobScreen), what="the job screen")

            job_screen = app.screen
            job_id = job_screen.job_id
            loss = job_screen.query_one("#chart-loss", MetricChart)
            await until(pilot, lambda: loss.points_drawn >= 2, timeout=120,
                        what="points in the loss chart")
            await until(pilot, lambda: app.state.jobs[job_id]["state"] == "succeeded",
                        timeout=120, what="the job's end")
            await until(pilot, lambda: "SAE saved in" in text_of(
                job_screen.query_one("#job-result", Static)), what="the result summary")
            params = app.state.jobs[job_id]["params"]
            assert params["corpus"].endswith(tiny_corpus.name) and params["k"] == 4
            assert params["out"].endswith("runs/from-the-form")
            assert app.state.logs[job_id], "the log tail is empty"

    asyncio.run(scenario())


def test_a_job_is_cancelled_after_confirmation(daemon, model_dir, tiny_corpus, tmp_path):
    job = daemon.request("job.submit", {"kind": "train", "params": long_job(
        model_dir, tiny_corpus, tmp_path / "b")})["job"]
    daemon.wait_for_job(job["id"], ("running",))

    async def scenario():
        app = MistudioApp(daemon.runtime_dir)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.state.jobs.get(job["id"], {}).get("state")
                        == "running", what="the running job")
            app.screen.query_one(JobsTable).focus()
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, JobScreen), what="the job screen")
            await pilot.press("c")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")  # changed their mind: nothing happens
            await pilot.pause(0.5)
            assert app.state.jobs[job["id"]]["state"] == "running"
            audit = (await app.link.request("audit.list"))["entries"]
            assert not any(entry["action"] == "job.cancel" for entry in audit)
            await pilot.press("c")
            await pilot.press("y")
            await until(pilot, lambda: app.state.jobs[job["id"]]["state"] == "cancelled",
                        timeout=30, what="the cancel")

    asyncio.run(scenario())


def test_the_tui_survives_a_daemon_restart_and_resyncs(daemon, model_dir, tiny_corpus,
                                                       tmp_path):
    async def scenario():
        app = MistudioApp(daemon.runtime_dir)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.state.connection.connected, what="the connection")
            status = app.screen.query_one(StatusLine)
            first_pid = app.state.status["pid"]

            await asyncio.to_thread(daemon.stop)
            await until(pilot, lambda: not app.state.connection.connected, timeout=15,
                        what="the disconnect")
            assert "disconnected" in text_of(status) and "retrying" in text_of(status)
            await pilot.press("n")  # the UI stays usable while the daemon is away
            assert isinstance(app.screen, NewJobScreen)
            await pilot.press("escape")

            await asyncio.to_thread(daemon.start)
            # Submitted while the TUI was reconnecting: it must appear through the resync.
            job = await asyncio.to_thread(daemon.request, "job.submit", {
                "kind": "train", "params": long_job(model_dir, tiny_corpus, tmp_path / "c"),
                "priority": -5})
            await until(pilot, lambda: app.state.connection.connected, timeout=30,
                        what="the reconnect")
            assert app.state.status["pid"] != first_pid
            table = app.screen.query_one(JobsTable)
            await until(pilot, lambda: str(job["job"]["id"]) in table.rows, what="the new job")
            await app.link.request("job.cancel", {"id": job["job"]["id"]})  # seen: not needed
            assert "mistudiod" in text_of(status)

            # A gap in a topic's sequence numbers makes the link resync from a snapshot.
            resyncs = app.link.resyncs
            app.link.client._last_seq["daemon.status"] -= 3
            await until(pilot, lambda: app.link.resyncs > resyncs, timeout=10,
                        what="the resync after a gap")

    asyncio.run(scenario())


def test_a_screen_cancels_its_workers_before_its_widgets_go(tmp_path):
    async def scenario():
        app = MistudioApp(tmp_path / "no-daemon")  # offline: the form's checks still start
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("n")
            form = app.screen
            assert isinstance(form, NewJobScreen)
            checks = [worker for worker in app.workers if worker.node is form]
            assert checks and not any(worker.is_cancelled for worker in checks)
            removal = form.remove()  # its children are pruned after this returns
            assert all(worker.is_cancelled for worker in checks)
            await removal

    asyncio.run(scenario())


def test_the_tui_imports_neither_torch_nor_server_code():
    code = ("import sys, tui.app; bad = [m for m in ('torch', 'transformers', 'mistudiod.server',"
            " 'mistudiod.queue', 'mistudiod.operations') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
