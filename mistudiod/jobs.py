"""Job kinds: what each job takes (a validated schema) and the one function that runs it.

`mistudio train --local` and the daemon's worker subprocesses both call `run_job` with the same
parameter dict, so a job does exactly the same work whichever way it is started. The schemas
check a submitted job's parameters before it is queued; `run_job` turns them into the core's
calls (`train_sae`, `evaluate_saved`, `find_features`, `explain_features`, `score_features`,
`correlate_features`). This module imports no ML library at import time: the daemon validates
with it and only workers pay for torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from mistudiod.schema import Field, Schema

Callback = Callable[[str, dict], None]

_DEVICE = Field(str, default="auto", pattern=r"auto|cpu|cuda(:\d{1,2})?")
_QUANTIZATION = Field(str, default="auto", choices=("auto", "none", "8bit", "4bit"))
_PATH = {"max_length": 4096}
_SAE_DIR = Field(str, required=True, **_PATH)
# A chat model: a local Hugging Face model or an OpenAI-compatible endpoint (`#model` suffix).
_CHAT_BACKEND = r"hf:.+|openai:.+"
_EXPLAINER = Field(str, default="stats", pattern=rf"stats|{_CHAT_BACKEND}", max_length=1024)
# `0-99,120` (checked against the SAE's width where the SAE is known: the daemon, the worker).
_FEATURES = Field(str, max_length=100_000,
                  pattern=r"\s*(all|\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*)\s*")
LLM_SCORERS = ("detection", "fuzzing", "simulation")

_MODEL_FIELDS = {
    "model": Field(str, required=True, max_length=512),
    "revision": Field(str, max_length=256),
    "dtype": Field(str, default="auto", choices=("auto", "float32", "bfloat16", "float16")),
    "quantization": _QUANTIZATION,
    "device": _DEVICE,
}
# explain's and score's: which features, and the device of an hf: model they load
_SELECTION_FIELDS = {
    "features": _FEATURES,
    "overwrite": Field(bool, default=False),
    "device": _DEVICE,
    "quantization": _QUANTIZATION,
}

PARAMS: dict[str, Schema] = {
    "train": Schema(
        **_MODEL_FIELDS,
        hook=Field(str, required=True, max_length=4096),  # a list, or layers.*.SITE
        sweep=Field(list, item=str, max_length=16),  # ["k=16,32,64", ...]
        parallel=Field(str, default="data", choices=("data", "layers")),  # under torchrun
        gpus=Field(int, default=1, min=1, max=64),  # processes the daemon starts (torchrun)
        corpus=Field(str, required=True, **_PATH),
        text_field=Field(str, default="text", max_length=128),
        out=Field(str, **_PATH),
        arch=Field(str, default="topk", choices=("topk", "batchtopk", "jumprelu", "relu")),
        k=Field(int, default=32, min=1, max=4096),
        expansion=Field(int, default=16, min=1, max=1024),
        d_sae=Field(int, min=1, max=1 << 24),
        tokens=Field(int, default=2_000_000, min=1, max=10**13),
        context_size=Field(int, default=128, min=2, max=1 << 16),  # ExtractionConfig's range
        batch_tokens=Field(int, default=4096, min=1, max=1 << 20),
        lr=Field(float, min=0, max=1),  # and strictly between: see validate_params
        seed=Field(int, default=0, min=0, max=2**31 - 1),
        l1_coefficient=Field(float, default=5.0, min=0),
        l0_coefficient=Field(float, default=0.01, min=0),
        cache=Field(str, **_PATH),
        eval_tokens=Field(int, default=0, min=0, max=10**10),
        checkpoint_every=Field(int, default=200, min=1, max=10**9),
        resume=Field(bool, default=False),
    ),
    "eval": Schema(
        **_MODEL_FIELDS,
        sae_dir=_SAE_DIR,
        corpus=Field(str, required=True, **_PATH),
        text_field=Field(str, default="text", max_length=128),
        tokens=Field(int, default=100_000, min=1, max=10**10),
    ),
    "find": Schema(
        **_MODEL_FIELDS,
        sae_dir=_SAE_DIR,
        corpus=Field(str, required=True, **_PATH),
        text_field=Field(str, default="text", max_length=128),
        tokens=Field(int, default=1_000_000, min=1, max=10**12),
        top=Field(int, default=20, min=1, max=1000),
        radius=Field(int, default=12, min=0, max=1024),  # FindConfig's range
        seed=Field(int, default=0, min=0, max=2**31 - 1),
        resume=Field(bool, default=False),
    ),
    "explain": Schema(
        sae_dir=_SAE_DIR,
        explainer=_EXPLAINER,
        **_SELECTION_FIELDS,
    ),
    "score": Schema(
        sae_dir=_SAE_DIR,
        scorer=Field(str, default="rule", max_length=1024,
                     pattern=rf"rule|embedding:.+|{'|'.join(LLM_SCORERS)}"),
        explainer=_EXPLAINER,
        llm=Field(str, pattern=_CHAT_BACKEND, max_length=1024),
        **_SELECTION_FIELDS,
    ),
    "correlate": Schema(
        sae_dir=_SAE_DIR,
        neighbours=Field(int, default=10, min=1, max=1000),
        embedder=Field(str, default="hashing", max_length=512),
        # with `text`, the result also says which features fire on it, read by `model`
        text=Field(str, max_length=100_000),
        **{**_MODEL_FIELDS, "model": Field(str, max_length=512)},
    ),
}
# What a job's progress counts (its `start` event's unit, the CLI's bar).
UNITS = {"train": "step", "eval": "tok", "find": "tok", "explain": "feature",
         "score": "feature", "correlate": "feature"}
# Kinds that work on an SAE's features directory: find writes it, the readers read it.
FEATURE_READERS = ("explain", "score", "correlate")
FEATURE_KINDS = ("find", *FEATURE_READERS)


def validate_params(kind: str, params: dict) -> dict:
    """A job's parameters checked field by field (the hook by the core's own parser, whose
    message lists the hook names), with defaults filled in. What the core would refuse in the
    worker is refused here, before the job is queued: `TrainConfig`'s at least one batch of
    tokens and 0 < lr < 1, an LLM scorer without an LLM, a text to read without a model."""
    from mistudio_core.errors import MistudioError
    from mistudio_core.hooks import parse_hooks
    from mistudio_core.sweep import parse_sweep

    valid = PARAMS[kind].validate(params)
    if kind == "train":
        try:
            parse_hooks(valid["hook"])
        except MistudioError as error:
            error.field = "hook"
            raise
        parse_sweep(valid["sweep"])
        if valid["tokens"] < valid["batch_tokens"]:
            raise MistudioError(
                f"field `tokens` ({valid['tokens']}) must be at least one batch "
                f"(`batch_tokens` {valid['batch_tokens']})",
                hint="raise tokens or lower batch_tokens", code="bad_request", field="tokens")
        if valid["lr"] is not None and not 0 < valid["lr"] < 1:
            raise MistudioError(f"field `lr` must be between 0 and 1 (exclusive), got "
                                f"{valid['lr']:g}",
                                hint="leave it out to scale with the SAE's width, or try 2e-4",
                                code="bad_request", field="lr")
    if kind == "score" and valid["scorer"] in LLM_SCORERS and not valid["llm"]:
        raise MistudioError(f"the {valid['scorer']} scorer needs an LLM to ask",
                            hint="give llm as hf:MODEL or openai:URL[#model]",
                            code="bad_request", field="llm")
    if kind == "correlate" and valid["text"] is not None and not valid["model"]:
        raise MistudioError("reading a text needs the model the SAE was trained on",
                            hint="give the model too (--model), or leave the text out",
                            code="bad_request", field="model")
    return valid


def run_job(kind: str, params: dict, callback: Callback, *, resume: bool = False,
            token: str | None = None) -> dict:
    """Run one job in this process and return its result document.

    `resume` continues an interrupted run (the daemon sets it when it restarts a job that a
    crash or a restart interrupted): training from its checkpoint, find from its saved pass.
    Explain and score need no flag: they skip the features already done. Progress goes to
    `callback`, starting with a `start` event that says how much work there is.
    """
    runners = {"train": _train, "eval": _eval, "find": _find, "explain": _explain,
               "score": _score, "correlate": _correlate}
    if kind not in runners:
        raise ValueError(f"unknown job kind {kind!r}")
    return runners[kind](params, callback, resume, token)


def _model_spec(params: dict, token: str | None):
    from mistudio_core.models import ModelSpec

    return ModelSpec(params["model"], revision=params["revision"], dtype=params["dtype"],
                     quantization=params["quantization"], device=params["device"], token=token)


def _start(kind: str, callback: Callback, total: int, description: str) -> None:
    callback("start", {"total": total, "unit": UNITS[kind], "description": description})


def _train(params: dict, callback: Callback, resume: bool, token: str | None) -> dict:
    from mistudio_core.activations import ExtractionConfig
    from mistudio_core.errors import MistudioError
    from mistudio_core.runs import TrainJob, train_sae
    from mistudio_core.train import TrainConfig

    if params["gpus"] > 1 and "WORLD_SIZE" not in os.environ:  # the daemon's worker sets it
        raise MistudioError(
            f"--gpus {params['gpus']} starts that many processes through the daemon; this "
            "process would train alone",
            hint=f"leave out --local, or run `torchrun --nproc-per-node {params['gpus']} -m "
                 "mistudiod.cli train ...` (without --gpus)", field="gpus")

    train_config = TrainConfig(
        total_tokens=params["tokens"], batch_tokens=params["batch_tokens"], lr=params["lr"],
        seed=params["seed"], checkpoint_every=params["checkpoint_every"],
    )
    job = TrainJob(
        model=_model_spec(params, token), hook=params["hook"], corpus=params["corpus"],
        out=params["out"], architecture=params["arch"], k=params["k"],
        expansion=params["expansion"], d_sae=params["d_sae"],
        l1_coefficient=params["l1_coefficient"], l0_coefficient=params["l0_coefficient"],
        extraction=ExtractionConfig(context_size=params["context_size"]),
        train=train_config, text_field=params["text_field"], cache=params["cache"],
        resume=params["resume"] or resume, eval_tokens=params["eval_tokens"],
        sweep=tuple(params["sweep"] or ()), parallel=params["parallel"],
    )
    _start("train", callback, train_config.total_steps, "training")
    return train_sae(job, callback).to_dict()


def _eval(params: dict, callback: Callback, resume: bool, token: str | None) -> dict:
    from mistudio_core.runs import evaluate_saved

    _start("eval", callback, params["tokens"], "evaluating")
    result = evaluate_saved(
        params["sae_dir"], _model_spec(params, token), params["corpus"], params["tokens"],
        params["text_field"], callback,
    )
    return {"path": params["sae_dir"], "evaluation": result.to_dict(),
            "summary": result.summary()}


def _find(params: dict, callback: Callback, resume: bool, token: str | None) -> dict:
    from mistudio_core.find import FindConfig, find_features

    config = FindConfig(tokens=params["tokens"], top=params["top"], radius=params["radius"],
                        seed=params["seed"])
    _start("find", callback, params["tokens"], "finding features")
    return find_features(params["sae_dir"], _model_spec(params, token), params["corpus"],
                         config, callback, resume=params["resume"] or resume,
                         text_field=params["text_field"])


def _explain(params: dict, callback: Callback, resume: bool, token: str | None) -> dict:
    from mistudio_core.explain import explain_features

    features = _selection(params, callback, "explain", f"explaining ({params['explainer']})")
    return explain_features(params["sae_dir"], params["explainer"], features, callback,
                            overwrite=params["overwrite"], device=params["device"],
                            quantization=params["quantization"])


def _score(params: dict, callback: Callback, resume: bool, token: str | None) -> dict:
    from mistudio_core.score import score_features

    features = _selection(params, callback, "score", f"scoring ({params['scorer']})")
    return score_features(params["sae_dir"], params["scorer"], params["explainer"], features,
                          callback, overwrite=params["overwrite"], device=params["device"],
                          quantization=params["quantization"], llm=params["llm"])


def _selection(params: dict, callback: Callback, kind: str, description: str) -> list | None:
    """The chosen features (None: all), checked against the SAE's width; the `start` event
    counts them (features done earlier are skipped, so the first progress report may count
    fewer)."""
    from mistudio_core.feature_store import FeatureStore, parse_features

    store = FeatureStore(params["sae_dir"])
    try:
        features = parse_features(params["features"], store.d_sae)
        _start(kind, callback, store.d_sae if features is None else len(features), description)
        return features
    finally:
        store.close()


def _correlate(params: dict, callback: Callback, resume: bool, token: str | None) -> dict:
    from mistudio_core.correlate import CorrelateConfig, correlate_features, features_on_text

    _start("correlate", callback, 0, "correlating features")  # the first report says of what
    config = CorrelateConfig(neighbours=params["neighbours"], embedder=params["embedder"],
                             device=params["device"])
    result = correlate_features(params["sae_dir"], config, callback)
    if params["text"] is not None:
        on_text = features_on_text(params["sae_dir"], _model_spec(params, token), params["text"])
        result["features_on_text"] = on_text
        result["summary"] += "\non the text: " + on_text["summary"]
    return result
