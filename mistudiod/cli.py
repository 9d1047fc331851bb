"""`mistudio`: the command line (DESIGN.md section 7 is its contract).

Every command takes `--json` (one JSON document on stdout, nothing else there; progress and logs
go to stderr). Exit status: 0 success, 1 the job failed, 2 bad usage or input, with a message
and a hint on stderr (or in the JSON document).

Job commands (`train`, `eval`) and `check-memory` go to the daemon (`mistudiod`) and wait for
the result with a progress bar; `--detach` returns the job id at once and `--local` runs them in
this process instead, through the same `mistudiod.jobs.run_job`. The control-plane commands
(`status`, `gpu`, `jobs`, `job ...`, `corpus ...`) always talk to the daemon; `--runtime-dir` /
`MISTUDIO_RUNTIME_DIR` says where it listens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from mistudio_core.errors import MistudioError
from mistudiod import remote

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors leave through MistudioError so `--json` can report them."""

    def error(self, message: str):
        raise MistudioError(message, hint=f"see `{self.prog} --help`", code="bad_usage")


def _positive_int(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--runtime-dir", type=Path,
                        help="the daemon's socket directory (MISTUDIO_RUNTIME_DIR)")


def _model_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required,
                        help="hub id, local directory, or `demo` (the offline demo model)")
    parser.add_argument("--revision", help="branch, tag or commit of a hub model")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "8bit", "4bit"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    parser.add_argument("--hf-token", help="token for private or gated models (or set HF_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mistudio", description="miStudio: SAEs for Hugging Face models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo-model", help="build (once) the offline demo causal LM")
    demo.add_argument("--out", type=Path, help="where to build it (default: the user cache)")
    demo.add_argument("--force", action="store_true", help="rebuild even if cached")
    _common(demo)

    memory = commands.add_parser("check-memory", help="will a model fit? (reads only its config)")
    memory.add_argument("model", help="hub id, local directory, or `demo`")
    memory.add_argument("--quantization", default="auto", choices=["auto", "none", "8bit", "4bit"])
    memory.add_argument("--layer", type=int, help="only blocks up to this layer will be loaded")
    memory.add_argument("--context-size", type=_positive_int, default=128)
    memory.add_argument("--d-sae", type=_positive_int, help="SAE width (default 16x hidden)")
    memory.add_argument("--revision")
    memory.add_argument("--hf-token")
    memory.add_argument("--local", action="store_true",
                        help="price it against this machine's devices, without the daemon")
    _common(memory)

    train = commands.add_parser("train", help="train an SAE on a model's activations")
    _model_options(train)
    train.add_argument(
        "--hook", required=True, help="layers.L.resid_post|resid_pre|mlp_out|attn_out"
    )
    train.add_argument("--corpus", required=True, help=".txt, .jsonl or .parquet (or `demo`)")
    train.add_argument("--text-field", default="text", help="JSONL/Parquet field with the text")
    train.add_argument("--out", required=True, type=Path, help="the SAE directory to write")
    train.add_argument("--arch", default="topk", choices=["topk", "batchtopk", "jumprelu", "relu"])
    train.add_argument("--k", type=_positive_int, default=32)
    width = train.add_mutually_exclusive_group()
    width.add_argument("--expansion", type=_positive_int, default=16)
    width.add_argument("--d-sae", type=_positive_int)
    train.add_argument("--tokens", type=_positive_int, default=2_000_000)
    train.add_argument("--context-size", type=_positive_int, default=128)
    train.add_argument("--batch-tokens", type=_positive_int, default=4096)
    train.add_argument("--lr", type=float, help="default: 2e-4 / sqrt(d_sae / 16384)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--l1-coefficient", type=float, default=5.0, help="relu only")
    train.add_argument("--l0-coefficient", type=float, default=0.01, help="jumprelu only")
    train.add_argument("--cache", type=Path, help="activation cache directory to reuse or fill")
    train.add_argument(
        "--eval-tokens", type=int, default=0,
        help="evaluate on the corpus's first N tokens after training (for a held-out score, "
        "run `mistudio eval` on other text)",
    )
    train.add_argument("--checkpoint-every", type=_positive_int, default=200, help="steps")
    train.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    _job_options(train)
    _common(train)

    evaluate = commands.add_parser("eval", help="evaluate a trained SAE")
    evaluate.add_argument("sae_dir", type=Path)
    _model_options(evaluate)
    evaluate.add_argument("--corpus", required=True)
    evaluate.add_argument("--text-field", default="text")
    evaluate.add_argument("--tokens", type=_positive_int, default=100_000)
    _job_options(evaluate)
    _common(evaluate)

    for name, text in (("status", "the daemon's status"), ("gpu", "the GPUs, as the daemon "
                                                            "sees them")):
        _common(commands.add_parser(name, help=text))
    listing = commands.add_parser("jobs", help="list the daemon's jobs")
    listing.add_argument("--limit", type=_positive_int, default=50)
    _common(listing)
    job = commands.add_parser("job", help="one job: show, cancel, logs, metrics, result")
    job.add_argument("action", choices=sorted(remote.JOB_ACTIONS))
    job.add_argument("id", type=_positive_int)
    _common(job)
    corpus = commands.add_parser("corpus", help="corpora in the daemon's store")
    corpus_actions = corpus.add_subparsers(dest="action", required=True, parser_class=_Parser)
    add = corpus_actions.add_parser("add", help="upload a .txt, .jsonl or .parquet file")
    add.add_argument("file", type=Path)
    add.add_argument("--name", help="its name in the store (default: the file's name)")
    _common(add)
    _common(corpus_actions.add_parser("list", help="list the uploaded corpora"))
    commands.add_parser("tui", help="the terminal dashboard (as `mistudio-tui`; its options "
                                    "follow)", add_help=False)
    return parser


def _job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--local", action="store_true", help="run in this process, no daemon")
    parser.add_argument("--detach", action="store_true", help="print the job id and return")
    parser.add_argument("--priority", type=int, default=0, help="higher runs first (-100..100)")
    parser.add_argument("--retries", type=int, default=0,
                        help="times to resume the job from its checkpoint after a crash")


# ----- commands --------------------------------------------------------------------------------


def _demo_model(args, progress) -> dict:
    from mistudio_core.demo import build_demo_model, demo_corpus_path

    path = build_demo_model(args.out, force=args.force, progress=progress.line)
    return {"path": str(path), "corpus": str(demo_corpus_path(path))}


def _check_memory(args, _progress) -> dict:
    if not args.local:
        return remote.call(args, remote.check_memory)
    from mistudio_core.memory import check_memory
    from mistudio_core.models import ModelSpec

    return check_memory(
        ModelSpec(args.model, revision=args.revision, token=_token(args)),
        quantization=args.quantization, layer=args.layer, context_size=args.context_size,
        d_sae=args.d_sae,
    )


def _train_params(args) -> dict:
    return {
        **_model_params(args), "hook": args.hook, "corpus": args.corpus,
        "text_field": args.text_field, "out": str(args.out), "arch": args.arch, "k": args.k,
        "expansion": args.expansion, "d_sae": args.d_sae, "tokens": args.tokens,
        "context_size": args.context_size, "batch_tokens": args.batch_tokens, "lr": args.lr,
        "seed": args.seed, "l1_coefficient": args.l1_coefficient,
        "l0_coefficient": args.l0_coefficient,
        "cache": str(args.cache) if args.cache else None, "eval_tokens": args.eval_tokens,
        "checkpoint_every": args.checkpoint_every, "resume": args.resume,
    }


def _eval_params(args) -> dict:
    return {**_model_params(args), "sae_dir": str(args.sae_dir), "corpus": args.corpus,
            "text_field": args.text_field, "tokens": args.tokens}


def _model_params(args) -> dict:
    return {"model": args.model, "revision": args.revision, "dtype": args.dtype,
            "quantization": args.quantization, "device": args.device}


def _job(kind: str, build_params: Callable) -> Callable:
    """A job command: in this process with --local, else submitted to the daemon."""

    def command(args, progress) -> dict:
        params = build_params(args)
        if args.local:
            if args.detach:
                raise MistudioError("--detach needs the daemon", hint="drop --detach or --local")
            from mistudiod.jobs import run_job, validate_params

            return run_job(kind, validate_params(kind, params), progress.event,
                           token=_token(args))
        if args.hf_token:
            raise MistudioError(
                "the daemon uses its own Hugging Face token, not --hf-token",
                hint="set HF_TOKEN in the daemon's environment (or `hf auth login` as its "
                     "user), or add --local", code="bad_usage")
        for name in params.keys() & {"model", "corpus", "sae_dir"}:
            params[name] = remote.input_path(params[name])
        for name in params.keys() & {"out", "cache"}:
            params[name] = remote.output_path(params[name])
        return remote.call(args, remote.submit_and_wait, kind, params, progress)

    return command


def _corpus(args, progress) -> dict:
    if args.action == "add":
        return remote.call(args, remote.corpus_add, progress)
    return remote.call(args, remote.corpus_list)


def _daemon(command: Callable) -> Callable:
    return lambda args, _progress: remote.call(args, command)


COMMANDS: dict[str, Callable] = {
    "demo-model": _demo_model,
    "check-memory": _check_memory,
    "train": _job("train", _train_params),
    "eval": _job("eval", _eval_params),
    "status": _daemon(remote.status),
    "gpu": _daemon(remote.gpu),
    "jobs": _daemon(remote.jobs),
    "job": _daemon(remote.job_command),
    "corpus": _corpus,
}


def _token(args) -> str | None:
    return args.hf_token or os.environ.get("HF_TOKEN")


class _Progress:
    """A progress bar and log lines on stderr; stdout stays for the result."""

    def __init__(self) -> None:
        self.bar = None

    def start(self, description: str, total: int, unit: str) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr,
                        dynamic_ncols=True, disable=None)

    def line(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def event(self, kind: str, payload: dict) -> None:
        if kind == "start":
            self.start(payload["description"], payload["total"], payload["unit"])
        elif kind == "log":
            self.line(payload["message"])
        elif kind == "metrics" and self.bar is not None:
            figures = {"loss": f"{payload['loss']:.4f}", "fve": f"{payload['fve']:.3f}",
                       "l0": f"{payload['l0']:.1f}", "dead": f"{payload['dead_pct']:.1f}%"}
            if self.bar.disable:  # not a terminal (a log file, a pipe): one line per report
                text = "  ".join(f"{name} {value}" for name, value in figures.items())
                self.line(f"step {payload['step']}/{self.bar.total}  {text}  "
                          f"{payload['tokens_per_s']:.0f} tok/s")
                return
            self.bar.n = payload["step"]
            self.bar.set_postfix(figures, refresh=False)
            self.bar.refresh()
        elif kind == "progress" and self.bar is not None:
            self.bar.n = payload["tokens"]
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _render(args, document: dict) -> str:
    """The human-readable form of a command's result."""
    command = args.command
    if "summary" in document:
        return document["summary"]
    if "job" in document and command in ("train", "eval", "job"):
        return _render_job(document["job"])
    if command == "train":
        metrics = document["final_metrics"]
        lines = [f"SAE saved in {document['path']} after {document['steps']} steps",
                 f"FVE {metrics.get('fve', float('nan')):.3f}  L0 {metrics.get('l0', 0):.1f}  "
                 f"dead {metrics.get('dead_pct', 0):.2f}%  MSE {metrics.get('mse', 0):.4g}"]
        if document.get("evaluation"):
            from mistudio_core.evals import EvalResult

            lines.append(EvalResult(**document["evaluation"]).summary())
        return "\n".join(lines)
    if command == "status":
        jobs = document["jobs"]
        gpus = document["gpus"]
        return "\n".join([
            f"mistudiod {document['version']} (pid {document['pid']}), up "
            f"{document['uptime_s']:.0f} s; {document['runtime_dir']}",
            f"jobs: {jobs['running']} running (max {document['max_jobs']}), {jobs['queued']} "
            f"queued, {jobs['succeeded']} succeeded, {jobs['failed']} failed, "
            f"{jobs['cancelled']} cancelled",
            f"GPUs: {gpus['count']}" if gpus["available"] else f"GPUs: none ({gpus['reason']})",
        ])
    if command == "gpu":
        from mistudiod.gpus import format_gpus

        return format_gpus(document)
    if command == "jobs":
        return "\n".join([f"{'ID':>5}  {'STATE':<10} {'KIND':<6} {'PROGRESS':>8}  MODEL"] + [
            f"{j['id']:>5}  {j['state']:<10} {j['kind']:<6} {100 * j['progress']:>7.1f}%  "
            f"{j['params'].get('model', '')}" for j in document["jobs"]])
    if "logs" in document:
        return "\n".join(entry["message"] for entry in document["logs"])
    if "points" in document:
        return "\n".join(f"step {p['step']}: loss {p['loss']:.4f} FVE {p['fve']:.3f} "
                         f"L0 {p['l0']:.1f} dead {p['dead_pct']:.1f}%"
                         for p in document["points"])
    if "corpora" in document:
        return "\n".join(f"{c['name']:<40} {c['size']:>12} B  {c['sha256'][:12]}"
                         for c in document["corpora"]) or "no corpora uploaded yet"
    if "corpus" in document:
        corpus = document["corpus"]
        return f"uploaded {corpus['name']} ({corpus['size']} bytes, sha256 {corpus['sha256']})"
    return "\n".join(f"{key}: {value}" for key, value in document.items() if key != "ok")


def _render_job(job: dict) -> str:
    lines = [f"job {job['id']} ({job['kind']}): {job['state']}, attempt {job['attempt']}, "
             f"step {job['step']}/{job['total_steps']}, on {job['device'] or '-'}"]
    if job.get("error"):
        lines.append(f"error: {job['error']['message']}")
    if job.get("result") and job["result"].get("path"):
        lines.append(f"result: {job['result']['path']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tui"]:  # the dashboard parses its own options
        from tui.app import main as tui_main

        return tui_main(argv[1:])
    wants_json = "--json" in argv
    progress = _Progress()
    try:
        args = build_parser().parse_args(argv)
        document = COMMANDS[args.command](args, progress)
        progress.close()
    except MistudioError as error:
        progress.close()
        return _fail(error.to_dict(), wants_json, EXIT_USAGE)
    except remote.JobFailed as failure:
        progress.close()
        return _fail(failure.error, wants_json, failure.status, job=failure.job)
    except KeyboardInterrupt:
        progress.close()
        return _fail({"code": "interrupted", "message": "interrupted",
                      "hint": "rerun with --resume to continue a training run"},
                     wants_json, EXIT_FAILED)
    except Exception as error:  # a bug or an environment failure: the job failed
        progress.close()
        traceback.print_exc(file=sys.stderr)
        return _fail({"code": "job_failed", "message": f"{type(error).__name__}: {error}",
                      "hint": "see the traceback above; please report it if it looks like a bug"},
                     wants_json, EXIT_FAILED)
    if wants_json:
        print(json.dumps({"ok": True, **document}, default=str))
    else:
        print(_render(args, document))
    return EXIT_OK


def _fail(error: dict, wants_json: bool, status: int, **extra) -> int:
    if wants_json:
        print(json.dumps({"ok": False, "error": error, **extra}, default=str))
    else:
        print(f"mistudio: error: {error['message']}", file=sys.stderr)
        if error.get("hint"):
            print(f"hint: {error['hint']}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
