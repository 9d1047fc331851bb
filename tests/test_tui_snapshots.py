"""Snapshots of every TUI screen at 80x24, and of the two main ones on a wide terminal
(pytest-textual-snapshot), from fixed data.

The app runs without a link (`connect=False`) and its state is filled with the same events a
daemon would send, so what is drawn is exactly what the live app would draw. Clocks are frozen:
a running job's elapsed time counts from the local clock, log times are printed in UTC, and an
input's cursor does not blink.
Update the SVGs after an intended change with `pytest tests/test_tui_snapshots.py
--snapshot-update`, and look at them (`snapshot_report.html`) before committing.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
from textual.widgets import Input

from tui.app import MistudioApp
from tui.screens.confirm import ConfirmScreen

NOW = 1_790_000_000.0
FROZEN = SimpleNamespace(monotonic=lambda: 1000.0, strftime=time.strftime, localtime=time.gmtime)
TRAIN = {"model": "EleutherAI/pythia-160m", "hook": "layers.6.resid_post", "corpus": "demo",
         "arch": "topk", "k": 32, "expansion": 16, "d_sae": None, "tokens": 20_000_000}


@pytest.fixture(autouse=True)
def frozen_clocks(monkeypatch):
    for module in ("tui.state", "tui.format", "tui.screens.job_detail"):
        monkeypatch.setattr(f"{module}.time", FROZEN)


def job(job_id: int, state: str, **fields) -> dict:
    document = {"id": job_id, "kind": "train", "params": dict(TRAIN), "state": state,
                "priority": 0, "attempt": 1, "failures": 0, "max_retries": 0, "resume": 0,
                "owner": "ada", "device": "cuda:0", "worker_pid": None,
                "cancel_requested": 0, "created_at": NOW, "started_at": NOW,
                "finished_at": None, "lease_until": None, "step": 0, "total_steps": 4883,
                "progress": 0.0, "last_metrics": None, "result": None, "error": None,
                "elapsed_s": None}
    return {**document, **fields}


JOBS = [
    job(1, "failed", elapsed_s=12.0, error={
        "code": "out_of_memory", "message": "CUDA out of memory at batch 8192 tokens",
        "hint": "lower --batch-tokens or use --quantization 4bit"}),
    job(2, "succeeded", step=4883, progress=1.0, elapsed_s=1873.0, result={
        "path": "/var/lib/mistudiod/runs/pythia-l6-topk", "steps": 4883,
        "final_metrics": {"loss": 0.061}, "evaluation": {
            "n_tokens": 1_000_000, "l0": 32.0, "fve": 0.874, "dead_pct": 1.2,
            "ce_loss_recovered": 0.962, "kl_divergence": 0.0412}}),
    job(3, "running", step=2050, progress=0.42, elapsed_s=754.0),
    job(4, "queued", device=None, started_at=None,
        params={**TRAIN, "hook": "layers.8.resid_post", "arch": "jumprelu"}),
]


def points(n: int = 82) -> list[dict]:
    """A run's curves as a trainer reports them every 25 steps."""
    return [{"step": 25 * (i + 1), "loss": 0.5 * math.exp(-i / 12) + 0.06,
             "l0": 32.0, "fve": 0.9 - 0.6 * math.exp(-i / 10),
             "dead_pct": 40 * math.exp(-i / 15) + 1.0} for i in range(n)]


def status(gpus: bool) -> dict:
    return {"pid": 4242, "version": "0.1.0", "uptime_s": 3725.0, "max_jobs": 4,
            "jobs": {"queued": 1, "running": 1, "succeeded": 1, "failed": 1, "cancelled": 0},
            "running": [3], "gpus": {"available": gpus, "count": 1 if gpus else 0,
                                     "reason": None if gpus else "NVML unavailable: NVML "
                                     "Shared Library Not Found"},
            "cpu": {"util_percent": 37.0, "count": 16, "load_1m": 5.2,
                    "memory_used": 41 * 2**30, "memory_total": 125 * 2**30}}


def gpu(util: float) -> dict:
    return {"index": 0, "name": "NVIDIA H200", "uuid": "GPU-0f3c", "util_percent": util,
            "memory_util_percent": 29.0, "memory_used": 41 * 2**30, "memory_total": 141 * 2**30,
            "memory_free": 100 * 2**30, "temperature_c": 61, "power_w": 412.0,
            "power_limit_w": 700.0, "fan_percent": None,
            "processes": [{"pid": 9001, "used_memory": 40 * 2**30, "job_id": 3}]}


def fill(app: MistudioApp, *, gpus: bool = True) -> None:
    state = app.state
    state.set_connection(True, "connected to mistudiod 0.1.0 (pid 4242)")
    for second in range(60):
        state.apply_status(status(gpus))
        if gpus:
            state.apply_gpu(gpu(50 + 45 * math.sin(second / 6) ** 2))
    if not gpus:
        state.apply_gpu_snapshot({"available": False, "reason": status(False)["gpus"]["reason"],
                                  "gpus": []})
    state.replace_jobs(JOBS)
    state.apply_metrics(3, points())
    state.apply_metrics(2, points(195))
    state.apply_logs(3, [{"id": i + 1, "at": NOW + 60 * i, "level": level, "message": message}
                         for i, (level, message) in enumerate([
                             ("info", "training a topk SAE of 12288 latents on layers.6"),
                             ("info", "loading EleutherAI/pythia-160m up to layer 6"),
                             ("info", "checkpoint at step 2000"),
                             ("warning", "out of memory at 8192 tokens: 2 micro-batches")])])


def snapshot(snap_compare, press=(), *, gpus=True, connected=True, then=None,
             size=(80, 24), theme="textual-dark") -> bool:
    app = MistudioApp(connect=False, theme=theme)

    async def before(pilot):
        fill(app, gpus=gpus)
        if not connected:
            app.state.set_connection(False, "disconnected (the daemon stopped answering), "
                                            "retrying")
        if then is not None:
            then(app)
        await pilot.pause()
        await app.workers.wait_for_complete()
        for field in app.screen.query(Input):  # a blinking cursor is drawn or not by the clock
            field.cursor_blink = False
        await pilot.pause(0.3)  # signals' callbacks and the redraws they schedule

    return snap_compare(app, press=press, terminal_size=size, run_before=before)


def test_dashboard_with_a_gpu(snap_compare):
    assert snapshot(snap_compare)


def test_dashboard_in_the_light_theme(snap_compare):
    assert snapshot(snap_compare, theme="textual-light")


def test_dashboard_on_a_wide_terminal(snap_compare):
    """At 130 columns and more the jobs and the curves stand side by side."""
    assert snapshot(snap_compare, size=(160, 44))


def test_job_detail_on_a_wide_terminal(snap_compare):
    """The four charts in one row, and a longer log."""
    assert snapshot(snap_compare, then=lambda app: app.open_job(3), size=(160, 44))


def test_dashboard_on_a_cpu_machine_while_disconnected(snap_compare):
    assert snapshot(snap_compare, gpus=False, connected=False)


def test_job_detail_of_a_running_job(snap_compare):
    assert snapshot(snap_compare, then=lambda app: app.open_job(3))


def test_job_detail_of_a_finished_job(snap_compare):
    assert snapshot(snap_compare, then=lambda app: app.open_job(2))


def test_job_detail_of_a_failed_job(snap_compare):
    assert snapshot(snap_compare, then=lambda app: app.open_job(1))


def test_new_job_form_offline(snap_compare):
    assert snapshot(snap_compare, connected=False, then=lambda app: app.action_new_job())


def test_cancel_confirmation(snap_compare):
    assert snapshot(snap_compare, then=lambda app: app.push_screen(ConfirmScreen(
        "Cancel job 3? A running job stops at once.", yes="Cancel job")))


def test_help(snap_compare):
    assert snapshot(snap_compare, press=["f1"])
