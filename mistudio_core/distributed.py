"""Training on several processes with torch.distributed: data-parallel or layer-parallel.

Launched by `torchrun` or `accelerate launch` (which set RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address), `mistudio train` runs one process per GPU (or per CPU process with the
`gloo` backend), on one node or several:

    torchrun --nproc-per-node 4 -m mistudiod.cli train --model M --hook H ...
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-endpoint HOST:29500 \\
        -m mistudiod.cli train ...

(Under torchrun the CLI runs in its own processes, no daemon and no `--local`, which torchrun's
option parser would take for an abbreviation of its own.)

- Data: the activation stream is cut into shuffle blocks of chunks (`ShuffledBatches`); rank r of
  W extracts and trains on the blocks r, r + W, r + 2W, ... and skips the others without running
  the model on them, so every rank reads a disjoint shard.
- A step: `--batch-tokens` is the global batch, each rank takes its share; the gradients are
  averaged across ranks (one all-reduce of all of them, flattened), so every rank takes the same
  step and the SAE stays identical everywhere. The losses that divide by the batch's variance
  (FVU, AuxK) divide by the global batch's (`Trainer._variance_share`); the first batch's
  statistics (the input scale, b_dec's start) and the dead-latent counters are reduced too.
  BatchTopK's batch-wide top-k stays per rank.
- Files: rank 0 alone writes metrics, checkpoints and the SAE. A checkpoint holds every rank's
  data position; resumed with the same number of ranks, each goes on exactly where it was;
  with another number, the weights, Adam moments and step go on exactly and the data goes on
  from the first block no rank had started (the rest of the blocks under way is skipped, no
  batch is seen twice).

The same data in one process gives the same SAE (up to float rounding in the reductions): the
tests compare a 2-process `gloo` run with a single process trained on the two shards' batches
side by side.

Layer-parallel (`--parallel layers`, for many hooks' SAEs): rank 0 runs the model over the
corpus once and sends each hook's rows of every batch to the process that owns that hook's
SAEs (hook i to rank i mod W, rank 0 included); each process trains and writes its own SAEs, as
a one-process run of several hooks does. The SAEs are exactly those of training each hook alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mistudio_core.activations import StreamPosition
from mistudio_core.errors import MistudioError
from mistudio_core.hooks import HookPoint

MODES = ("data", "layers")


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes `torchrun` started."""

    rank: int
    world: int

    @classmethod
    def from_environment(cls):
        """The run `torchrun` started this process in (its process group joined), or None when
        it runs alone."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """Each process's own GPU (LOCAL_RANK) when the run is on GPUs."""
        if requested.type != "cuda":
            return requested
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device

    def gather(self, value) -> list:
        """Every rank's `value` (a picklable object), in rank order."""
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered


@dataclass(frozen=True)
class DataParallel(Processes):
    """A data-parallel run: every process trains every SAE on its shard of the data."""

    def share(self, batch_tokens: int) -> int:
        """This rank's rows of a global batch."""
        if batch_tokens % self.world:
            raise MistudioError(
                f"--batch-tokens {batch_tokens} does not split evenly over {self.world} "
                "processes", hint=f"use a multiple of {self.world}", field="batch_tokens")
        return batch_tokens // self.world

    def owns_block(self, block: int) -> bool:
        return block % self.world == self.rank

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks, in place."""
        dist.all_reduce(tensor)
        return tensor.div_(self.world)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def mean_gradients(self, parameters) -> None:
        """Average every gradient over the ranks in one all-reduce."""
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = self.mean_(_flatten_dense_tensors(grads))
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(reduced)


@dataclass(frozen=True)
class LayerParallel(Processes):
    """A layer-parallel run: rank 0 extracts, each process trains the SAEs of its hooks."""

    def owns(self, hook_index: int) -> bool:
        return hook_index % self.world == self.rank

    def check(self, n_hooks: int) -> None:
        if n_hooks < self.world:
            raise MistudioError(
                f"{n_hooks} hooks for {self.world} processes: some would have nothing to train",
                hint="give as many hooks as processes or more, or use --parallel data",
                field="parallel")


class SentBatches:
    """Rank 0's stream in a layer-parallel run: each batch's rows of the other processes' hooks
    are sent to them, the rest (its own hooks' rows) yielded here."""

    def __init__(self, batches, hooks: list[HookPoint], processes: LayerParallel) -> None:
        self.inner = batches
        self.hooks = hooks
        self.processes = processes

    def earliest(self, step: int, position: StreamPosition) -> tuple[int, StreamPosition]:
        return _earliest(self.processes, step, position)

    def batches(self, start: StreamPosition) -> Iterator[tuple[dict, StreamPosition]]:
        for batch, position in self.inner.batches(start):
            mine = {}
            for index, hook in enumerate(self.hooks):
                owner = index % self.processes.world
                if owner == 0:
                    mine[hook] = batch[hook]
                else:
                    dist.send(batch[hook].contiguous(), dst=owner)
            where = torch.tensor([position.block, position.batch], dtype=torch.long)
            for rank in range(1, self.processes.world):
                dist.send(where, dst=rank)
            yield mine, position


class ReceivedBatches:
    """The other ranks' stream in a layer-parallel run: their hooks' rows, from rank 0."""

    def __init__(self, hooks: list[HookPoint], processes: LayerParallel, rows: int,
                 width: int, dtype: torch.dtype, device: torch.device) -> None:
        self.hooks = [hook for index, hook in enumerate(hooks) if processes.owns(index)]
        self.processes = processes
        self.shape, self.dtype, self.device = (rows, width), dtype, device

    def earliest(self, step: int, position: StreamPosition) -> tuple[int, StreamPosition]:
        return _earliest(self.processes, step, position)

    def batches(self, _start: StreamPosition) -> Iterator[tuple[dict, StreamPosition]]:
        while True:
            batch = {}
            for hook in self.hooks:
                rows = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                dist.recv(rows, src=0)
                batch[hook] = rows
            where = torch.empty(2, dtype=torch.long)
            dist.recv(where, src=0)
            yield batch, StreamPosition(*where.tolist())


def _earliest(processes: Processes, step: int,
              position: StreamPosition) -> tuple[int, StreamPosition]:
    """The earliest (step, position) of any process: where the shared stream starts (a process
    stopped between two SAEs' checkpoint writes is behind the others)."""
    step, block, batch = min(processes.gather((step, position.block, position.batch)))
    return step, StreamPosition(block, batch)
