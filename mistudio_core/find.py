"""Find: one pass of a corpus through the model and the SAE, and everything a feature card shows.

`find_features` streams packed windows through the model (loaded only up to the SAE's layer),
encodes the non-special positions with the SAE and hands each batch to a `FeatureRecorder`
(`mistudio_core.feature_recorder`: statistics, histogram, top / quantile / negative examples,
co-occurrence, all on the SAE's device). At the end it adds the logit effects
(`mistudio_core.logit_effects`) and every token's text, and writes it all through `FeatureStore`
(memory-mapped arrays + SQLite), so a card loads in a few milliseconds whatever the SAE's width.

A checkpoint (`features/find-checkpoint.pt`, replaced atomically) holds the recorder and the
windows consumed; it is written every `checkpoint_every` batches, so an interrupted run loses at
most that much work when rerun with `resume=True`, and the resumed result equals an
uninterrupted run's (the recorder's sampling is a hash of the data's position, not an RNG).
The store is written only after the corpus pass: until then a previous find's results stay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from functools import partial
from itertools import islice
from pathlib import Path

import torch

from mistudio_core import __version__
from mistudio_core.activations import ExtractionConfig, ModelActivationSource
from mistudio_core.corpus import Corpus, pack_windows
from mistudio_core.errors import MistudioError
from mistudio_core.feature_recorder import FeatureRecorder
from mistudio_core.feature_store import FEATURES_DIR, FeatureStore
from mistudio_core.logit_effects import logit_effects, read_unembedding
from mistudio_core.models import ModelSpec, check_layer, load_config, load_model, resolve_device
from mistudio_core.progress import Callback, silent
from mistudio_core.runs import prepare_demo
from mistudio_core.sae import SparseAutoencoder, load_sae
from mistudio_core.sae.io import WEIGHTS_FILE

CHECKPOINT_FILE = "find-checkpoint.pt"


@dataclass(frozen=True)
class FindConfig:
    """What `mistudio find` keeps per feature and how it reads the corpus.

    `tokens` non-special tokens are read (or the corpus up to its end, once, no repeats), in
    batches of `batch_windows` windows; examples are `2 * radius + 1` tokens wide."""

    tokens: int = 1_000_000
    top: int = 20
    radius: int = 12
    quantile_groups: int = 10
    per_quantile: int = 4
    negatives: int = 20
    batch_windows: int = 16
    logits: int = 10
    neighbours: int = 10
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        minimums = {"tokens": 1, "top": 1, "radius": 0, "quantile_groups": 1, "per_quantile": 1,
                    "negatives": 0, "batch_windows": 1, "logits": 0, "neighbours": 0, "seed": 0,
                    "checkpoint_every": 1}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise MistudioError(
                    f"find setting {name}={value!r} must be an integer >= {minimum}",
                    hint=f"use the default, {name}={_DEFAULTS[name]}", field=name)
        if self.radius > 1024:
            raise MistudioError(f"example radius {self.radius} is too large",
                                hint="use a radius of a few dozen tokens at most (default 12)",
                                field="radius")

    @property
    def width(self) -> int:
        return 2 * self.radius + 1

    @property
    def quantile_samples(self) -> int:
        return self.quantile_groups * self.per_quantile


_DEFAULTS = {f.name: f.default for f in fields(FindConfig)}
# The settings a checkpoint's recorded state depends on; the others (tokens, batch_windows,
# logits, checkpoint_every) may change between an interrupted run and its resumption.
_RESULT_SETTINGS = ("top", "radius", "quantile_groups", "per_quantile", "negatives",
                    "neighbours", "seed")


def vocabulary_texts(tokenizer) -> list[str]:
    """Every token id's text as it reads inside a text, leading spaces included (SentencePiece's
    `decode([id])` drops a token's leading space: each id is decoded after an anchor token and
    the anchor's text is cut off)."""
    n = len(tokenizer)
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    options = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    alone = tokenizer.batch_decode([[i] for i in range(n)], **options)
    if not anchor:
        return alone
    prefix = tokenizer.decode(anchor, **options)
    after = tokenizer.batch_decode([[*anchor, i] for i in range(n)], **options)
    return [text[len(prefix):] if text.startswith(prefix) else single
            for text, single in zip(after, alone, strict=True)]


# ----- the job ------------------------------------------------------------------------------------


def find_features(
    sae_dir: str | Path,
    model: ModelSpec,
    corpus: str,
    config: FindConfig | None = None,
    callback: Callback = silent,
    resume: bool = False,
    text_field: str = "text",
) -> dict:
    """Stream `config.tokens` tokens of `corpus` through `model` and the SAE in `sae_dir` once,
    and store every feature's statistics, examples, histogram, logit effects and co-occurring
    features under `sae_dir/features/`. With `resume`, continue from the last checkpoint.

    Nothing is written to the store before the corpus pass is over, so an interrupted run
    leaves the previous results (if any) as they were, and its checkpoint."""
    config = config or FindConfig()
    sae_dir = Path(sae_dir).expanduser()
    loaded = load_sae(sae_dir)
    sae, metadata = loaded.sae, loaded.metadata
    hook = loaded.hook()
    prepare_demo(model.model_id, corpus, callback)
    source_corpus = Corpus.open(corpus, text_field)
    model_config = load_config(model)
    check_layer(model_config, hook.layer, model.model_id)
    loaded.check_width(model_config.hidden_size, model.model_id)
    corpus_sha256 = source_corpus.fingerprint()
    settings = {"model_id": model.model_id, "revision": model.revision, "hook": hook.name,
                "corpus_sha256": corpus_sha256, "sae_weights": _file_identity(sae_dir),
                "context_size": metadata.context_size, "prepend_bos": metadata.prepend_bos,
                "exclude_special_tokens": metadata.exclude_special_tokens,
                **{name: getattr(config, name) for name in _RESULT_SETTINGS}}
    recorder = FeatureRecorder(sae.config.d_sae, config, resolve_device(model.device))
    checkpoint = sae_dir / FEATURES_DIR / CHECKPOINT_FILE
    if resume and checkpoint.is_file():
        _load_checkpoint(checkpoint, settings, recorder)
        callback("log", {"message": f"resumed after {recorder.n_tokens} tokens "
                                    f"({recorder.windows_seen} windows)"})
    else:
        checkpoint.unlink(missing_ok=True)

    callback("log", {"message": f"loading {model.model_id} up to layer {hook.layer}"})
    hooked = load_model(model, up_to_layer=hook.layer, config=model_config)
    sae.to(recorder.device)
    extraction = ExtractionConfig(metadata.context_size, config.batch_windows,
                                  metadata.prepend_bos, metadata.exclude_special_tokens)
    source = ModelActivationSource(hooked, source_corpus, [hook], extraction)
    tokenizer = hooked.tokenizer
    _read_corpus(source, sae, recorder, config,
                 partial(_save_checkpoint, checkpoint, settings, recorder), callback)
    if recorder.n_tokens == 0:
        raise MistudioError(
            f"corpus {source_corpus.path.name} has no complete window of "
            f"{metadata.context_size} tokens", hint="use a larger corpus", code="bad_corpus")
    del source, hooked

    callback("log", {"message": f"read {recorder.n_tokens} tokens; writing the features"})
    meta = {
        "d_sae": sae.config.d_sae, "d_in": sae.config.d_in, "model_id": model.model_id,
        "model_revision": model.revision, "hook": hook.name, "corpus": str(source_corpus.path),
        "corpus_sha256": corpus_sha256, "context_size": metadata.context_size,
        "find_config": asdict(config), "created_at": time.time(),
        "mistudio_version": __version__,
    }
    store = FeatureStore.create(sae_dir, meta)
    try:
        recorder.finish(store)
        logits = _write_logit_effects(store, model, sae.W_dec.detach(), len(tokenizer),
                                      config.logits, callback)
        store.write_vocabulary(vocabulary_texts(tokenizer))
    finally:
        store.close()
    checkpoint.unlink(missing_ok=True)
    return _result(sae_dir, recorder, logits)


def _read_corpus(source: ModelActivationSource, sae: SparseAutoencoder, recorder: FeatureRecorder,
                 config: FindConfig, save: Callable[[], None], callback: Callback) -> None:
    """One pass over the corpus's windows, from the first the recorder has not seen, until
    `config.tokens` non-special tokens are recorded or the corpus ends."""
    extraction, tokenizer = source.config, source.model.tokenizer
    hook = source.hooks[0]
    windows = pack_windows(source.corpus.documents(), tokenizer, extraction.context_size,
                           extraction.prepend_bos)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    remaining = _batches(islice(windows, recorder.windows_seen, None), config.batch_windows)
    batches = 0
    while recorder.n_tokens < config.tokens and (input_ids := next(remaining, None)) is not None:
        keep = (~torch.isin(input_ids, special) if extraction.exclude_special_tokens
                else torch.ones_like(input_ids, dtype=torch.bool))
        input_ids, keep = _within_budget(input_ids, keep, config.tokens - recorder.n_tokens)
        chunk = source.run_windows(batches, input_ids)
        recorder.add(input_ids, keep, sae.encode_sparse(chunk.activations[hook].float()))
        batches += 1
        callback("progress", {"done": min(recorder.n_tokens, config.tokens),
                               "total": config.tokens})
        if batches % config.checkpoint_every == 0 and recorder.n_tokens < config.tokens:
            save()
    if recorder.n_tokens < config.tokens:  # the corpus ended first: that was all the work
        callback("progress", {"done": recorder.n_tokens, "total": recorder.n_tokens})


def _write_logit_effects(store: FeatureStore, model: ModelSpec, decoder: torch.Tensor,
                         n_vocab: int, n: int, callback: Callback) -> str:
    """Store the logit effects and say where they came from (or why there are none). Failing
    to get them is logged, not raised: the corpus pass before is worth keeping."""
    try:
        unembedding = read_unembedding(model, n_vocab, callback)
    except MistudioError as exc:
        callback("log", {"level": "warning", "message": f"no logit effects: {exc}"})
        unembedding, origin = None, f"none ({exc.message})"
    else:
        origin = "none (not a causal LM)" if unembedding is None else unembedding.source
    if unembedding is not None:
        for name, array in logit_effects(decoder, unembedding, n).items():
            store.write_array(name, array.cpu().numpy())
    store.set_meta(logit_effects=origin)
    return origin


def _batches(windows: Iterator[list[int]], size: int) -> Iterator[torch.Tensor]:
    while batch := list(islice(windows, size)):
        yield torch.tensor(batch, dtype=torch.long)


def _within_budget(input_ids: torch.Tensor, keep: torch.Tensor, remaining: int):
    """The batch's first windows that reach `remaining` kept tokens (all if they do not)."""
    reached = (keep.sum(1).cumsum(0) >= remaining).nonzero()
    if reached.numel() == 0:
        return input_ids, keep
    end = int(reached[0]) + 1
    return input_ids[:end], keep[:end]


def _file_identity(sae_dir: Path) -> list[int]:
    """Size and modification time of the SAE's weights: a checkpoint is for these weights."""
    stat = (sae_dir / WEIGHTS_FILE).stat()
    return [stat.st_size, stat.st_mtime_ns]


def _save_checkpoint(path: Path, settings: dict, recorder: FeatureRecorder) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save({"settings": settings, "recorder": recorder.state_dict()}, temporary)
    temporary.replace(path)


def _load_checkpoint(path: Path, settings: dict, recorder: FeatureRecorder) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["settings"] != settings:
        changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
        raise MistudioError(
            f"the find checkpoint in {path.parent} was made with other settings "
            f"({', '.join(changed)})",
            hint="resume with the same model, corpus and options, or run without --resume",
            code="bad_request")
    recorder.load_state_dict(state["recorder"])


def _result(sae_dir: Path, recorder: FeatureRecorder, logits: str) -> dict:
    alive = int((recorder.n_fired > 0).sum())
    dead = recorder.d_sae - alive
    density = recorder.n_fired.double() / max(recorder.n_tokens, 1)
    live_density = density[density > 0]
    median = float(live_density.median()) if live_density.numel() else 0.0
    lines = [
        f"{recorder.n_tokens} tokens read; {alive} of {recorder.d_sae} features fired, "
        f"{dead} dead; median density of the live ones {median:.3g}",
        f"co-occurrence: {recorder.cooccurrence.method}; logit effects: {logits}",
        f"results in {sae_dir / FEATURES_DIR}",
    ]
    return {"path": str(sae_dir), "n_tokens": recorder.n_tokens, "alive": alive, "dead": dead,
            "summary": "\n".join(lines)}
