"""Loading models and reading activations at hooks, checked against Hugging Face's own outputs.

Every model is a tiny random one built from a config and saved to a temporary directory
(`make_tiny_model` in conftest), then loaded through `load_model` as a real checkpoint would be.
The references are the `output_hidden_states` of the same checkpoint loaded by transformers
directly. The last hidden state of most architectures has the final norm applied, so the
comparisons use layers that are not the last one.
"""

from __future__ import annotations

import pytest
import torch
from model_configs import llama3_8b_config
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
)

from mistudio_core.errors import MistudioError
from mistudio_core.hooks import SITES, HookPoint, parse_hooks
from mistudio_core.models import (
    ModelSpec,
    find_blocks,
    is_causal_lm,
    load_model,
    resolve_quantization,
    truncated_config,
)

MODEL_TYPES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "phi", "phi3", "gemma2", "bert")
DECODERS = tuple(t for t in MODEL_TYPES if t != "bert")
N_LAYERS = 3
HIDDEN = 32  # conftest's tiny hidden size
ATOL = 1e-4
SITES_IN_ORDER = ("resid_pre", "attn_out", "mlp_out", "resid_post")


def all_hooks(layer: int) -> list[HookPoint]:
    return [HookPoint(layer, site) for site in SITES]


@pytest.fixture(scope="module")
def input_ids(tiny_tokenizer, tiny_documents) -> torch.Tensor:
    """Two real 12-token sequences from the corpus, [2, 12]."""
    return torch.tensor([tiny_tokenizer(d)["input_ids"][:12] for d in tiny_documents[:2]])


@pytest.fixture(scope="module")
def reference_states(make_tiny_model, input_ids):
    """`reference_states(model_type)`: HF's hidden_states of the full tiny model (cached)."""
    cache: dict[str, tuple[torch.Tensor, ...]] = {}

    def states(model_type: str) -> tuple[torch.Tensor, ...]:
        if model_type not in cache:
            directory = make_tiny_model(model_type, N_LAYERS)
            model_class = AutoModel if model_type == "bert" else AutoModelForCausalLM
            model = model_class.from_pretrained(directory, dtype=torch.float32).eval()
            with torch.no_grad():
                output = model(input_ids=input_ids, output_hidden_states=True)
            cache[model_type] = output.hidden_states
        return cache[model_type]

    return states


# --- activations against transformers' hidden states -------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_partial_model_hooks_match_hidden_states(
    model_type, make_tiny_model, reference_states, input_ids
):
    hidden_states = reference_states(model_type)
    assert len(hidden_states) == N_LAYERS + 1
    hooked = load_model(ModelSpec(str(make_tiny_model(model_type, N_LAYERS))), up_to_layer=1)

    assert hooked.model_type == model_type
    assert hooked.n_layers == N_LAYERS
    assert len(hooked.blocks) == 2
    assert hooked.hidden_size == HIDDEN
    assert hooked.dtype == torch.float32
    assert hooked.quantization == "none"
    assert not hooked.has_lm_head

    captured = hooked.activations(input_ids, [*all_hooks(0), *all_hooks(1)])
    assert set(captured) == {*all_hooks(0), *all_hooks(1)}
    for layer in (0, 1):
        resid_pre = captured[HookPoint(layer, "resid_pre")]
        resid_post = captured[HookPoint(layer, "resid_post")]
        torch.testing.assert_close(resid_pre, hidden_states[layer], atol=ATOL, rtol=0)
        torch.testing.assert_close(resid_post, hidden_states[layer + 1], atol=ATOL, rtol=0)
        for site in ("attn_out", "mlp_out"):
            update = captured[HookPoint(layer, site)]
            assert update.shape == (*input_ids.shape, HIDDEN)
            assert update.dtype == torch.float32
            assert update.abs().mean() > 0.01, f"{site} of layer {layer} is (almost) all zeros"


@pytest.mark.parametrize("model_type", DECODERS)
def test_full_causal_lm_hooks_match_hidden_states(
    model_type, make_tiny_model, reference_states, input_ids
):
    hidden_states = reference_states(model_type)
    hooked = load_model(ModelSpec(str(make_tiny_model(model_type, N_LAYERS))), with_lm_head=True)

    assert hooked.has_lm_head
    assert len(hooked.blocks) == N_LAYERS
    assert hooked.config.num_hidden_layers == N_LAYERS
    hooks = [HookPoint(0, "resid_pre"), HookPoint(1, "resid_pre"), HookPoint(1, "resid_post")]
    captured = hooked.activations(input_ids, hooks)
    torch.testing.assert_close(captured[hooks[0]], hidden_states[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(captured[hooks[1]], hidden_states[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(captured[hooks[2]], hidden_states[2], atol=ATOL, rtol=0)
    # The last block's output, before the final norm, is not the (normed) last hidden state.
    last = hooked.activations(input_ids, [HookPoint(N_LAYERS - 1, "resid_post")])
    assert last[HookPoint(N_LAYERS - 1, "resid_post")].shape == hidden_states[-1].shape


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_residual_stream_is_the_sum_of_the_updates(model_type, make_tiny_model, input_ids):
    """resid_post = resid_pre + attn_out + mlp_out, for pre-LN, parallel and post-norm blocks."""
    hooked = load_model(ModelSpec(str(make_tiny_model(model_type, N_LAYERS))), up_to_layer=1)
    captured = hooked.activations(input_ids, all_hooks(1))
    pre, attn, mlp, post = (captured[HookPoint(1, site)] for site in SITES_IN_ORDER)
    if model_type == "bert":
        # Post-LN: the block's output is LayerNorm(residual + update), not a plain sum.
        assert (pre + attn + mlp - post).abs().max() > 0.1
    else:
        torch.testing.assert_close(pre + attn + mlp, post, atol=ATOL, rtol=0)


def test_sublayer_hooks_map_to_the_modules_that_update_the_stream(make_tiny_model):
    expected = {
        "gpt2": ("attn", "mlp"),
        "gpt_neox": ("attention", "mlp"),
        "llama": ("self_attn", "mlp"),
        "phi": ("self_attn", "mlp"),
        "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
        "bert": ("attention.output.dense", "output.dense"),
    }
    for model_type, (attention, mlp) in expected.items():
        hooked = load_model(ModelSpec(str(make_tiny_model(model_type, N_LAYERS))), up_to_layer=0)
        block = hooked.blocks[0]
        assert hooked.module_for(HookPoint(0, "attn_out")) == (
            block.get_submodule(attention),
            "output",
        ), model_type
        assert hooked.module_for(HookPoint(0, "mlp_out")) == (block.get_submodule(mlp), "output")
        assert hooked.module_for(HookPoint(0, "resid_pre")) == (block, "input")
        assert hooked.module_for(HookPoint(0, "resid_post")) == (block, "output")


def test_find_blocks_is_the_longest_module_list():
    model = nn.Module()
    model.short = nn.ModuleList([nn.Linear(2, 2)])
    model.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    assert find_blocks(model) is model.layers
    with pytest.raises(MistudioError, match="layer stack"):
        find_blocks(nn.Linear(2, 2))


def test_bfloat16_dtype_alias(make_tiny_model, input_ids):
    hooked = load_model(
        ModelSpec(str(make_tiny_model("llama", N_LAYERS)), dtype="bf16"), up_to_layer=0
    )
    assert hooked.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in hooked.model.parameters())
    hook = HookPoint(0, "resid_post")
    assert hooked.activations(input_ids, [hook])[hook].dtype == torch.bfloat16


def test_tokenize_pads_a_batch(make_tiny_model, tiny_tokenizer):
    hooked = load_model(ModelSpec(str(make_tiny_model("gpt2", N_LAYERS))), up_to_layer=0)
    batch = hooked.tokenize(["A short one.", "A rather longer sentence than the first one."], 64)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 2
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    assert hooked.tokenizer.pad_token_id == tiny_tokenizer.eos_token_id


# --- replacing activations ---------------------------------------------------------------------


def test_replaced_attention_output_changes_the_stream(make_tiny_model, input_ids):
    hooked = load_model(ModelSpec(str(make_tiny_model("llama", N_LAYERS))), up_to_layer=1)
    before = hooked.activations(input_ids, all_hooks(1))
    with hooked.replaced(HookPoint(1, "attn_out"), torch.zeros_like):
        after = hooked.activations(input_ids, all_hooks(1))
    assert torch.equal(
        after[HookPoint(1, "attn_out")], torch.zeros_like(before[HookPoint(1, "attn_out")])
    )
    torch.testing.assert_close(after[HookPoint(1, "resid_pre")], before[HookPoint(1, "resid_pre")])
    torch.testing.assert_close(
        after[HookPoint(1, "resid_post")],
        after[HookPoint(1, "resid_pre")] + after[HookPoint(1, "mlp_out")],
        atol=ATOL,
        rtol=0,
    )
    assert not torch.allclose(after[HookPoint(1, "mlp_out")], before[HookPoint(1, "mlp_out")])
    # The replacement is gone once the context exits.
    again = hooked.activations(input_ids, all_hooks(1))
    assert torch.equal(again[HookPoint(1, "resid_post")], before[HookPoint(1, "resid_post")])


def test_replaced_residual_input_is_what_the_block_sees(make_tiny_model, input_ids):
    hooked = load_model(ModelSpec(str(make_tiny_model("gpt2", N_LAYERS))), with_lm_head=True)
    hook = HookPoint(1, "resid_pre")
    before = hooked.activations(input_ids, [hook])[hook]
    with hooked.replaced(hook, lambda x: x + 1.0):
        after = hooked.activations(input_ids, [hook])[hook]
        logits = hooked.model(input_ids=input_ids).logits
    torch.testing.assert_close(after, before + 1.0)
    with torch.no_grad():
        plain_logits = hooked.model(input_ids=input_ids).logits
    assert not torch.allclose(logits, plain_logits)


# --- partial loading -----------------------------------------------------------------------------


def _n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_partial_loading_materialises_only_the_needed_blocks(make_tiny_model):
    directory = str(make_tiny_model("llama", 4))
    partial = load_model(ModelSpec(directory), up_to_layer=1)
    full = load_model(ModelSpec(directory))

    assert len(partial.blocks) == 2
    assert len(full.blocks) == 4
    assert partial.n_layers == full.n_layers == 4
    assert partial.config.num_hidden_layers == 2
    per_block = _n_parameters(full.blocks[0])
    assert _n_parameters(partial.model) == _n_parameters(full.model) - 2 * per_block
    assert not any(".2." in name or ".3." in name for name, _ in partial.model.named_parameters())
    # The loaded blocks hold the checkpoint's weights, not fresh random ones.
    for mine, theirs in zip(partial.blocks.parameters(), full.blocks[:2].parameters(), strict=True):
        assert torch.equal(mine, theirs)
    with pytest.raises(MistudioError, match="past the last loaded layer"):
        partial.module_for(HookPoint(2, "resid_post"))


def test_forward_stops_after_the_deepest_hook(make_tiny_model, input_ids):
    hooked = load_model(ModelSpec(str(make_tiny_model("llama", 4))), with_lm_head=True)
    calls: list[str] = []
    watched = {
        "block 2": hooked.blocks[2],
        "final norm": hooked.model.model.norm,
        "lm head": hooked.model.lm_head,
        "block 1 mlp": hooked.blocks[1].mlp,
        "block 1 attention": hooked.blocks[1].self_attn,
    }
    handles = [
        module.register_forward_hook(lambda *_args, name=name: calls.append(name))
        for name, module in watched.items()
    ]
    try:
        captured = hooked.activations(
            input_ids, [HookPoint(0, "resid_post"), HookPoint(1, "attn_out")]
        )
        assert set(captured) == {HookPoint(0, "resid_post"), HookPoint(1, "attn_out")}
        assert calls == ["block 1 attention"]
        calls.clear()
        with torch.no_grad():
            hooked.model(input_ids=input_ids)
        assert set(calls) == set(watched)
    finally:
        for handle in handles:
            handle.remove()


def test_truncated_config_cuts_per_layer_lists():
    config = Gemma2Config(num_hidden_layers=4)
    cut = truncated_config(config, 2)
    assert cut.num_hidden_layers == 2
    assert cut.layer_types == config.layer_types[:2]
    assert config.num_hidden_layers == 4 and len(config.layer_types) == 4


def test_partial_gemma2_keeps_its_attention_pattern(make_tiny_model, reference_states, input_ids):
    """Layer 1 of gemma2 is full attention and layer 0 sliding: the cut config must keep that."""
    hooked = load_model(ModelSpec(str(make_tiny_model("gemma2", N_LAYERS))), up_to_layer=1)
    assert hooked.config.layer_types == ["sliding_attention", "full_attention"]
    hook = HookPoint(1, "resid_post")
    captured = hooked.activations(input_ids, [hook])
    torch.testing.assert_close(captured[hook], reference_states("gemma2")[2], atol=ATOL, rtol=0)


def test_is_causal_lm():
    assert is_causal_lm(GPT2Config())
    assert is_causal_lm(LlamaConfig())
    assert not is_causal_lm(BertConfig())
    assert is_causal_lm(BertConfig(is_decoder=True))


# --- quantization --------------------------------------------------------------------------------


def _relative_error(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approximate.float() - exact).norm() / exact.norm())


def test_4bit_quantization_on_cpu(make_tiny_model, input_ids):
    bnb = pytest.importorskip("bitsandbytes")
    directory = str(make_tiny_model("llama", N_LAYERS))
    exact = load_model(ModelSpec(directory), up_to_layer=1)
    quantized = load_model(ModelSpec(directory, quantization="4bit"), up_to_layer=1)

    assert quantized.quantization == "4bit"
    settings = quantized.model.config.quantization_config
    assert settings.load_in_4bit and not settings.load_in_8bit
    assert settings.bnb_4bit_quant_type == "nf4"
    assert settings.bnb_4bit_use_double_quant
    assert settings.bnb_4bit_compute_dtype == torch.float32

    linears = {
        name: module
        for name, module in quantized.model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of the two blocks
    exact_modules = dict(exact.model.named_modules())
    for name, module in linears.items():
        state = module.weight.quant_state
        assert state.quant_type == "nf4"
        assert state.nested  # double quantization: the absmax scales are quantized too
        assert module.weight.dtype == torch.uint8
        restored = bnb.functional.dequantize_4bit(module.weight.data, state)
        original = exact_modules[name].weight
        # NF4 of Gaussian weights with 64-blocks: about 9% relative error per matrix.
        assert _relative_error(restored, original) < 0.12, name

    hooks = [HookPoint(0, "attn_out"), HookPoint(0, "resid_post"), HookPoint(1, "resid_post")]
    reference = exact.activations(input_ids, hooks)
    approximate = quantized.activations(input_ids, hooks)
    for hook in hooks:
        assert approximate[hook].shape == reference[hook].shape
        # The per-matrix error compounds through a few random (wide-init) matmuls.
        assert _relative_error(approximate[hook], reference[hook]) < 0.35, hook
        cosine = nn.functional.cosine_similarity(approximate[hook].float(), reference[hook], dim=-1)
        assert cosine.mean() > 0.93, hook
    assert _relative_error(approximate[hooks[0]], reference[hooks[0]]) > 0.01  # really quantized


def test_8bit_quantization_on_cpu(make_tiny_model, input_ids):
    bnb = pytest.importorskip("bitsandbytes")
    directory = str(make_tiny_model("gpt2", N_LAYERS))
    exact = load_model(ModelSpec(directory), up_to_layer=1)
    try:
        quantized = load_model(ModelSpec(directory, quantization="8bit"), up_to_layer=1)
        hook = HookPoint(1, "resid_post")
        approximate = quantized.activations(input_ids, [hook])[hook]
    except (MistudioError, RuntimeError, NotImplementedError) as exc:  # pragma: no cover
        pytest.skip(f"bitsandbytes 8-bit does not run on this CPU: {exc}")
    assert quantized.quantization == "8bit"
    assert quantized.model.config.quantization_config.load_in_8bit
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in quantized.model.modules())
    reference = exact.activations(input_ids, [hook])[hook]
    assert 0.001 < _relative_error(approximate, reference) < 0.1


def test_auto_quantization_depends_on_size(make_tiny_model):
    directory = str(make_tiny_model("llama", N_LAYERS))
    hooked = load_model(ModelSpec(directory, quantization="auto"), up_to_layer=0)
    assert hooked.quantization == "none"
    assert not any("bitsandbytes" in type(m).__module__ for m in hooked.model.modules())
    eight_b = llama3_8b_config()
    assert resolve_quantization(ModelSpec("x", quantization="auto"), eight_b) == "4bit"
    assert resolve_quantization(ModelSpec("x", quantization="none"), eight_b) == "none"


# --- errors --------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """No hub access at all: the env variable and the already-imported constant."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_missing_local_directory(offline):
    with pytest.raises(MistudioError, match="does not exist") as caught:
        load_model(ModelSpec("./no/such/dir"))
    assert "pythia" in caught.value.hint


def test_invalid_hub_id_is_an_error(offline):
    with pytest.raises(MistudioError) as caught:
        load_model(ModelSpec("not a valid id!!"))
    assert caught.value.code == "model_not_found"
    assert "not a valid id!!" in caught.value.message
    assert caught.value.hint


def test_invalid_hub_id_is_explained(offline):
    with pytest.raises(MistudioError, match="neither a local model directory nor a valid hub id"):
        load_model(ModelSpec("not a valid id!!"))


def test_unreachable_hub_id_is_an_error(offline):
    with pytest.raises(MistudioError) as caught:
        load_model(ModelSpec("someone/nothing-here"))
    assert caught.value.code == "model_not_found"
    assert "someone/nothing-here" in caught.value.message
    assert "connect" in caught.value.message or "fetch" in caught.value.message


def test_unreachable_hub_id_is_explained(offline):
    with pytest.raises(MistudioError, match="cannot fetch someone/nothing-here") as caught:
        load_model(ModelSpec("someone/nothing-here"))
    assert "demo" in caught.value.hint


@pytest.mark.parametrize("layer", [N_LAYERS, 7, -1])
def test_layer_out_of_range(make_tiny_model, layer):
    with pytest.raises(MistudioError, match=f"layer {layer} does not exist") as caught:
        load_model(ModelSpec(str(make_tiny_model("gpt2", N_LAYERS))), up_to_layer=layer)
    assert caught.value.hint == f"pick a layer from 0 to {N_LAYERS - 1}"


@pytest.mark.parametrize(
    "name", ["layers.1.foo", "layer.1.resid_post", "layers.x.resid_post", "layers.1", ""]
)
def test_unknown_hook_name(name):
    with pytest.raises(MistudioError, match="unknown hook") as caught:
        HookPoint.parse(name)
    assert "resid_post" in caught.value.hint


def test_parse_hooks_keeps_order_without_repeats():
    hooks = parse_hooks("layers.2.mlp_out, layers.0.resid_pre,layers.2.mlp_out")
    assert hooks == [HookPoint(2, "mlp_out"), HookPoint(0, "resid_pre")]
    assert str(hooks[0]) == "layers.2.mlp_out"
    with pytest.raises(MistudioError, match="no hook"):
        parse_hooks([])


def test_bert_has_no_lm_head_for_evals(make_tiny_model):
    with pytest.raises(MistudioError, match="not a causal language model"):
        load_model(ModelSpec(str(make_tiny_model("bert", N_LAYERS))), with_lm_head=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_device_without_gpu(make_tiny_model):
    with pytest.raises(MistudioError, match="no usable CUDA GPU"):
        load_model(ModelSpec(str(make_tiny_model("gpt2", N_LAYERS)), device="cuda:0"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dtype", "float64", "unknown dtype"),
        ("dtype", "int8", "unknown dtype"),
        ("quantization", "3bit", "unknown quantization"),
        ("device", "banana", "unknown device"),
    ],
)
def test_unknown_settings(make_tiny_model, field, value, message):
    spec = ModelSpec(str(make_tiny_model("gpt2", N_LAYERS)), **{field: value})
    with pytest.raises(MistudioError, match=message) as caught:
        load_model(spec, up_to_layer=0)
    assert caught.value.hint
