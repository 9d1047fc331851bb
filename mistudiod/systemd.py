"""What the daemon needs from systemd, without depending on python-systemd (DESIGN.md section 4).

The units in systemd/ start `mistudiod` with `Type=notify` and `WatchdogSec=`: `notify` speaks
the sd_notify protocol (one datagram to the socket in `NOTIFY_SOCKET`) so that the daemon can say
READY=1, ping the watchdog at `watchdog_interval()` and report STATUS= and STOPPING=1. Outside
systemd these calls do nothing, so the daemon runs the same way from a shell.

`configure_logging` writes log lines to stderr; when stderr is journald's stream each line starts
with the sd-daemon priority prefix (`<3>`, `<4>`, `<6>`, `<7>`) so that `journalctl -p warning`
filters by level, and carries no timestamp, which journald adds itself.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import TextIO

log = logging.getLogger(__name__)

_PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JOURNAL_FORMAT = "%(name)s: %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# sd-daemon(3) priorities, highest Python level first: crit, err, warning, info, debug.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))
_DEBUG_PRIORITY = 7


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1", "STATUS=2 jobs running") to the service manager.

    Returns False, without raising, when the daemon was not started by systemd (no
    NOTIFY_SOCKET) or the socket cannot be reached: a lost notification must never take the
    daemon down (the watchdog will notice if it matters).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    elif not address.startswith("/"):
        log.debug("NOTIFY_SOCKET=%r is not a Unix socket address; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # Called from the event loop, so never wait: when the manager's queue is full the
            # message is dropped (the next STATUS or WATCHDOG supersedes it).
            sock.sendto(message.encode(), socket.MSG_DONTWAIT, address)
    except OSError as exc:
        log.debug("cannot notify systemd at %r: %s", address, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half the unit's WatchdogSec=, or None when there is none.

    Half, as sd_watchdog_enabled(3) recommends, so that one late ping does not trip it.
    WATCHDOG_PID, when set, names the process the watchdog is meant for: a child that inherited
    the environment gets None.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class _JournalFormatter(logging.Formatter):
    """Prefixes every line of a record, traceback lines included, with its syslog priority.

    journald reads the prefix of each line it receives, so a multi-line record needs it on
    every line to keep its priority.
    """

    def __init__(self) -> None:
        super().__init__(_JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def _priority(levelno: int) -> int:
    """The sd-daemon priority for a Python logging level."""
    for threshold, value in _PRIORITIES:
        if levelno >= threshold:
            return value
    return _DEBUG_PRIORITY


class _DaemonHandler(logging.StreamHandler):
    """The handler `configure_logging` installs: its class marks it for replacement."""


def configure_logging(level: str = "info", journal: bool | None = None,
                      stream: TextIO | None = None) -> None:
    """Send every logger's records at `level` and above to `stream` (default: stderr).

    `journal` selects the journald format; by default it is on when stderr is the stream that
    systemd connected to the journal, i.e. when JOURNAL_STREAM names stderr's device and inode
    (a worker whose stderr was redirected inherits JOURNAL_STREAM but gets plain lines).
    Calling it again replaces the handler it installed rather than adding a second one.
    """
    levels = logging.getLevelNamesMapping()
    if level.upper() not in levels:
        raise ValueError(f"unknown log level {level!r}: use debug, info, warning or error")
    stream = sys.stderr if stream is None else stream
    if journal is None:
        journal = _is_journal_stream(stream)
    handler = _DaemonHandler(stream)
    handler.setFormatter(_JournalFormatter() if journal
                         else logging.Formatter(_PLAIN_FORMAT, _DATE_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _DaemonHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levels[level.upper()])


def _is_journal_stream(stream: TextIO) -> bool:
    """Whether `stream` is the journal connection named by JOURNAL_STREAM ("device:inode")."""
    try:
        device, inode = (int(part) for part in os.environ["JOURNAL_STREAM"].split(":"))
        info = os.fstat(stream.fileno())
    except (KeyError, ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)
