"""What a model id names: the demo model, a local directory or a hub id (torch-free).

The rule lives here, apart from `mistudio_core.models` (which imports torch), so that the daemon
can check a submitted job's model with exactly the rule the worker will load it by.
"""

from __future__ import annotations

from pathlib import Path

from mistudio_core.errors import MistudioError

DEMO_MODEL_ALIAS = "demo"
"""The model name that stands for the demo model wherever a model id is accepted."""


def looks_like_path(model_id: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else that looks like a path is one."""
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1


def check_model_id(model_id: str) -> str | None:
    """The local directory `model_id` names, or None for the demo model or a hub id.

    Raises `MistudioError` (code `model_not_found`) for a path that is no directory, before
    anything tries to fetch it from the hub.
    """
    if model_id == DEMO_MODEL_ALIAS:
        return None
    path = Path(model_id).expanduser()
    if path.is_dir():
        return str(path)
    if looks_like_path(model_id):
        raise MistudioError(
            f"model directory {model_id} does not exist",
            hint="check the path, or give a hub id such as EleutherAI/pythia-160m "
            f"(or `{DEMO_MODEL_ALIAS}`, the offline demo model)",
            code="model_not_found",
        )
    return None
