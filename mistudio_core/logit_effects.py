"""Logit effects: which tokens a feature's decoder direction promotes and suppresses.

The direct effect of a residual direction d on the logits through the final norm is
W_U @ (gamma * d): d is centred first when the norm is a LayerNorm, gamma is the norm's weight, or
1 + weight for norms that scale that way (Gemma's); biases are the same for every feature and left
out, and so is the norm's scale, which depends on the rest of the residual stream. Which
convention a norm follows is found by running a copy of it on a probe vector, so no list of
architectures is kept.

Only the unembedding (or the tied input embedding) and the norm's weight are read, from the
checkpoint's safetensors, at the names an empty-weights skeleton of the model gives them; the full
causal LM is loaded only when they cannot be found that way. Encoders and models without an LM
head have no logit effects.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mistudio_core.models import (
    ModelSpec,
    find_blocks,
    is_causal_lm,
    load_config,
    load_model,
    resolve_source,
)
from mistudio_core.progress import Callback, silent

# Feature x vocabulary effects computed at once (128 MiB of float32).
_EFFECT_BLOCK_ELEMENTS = 1 << 25


@dataclass
class Unembedding:
    """What a residual direction d does to the logits: W_U @ (scale * d), after centring d when
    the final norm is a LayerNorm."""

    weight: torch.Tensor  # [vocab, d_model]
    scale: torch.Tensor  # [d_model]: the final norm's gamma (ones without a norm)
    centre: bool
    source: str  # "checkpoint tensors" or "full model"


def read_unembedding(spec: ModelSpec, n_vocab: int | None = None,
                     callback: Callback = silent) -> Unembedding | None:
    """The unembedding and final norm of a causal LM, None for encoders and headless models.

    Reads just those tensors from the checkpoint's safetensors when their names can be found (an
    empty-weights skeleton of the model tells them), else loads the whole causal LM."""
    config = load_config(spec)
    if not is_causal_lm(config):
        callback("log", {"message": f"{spec.model_id} ({config.model_type}) is not a causal LM: "
                                    "no logit effects"})
        return None
    try:
        found = _unembedding_from_checkpoint(spec, config)
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError, TypeError) as exc:
        callback("log", {"message": f"reading the unembedding alone failed ({exc})"})
        found = None
    if found is None:
        callback("log", {"message": f"loading the whole of {spec.model_id} for its unembedding"})
        found = _unembedding_from_model(spec)
    if n_vocab is not None:  # rows past the tokenizer are padding no text can produce
        found.weight = found.weight[:n_vocab]
    return found


def logit_effects(decoder: torch.Tensor, unembedding: Unembedding, n: int
                  ) -> dict[str, torch.Tensor]:
    """Each decoder row's `n` most promoted and most suppressed tokens and their effects,
    computed in blocks of rows so the [d_sae, vocab] matrix never exists at once."""
    weight = unembedding.weight.to(decoder.device, torch.float32)
    scale = unembedding.scale.to(decoder.device, torch.float32)
    n = min(n, weight.shape[0])
    out: dict[str, list[torch.Tensor]] = {name: [] for name in
                                          ("promoted_ids", "promoted_values", "suppressed_ids",
                                           "suppressed_values")}
    block = max(1, _EFFECT_BLOCK_ELEMENTS // weight.shape[0])
    for start in range(0, decoder.shape[0], block):
        directions = decoder[start:start + block].float()
        if unembedding.centre:
            directions = directions - directions.mean(dim=1, keepdim=True)
        effects = (directions * scale) @ weight.T
        for side, largest in (("promoted", True), ("suppressed", False)):
            top = effects.topk(n, dim=1, largest=largest)
            out[f"{side}_ids"].append(top.indices.to(torch.int32))
            out[f"{side}_values"].append(top.values)
    return {name: torch.cat(parts) for name, parts in out.items()}


def _unembedding_from_checkpoint(spec: ModelSpec, config) -> Unembedding | None:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    head = skeleton.get_output_embeddings()
    if head is None:
        return None
    names = {id(module): name for name, module in skeleton.named_modules()}
    norm = _final_norm(skeleton)
    files = _checkpoint_index(resolve_source(spec.model_id), spec)
    prefix = getattr(skeleton, "base_model_prefix", "")
    wanted = {"head": [names[id(head)] + ".weight"]}
    embeddings = skeleton.get_input_embeddings()
    if embeddings is not None and getattr(config, "tie_word_embeddings", False):
        wanted["head"].append(names[id(embeddings)] + ".weight")  # tied: often saved only so
    if norm is not None and isinstance(getattr(norm, "weight", None), nn.Parameter):
        wanted["norm"] = [names[id(norm)] + ".weight"]
    tensors = {}
    for role, candidates in wanted.items():
        key = next((k for name in candidates for k in _checkpoint_names(name, prefix)
                    if k in files), None)
        if key is None:
            return None
        tensors[role] = files[key](key).float()
    weight = tensors["head"]
    scale = tensors.get("norm", torch.zeros(weight.shape[1]))
    offset, centre = _norm_convention(norm, weight.shape[1])
    return Unembedding(weight, scale + offset, centre, "checkpoint tensors")


def _unembedding_from_model(spec: ModelSpec) -> Unembedding:
    hooked = load_model(spec, with_lm_head=True)
    weight = hooked.model.get_output_embeddings().weight.detach().float().cpu()
    norm = _final_norm(hooked.model)
    gamma = getattr(norm, "weight", None) if norm is not None else None
    scale = (gamma.detach().float().cpu() if isinstance(gamma, torch.Tensor)
             else torch.zeros(weight.shape[1]))
    offset, centre = _norm_convention(norm, weight.shape[1])
    del hooked
    return Unembedding(weight, scale + offset, centre, "full model")


def _final_norm(model: nn.Module) -> nn.Module | None:
    """The last normalisation module outside the block stack: the norm before the head."""
    inside = {id(module) for module in find_blocks(model).modules()}
    found = None
    for module in model.modules():
        name = type(module).__name__.lower()
        if id(module) not in inside and "norm" in name and not list(module.children()):
            found = module
    return found


def _norm_convention(norm: nn.Module | None, width: int) -> tuple[float, bool]:
    """(offset, centres): the norm scales by `offset + weight` (0 usually, 1 for Gemma-style
    norms) and, if `centres`, subtracts the mean first (LayerNorm). Found by running a copy of
    the module with zeroed parameters on a probe vector, so no list of architectures is needed."""
    if norm is None:
        return 1.0, False
    probe = copy.deepcopy(norm).to_empty(device="cpu").float()
    with torch.no_grad():
        for parameter in probe.parameters():
            parameter.zero_()
        x = torch.randn(1, width, generator=torch.Generator().manual_seed(0)) + 3.0
        try:
            y = probe(x)
        except Exception:  # an unusual forward signature: assume the common conventions
            return 0.0, isinstance(norm, nn.LayerNorm)
        y = y[0] if isinstance(y, tuple) else y
        offset = 0.0 if y.abs().max() < 1e-6 else 1.0
        if offset == 0.0 and getattr(probe, "weight", None) is not None:
            probe.weight.fill_(1.0)
            y = probe(x)
        centres = bool(y.mean().abs() < 1e-3 * y.abs().max().clamp_min(1e-12))
    return offset, centres


def _checkpoint_names(name: str, prefix: str) -> list[str]:
    """A parameter's possible key in a checkpoint: as is, or without the base-model prefix
    (checkpoints saved from the bare model, e.g. the original GPT-2)."""
    names = [name]
    if prefix and name.startswith(prefix + "."):
        names.append(name[len(prefix) + 1:])
    return names


def _checkpoint_index(source: str, spec: ModelSpec) -> dict[str, Callable[[str], torch.Tensor]]:
    """Tensor name -> a reader of that tensor, from the safetensors index or single file;
    shards are fetched only when one of their tensors is read."""
    from safetensors import safe_open

    def reader(filename: str) -> Callable[[str], torch.Tensor]:
        def read(name: str) -> torch.Tensor:
            path = _fetch(source, filename, spec)
            if path is None:
                raise OSError(f"{filename} is missing")
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        return read

    index = _fetch(source, "model.safetensors.index.json", spec)
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: reader(filename) for name, filename in weight_map.items()}
    single = _fetch(source, "model.safetensors", spec)
    if single is None:
        return {}
    with safe_open(str(single), framework="pt") as handle:
        return {name: reader("model.safetensors") for name in handle.keys()}  # noqa: SIM118


def _fetch(source: str, filename: str, spec: ModelSpec) -> Path | None:
    """A file of a local model directory or of a hub repository (downloaded), or None."""
    directory = Path(source)
    if directory.is_dir():
        path = directory / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(source, filename, revision=spec.revision, token=spec.token))
    except EntryNotFoundError:
        return None
