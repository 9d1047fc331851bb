"""Memory preflight: will a model, and an SAE trained on it, fit? Answered from the config alone.

A run that downloads 16 GB of weights and then dies with "CUDA out of memory" wastes a researcher's
afternoon. `preflight` answers first: it builds the model on the meta device (accelerate's
`init_empty_weights`, shapes and no bytes), counts its parameters by role, prices them under each
quantization, adds the activations of a forward batch and the SAE being trained, and compares the
sum with the free memory of the best device.

For quantization q, a forward batch of B tokens and an SAE of width d_sae on d_in = hidden inputs:

    weights     = block Linear weights x bytes_per_parameter(q) + other parameters x dtype size
    activations = B x (one block's live tensors per token) x dtype size (+ fp32 logits if whole)
    sae         = (2 d_in d_sae + d_sae + d_in) x 4 bytes x 4  +  4096 x d_sae x 4 bytes
    total       = (weights + activations + sae) x 1.1 (+ 500 MiB for the CUDA context on a GPU)

A run fits when `total` for one sequence (B = context_size) is free; the recommended batch is then
the largest power of two B (up to 65536) that still fits. The numbers are meant to be decided on,
so they lean high: a "fits" here should fit in practice.

Models larger than one GPU: when a quantization does not fit on the best GPU and there are several,
the preflight spreads the loaded blocks over them (`SplitPlan`), each GPU priced by the same formula
for its own part; `load_model` with `device="auto"` loads by that plan (`auto_placement`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from types import ModuleType

import psutil
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedConfig
from transformers.pytorch_utils import Conv1D

from mistudio_core.errors import MistudioError
from mistudio_core.models import ModelSpec, find_blocks, is_encoder, load_config
from mistudio_core.units import count, size

QUANTIZATIONS = ("none", "8bit", "4bit")

# LLM.int8 keeps one fp32 scale per output row (`SCB`) beside the int8 matrix: 4 / in_features
# bytes per parameter. Priced for rows of 1024 inputs, which over-counts every real model's wider
# rows rather than under-counting.
_INT8_SCALE_BYTES = 4 / 1024
# NF4 with double quantization (blocksize 64): 4 bits per weight, plus each block's absmax stored
# in 8 bits (8/64 = 0.125 bits per weight), plus one fp32 scale per 256 absmaxes (32/16384 = 0.002
# bits per weight): 0.127 extra bits, 0.0159 bytes. Without double quantization it would be
# 32/64 = 0.5 bits (0.0625 bytes); the loader turns double quantization on.
_NF4_SCALE_BYTES = (8 / 64 + 32 / (64 * 256)) / 8

SAFETY_MARGIN = 0.10
CUDA_CONTEXT_BYTES = 500 * 2**20
MAX_BATCH_TOKENS = 65536
SAE_EXPANSION = 16
SAE_TRAIN_BATCH_TOKENS = 4096
_FP32_BYTES = 4
# Training with Adam holds four fp32 copies of each SAE parameter: weights, grads, m and v.
_ADAM_COPIES = 4


@dataclass(frozen=True)
class ParameterCount:
    """A model's parameters by role, so that partial loading and quantization can be priced.

    `per_layer` and `quantizable_per_layer` are the mean over the blocks (rounded): the supported
    architectures have identical blocks, so the mean is exact for them; `total` is always exact.
    `quantizable_per_layer` counts the weight matrices of one block's `nn.Linear` and GPT-2
    `Conv1D` modules, exactly what bitsandbytes replaces; their biases stay in 16/32-bit.
    """

    total: int
    embedding: int
    per_layer: int
    n_layers: int
    head: int
    other: int
    quantizable_per_layer: int

    def up_to_layer(self, layer: int | None) -> int:
        """Parameters loaded when only blocks 0..layer run: embeddings and those blocks, no final
        norm or head (nothing after `layer` runs). `None` means the whole model."""
        if layer is None:
            return self.total
        return self.embedding + _blocks_loaded(self, layer) * self.per_layer


def _blocks_loaded(params: ParameterCount, layer: int | None) -> int:
    """How many decoder blocks are in memory when loading up to `layer` (`None`: all of them)."""
    if layer is None:
        return params.n_layers
    if not 0 <= layer < params.n_layers:
        raise MistudioError(
            f"layer {layer} is out of range: the model has {params.n_layers} layers",
            hint=f"pick a layer from 0 to {params.n_layers - 1}",
        )
    return layer + 1


def count_parameters(config: PreTrainedConfig) -> ParameterCount:
    """Count a model's parameters by role from its config, allocating no weights.

    The decoder blocks are the longest `nn.ModuleList` in the model, which finds them for every
    architecture without a per-model table. Each parameter is counted once, in the first role that
    claims it (blocks, then embeddings, then head, then the rest), so a head tied to the input
    embeddings counts as 0.
    """
    model = _build_empty(config)
    blocks = find_blocks(model)
    n_layers = len(blocks)
    counted: set[int] = set()
    block_total = _claim(blocks.parameters(), counted)
    embedding = _claim(_embedding_parameters(model, blocks), counted)
    output = model.get_output_embeddings()
    head = _claim(output.parameters() if output is not None else (), counted)
    other = _claim(model.parameters(), counted)
    return ParameterCount(
        total=block_total + embedding + head + other,
        embedding=embedding,
        per_layer=round(block_total / n_layers),
        n_layers=n_layers,
        head=head,
        other=other,
        quantizable_per_layer=round(_quantizable_weights(blocks) / n_layers),
    )


def _build_empty(config: PreTrainedConfig) -> nn.Module:
    """The model with every parameter on the meta device: real shapes, no memory, no download."""
    auto_classes = (AutoModel,) if is_encoder(config) else (AutoModelForCausalLM, AutoModel)
    for auto_class in auto_classes:
        try:
            with init_empty_weights():
                model = auto_class.from_config(config)
        except ValueError:  # this config type has no class in that auto mapping
            continue
        # init_empty_weights re-registers every parameter on the meta device, which unties the
        # head from the input embeddings; tie them again or a tied head would count twice.
        model.tie_weights()
        return model
    raise MistudioError(
        f"transformers cannot build a model of type {config.model_type!r}",
        hint="use a causal language model or encoder that your transformers version supports",
    )


def _claim(parameters: Iterable[nn.Parameter], counted: set[int]) -> int:
    """Count the parameters not yet claimed by another role, and claim them."""
    total = 0
    for parameter in parameters:
        if id(parameter) not in counted:
            counted.add(id(parameter))
            total += parameter.numel()
    return total


def _embedding_parameters(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Parameter]:
    """Everything that runs before block 0: every embedding table outside the blocks (tokens,
    positions, token types) and, when the input embeddings sit in their own container (BERT's
    `embeddings`), the rest of that container (its LayerNorm)."""
    in_blocks = {id(module) for module in blocks.modules()}
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding) and id(m) not in in_blocks]
    parameters = [p for table in tables for p in table.parameters()]
    container = _embedding_container(model)
    if container is not None and id(blocks) not in {id(m) for m in container.modules()}:
        parameters.extend(container.parameters())
    return parameters


def _embedding_container(model: nn.Module) -> nn.Module | None:
    input_embeddings = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is input_embeddings and "." in name:
            return model.get_submodule(name.rsplit(".", 1)[0])
    return None


def _quantizable_weights(blocks: nn.ModuleList) -> int:
    """Weights bitsandbytes quantizes: the same test as transformers' `replace_with_bnb_linear`."""
    return sum(
        module.weight.numel()
        for module in blocks.modules()
        if type(module) is nn.Linear or isinstance(module, Conv1D)
    )


def bytes_per_parameter(quantization: str, dtype: torch.dtype) -> float:
    """Bytes one quantizable weight takes: the dtype's size unquantized, 1 + 0.004 for LLM.int8
    (int8 values plus per-row fp32 scales), 0.516 for NF4 with double quantization (4-bit values
    plus 8-bit block absmaxes and their fp32 scales)."""
    if quantization == "none":
        return float(dtype.itemsize)
    if quantization == "8bit":
        return 1.0 + _INT8_SCALE_BYTES
    if quantization == "4bit":
        return 0.5 + _NF4_SCALE_BYTES
    raise MistudioError(
        f"unknown quantization {quantization!r}", hint="use one of " + ", ".join(QUANTIZATIONS)
    )


@dataclass(frozen=True)
class LoadedWeights:
    """The weights one load holds, in the two parts a split over GPUs places separately:
    `n_blocks` blocks of `block_bytes` each, and everything outside the blocks (`outside_bytes`:
    the embeddings, plus the final norm and the head when the whole model is loaded)."""

    outside_bytes: int
    block_bytes: int
    n_blocks: int

    @property
    def total(self) -> int:
        return self.outside_bytes + self.n_blocks * self.block_bytes


def loaded_weights(
    params: ParameterCount, layer: int | None, quantization: str, dtype: torch.dtype
) -> LoadedWeights:
    """Bitsandbytes quantizes only the blocks' Linear weights: a block's norms and biases, and
    everything outside the blocks, stay in `dtype`."""
    n_blocks = _blocks_loaded(params, layer)
    quantizable = params.quantizable_per_layer
    block = round(
        quantizable * bytes_per_parameter(quantization, dtype)
        + (params.per_layer - quantizable) * dtype.itemsize
    )
    outside = (params.up_to_layer(layer) - n_blocks * params.per_layer) * dtype.itemsize
    return LoadedWeights(outside, block, n_blocks)


def weight_bytes(
    params: ParameterCount, layer: int | None, quantization: str, dtype: torch.dtype
) -> int:
    """Bytes of the loaded weights (see `loaded_weights`)."""
    return loaded_weights(params, layer, quantization, dtype).total


def sae_bytes(d_in: int, d_sae: int) -> int:
    """Training an SAE: W_enc, W_dec, b_enc, b_dec in fp32, four times over for Adam (weights,
    grads, m, v), plus the dense pre-activations of one training batch of 4096 tokens. The
    backward pass's transient copies are left to the safety margin."""
    parameters = 2 * d_in * d_sae + d_sae + d_in
    pre_activations = SAE_TRAIN_BATCH_TOKENS * d_sae
    return (parameters * _ADAM_COPIES + pre_activations) * _FP32_BYTES


def activation_bytes_per_token(
    config: PreTrainedConfig, context_size: int, dtype: torch.dtype, *, logits: bool
) -> int:
    """Peak bytes per token of a no-grad forward pass, at the widest point of one block.

    Activations are freed block by block, so the peak is one block's live tensors: the residual
    stream in and out (2 x hidden), then the larger of attention (q, k, v and the output, 4 x
    hidden, plus the eager scores and softmax probabilities, 2 x heads x context) and the MLP
    (up, gate and their product, 3 x intermediate). With `logits` (the whole model runs), the
    vocabulary logits are added in fp32, as the loss upcasts them.
    """
    text = config.get_text_config()
    hidden = text.hidden_size
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
    attention = 4 * hidden + 2 * text.num_attention_heads * context_size
    mlp = 3 * (intermediate or 4 * hidden)
    per_token = (2 * hidden + max(attention, mlp)) * dtype.itemsize
    return per_token + (_logit_bytes_per_token(config) if logits else 0)


def _logit_bytes_per_token(config: PreTrainedConfig) -> int:
    return config.get_text_config().vocab_size * _FP32_BYTES


@dataclass(frozen=True)
class DeviceMemory:
    """One device's memory as the preflight sees it: `free_bytes` is what a run can still take
    (other processes' use already subtracted), `name` is how torch addresses it."""

    name: str
    label: str
    free_bytes: int
    total_bytes: int

    @property
    def is_gpu(self) -> bool:
        return self.name.startswith("cuda")


def available_devices() -> list[DeviceMemory]:
    """Every GPU's free and total memory, or CPU RAM alone when there is no GPU.

    torch is asked first; when it has no CUDA (a CPU build on a GPU box), NVML is. NVML numbers
    GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES, so its `cuda:N` may differ from torch's.
    A missing or failing NVML library means no GPU, never a crash.
    """
    return _torch_gpus() or _nvml_gpus() or [_cpu_memory()]


def _torch_gpus() -> list[DeviceMemory]:
    if not torch.cuda.is_available():
        return []
    try:
        return [_torch_gpu(index) for index in range(torch.cuda.device_count())]
    except RuntimeError:  # a busy or broken device: let NVML, or the CPU, answer instead
        return []


def _torch_gpu(index: int) -> DeviceMemory:
    free, total = torch.cuda.mem_get_info(index)
    return DeviceMemory(f"cuda:{index}", torch.cuda.get_device_name(index), free, total)


def _nvml_gpus() -> list[DeviceMemory]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        return [_nvml_gpu(pynvml, index) for index in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()


def _nvml_gpu(pynvml: ModuleType, index: int) -> DeviceMemory:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = pynvml.nvmlDeviceGetName(handle)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    label = name.decode() if isinstance(name, bytes) else name
    return DeviceMemory(f"cuda:{index}", label, int(memory.free), int(memory.total))


def _cpu_memory() -> DeviceMemory:
    memory = psutil.virtual_memory()
    return DeviceMemory("cpu", "CPU RAM", int(memory.available), int(memory.total))


@dataclass(frozen=True)
class MemoryEstimate:
    """What one quantization needs on one device.

    These are minimums: activations are priced for a forward batch of one sequence
    (`context_size` tokens), the least a run can do, and `total_bytes` is what must then be free:
    the three parts plus the 10% margin and, on a GPU, the CUDA context. `fits` compares it with
    the device's free memory; `recommended_batch_tokens` says how far the batch can grow from there.
    """

    quantization: str
    weights_bytes: int
    activations_bytes: int
    sae_bytes: int
    total_bytes: int
    fits: bool
    device: str
    recommended_batch_tokens: int | None
    # Only when it does not fit on the device but fits over several GPUs: how (see `SplitPlan`).
    split: SplitPlan | None = None


def _required_bytes(payload: int, device: DeviceMemory) -> int:
    context = CUDA_CONTEXT_BYTES if device.is_gpu else 0
    return round(payload * (1 + SAFETY_MARGIN)) + context


def _largest_batch(fixed: int, per_token: int, device: DeviceMemory) -> int:
    """The largest power of two of tokens (<= 65536, at least 1) whose forward pass fits beside
    `fixed` bytes. Called once one sequence is known to fit, so it is at least the largest power
    of two within the context; the loader rounds it up to whole sequences."""
    tokens = MAX_BATCH_TOKENS
    while tokens > 1 and _required_bytes(fixed + per_token * tokens, device) > device.free_bytes:
        tokens //= 2
    return tokens


@dataclass(frozen=True)
class _Load:
    """What one load needs before the margin and the CUDA context: its weights, the SAE trained
    beside it and, per token of a forward batch, a block's activations (on every GPU that runs
    blocks) and the fp32 logits (where the head runs: one device, a split's first GPU)."""

    quantization: str
    weights: LoadedWeights
    sae: int
    block_per_token: int
    logits_per_token: int

    @property
    def per_token(self) -> int:
        return self.block_per_token + self.logits_per_token

    @classmethod
    def of(cls, config: PreTrainedConfig, params: ParameterCount, layer: int | None,
           quantization: str, dtype: torch.dtype, context_size: int,
           d_sae: int | None) -> _Load:
        """`layer` None: the whole model, with a causal LM's logits."""
        hidden = config.get_text_config().hidden_size
        whole_lm = layer is None and not is_encoder(config)
        return cls(
            quantization,
            loaded_weights(params, layer, quantization, dtype),
            sae_bytes(hidden, d_sae or SAE_EXPANSION * hidden),
            activation_bytes_per_token(config, context_size, dtype, logits=False),
            _logit_bytes_per_token(config) if whole_lm else 0,
        )


def _estimate(load: _Load, context_size: int, device: DeviceMemory) -> MemoryEstimate:
    weights = load.weights.total
    activations = load.per_token * context_size
    total = _required_bytes(weights + activations + load.sae, device)
    fits = total <= device.free_bytes
    return MemoryEstimate(
        quantization=load.quantization,
        weights_bytes=weights,
        activations_bytes=activations,
        sae_bytes=load.sae,
        total_bytes=total,
        fits=fits,
        device=device.name,
        recommended_batch_tokens=(
            _largest_batch(weights + load.sae, load.per_token, device) if fits else None
        ),
    )


@dataclass(frozen=True)
class GpuShare:
    """One GPU's part of a split model: the blocks `first_layer` .. `first_layer + n_layers - 1`
    and, on the plan's first GPU, everything outside the blocks and the SAE. `weights_bytes` is
    the model weights placed there; `total_bytes` what must be free for its part with the
    activations of the plan's batch (margin and CUDA context included, as in `MemoryEstimate`)."""

    device: str
    first_layer: int
    n_layers: int
    weights_bytes: int
    total_bytes: int
    free_bytes: int

    @property
    def index(self) -> int:
        """The CUDA index, as `from_pretrained`'s device map names a GPU."""
        return _cuda_index(self.device)


@dataclass(frozen=True)
class SplitPlan:
    """A model spread over GPUs, block by block, for when it fits on no GPU alone.

    The GPUs are filled in CUDA index order. The first (cuda:0: where `device="auto"` loads,
    where the inputs go and the trainer keeps the SAE) holds the embeddings, the final norm, the
    head and the SAE, then as many blocks as fit; the next GPU takes the following blocks, and so
    on. So a model takes as few GPUs as it can, and activations cross between GPUs only where the
    blocks do. Every GPU keeps room for the activations of `recommended_batch_tokens` tokens: the
    largest power of two (<= 65536) with which the whole model still fits, so that a run's real
    batch does not meet a GPU filled to the brim with room for one sequence only.
    """

    shares: list[GpuShare]
    recommended_batch_tokens: int

    @property
    def main_gpu(self) -> int:
        """The GPU of the embeddings: where inputs go and captured activations are gathered."""
        return self.shares[0].index

    def block_gpus(self) -> list[int]:
        """The CUDA index of every loaded block, in block order."""
        return [share.index for share in self.shares for _ in range(share.n_layers)]


def _plan_split(load: _Load, context_size: int, gpus: Sequence[DeviceMemory]) -> SplitPlan | None:
    """`load` spread over `gpus` (in that order) as `SplitPlan` says; None when it does not fit
    even with the activations of one sequence (`context_size` tokens)."""
    if _fill(load, context_size, gpus) is None:
        return None
    tokens = MAX_BATCH_TOKENS
    while (shares := _fill(load, tokens, gpus)) is None:
        tokens //= 2  # ends: one sequence fits, so any smaller batch does
    return SplitPlan(shares, tokens)


def _fill(load: _Load, tokens: int, gpus: Sequence[DeviceMemory]) -> list[GpuShare] | None:
    """The blocks poured onto `gpus` in order, each GPU keeping room for the activations of
    `tokens` tokens (the first also for the weights outside the blocks, the logits and the
    SAE); None when blocks are left over or the first GPU cannot hold its own part."""
    weights = load.weights
    shares: list[GpuShare] = []
    placed = 0
    for index, gpu in enumerate(gpus):
        first = index == 0
        outside = weights.outside_bytes if first else 0
        per_token = load.per_token if first else load.block_per_token
        fixed = tokens * per_token + outside + (load.sae if first else 0)
        room = _blocks_beside(fixed, weights.block_bytes, gpu)
        if first and room < 0:
            return None
        count = max(0, min(room, weights.n_blocks - placed))
        if first or count:
            shares.append(GpuShare(
                device=gpu.name,
                first_layer=placed,
                n_layers=count,
                weights_bytes=outside + count * weights.block_bytes,
                total_bytes=_required_bytes(fixed + count * weights.block_bytes, gpu),
                free_bytes=gpu.free_bytes,
            ))
        placed += count
        if placed == weights.n_blocks:
            return shares
    return None


def _blocks_beside(fixed: int, block: int, gpu: DeviceMemory) -> int:
    """How many blocks of `block` bytes fit on `gpu` beside `fixed` bytes (negative: not even
    `fixed` fits)."""
    payload = (gpu.free_bytes - CUDA_CONTEXT_BYTES) / (1 + SAFETY_MARGIN) - fixed
    count = math.floor(payload / block)
    while count >= 0 and _required_bytes(fixed + count * block, gpu) > gpu.free_bytes:
        count -= 1  # `_required_bytes` rounds, so the division may be one block generous
    return count


def _gpus_in_order(devices: Iterable[DeviceMemory]) -> list[DeviceMemory]:
    """The GPUs among `devices`, by CUDA index: the order a split fills them in."""
    return sorted((d for d in devices if d.is_gpu), key=lambda d: _cuda_index(d.name))


def _cuda_index(name: str) -> int:
    """`cuda:3` -> 3."""
    return int(name.split(":")[1])


@dataclass(frozen=True)
class MemoryReport:
    """The preflight's answer for one model on the best device, for every quantization.

    `recommended_quantization` is the least lossy one that fits on one device. Only when none
    does, `recommended_split` is the least lossy one that fits split over `gpus` (a model on one
    GPU runs faster and leaves the others to other jobs)."""

    model_id: str
    architecture: str
    n_layers: int
    hidden_size: int
    parameters: ParameterCount
    layer: int | None
    device: DeviceMemory
    estimates: list[MemoryEstimate]
    full_model_estimates: list[MemoryEstimate]
    recommended_quantization: str | None
    gpus: list[DeviceMemory]
    recommended_split: str | None

    def to_dict(self) -> dict:
        """Plain JSON types only, for `mistudio check-memory --json` and the daemon."""
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a person, under 80 columns: the model, the device, what each
        quantization needs (the parts shared by all of them said once; a split GPU by GPU),
        the verdict."""
        scope = "whole model" if self.layer is None else f"up to layer {self.layer}"
        device, first = self.device, self.estimates[0]
        lines = [
            f"{self.model_id} ({self.architecture}, {self.n_layers} layers, "
            f"{count(self.parameters.total)} params), {scope}",
            f"{device.name} ({device.label}): {size(device.free_bytes)} free of "
            f"{size(device.total_bytes)}",
            f"SAE {size(first.sae_bytes)}, activations of one sequence "
            f"{size(first.activations_bytes)}",
        ]
        for partial, full in zip(self.estimates, self.full_model_estimates, strict=True):
            lines.append(_estimate_line(partial, full if self.layer is not None else None,
                                        len(self.gpus)))
            if partial.split is not None:
                lines.extend(_share_line(share) for share in partial.split.shares)
        lines.append(self._verdict())
        return "\n".join(lines)

    def _verdict(self) -> str:
        if self.recommended_quantization is not None:
            best = self.estimate_for(self.recommended_quantization)
            return f"recommended: {best.quantization}, batch {best.recommended_batch_tokens} tokens"
        if self.recommended_split is not None:
            split = self.estimate_for(self.recommended_split).split
            return (f"recommended: {self.recommended_split} over {len(split.shares)} GPUs, "
                    f"batch {split.recommended_batch_tokens} tokens")
        return "nothing fits: try 4bit, an earlier --layer, a smaller --d-sae or more GPUs"

    def estimate_for(self, quantization: str) -> MemoryEstimate:
        return next(e for e in self.estimates if e.quantization == quantization)


def _estimate_line(estimate: MemoryEstimate, full: MemoryEstimate | None, n_gpus: int) -> str:
    """`  4bit  weights 2.8 GiB, needs 13.4 GiB (whole 16.3 GiB): fits, batch 65536`"""
    if estimate.fits:
        verdict = f"fits, batch {estimate.recommended_batch_tokens}"
    elif estimate.split is not None:
        verdict = f"split, batch {estimate.split.recommended_batch_tokens}"
    else:
        verdict = f"too big for {n_gpus} GPUs" if n_gpus > 1 else "too big"
    whole = f" (whole {size(full.total_bytes)})" if full is not None else ""
    return (
        f"  {estimate.quantization:<4}  weights {size(estimate.weights_bytes)}, needs "
        f"{size(estimate.total_bytes)}{whole}: {verdict}"
    )


def _share_line(share: GpuShare) -> str:
    """`        cuda:1  layers 42-79  weights 16.4 GiB, needs 31.2 GiB of 79.1 GiB`"""
    last = share.first_layer + share.n_layers - 1
    layers = {0: "no layers", 1: f"layer {last}"}.get(
        share.n_layers, f"layers {share.first_layer}-{last}"
    )
    return (f"        {share.device}  {layers:<13} weights {size(share.weights_bytes)}, "
            f"needs {size(share.total_bytes)} of {size(share.free_bytes)}")


def preflight(
    config: PreTrainedConfig,
    *,
    model_id: str,
    layer: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    context_size: int = 128,
    d_sae: int | None = None,
    devices: list[DeviceMemory] | None = None,
) -> MemoryReport:
    """Price training an SAE on `model_id` (up to `layer` when given) on the device with the most
    free memory, under every quantization; recommend the least lossy one that fits. With several
    GPUs, a quantization that fits on none alone gets a `SplitPlan` over them when one exists.

    `d_sae` defaults to 16 x hidden. `devices` defaults to `available_devices()`; tests and the
    daemon's GPU manager pass their own. Raises `MistudioError` when `layer` is out of range or a
    size is not positive.
    """
    if context_size < 1 or (d_sae is not None and d_sae < 1):
        raise MistudioError(
            f"context size {context_size} and d_sae {d_sae} must be positive",
            hint="pass a --context-size and a --d-sae of at least 1",
        )
    params = count_parameters(config)
    _blocks_loaded(params, layer)  # a layer out of range is refused before any pricing
    devices = devices or available_devices()
    device = max(devices, key=lambda d: d.free_bytes)
    gpus = _gpus_in_order(devices)

    def estimates(at_layer: int | None) -> list[MemoryEstimate]:
        found = []
        for q in QUANTIZATIONS:
            load = _Load.of(config, params, at_layer, q, dtype, context_size, d_sae)
            estimate = _estimate(load, context_size, device)
            if not estimate.fits and len(gpus) > 1:
                estimate = replace(estimate, split=_plan_split(load, context_size, gpus))
            found.append(estimate)
        return found

    partial = estimates(layer)
    recommended = next((e.quantization for e in partial if e.fits), None)
    return MemoryReport(
        model_id=model_id,
        architecture=config.model_type,
        n_layers=params.n_layers,
        hidden_size=config.get_text_config().hidden_size,
        parameters=params,
        layer=layer,
        device=device,
        estimates=partial,
        full_model_estimates=partial if layer is None else estimates(None),
        recommended_quantization=recommended,
        gpus=gpus,
        recommended_split=None if recommended else next(
            (e.quantization for e in partial if e.split is not None), None
        ),
    )


def auto_placement(
    config: PreTrainedConfig,
    *,
    layer: int | None,
    quantization: str,
    dtype: torch.dtype,
    gpus: Sequence[DeviceMemory] | None = None,
    context_size: int = 128,
) -> SplitPlan | None:
    """Where `load_model` puts a model with `device="auto"` when several GPUs are visible: on the
    first GPU (None) when it fits there as the preflight prices it (with a 16x SAE and one
    sequence), else spread over the GPUs as `SplitPlan` says.

    `gpus` defaults to this process's GPUs, read lazily: reading a GPU's free memory opens a
    CUDA context on it (hundreds of MiB), which the other GPUs are spared when the model fits on
    the first. Raises `MistudioError` when the model does not fit even split.
    """
    load = _Load.of(config, count_parameters(config), layer, quantization, dtype, context_size,
                    None)
    first = gpus[0] if gpus else _torch_gpu(0)
    if _estimate(load, context_size, first).fits:
        return None
    gpus = gpus or [first, *(_torch_gpu(i) for i in range(1, torch.cuda.device_count()))]
    plan = _plan_split(load, context_size, gpus)
    if plan is None:
        free = sum(g.free_bytes for g in gpus)
        raise MistudioError(
            f"the model does not fit on {len(gpus)} GPUs even split: its {quantization} weights "
            f"are {size(load.weights.total)}, the GPUs have {size(free)} free in all, and each "
            "also needs room for activations (the first for the SAE too)",
            hint="use --quantization 4bit, an earlier layer (only the blocks up to it are "
            "loaded), a smaller --d-sae, or more GPUs; `mistudio check-memory` shows what fits",
            code="out_of_memory",
        )
    return plan


def check_memory(
    spec: ModelSpec,
    *,
    quantization: str = "auto",
    layer: int | None = None,
    context_size: int = 128,
    d_sae: int | None = None,
    devices: list[DeviceMemory] | None = None,
) -> dict:
    """`mistudio check-memory`'s answer, in-process or from the daemon: the preflight report in
    plain JSON types, the verdict for an asked quantization (`asked`: on one device, `fits`, or
    split over the GPUs, `fits_split`), and the summary lines."""
    if quantization != "auto" and quantization not in QUANTIZATIONS:
        raise MistudioError(f"unknown quantization {quantization!r}",
                            hint="use auto or one of " + ", ".join(QUANTIZATIONS),
                            code="bad_request", field="quantization")
    report = preflight(load_config(spec), model_id=spec.model_id, layer=layer,
                       context_size=context_size, d_sae=d_sae, devices=devices)
    document = report.to_dict()
    if quantization != "auto":
        chosen = report.estimate_for(quantization)
        document["asked"] = {"quantization": quantization, "fits": chosen.fits,
                             "fits_split": chosen.split is not None}
    document["summary"] = report.summary()
    return document
