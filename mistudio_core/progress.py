"""How a long job reports: `callback(kind, payload)` events (`log`, `progress`, `metrics`, ...).

Its own module, free of torch, so that jobs that need no torch (explain, score) start without
importing it, and the daemon's workers report through the same type whatever the job.
"""

from __future__ import annotations

from collections.abc import Callable

Callback = Callable[[str, dict], None]


def silent(_kind: str, _payload: dict) -> None:
    """The callback for runs nobody watches."""
