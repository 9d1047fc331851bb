"""Placement: jobs go where the preflight's estimate fits, counting what is already promised."""

from __future__ import annotations

import pytest

from mistudio_core.errors import MistudioError
from mistudio_core.memory import DeviceMemory
from mistudiod.jobs import validate_params
from mistudiod.placement import Placer, estimate_train_bytes

GiB = 2**30


def _gpus(*free: int) -> list[DeviceMemory]:
    return [DeviceMemory(f"cuda:{i}", "GPU", f * GiB, 80 * GiB) for i, f in enumerate(free)]


def test_without_gpus_everything_runs_on_the_cpu():
    cpu = [DeviceMemory("cpu", "CPU RAM", 8 * GiB, 16 * GiB)]
    placer = Placer()
    assert placer.place(1, "auto", None, cpu) == "cpu"
    with pytest.raises(MistudioError, match="no GPU cuda:0"):
        placer.place(2, "cuda:0", None, cpu)


def test_jobs_spread_by_free_memory_minus_promises_and_wait_when_full():
    placer, gpus = Placer(), _gpus(30, 20)
    assert placer.place(1, "auto", 15 * GiB, gpus) == "cuda:0"  # 30 free
    assert placer.place(2, "auto", 15 * GiB, gpus) == "cuda:1"  # 15 left on 0, 20 on 1
    assert placer.place(3, "auto", 15 * GiB, gpus) == "cuda:0"  # 15 left on 0, 5 on 1
    assert placer.place(4, "auto", 15 * GiB, gpus) is None  # no room now: wait
    placer.release(1)
    assert placer.place(4, "auto", 15 * GiB, gpus) == "cuda:0"
    assert placer.place(5, "cuda", None, gpus) == "cuda:0"
    assert placer.place(6, "cpu", GiB, gpus) == "cpu"


def test_a_job_bigger_than_any_gpu_fails_with_advice():
    with pytest.raises(MistudioError, match="more than any GPU") as caught:
        Placer().place(1, "auto", 100 * GiB, _gpus(80))
    assert caught.value.code == "out_of_memory" and "4bit" in caught.value.hint


def test_memory_a_worker_already_holds_is_not_counted_twice():
    """NVML's free memory already lacks what a running worker holds: only the rest of its
    promise is still to come."""
    placer = Placer()
    assert placer.place(1, "auto", 15 * GiB, _gpus(30)) == "cuda:0"
    # job 1's worker now holds 10 GiB (30 -> 20 free); 5 GiB of its promise are still to come
    assert placer.place(2, "auto", 15 * GiB, _gpus(20), used={1: 10 * GiB}) == "cuda:0"
    # job 2 holds nothing yet, job 1 more than it promised: 15 GiB free, 15 still promised
    assert placer.place(3, "auto", GiB, _gpus(15), used={1: 18 * GiB}) is None
    assert placer.place(3, "auto", GiB, _gpus(16), used={1: 18 * GiB}) == "cuda:0"


def test_the_estimate_prices_the_job_as_the_worker_will_run_it(make_tiny_model, monkeypatch):
    import torch

    from mistudio_core import memory
    from mistudio_core.models import ModelSpec, load_config

    def no_torch_devices():
        raise AssertionError("the daemon's GPUs are given: torch.cuda must not be asked")

    monkeypatch.setattr(memory, "available_devices", no_torch_devices)
    model = str(make_tiny_model("gpt2", 3))
    config = load_config(ModelSpec(model))
    gpus = [DeviceMemory("cuda:0", "GPU", 2**20, 80 * GiB)]  # 1 MiB free: nothing fits now

    def preflight_total(quantization: str, dtype, d_sae: int) -> int:
        report = memory.preflight(config, model_id=model, layer=1, dtype=dtype, context_size=32,
                                  d_sae=d_sae, devices=gpus)
        return next(e.total_bytes for e in report.estimates if e.quantization == quantization)

    def params(**changes) -> dict:
        return validate_params("train", {"model": model, "hook": "layers.1.resid_post",
                                         "corpus": "demo", "context_size": 32, **changes})

    hidden = config.hidden_size
    # auto quantization is the worker's rule (none below 8B parameters), not "what fits now";
    # auto dtype is priced as bf16, the SAE as expansion x hidden
    assert estimate_train_bytes(params(expansion=2), gpus) == preflight_total(
        "none", torch.bfloat16, 2 * hidden)
    assert estimate_train_bytes(params(dtype="float32", quantization="8bit", d_sae=100),
                                gpus) == preflight_total("8bit", torch.float32, 100)
    assert estimate_train_bytes(params(model="demo"), gpus) is None
