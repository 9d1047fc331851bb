"""Which device a job runs on: the memory preflight's estimate against each GPU's free memory.

NVML's free memory lags behind a job that has just started, so the placer also subtracts what it
has promised to the jobs it placed, less what their workers already hold: once NVML shows a
worker's memory it is no longer in "free", and counting it again as a promise would keep room
empty. A job whose model is too big for every GPU fails at once with the preflight's advice; one
that would fit once other jobs end waits in the queue. Without GPUs every job runs on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from mistudio_core.errors import MistudioError

if TYPE_CHECKING:
    from mistudio_core.memory import DeviceMemory


class Placer:
    """Places jobs on devices (the GPU manager's live list), remembering its promises."""

    def __init__(self) -> None:
        self._reserved: dict[int, tuple[str, int]] = {}

    def place(self, job_id: int, requested: str, need_bytes: int | None,
              devices: list[DeviceMemory], used: Mapping[int, int] | None = None) -> str | None:
        """The device for a job, or None when it must wait for room. Raises if it never fits.

        `used` maps the jobs already placed to the GPU memory NVML sees their workers holding,
        read with `devices`' free memory.
        """
        devices = [d for d in devices if d.name != "cpu"]
        if requested == "cpu" or (requested == "auto" and not devices):
            return "cpu"
        if requested != "auto":
            wanted = "cuda:0" if requested == "cuda" else requested
            devices = [d for d in devices if d.name == wanted]
            if not devices:
                raise MistudioError(
                    f"there is no GPU {requested} on the daemon's machine",
                    hint="use --device auto (or see `mistudio gpu`)", code="bad_input",
                )
        need = need_bytes or 0
        if need > max(d.total_bytes for d in devices):
            raise MistudioError(
                f"the job needs about {need / 2**30:.1f} GiB, more than any GPU has",
                hint="use --quantization 4bit, an earlier layer, or a smaller --d-sae "
                     "(`mistudio check-memory` shows what fits)",
                code="out_of_memory",
            )
        room = {d.name: d.free_bytes - self._promised(d.name, used or {}) for d in devices}
        best = max(room, key=room.get)
        if room[best] < need:
            return None
        self._reserved[job_id] = (best, need)
        return best

    def release(self, job_id: int) -> None:
        self._reserved.pop(job_id, None)

    def _promised(self, device: str, used: Mapping[int, int]) -> int:
        """What the jobs placed on `device` may still take beyond what they hold already."""
        return sum(max(0, need - used.get(job_id, 0))
                   for job_id, (name, need) in self._reserved.items() if name == device)


def estimate_train_bytes(params: dict, devices: list[DeviceMemory]) -> int | None:
    """What a training job needs on its GPU by the memory preflight (None when unknown).

    Priced as the worker will load it: the quantization resolved by the worker's own rule, the
    job's dtype (`auto` is priced as bfloat16, what GPUs load it in) and SAE width. `devices` are
    the daemon's GPUs, read from its snapshot: asking torch would open CUDA in the daemon. Reads
    the model's config only; the demo model is tiny and is left unestimated so that scheduling
    never waits for it to be built.
    """
    import torch

    from mistudio_core.hooks import HookPoint
    from mistudio_core.memory import preflight
    from mistudio_core.model_ids import DEMO_MODEL_ALIAS
    from mistudio_core.models import DTYPES, ModelSpec, load_config, resolve_quantization

    if params["model"] == DEMO_MODEL_ALIAS:
        return None
    spec = ModelSpec(params["model"], revision=params["revision"],
                     quantization=params["quantization"])
    config = load_config(spec)
    hidden = config.get_text_config().hidden_size
    dtype = torch.bfloat16 if params["dtype"] == "auto" else DTYPES[params["dtype"]]
    report = preflight(config, model_id=params["model"],
                       layer=HookPoint.parse(params["hook"]).layer, dtype=dtype,
                       context_size=params["context_size"],
                       d_sae=params["d_sae"] or params["expansion"] * hidden, devices=devices)
    quantization = resolve_quantization(spec, config)
    return next(e.total_bytes for e in report.estimates if e.quantization == quantization)
