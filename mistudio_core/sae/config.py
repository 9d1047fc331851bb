"""The shape and training objective of a sparse autoencoder."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mistudio_core.errors import MistudioError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
TOPK_FAMILY = ("topk", "batchtopk")


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is: its architecture, its widths and the coefficients of its loss.

    - relu: ReLU latents, loss = MSE + l1_coefficient * sum_i f_i * ||W_dec[i]||.
    - topk: the k largest pre-activations per token (Gao et al. 2024), AuxK for dead latents.
    - batchtopk: the batch's `k * batch` largest (Bussmann et al. 2024); saved as a JumpReLU
      whose threshold is the running minimum kept activation, so inference needs no batch.
    - jumprelu: per-latent learned thresholds trained with straight-through estimators and an
      L0 penalty (Rajamanoharan et al. 2024).
    """

    architecture: str
    d_in: int
    d_sae: int
    k: int = 32
    l1_coefficient: float = 5.0
    l0_coefficient: float = 0.01
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.05
    aux_k: int | None = None
    aux_k_coefficient: float = 1 / 32

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise MistudioError(
                f"unknown SAE architecture {self.architecture!r}",
                hint="use one of " + ", ".join(ARCHITECTURES),
            )
        if self.d_in < 1 or self.d_sae < 1:
            raise MistudioError(
                f"SAE widths must be positive (d_in={self.d_in}, d_sae={self.d_sae})",
                hint="use --expansion 16 or --d-sae N with N > 0",
            )
        if self.architecture in TOPK_FAMILY and not 1 <= self.k <= self.d_sae:
            raise MistudioError(
                f"k={self.k} must be between 1 and the SAE width {self.d_sae}",
                hint="use --k 32 (a few dozen is usual)",
            )

    @property
    def is_topk_family(self) -> bool:
        return self.architecture in TOPK_FAMILY

    @property
    def unit_norm_decoder(self) -> bool:
        """TopK and JumpReLU keep decoder rows at unit norm; ReLU weighs its L1 by the norm."""
        return self.architecture != "relu"

    @property
    def resolved_aux_k(self) -> int:
        return self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)

    def to_dict(self) -> dict:
        return asdict(self)
