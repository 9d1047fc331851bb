"""SAE evaluation: reconstruction, sparsity, and the language model's loss with the SAE spliced in.

Definitions (DESIGN.md section 3), over every non-special token of the evaluation windows:
- L0: mean number of active latents per token.
- MSE: mean over tokens of ||x - x_hat||^2.
- FVE: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, the mean taken over all evaluated tokens.
- dead %: latents that never fire on the evaluated tokens; dense %: latents firing on more
  than 10% of them.
- For causal LMs, next-token cross-entropy with the activation left alone (clean), replaced by
  the SAE's reconstruction (sae) and replaced by zeros (zero ablation):
  CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), delta LM loss = CE_sae - CE_clean,
  and KL = mean over positions of KL(p_clean || p_sae). Special-token positions (BOS, EOS) keep
  their clean activation in every variant: the SAE never trained on them.
- The density histogram counts latents by log10 of their firing frequency.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mistudio_core.activations import ExtractionConfig
from mistudio_core.corpus import Corpus, pack_windows
from mistudio_core.errors import MistudioError
from mistudio_core.hooks import HookPoint
from mistudio_core.models import HookedModel
from mistudio_core.sae import SparseAutoencoder

EVAL_FILE = "eval.json"
DENSE_THRESHOLD = 0.1
_HISTOGRAM_BINS = 24


@dataclass
class EvalResult:
    n_tokens: int
    l0: float
    mse: float
    fve: float
    dead_pct: float
    dense_pct: float
    density_histogram: dict
    ce_clean: float | None = None
    ce_with_sae: float | None = None
    ce_zero_ablation: float | None = None
    ce_loss_recovered: float | None = None
    delta_lm_loss: float | None = None
    kl_divergence: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, directory: Path) -> None:
        (directory / EVAL_FILE).write_text(json.dumps(self.to_dict(), indent=2))

    def summary(self) -> str:
        lines = [
            f"tokens {self.n_tokens}  L0 {self.l0:.1f}  FVE {self.fve:.3f}  MSE {self.mse:.4g}",
            f"dead {self.dead_pct:.2f}%  dense {self.dense_pct:.2f}%",
        ]
        if self.ce_clean is not None:
            lines.append(
                f"CE clean {self.ce_clean:.3f}  with SAE {self.ce_with_sae:.3f}  "
                f"zero-ablated {self.ce_zero_ablation:.3f}  recovered "
                f"{self.ce_loss_recovered:.3f}  dLM {self.delta_lm_loss:.4f}  "
                f"KL {self.kl_divergence:.4f}"
            )
        return "\n".join(lines)


class _Totals:
    """Running sums, so any number of tokens is evaluated in constant memory."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device) -> None:
        self.tokens = 0
        self.squared_error = 0.0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.sum_x_squared = 0.0
        self.active = 0
        self.fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
        self.kl = 0.0
        self.positions = 0

    def add_reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor, codes) -> None:
        x = x.double()
        self.tokens += x.shape[0]
        self.squared_error += (x - x_hat.double()).pow(2).sum().item()
        self.sum_x += x.sum(0)
        self.sum_x_squared += x.pow(2).sum().item()
        active = codes.values > 0
        self.active += int(active.sum())
        self.fired += torch.bincount(codes.cols[active], minlength=self.fired.numel())


def evaluate(
    sae: SparseAutoencoder,
    model: HookedModel,
    corpus: Corpus,
    hook: HookPoint,
    extraction: ExtractionConfig,
    n_tokens: int,
    callback=None,
) -> EvalResult:
    """Evaluate `sae` at `hook` on up to `n_tokens` tokens of `corpus` (one pass, no repeats)."""
    if n_tokens < 1:
        raise MistudioError("evaluate at least one token", hint="use --tokens 100000")
    with_lm = model.has_lm_head
    special = torch.tensor(sorted(set(model.tokenizer.all_special_ids)), dtype=torch.long)
    totals = _Totals(sae.config.d_in, sae.config.d_sae, sae.W_dec.device)
    windows = pack_windows(
        corpus.documents(), model.tokenizer, extraction.context_size, extraction.prepend_bos
    )
    while totals.tokens < n_tokens:
        batch = list(itertools.islice(windows, extraction.batch_windows))
        if not batch:
            break
        input_ids = torch.tensor(batch, dtype=torch.long)
        keep = ~torch.isin(input_ids, special) if extraction.exclude_special_tokens else (
            torch.ones_like(input_ids, dtype=torch.bool)
        )
        if with_lm:
            activations = _language_model_pass(sae, model, hook, input_ids, keep, totals)
        else:
            activations = model.activations(input_ids, [hook])[hook]
        x = activations[keep.to(activations.device)].float()
        with torch.no_grad():
            codes = sae.encode_sparse(x)
            totals.add_reconstruction(x, sae.decode_sparse(codes), codes)
        if callback is not None:
            callback("progress", {"tokens": min(totals.tokens, n_tokens), "total": n_tokens})
    if totals.tokens == 0:
        raise MistudioError(
            f"corpus {corpus.path.name} has no complete window of {extraction.context_size} "
            "tokens to evaluate on",
            hint="use a larger corpus or a smaller context size", code="bad_corpus",
        )
    return _result(totals, with_lm)


def _language_model_pass(sae, model, hook, input_ids, keep, totals) -> torch.Tensor:
    """Clean, SAE-spliced and zero-ablated forward passes; returns the clean activations."""
    keep_on_device = keep.to(model.device)[..., None]
    captured: dict[str, torch.Tensor] = {}

    def capture(h: torch.Tensor) -> torch.Tensor:
        captured["x"] = h.detach()
        return h

    def splice(h: torch.Tensor) -> torch.Tensor:
        reconstruction = sae(h.float()).to(h.dtype)
        return torch.where(keep_on_device, reconstruction, h)

    def ablate(h: torch.Tensor) -> torch.Tensor:
        return torch.where(keep_on_device, torch.zeros_like(h), h)

    log_probs = {}
    with torch.no_grad():
        for name, replace in (("clean", capture), ("sae", splice), ("zero", ablate)):
            with model.replaced(hook, replace):
                logits = model.forward(input_ids).logits
            log_probs[name] = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, 1:].to(model.device)
    for name, values in log_probs.items():
        nll = -values.gather(-1, targets[..., None]).squeeze(-1)
        totals.ce[name] += nll.sum().item()
    clean, spliced = log_probs["clean"], log_probs["sae"]
    totals.kl += (clean.exp() * (clean - spliced)).sum().item()
    totals.positions += targets.numel()
    return captured["x"]


def _result(totals: _Totals, with_lm: bool) -> EvalResult:
    n = totals.tokens
    mean = totals.sum_x / n
    variance = totals.sum_x_squared - n * mean.pow(2).sum().item()
    density = (totals.fired.double() / n).cpu()
    result = EvalResult(
        n_tokens=n,
        l0=totals.active / n,
        mse=totals.squared_error / n,
        fve=1.0 - totals.squared_error / max(variance, 1e-12),
        dead_pct=100.0 * (density == 0).double().mean().item(),
        dense_pct=100.0 * (density > DENSE_THRESHOLD).double().mean().item(),
        density_histogram=_density_histogram(density, n),
    )
    if with_lm and totals.positions:
        ce = {name: value / totals.positions for name, value in totals.ce.items()}
        result.ce_clean, result.ce_with_sae, result.ce_zero_ablation = (
            ce["clean"], ce["sae"], ce["zero"]
        )
        gap = ce["zero"] - ce["clean"]
        result.ce_loss_recovered = (ce["zero"] - ce["sae"]) / gap if gap else float("nan")
        result.delta_lm_loss = ce["sae"] - ce["clean"]
        result.kl_divergence = totals.kl / totals.positions
    return result


def _density_histogram(density: torch.Tensor, n_tokens: int) -> dict:
    """Counts of live latents per log10-density bin, from 1/n_tokens up to 1, and the dead."""
    alive = density[density > 0]
    low = math.floor(math.log10(1 / n_tokens))
    edges = torch.linspace(low, 0, _HISTOGRAM_BINS + 1, dtype=torch.float64)
    counts = torch.histc(alive.log10(), bins=_HISTOGRAM_BINS, min=low, max=0)
    return {
        "log10_edges": [round(e, 4) for e in edges.tolist()],
        "counts": [int(c) for c in counts.tolist()],
        "dead": int((density == 0).sum()),
    }
