"""Activation streaming: corpus -> token windows -> forward passes -> shuffled training batches.

The stream is cut into *chunks*, one per forward pass of `batch_windows` windows. Chunk `i` is
always the same data (packing is deterministic), so a chunk index is a position in the stream.
A chunk holds the activations of every requested hook from that one forward pass, with special
tokens (BOS, EOS, padding) removed, and the ids of the tokens kept.

Shuffling is done per *block* of `block_chunks` consecutive chunks: a block's tokens are
permuted with a generator seeded by (seed, block index) and cut into batches. A training position
is therefore just (block, batches taken from it): resuming re-extracts one block and skips the
batches already used, and the shuffle is identical, so a resumed run sees exactly the data an
uninterrupted one would have, without saving the buffer in the checkpoint.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mistudio_core.corpus import Corpus, pack_windows
from mistudio_core.errors import MistudioError
from mistudio_core.hooks import HookPoint
from mistudio_core.models import HookedModel

if TYPE_CHECKING:
    from mistudio_core.distributed import DataParallel


@dataclass(frozen=True)
class ExtractionConfig:
    """How windows are made and batched for the forward passes."""

    context_size: int = 128
    batch_windows: int = 32
    prepend_bos: bool = True
    exclude_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.context_size <= 1 << 16:
            raise MistudioError(
                f"context size {self.context_size} is out of range",
                hint="use a context size between 2 and 65536 (128 is usual)",
            )
        if self.batch_windows < 1:
            raise MistudioError("batch_windows must be at least 1", hint="use 32")


@dataclass
class ActivationChunk:
    """The activations of one forward pass, special tokens removed: [n_tokens, d] per hook."""

    index: int
    activations: dict[HookPoint, torch.Tensor]
    tokens: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


class ModelActivationSource:
    """Chunks made by running the model over the corpus, cycling over it if it runs out."""

    def __init__(
        self, model: HookedModel, corpus: Corpus, hooks: list[HookPoint], config: ExtractionConfig
    ) -> None:
        max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
        if max_positions is not None and config.context_size > max_positions:
            raise MistudioError(
                f"context size {config.context_size} is longer than {model.spec.model_id}'s "
                f"{max_positions} positions",
                hint=f"use --context-size {max_positions} or less",
            )
        for hook in hooks:
            model.module_for(hook)  # fails early, with a hint, on a hook the model lacks
        self.model = model
        self.corpus = corpus
        self.hooks = hooks
        self.config = config
        self._special_ids = torch.tensor(
            sorted(set(model.tokenizer.all_special_ids)), dtype=torch.long
        )

    @property
    def d_in(self) -> int:
        return self.model.hidden_size

    def windows(self) -> Iterator[list[int]]:
        """The corpus's windows, epoch after epoch."""
        while True:
            produced = False
            for window in pack_windows(
                self.corpus.documents(),
                self.model.tokenizer,
                self.config.context_size,
                self.config.prepend_bos,
            ):
                produced = True
                yield window
            if not produced:
                raise MistudioError(
                    f"corpus {self.corpus.path.name} has fewer tokens than one context window "
                    f"({self.config.context_size})",
                    hint="use a larger corpus or a smaller --context-size",
                    code="bad_corpus",
                )

    def chunks(self, start: int = 0,
               wanted: Callable[[int], bool] | None = None) -> Iterator[ActivationChunk]:
        """Chunks from index `start` on (only the `wanted` ones, by index); earlier windows, and
        those of unwanted chunks, are packed but never run."""
        size = self.config.batch_windows
        windows = itertools.islice(self.windows(), start * size, None)
        for index in itertools.count(start):
            batch = list(itertools.islice(windows, size))
            if wanted is None or wanted(index):
                yield self.run_windows(index, torch.tensor(batch, dtype=torch.long))

    def run_windows(self, index: int, input_ids: torch.Tensor) -> ActivationChunk:
        """Forward `input_ids` [n_windows, context], keeping only non-special positions."""
        captured = self.model.activations(input_ids, self.hooks)
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        if self.config.exclude_special_tokens:
            keep = ~torch.isin(input_ids, self._special_ids)
        flat_keep = keep.reshape(-1).to(self.model.device)
        activations = {
            hook: tensor.reshape(-1, tensor.shape[-1])[flat_keep]
            for hook, tensor in captured.items()
        }
        return ActivationChunk(index, activations, input_ids.reshape(-1)[keep.reshape(-1)])


@dataclass(frozen=True)
class StreamPosition:
    """Where a training run is in its data: a block and the batches already taken from it."""

    block: int = 0
    batch: int = 0


class ShuffledBatches:
    """Training batches drawn from shuffled blocks of chunks, resumable at a StreamPosition.

    In a data-parallel run (`parallel`), this process takes only the blocks it owns (see
    `mistudio_core.distributed`); positions count blocks of the whole stream."""

    def __init__(
        self,
        source,
        hooks: list[HookPoint],
        batch_tokens: int,
        block_chunks: int,
        seed: int,
        device: torch.device,
        parallel: DataParallel | None = None,
    ) -> None:
        if batch_tokens < 1 or block_chunks < 1:
            raise MistudioError("batch size and buffer size must be positive", hint="use 4096")
        self.source = source
        self.hooks = hooks
        self.batch_tokens = batch_tokens
        self.block_chunks = block_chunks
        self.seed = seed
        self.device = device
        self.parallel = parallel

    def earliest(self, step: int, position: StreamPosition) -> tuple[int, StreamPosition]:
        """Where a run of trainers at `step` and `position` starts this stream: there (other
        streams agree on it with other processes first)."""
        return step, position

    def batches(
        self, start: StreamPosition = StreamPosition()
    ) -> Iterator[tuple[dict[HookPoint, torch.Tensor], StreamPosition]]:
        """Batches of `batch_tokens` rows per hook, each with the position just after it."""
        owned = self.parallel.owns_block if self.parallel else (lambda _block: True)
        wanted = None if self.parallel is None else (
            lambda index: owned(index // self.block_chunks))
        chunks = self.source.chunks(start.block * self.block_chunks, wanted)
        skip = start.batch
        for block in itertools.count(start.block):
            if not owned(block):
                skip = 0
                continue
            buffer = self._block(chunks)
            n_tokens = next(iter(buffer.values())).shape[0]
            n_batches = n_tokens // self.batch_tokens
            if n_batches == 0:
                raise MistudioError(
                    f"one shuffle buffer holds {n_tokens} tokens, fewer than a batch "
                    f"({self.batch_tokens})",
                    hint="lower --batch-tokens or raise the buffer size",
                )
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
            order = torch.randperm(n_tokens, generator=generator).to(self.device)
            for batch in range(skip, n_batches):
                rows = order[batch * self.batch_tokens : (batch + 1) * self.batch_tokens]
                position = StreamPosition(block, batch + 1)
                yield {hook: acts[rows] for hook, acts in buffer.items()}, position
            skip = 0

    def _block(self, chunks: Iterator[ActivationChunk]) -> dict[HookPoint, torch.Tensor]:
        parts = [next(chunks) for _ in range(self.block_chunks)]
        return {
            hook: torch.cat([part.activations[hook].to(self.device) for part in parts])
            for hook in self.hooks
        }
