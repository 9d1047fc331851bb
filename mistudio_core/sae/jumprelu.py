"""Straight-through estimators for JumpReLU SAEs (Rajamanoharan et al., 2024).

The JumpReLU `z * H(z - t)` and the step `H(z - t)` have zero gradient almost everywhere with
respect to the threshold t. These functions give t the pseudo-gradient of a rectangle kernel of
width `bandwidth` around the threshold, which is what lets the thresholds (and through the step
the L0 penalty) be learned.
"""

from __future__ import annotations

import torch


def _rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        grad_pre = (pre > threshold) * grad
        kernel = _rectangle((pre - threshold) / ctx.bandwidth)
        grad_threshold = (-(threshold / ctx.bandwidth) * kernel * grad).sum(0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        kernel = _rectangle((pre - threshold) / ctx.bandwidth)
        grad_threshold = (-(1.0 / ctx.bandwidth) * kernel * grad).sum(0)
        return torch.zeros_like(pre), grad_threshold, None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _Step.apply(pre, threshold, bandwidth)
