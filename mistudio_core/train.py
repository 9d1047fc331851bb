"""The SAE trainer: Adam with warm-up and decay, exact checkpoints, metrics, OOM back-off.

A run is a function of its settings and its data: the SAE is initialised from the seed, the
batches come from `ShuffledBatches` (whose position is two integers), and everything that
changes during training (weights, Adam moments, the step, the data position, the dead-latent
counters, RNG states) goes in one checkpoint file, replaced atomically. Resuming from it gives
bit-for-bit the weights an uninterrupted run would have had on the same machine.

When a step runs out of GPU memory the batch is split into twice as many micro-batches (their
gradients accumulated, so the optimisation is unchanged) and the step is retried; the split
is logged and kept for the rest of the run.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mistudio_core.activations import ShuffledBatches, StreamPosition
from mistudio_core.distributed import DataParallel
from mistudio_core.errors import MistudioError
from mistudio_core.hooks import HookPoint
from mistudio_core.progress import Callback, silent
from mistudio_core.sae import SAEConfig, SparseAutoencoder

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """How long and how an SAE is trained. `lr=None` scales with width (see `learning_rate`)."""

    total_tokens: int = 2_000_000
    batch_tokens: int = 4096
    lr: float | None = None
    warmup_steps: int | None = None
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 200
    dead_after_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.batch_tokens < 1 or self.total_tokens < self.batch_tokens:
            raise MistudioError(
                f"--tokens {self.total_tokens} must be at least one batch "
                f"({self.batch_tokens} tokens)",
                hint="raise --tokens or lower --batch-tokens",
            )
        if self.lr is not None and not 0 < self.lr < 1:
            raise MistudioError(f"learning rate {self.lr} is out of range", hint="try 2e-4")

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_tokens

    @property
    def warmup(self) -> int:
        """Warm-up steps: by default 100, or a tenth of a shorter run (a fixed 100 steps would
        spend most of a short run at a low learning rate)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(100, self.total_steps // 10)

    @property
    def dead_window(self) -> int:
        """Tokens without firing after which a latent counts as dead (and AuxK revives it).

        By default 1/20 of the run, at least 4 batches and at most 10M tokens (sparsify's value
        for runs of billions): a fixed window longer than a short run would never call any
        latent dead, and AuxK would never start.
        """
        if self.dead_after_tokens is not None:
            return self.dead_after_tokens
        return min(10_000_000, max(4 * self.batch_tokens, self.total_tokens // 20))

    def learning_rate(self, d_sae: int) -> float:
        """The default follows sparsify: 2e-4 at 16k latents, scaled by 1/sqrt(width)."""
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, constant, then linear decay to zero over the last `decay_fraction`."""
        total = self.total_steps
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        decay_start = int(total * (1 - self.decay_fraction))
        if step >= decay_start and total > decay_start:
            return max(0.0, (total - step) / (total - decay_start))
        return 1.0


class Trainer:
    """Trains one SAE on one hook's batches, writing checkpoints and metrics into `run_dir`.
    `run` trains it alone; `train_together` trains several on one stream of batches."""

    def __init__(
        self,
        sae_config: SAEConfig,
        train_config: TrainConfig,
        batches: ShuffledBatches,
        hook: HookPoint,
        run_dir: Path,
        device: torch.device,
        callback: Callback = silent,
        parallel: DataParallel | None = None,
    ) -> None:
        self.sae_config = sae_config
        self.parallel = parallel
        self.is_main = parallel is None or parallel.is_main
        self.config = train_config
        self.batches = batches
        self.hook = hook
        self.run_dir = Path(run_dir)
        self.device = device
        self.callback = callback if self.is_main else silent
        torch.manual_seed(train_config.seed)
        self.sae = SparseAutoencoder(sae_config, device=device)
        self.optimizer = torch.optim.Adam(
            self.sae.parameters(),
            lr=train_config.learning_rate(sae_config.d_sae),
            betas=(0.9, 0.999),
            fused=True,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, train_config.lr_factor)
        self.step = 0
        self.position = StreamPosition()
        self.tokens_since_fired = torch.zeros(sae_config.d_sae, dtype=torch.long, device=device)
        self.micro_batches = 1
        self._window: list[dict] = []
        self._clock = time.perf_counter()

    # ----- the loop ----------------------------------------------------------------------------

    def run(self, resume: bool = False) -> SparseAutoencoder:
        train_together([self], self.batches, resume)
        return self.sae

    def start(self, resume: bool) -> None:
        """Resume from the checkpoint in `run_dir` (with `resume`, when there is one), or start
        afresh."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume and (self.run_dir / CHECKPOINT_FILE).exists():
            self._load_checkpoint()
            self.callback("log", {"message": f"resumed at step {self.step}"})
        else:
            if resume:
                self.callback("log", {"message": f"no checkpoint in {self.run_dir}: "
                                                 "starting from step 0"})
            if self.is_main:
                (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
        self._clock = time.perf_counter()

    def train_on(self, batch: dict[HookPoint, torch.Tensor], position: StreamPosition) -> None:
        """One optimisation step on this SAE's hook's rows of `batch` (the data up to
        `position`), with its metrics and checkpoint when they are due."""
        x = batch[self.hook].float()
        if self.step == 0:
            self._initialise_from(x)
        output = self._optimisation_step(x * self.sae.input_scale)
        self.position = position
        self.step += 1
        self._track(output, x.shape[0])
        total = self.config.total_steps
        if self.step % self.config.log_every == 0 or self.step == total:
            elapsed, self._clock = time.perf_counter() - self._clock, time.perf_counter()
            self._report(elapsed)
        if self.step % self.config.checkpoint_every == 0 or self.step == total:
            self._save_checkpoint()

    def _initialise_from(self, x: torch.Tensor) -> None:
        """Scale inputs to E||x|| = sqrt(d_in) and start b_dec at the (scaled) data mean (of the
        whole global batch, in a data-parallel run)."""
        mean_norm, mean = x.norm(dim=1).mean(), x.mean(0)
        if self.parallel is not None:
            mean_norm, mean = self.parallel.mean_(mean_norm), self.parallel.mean_(mean)
        self.sae.input_scale = float(math.sqrt(self.sae_config.d_in) / mean_norm.clamp_min(1e-8))
        self.sae.initialize_decoder_bias(mean * self.sae.input_scale)

    def _optimisation_step(self, x: torch.Tensor):
        while True:
            try:
                return self._accumulated_step(x)
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if x.shape[0] // (self.micro_batches * 2) < 1:
                    raise
                self.micro_batches *= 2
                self.callback(
                    "log",
                    {
                        "level": "warning",
                        "message": f"out of memory at step {self.step}: splitting each batch "
                        f"into {self.micro_batches} micro-batches of "
                        f"{x.shape[0] // self.micro_batches} tokens and going on",
                    },
                )

    def _accumulated_step(self, x: torch.Tensor):
        dead_mask = self.tokens_since_fired >= self.config.dead_window
        total_variance = self._variance_share(x)
        if total_variance is not None:  # each part's loss is divided by the number of parts
            total_variance = total_variance / self.micro_batches
        outputs = []
        for part in x.chunk(self.micro_batches):
            with torch.autocast(
                device_type=self.device.type, dtype=torch.bfloat16,
                enabled=self.device.type == "cuda",
            ):
                output = self.sae.training_forward(part, dead_mask, total_variance)
            (output.loss / self.micro_batches).backward()
            outputs.append(output)
        if self.parallel is not None:
            self.parallel.mean_gradients(self.sae.parameters())
        self.sae.remove_parallel_decoder_gradient()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.sae.normalize_decoder()
        return _merge(outputs)

    def _variance_share(self, x: torch.Tensor) -> torch.Tensor | None:
        """In a data-parallel run: the global batch's total variance over the number of ranks.

        A single process's FVU divides the batch's squared error by its total variance; each
        rank divides its part of the error by this share, so that the ranks' gradients,
        averaged, are exactly the single process's on the global batch. (None alone: each
        batch's own variance.)"""
        if self.parallel is None:
            return None
        x = x.float()
        mean = self.parallel.mean_(x.mean(0))  # the ranks' batches are the same size
        deviation = (x - mean).square().sum()  # about the global mean: no cancellation
        return self.parallel.sum_(deviation) / self.parallel.world

    # ----- metrics -----------------------------------------------------------------------------

    def _track(self, output, n_tokens: int) -> None:
        """Dead-latent counters and the step's metrics (over all ranks' tokens)."""
        fired = output.fired
        scalars = torch.stack([output.loss, output.mse, output.fvu, output.l0,
                               output.aux_loss]).detach().float()
        if self.parallel is not None:
            n_tokens *= self.parallel.world
            fired = self.parallel.sum_(fired.clone())
            scalars = self.parallel.mean_(scalars)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired > 0] = 0
        loss, mse, fvu, l0, aux_loss = scalars.tolist()
        self._window.append({"loss": loss, "mse": mse, "fve": 1.0 - fvu, "l0": l0,
                             "aux_loss": aux_loss})

    def _report(self, elapsed: float) -> None:
        steps = len(self._window)
        point = {name: sum(w[name] for w in self._window) / steps for name in self._window[0]}
        dead = self.tokens_since_fired >= self.config.dead_window
        point.update(
            step=self.step,
            tokens=self.step * self.config.batch_tokens,
            dead_pct=100.0 * dead.float().mean().item(),
            tokens_per_s=steps * self.config.batch_tokens / max(elapsed, 1e-9),
            lr=self.scheduler.get_last_lr()[0],
        )
        self._window = []
        if self.is_main:
            with (self.run_dir / METRICS_FILE).open("a") as handle:
                handle.write(json.dumps(point) + "\n")
        self.callback("metrics", point)

    # ----- checkpoints -------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        """All of the run's state, written by rank 0 alone (with every rank's data position)."""
        positions = [asdict(self.position)] if self.parallel is None else self.parallel.gather(
            asdict(self.position))
        if not self.is_main:
            return
        state = {
            "sae_config": self.sae_config.to_dict(),
            "train_config": asdict(self.config),
            "hook": self.hook.name,
            "sae": self.sae.state_dict(),
            "input_scale": self.sae.input_scale,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "position": asdict(self.position),
            "positions": positions,
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "micro_batches": self.micro_batches,
            "rng": _rng_states(),
        }
        temporary = self.run_dir / (CHECKPOINT_FILE + ".tmp")
        torch.save(state, temporary)
        os.replace(temporary, self.run_dir / CHECKPOINT_FILE)
        self.callback("checkpoint", {"step": self.step})

    def _load_checkpoint(self) -> None:
        state = torch.load(self.run_dir / CHECKPOINT_FILE, map_location=self.device,
                           weights_only=False)
        ours = {"sae_config": self.sae_config.to_dict(), "hook": self.hook.name}
        theirs = {"sae_config": state["sae_config"], "hook": state["hook"]}
        settings = {k: v for k, v in asdict(self.config).items() if k != "total_tokens"}
        stored = {k: v for k, v in state["train_config"].items() if k != "total_tokens"}
        if ours != theirs or settings != stored:
            raise MistudioError(
                f"the checkpoint in {self.run_dir} was written with other settings",
                hint="resume with the same options as the first run, or use a new --out",
            )
        self.sae.load_state_dict(state["sae"])
        self.sae.input_scale = state["input_scale"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.position = _resumed_position(state, self.parallel)
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        self.micro_batches = state["micro_batches"]
        _restore_rng(state["rng"])
        if self.is_main:
            _truncate_metrics(self.run_dir / METRICS_FILE, self.step)


def train_together(trainers: list[Trainer], batches: ShuffledBatches, resume: bool) -> None:
    """Train SAEs on one stream of batches (each on its own hook's rows), step by step.

    The trainers share their settings (steps, batch size, seed), so they checkpoint at the same
    steps; a run stopped between two of their checkpoint writes resumes from the earliest, and a
    trainer that is ahead skips the batches it has trained on already: resuming is exact. In a
    layer-parallel run, `batches` agrees on that start with the other processes."""
    for trainer in trainers:
        trainer.start(resume)
    behind = min(trainers, key=lambda trainer: trainer.step)
    step, start = batches.earliest(behind.step, behind.position)
    stream = batches.batches(start)
    while step < behind.config.total_steps:
        batch, position = next(stream)
        for trainer in trainers:
            if trainer.step == step:
                trainer.train_on(batch, position)
        step += 1


def _merge(outputs):
    """One step's metrics from its micro-batches."""
    if len(outputs) == 1:
        return outputs[0]
    first = outputs[0]
    mean = {name: torch.stack([getattr(o, name) for o in outputs]).mean()
            for name in ("loss", "mse", "fvu", "aux_loss", "sparsity_loss", "l0")}
    return type(first)(fired=sum(o.fired for o in outputs), **mean)


def _resumed_position(state: dict, parallel: DataParallel | None) -> StreamPosition:
    """Where this process's data goes on: its own position when the run has as many processes
    as the checkpoint's; otherwise the first block no process had started (no batch is seen
    twice; the rest of the blocks under way is skipped)."""
    positions = [StreamPosition(**p) for p in state.get("positions") or [state["position"]]]
    world = 1 if parallel is None else parallel.world
    if len(positions) == world:
        return positions[0 if parallel is None else parallel.rank]
    return StreamPosition(max(p.block for p in positions) + 1, 0)


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"].cpu())
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric points logged after the checkpoint, which the resumed run will log again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
