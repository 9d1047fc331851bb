"""The sparse autoencoder: one module for the four architectures, inference and training.

Weights are kept in the layout the hot path wants: the encoder as [d_sae, d_in] (one row per
latent, like the decoder), so picking k latents' encoder rows is a contiguous gather. The SAELens
orientation (`W_enc` [d_in, d_sae]) is produced when saving, see `sae.io`.

The encoder always subtracts `b_dec` first (SAELens's `apply_b_dec_to_input`). Inputs may be
scaled during training (`input_scale`, so that E||x|| = sqrt(d_in)); `fold_input_scale` moves
that factor into the weights so the saved SAE takes raw activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mistudio_core.sae.config import SAEConfig
from mistudio_core.sae.jumprelu import jumprelu, step
from mistudio_core.sae.sparse import SparseCodes, select_preactivations, sparse_decode

# On the CPU the encoder matmul and top-k run on row blocks that stay in cache: measured 1.5x
# faster than one [batch, d_sae] matmul followed by a separate top-k pass.
_CPU_ENCODE_BLOCK_ROWS = 1024
# AuxK runs dense over the dead latents' columns while there are at most this many times k_aux
# of them: at 5% dead (d_in 384, 16x) that is ~3x cheaper than the sparse kernels on a CPU.
_DENSE_AUX_K_FACTOR = 4
# BatchTopK's threshold follows the smallest kept activation with this smoothing.
_THRESHOLD_MOMENTUM = 0.99


@dataclass
class TrainOutput:
    """One training forward pass: the loss to minimise and what the metrics need."""

    loss: torch.Tensor
    mse: torch.Tensor  # mean over tokens of ||x - x_hat||^2
    fvu: torch.Tensor  # fraction of variance unexplained in this batch (1 - FVE)
    aux_loss: torch.Tensor
    sparsity_loss: torch.Tensor
    l0: torch.Tensor  # mean active latents per token
    fired: torch.Tensor  # [d_sae] how many tokens each latent fired on


class SparseAutoencoder(nn.Module):
    def __init__(self, config: SAEConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        d_in, d_sae = config.d_in, config.d_sae
        decoder = torch.empty(d_sae, d_in, device=device)
        nn.init.kaiming_uniform_(decoder)
        # Unit rows for the constrained architectures; the 0.1 "heuristic" norm for ReLU.
        decoder /= decoder.norm(dim=1, keepdim=True)
        if not config.unit_norm_decoder:
            decoder *= 0.1
        self.W_dec = nn.Parameter(decoder)
        self.encoder_weight = nn.Parameter(decoder.clone())  # W_enc = W_dec^T at start
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))
        if config.architecture == "jumprelu":
            start = math.log(config.jumprelu_init_threshold)
            self.log_threshold = nn.Parameter(torch.full((d_sae,), start, device=device))
        # BatchTopK's inference threshold (and any loaded JumpReLU-format threshold).
        self.register_buffer("threshold_buffer", torch.zeros(d_sae, device=device))
        self.input_scale = 1.0

    # ----- inference ---------------------------------------------------------------------------

    @property
    def threshold(self) -> torch.Tensor:
        if self.config.architecture == "jumprelu":
            return self.log_threshold.exp()
        return self.threshold_buffer

    def preactivations(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.W_dec.dtype) - self.b_dec, self.encoder_weight, self.b_enc)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [..., d_sae], as SAELens's `encode` returns them."""
        shape = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if self.config.architecture == "topk":
            dense = self.encode_sparse(flat).to_dense()
        elif self.config.architecture == "relu":
            dense = F.relu(self.preactivations(flat))
        else:  # jumprelu, and batchtopk at inference (a JumpReLU with one global threshold)
            pre = self.preactivations(flat)
            dense = pre * (pre > self.threshold)
        return dense.reshape(*shape, self.config.d_sae)

    @torch.no_grad()
    def encode_sparse(self, x: torch.Tensor) -> SparseCodes:
        """Active latents of a [batch, d_in] input as SparseCodes (TopK: k per token)."""
        if self.config.architecture != "topk":
            dense = self.encode(x)
            rows, cols = dense.nonzero(as_tuple=True)
            return SparseCodes.from_coordinates(
                rows, cols, dense[rows, cols], x.shape[0], self.config.d_sae
            )
        values, indices = self._topk_preactivations(x, self.config.k)
        return SparseCodes.from_topk(F.relu(values), indices, self.config.d_sae)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_sparse(self, codes: SparseCodes) -> torch.Tensor:
        """The reconstruction from active latents, touching only their decoder rows."""
        return sparse_decode(codes, self.W_dec) + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x_hat of x, for any architecture."""
        if self.config.architecture == "topk":
            flat = x.reshape(-1, x.shape[-1])
            return self.decode_sparse(self.encode_sparse(flat)).reshape(x.shape)
        return self.decode(self.encode(x))

    # ----- training ----------------------------------------------------------------------------

    def training_forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None,
                         total_variance: torch.Tensor | None = None) -> TrainOutput:
        """Loss and metrics on a batch already scaled by `input_scale`. The FVU divides by the
        batch's total variance, or by `total_variance` when given (a data-parallel rank's share
        of the global batch's: see `Trainer`)."""
        x = x.to(self.W_dec.dtype)
        architecture = self.config.architecture
        if architecture in ("topk", "batchtopk"):
            codes = self._train_topk_codes(x)
            x_hat = sparse_decode(codes, self.W_dec) + self.b_dec
            sparsity = x.new_zeros(())
            active = (codes.values > 0).to(x.dtype)
            fired = torch.bincount(codes.cols, weights=active, minlength=self.config.d_sae)
            l0 = active.sum() / x.shape[0]
        else:
            pre = self.preactivations(x)
            if architecture == "relu":
                features = F.relu(pre)
                sparsity = self.config.l1_coefficient * (features * self.W_dec.norm(dim=1)).sum(1)
            else:
                threshold = self.threshold
                bandwidth = self.config.jumprelu_bandwidth
                features = jumprelu(pre, threshold, bandwidth)
                sparsity = self.config.l0_coefficient * step(pre, threshold, bandwidth).sum(1)
            sparsity = sparsity.mean()
            x_hat = self.decode(features)
            active = features > 0
            fired = active.sum(0)
            l0 = active.sum() / x.shape[0]
        error = x - x_hat
        squared = _squared_norm(error)
        if total_variance is None:
            total_variance = x.var(0, correction=0).sum() * x.shape[0]
        total_variance = total_variance.clamp_min(1e-12)
        fvu = squared / total_variance
        mse = squared / x.shape[0]
        aux = self._aux_k_loss(x, error.detach(), dead_mask, total_variance)
        # TopK models learn from the scale-free FVU; the penalised ones from per-token MSE, the
        # scale their sparsity coefficients are tuned against (as in SAELens).
        reconstruction = fvu if self.config.is_topk_family else mse
        loss = reconstruction + aux + sparsity
        return TrainOutput(loss, mse.detach(), fvu.detach(), aux.detach(), sparsity.detach(),
                           l0.detach(), fired.detach())

    def _topk_preactivations(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._topk_of_centered(x - self.b_dec, k)

    def _topk_of_centered(
        self, centered: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        block = _CPU_ENCODE_BLOCK_ROWS if centered.device.type == "cpu" else centered.shape[0]
        values, indices = [], []
        for start in range(0, centered.shape[0], block):
            pre = F.linear(centered[start : start + block], self.encoder_weight, self.b_enc)
            top = pre.topk(k, dim=1, sorted=False)
            values.append(top.values)
            indices.append(top.indices)
        return torch.cat(values).float(), torch.cat(indices)

    def _train_topk_codes(self, x: torch.Tensor) -> SparseCodes:
        """Active latents with values that carry sparse gradients into the encoder."""
        centered = x - self.b_dec
        with torch.no_grad():
            if self.config.architecture == "topk":
                values, indices = self._topk_of_centered(centered.detach(), self.config.k)
                codes = SparseCodes.from_topk(values, indices, self.config.d_sae)
            else:
                codes = self._batch_topk_selection(x)
        codes.values = F.relu(
            select_preactivations(centered, self.encoder_weight, self.b_enc, codes)
        )
        return codes

    def _batch_topk_selection(self, x: torch.Tensor) -> SparseCodes:
        pre = F.relu(self.preactivations(x))
        n_rows, width = pre.shape
        top = pre.reshape(-1).topk(self.config.k * n_rows, sorted=False)
        rows, cols = top.indices // width, top.indices % width
        positive = top.values > 0
        if positive.any():
            smallest = top.values[positive].min()
            running = self.threshold_buffer
            if running.max() == 0:  # first batch
                running.fill_(smallest)
            else:
                running.mul_(_THRESHOLD_MOMENTUM).add_(smallest * (1 - _THRESHOLD_MOMENTUM))
        return SparseCodes.from_coordinates(rows, cols, top.values, n_rows, width)

    def _aux_k_loss(self, x, error, dead_mask, total_variance) -> torch.Tensor:
        """AuxK (Gao et al. 2024): dead latents learn to predict the reconstruction error."""
        if dead_mask is None or not self.config.is_topk_family:
            return x.new_zeros(())
        dead = dead_mask.nonzero().squeeze(1)
        if dead.numel() == 0:
            return x.new_zeros(())
        k_aux = min(self.config.resolved_aux_k, dead.numel())
        centered = (x - self.b_dec).detach()
        if dead.numel() <= _DENSE_AUX_K_FACTOR * k_aux:
            error_hat = self._dense_aux_reconstruction(centered, dead, k_aux)
        else:
            error_hat = self._sparse_aux_reconstruction(centered, dead, k_aux)
        # Scaled down while fewer latents are dead than k_aux, as in the paper.
        scale = min(dead.numel() / self.config.resolved_aux_k, 1.0)
        aux = _squared_norm(error_hat - error) / total_variance
        return self.config.aux_k_coefficient * scale * aux

    def _dense_aux_reconstruction(self, centered, dead, k_aux) -> torch.Tensor:
        """Few dead latents: dense matmuls over just their columns beat sparse kernels."""
        pre = F.linear(centered, self.encoder_weight[dead], self.b_enc[dead])
        top = pre.topk(k_aux, dim=1, sorted=False)
        features = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))
        return features @ self.W_dec[dead]

    def _sparse_aux_reconstruction(self, centered, dead, k_aux) -> torch.Tensor:
        """Many dead latents: pick k_aux per token, then the same sparse kernels as TopK."""
        with torch.no_grad():
            pre = F.linear(centered, self.encoder_weight[dead], self.b_enc[dead])
            top = pre.topk(k_aux, dim=1, sorted=False)
        codes = SparseCodes.from_topk(top.values, dead[top.indices], self.config.d_sae)
        codes.values = F.relu(
            select_preactivations(centered, self.encoder_weight, self.b_enc, codes)
        )
        return sparse_decode(codes, self.W_dec)

    # ----- constraints and folding -------------------------------------------------------------

    @torch.no_grad()
    def initialize_decoder_bias(self, mean: torch.Tensor) -> None:
        """b_dec starts at the data mean, so the encoder first sees centred inputs."""
        self.b_dec.copy_(mean.to(self.b_dec))

    @torch.no_grad()
    def remove_parallel_decoder_gradient(self) -> None:
        """With unit-norm decoder rows, only the gradient tangent to the sphere is useful."""
        if not self.config.unit_norm_decoder or self.W_dec.grad is None:
            return
        grad = self.W_dec.grad
        parallel = torch.linalg.vecdot(grad, self.W_dec, dim=1).unsqueeze(1)
        grad.addcmul_(parallel, self.W_dec, value=-1.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.config.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Make the SAE take unscaled activations: f(s x) with the old weights == f(x) now."""
        scale = self.input_scale
        self.encoder_weight.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)
        self.input_scale = 1.0


def _squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """sum(tensor**2) in one pass, without materialising tensor**2."""
    flat = tensor.reshape(-1)
    return torch.dot(flat, flat)
