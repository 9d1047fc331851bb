"""Job kinds: what each job takes (a validated schema) and the one function that runs it.

`mistudio train --local` and the daemon's worker subprocesses both call `run_job` with the same
parameter dict, so a job does exactly the same work whichever way it is started. The schemas
check a submitted job's parameters before it is queued; `run_job` turns them into the core's
`TrainJob` / `evaluate_saved` calls. This module imports no ML library at import time: the
daemon validates with it and only workers pay for torch.
"""

from __future__ import annotations

from collections.abc import Callable

from mistudiod.schema import Field, Schema

Callback = Callable[[str, dict], None]

_DEVICE = r"auto|cpu|cuda(:\d{1,2})?"
_PATH = {"max_length": 4096}

_MODEL_FIELDS = {
    "model": Field(str, required=True, max_length=512),
    "revision": Field(str, max_length=256),
    "dtype": Field(str, default="auto", choices=("auto", "float32", "bfloat16", "float16")),
    "quantization": Field(str, default="auto", choices=("auto", "none", "8bit", "4bit")),
    "device": Field(str, default="auto", pattern=_DEVICE),
}

PARAMS: dict[str, Schema] = {
    "train": Schema(
        **_MODEL_FIELDS,
        hook=Field(str, required=True, max_length=64),
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
        sae_dir=Field(str, required=True, **_PATH),
        corpus=Field(str, required=True, **_PATH),
        text_field=Field(str, default="text", max_length=128),
        tokens=Field(int, default=100_000, min=1, max=10**10),
    ),
}


def validate_params(kind: str, params: dict) -> dict:
    """A job's parameters checked field by field (the hook by the core's own parser, whose
    message lists the hook names), with defaults filled in. What the core's configs would
    refuse in the worker (`TrainConfig`: at least one batch of tokens, 0 < lr < 1) is refused
    here, before the job is queued."""
    from mistudio_core.errors import MistudioError
    from mistudio_core.hooks import HookPoint

    valid = PARAMS[kind].validate(params)
    if kind == "train":
        try:
            HookPoint.parse(valid["hook"])
        except MistudioError as error:
            error.field = "hook"
            raise
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
    return valid


def run_job(kind: str, params: dict, callback: Callback, *, resume: bool = False,
            token: str | None = None) -> dict:
    """Run one job in this process and return its result document.

    `resume` continues a training run from its checkpoint (the daemon sets it when it restarts
    a job that a crash or a restart interrupted). Progress goes to `callback`, starting with a
    `start` event that says how much work there is.
    """
    if kind == "train":
        return _train(params, callback, resume, token)
    if kind == "eval":
        return _eval(params, callback, token)
    raise ValueError(f"unknown job kind {kind!r}")


def _model_spec(params: dict, token: str | None):
    from mistudio_core.models import ModelSpec

    return ModelSpec(params["model"], revision=params["revision"], dtype=params["dtype"],
                     quantization=params["quantization"], device=params["device"], token=token)


def _train(params: dict, callback: Callback, resume: bool, token: str | None) -> dict:
    from mistudio_core.activations import ExtractionConfig
    from mistudio_core.runs import TrainJob, train_sae
    from mistudio_core.train import TrainConfig

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
    )
    callback("start", {"total": train_config.total_steps, "unit": "step",
                      "description": "training"})
    return train_sae(job, callback).to_dict()


def _eval(params: dict, callback: Callback, token: str | None) -> dict:
    from mistudio_core.runs import evaluate_saved

    callback("start", {"total": params["tokens"], "unit": "tok", "description": "evaluating"})
    result = evaluate_saved(
        params["sae_dir"], _model_spec(params, token), params["corpus"], params["tokens"],
        params["text_field"], callback,
    )
    return {"path": params["sae_dir"], "evaluation": result.to_dict(),
            "summary": result.summary()}
