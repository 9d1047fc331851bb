"""Load any Hugging Face language model and read (or replace) activations at named hooks.

One code path serves a hub id, a local directory and the offline demo model (`demo`): the id is
resolved to a source, the config is read first (so bad ids fail before any weight is fetched),
then the weights are loaded in the requested dtype or quantization.

Hooks are found generically. The decoder blocks are the longest `nn.ModuleList` in the model
(GPT-2's `h`, GPT-NeoX's `layers`, Llama's `layers`, BERT's `layer`, ...). Inside a block, the
attention and MLP modules are found by their usual names; architectures whose residual additions
are not those modules' raw outputs (Gemma 2/3 and OLMo 2 normalise the sub-layer outputs, BERT
adds them inside a post-LayerNorm) are mapped explicitly to the module whose output really is the
update. So `layers.L.attn_out` always means "what attention adds to the residual stream".

Partial loading: when only hooks up to layer L are needed, the config is cut to L+1 blocks before
loading, so the later blocks' weights are never materialised, and the forward pass is stopped by
an exception right after the last hook fires (no final norm, no head).

Models larger than one GPU: with `device="auto"` and several GPUs visible, a model (as loaded:
quantized, cut to its layers) that the memory preflight says does not fit on the first GPU is
spread over them by the preflight's `SplitPlan`, passed to `from_pretrained` as an explicit device
map (block i on its GPU, everything else on the first). An explicit map rather than accelerate's
`device_map="auto"` with a `max_memory`: accelerate would re-balance and re-price the layers by
its own rules (bitsandbytes scales its budgets by 0.9, the first GPU keeps room for the largest
layer), so what the preflight showed would not be what is loaded. Inputs go to the first GPU,
and every hook hands its activation over on that GPU, where the SAE is.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field

import torch
from torch import nn

from mistudio_core.demo import default_demo_dir, demo_config, ensure_demo_model, is_complete_build
from mistudio_core.errors import MistudioError
from mistudio_core.hooks import HookPoint
from mistudio_core.model_ids import DEMO_MODEL_ALIAS, check_model_id

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
QUANTIZATIONS = ("auto", "none", "8bit", "4bit")
# From this size up, `--quantization auto` loads in 4-bit, as the original miStudio did.
AUTO_4BIT_PARAMETERS = 8_000_000_000

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
# Architectures that normalise a sub-layer's output before adding it to the residual stream.
_OUTPUT_NORMS = {
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
}
# The order in which a block's hooks fire, to know which capture is the last one.
_SITE_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}
# BERT-family post-LN blocks: the update is the dense projection before dropout + LayerNorm.
_BERT_OUTPUTS = ("attention.output.dense", "output.dense")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how: what a user passes as --model, --dtype, --quantization."""

    model_id: str
    revision: str | None = None
    dtype: str = "auto"
    quantization: str = "none"
    device: str = "auto"
    token: str | None = field(default=None, repr=False)


def resolve_device(device: str) -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise MistudioError(f"unknown device {device!r}", hint="use auto, cpu or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MistudioError(
            f"device {device} asked for, but this machine has no usable CUDA GPU",
            hint="use --device cpu (or auto), or check nvidia-smi and the CUDA build of torch",
        )
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise MistudioError(
            f"no GPU {device}: this machine has {torch.cuda.device_count()}",
            hint="pick cuda:N with N below the GPU count",
        )
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU."""
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise MistudioError(
            f"unknown dtype {dtype!r}", hint="use auto, float32, bfloat16 or float16"
        )
    return DTYPES[name]


def resolve_source(model_id: str) -> str:
    """A local directory, the built-in demo model, or a hub id, as from_pretrained takes it."""
    if model_id == DEMO_MODEL_ALIAS:  # the offline demo model, built once and cached
        return str(ensure_demo_model())
    return check_model_id(model_id) or model_id


def load_config(spec: ModelSpec):
    """Read the model's config only: the cheap first step that validates an id."""
    from transformers import AutoConfig

    if spec.model_id == DEMO_MODEL_ALIAS and not is_complete_build(default_demo_dir()):
        return demo_config()  # reading a config must not train the demo model (minutes)
    source = resolve_source(spec.model_id)
    with _explained_loading_errors(spec):
        return AutoConfig.from_pretrained(source, revision=spec.revision, token=spec.token)


def n_layers_of(config) -> int:
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int):
        raise MistudioError(
            f"cannot tell how many layers a {config.model_type} model has",
            hint="this architecture is not supported yet; try a decoder-only causal LM",
        )
    return layers


def check_layer(config, layer: int, model_id: str) -> None:
    """Refuse a layer the model does not have, before anything is loaded."""
    n_layers = n_layers_of(config)
    if not 0 <= layer < n_layers:
        raise MistudioError(
            f"layer {layer} does not exist: {model_id} has {n_layers} layers",
            hint=f"pick a layer from 0 to {n_layers - 1}",
        )


def truncated_config(config, n_blocks: int):
    """A copy of `config` that builds only the first `n_blocks` blocks (partial loading)."""
    cut = copy.deepcopy(config)
    cut.num_hidden_layers = n_blocks
    # Per-layer lists (sliding/full attention patterns) must match the new depth.
    for attribute in ("layer_types", "block_types"):
        value = getattr(cut, attribute, None)
        if isinstance(value, list):
            setattr(cut, attribute, value[:n_blocks])
    return cut


def is_encoder(config) -> bool:
    """BERT-like models (those with a masked-LM head), unless their config makes them decoders."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
        config, "is_decoder", False
    )


def is_causal_lm(config) -> bool:
    """Decoder-only LMs: the models whose next-token loss an SAE can be judged by."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not is_encoder(config)


def resolve_quantization(spec: ModelSpec, config) -> str:
    """`auto` means 4-bit from 8B parameters up, no quantization below."""
    if spec.quantization not in QUANTIZATIONS:
        raise MistudioError(
            f"unknown quantization {spec.quantization!r}",
            hint="use one of " + ", ".join(QUANTIZATIONS),
        )
    if spec.quantization != "auto":
        return spec.quantization
    from mistudio_core.memory import count_parameters

    return "4bit" if count_parameters(config).total >= AUTO_4BIT_PARAMETERS else "none"


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    """bitsandbytes settings: NF4 with double quantization for 4-bit, LLM.int8 for 8-bit."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


class _StopForward(Exception):
    """Raised by the last capture hook so the layers after it never run."""


@dataclass
class HookedModel:
    """A loaded model with its tokenizer and a map from hook names to its modules."""

    model: nn.Module
    tokenizer: object
    config: object
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    quantization: str
    n_layers: int  # the checkpoint's depth
    blocks: nn.ModuleList  # the blocks actually loaded (fewer with partial loading)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def has_lm_head(self) -> bool:
        return hasattr(self.model, "get_output_embeddings") and (
            self.model.get_output_embeddings() is not None
        )

    def module_for(self, hook: HookPoint) -> tuple[nn.Module, str]:
        """The module a hook reads and whether it reads its `input` or its `output`."""
        if hook.layer >= len(self.blocks):
            loaded = len(self.blocks)
            raise MistudioError(
                f"hook {hook} is past the last loaded layer ({loaded - 1}; the model has "
                f"{self.n_layers})",
                hint=f"pick a layer from 0 to {self.n_layers - 1}",
            )
        block = self.blocks[hook.layer]
        if hook.site == "resid_pre":
            return block, "input"
        if hook.site == "resid_post":
            return block, "output"
        index = 0 if hook.site == "attn_out" else 1
        return _sublayer_output(block, self.model_type, index), "output"

    def tokenize(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        return {name: tensor.to(self.device) for name, tensor in batch.items()}

    @torch.no_grad()
    def activations(
        self,
        input_ids: torch.Tensor,
        hooks: Sequence[HookPoint],
        attention_mask: torch.Tensor | None = None,
    ) -> dict[HookPoint, torch.Tensor]:
        """One forward pass, stopped after the deepest hook; [batch, seq, d] per hook."""
        captured: dict[HookPoint, torch.Tensor] = {}
        last = max(hooks, key=lambda h: (h.layer, _SITE_ORDER[h.site]))
        with ExitStack() as stack:
            for hook in hooks:
                stack.enter_context(self._capture(hook, captured, stop=hook == last))
            with suppress(_StopForward):
                self.forward(input_ids, attention_mask)
        return captured

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """The model's own forward pass on packed windows (no padding unless a mask says so)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            use_cache=False,
        )

    @contextmanager
    def replaced(
        self, hook: HookPoint, replace: Callable[[torch.Tensor], torch.Tensor]
    ) -> Iterator[None]:
        """Within the block, the activation at `hook` is replaced by `replace(activation)`.

        `replace` sees the activation on `self.device` (where the SAE is) whichever GPU a split
        model runs the block on; what it returns goes back to that GPU."""
        module, where = self.module_for(hook)
        replace = self._on_model_device(replace)
        if where == "input":

            def pre_hook(_module, args, kwargs):
                if args:
                    return (replace(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}

            handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:

            def post_hook(_module, _args, output):
                if isinstance(output, tuple):
                    return (replace(output[0]), *output[1:])
                return replace(output)

            handle = module.register_forward_hook(post_hook)
        try:
            yield
        finally:
            handle.remove()

    def _on_model_device(
        self, replace: Callable[[torch.Tensor], torch.Tensor]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """`replace` applied on `self.device`; an activation handed back unchanged is not copied
        back (`.to` to the same device is the tensor itself, so one device costs nothing)."""

        def on_model_device(tensor: torch.Tensor) -> torch.Tensor:
            moved = tensor.to(self.device)
            result = replace(moved)
            return tensor if result is moved else result.to(tensor.device)

        return on_model_device

    @contextmanager
    def _capture(
        self, hook: HookPoint, into: dict[HookPoint, torch.Tensor], stop: bool
    ) -> Iterator[None]:
        def keep(tensor: torch.Tensor) -> None:
            into[hook] = tensor.detach()
            if stop:
                raise _StopForward

        def identity_after_keep(tensor: torch.Tensor) -> torch.Tensor:
            keep(tensor)
            return tensor

        with self.replaced(hook, identity_after_keep):
            yield


def _sublayer_output(block: nn.Module, model_type: str, index: int) -> nn.Module:
    """The module whose output is what attention (index 0) or the MLP (1) adds to the stream."""
    if model_type in _OUTPUT_NORMS:
        return block.get_submodule(_OUTPUT_NORMS[model_type][index])
    try:
        return block.get_submodule(_BERT_OUTPUTS[index])
    except AttributeError:
        pass
    names = _ATTENTION_NAMES if index == 0 else _MLP_NAMES
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    kind = "attention" if index == 0 else "MLP"
    raise MistudioError(
        f"cannot find the {kind} module in a {model_type} block "
        f"(children: {', '.join(n for n, _ in block.named_children())})",
        hint="use a resid_pre or resid_post hook for this architecture",
    )


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder (or encoder) block stack: the longest ModuleList in the model."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise MistudioError(
            f"cannot find the layer stack of {type(model).__name__}",
            hint="this architecture is not supported yet",
        )
    return best


def load_model(
    spec: ModelSpec,
    *,
    up_to_layer: int | None = None,
    with_lm_head: bool = False,
    config=None,
) -> HookedModel:
    """Load a model for reading activations (partially, up to a layer) or for LM evals.

    With `with_lm_head` the whole causal LM is loaded (CE-loss evals need every layer and the
    unembedding). Otherwise the base model is loaded without its head, and with `up_to_layer`
    only the blocks 0..up_to_layer. `config` saves reading the config again when the caller has
    (`load_config(spec)`); from_pretrained may annotate it, so it is not for reuse afterwards.
    With `device="auto"` and several GPUs, a model too big for the first GPU is spread over
    them as the memory preflight plans it (see the module docstring); `MistudioError` when it
    does not fit even so.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    source = resolve_source(spec.model_id)
    if config is None:
        config = load_config(spec)
    n_layers = n_layers_of(config)
    if up_to_layer is not None:
        check_layer(config, up_to_layer, spec.model_id)
    if with_lm_head and not is_causal_lm(config):
        raise MistudioError(
            f"{spec.model_id} ({config.model_type}) is not a causal language model",
            hint="LM-loss evals need a causal LM; the other metrics work without one",
        )
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    quantization = resolve_quantization(spec, config)
    split = _split_plan(spec, config, None if with_lm_head else up_to_layer, quantization, dtype)
    if up_to_layer is not None and not with_lm_head:
        config = truncated_config(config, up_to_layer + 1)

    model_class = AutoModelForCausalLM if with_lm_head else AutoModel
    kwargs: dict = {"config": config, "revision": spec.revision, "token": spec.token}
    kwargs["dtype"] = dtype
    if quantization != "none":
        kwargs["quantization_config"] = quantization_config(quantization, dtype)
    if split is not None:
        kwargs["device_map"] = split_device_map(
            model_class, config, split.block_gpus(), split.main_gpu
        )
        device = torch.device("cuda", split.main_gpu)
    elif quantization != "none":  # bitsandbytes quantizes while placing: it needs a map
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    with _explained_loading_errors(spec), _quiet_transformers():
        model = model_class.from_pretrained(source, **kwargs)
        tokenizer = _load_tokenizer(source, spec)
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return HookedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        spec=spec,
        device=device,
        dtype=dtype,
        quantization=quantization,
        n_layers=n_layers,
        blocks=find_blocks(model),
    )


def _split_plan(spec: ModelSpec, config, layer: int | None, quantization: str,
                dtype: torch.dtype):
    """The preflight's plan to spread the model over the GPUs (a `memory.SplitPlan`), or None to
    load it on one device: only `device="auto"` with several GPUs visible, and only when the
    model does not fit on the first. `layer` None: the whole model is loaded."""
    if spec.device != "auto" or torch.cuda.device_count() < 2:
        return None
    from mistudio_core.memory import auto_placement

    return auto_placement(config, layer=layer, quantization=quantization, dtype=dtype)


def split_device_map(
    model_class, config, block_gpus: Sequence[int], main_gpu: int
) -> dict[str, int]:
    """`from_pretrained`'s device map for a model split over GPUs: block i on `block_gpus[i]`,
    everything else (embeddings, rotary tables, final norm, head) on `main_gpu`.

    The module names come from the model built on the meta device from `config` (no memory):
    every module, parameter and buffer beside the path from the root to the block list goes to
    `main_gpu`, so the map covers the whole model for any architecture, and a head tied to the
    input embeddings stays on their GPU.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        empty = model_class.from_config(config)
    blocks = find_blocks(empty)
    path = next(name for name, module in empty.named_modules() if module is blocks)
    device_map: dict[str, int] = {}
    node, prefix = empty, ""
    for step in path.split("."):
        members = itertools.chain(node.named_parameters(recurse=False),
                                  node.named_buffers(recurse=False), node.named_children())
        device_map.update({prefix + name: main_gpu for name, _ in members if name != step})
        node, prefix = node.get_submodule(step), f"{prefix}{step}."
    device_map.update({f"{path}.{index}": gpu for index, gpu in enumerate(block_gpus)})
    return device_map


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Partial loading leaves the later blocks' weights unused on purpose: do not report them."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _load_tokenizer(source: str, spec: ModelSpec):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=spec.revision, token=spec.token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


@contextmanager
def _explained_loading_errors(spec: ModelSpec) -> Iterator[None]:
    """Turn the many ways loading can fail into one MistudioError with a hint."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = spec.model_id
    try:
        try:
            yield
        except OSError as exc:
            # transformers wraps the hub's errors in OSError: raise the hub's own error instead.
            cause = _hub_cause(exc, (GatedRepoError, RepositoryNotFoundError,
                                     RevisionNotFoundError, HFValidationError,
                                     LocalEntryNotFoundError))
            if cause is None:
                raise
            raise cause from exc
    except MistudioError:
        raise
    except GatedRepoError as exc:
        raise MistudioError(
            f"{name} is gated: your account has not been granted access",
            hint="accept its licence on the hub and pass --hf-token (or set HF_TOKEN)",
            code="model_not_found",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise MistudioError(
            f"model {name!r} was not found on the hub (or it is private)",
            hint="check the id (owner/name), or pass --hf-token for a private model",
            code="model_not_found",
        ) from exc
    except RevisionNotFoundError as exc:
        raise MistudioError(
            f"revision {spec.revision!r} of {name} does not exist",
            hint="give a branch, tag or commit that exists",
            code="model_not_found",
        ) from exc
    except HFValidationError as exc:
        raise MistudioError(
            f"{name!r} is neither a local model directory nor a valid hub id",
            hint="give a directory holding config.json, or an id like EleutherAI/pythia-160m",
            code="model_not_found",
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise MistudioError(
            f"cannot fetch {name}: the hub is unreachable and it is not in the local cache",
            hint="connect to the network once, or point --model at a local directory "
            "(the offline demo model is --model demo)",
            code="model_not_found",
        ) from exc
    except torch.OutOfMemoryError as exc:
        raise MistudioError(
            f"not enough memory to load {name}",
            hint="run `mistudio check-memory` and pick --quantization 4bit or a lower --layer",
            code="out_of_memory",
        ) from exc
    except (OSError, ValueError, KeyError) as exc:
        raise MistudioError(
            f"cannot load {name}: {exc}".strip(),
            hint="check that the directory or repo holds a complete Hugging Face model "
            "(config.json, weights, tokenizer) of a supported architecture",
            code="model_not_found",
        ) from exc


def _hub_cause(exc: BaseException, kinds: tuple[type[BaseException], ...]):
    """The first exception of one of `kinds` in `exc`'s chain of causes, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
