"""Round-trip latency of `daemon.status` with 50 concurrent clients, idle and under training.

Target (issue 3): p99 under 5 ms with 50 clients while a training job runs, and at least 8 jobs
running at once on a machine with room for them.

Baseline, measured in the same run: a bare echo server speaking the same signed protocol over
the same kind of socket (a ROUTER that checks the signature and replies), so the ratio is the
daemon's own cost on top of ZeroMQ + msgpack + HMAC. Phases:
  echo     the bare echo server
  idle     the daemon with no job
  1 job    the daemon while one training job runs (the target)
  8 jobs   the daemon with `--max-jobs 8` and eight training jobs running

    python bench/daemon_latency.py [--clients 50] [--requests 200] [--model demo]

Clients run in several processes (`--procs`), so the load generator is not one busy event loop.
Each client sends `--rate` requests per second (default 10, a dashboard refreshing: 500 requests
a second in all), at a random phase; `--rate 0` sends back to back, which measures throughput
instead (latency is then just 50 clients queueing behind each other).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq
import zmq.asyncio

from mistudiod.client import Client
from mistudiod.protocol import ConnectionInfo, ProtocolError, Session, new_key


def _echo_server(endpoint: str, key: str) -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(endpoint)
    session = Session(key.encode())
    while True:
        frames = router.recv_multipart()
        try:
            message = session.deserialize(frames)
        except ProtocolError:
            continue
        router.send_multipart(session.reply(message, {"ok": True, "echo": True}))


async def _clients(runtime_dir: str, n_clients: int, n_requests: int,
                   rate: float) -> list[float]:
    latencies: list[float] = []
    interval = 1 / rate if rate else 0.0

    async def one() -> None:
        async with Client(runtime_dir, timeout=30) as client:
            for _ in range(5):  # warm-up: connect, first allocations
                await client.request("daemon.status")
            await asyncio.sleep(random.random() * interval)
            next_start = time.perf_counter()
            for _ in range(n_requests):
                await asyncio.sleep(max(0.0, next_start - time.perf_counter()))
                start = time.perf_counter()
                await client.request("daemon.status")
                latencies.append(time.perf_counter() - start)
                next_start = start + interval

    await asyncio.gather(*(one() for _ in range(n_clients)))
    return latencies


def _client_process(runtime_dir: str, n_clients: int, n_requests: int, rate: float,
                    results) -> None:
    results.put(asyncio.run(_clients(runtime_dir, n_clients, n_requests, rate)))


def measure(runtime_dir: Path, clients: int, requests: int, procs: int, rate: float) -> dict:
    results = multiprocessing.Queue()
    share = [clients // procs + (i < clients % procs) for i in range(procs)]
    workers = [multiprocessing.Process(target=_client_process,
                                       args=(str(runtime_dir), n, requests, rate, results))
               for n in share if n]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    latencies = [x for _ in workers for x in results.get()]
    for worker in workers:
        worker.join()
    latencies.sort()
    return {"n": len(latencies), "p50_ms": 1e3 * statistics.median(latencies),
            "per_s": len(latencies) / (time.perf_counter() - started),
            "p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))],
            "max_ms": 1e3 * latencies[-1]}


def start_echo(root: Path) -> tuple[multiprocessing.Process, Path]:
    runtime = root / "echo"
    runtime.mkdir(mode=0o700)
    key = new_key()
    endpoint = f"ipc://{runtime / 'ctl.sock'}"
    ConnectionInfo(key=key, control=endpoint, events=f"ipc://{runtime / 'ev.sock'}").write(
        runtime / "connection.json")
    server = multiprocessing.Process(target=_echo_server, args=(endpoint, key), daemon=True)
    server.start()
    time.sleep(0.5)
    return server, runtime


def start_daemon(root: Path, max_jobs: int) -> tuple[subprocess.Popen, Path]:
    runtime = root / f"run{max_jobs}"
    process = subprocess.Popen(
        [sys.executable, "-m", "mistudiod", "--state-dir", str(root / f"state{max_jobs}"),
         "--runtime-dir", str(runtime), "--max-jobs", str(max_jobs), "--log-level", "warning"],
    )
    deadline = time.time() + 60
    while not (runtime / "connection.json").exists():
        if time.time() > deadline or process.poll() is not None:
            raise SystemExit("mistudiod did not start")
        time.sleep(0.1)
    return process, runtime


async def _submit_and_wait_running(runtime: Path, n_jobs: int, model: str, root: Path) -> int:
    async with Client(runtime, timeout=60) as client:
        for i in range(n_jobs):
            await client.request("job.submit", {"kind": "train", "params": {
                "model": model, "corpus": "demo", "hook": "layers.1.resid_post",
                "tokens": 10**9, "out": str(root / f"sae-{runtime.name}-{i}"),
                "expansion": 4, "checkpoint_every": 10**6}})
        deadline = time.time() + 600
        while time.time() < deadline:
            jobs = (await client.request("job.list", {"states": ["running"]}))["jobs"]
            training = [j for j in jobs if j["step"] > 0]
            if len(training) >= n_jobs:
                return len(training)
            await asyncio.sleep(1.0)
    raise SystemExit(f"only {len(training)} of {n_jobs} jobs reached training in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--procs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=10.0, help="requests/s per client")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--jobs", type=int, default=8)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mstd-bench-"))
    print(f"{args.clients} clients x {args.requests} requests at {args.rate:g}/s each, "
          f"{os.cpu_count()} CPUs")

    def report(name: str, figures: dict, baseline: dict | None) -> None:
        ratio = f"  p99 {figures['p99_ms'] / baseline['p99_ms']:.2f}x echo" if baseline else ""
        print(f"{name:<8} p50 {figures['p50_ms']:6.2f} ms  p99 {figures['p99_ms']:6.2f} ms  "
              f"max {figures['max_ms']:7.2f} ms  {figures['per_s']:6.0f} req/s{ratio}", flush=True)

    echo, echo_dir = start_echo(root)
    baseline = measure(echo_dir, args.clients, args.requests, args.procs, args.rate)
    echo.terminate()
    report("echo", baseline, None)
    phases = [(4, 0, "idle"), (4, 1, "1 job")]
    if args.jobs > 1:  # --jobs 0 or 1 skips the many-jobs phase
        phases.append((args.jobs, args.jobs, f"{args.jobs} jobs"))
    for max_jobs, n_jobs, name in phases:
        daemon, runtime = start_daemon(root, max_jobs)
        try:
            running = 0
            if n_jobs:
                running = asyncio.run(_submit_and_wait_running(runtime, n_jobs, args.model,
                                                               root))
            figures = measure(runtime, args.clients, args.requests, args.procs, args.rate)
            report(name, figures, baseline)
            if n_jobs:
                verdict = "PASS" if figures["p99_ms"] < 5 else "FAIL"
                print(f"         {running} jobs training during the measurement; "
                      f"p99 < 5 ms: {verdict}", flush=True)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)


if __name__ == "__main__":
    main()
