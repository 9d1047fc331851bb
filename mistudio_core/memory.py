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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
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


def weight_bytes(
    params: ParameterCount, layer: int | None, quantization: str, dtype: torch.dtype
) -> int:
    """Bytes of the loaded weights: bitsandbytes quantizes only the blocks' Linear weights and
    keeps embeddings, norms, biases and the head in `dtype`."""
    quantizable = _blocks_loaded(params, layer) * params.quantizable_per_layer
    kept = params.up_to_layer(layer) - quantizable
    return round(quantizable * bytes_per_parameter(quantization, dtype) + kept * dtype.itemsize)


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
    return per_token + (text.vocab_size * _FP32_BYTES if logits else 0)


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


def _estimate(
    quantization: str,
    weights: int,
    sae: int,
    per_token: int,
    context_size: int,
    device: DeviceMemory,
) -> MemoryEstimate:
    activations = per_token * context_size
    total = _required_bytes(weights + activations + sae, device)
    fits = total <= device.free_bytes
    return MemoryEstimate(
        quantization=quantization,
        weights_bytes=weights,
        activations_bytes=activations,
        sae_bytes=sae,
        total_bytes=total,
        fits=fits,
        device=device.name,
        recommended_batch_tokens=_largest_batch(weights + sae, per_token, device) if fits else None,
    )


@dataclass(frozen=True)
class MemoryReport:
    """The preflight's answer for one model on the best device, for every quantization."""

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

    def to_dict(self) -> dict:
        """Plain JSON types only, for `mistudio check-memory --json` and the daemon."""
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a person, under 80 columns: the model, the device, what each
        quantization needs (the parts shared by all of them said once), the verdict."""
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
            lines.append(_estimate_line(partial, full if self.layer is not None else None))
        lines.append(self._verdict())
        return "\n".join(lines)

    def _verdict(self) -> str:
        if self.recommended_quantization is None:
            return "nothing fits: pick an earlier --layer, a smaller --d-sae, or a bigger device"
        best = next(e for e in self.estimates if e.quantization == self.recommended_quantization)
        return f"recommended: {best.quantization}, batch {best.recommended_batch_tokens} tokens"


def _estimate_line(estimate: MemoryEstimate, full: MemoryEstimate | None) -> str:
    """`  4bit  weights 2.8 GiB, needs 13.4 GiB (whole 16.3 GiB): fits, batch 65536`"""
    verdict = f"fits, batch {estimate.recommended_batch_tokens}" if estimate.fits else "too big"
    whole = f" (whole {size(full.total_bytes)})" if full is not None else ""
    return (
        f"  {estimate.quantization:<4}  weights {size(estimate.weights_bytes)}, needs "
        f"{size(estimate.total_bytes)}{whole}: {verdict}"
    )


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
    free memory, under every quantization; recommend the least lossy one that fits.

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
    device = max(devices or available_devices(), key=lambda d: d.free_bytes)
    hidden = config.get_text_config().hidden_size
    sae = sae_bytes(hidden, d_sae or SAE_EXPANSION * hidden)
    has_logits = not is_encoder(config)

    def estimates(at_layer: int | None) -> list[MemoryEstimate]:
        per_token = activation_bytes_per_token(
            config, context_size, dtype, logits=at_layer is None and has_logits
        )
        return [
            _estimate(
                q, weight_bytes(params, at_layer, q, dtype), sae, per_token, context_size, device
            )
            for q in QUANTIZATIONS
        ]

    partial = estimates(layer)
    return MemoryReport(
        model_id=model_id,
        architecture=config.model_type,
        n_layers=params.n_layers,
        hidden_size=hidden,
        parameters=params,
        layer=layer,
        device=device,
        estimates=partial,
        full_model_estimates=partial if layer is None else estimates(None),
        recommended_quantization=next((e.quantization for e in partial if e.fits), None),
    )


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
    plain JSON types, the verdict for an asked quantization (`asked`), and the summary lines."""
    if quantization != "auto" and quantization not in QUANTIZATIONS:
        raise MistudioError(f"unknown quantization {quantization!r}",
                            hint="use auto or one of " + ", ".join(QUANTIZATIONS),
                            code="bad_request", field="quantization")
    report = preflight(load_config(spec), model_id=spec.model_id, layer=layer,
                       context_size=context_size, d_sae=d_sae, devices=devices)
    document = report.to_dict()
    if quantization != "auto":
        chosen = next(e for e in report.estimates if e.quantization == quantization)
        document["asked"] = {"quantization": quantization, "fits": chosen.fits}
    document["summary"] = report.summary()
    return document
