"""`mistudio`: the command line (DESIGN.md section 7 is its contract).

Every command takes `--json` (one JSON document on stdout, nothing else there; progress and logs
go to stderr). Exit status: 0 success, 1 the job failed, 2 bad usage or input, with a message
and a hint on stderr (or in the JSON document).

Job commands (`train`, `eval`, `find`, `explain`, `score`, `correlate`) and `check-memory` go to
the daemon (`mistudiod`) and wait for the result with a progress bar; `--detach` returns the job
id at once and `--local` runs them in this process instead, through the same
`mistudiod.jobs.run_job`. `features` and `feature` read what those jobs stored beside the SAE,
directly (no daemon), with the daemon's own `feature.*` functions. The control-plane commands
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
from typing import NamedTuple

from mistudio_core import units
from mistudio_core.errors import MistudioError
from mistudiod import remote
from mistudiod.jobs import PARAMS
from mistudiod.schema import Schema

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors leave through MistudioError so `--json` can report them."""

    def error(self, message: str):
        raise MistudioError(message, hint=f"see `{self.prog} --help`", code="bad_usage")


def _whole(low: float | None = None, high: float | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number as people type it (`4096`, `2.5e6`, `10k`, `1M`),
    within `low..high`."""

    def parse(text: str) -> int:
        value = units.parse_count(text)
        if value is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"{text} must be at least {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be at most {high:g}")
        return value

    return parse


def _field(parser, schema: Schema, flag: str, name: str | None = None, **options) -> None:
    """An option for a field of a request schema (a job's parameters, a daemon request), with
    the schema's default, choices and range: the daemon and the CLI cannot disagree on them.
    `name` is the field when it is not the option's own name."""
    spec = schema.fields[name or flag.removeprefix("--").replace("-", "_")]
    if spec.required:
        options.setdefault("required", True)
    if spec.kind is bool:
        options.setdefault("action", "store_true")
    else:
        options.setdefault("default", spec.default)
        if spec.choices is not None:
            options.setdefault("choices", spec.choices)
        if spec.kind is int:
            options.setdefault("type", _whole(spec.min, spec.max))
        elif spec.kind is float:
            options.setdefault("type", float)
    parser.add_argument(flag, **options)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--runtime-dir", type=Path,
                        help="the daemon's socket directory (MISTUDIO_RUNTIME_DIR)")


def _model_options(parser: argparse.ArgumentParser, kind: str) -> None:
    schema = PARAMS[kind]
    _field(parser, schema, "--model",
           help="hub id, local directory, or `demo` (the offline demo model)")
    _field(parser, schema, "--revision", help="branch, tag or commit of a hub model")
    _field(parser, schema, "--dtype")
    _field(parser, schema, "--quantization")
    _field(parser, schema, "--device", help="auto, cpu or cuda:N")
    parser.add_argument("--hf-token", help="token for private or gated models (or set HF_TOKEN)")


def _job_options(parser: argparse.ArgumentParser) -> None:
    from mistudiod.operations import OPERATIONS

    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run in this process, no daemon")
    where.add_argument("--detach", action="store_true", help="print the job id and return")
    submit = OPERATIONS["job.submit"].schema
    _field(parser, submit, "--priority", help="higher runs first (-100..100)")
    _field(parser, submit, "--retries", name="max_retries",
           help="times to resume the job from its checkpoint after a crash")


def build_parser() -> argparse.ArgumentParser:
    # The daemon's request schemas (torch-free; not imported for `mistudio tui`).
    from mistudiod.operations import OPERATIONS

    parser = _Parser(prog="mistudio", description="miStudio: SAEs for Hugging Face models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo-model", help="build (once) the offline demo causal LM")
    demo.add_argument("--out", type=Path, help="where to build it (default: the user cache)")
    demo.add_argument("--force", action="store_true", help="rebuild even if cached")
    _common(demo)

    memory = commands.add_parser("check-memory", help="will a model fit? (reads only its config)")
    request = OPERATIONS["model.check_memory"].schema
    memory.add_argument("model", help="hub id, local directory, or `demo`")
    _field(memory, request, "--quantization")
    _field(memory, request, "--layer", help="only blocks up to this layer will be loaded")
    _field(memory, request, "--context-size")
    _field(memory, request, "--d-sae", help="SAE width (default 16x hidden)")
    _field(memory, request, "--revision")
    memory.add_argument("--hf-token")
    memory.add_argument("--local", action="store_true",
                        help="price it against this machine's devices, without the daemon")
    _common(memory)

    train = commands.add_parser("train", help="train an SAE on a model's activations")
    params = PARAMS["train"]
    _model_options(train, "train")
    _field(train, params, "--hook",
           help="layers.L.resid_post|resid_pre|mlp_out|attn_out; several, comma-separated, or "
                "layers.*.SITE for every layer: one SAE each, from one pass of the model")
    _field(train, params, "--corpus", help=".txt, .jsonl or .parquet (or `demo`)")
    _field(train, params, "--text-field", help="JSONL/Parquet field with the text")
    _field(train, params, "--out", required=True, type=Path, help="the SAE directory to write")
    _field(train, params, "--arch")
    _field(train, params, "--k")
    width = train.add_mutually_exclusive_group()
    _field(width, params, "--expansion")
    _field(width, params, "--d-sae")
    _field(train, params, "--tokens")
    _field(train, params, "--context-size")
    _field(train, params, "--batch-tokens")
    _field(train, params, "--lr", help="default: 2e-4 / sqrt(d_sae / 16384)")
    _field(train, params, "--seed")
    _field(train, params, "--l1-coefficient", help="relu only")
    _field(train, params, "--l0-coefficient", help="jumprelu only")
    _field(train, params, "--cache", type=Path,
           help="activation cache directory to reuse or fill")
    _field(train, params, "--eval-tokens",
           help="evaluate on the corpus's first N tokens after training (for a held-out score, "
                "run `mistudio eval` on other text)")
    _field(train, params, "--sweep", action="append",
           help="NAME=V1,V2,...: one SAE per value (k, expansion, d_sae, architecture, "
                "l1_coefficient, l0_coefficient); repeat it for a grid")
    _field(train, params, "--gpus",
           help="through the daemon: train with this many processes, one GPU each (CPU "
                "processes where there is no GPU), data- or layer-parallel (--parallel)")
    _field(train, params, "--parallel",
           help="under torchrun: data (every process trains every SAE on its shard of the "
                "data) or layers (each process trains its hooks' SAEs; rank 0 extracts)")
    _field(train, params, "--checkpoint-every", help="steps")
    _field(train, params, "--resume", help="continue from --out's checkpoint")
    _job_options(train)
    _common(train)

    evaluate = commands.add_parser("eval", help="evaluate a trained SAE")
    params = PARAMS["eval"]
    evaluate.add_argument("sae_dir")  # as typed: `./x` is a path here, `x` may be the daemon's
    _model_options(evaluate, "eval")
    _field(evaluate, params, "--corpus")
    _field(evaluate, params, "--text-field")
    _field(evaluate, params, "--tokens")
    _job_options(evaluate)
    _common(evaluate)

    _feature_job_parsers(commands)
    _feature_reading_parsers(commands, OPERATIONS)
    _interactive_parsers(commands)

    for name, text in (("status", "the daemon's status"), ("gpu", "the GPUs, as the daemon "
                                                            "sees them")):
        _common(commands.add_parser(name, help=text))
    listing = commands.add_parser("jobs", help="list the daemon's jobs")
    _field(listing, OPERATIONS["job.list"].schema, "--limit", default=50)
    _common(listing)
    job = commands.add_parser("job", help="one job: show, cancel, logs, metrics, result")
    job.add_argument("action", choices=sorted(remote.JOB_ACTIONS))
    job.add_argument("id", type=_whole(1))
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


def _feature_job_parsers(commands) -> None:
    """`find`, `explain`, `score`, `correlate`: jobs on a trained SAE's features."""
    find = commands.add_parser("find", help="each feature's top examples, statistics, "
                                            "histogram and logit effects")
    params = PARAMS["find"]
    find.add_argument("sae_dir")
    _model_options(find, "find")
    _field(find, params, "--corpus", help=".txt, .jsonl or .parquet (or `demo`)")
    _field(find, params, "--text-field", help="JSONL/Parquet field with the text")
    _field(find, params, "--tokens", help="corpus tokens to read")
    _field(find, params, "--top", help="top-activating examples kept per feature")
    _field(find, params, "--radius", help="tokens of context each side of an example's peak")
    _field(find, params, "--seed")
    _field(find, params, "--resume", help="continue an interrupted find")
    _job_options(find)
    _common(find)

    explain = commands.add_parser("explain", help="explain features in words")
    params = PARAMS["explain"]
    explain.add_argument("sae_dir")
    _field(explain, params, "--explainer",
           help="stats (offline, from token statistics), hf:MODEL or openai:URL[#model]")
    _field(explain, params, "--features", help="ids and ranges, e.g. 0-99,120 (default: all)")
    _field(explain, params, "--overwrite", help="explain features already explained again")
    _field(explain, params, "--device", help="auto, cpu or cuda:N (an hf: explainer's)")
    _field(explain, params, "--quantization", help="of an hf: explainer")
    _job_options(explain)
    _common(explain)

    score = commands.add_parser("score", help="how well explanations predict activations")
    params = PARAMS["score"]
    score.add_argument("sae_dir")
    _field(score, params, "--scorer", help="rule or embedding:MODEL (offline; "
                                           "embedding:hashing), detection, fuzzing, simulation "
                                           "(ask an --llm)")
    _field(score, params, "--explainer", help="whose explanations to score")
    _field(score, params, "--llm", help="hf:MODEL or openai:URL[#model], for the LLM scorers")
    _field(score, params, "--features", help="ids and ranges, e.g. 0-99,120 (default: all)")
    _field(score, params, "--overwrite", help="score features already scored again")
    _field(score, params, "--device", help="auto, cpu or cuda:N (the scorer's model's)")
    _field(score, params, "--quantization", help="of an hf: LLM")
    _job_options(score)
    _common(score)

    correlate = commands.add_parser("correlate", help="similar features and the semantic "
                                                      "index of explanations")
    params = PARAMS["correlate"]
    correlate.add_argument("sae_dir")
    _field(correlate, params, "--neighbours", help="similar features kept per feature")
    _field(correlate, params, "--embedder", help="hashing (offline) or a Hugging Face encoder "
                                                 "for the explanation index")
    _field(correlate, params, "--text", help="also show which features fire on this text "
                                             "(needs --model)")
    _model_options(correlate, "correlate")
    _job_options(correlate)
    _common(correlate)


def _feature_reading_parsers(commands, operations: dict) -> None:
    """`features` and `feature`: what the feature jobs stored, read here."""
    features = commands.add_parser("features", help="list an SAE's features with their "
                                                    "statistics, explanations and scores")
    request = operations["feature.list"].schema
    features.add_argument("sae_dir")
    _field(features, request, "--sort", help="id counts up, the others list the largest first")
    features.add_argument("--reverse", action="store_true", help="the other way round")
    query = features.add_mutually_exclusive_group()
    _field(query, request, "--search", help="explanations containing TEXT, or the feature id")
    query.add_argument("--semantic", metavar="QUERY",
                       help="explanations closest in meaning (after `mistudio correlate`)")
    _field(features, request, "--limit", default=50)
    _field(features, request, "--offset")
    _field(features, request, "--scorer", help="whose score to show and sort by")
    _common(features)

    feature = commands.add_parser("feature", help="one feature's card: examples, histogram, "
                                                  "logit effects, explanations, neighbours")
    feature.add_argument("sae_dir")
    feature.add_argument("id", type=_whole(0), help="the feature's id")
    _common(feature)


def _interactive_parsers(commands) -> None:
    """`monitor` and `steer`: a model and its SAEs, live (for now only with --local)."""
    monitor = commands.add_parser("monitor", help="each token's top features as the model "
                                                  "reads (or generates) text")
    monitor.add_argument("sae_dirs", nargs="+", metavar="SAE_DIR")
    _model_options(monitor, "find")
    monitor.add_argument("--text", required=True,
                         help="the text to read (with --generate: the prompt)")
    monitor.add_argument("--top", type=_whole(1, 1000), default=5,
                         help="features shown per token and SAE")
    monitor.add_argument("--generate", type=_whole(1), metavar="N",
                         help="generate N tokens after the text and report theirs")
    monitor.add_argument("--seed", type=_whole(0, 2**63 - 1), default=0)
    monitor.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    monitor.add_argument("--local", action="store_true", help="run in this process, no daemon")
    _common(monitor)

    steer = commands.add_parser("steer", help="generate with features steered, beside the "
                                              "unsteered baseline")
    steer.add_argument("sae_dir")
    _model_options(steer, "find")
    steer.add_argument("--prompt", required=True)
    steer.add_argument("--feature", type=int, action="append", required=True,
                       help="the feature to steer (repeat it, each with its --strength)")
    steer.add_argument("--strength", type=float, action="append", required=True,
                       help="add: multiples of the feature's max activation; clamp: the value")
    steer.add_argument("--mode", action="append", choices=("add", "clamp"),
                       help="add (default) or clamp; once for all features, or once per feature")
    steer.add_argument("--from-prompt-end", action="store_true",
                       help="steer only from the prompt's last token on")
    steer.add_argument("--max-new-tokens", type=_whole(1), default=40)
    steer.add_argument("--seed", type=_whole(0, 2**63 - 1), default=0)
    steer.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    steer.add_argument("--top-k", type=_whole(1), help="sample from the k likeliest tokens")
    steer.add_argument("--local", action="store_true", help="run in this process, no daemon")
    _common(steer)


# ----- commands --------------------------------------------------------------------------------


def _demo_model(args, progress) -> dict:
    from mistudio_core.demo import build_demo_model, demo_corpus_path

    path = build_demo_model(args.out, force=args.force, progress=progress.line)
    return {"path": str(path), "corpus": str(demo_corpus_path(path))}


def _check_memory(args, _progress) -> dict:
    if not args.local:
        _refuse_hf_token(args)
        args.model = remote.input_path(args.model, "model")
        return remote.call(args, remote.check_memory)
    from mistudio_core.memory import check_memory
    from mistudio_core.models import ModelSpec

    return check_memory(
        ModelSpec(args.model, revision=args.revision, token=_token(args)),
        quantization=args.quantization, layer=args.layer, context_size=args.context_size,
        d_sae=args.d_sae,
    )


def _params(kind: str, args) -> dict:
    """A job's parameters: every field of its schema, from the option of the same name."""
    values = {name: getattr(args, name) for name in PARAMS[kind].fields}
    return {name: str(value) if isinstance(value, Path) else value
            for name, value in values.items()}


def _job(kind: str) -> Callable:
    """A job command: in this process with --local (or as one of torchrun's processes), else
    submitted to the daemon."""

    def command(args, progress) -> dict:
        params = _params(kind, args)
        if args.local or "WORLD_SIZE" in os.environ:
            from mistudiod.jobs import run_job, validate_params

            return run_job(kind, validate_params(kind, params), progress.event,
                           token=_token(args))
        _refuse_hf_token(args)
        for name in params.keys() & {"model", "corpus", "sae_dir"}:
            params[name] = remote.input_path(params[name], name)
        for name in params.keys() & {"out", "cache"}:
            params[name] = remote.output_path(params[name])
        return remote.call(args, remote.submit_and_wait, kind, params, progress)

    return command


def _features(args, _progress) -> dict:
    from mistudiod.operations import list_features, search_features

    sae_dir = str(Path(args.sae_dir).expanduser())
    if args.semantic:
        return {"path": sae_dir, "query": args.semantic,
                **search_features(sae_dir, args.semantic, args.limit)}
    descending = (args.sort == "id") if args.reverse else None
    return {"path": sae_dir, **list_features({
        "sae_dir": sae_dir, "sort": args.sort, "descending": descending,
        "search": args.search, "limit": args.limit, "offset": args.offset,
        "scorer": args.scorer})}


def _feature(args, _progress) -> dict:
    from mistudiod.operations import show_feature

    sae_dir = str(Path(args.sae_dir).expanduser())
    return {"path": sae_dir, **show_feature(sae_dir, args.id)}


def _spec(args):
    from mistudio_core.models import ModelSpec

    return ModelSpec(args.model, revision=args.revision, dtype=args.dtype,
                     quantization=args.quantization, device=args.device, token=_token(args))


def _monitor(args, _progress) -> dict:
    """Each token's top features, streamed: in a daemon session, or here with --local."""
    from mistudiod.interactive_text import token_line

    sae_dirs = [str(Path(d).expanduser()) for d in args.sae_dirs]
    request = {"text": args.text, "max_new_tokens": args.generate or 0, "top": args.top,
               "seed": args.seed, "temperature": args.temperature}
    args.tokens_shown = 0  # the render shows only what was not streamed

    def stream(token: dict) -> None:
        if not args.json:
            print(token_line(token, len(sae_dirs) == 1), flush=True)
            args.tokens_shown += 1

    if args.local:
        from mistudio_core.monitor import Monitor
        from mistudiod.sessions import run_monitor

        monitor = Monitor.load(_spec(args), sae_dirs)
        names, document = monitor.names, run_monitor(monitor, on_token=stream, **request)
    else:
        opened, document = _in_session(args, sae_dirs, "session.monitor", request,
                                       lambda event: stream(event["token"]))
        names = [sae["name"] for sae in opened["saes"]]
    return {"model": args.model, "sae_dirs": sae_dirs, "saes": names, "top": args.top,
            **document}


def _steer(args, _progress) -> dict:
    """The baseline and the steered continuation (the steered one streamed to stderr)."""
    sae_dir = str(Path(args.sae_dir).expanduser())
    request = {"prompt": args.prompt, "steerings": _steerings(args),
               "max_new_tokens": args.max_new_tokens, "seed": args.seed,
               "temperature": args.temperature, "top_k": args.top_k}
    streamed = []

    def stream(side: str, text: str) -> None:
        if side == "steered" and not args.json:
            streamed.append(text)
            print(text, end="", file=sys.stderr, flush=True)

    try:
        if args.local:
            from mistudio_core.monitor import load_with_saes
            from mistudiod.sessions import run_steer

            model, saes = load_with_saes(_spec(args), [sae_dir])
            document = run_steer(model, saes, on_token=lambda side, text, _: stream(side, text),
                                 **request)
        else:
            _, document = _in_session(args, [sae_dir], "session.steer", request,
                                      lambda event: stream(event["side"], event["token"]))
    finally:
        if streamed:
            print(file=sys.stderr, flush=True)
    return {"model": args.model, "sae_dir": sae_dir, **document}


def _steerings(args) -> list[dict]:
    features, strengths, modes = args.feature, args.strength, args.mode or ["add"]
    if len(strengths) != len(features):
        raise MistudioError(
            f"{len(features)} --feature but {len(strengths)} --strength given",
            hint="give one --strength after each --feature", code="bad_usage",
            field="strength")
    if len(modes) == 1:
        modes = modes * len(features)
    elif len(modes) != len(features):
        raise MistudioError(
            f"{len(features)} --feature but {len(modes)} --mode given",
            hint="give --mode once (for all features) or once per --feature",
            code="bad_usage", field="mode")
    return [{"feature": feature, "strength": strength, "mode": mode,
             "from_prompt_end": args.from_prompt_end}
            for feature, strength, mode in zip(features, strengths, modes, strict=True)]


def _in_session(args, sae_dirs: list[str], msg_type: str, request: dict,
                on_token: Callable[[dict], None]) -> tuple[dict, dict]:
    """Open a daemon session on the model and SAEs, run one request in it (its token events go
    to `on_token`), close it; the session's description and the request's answer."""
    _refuse_hf_token(args)
    opened = {"model": remote.input_path(args.model, "model"), "revision": args.revision,
              "dtype": args.dtype, "quantization": args.quantization, "device": args.device,
              "sae_dirs": [remote.input_path(d, "sae_dir") for d in sae_dirs]}
    return remote.call(args, remote.in_session, opened, msg_type, request, on_token)


def _refuse_hf_token(args) -> None:
    """The daemon loads models with its own login: a token given here would be ignored."""
    if getattr(args, "hf_token", None):
        raise MistudioError(
            "the daemon uses its own Hugging Face token, not --hf-token",
            hint="set HF_TOKEN in the daemon's environment (or `hf auth login` as its "
                 "user), or add --local", code="bad_usage")


def _corpus(args, progress) -> dict:
    if args.action == "add":
        return remote.call(args, remote.corpus_add, progress)
    return remote.call(args, remote.corpus_list)


def _daemon(command: Callable) -> Callable:
    return lambda args, _progress: remote.call(args, command)


def _token(args) -> str | None:
    return getattr(args, "hf_token", None) or os.environ.get("HF_TOKEN")


# ----- output ----------------------------------------------------------------------------------


def _metrics_text(point: dict) -> str:
    """A training metrics point as people read it (the figures it has)."""
    figures = (("loss", "loss", "{:.4f}"), ("FVE", "fve", "{:.3f}"), ("L0", "l0", "{:.1f}"),
               ("dead", "dead_pct", "{:.1f}%"), ("MSE", "mse", "{:.4g}"))
    return "  ".join(f"{label} {form.format(point[key])}" for label, key, form in figures
                     if point.get(key) is not None)


class _Progress:
    """A progress bar and log lines on stderr; stdout stays for the result."""

    def __init__(self) -> None:
        self.bar = None

    def start(self, description: str, total: int, unit: str) -> None:
        from tqdm import tqdm

        self.close()
        scaled = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
        self.bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr,
                        dynamic_ncols=True, disable=None, **scaled)

    def update(self, position: int, total: int | None = None) -> None:
        """Move the bar to `position` (of a new `total`, if given)."""
        if self.bar is None:
            return
        if total is not None:
            self.bar.total = total
        self.bar.n = position
        self.bar.refresh()

    def line(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def event(self, kind: str, payload: dict) -> None:
        """A job's progress callback (`mistudiod.jobs.run_job`)."""
        if kind == "start":
            self.start(payload["description"], payload["total"], payload["unit"])
        elif kind == "log":
            self.line(payload["message"])
        elif kind == "metrics" and self.bar is not None:
            if self.bar.disable:  # not a terminal (a log file, a pipe): one line per report
                self.line(f"step {payload['step']}/{self.bar.total}  {_metrics_text(payload)}  "
                          f"{payload['tokens_per_s']:.0f} tok/s")
                return
            self.bar.set_postfix_str(_metrics_text(payload), refresh=False)
            self.update(payload["step"])
        elif kind == "progress":  # {done, total}; an evaluation's {tokens, total}
            self.update(payload.get("done", payload.get("tokens", 0)), payload.get("total"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _render_fields(_args, document: dict) -> str:
    return "\n".join(f"{key}: {value}" for key, value in document.items() if key != "ok")


def _render_summary(args, document: dict) -> str:
    return document.get("summary") or _render_fields(args, document)


def _render_train(args, document: dict) -> str:
    if "job" in document:  # --detach
        return _render_job(document["job"])
    from mistudio_core.evals import EvalResult

    lines = []
    for sae in document.get("saes") or [document]:
        variant = "".join(f" {name}={value}" for name, value in sae.get("variant", {}).items())
        lines += [f"SAE saved in {sae['path']} after {sae['steps']} steps"
                  + (f" ({sae['hook']}{variant})" if document.get("saes") else ""),
                  _metrics_text(sae["final_metrics"])]
        if sae.get("evaluation"):
            lines.append(EvalResult(**sae["evaluation"]).summary())
    return "\n".join(lines)


def _render_result(args, document: dict) -> str:
    """A job's result (its summary), or the job itself after --detach."""
    return _render_job(document["job"]) if "job" in document else _render_summary(args, document)


def _render_features(args, document: dict) -> str:
    from mistudiod.feature_text import features_table

    return features_table(document, args.offset, args.sort)


def _render_card(_args, document: dict) -> str:
    from mistudiod.feature_text import feature_card

    return feature_card(document["feature"])


def _render_monitor(args, document: dict) -> str:
    from mistudiod.interactive_text import monitor_text

    return monitor_text(document, skip=args.tokens_shown)


def _render_steer(_args, document: dict) -> str:
    from mistudiod.interactive_text import steer_text

    return steer_text(document)


def _render_status(_args, document: dict) -> str:
    jobs, gpus = document["jobs"], document["gpus"]
    return "\n".join([
        f"mistudiod {document['version']} (pid {document['pid']}), up "
        f"{units.duration(document['uptime_s'])}; {document['runtime_dir']}",
        f"jobs: {jobs['running']} running (max {document['max_jobs']}), {jobs['queued']} "
        f"queued, {jobs['succeeded']} succeeded, {jobs['failed']} failed, "
        f"{jobs['cancelled']} cancelled",
        f"GPUs: {gpus['count']}" if gpus["available"] else f"GPUs: none ({gpus['reason']})",
    ])


def _render_gpu(_args, document: dict) -> str:
    from mistudiod.gpus import format_gpus

    return format_gpus(document)


def _render_jobs(_args, document: dict) -> str:
    return "\n".join([f"{'ID':>5}  {'STATE':<10} {'KIND':<9} {'PROGRESS':>8}  MODEL / SAE"] + [
        f"{j['id']:>5}  {j['state']:<10} {j['kind']:<9} {100 * j['progress']:>7.1f}%  "
        f"{j['params'].get('model') or j['params'].get('sae_dir') or ''}"
        for j in document["jobs"]])


def _render_job_action(args, document: dict) -> str:
    if args.action == "logs":
        return "\n".join(entry["message"] for entry in document["logs"])
    if args.action == "metrics":
        return "\n".join(f"step {p['step']}: {_metrics_text(p)}" for p in document["points"])
    if args.action == "result":
        result, error = document.get("result") or {}, document.get("error")
        lines = [f"job {args.id}: {document['state']}"]
        if result.get("summary") or result.get("path"):
            lines.append(result.get("summary") or f"result: {result['path']}")
        if error:
            lines.append(f"error: {error['message']}")
        return "\n".join(lines)
    return _render_job(document["job"])  # show, cancel


def _render_corpus(args, document: dict) -> str:
    if args.action == "list":
        return "\n".join(f"{c['name']:<40} {units.size(c['size']):>10}  {c['sha256'][:12]}"
                         for c in document["corpora"]) or "no corpora uploaded yet"
    corpus = document["corpus"]
    return (f"uploaded {corpus['name']} ({units.size(corpus['size'])}, "
            f"sha256 {corpus['sha256']})")


def _render_job(job: dict) -> str:
    lines = [f"job {job['id']} ({job['kind']}): {job['state']}, attempt {job['attempt']}, "
             f"step {job['step']}/{job['total_steps']}, on {job['device'] or '-'}"]
    if job.get("error"):
        lines.append(f"error: {job['error']['message']}")
    if job.get("result") and job["result"].get("path"):
        lines.append(f"result: {job['result']['path']}")
    return "\n".join(lines)


class Command(NamedTuple):
    run: Callable  # (args, progress) -> the result document
    render: Callable  # (args, document) -> its human-readable form


COMMANDS: dict[str, Command] = {
    "demo-model": Command(_demo_model, _render_fields),
    "check-memory": Command(_check_memory, _render_summary),
    "train": Command(_job("train"), _render_train),
    "eval": Command(_job("eval"), _render_result),
    "find": Command(_job("find"), _render_result),
    "explain": Command(_job("explain"), _render_result),
    "score": Command(_job("score"), _render_result),
    "correlate": Command(_job("correlate"), _render_result),
    "features": Command(_features, _render_features),
    "feature": Command(_feature, _render_card),
    "monitor": Command(_monitor, _render_monitor),
    "steer": Command(_steer, _render_steer),
    "status": Command(_daemon(remote.status), _render_status),
    "gpu": Command(_daemon(remote.gpu), _render_gpu),
    "jobs": Command(_daemon(remote.jobs), _render_jobs),
    "job": Command(_daemon(remote.job_command), _render_job_action),
    "corpus": Command(_corpus, _render_corpus),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tui"]:  # the dashboard parses its own options
        from tui.app import main as tui_main

        return tui_main(argv[1:])
    wants_json = "--json" in argv
    progress = _Progress()
    args = None
    try:
        args = build_parser().parse_args(argv)
        document = COMMANDS[args.command].run(args, progress)
        progress.close()
    except remote.Detached as detached:  # Ctrl-C while following: the job runs on
        progress.close()
        return _fail(detached.to_dict(), wants_json, EXIT_FAILED, job_id=detached.job_id)
    except MistudioError as error:
        progress.close()
        return _fail(error.to_dict(), wants_json, EXIT_USAGE)
    except remote.JobFailed as failure:
        progress.close()
        return _fail(failure.error, wants_json, failure.status, job=failure.job)
    except KeyboardInterrupt:
        progress.close()
        return _fail({"code": "interrupted", "message": "interrupted",
                      "hint": _interrupted_hint(args)}, wants_json, EXIT_FAILED)
    except Exception as error:  # a bug or an environment failure: the job failed
        progress.close()
        traceback.print_exc(file=sys.stderr)
        return _fail({"code": "job_failed", "message": f"{type(error).__name__}: {error}",
                      "hint": "see the traceback above; please report it if it looks like a bug"},
                     wants_json, EXIT_FAILED)
    if os.environ.get("RANK", "0") != "0":
        return EXIT_OK  # one of torchrun's processes: rank 0 prints the run's result
    if wants_json:
        print(json.dumps({"ok": True, **document}, default=str))
    else:
        print(COMMANDS[args.command].render(args, document))
    return EXIT_OK


def _interrupted_hint(args) -> str:
    """What to do after Ctrl-C: only a run in this process is gone (and can be resumed)."""
    command = getattr(args, "command", None)
    if command not in PARAMS:
        return ""
    if args.local:
        return {"train": "rerun with --resume to continue the training run",
                "find": "rerun with --resume to continue the find",
                "explain": "rerun it: the features already explained are kept and skipped",
                "score": "rerun it: the features already scored are kept and skipped",
                }.get(command, "")
    return "`mistudio jobs` shows whether the job reached the daemon"


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
