"""Jobs: the training and evaluation runs, from a plain description to files on disk.

`mistudio train --local` and the daemon's workers both call `train_sae` and `evaluate_saved`, so a
job does the same thing whichever way it is started. Progress goes to a callback as
`(kind, payload)` events: `log`, `metrics`, `checkpoint`, `progress`, `result`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mistudio_core import __version__
from mistudio_core.activation_cache import ActivationCache, CachedActivationSource
from mistudio_core.activations import ExtractionConfig, ModelActivationSource, ShuffledBatches
from mistudio_core.corpus import Corpus
from mistudio_core.demo import DEMO_MODEL_ALIAS, build_demo_model
from mistudio_core.errors import MistudioError
from mistudio_core.evals import EvalResult, evaluate
from mistudio_core.hooks import HookPoint
from mistudio_core.models import (
    ModelSpec,
    check_layer,
    is_causal_lm,
    load_config,
    load_model,
    resolve_device,
    resolve_dtype,
)
from mistudio_core.progress import Callback, silent
from mistudio_core.sae import SAEConfig, SAEMetadata, load_sae, save_sae
from mistudio_core.train import TrainConfig, Trainer

# The shuffle buffer holds at most this many bytes of activations (and 2^18 tokens).
_BUFFER_BYTES = 1 << 30
_BUFFER_TOKENS = 1 << 18


@dataclass(frozen=True)
class TrainJob:
    """Everything `mistudio train` takes: which model, hook and data, and the SAE to train."""

    model: ModelSpec
    hook: str
    corpus: str
    out: str
    architecture: str = "topk"
    k: int = 32
    expansion: int = 16
    d_sae: int | None = None
    l1_coefficient: float = 5.0
    l0_coefficient: float = 0.01
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    text_field: str = "text"
    cache: str | None = None
    resume: bool = False
    eval_tokens: int = 0


@dataclass
class TrainResult:
    path: Path
    steps: int
    final_metrics: dict
    evaluation: EvalResult | None = None

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "steps": self.steps,
            "final_metrics": self.final_metrics,
            "evaluation": None if self.evaluation is None else self.evaluation.to_dict(),
        }


def train_sae(job: TrainJob, callback: Callback = silent) -> TrainResult:
    """Train an SAE as `job` describes and save it in SAELens format under `job.out`."""
    hook = HookPoint.parse(job.hook)
    for directory in (job.out, job.cache):
        if directory:
            _writable_directory(Path(directory))
    prepare_demo(job.model.model_id, job.corpus, callback)
    corpus = Corpus.open(job.corpus, job.text_field)
    corpus_sha256 = corpus.fingerprint()
    config = load_config(job.model)
    check_layer(config, hook.layer, job.model.model_id)
    d_in = int(config.hidden_size)
    sae_config = SAEConfig(
        architecture=job.architecture, d_in=d_in, d_sae=job.d_sae or job.expansion * d_in,
        k=job.k, l1_coefficient=job.l1_coefficient, l0_coefficient=job.l0_coefficient,
    )
    device = resolve_device(job.model.device)
    activation_dtype = resolve_dtype(job.model.dtype, device)
    callback("log", {"message": f"training a {sae_config.architecture} SAE of "
                                f"{sae_config.d_sae} latents on {job.model.model_id} {hook}"})

    def model_source() -> ModelActivationSource:
        callback("log", {"message": f"loading {job.model.model_id} up to layer {hook.layer}"})
        model = load_model(job.model, up_to_layer=hook.layer, config=config)
        return ModelActivationSource(model, corpus, [hook], job.extraction)

    if job.cache:
        key = _cache_key(job, corpus_sha256, hook, d_in)
        cache = ActivationCache(Path(job.cache), key, activation_dtype)
        source = CachedActivationSource(cache, model_source)
    else:
        source = model_source()
    batches = ShuffledBatches(
        source, [hook], job.train.batch_tokens, _block_chunks(job, d_in), job.train.seed, device
    )
    out = Path(job.out)
    trainer = Trainer(sae_config, job.train, batches, hook, out, device, callback)
    try:
        sae = trainer.run(resume=job.resume)
    finally:
        if job.cache:
            cache.flush()
    metrics = _last_metrics(out)
    sae.fold_input_scale()
    training = {
        "mistudio_version": __version__,
        "model_id": job.model.model_id,
        "model_revision": job.model.revision,
        "quantization": job.model.quantization,
        "hook": hook.name,
        "corpus": str(corpus.path),
        "corpus_sha256": corpus_sha256,
        "seed": job.train.seed,
        "train_config": asdict(job.train),
        "extraction": asdict(job.extraction),
        "steps": trainer.step,
        "metrics": metrics,
    }
    metadata = SAEMetadata(
        model_name=job.model.model_id,
        hook_name=hook.name,
        context_size=job.extraction.context_size,
        prepend_bos=job.extraction.prepend_bos,
        exclude_special_tokens=job.extraction.exclude_special_tokens,
        dataset_path=str(corpus.path),
        model_class_name=config.architectures[0] if getattr(config, "architectures", None)
        else None,
    )
    save_sae(sae, out, metadata, training)
    result = TrainResult(out, trainer.step, metrics)
    if job.eval_tokens:
        result.evaluation = evaluate_saved(
            out, job.model, job.corpus, job.eval_tokens, job.text_field, callback
        )
    callback("result", result.to_dict())
    return result


def evaluate_saved(
    sae_dir: str | Path,
    model: ModelSpec,
    corpus: str,
    n_tokens: int,
    text_field: str = "text",
    callback: Callback = silent,
    batch_windows: int = 8,
) -> EvalResult:
    """Evaluate a saved SAE on `n_tokens` of a corpus; the result is also written beside it."""
    loaded = load_sae(sae_dir)
    prepare_demo(model.model_id, corpus, callback)
    hook = loaded.hook()
    config = load_config(model)
    loaded.check_width(config.hidden_size, model.model_id)  # before any weights are loaded
    if is_causal_lm(config):
        hooked = load_model(model, with_lm_head=True, config=config)
    else:  # encoders: reconstruction metrics only, so load just the blocks up to the hook
        hooked = load_model(model, up_to_layer=hook.layer, config=config)
    loaded.sae.to(hooked.device)
    extraction = ExtractionConfig(
        context_size=loaded.metadata.context_size,
        batch_windows=batch_windows,
        prepend_bos=loaded.metadata.prepend_bos,
    )
    result = evaluate(
        loaded.sae, hooked, Corpus.open(corpus, text_field), hook, extraction, n_tokens,
        callback,
    )
    result.save(Path(sae_dir))
    return result


def _writable_directory(directory: Path) -> None:
    """Fail before any work if a directory the run writes to could not be made or written.

    Nothing is created here (the trainer and the cache make their directories when they first
    write), so a run refused later, for a bad model or corpus, leaves no empty directory behind:
    the probe is a temporary file in the nearest directory that exists. A real file rather than
    `os.access`, which says yes to root even where nothing can be created (/proc, a read-only
    mount)."""
    existing = directory.expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        descriptor, probe = tempfile.mkstemp(prefix=".mistudio-write-test-", dir=existing)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as exc:
        raise MistudioError(
            f"cannot write to {directory}: {exc.strerror or exc}",
            hint="pick a directory you can write to (check the path and its permissions)",
        ) from exc


def prepare_demo(model_id: str, corpus: str, callback: Callback) -> None:
    """Build the offline demo model (once) with its progress in the job's log, if it is used."""
    if DEMO_MODEL_ALIAS in (model_id, corpus):
        build_demo_model(progress=lambda line: callback("log", {"message": line}))


def _cache_key(job: TrainJob, corpus_sha256: str, hook: HookPoint, d_in: int) -> dict:
    return {
        "model_id": job.model.model_id,
        "revision": job.model.revision,
        "quantization": job.model.quantization,
        "hooks": [hook.name],
        "d_in": d_in,
        "corpus_sha256": corpus_sha256,
        "text_field": job.text_field,
        **asdict(job.extraction),
    }


def _block_chunks(job: TrainJob, d_in: int) -> int:
    """Chunks per shuffle block: up to 2^18 tokens within 1 GiB, no more than the run needs,
    and at least two batches' worth so that every block yields a batch."""
    tokens_per_chunk = job.extraction.batch_windows * job.extraction.context_size
    budget = min(_BUFFER_TOKENS, _BUFFER_BYTES // (4 * d_in), job.train.total_tokens)
    budget = max(budget, 2 * job.train.batch_tokens)
    return max(1, math.ceil(budget / tokens_per_chunk))


def _last_metrics(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}
