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


def test_a_job_of_several_processes_gets_the_roomiest_gpus_each_with_room():
    placer, gpus = Placer(), _gpus(30, 10, 25, 20)
    assert placer.place(1, "auto", 15 * GiB, gpus, count=2) == "cuda:0,cuda:2"
    # promised 15 on each: 15, 10, 10, 20 left
    assert placer.place(2, "auto", 12 * GiB, gpus, count=2) == "cuda:3,cuda:0"
    assert placer.place(3, "auto", 12 * GiB, gpus, count=2) is None  # one GPU with room only
    placer.release(1)
    assert placer.place(3, "auto", 12 * GiB, gpus, count=2) == "cuda:2,cuda:0"  # 25 and 18
    with pytest.raises(MistudioError, match="asks for 5 GPUs; the daemon's machine has 4"):
        Placer().place(4, "auto", None, gpus, count=5)
    with pytest.raises(MistudioError, match="takes --device auto"):
        Placer().place(5, "cuda:1", None, gpus, count=2)
    assert Placer().place(6, "auto", None, [], count=2) == "cpu"  # CPU processes


def test_a_model_the_preflight_splits_goes_on_its_gpus_each_with_room_for_its_share():
    placer, gpus = Placer(), _gpus(70, 70, 40)  # 80 GiB GPUs
    split = {"cuda:0": 65 * GiB, "cuda:1": 50 * GiB}  # a 115 GiB job
    assert placer.place(1, "auto", 115 * GiB, gpus, split=split) == "cuda:0,cuda:1"
    # 5 GiB left on cuda:0: the next job of that split waits; a small job goes to cuda:2
    assert placer.place(2, "auto", 115 * GiB, gpus, split=split) is None
    assert placer.place(3, "auto", 30 * GiB, gpus) == "cuda:2"
    placer.release(1)
    assert placer.place(2, "auto", 115 * GiB, gpus, split=split) == "cuda:0,cuda:1"
    with pytest.raises(MistudioError, match="more than any GPU"):  # pinned to one GPU: no split
        placer.place(4, "cuda:0", 115 * GiB, gpus, split=split)


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
    assert estimate_train_bytes(params(expansion=2), gpus) == (preflight_total(
        "none", torch.bfloat16, 2 * hidden), None)
    assert estimate_train_bytes(params(dtype="float32", quantization="8bit", d_sae=100),
                                gpus) == (preflight_total("8bit", torch.float32, 100), None)
    assert estimate_train_bytes(params(model="demo"), gpus) == (None, None)
    # several hooks: priced at the deepest
    assert estimate_train_bytes(params(hook="layers.0.resid_post,layers.1.mlp_out"), gpus) == (
        preflight_total("none", torch.bfloat16, 16 * hidden), None)
