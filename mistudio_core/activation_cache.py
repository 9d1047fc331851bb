"""An on-disk activation cache that several training runs can share.

A cache directory holds the chunks of one extraction (see `activations`): per hook, shards of
consecutive chunks saved as `.npy` files and read back memory-mapped, plus the kept token ids,
and a `manifest.json` that names what was extracted (model, revision, hooks, corpus hash, window
settings) and how many tokens each chunk holds. A run whose settings match reads from it and
never loads the model; a run that needs more chunks than are cached extracts the missing ones
and appends them. The manifest is rewritten atomically after each shard, so an extraction that is
killed leaves a valid, shorter cache.

bfloat16 has no numpy type: such activations are stored as their raw 16-bit patterns and viewed
back as bfloat16 on load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from mistudio_core.activations import ActivationChunk
from mistudio_core.errors import MistudioError
from mistudio_core.hooks import HookPoint

MANIFEST = "manifest.json"
_FORMAT_VERSION = 1
_SHARD_BYTES = 64 << 20
_STORAGE = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}


class ActivationCache:
    """The cache directory: its identity (`key`), its shards, and reading and appending chunks."""

    def __init__(self, directory: Path, key: dict, dtype: torch.dtype) -> None:
        self.directory = Path(directory)
        self.key = key
        self.dtype = dtype
        self.chunk_tokens: list[int] = []
        self.shards: list[dict] = []
        self._pending: list[ActivationChunk] = []
        self._pending_bytes = 0
        self._open: dict[str, np.ndarray] = {}
        self._load_manifest()

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_tokens)

    @property
    def n_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def next_index(self) -> int:
        """The index the next appended chunk must have (written and pending chunks counted)."""
        return self.n_chunks + len(self._pending)

    def _load_manifest(self) -> None:
        path = self.directory / MANIFEST
        if not path.exists():
            return
        manifest = json.loads(path.read_text())
        stored_key = manifest.get("key", {})
        wanted = {name: value for name, value in self.key.items() if name != "hooks"}
        stored = {name: value for name, value in stored_key.items() if name != "hooks"}
        missing_hooks = set(self.key["hooks"]) - set(stored_key.get("hooks", []))
        if stored != wanted or missing_hooks or manifest.get("dtype") != str(self.dtype):
            raise MistudioError(
                f"the activation cache in {self.directory} was made with other settings "
                f"({_describe_difference(stored_key, self.key)})",
                hint="use another --cache directory for these settings, or delete this one",
            )
        self.key = stored_key
        self.shards = manifest["shards"]
        self.chunk_tokens = [n for shard in self.shards for n in shard["chunk_tokens"]]

    def chunk(self, index: int) -> ActivationChunk:
        """Read chunk `index` back from the memory-mapped shards."""
        shard = next(s for s in self.shards if s["first_chunk"] <= index < s["end_chunk"])
        offsets = np.cumsum([0, *shard["chunk_tokens"]])
        local = index - shard["first_chunk"]
        rows = slice(int(offsets[local]), int(offsets[local + 1]))
        activations = {
            HookPoint.parse(hook): self._tensor(shard["files"][hook], rows).view(self.dtype)
            for hook in self.key["hooks"]
        }
        tokens = torch.from_numpy(np.array(self._array(shard["files"]["tokens"])[rows]))
        return ActivationChunk(index, activations, tokens.long())

    def append(self, chunk: ActivationChunk) -> None:
        """Add the next chunk; it reaches the disk when a shard's worth has gathered."""
        if chunk.index != self.next_index:
            raise ValueError(f"chunk {chunk.index} appended out of order")
        self._pending.append(chunk)
        self._pending_bytes += sum(t.numel() * t.element_size() for t in chunk.activations.values())
        if self._pending_bytes >= _SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the gathered chunks as one shard and record it in the manifest."""
        if not self._pending:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        number = len(self.shards)
        files = {}
        for hook in self.key["hooks"]:
            stacked = torch.cat([c.activations[HookPoint.parse(hook)].cpu() for c in self._pending])
            files[hook] = self._save(f"{hook}.{number:05d}.npy", _to_numpy(stacked))
        tokens = torch.cat([c.tokens.cpu() for c in self._pending]).to(torch.int32).numpy()
        files["tokens"] = self._save(f"tokens.{number:05d}.npy", tokens)
        counts = [c.n_tokens for c in self._pending]
        self.shards.append(
            {
                "first_chunk": self.n_chunks,
                "end_chunk": self.n_chunks + len(counts),
                "chunk_tokens": counts,
                "files": files,
            }
        )
        self.chunk_tokens.extend(counts)
        self._pending, self._pending_bytes = [], 0
        self._write_manifest()

    def _save(self, name: str, array: np.ndarray) -> str:
        np.save(self.directory / name, array)
        return name

    def _write_manifest(self) -> None:
        manifest = {
            "version": _FORMAT_VERSION,
            "key": self.key,
            "dtype": str(self.dtype),
            "n_tokens": self.n_tokens,
            "shards": self.shards,
        }
        temporary = self.directory / (MANIFEST + ".tmp")
        temporary.write_text(json.dumps(manifest, indent=1))
        os.replace(temporary, self.directory / MANIFEST)

    def _array(self, name: str) -> np.ndarray:
        if name not in self._open:
            self._open[name] = np.load(self.directory / name, mmap_mode="r")
        return self._open[name]

    def _tensor(self, name: str, rows: slice) -> torch.Tensor:
        return torch.from_numpy(np.array(self._array(name)[rows]))


class CachedActivationSource:
    """Chunks from the cache; missing ones are extracted by a model source and appended."""

    def __init__(self, cache: ActivationCache, extractor: Callable[[], object]) -> None:
        self.cache = cache
        self._make_extractor = extractor
        self._extractor = None

    @property
    def d_in(self) -> int:
        return int(self.cache.key["d_in"])

    def chunks(self, start: int = 0,
               wanted: Callable[[int], bool] | None = None) -> Iterator[ActivationChunk]:
        """Chunks from index `start` on (only the `wanted` ones), from the cache while it has
        them; the extraction appends what comes next in order."""
        index = start
        while index < self.cache.n_chunks:
            if wanted is None or wanted(index):
                yield self.cache.chunk(index)
            index += 1
        if self._extractor is None:
            self._extractor = self._make_extractor()
        for chunk in self._extractor.chunks(index, wanted):
            if chunk.index == self.cache.next_index:
                self.cache.append(chunk)
            yield chunk


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype not in _STORAGE:
        raise ValueError(f"cannot cache activations of dtype {tensor.dtype}")
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def _describe_difference(stored: dict, wanted: dict) -> str:
    differing = [
        f"{name}: cached {stored.get(name)!r}, asked {wanted.get(name)!r}"
        for name in sorted(set(stored) | set(wanted))
        if stored.get(name) != wanted.get(name)
    ]
    return "; ".join(differing) or "dtype"
