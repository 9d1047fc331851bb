"""Benchmark: time to the first streamed token of monitor and steer, against a bare forward pass.

The model is loaded once (the demo model, built on first use, or `--model PATH`) with its LM
head, and a random TopK SAE (`--expansion` x hidden wide, k `--k`) is put at `--hook`. The
prompt is English text cut to `--prompt-tokens` tokens as the monitor sees them (BOS included).
Each candidate below runs until its first `on_token` call and is then stopped (an exception
raised from the callback, which also checks that the sessions clean up after one):

- baseline: a bare forward pass of the prompt through the whole model and its LM head
  (`model.forward(ids)` under `torch.inference_mode`), no hooks;
- `Monitor.read(text)`: the first token's report (one pass stopped after the hook + encode);
- `Monitor.generate(text)`: the first streamed report, which is the prompt's first token's (the
  prompt's pass with the KV cache and the LM head on the last position only, + encode): the
  prompt is streamed before anything is sampled;
- `steer(...)` with one `add` steering whose a_max is known (as after `mistudio find`): the first
  streamed token (one batched pass of baseline + steered rows, the edit hook, the samples);
- `steer(...)` with no find statistics: the same; the default a_max (mean ||h|| over the prompt
  at the hook) is measured on the unedited baseline row inside that same pass, so no extra pass.

The sessions compute the LM head on the last position only (`logits_to_keep`), the bare pass on
every position (about 8% of its time on the demo model), as a plain `model(ids)` does.

With `--daemon`, the same through a real daemon as the CLI and the TUI use it: a `mistudiod`
on a temporary directory, one session opened on the same model and SAE (the model stays loaded
in its model host), and for `session.monitor` (read and generate) and `session.steer` the time
from sending the request to the first token event arriving on `session.<id>` (ZeroMQ from the
client to the daemon to the host, and the event back the same way; the run is then cancelled).
The bare pass is still this process's own; the host process runs with the same thread count.
These are timed in a second interleaved run, each candidate, the bare pass included, starting
`SETTLE_S` after the last one ended (see there why).

All run interleaved (order rotated every round, warm-up rounds discarded) and each ratio is the
median of the per-round ratios to the baseline. Target: first token within 2x the bare pass.

    python bench/interactive.py                       # demo model, 64-token prompt
    python bench/interactive.py --daemon              # also through daemon sessions
    python bench/interactive.py --model PATH --hook layers.5.resid_post --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

import torch

try:
    from bench import _common as common
    from bench.daemon_latency import start_daemon
except ImportError:  # run as `python bench/interactive.py`
    import _common as common
    from daemon_latency import start_daemon

from mistudio_core.hooks import HookPoint
from mistudio_core.models import ModelSpec, load_model
from mistudio_core.monitor import Monitor
from mistudio_core.sae import SAEConfig, SAEMetadata, SparseAutoencoder, load_sae, save_sae
from mistudio_core.steer import Steering, steer

TARGET_RATIO = 2.0
# With --daemon: the pause before each candidate. The bench runs torch (its bare pass) while a
# real client does not, and the OpenMP threads of its last op spin on for a few ms, on the cores
# the model host needs (without the pause, a session's first token measured 2.0-2.5x a bare pass
# instead of ~1.05-1.3x).
SETTLE_S = 0.05
DAEMON_BASELINE = "bare forward pass (after the pause)"
PARAGRAPH = (
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp. "
    "Ships passing the rocky coast relied on its beam to find the harbour in the fog, and the "
    "keeper wrote the weather, the wind and the names of the ships in a worn leather book. "
    "In winter the storms were fierce and the waves broke over the rocks below the tower. "
)


class _FirstToken(Exception):
    """Raised from on_token to stop a session at its first streamed token."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo",
                        help="a local model directory or hub id (default: the demo model)")
    parser.add_argument("--hook", default="layers.2.resid_post")
    parser.add_argument("--expansion", type=int, default=16, help="d_sae = expansion x hidden")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=21,
                        help="interleaved rounds measured (median taken)")
    parser.add_argument("--warmup", type=int, default=3, help="rounds run first and discarded")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--daemon", action="store_true",
                        help="also time the first token event of daemon sessions")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser.parse_args(argv)


def _random_sae(directory: str, model, args) -> str:
    torch.manual_seed(0)
    d_in = model.hidden_size
    sae = SparseAutoencoder(SAEConfig("topk", d_in, args.expansion * d_in, k=args.k))
    context = max(args.prompt_tokens + 8, 128)
    metadata = SAEMetadata(model_name=model.spec.model_id, hook_name=args.hook,
                           context_size=context)
    return str(save_sae(sae, directory, metadata, {}))


def _prompt(monitor: Monitor, tokens: int) -> tuple[str, list[int]]:
    """English text whose token ids (as the monitor sees them, BOS included) are `tokens` long
    (or as close as re-tokenizing the cut text allows)."""
    tokenizer = monitor.model.tokenizer
    text = PARAGRAPH
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += PARAGRAPH
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = 1 if monitor.prepend_bos else 0
    text = tokenizer.decode(ids[:tokens - bos])
    return text, monitor.token_ids(text, "prompt")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet = args.json
    environment = common.environment()
    HookPoint.parse(args.hook)
    common.log(f"loading {args.model} ...", quiet)
    model = load_model(ModelSpec(args.model, device=args.device), with_lm_head=True)
    sync = common.synchronizer(model.device)
    with tempfile.TemporaryDirectory(prefix="bench-interactive-") as directory:
        loaded = load_sae(_random_sae(directory, model, args))
        monitor = Monitor(model, {"sae": loaded})
        text, ids = _prompt(monitor, args.prompt_tokens)
        input_ids = torch.tensor([ids], device=model.device)
        feature = 0
        a_max = 10.0

        def first(*_args) -> None:
            raise _FirstToken

        def until_first(run) -> None:
            try:
                run()
            except _FirstToken:
                return
            raise RuntimeError("the session ended without streaming a token")

        def bare() -> None:
            with torch.inference_mode():
                model.forward(input_ids)

        candidates = {
            "bare forward pass": bare,
            "monitor read": lambda: until_first(lambda: monitor.read(text, on_token=first)),
            "monitor generate": lambda: until_first(lambda: monitor.generate(
                text, max_new_tokens=8, on_token=first, stop_at_eos=False)),
            "steer (a_max known)": lambda: until_first(lambda: steer(
                model, {"sae": loaded}, text, [Steering(feature, 2.0, a_max=a_max)],
                max_new_tokens=8, stop_at_eos=False, on_token=first)),
            "steer (no find: prompt-norm a_max)": lambda: until_first(lambda: steer(
                model, {"sae": loaded}, text, [Steering(feature, 2.0)], max_new_tokens=8,
                stop_at_eos=False, on_token=first, a_max_lookup=lambda *_: None)),
        }
        common.log(f"timing {len(candidates)} candidates, {args.repeats} interleaved rounds "
                   f"({args.warmup} warm-up) ...", quiet)
        rows = _rows(common.interleaved(candidates, args.repeats, args.warmup, sync),
                     "bare forward pass")
        if args.daemon:
            with _daemon_sessions(args, loaded.path, text, feature, a_max, quiet) as sessions:
                common.log(f"timing {len(sessions)} daemon sessions against the bare pass, "
                           f"each after a {SETTLE_S * 1e3:g} ms pause ...", quiet)
                rows.update(_rows(common.interleaved(
                    {DAEMON_BASELINE: bare, **sessions}, args.repeats, args.warmup, sync,
                    settle_s=SETTLE_S), DAEMON_BASELINE))
        hooks_left = sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                         for m in model.model.modules())
    document = {
        "benchmark": "interactive",
        "config": {"model": args.model, "hook": args.hook, "d_in": model.hidden_size,
                   "d_sae": loaded.sae.config.d_sae, "k": args.k, "prompt_tokens": len(ids),
                   "repeats": args.repeats, "warmup": args.warmup, "device": str(model.device)},
        "environment": environment,
        "baseline": "a bare forward pass of the prompt (whole model + LM head, no hooks)",
        "target_ratio": TARGET_RATIO,
        "first_token": rows,
        "hooks_left_after": hooks_left,
    }
    text_report = [
        f"time to the first streamed token: {args.model} ({len(model.blocks)} layers, hidden "
        f"{model.hidden_size}), SAE at {args.hook} (TopK, d_sae {loaded.sae.config.d_sae}, "
        f"k {args.k}), {len(ids)}-token prompt, {model.device}, {torch.get_num_threads()} "
        f"threads, {args.repeats} rounds",
        "baseline: a bare forward pass of the prompt (whole model + LM head, no hooks)",
        "",
        common.table(["session", "median ms", "spread", "x bare pass", "target", "verdict"],
                     [[name, row["median_ms"], row["spread"], row["ratio"],
                       "-" if row["pass"] is None else f"<= {TARGET_RATIO:g}",
                       "-" if row["pass"] is None else common.verdict(row["pass"])]
                      for name, row in rows.items()]),
        "",
        f"forward hooks left on the model after all sessions: {hooks_left}",
    ]
    common.emit(document, "\n".join(text_report), args.json)
    return document


def _rows(times: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """Each candidate's median, spread and ratio to `baseline` (its row has no verdict)."""
    rows = {}
    for name, values in times.items():
        ratio = common.paired_ratio(values, times[baseline])
        rows[name] = {"median_ms": 1e3 * common.median(values), "spread": common.spread(values),
                      "ratio": ratio, "pass": None if name == baseline else ratio <= TARGET_RATIO}
    return rows


@contextlib.contextmanager
def _daemon_sessions(args, sae_dir: Path, text: str, feature: int, a_max: float, quiet: bool):
    """Candidates timing the first token event of daemon sessions (a daemon is started for
    them, and stopped when the block ends)."""
    from mistudiod.client import Client

    with tempfile.TemporaryDirectory(prefix="bench-sessions-") as root, \
            asyncio.Runner() as runner:
        process, runtime = start_daemon(Path(root), 1)
        try:
            client = Client(runtime)
            common.log("opening a daemon session (the model host loads the model) ...", quiet)
            opened = runner.run(client.request("session.open", {
                "model": args.model, "sae_dirs": [str(sae_dir)],
                "device": "cuda:0" if args.device == "cuda" else args.device},
                timeout=3600))
            session = opened["session"]
            client.subscribe(f"session.{session}")

            def first_event(msg_type: str, request: dict):
                return lambda: runner.run(_first_event(client, session, msg_type, request))

            yield {
                "session monitor read (daemon)": first_event(
                    "session.monitor", {"text": text}),
                "session monitor generate (daemon)": first_event(
                    "session.monitor", {"text": text, "max_new_tokens": 8}),
                "session steer (daemon, a_max known)": first_event("session.steer", {
                    "prompt": text, "max_new_tokens": 8, "stop_at_eos": False,
                    "steerings": [{"feature": feature, "strength": 2.0, "a_max": a_max}]}),
            }
            runner.run(client.close())
        finally:
            process.terminate()
            process.wait(30)


async def _first_event(client, session: str, msg_type: str, request: dict) -> common.Elapsed:
    """Send a run request and time its first token event; then cancel the run and read the rest
    of its events, so the next run starts on a quiet topic."""
    start = time.perf_counter()
    reply = asyncio.ensure_future(
        client.request(msg_type, {**request, "session": session}, timeout=600))
    elapsed = None
    while True:
        event = await client.next_event(timeout=60)
        if event is None:
            raise RuntimeError(f"no event from {msg_type} in 60 s")
        if elapsed is None and event.content["kind"] == "token":
            elapsed = time.perf_counter() - start
            await client.request("session.cancel", {"session": session})
        if event.content["kind"] == "end":
            break
    await reply
    return common.Elapsed(elapsed)


if __name__ == "__main__":
    main()
