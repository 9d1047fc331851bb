"""Prometheus metrics of the daemon: GPUs, the job queue, model loads, extraction throughput.

Each `DaemonMetrics` keeps its own `CollectorRegistry` rather than prometheus_client's global
one, so that tests, and several daemons in one process, never register a name twice. The daemon
feeds it from the readings it already takes (the 1 Hz GPU snapshot, the queue counts, job
outcomes); `render()` is the text exposition format and `serve()` puts it on an HTTP port.
"""

from __future__ import annotations

import contextlib
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from mistudio_core.errors import MistudioError

# Model loads take from a fraction of a second (the demo model, a warm cache) to half an hour
# (tens of GB from a slow disk, or quantizing on load).
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)


class DaemonMetrics:
    """The daemon's metrics in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.gpu_memory = Gauge(
            "mistudio_gpu_memory_utilization_percent", "Share of GPU memory in use (used/total)",
            ["gpu", "uuid"], registry=registry,
        )
        self.gpu_util = Gauge(
            "mistudio_gpu_utilization_percent", "GPU utilisation over NVML's last sample period",
            ["gpu", "uuid"], registry=registry,
        )
        self.training_jobs = Gauge(
            "mistudio_training_jobs_active", "Training jobs running now", registry=registry,
        )
        self.model_loading = Histogram(
            "mistudio_model_loading_duration_seconds", "Time to load a model",
            buckets=LOAD_BUCKETS, registry=registry,
        )
        self.extraction = Gauge(
            "mistudio_feature_extraction_throughput", "Tokens per second of a running extraction",
            ["job"], registry=registry,
        )
        self.queue_depth = Gauge(
            "mistudio_queue_depth", "Jobs queued and not yet running", registry=registry,
        )
        self.jobs_running = Gauge(
            "mistudio_jobs_running", "Jobs running now, by kind", ["kind"], registry=registry,
        )
        self.job_outcomes = Counter(
            "mistudio_job_outcomes", "Jobs finished, by kind and final state",
            ["kind", "state"], registry=registry,
        )
        # GPU label sets of the last reading, so that a GPU that disappears stops being reported.
        self._gpu_labels: set[tuple[str, str]] = set()
        self._kinds: set[str] = set()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_gpus(self, snapshot: dict) -> None:
        """Record a `GpuMonitor.snapshot()`; a field NVML could not read is left out."""
        seen: set[tuple[str, str]] = set()
        for gpu in snapshot["gpus"]:
            labels = (str(gpu["index"]), gpu["uuid"] or "")
            seen.add(labels)
            for gauge, value in ((self.gpu_memory, gpu["memory_util_percent"]),
                                 (self.gpu_util, gpu["util_percent"])):
                if value is None:
                    _remove(gauge, labels)
                else:
                    gauge.labels(*labels).set(value)
        for labels in self._gpu_labels - seen:
            _remove(self.gpu_memory, labels)
            _remove(self.gpu_util, labels)
        self._gpu_labels = seen

    def observe_queue(self, counts: dict[str, int], running_by_kind: dict[str, int]) -> None:
        """Record the queue: `counts` is jobs per state, `running_by_kind` running jobs per kind.

        A kind seen before and now absent drops to 0 rather than vanishing, so that a graph of it
        shows the drop.
        """
        self.queue_depth.set(counts.get("queued", 0))
        self.training_jobs.set(running_by_kind.get("train", 0))
        for kind in self._kinds - running_by_kind.keys():
            self.jobs_running.labels(kind).set(0)
        for kind, running in running_by_kind.items():
            self.jobs_running.labels(kind).set(running)
        self._kinds |= running_by_kind.keys()

    def job_finished(self, kind: str, state: str) -> None:
        """Count a job that ended in `state` (succeeded, failed or cancelled)."""
        self.job_outcomes.labels(kind, state).inc()

    def model_loaded(self, seconds: float) -> None:
        """Record how long a model took to load."""
        self.model_loading.observe(seconds)

    def extraction_throughput(self, job_id: int, tokens_per_s: float) -> None:
        """Record a running extraction's current speed."""
        self.extraction.labels(str(job_id)).set(tokens_per_s)

    def forget_job(self, job_id: int) -> None:
        """Drop a finished job's throughput, so that a dead job does not report a speed."""
        _remove(self.extraction, (str(job_id),))

    def render(self) -> bytes:
        """Every metric in Prometheus' text format."""
        return generate_latest(self.registry)

    def serve(self, port: int, address: str = "127.0.0.1") -> WSGIServer:
        """Serve `/metrics` on `address:port` from a background thread; `close()` stops it.

        Raises MistudioError when the port cannot be bound (in use, or privileged).
        """
        if self._server is not None:
            raise MistudioError("the metrics endpoint is already being served", code="busy")
        try:
            self._server, self._thread = start_http_server(
                port, addr=address, registry=self.registry,
            )
        except OSError as error:
            raise MistudioError(
                f"cannot serve metrics on {address}:{port}: {error.strerror or error}",
                hint="pick a free port, or stop whatever is listening on that one",
                code="port_unavailable",
            ) from error
        return self._server

    def close(self) -> None:
        """Stop serving, if serving; the metrics themselves stay readable through `render()`."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None


def _remove(metric: Gauge, labels: tuple[str, ...]) -> None:
    """Remove one labelled child, if it exists (older prometheus_client releases raise KeyError
    for a missing one, newer ones ignore it)."""
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
