"""`mistudio-tui` in a real terminal: tmux at 80x24, keys sent with `send-keys`, the screen read
back with `capture-pane`. This is what a person on an SSH session sees."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def wait_for_screen(session: str, *texts: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        screen = tmux("capture-pane", "-p", "-t", session)
        if all(text in screen for text in texts):
            return screen
        if time.monotonic() > deadline:
            raise AssertionError(f"{texts} not on screen:\n{screen}")
        time.sleep(0.2)


def test_the_dashboard_in_tmux_at_80x24(start_daemon):
    daemon = start_daemon()  # stopped and cleaned up by the fixture, even if this test fails
    session = f"mistudio-test-{time.monotonic_ns()}"
    script = Path(sys.executable).with_name("mistudio-tui")
    command = (shlex.quote(str(script)) if script.exists()
               else f"{shlex.quote(sys.executable)} -m tui")
    try:
        tmux("new-session", "-d", "-x", "80", "-y", "24", "-s", session,
             f"{command} --runtime-dir {shlex.quote(str(daemon.runtime_dir))}")
        screen = wait_for_screen(session, "miStudio", "mistudiod", "Jobs", "New job")
        lines = screen.splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        assert "GPUs" in screen and ("No GPU" in screen or "util" in screen)

        tmux("send-keys", "-t", session, "n")
        wait_for_screen(session, "new training job", "memory preflight", "architecture")
        # the demo model's preflight, from the daemon: its config only (DaemonProcess makes a
        # demo build fail at once, so this passes without the demo model in ~/.cache)
        wait_for_screen(session, "fits on")
        tmux("send-keys", "-t", session, "Escape")
        wait_for_screen(session, "Cancel job")

        daemon.stop()
        wait_for_screen(session, "disconnected", "retrying")
        daemon.start()
        wait_for_screen(session, "● mistudiod")

        tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 10
        while subprocess.run(["tmux", "has-session", "-t", session],
                             capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "q did not quit"
            time.sleep(0.2)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
