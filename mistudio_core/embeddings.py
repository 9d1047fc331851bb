"""Text embeddings for the embedding scorer and the semantic search over explanations.

Two embedders, both returning L2-normalised float32 rows (so a dot product is a cosine, and a
FAISS inner-product index searches by cosine):
- `hashing` (the offline default): character 3- to 5-grams of the lower-cased words, hashed into
  a fixed number of dimensions and TF weighted. No model, deterministic; finds explanations that
  share words or word pieces ("return" finds "returns").
- a Hugging Face encoder (`embedding:MODEL` / `--embedder MODEL`: hub id or local directory,
  e.g. sentence-transformers/all-MiniLM-L6-v2): the mean of its last hidden states over the
  non-padding tokens, as sentence-transformers pools.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

from mistudio_core.errors import MistudioError

HASHING = "hashing"
_HASH_DIMENSIONS = 1 << 12
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class HashingEmbedder:
    """Character n-gram TF vectors hashed into `dimensions` (no model needed)."""

    name = HASHING

    def __init__(self, dimensions: int = _HASH_DIMENSIONS) -> None:
        self.dimensions = dimensions
        # Words repeat across thousands of examples: hash each one's n-grams once.
        self._word_buckets: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for row, text in enumerate(texts):
            buckets = [self._buckets(word) for word in _WORD.findall(text.lower())]
            if buckets:
                np.add.at(out[row], np.concatenate(buckets), 1.0)
        return _normalised(out)

    def _buckets(self, word: str) -> np.ndarray:
        buckets = self._word_buckets.get(word)
        if buckets is None:
            padded = f" {word} "
            grams = [padded[start:start + n] for n in (3, 4, 5)
                     for start in range(max(1, len(padded) - n + 1))]
            buckets = np.array([zlib.crc32(g.encode()) % self.dimensions for g in grams],
                               dtype=np.int64)
            self._word_buckets[word] = buckets
        return buckets


class TransformerEmbedder:
    """Mean-pooled last hidden states of a Hugging Face encoder."""

    def __init__(self, model_id: str, device: str = "auto", batch_size: int = 32) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from mistudio_core.models import resolve_device, resolve_source

        self.name = f"embedding:{model_id}"
        self.device = resolve_device(device)
        self.batch_size = batch_size
        source = resolve_source(model_id)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise MistudioError(
                f"cannot load the embedding model {model_id!r}: {exc}",
                hint="give a local directory or hub id of a sentence-embedding model, e.g. "
                     "sentence-transformers/all-MiniLM-L6-v2", code="bad_model") from exc
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self._torch = torch

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        rows = []
        limit = min(getattr(self.tokenizer, "model_max_length", 512), 512)
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                                   truncation=True, max_length=limit, return_tensors="pt")
            batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            rows.append(pooled.cpu().numpy())
        if not rows:
            return np.zeros((0, int(self.model.config.hidden_size)), dtype=np.float32)
        return _normalised(np.concatenate(rows).astype(np.float32))


def text_embedder(spec: str | None, device: str = "auto"):
    """The embedder a user named: None or `hashing` for the offline one, else a model id
    (with or without an `embedding:` prefix)."""
    if spec is None or spec == HASHING:
        return HashingEmbedder()
    return TransformerEmbedder(spec.removeprefix("embedding:"), device=device)


def _normalised(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)
