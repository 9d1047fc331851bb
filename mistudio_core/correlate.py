"""How features relate: similar decoder directions, semantic search over explanations, and
which features fire on a given text.

`mistudio correlate SAE_DIR` (`correlate_features`) writes two things into the SAE's feature
store (`SAE_DIR/features/`, made by `mistudio find`):
- decoder neighbours: each feature's nearest features by the cosine of their decoder rows, exact,
  through a FAISS inner-product index over the L2-normalised rows (`decoder_ids/values`);
- the explanation index (`mistudio_core.explanation_index`), which `search_explanations`
  queries by cosine.

Co-occurrence neighbours (Jaccard over firing positions) are not computed here: they need every
firing position, which only find sees, so find writes them in its own pass.

`features_on_text` runs the model up to the SAE's hook on one text and reports the strongest
features per token and over the whole text, with their explanations when the store has them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from mistudio_core.embeddings import HASHING
from mistudio_core.errors import MistudioError
from mistudio_core.explanation_index import build_explanation_index, drop_explanation_index
from mistudio_core.feature_store import FeatureStore, has_features
from mistudio_core.models import ModelSpec, load_config, load_model
from mistudio_core.progress import Callback, silent
from mistudio_core.sae import LoadedSAE, load_sae

# Decoder rows searched per FAISS call: one progress report each, and a [4096, k] result.
QUERY_BLOCK = 4096
NEAR_DUPLICATE_COSINE = 0.9


@dataclass(frozen=True)
class CorrelateConfig:
    """`neighbours` per feature; `embedder` for the explanation index: `hashing` (offline) or a
    Hugging Face encoder id or directory, run on `device`."""

    neighbours: int = 10
    embedder: str = HASHING
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.neighbours < 1:
            raise MistudioError(f"neighbours must be at least 1, got {self.neighbours}",
                                hint="use --neighbours 10", field="neighbours")


def correlate_features(sae_dir: str | Path, config: CorrelateConfig | None = None,
                       callback: Callback = silent) -> dict:
    """Write decoder-cosine neighbours and the explanation index into the SAE's feature store."""
    config = config or CorrelateConfig()
    loaded = load_sae(sae_dir)
    store = FeatureStore(sae_dir)
    try:
        if store.d_sae != loaded.sae.config.d_sae:
            raise MistudioError(
                f"the features in {store.directory} are of an SAE with {store.d_sae} features, "
                f"but the SAE in {sae_dir} has {loaded.sae.config.d_sae}",
                hint=f"run `mistudio find {sae_dir} --model M --corpus C` again", code="bad_sae")
        decoder = unit_rows(loaded.sae.W_dec.detach().float().cpu().numpy())
        del loaded  # the encoder and the raw decoder are not needed any more
        latest = store.latest_explanations()
        total = len(decoder) + len(latest)

        def report(done: int) -> None:
            callback("progress", {"done": done, "total": total})

        callback("log", {"message": f"decoder neighbours: {len(decoder)} features, "
                                    f"{config.neighbours} each"})
        ids, cosines = decoder_neighbours(decoder, config.neighbours, report)
        store.write_neighbours("decoder", ids, cosines)
        del decoder
        if store.array("cooccurrence_ids") is None:
            callback("log", {"message": "this store has no co-occurrence neighbours (an older "
                                        "find made it); rerun `mistudio find` to get them"})
        if latest:
            callback("log", {"message": f"embedding {len(latest)} explanations "
                                        f"({config.embedder})"})
            dimensions = build_explanation_index(
                store, latest, config.embedder, config.device,
                lambda n: report(total - len(latest) + n))
        else:
            drop_explanation_index(store)
            dimensions = None
            callback("log", {"message": "no explanations to index: run `mistudio explain "
                                        f"{sae_dir}` first, then correlate again"})
        report(total)
        return _result(store, ids, cosines, config, len(latest), dimensions)
    finally:
        store.close()


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """The rows L2-normalised, as contiguous float32 (zero rows stay zero)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.maximum(norms, 1e-12))


def decoder_neighbours(unit_decoder: np.ndarray, neighbours: int,
                       report=lambda _done: None, block: int = QUERY_BLOCK,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `neighbours` nearest other rows by cosine, best first: ids `[d_sae, n]` int32
    (-1 pads when there are fewer other rows) and cosines float32 (NaN in padding).

    Exact (`IndexFlatIP`). One more than asked is searched so that the row itself can be
    dropped; it is dropped by id, not by rank, because an exact duplicate ties with it."""
    d_sae = len(unit_decoder)
    index = faiss.IndexFlatIP(unit_decoder.shape[1])
    index.add(unit_decoder)
    ids = np.full((d_sae, neighbours), -1, dtype=np.int32)
    cosines = np.full((d_sae, neighbours), np.nan, dtype=np.float32)
    searched = min(neighbours + 1, d_sae)
    for start in range(0, d_sae, block):
        found_values, found_ids = index.search(unit_decoder[start:start + block], searched)
        for offset, (row_ids, row_values) in enumerate(zip(found_ids, found_values,
                                                           strict=True)):
            keep = (row_ids != start + offset) & (row_ids >= 0)
            kept_ids, kept_values = row_ids[keep][:neighbours], row_values[keep][:neighbours]
            ids[start + offset, :len(kept_ids)] = kept_ids
            cosines[start + offset, :len(kept_ids)] = kept_values
        report(min(start + block, d_sae))
    return ids, cosines


def features_on_text(sae_dir: str | Path, model: ModelSpec, text: str, top: int = 5) -> dict:
    """Which features fire on `text`: the `top` strongest on every token (special tokens left
    out, as in training) and overall (by their maximum over the text, with the number of tokens
    they fire on); explanations come from the feature store when there is one.

    The `demo` model id builds the offline demo model on first use (through `load_model`)."""
    if top < 1:
        raise MistudioError(f"top must be at least 1, got {top}", hint="use --top 5",
                            field="top")
    if not text.strip():
        raise MistudioError("the text is empty", hint="give some text to read", field="text")
    loaded = load_sae(sae_dir)
    hook = loaded.hook()
    config = load_config(model)
    loaded.check_width(config.hidden_size, model.model_id)
    hooked = load_model(model, up_to_layer=hook.layer, config=config)
    ids = _token_ids(hooked.tokenizer, text, loaded)
    special = set(hooked.tokenizer.all_special_ids)
    shown = [position for position, token in enumerate(ids) if token not in special]
    if not shown:
        raise MistudioError("the text has only special tokens, which the SAE is not shown",
                            hint="give some ordinary text to read", field="text")
    activations = hooked.activations(torch.tensor([ids]), [hook])[hook][0]
    sae = loaded.sae.to(hooked.device)
    codes = sae.encode(activations.float()).float().cpu()[shown]  # [n_tokens, d_sae]

    per_token = [_strongest(row, top) for row in codes]
    fired = (codes > 0).sum(0)
    peaks = codes.max(0).values
    overall = _strongest(peaks, top)
    mentioned = sorted({f for row in per_token for f, _ in row} | {f for f, _ in overall})
    texts = _explanations_if_found(sae_dir, mentioned)

    tokens = [{"token": hooked.tokenizer.decode([ids[position]]),
               "features": [{"id": f, "activation": round(v, 4), "explanation": texts.get(f)}
                            for f, v in row]}
              for position, row in zip(shown, per_token, strict=True)]
    overall_rows = [{"id": f, "max": round(v, 4), "tokens_fired": int(fired[f]),
                     "explanation": texts.get(f)} for f, v in overall]
    return {"path": str(sae_dir), "hook": hook.name, "tokens": tokens, "overall": overall_rows,
            "summary": _text_summary(len(tokens), int((fired > 0).sum()), overall_rows)}


# ----- correlate's parts ---------------------------------------------------------------------


def _result(store: FeatureStore, ids: np.ndarray, cosines: np.ndarray, config: CorrelateConfig,
            n_indexed: int, dimensions: int | None) -> dict:
    nearest = cosines[:, 0][ids[:, 0] >= 0]
    median = float(np.median(nearest)) if len(nearest) else float("nan")
    duplicates = int((nearest > NEAR_DUPLICATE_COSINE).sum())
    lines = [
        f"decoder neighbours: {config.neighbours} per feature for {store.d_sae} features",
        f"median nearest-neighbour cosine {median:.3f}; {duplicates} features have a "
        f"near-duplicate (cosine > {NEAR_DUPLICATE_COSINE})",
    ]
    if n_indexed:
        lines.append(f"explanation index: {n_indexed} explanations ({config.embedder}, "
                     f"{dimensions} dims)")
    else:
        lines.append(f"explanation index: none (run `mistudio explain {store.sae_dir}` first)")
    return {"path": str(store.sae_dir), "decoder_neighbours": config.neighbours,
            "explanations_indexed": n_indexed, "median_nearest_cosine": round(median, 4),
            "near_duplicates": duplicates, "summary": "\n".join(lines)}


# ----- features_on_text's parts --------------------------------------------------------------


def _token_ids(tokenizer, text: str, loaded: LoadedSAE) -> list[int]:
    """The text's tokens, opened with BOS when the SAE was trained that way (as
    `corpus.pack_windows` opens its windows: BOS, else end-of-text)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if loaded.metadata.prepend_bos:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (
            tokenizer.eos_token_id)
        if bos is not None:
            ids = [bos, *ids]
    limit = loaded.metadata.context_size
    if len(ids) > limit:
        raise MistudioError(
            f"the text is {len(ids)} tokens long, but the SAE was trained on contexts of "
            f"{limit}", hint=f"shorten the text to at most {limit} tokens (split it)",
            field="text")
    return ids


def _strongest(values: torch.Tensor, top: int) -> list[tuple[int, float]]:
    """The `top` largest positive entries as (index, value), largest first."""
    best = values.topk(min(top, values.numel()))
    return [(int(i), float(v)) for v, i in zip(best.values, best.indices, strict=True) if v > 0]


def _explanations_if_found(sae_dir: str | Path, features: list[int]) -> dict[int, str]:
    if not has_features(sae_dir):
        return {}
    store = FeatureStore(sae_dir)
    try:
        return store.latest_explanations(features)
    finally:
        store.close()


def _text_summary(n_tokens: int, n_features: int, overall: list[dict]) -> str:
    lines = [f"{n_tokens} tokens, {n_features} distinct features fired"]
    for row in overall[:3]:
        explanation = f": {row['explanation']}" if row["explanation"] else ""
        lines.append(f"#{row['id']} max {row['max']:.3g} on {row['tokens_fired']} tokens"
                     f"{explanation}")
    return "\n".join(lines)
