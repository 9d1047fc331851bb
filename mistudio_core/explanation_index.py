"""The explanation index: every explained feature's latest explanation, embedded, in FAISS.

`mistudio correlate` builds it (`build_explanation_index`); `mistudio features --semantic`, the
daemon's `feature.search` and the TUI query it (`search_explanations`). The index is an exact
inner-product index over L2-normalised embeddings (`explanations.faiss`, the feature id of each
row in `explanation_ids.npy`, the embedder and dimension in the store's meta
`explanation_index`), so a search ranks by cosine.

The offline hashing embedder indexes explanations in 512 dimensions rather than its usual 4096:
short explanations use few n-grams, so collisions stay rare, and the index of a 65k-feature SAE
is 128 MiB instead of 1 GiB. The dimension is recorded, so queries are embedded the same way.
The index is read with FAISS's mmap flag, so a search maps the file instead of copying it and
answers in milliseconds with no state kept between calls. With the hashing embedder nothing
here imports torch: the daemon answers searches without loading it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from mistudio_core.embeddings import HASHING, HashingEmbedder, text_embedder
from mistudio_core.errors import MistudioError
from mistudio_core.feature_store import FeatureStore

INDEX_FILE = "explanations.faiss"
INDEX_IDS_FILE = "explanation_ids.npy"
INDEX_META_KEY = "explanation_index"
# The hashing embedder's dimension for the explanation index (see the module docstring).
HASHING_INDEX_DIMENSIONS = 512
# Explanations embedded per call: one progress report each.
EMBED_BLOCK = 4096


def search_explanations(sae_dir: str | Path, query: str, limit: int = 10) -> list[dict]:
    """The features whose explanations are closest in meaning to `query`, best first:
    `{"id", "score" (cosine), "explanation"}`."""
    if not query.strip():
        raise MistudioError("the search text is empty", hint="give a few words to look for",
                            field="query")
    if limit < 1:
        raise MistudioError(f"limit must be at least 1, got {limit}", hint="use --limit 10",
                            field="limit")
    store = FeatureStore(sae_dir)
    try:
        recorded = store.meta.get(INDEX_META_KEY)
        index_path = store.directory / INDEX_FILE
        ids_path = store.directory / INDEX_IDS_FILE
        if not recorded or not index_path.is_file() or not ids_path.is_file():
            raise _missing_index(store)
        index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP_IFC)
        row_features = np.load(ids_path, mmap_mode="r")
        if index.ntotal != len(row_features) or index.ntotal != recorded["count"]:
            raise MistudioError(
                f"the explanation index in {store.directory} is incomplete",
                hint=f"run `mistudio correlate {store.sae_dir}` again", code="bad_index")
        vector = _index_embedder(recorded["embedder"], recorded["dimensions"]).embed([query])
        values, rows = index.search(vector, min(limit, index.ntotal))
        hits = [(int(row_features[row]), float(value))
                for row, value in zip(rows[0], values[0], strict=True) if row >= 0]
        texts = store.latest_explanations([feature for feature, _ in hits])
        return [{"id": feature, "score": round(value, 4), "explanation": texts.get(feature)}
                for feature, value in hits]
    finally:
        store.close()


def build_explanation_index(store: FeatureStore, latest: dict[int, str], embedder_spec: str,
                            device: str = "auto",
                            report: Callable[[int], None] = lambda _done: None) -> int:
    """Embed the explanations, save the index and its row ids; return the dimension."""
    features = np.fromiter(latest, dtype=np.int32, count=len(latest))
    texts = list(latest.values())
    dimensions = HASHING_INDEX_DIMENSIONS if embedder_spec == HASHING else None
    embedder = _index_embedder(embedder_spec, dimensions, device)
    index = None
    for start in range(0, len(texts), EMBED_BLOCK):
        vectors = np.ascontiguousarray(embedder.embed(texts[start:start + EMBED_BLOCK]),
                                       dtype=np.float32)
        if index is None:
            index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        report(min(start + EMBED_BLOCK, len(texts)))
    staging_index = store.directory / f".{INDEX_FILE}"
    staging_ids = store.directory / f".{INDEX_IDS_FILE}"
    faiss.write_index(index, str(staging_index))
    np.save(staging_ids, features)
    os.replace(staging_ids, store.directory / INDEX_IDS_FILE)
    os.replace(staging_index, store.directory / INDEX_FILE)
    store.set_meta(**{INDEX_META_KEY: {"embedder": embedder_spec, "dimensions": index.d,
                                       "count": int(index.ntotal)}})
    return int(index.d)


def drop_explanation_index(store: FeatureStore) -> None:
    """Forget an index of explanations that no longer exist."""
    for name in (INDEX_FILE, INDEX_IDS_FILE):
        (store.directory / name).unlink(missing_ok=True)
    store.set_meta(**{INDEX_META_KEY: None})


def _index_embedder(spec: str, dimensions: int | None, device: str = "auto"):
    if spec == HASHING:
        return HashingEmbedder(dimensions or HASHING_INDEX_DIMENSIONS)
    return text_embedder(spec, device=device)


def _missing_index(store: FeatureStore) -> MistudioError:
    if not store.latest_explanations():
        hint = (f"run `mistudio explain {store.sae_dir}`, then "
                f"`mistudio correlate {store.sae_dir}`")
    else:
        hint = f"run `mistudio correlate {store.sae_dir}`"
    return MistudioError(f"no explanation index for the SAE in {store.sae_dir}", hint=hint,
                         code="not_found")
