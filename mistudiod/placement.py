"""Which device a job runs on: the memory preflight's estimate against each GPU's free memory.

NVML's free memory lags behind a job that has just started, so the placer also subtracts what it
has promised to the jobs it placed, less what their workers already hold: once NVML shows a
worker's memory it is no longer in "free", and counting it again as a promise would keep room
empty. A job whose model is too big for every GPU fails at once with the preflight's advice; one
that would fit once other jobs end waits in the queue. Without GPUs every job runs on the CPU.
A job of several processes (`gpus`: a data- or layer-parallel training run) gets that many GPUs,
the roomiest, each with room for what one process needs; it is placed as `cuda:1,cuda:3`. A
model bigger than every GPU that the preflight can split over them (`split`: each GPU's share) is
placed on those GPUs, each with room for its share, also as `cuda:0,cuda:1`.
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
        self._reserved: dict[int, dict[str, int]] = {}  # job -> bytes promised on each device

    def place(self, job_id: int, requested: str, need_bytes: int | None,
              devices: list[DeviceMemory], used: Mapping[int, int] | None = None,
              count: int = 1, split: Mapping[str, int] | None = None) -> str | None:
        """The device for a job (`count` GPUs, comma-separated, for a job of several processes;
        the GPUs of `split` for a model the preflight splits), or None when it must wait for
        room. Raises if it never fits.

        `used` maps the jobs already placed to the GPU memory NVML sees their workers holding,
        read with `devices`' free memory.
        """
        devices = [d for d in devices if d.name != "cpu"]
        if requested == "cpu" or (requested == "auto" and not devices):
            return "cpu"
        if count > 1 and requested != "auto":
            raise MistudioError(f"a job on {count} GPUs takes --device auto, not {requested}",
                                hint="leave out --device", code="bad_input")
        if count > max(1, len(devices)):
            raise MistudioError(
                f"the job asks for {count} GPUs; the daemon's machine has {len(devices)}",
                hint="ask for fewer with --gpus", code="bad_input")
        if requested != "auto":
            wanted = "cuda:0" if requested == "cuda" else requested
            devices = [d for d in devices if d.name == wanted]
            if not devices:
                raise MistudioError(
                    f"there is no GPU {requested} on the daemon's machine",
                    hint="use --device auto (or see `mistudio gpu`)", code="bad_input",
                )
        need = need_bytes or 0
        room = {d.name: d.free_bytes - self._promised(d.name, used or {}) for d in devices}
        if need > max(d.total_bytes for d in devices) and split and requested == "auto":
            if any(room.get(name, 0) < share for name, share in split.items()):
                return None
            self._reserved[job_id] = dict(split)
            return ",".join(split)
        if need > max(d.total_bytes for d in devices):
            raise MistudioError(
                f"the job needs about {need / 2**30:.1f} GiB, more than any GPU has",
                hint="use --quantization 4bit, an earlier layer, or a smaller --d-sae "
                     "(`mistudio check-memory` shows what fits)",
                code="out_of_memory",
            )
        best = sorted(room, key=room.get, reverse=True)[:count]
        if room[best[-1]] < need:
            return None
        self._reserved[job_id] = dict.fromkeys(best, need)
        return ",".join(best)

    def release(self, job_id: int) -> None:
        self._reserved.pop(job_id, None)

    def _promised(self, device: str, used: Mapping[int, int]) -> int:
        """What the jobs placed on `device` may still take beyond what they hold already."""
        return sum(max(0, promised[device] - used.get(job_id, 0))
                   for job_id, promised in self._reserved.items() if device in promised)


def estimate_train_bytes(params: dict,
                         devices: list[DeviceMemory]) -> tuple[int | None, dict[str, int] | None]:
    """What a training job needs on its GPU by the memory preflight (None when unknown), and,
    for a model too big for one GPU that fits split over them, each GPU's share.

    Priced as the worker will load it: the quantization resolved by the worker's own rule, the
    job's dtype (`auto` is priced as bfloat16, what GPUs load it in) and SAE width. `devices` are
    the daemon's GPUs, read from its snapshot: asking torch would open CUDA in the daemon. Reads
    the model's config only; the demo model is tiny and is left unestimated so that scheduling
    never waits for it to be built.
    """
    import torch

    from mistudio_core.hooks import parse_hooks
    from mistudio_core.memory import preflight
    from mistudio_core.model_ids import DEMO_MODEL_ALIAS
    from mistudio_core.models import (
        DTYPES,
        ModelSpec,
        load_config,
        n_layers_of,
        resolve_quantization,
    )

    if params["model"] == DEMO_MODEL_ALIAS:
        return None, None
    spec = ModelSpec(params["model"], revision=params["revision"],
                     quantization=params["quantization"])
    config = load_config(spec)
    hidden = config.get_text_config().hidden_size
    dtype = torch.bfloat16 if params["dtype"] == "auto" else DTYPES[params["dtype"]]
    report = preflight(config, model_id=params["model"],
                       layer=max(hook.layer for hook in parse_hooks(
                           params["hook"], n_layers_of(config))), dtype=dtype,
                       context_size=params["context_size"],
                       d_sae=params["d_sae"] or params["expansion"] * hidden, devices=devices)
    estimate = report.estimate_for(resolve_quantization(spec, config))
    split = None if estimate.split is None else {
        share.device: share.total_bytes for share in estimate.split.shares}
    return estimate.total_bytes, split
