"""SAE directories in SAELens's on-disk format, plus miStudio's own facts beside them.

A directory holds `cfg.json` and `sae_weights.safetensors` exactly as SAELens writes them
(`W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae, d_in]`, `b_dec`, and `threshold` for JumpReLU),
so `sae_lens.SAE.load_from_disk(path)` loads it as it is. Architectures map to SAELens's names:
relu -> "standard", topk -> "topk", jumprelu -> "jumprelu", and batchtopk -> "jumprelu" with its
one global threshold repeated per latent (BatchTopK needs no batch at inference that way).
Training facts SAELens has no field for (model revision, corpus hash, seed, metrics) go in
`mistudio.json`. Directories written by SAELens or other tools load too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mistudio_core.errors import MistudioError
from mistudio_core.hooks import HookPoint
from mistudio_core.sae.config import SAEConfig
from mistudio_core.sae.model import SparseAutoencoder

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
MISTUDIO_FILE = "mistudio.json"
_SAELENS_NAMES = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu",
                  "batchtopk": "jumprelu"}


@dataclass
class SAEMetadata:
    """What the SAE was trained on, as SAELens's `metadata` block records it."""

    model_name: str
    hook_name: str
    context_size: int
    prepend_bos: bool = True
    exclude_special_tokens: bool = True
    dataset_path: str | None = None
    model_class_name: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def hook_layer(self) -> int | None:
        parts = self.hook_name.split(".")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None

    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "hook_name": self.hook_name,
            "hook_layer": self.hook_layer,
            "context_size": self.context_size,
            "prepend_bos": self.prepend_bos,
            "exclude_special_tokens": self.exclude_special_tokens,
            "dataset_path": self.dataset_path,
            "model_class_name": self.model_class_name,
            **self.extra,
        }


@dataclass
class LoadedSAE:
    sae: SparseAutoencoder
    metadata: SAEMetadata
    training: dict  # mistudio.json (empty for SAEs written by other tools)
    path: Path

    def hook(self) -> HookPoint:
        """The hook the SAE reads, from its metadata; an SAE that does not say is refused."""
        if not self.metadata.hook_name:
            raise MistudioError(f"the SAE in {self.path} does not say which hook it reads",
                                hint="its cfg.json needs metadata.hook_name (layers.L.SITE)",
                                code="bad_sae")
        return HookPoint.parse(self.metadata.hook_name)

    def check_width(self, width: int, model_id: str) -> None:
        """Refuse a model whose hidden width is not the SAE's input width (check it against the
        model's config, before any weights are loaded)."""
        if int(width) != self.sae.config.d_in:
            trained_on = self.metadata.model_name or "?"
            raise MistudioError(
                f"the SAE reads {self.sae.config.d_in}-wide activations but {model_id} has "
                f"width {width}", hint=f"use the model the SAE was trained on ({trained_on})",
                code="bad_sae", field="model")


def save_sae(
    sae: SparseAutoencoder, directory: str | Path, metadata: SAEMetadata, training: dict
) -> Path:
    """Write the SAE in SAELens format; the input scale must already be folded in."""
    if sae.input_scale != 1.0:
        raise ValueError("fold the input scale into the weights before saving")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = sae.config
    tensors = {
        "W_enc": sae.encoder_weight.detach().T.contiguous().float().cpu(),
        "b_enc": sae.b_enc.detach().float().cpu(),
        "W_dec": sae.W_dec.detach().contiguous().float().cpu(),
        "b_dec": sae.b_dec.detach().float().cpu(),
    }
    saelens_architecture = _SAELENS_NAMES[config.architecture]
    if saelens_architecture == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().float().cpu().contiguous()
    cfg = {
        "architecture": saelens_architecture,
        "d_in": config.d_in,
        "d_sae": config.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata.to_dict(),
    }
    if config.architecture == "topk":
        cfg["k"] = config.k
        cfg["rescale_acts_by_decoder_norm"] = False
    save_file(tensors, directory / WEIGHTS_FILE)
    (directory / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    facts = {"architecture": config.architecture, "sae_config": config.to_dict(), **training}
    (directory / MISTUDIO_FILE).write_text(json.dumps(facts, indent=2, default=str))
    return directory


def load_sae(directory: str | Path, device: torch.device | str = "cpu") -> LoadedSAE:
    """Load an SAE directory written by miStudio, SAELens or another SAELens-format tool."""
    directory = Path(directory).expanduser()
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise MistudioError(
            f"{directory} is not an SAE directory (it needs {CFG_FILE} and {WEIGHTS_FILE})",
            hint="point at the --out directory of a finished `mistudio train`",
            code="bad_sae",
        )
    try:
        cfg = json.loads(cfg_path.read_text())
        tensors = load_file(weights_path)
    except (json.JSONDecodeError, OSError, RuntimeError) as exc:
        raise MistudioError(
            f"cannot read the SAE in {directory}: {exc}", hint="the files may be damaged",
            code="bad_sae",
        ) from exc
    training = {}
    if (directory / MISTUDIO_FILE).is_file():
        training = json.loads((directory / MISTUDIO_FILE).read_text())
    config = _config_from_saelens(cfg, training, directory)
    sae = SparseAutoencoder(config, device=device)
    _load_weights(sae, tensors, cfg, directory)
    return LoadedSAE(sae.eval(), _metadata_from_saelens(cfg), training, directory)


def _config_from_saelens(cfg: dict, training: dict, directory: Path) -> SAEConfig:
    saelens_architecture = cfg.get("architecture", "standard")
    ours = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(saelens_architecture)
    if ours is None:
        raise MistudioError(
            f"the SAE in {directory} has architecture {saelens_architecture!r}, which miStudio "
            "cannot run",
            hint="miStudio loads standard (ReLU), topk, jumprelu and batchtopk SAEs",
            code="bad_sae",
        )
    stored = training.get("sae_config", {})
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MistudioError(
            f"{directory / CFG_FILE} lacks d_in/d_sae", hint="the config is damaged",
            code="bad_sae",
        ) from exc
    k = cfg.get("k") or stored.get("k")
    if ours == "topk" and k is None:
        raise MistudioError(
            f"{directory / CFG_FILE} is a topk SAE without k", hint="add \"k\" to cfg.json",
            code="bad_sae",
        )
    return SAEConfig(architecture=ours, d_in=d_in, d_sae=d_sae, k=int(k or min(32, d_sae)))


def _load_weights(sae: SparseAutoencoder, tensors: dict, cfg: dict, directory: Path) -> None:
    config = sae.config
    expected = {
        "W_enc": (config.d_in, config.d_sae),
        "b_enc": (config.d_sae,),
        "W_dec": (config.d_sae, config.d_in),
        "b_dec": (config.d_in,),
    }
    if config.architecture == "jumprelu":
        expected["threshold"] = (config.d_sae,)
    for name, shape in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            found = tuple(tensors[name].shape) if name in tensors else "missing"
            raise MistudioError(
                f"{directory / WEIGHTS_FILE}: {name} should be {shape}, found {found}",
                hint="the weights do not match cfg.json", code="bad_sae",
            )
    with torch.no_grad():
        sae.encoder_weight.copy_(tensors["W_enc"].T)
        sae.b_enc.copy_(tensors["b_enc"])
        sae.W_dec.copy_(tensors["W_dec"])
        sae.b_dec.copy_(tensors["b_dec"])
        if config.architecture == "jumprelu":
            sae.log_threshold.copy_(tensors["threshold"].float().log())
        if cfg.get("rescale_acts_by_decoder_norm"):
            # Fold the decoder norms in: same top-k choice and reconstruction, unit decoder rows.
            norms = sae.W_dec.norm(dim=1)
            sae.encoder_weight.mul_(norms[:, None])
            sae.b_enc.mul_(norms)
            sae.W_dec.div_(norms[:, None])


def _metadata_from_saelens(cfg: dict) -> SAEMetadata:
    """SAELens 6 nests these under `metadata`; earlier versions kept them at the top level."""
    block = cfg.get("metadata") or cfg.get("meta") or cfg
    return SAEMetadata(
        model_name=block.get("model_name") or "",
        hook_name=block.get("hook_name") or "",
        context_size=int(block.get("context_size") or 128),
        prepend_bos=bool(block.get("prepend_bos", True)),
        exclude_special_tokens=bool(block.get("exclude_special_tokens", True)),
        dataset_path=block.get("dataset_path"),
        model_class_name=block.get("model_class_name"),
    )
