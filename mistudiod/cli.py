"""`mistudio`: the command line (DESIGN.md section 7 is its contract).

Every command takes `--json` (one JSON document on stdout, nothing else there; progress and logs
go to stderr). Exit status: 0 success, 1 the job failed, 2 bad usage or input, with a message
and a hint on stderr (or in the JSON document).

Job commands (`train`, `eval`) run in-process with `--local`. The daemon that will run them
without `--local` is not part of this version, so they say so and exit 2 rather than guess.
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
    return parser


def _job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--local", action="store_true", help="run in this process, no daemon")
    parser.add_argument("--detach", action="store_true", help="print the job id and return")


# ----- commands --------------------------------------------------------------------------------


def _demo_model(args, progress) -> dict:
    from mistudio_core.demo import build_demo_model, demo_corpus_path

    path = build_demo_model(args.out, force=args.force, progress=progress.line)
    return {"path": str(path), "corpus": str(demo_corpus_path(path))}


def _check_memory(args, _progress) -> dict:
    from mistudio_core.memory import preflight
    from mistudio_core.models import ModelSpec, load_config

    spec = ModelSpec(args.model, revision=args.revision, token=_token(args))
    report = preflight(
        load_config(spec), model_id=args.model, layer=args.layer,
        context_size=args.context_size, d_sae=args.d_sae,
    )
    document = report.to_dict()
    if args.quantization != "auto":
        chosen = next(e for e in report.estimates if e.quantization == args.quantization)
        document["asked"] = {"quantization": args.quantization, "fits": chosen.fits}
    document["summary"] = report.summary()
    return document


def _train(args, progress) -> dict:
    from mistudio_core.activations import ExtractionConfig
    from mistudio_core.runs import TrainJob, train_sae
    from mistudio_core.train import TrainConfig

    _require_local(args)
    train_config = TrainConfig(
        total_tokens=args.tokens, batch_tokens=args.batch_tokens, lr=args.lr, seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    job = TrainJob(
        model=_model_spec(args), hook=args.hook, corpus=args.corpus, out=str(args.out),
        architecture=args.arch, k=args.k, expansion=args.expansion, d_sae=args.d_sae,
        l1_coefficient=args.l1_coefficient, l0_coefficient=args.l0_coefficient,
        extraction=ExtractionConfig(context_size=args.context_size),
        train=train_config, text_field=args.text_field,
        cache=str(args.cache) if args.cache else None, resume=args.resume,
        eval_tokens=args.eval_tokens,
    )
    progress.start("training", train_config.total_steps, unit="step")
    return train_sae(job, progress.event).to_dict()


def _eval(args, progress) -> dict:
    from mistudio_core.runs import evaluate_saved

    _require_local(args)
    progress.start("evaluating", args.tokens, unit="tok")
    result = evaluate_saved(
        args.sae_dir, _model_spec(args), args.corpus, args.tokens, args.text_field,
        progress.event,
    )
    return {"path": str(args.sae_dir), "evaluation": result.to_dict(), "summary": result.summary()}


COMMANDS: dict[str, Callable] = {
    "demo-model": _demo_model,
    "check-memory": _check_memory,
    "train": _train,
    "eval": _eval,
}


def _require_local(args) -> None:
    if not args.local:
        raise MistudioError(
            f"`mistudio {args.command}` runs through the daemon, which this version does not "
            "include yet",
            hint="add --local to run it in this process",
            code="no_daemon",
        )
    if args.detach:
        raise MistudioError("--detach needs the daemon", hint="drop --detach with --local")


def _token(args) -> str | None:
    return args.hf_token or os.environ.get("HF_TOKEN")


def _model_spec(args):
    from mistudio_core.models import ModelSpec

    return ModelSpec(
        args.model, revision=args.revision, dtype=args.dtype, quantization=args.quantization,
        device=args.device, token=_token(args),
    )


class _Progress:
    """A progress bar and log lines on stderr; stdout stays for the result."""

    def __init__(self) -> None:
        self.bar = None

    def start(self, description: str, total: int, unit: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr,
                        dynamic_ncols=True, disable=None)

    def line(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def event(self, kind: str, payload: dict) -> None:
        if kind == "log":
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


def _render(command: str, document: dict) -> str:
    """The human-readable form of a command's result."""
    if "summary" in document:
        return document["summary"]
    if command == "train":
        metrics = document["final_metrics"]
        lines = [f"SAE saved in {document['path']} after {document['steps']} steps",
                 f"FVE {metrics.get('fve', float('nan')):.3f}  L0 {metrics.get('l0', 0):.1f}  "
                 f"dead {metrics.get('dead_pct', 0):.2f}%  MSE {metrics.get('mse', 0):.4g}"]
        if document.get("evaluation"):
            from mistudio_core.evals import EvalResult

            lines.append(EvalResult(**document["evaluation"]).summary())
        return "\n".join(lines)
    return "\n".join(f"{key}: {value}" for key, value in document.items())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wants_json = "--json" in argv
    progress = _Progress()
    try:
        args = build_parser().parse_args(argv)
        document = COMMANDS[args.command](args, progress)
        progress.close()
    except MistudioError as error:
        progress.close()
        return _fail(error.to_dict(), wants_json, EXIT_USAGE)
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
        print(_render(args.command, document))
    return EXIT_OK


def _fail(error: dict, wants_json: bool, status: int) -> int:
    if wants_json:
        print(json.dumps({"ok": False, "error": error}))
    else:
        print(f"mistudio: error: {error['message']}", file=sys.stderr)
        if error.get("hint"):
            print(f"hint: {error['hint']}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
