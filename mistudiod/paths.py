"""Where the daemon keeps its state and its sockets (DESIGN.md section 7).

State (the job database, corpora, runs, keys) lives in `--state-dir` / `MISTUDIO_HOME`; sockets
and the connection file in `--runtime-dir` / `MISTUDIO_RUNTIME_DIR`. Under the system unit
systemd passes `STATE_DIRECTORY` and `RUNTIME_DIRECTORY` (/var/lib/mistudiod, /run/mistudiod);
otherwise the defaults follow XDG: `$XDG_DATA_HOME/mistudio` and `$XDG_RUNTIME_DIR/mistudiod`,
falling back to a private directory under /tmp when there is no XDG runtime directory (an SSH
login without systemd-logind, a container).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mistudio_core.errors import MistudioError
from mistudiod.protocol import CONNECTION_FILE


def default_state_dir() -> Path:
    for variable in ("MISTUDIO_HOME", "STATE_DIRECTORY"):
        if os.environ.get(variable):
            return Path(os.environ[variable].split(":")[0])
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "mistudio"


def default_runtime_dir() -> Path:
    if os.environ.get("MISTUDIO_RUNTIME_DIR"):
        return Path(os.environ["MISTUDIO_RUNTIME_DIR"])
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "mistudiod"
    return Path("/tmp") / f"mistudiod-{os.getuid()}"


@dataclass(frozen=True)
class DaemonPaths:
    state_dir: Path
    runtime_dir: Path

    @classmethod
    def resolve(cls, state_dir: str | Path | None = None,
                runtime_dir: str | Path | None = None) -> DaemonPaths:
        return cls(Path(state_dir or default_state_dir()).absolute(),
                   Path(runtime_dir or default_runtime_dir()).absolute())

    @property
    def connection_file(self) -> Path:
        return self.runtime_dir / CONNECTION_FILE

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{self.runtime_dir / 'ctl.sock'}"

    @property
    def events_endpoint(self) -> str:
        return f"ipc://{self.runtime_dir / 'events.sock'}"

    @property
    def workers_endpoint(self) -> str:
        """Where workers and model hosts PUSH their reports (only they know the key's use)."""
        return f"ipc://{self.runtime_dir / 'workers.sock'}"

    @property
    def group_access(self) -> bool:
        """Whether the runtime directory admits a group (0750): its members may use the daemon."""
        return stat.S_IMODE(self.runtime_dir.stat().st_mode) == 0o750

    @property
    def database(self) -> Path:
        return self.state_dir / "mistudio.db"

    @property
    def corpora(self) -> Path:
        return self.state_dir / "corpora"

    @property
    def uploads(self) -> Path:
        return self.state_dir / "uploads"

    @property
    def runs(self) -> Path:
        return self.state_dir / "runs"

    @property
    def key_file(self) -> Path:
        return self.state_dir / "key"

    @property
    def curve_dir(self) -> Path:
        return self.state_dir / "curve"

    def prepare(self) -> None:
        """Create the directories with private modes, refusing a runtime dir others control.

        The runtime directory is 0700, or 0750 when it was made so for a group (systemd's
        `RuntimeDirectoryMode=0750` with `Group=mistudio`); any other mode is tightened to 0700.
        """
        for directory in (self.state_dir, self.corpora, self.uploads, self.runs):
            _make_directory(directory, 0o700, exist_mode_ok=True)
        _make_directory(self.runtime_dir, 0o700, exist_mode_ok=False)


def _make_directory(directory: Path, mode: int, exist_mode_ok: bool) -> None:
    try:
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as exc:
        raise MistudioError(
            f"cannot create {directory}: {exc.strerror or exc}",
            hint="choose a directory you can write to with --state-dir / --runtime-dir",
            code="bad_usage",
        ) from exc
    if info.st_uid != os.getuid():
        raise MistudioError(
            f"{directory} belongs to another user",
            hint="use a directory of your own (--state-dir / --runtime-dir)", code="bad_usage",
        )
    if exist_mode_ok:
        return
    if stat.S_IMODE(info.st_mode) not in (0o700, 0o750):
        os.chmod(directory, mode)
