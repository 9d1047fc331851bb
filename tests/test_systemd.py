"""The systemd units (checked by `systemd-analyze verify`) and mistudiod.systemd: sd_notify,
the watchdog interval and journald-style logging."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mistudiod.systemd import configure_logging, notify, watchdog_interval

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SYSTEM_UNIT = UNITS / "mistudiod.service"
USER_UNIT = UNITS / "mistudiod-user.service"
SYSTEM_EXEC = "ExecStart=/usr/local/bin/mistudiod"
USER_EXEC = "ExecStart=%h/.local/bin/mistudiod"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)",
)


def unit_settings(path: Path) -> dict[str, list[str]]:
    """`Section.Key` -> every value it is given, in order (comments and blanks skipped)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def _stub_executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def verify(unit_text: str, directory: Path, user: bool) -> list[str]:
    """Run `systemd-analyze [--user] verify` on `unit_text` saved as mistudiod.service.

    verify requires ExecStart's binary to exist. The system unit's absolute path is rewritten to
    a stub; the user unit keeps its `%h/.local/bin/mistudiod`, with HOME pointing at a directory
    that has the stub there. `--user` needs an XDG_RUNTIME_DIR even offline. Returns the
    complaints about the unit: verify reports parse errors on stderr but still exits 0.
    """
    unit = directory / "mistudiod.service"
    env = dict(os.environ)
    if user:
        home, runtime = directory / "home", directory / "run"
        _stub_executable(home / ".local" / "bin" / "mistudiod")
        runtime.mkdir(mode=0o700)
        env.update(HOME=str(home), XDG_RUNTIME_DIR=str(runtime))
    else:
        stub = _stub_executable(directory / "bin" / "mistudiod")
        assert unit_text.count(SYSTEM_EXEC) == 1
        unit_text = unit_text.replace(SYSTEM_EXEC, f"ExecStart={stub}")
    unit.write_text(unit_text)
    command = ["systemd-analyze", *(["--user"] if user else []), "verify", str(unit)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if unit.name in line]
    if result.returncode != 0:
        complaints.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return complaints


@needs_systemd_analyze
@pytest.mark.parametrize("path, user", [(SYSTEM_UNIT, False), (USER_UNIT, True)],
                         ids=["system", "user"])
def test_systemd_analyze_verify_accepts_the_unit(path, user, tmp_path):
    assert verify(path.read_text(), tmp_path, user) == []


@needs_systemd_analyze
@pytest.mark.parametrize("path, user", [(SYSTEM_UNIT, False), (USER_UNIT, True)],
                         ids=["system", "user"])
def test_verify_check_catches_a_broken_unit(path, user, tmp_path):
    broken = path.read_text().replace("Type=notify", "Type=notify\nTypo=notify")
    complaints = verify(broken, tmp_path, user)
    assert any("Typo" in line for line in complaints), complaints


def test_system_unit_settings():
    unit = unit_settings(SYSTEM_UNIT)
    service = {key.removeprefix("Service."): values for key, values in unit.items()}
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] == ["30"]
    assert service["ExecStart"] == [SYSTEM_EXEC.removeprefix("ExecStart=")]
    assert (service["User"], service["Group"]) == (["mistudio"], ["mistudio"])
    assert service["RuntimeDirectory"] == ["mistudiod"]
    assert service["RuntimeDirectoryMode"] == ["0750"]
    assert service["StateDirectory"] == ["mistudiod"]
    assert service["CacheDirectory"] == ["mistudiod"]
    assert "HF_HOME=%C/mistudiod/huggingface" in service["Environment"]
    assert service["KillMode"] == ["mixed"]
    assert service["Restart"] == ["on-failure"]
    assert service["DevicePolicy"] == ["closed"]
    devices = {value.split()[0]: value.split()[1] for value in service["DeviceAllow"]}
    for device in ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                   "char-nvidia-frontend", "char-nvidia", "char-nvidia-uvm", "char-nvidia-caps"):
        assert devices.get(device) == "rw", device
    for setting in ("NoNewPrivileges", "ProtectKernelTunables", "ProtectKernelModules",
                    "ProtectControlGroups", "RestrictSUIDSGID", "PrivateTmp"):
        assert service[setting] == ["yes"], setting
    assert service["ProtectSystem"] == ["strict"]
    assert service["ProtectHome"] == ["read-only"]
    # These would break CUDA: no /dev/nvidia*, no JIT.
    assert "PrivateDevices" not in service
    assert "MemoryDenyWriteExecute" not in service
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_user_unit_settings():
    unit = unit_settings(USER_UNIT)
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    assert unit["Service.WatchdogSec"] == ["30"]
    assert unit["Service.ExecStart"] == [USER_EXEC.removeprefix("ExecStart=")]
    assert unit["Service.RuntimeDirectory"] == ["mistudiod"]
    assert unit["Service.KillMode"] == ["mixed"]
    # A user manager's StateDirectory= is ~/.config: the daemon's default state dir is used.
    assert "Service.StateDirectory" not in unit
    assert "Service.User" not in unit
    assert "Service.MemoryDenyWriteExecute" not in unit
    assert unit["Install.WantedBy"] == ["default.target"]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="sd-", dir="/tmp") as directory:
        yield Path(directory)


def _listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_sends_a_datagram_to_the_socket(short_dir, monkeypatch):
    path = str(short_dir / "notify")
    with _listener(path) as listener:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify("READY=1") is True
        assert listener.recv(4096) == b"READY=1"
        assert notify("STATUS=2 jobs running\nWATCHDOG=1") is True
        assert listener.recv(4096) == b"STATUS=2 jobs running\nWATCHDOG=1"


def test_notify_reaches_an_abstract_socket(monkeypatch):
    name = f"mistudiod-test-{uuid.uuid4().hex}"
    with _listener("\0" + name) as listener:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("STOPPING=1") is True
        assert listener.recv(4096) == b"STOPPING=1"


def test_notify_without_systemd_returns_false(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


@pytest.mark.parametrize("address", ["/nonexistent/mistudiod/notify", "@no-such-socket-x9q",
                                     "vsock:2:1234"])
def test_notify_to_an_unreachable_socket_returns_false(address, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert notify("READY=1") is False


def test_notify_to_a_file_that_is_not_a_socket_returns_false(short_dir, monkeypatch):
    path = short_dir / "plain-file"
    path.write_text("")
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert notify("WATCHDOG=1") is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


@pytest.mark.parametrize("value", ["0", "", "thirty", "-5"])
def test_watchdog_interval_ignores_bad_values(value, monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", value)
    assert watchdog_interval() is None


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_journal_lines_carry_their_priority(restore_root_logger):
    stream = io.StringIO()
    configure_logging("debug", journal=True, stream=stream)
    logger = logging.getLogger("mistudiod.test")
    logger.debug("details")
    logger.info("started")
    logger.warning("disk almost full")
    logger.error("job failed")
    lines = stream.getvalue().splitlines()
    assert lines == ["<7>mistudiod.test: details", "<6>mistudiod.test: started",
                     "<4>mistudiod.test: disk almost full", "<3>mistudiod.test: job failed"]


def test_journal_traceback_keeps_the_prefix_on_every_line(restore_root_logger):
    stream = io.StringIO()
    configure_logging(journal=True, stream=stream)
    try:
        raise RuntimeError("worker crashed")
    except RuntimeError:
        logging.getLogger("mistudiod.test").exception("job 7 failed\nsecond line")
    lines = stream.getvalue().splitlines()
    assert len(lines) > 4
    assert all(line.startswith("<3>") for line in lines), lines
    assert "<3>Traceback (most recent call last):" in lines
    assert lines[-1] == "<3>RuntimeError: worker crashed"


def test_plain_lines_have_a_timestamp_and_no_prefix(restore_root_logger):
    stream = io.StringIO()
    configure_logging("info", journal=False, stream=stream)
    logging.getLogger("mistudiod.test").warning("disk almost full")
    logging.getLogger("mistudiod.test").debug("not shown at info")
    (line,) = stream.getvalue().splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING mistudiod\.test: disk almost full", line)


def test_journal_is_detected_from_journal_stream(restore_root_logger, tmp_path, monkeypatch):
    with open(tmp_path / "journal", "w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        configure_logging(stream=stream)
        logging.getLogger("mistudiod.test").warning("to the journal")
        # Inherited by a process whose stderr goes elsewhere: plain lines.
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + 1}")
        configure_logging(stream=stream)
        logging.getLogger("mistudiod.test").warning("to a file")
    first, second = (tmp_path / "journal").read_text().splitlines()
    assert first == "<4>mistudiod.test: to the journal"
    assert not second.startswith("<") and second.endswith("WARNING mistudiod.test: to a file")


def test_configure_logging_twice_does_not_stack_handlers(restore_root_logger):
    first, second = io.StringIO(), io.StringIO()
    configure_logging(journal=True, stream=first)
    configure_logging(journal=True, stream=second)
    logging.getLogger("mistudiod.test").info("once")
    assert first.getvalue() == ""
    assert second.getvalue() == "<6>mistudiod.test: once\n"


def test_configure_logging_rejects_an_unknown_level(restore_root_logger):
    with pytest.raises(ValueError, match="loud"):
        configure_logging("loud", stream=io.StringIO())
