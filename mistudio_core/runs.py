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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mistudio_core import __version__
from mistudio_core.activation_cache import ActivationCache, CachedActivationSource
from mistudio_core.activations import ExtractionConfig, ModelActivationSource, ShuffledBatches
from mistudio_core.corpus import Corpus
from mistudio_core.demo import DEMO_MODEL_ALIAS, build_demo_model
from mistudio_core.distributed import MODES as PARALLEL_MODES
from mistudio_core.distributed import DataParallel, LayerParallel, ReceivedBatches, SentBatches
from mistudio_core.errors import MistudioError
from mistudio_core.evals import EvalResult, evaluate
from mistudio_core.hooks import HookPoint, parse_hooks
from mistudio_core.models import (
    ModelSpec,
    check_layer,
    is_causal_lm,
    load_config,
    load_model,
    n_layers_of,
    resolve_device,
    resolve_dtype,
)
from mistudio_core.progress import Callback, silent
from mistudio_core.sae import SAEMetadata, load_sae, save_sae
from mistudio_core.sweep import PlannedSAE, parse_sweep, plan_saes
from mistudio_core.train import TrainConfig, Trainer, train_together

# The shuffle buffer holds at most this many bytes of activations (and 2^18 tokens).
_BUFFER_BYTES = 1 << 30
_BUFFER_TOKENS = 1 << 18


@dataclass(frozen=True)
class TrainJob:
    """Everything `mistudio train` takes: which model, hooks and data, and the SAEs to train.

    `hook` is one hook, a comma-separated list, or `layers.*.SITE`; `sweep` varies the SAE's
    settings (`["k=16,32,64"]`): one SAE per hook and configuration, all from one extraction
    (see `mistudio_core.sweep` for where each goes under `out`)."""

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
    sweep: tuple[str, ...] = ()
    parallel: str = "data"  # under torchrun: "data" or "layers" (mistudio_core.distributed)


@dataclass
class TrainResult:
    """One trained SAE; a run of several lists them all in `saes` (the first is the result's
    own fields, so a one-SAE run reads as ever)."""

    path: Path
    steps: int
    final_metrics: dict
    evaluation: EvalResult | None = None
    hook: str = ""
    variant: dict = field(default_factory=dict)
    saes: list[TrainResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        document = {
            "path": str(self.path),
            "hook": self.hook,
            "variant": self.variant,
            "steps": self.steps,
            "final_metrics": self.final_metrics,
            "evaluation": None if self.evaluation is None else self.evaluation.to_dict(),
        }
        if self.saes:
            document["saes"] = [sae.to_dict() for sae in self.saes]
        return document


def train_sae(job: TrainJob, callback: Callback = silent) -> TrainResult:
    """Train the SAEs `job` describes, all from one pass of the model over the corpus, and save
    each in SAELens format under `job.out`.

    Started by `torchrun` (several processes), it trains them data-parallel (`job.parallel`
    "data": rank 0 reports and writes) or layer-parallel ("layers": each process trains and
    writes its hooks' SAEs); see `mistudio_core.distributed`."""
    processes = _join_processes(job)
    if processes is not None and not processes.is_main:
        callback = silent
    for directory in (job.out, job.cache):
        if directory:
            _writable_directory(Path(directory))
    prepare_demo(job.model.model_id, job.corpus, callback)
    corpus = Corpus.open(job.corpus, job.text_field)
    corpus_sha256 = corpus.fingerprint()
    config = load_config(job.model)
    hooks = parse_hooks(job.hook, n_layers_of(config))
    for hook in hooks:
        check_layer(config, hook.layer, job.model.model_id)
    planned = plan_saes(hooks, {
        "architecture": job.architecture, "k": job.k, "expansion": job.expansion,
        "d_sae": job.d_sae, "l1_coefficient": job.l1_coefficient,
        "l0_coefficient": job.l0_coefficient}, parse_sweep(list(job.sweep)),
        int(config.hidden_size), Path(job.out))
    device = resolve_device(job.model.device)
    if processes is not None:
        device = processes.device(device)
        callback("log", {"message": f"{job.parallel}-parallel over {processes.world} "
                                    "processes"})
    layers = processes if isinstance(processes, LayerParallel) else None
    if layers is not None:
        layers.check(len(hooks))
    mine = [sae for sae in planned if layers is None or layers.owns(hooks.index(sae.hook))]
    for sae in planned:
        callback("log", {"message": f"training a {sae.config.architecture} SAE of "
                                    f"{sae.config.d_sae} latents on {job.model.model_id} "
                                    f"{sae.label}"})
    data = processes if isinstance(processes, DataParallel) else None
    batches, cache = _batch_stream(job, corpus, corpus_sha256, config, hooks, device, processes,
                                   callback)
    trainers = [Trainer(sae.config, job.train, batches, sae.hook, sae.out, device,
                        _labelled(callback, sae, len(planned)), data) for sae in mine]
    try:
        train_together(trainers, batches, job.resume)
    finally:
        if cache is not None:
            cache.flush()
    if data is not None and not data.is_main:
        return TrainResult(Path(job.out), trainers[0].step, {})  # rank 0 saves the SAEs
    results = [_save(job, corpus, corpus_sha256, config, sae, trainer, callback)
               for sae, trainer in zip(mine, trainers, strict=True)]
    if layers is not None:  # every process's SAEs, in the planned order
        order = {sae.out: index for index, sae in enumerate(planned)}
        results = sorted((result for part in layers.gather(results) for result in part),
                         key=lambda result: order[result.path])
    result = replace(results[0], saes=results if len(results) > 1 else [])
    callback("result", result.to_dict())
    return result


def _join_processes(job: TrainJob) -> DataParallel | LayerParallel | None:
    """This process's place in a `torchrun` run (None when it runs alone)."""
    if job.parallel not in PARALLEL_MODES:
        raise MistudioError(f"unknown parallel mode {job.parallel!r}",
                            hint="use data or layers", field="parallel")
    kind = LayerParallel if job.parallel == "layers" else DataParallel
    processes = kind.from_environment()
    if processes is not None and job.cache:
        raise MistudioError("the activation cache is not shared between processes yet",
                            hint="leave out --cache in a run of several processes",
                            field="cache")
    return processes


def _batch_stream(job: TrainJob, corpus: Corpus, corpus_sha256: str, config,
                  hooks: list[HookPoint], device, processes, callback: Callback):
    """The training batches of this process (and the activation cache they fill, if any): the
    model's (or the cache's), this rank's shard of them, or, in a layer-parallel run, what
    rank 0 sends."""
    d_in = int(config.hidden_size)
    activation_dtype = resolve_dtype(job.model.dtype, device)
    batch_tokens = job.train.batch_tokens
    if isinstance(processes, DataParallel):
        batch_tokens = processes.share(batch_tokens)
    if isinstance(processes, LayerParallel) and not processes.is_main:
        return ReceivedBatches(hooks, processes, batch_tokens, d_in, activation_dtype,
                               device), None
    deepest = max(hook.layer for hook in hooks)

    # One process alone may spread a large model over the GPUs (device "auto"); each of
    # several processes loads its own copy on its own GPU.
    spec = job.model if processes is None else replace(job.model, device=str(device))

    def model_source() -> ModelActivationSource:
        callback("log", {"message": f"loading {job.model.model_id} up to layer {deepest}"})
        model = load_model(spec, up_to_layer=deepest, config=config)
        return ModelActivationSource(model, corpus, hooks, job.extraction)

    cache = None
    if job.cache:
        key = _cache_key(job, corpus_sha256, hooks, d_in)
        cache = ActivationCache(Path(job.cache), key, activation_dtype)
        source = CachedActivationSource(cache, model_source)
    else:
        source = model_source()
    batches = ShuffledBatches(source, hooks, batch_tokens, _block_chunks(job, d_in, len(hooks)),
                              job.train.seed, device,
                              processes if isinstance(processes, DataParallel) else None)
    if isinstance(processes, LayerParallel):
        batches = SentBatches(batches, hooks, processes)
    return batches, cache


def _save(job: TrainJob, corpus: Corpus, corpus_sha256: str, config, sae: PlannedSAE,
          trainer: Trainer, callback: Callback) -> TrainResult:
    """Write a trained SAE (SAELens files and mistudio.json) and evaluate it if asked."""
    metrics = _last_metrics(sae.out)
    trainer.sae.fold_input_scale()
    training = {
        "mistudio_version": __version__,
        "model_id": job.model.model_id,
        "model_revision": job.model.revision,
        "quantization": job.model.quantization,
        "hook": sae.hook.name,
        "corpus": str(corpus.path),
        "corpus_sha256": corpus_sha256,
        "seed": job.train.seed,
        "train_config": asdict(job.train),
        "extraction": asdict(job.extraction),
        "sweep": sae.variant,
        "steps": trainer.step,
        "metrics": metrics,
    }
    metadata = SAEMetadata(
        model_name=job.model.model_id,
        hook_name=sae.hook.name,
        context_size=job.extraction.context_size,
        prepend_bos=job.extraction.prepend_bos,
        exclude_special_tokens=job.extraction.exclude_special_tokens,
        dataset_path=str(corpus.path),
        model_class_name=config.architectures[0] if getattr(config, "architectures", None)
        else None,
    )
    save_sae(trainer.sae, sae.out, metadata, training)
    result = TrainResult(sae.out, trainer.step, metrics, hook=sae.hook.name, variant=sae.variant)
    if job.eval_tokens:
        result.evaluation = evaluate_saved(
            sae.out, job.model, job.corpus, job.eval_tokens, job.text_field, callback)
    return result


def _labelled(callback: Callback, sae: PlannedSAE, n_saes: int) -> Callback:
    """With several SAEs, each one's logs say which it is and its metrics carry its hook and
    variant (the job's charts then tell them apart)."""
    if n_saes == 1:
        return callback

    def labelled(kind: str, payload: dict) -> None:
        if kind == "log":
            payload = {**payload, "message": f"{sae.label}: {payload['message']}"}
        elif kind == "metrics":
            payload = {**payload, "sae": sae.label}
        callback(kind, payload)

    return labelled


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


def _cache_key(job: TrainJob, corpus_sha256: str, hooks: list[HookPoint], d_in: int) -> dict:
    return {
        "model_id": job.model.model_id,
        "revision": job.model.revision,
        "quantization": job.model.quantization,
        "hooks": [hook.name for hook in hooks],
        "d_in": d_in,
        "corpus_sha256": corpus_sha256,
        "text_field": job.text_field,
        **asdict(job.extraction),
    }


def _block_chunks(job: TrainJob, d_in: int, n_hooks: int = 1) -> int:
    """Chunks per shuffle block: up to 2^18 tokens within 1 GiB (for all hooks), no more than
    the run needs, and at least two batches' worth so that every block yields a batch."""
    tokens_per_chunk = job.extraction.batch_windows * job.extraction.context_size
    budget = min(_BUFFER_TOKENS, _BUFFER_BYTES // (4 * d_in * n_hooks), job.train.total_tokens)
    budget = max(budget, 2 * job.train.batch_tokens)
    return max(1, math.ceil(budget / tokens_per_chunk))


def _last_metrics(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}
