"""The daemon's Prometheus metrics: each observation shows up in the exposition, and over HTTP."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from daemon_process import free_port
from prometheus_client.parser import text_string_to_metric_families

from mistudio_core.errors import MistudioError
from mistudiod.metrics import DaemonMetrics


def samples(metrics: DaemonMetrics) -> dict[tuple, float]:
    """Every sample as {(name, sorted labels): value}, parsed back from `render()`."""
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def gpu(index: int, util: int | None, memory: float | None) -> dict:
    return {"index": index, "uuid": f"GPU-{index}", "util_percent": util,
            "memory_util_percent": memory}


def test_gpu_readings_and_a_gpu_that_goes_away() -> None:
    metrics = DaemonMetrics()
    metrics.observe_gpus({"gpus": [gpu(0, 45, 25.0), gpu(1, None, 50.0)]})
    values = samples(metrics)
    labels0 = (("gpu", "0"), ("uuid", "GPU-0"))
    labels1 = (("gpu", "1"), ("uuid", "GPU-1"))
    assert values[("mistudio_gpu_utilization_percent", labels0)] == 45
    assert values[("mistudio_gpu_memory_utilization_percent", labels0)] == 25.0
    assert values[("mistudio_gpu_memory_utilization_percent", labels1)] == 50.0
    assert ("mistudio_gpu_utilization_percent", labels1) not in values  # N/A is not 0

    metrics.observe_gpus({"gpus": [gpu(0, 50, 30.0)]})
    values = samples(metrics)
    assert values[("mistudio_gpu_utilization_percent", labels0)] == 50
    assert ("mistudio_gpu_memory_utilization_percent", labels1) not in values


def test_queue_and_running_jobs() -> None:
    metrics = DaemonMetrics()
    metrics.observe_queue({"queued": 3, "running": 2}, {"train": 1, "find": 1})
    values = samples(metrics)
    assert values[("mistudio_queue_depth", ())] == 3
    assert values[("mistudio_training_jobs_active", ())] == 1
    assert values[("mistudio_jobs_running", (("kind", "find"),))] == 1

    metrics.observe_queue({}, {"eval": 2})
    values = samples(metrics)
    assert values[("mistudio_queue_depth", ())] == 0
    assert values[("mistudio_training_jobs_active", ())] == 0
    assert values[("mistudio_jobs_running", (("kind", "train"),))] == 0
    assert values[("mistudio_jobs_running", (("kind", "eval"),))] == 2


def test_outcomes_loads_and_throughput() -> None:
    metrics = DaemonMetrics()
    metrics.job_finished("train", "succeeded")
    metrics.job_finished("train", "succeeded")
    metrics.job_finished("find", "failed")
    metrics.model_loaded(0.3)
    metrics.model_loaded(700.0)
    metrics.extraction_throughput(12, 5000.0)
    values = samples(metrics)
    outcome = "mistudio_job_outcomes_total"
    assert values[(outcome, (("kind", "train"), ("state", "succeeded")))] == 2
    assert values[(outcome, (("kind", "find"), ("state", "failed")))] == 1
    assert values[("mistudio_model_loading_duration_seconds_count", ())] == 2
    assert values[("mistudio_model_loading_duration_seconds_sum", ())] == 700.3
    assert values[("mistudio_model_loading_duration_seconds_bucket", (("le", "0.5"),))] == 1
    assert values[("mistudio_model_loading_duration_seconds_bucket", (("le", "1800.0"),))] == 2
    assert values[("mistudio_feature_extraction_throughput", (("job", "12"),))] == 5000.0

    metrics.forget_job(12)
    metrics.forget_job(12)  # forgetting twice, or a job that never reported, is harmless
    assert ("mistudio_feature_extraction_throughput", (("job", "12"),)) not in samples(metrics)


def test_registries_are_separate() -> None:
    first, second = DaemonMetrics(), DaemonMetrics()
    first.job_finished("train", "cancelled")
    assert not any(name == "mistudio_job_outcomes_total" for name, _ in samples(second))


def test_http_endpoint() -> None:
    metrics = DaemonMetrics()
    metrics.observe_queue({"queued": 4}, {})
    port = free_port()
    metrics.serve(port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert "mistudio_queue_depth 4.0" in body
        with pytest.raises(MistudioError, match="already"):
            metrics.serve(port)
    finally:
        metrics.close()
    metrics.close()


def test_port_in_use_is_a_user_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MistudioError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            DaemonMetrics().serve(port)
