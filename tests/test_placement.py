"""Placement: jobs go where the preflight's estimate fits, counting what is already promised."""

from __future__ import annotations

import pytest

from mistudio_core.errors import MistudioError
from mistudio_core.memory import DeviceMemory
from mistudiod.placement import Placer

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
