"""Sparse latent codes and the two autograd functions that keep TopK training sparse.

A TopK SAE computes the dense encoder matmul once (there is no way around it: every latent's
pre-activation is needed to pick the top k), but everything after it touches only the k active
latents per token. `SparseCodes` holds those active latents as CSR rows (one row per token).

- `select_preactivations` returns the chosen pre-activations with a backward that writes the
  encoder's weight and bias gradients only for the chosen latents (a sparse-dense matmul),
  instead of the dense [batch, d_sae] gradient a plain gather would produce.
- `sparse_decode` reconstructs with `embedding_bag` (sum of k scaled decoder rows per token) and
  computes its backward with a sampled matmul (only the k needed dot products per token) and a
  sparse-dense matmul for the decoder rows.

Measured on a 2-core CPU at d_in 384, 16x, k 32, batch 4096, this backward is about 2x faster
than `embedding_bag`'s own, and the whole step stays near the cost of the one dense matmul.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@dataclass
class SparseCodes:
    """Active latents of a batch in CSR layout: row r holds cols[crow[r]:crow[r+1]], with the
    row of every entry in `rows`. Columns need not be sorted within a row: none of the kernels
    here (embedding_bag, sampled_addmm, COO matmul) depends on that order."""

    values: torch.Tensor
    cols: torch.Tensor
    crow: torch.Tensor
    rows: torch.Tensor
    n_latents: int

    @property
    def n_rows(self) -> int:
        return self.crow.numel() - 1

    def to_dense(self) -> torch.Tensor:
        dense = self.values.new_zeros(self.n_rows, self.n_latents)
        dense[self.rows, self.cols] = self.values
        return dense

    @classmethod
    def from_topk(cls, values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> SparseCodes:
        """Codes with the same number of entries, k, in every row."""
        n_rows, k = indices.shape
        crow = torch.arange(0, n_rows * k + 1, k, device=indices.device)
        rows = torch.arange(n_rows, device=indices.device).repeat_interleave(k)
        return cls(values.reshape(-1), indices.reshape(-1), crow, rows, n_latents)

    @classmethod
    def from_coordinates(
        cls, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int,
        n_latents: int,
    ) -> SparseCodes:
        """Codes from unordered (row, col, value) triples, e.g. a BatchTopK selection."""
        order = torch.argsort(rows * n_latents + cols)
        rows, cols, values = rows[order], cols[order], values[order]
        crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
        crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
        return cls(values, cols, crow, rows, n_latents)


def _latent_major(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int,
                  n_latents: int) -> torch.Tensor:
    """A sparse [n_latents, n_rows] matrix, for gradients of the latents' weight rows."""
    return torch.sparse_coo_tensor(
        torch.stack([cols, rows]), values, (n_latents, n_rows), check_invariants=False
    )


class _SelectPreactivations(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, chosen, codes_index):
        cols, crow, rows = codes_index
        ctx.save_for_backward(x, weight, cols, crow, rows)
        return chosen

    @staticmethod
    def backward(ctx, grad):
        x, weight, cols, crow, rows = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(
                cols, weight, crow, per_sample_weights=grad, mode="sum", include_last_offset=True
            ).to(x.dtype)
        if ctx.needs_input_grad[1]:
            sparse = _latent_major(rows, cols, grad, x.shape[0], weight.shape[0])
            grad_weight = torch.sparse.mm(sparse, x.to(weight.dtype))
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros_like(weight[:, 0]).index_add_(0, cols, grad)
        return grad_x, grad_weight, grad_bias, None, None


def select_preactivations(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, codes: SparseCodes
) -> torch.Tensor:
    """`codes.values`, the pre-activations x @ weight.T + bias at the codes' positions (computed
    without grad), with gradients that touch only those latents' weight rows."""
    return _SelectPreactivations.apply(
        x, weight, bias, codes.values, (codes.cols, codes.crow, codes.rows)
    )


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, cols, crow, rows, weight):
        ctx.save_for_backward(values, cols, crow, rows, weight)
        return F.embedding_bag(
            cols, weight, crow, per_sample_weights=values.to(weight.dtype), mode="sum",
            include_last_offset=True,
        )

    @staticmethod
    def backward(ctx, grad_out):
        values, cols, crow, rows, weight = ctx.saved_tensors
        grad_out = grad_out.to(weight.dtype)
        n_rows = crow.numel() - 1
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            pattern = torch.sparse_csr_tensor(
                crow, cols, torch.ones_like(values, dtype=weight.dtype),
                size=(n_rows, weight.shape[0]), check_invariants=False,
            )
            grad_values = torch.sparse.sampled_addmm(pattern, grad_out, weight.T, beta=0.0)
            grad_values = grad_values.values().to(values.dtype)
        if ctx.needs_input_grad[4]:
            sparse = _latent_major(rows, cols, values.to(weight.dtype), n_rows, weight.shape[0])
            grad_weight = torch.sparse.mm(sparse, grad_out)
        return grad_values, None, None, None, grad_weight


def sparse_decode(codes: SparseCodes, weight: torch.Tensor) -> torch.Tensor:
    """sum_i codes[r, i] * weight[i] for every row r, touching only the active rows of weight."""
    return _SparseDecode.apply(codes.values, codes.cols, codes.crow, codes.rows, weight)
