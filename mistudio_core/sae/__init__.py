"""Sparse autoencoders: configuration, the model, sparse kernels and the SAELens file format."""

from mistudio_core.sae.config import ARCHITECTURES, SAEConfig
from mistudio_core.sae.io import LoadedSAE, SAEMetadata, load_sae, save_sae
from mistudio_core.sae.model import SparseAutoencoder, TrainOutput
from mistudio_core.sae.sparse import SparseCodes

__all__ = [
    "ARCHITECTURES",
    "LoadedSAE",
    "SAEConfig",
    "SAEMetadata",
    "SparseAutoencoder",
    "SparseCodes",
    "TrainOutput",
    "load_sae",
    "save_sae",
]
