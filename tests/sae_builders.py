"""Hand-made SAEs for the tests that need to know exactly which feature fires where."""

from __future__ import annotations

import torch

from mistudio_core.sae import SAEConfig, SAEMetadata, SparseAutoencoder, save_sae


def save_relu_sae(directory, decoder: torch.Tensor, encoder: torch.Tensor | None = None,
                  b_enc: torch.Tensor | None = None, hook: str = "layers.0.resid_pre",
                  context_size: int = 64):
    """A ReLU SAE with these decoder rows [d_sae, d_in] (and encoder rows and encoder bias;
    zeros otherwise), saved in `directory` for a model called "tiny"."""
    d_sae, d_in = decoder.shape
    sae = SparseAutoencoder(SAEConfig("relu", d_in, d_sae))
    with torch.no_grad():
        sae.W_dec.copy_(decoder)
        if encoder is not None:
            sae.encoder_weight.copy_(encoder)
        if b_enc is not None:
            sae.b_enc.copy_(b_enc)
    metadata = SAEMetadata(model_name="tiny", hook_name=hook, context_size=context_size)
    return save_sae(sae, directory, metadata, {})
