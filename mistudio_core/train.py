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
    """Trains one SAE on one hook's batches, writing checkpoints and metrics into `run_dir`."""

    def __init__(
        self,
        sae_config: SAEConfig,
        train_config: TrainConfig,
        batches: ShuffledBatches,
        hook: HookPoint,
        run_dir: Path,
        device: torch.device,
        callback: Callback = silent,
    ) -> None:
        self.sae_config = sae_config
        self.config = train_config
        self.batches = batches
        self.hook = hook
        self.run_dir = Path(run_dir)
        self.device = device
        self.callback = callback
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

    # ----- the loop ----------------------------------------------------------------------------

    def run(self, resume: bool = False) -> SparseAutoencoder:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume and (self.run_dir / CHECKPOINT_FILE).exists():
            self._load_checkpoint()
            self.callback("log", {"message": f"resumed at step {self.step}"})
        else:
            if resume:
                self.callback("log", {"message": f"no checkpoint in {self.run_dir}: "
                                                 "starting from step 0"})
            (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
        total = self.config.total_steps
        clock = time.perf_counter()
        stream = self.batches.batches(self.position)
        while self.step < total:
            batch, position = next(stream)
            x = batch[self.hook].float()
            if self.step == 0:
                self._initialise_from(x)
            output = self._optimisation_step(x * self.sae.input_scale)
            self.position = position
            self.step += 1
            self._track(output, x.shape[0])
            if self.step % self.config.log_every == 0 or self.step == total:
                elapsed, clock = time.perf_counter() - clock, time.perf_counter()
                self._report(elapsed)
            if self.step % self.config.checkpoint_every == 0 or self.step == total:
                self._save_checkpoint()
        return self.sae

    def _initialise_from(self, x: torch.Tensor) -> None:
        """Scale inputs to E||x|| = sqrt(d_in) and start b_dec at the (scaled) data mean."""
        mean_norm = x.norm(dim=1).mean().clamp_min(1e-8)
        self.sae.input_scale = float(math.sqrt(self.sae_config.d_in) / mean_norm)
        self.sae.initialize_decoder_bias(x.mean(0) * self.sae.input_scale)

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
        outputs = []
        for part in x.chunk(self.micro_batches):
            with torch.autocast(
                device_type=self.device.type, dtype=torch.bfloat16,
                enabled=self.device.type == "cuda",
            ):
                output = self.sae.training_forward(part, dead_mask)
            (output.loss / self.micro_batches).backward()
            outputs.append(output)
        self.sae.remove_parallel_decoder_gradient()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.sae.normalize_decoder()
        return _merge(outputs)

    # ----- metrics -----------------------------------------------------------------------------

    def _track(self, output, n_tokens: int) -> None:
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[output.fired > 0] = 0
        self._window.append(
            {
                "loss": output.loss.item(),
                "mse": output.mse.item(),
                "fve": 1.0 - output.fvu.item(),
                "l0": output.l0.item(),
                "aux_loss": output.aux_loss.item(),
            }
        )

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
        with (self.run_dir / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(point) + "\n")
        self.callback("metrics", point)

    # ----- checkpoints -------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
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
        self.position = StreamPosition(**state["position"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        self.micro_batches = state["micro_batches"]
        _restore_rng(state["rng"])
        _truncate_metrics(self.run_dir / METRICS_FILE, self.step)


def _merge(outputs):
    """One step's metrics from its micro-batches."""
    if len(outputs) == 1:
        return outputs[0]
    first = outputs[0]
    mean = {name: torch.stack([getattr(o, name) for o in outputs]).mean()
            for name in ("loss", "mse", "fvu", "aux_loss", "sparsity_loss", "l0")}
    return type(first)(fired=sum(o.fired for o in outputs), **mean)


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
