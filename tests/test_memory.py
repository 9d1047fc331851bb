"""The memory preflight: parameter counts from configs alone, and the fit/no-fit verdicts.

Every model here is a tiny config built in the test (no download); the full-size shapes (Llama-3-8B,
Phi-3-mini) are only counted on the meta device, which is the point of the preflight.
"""

from __future__ import annotations

import json
import sys
import types

import psutil
import pytest
import torch
from model_configs import llama3_8b_config
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Phi3Config,
    PreTrainedConfig,
)
from transformers.pytorch_utils import Conv1D

from mistudio_core import memory
from mistudio_core.errors import MistudioError
from mistudio_core.memory import (
    QUANTIZATIONS,
    DeviceMemory,
    activation_bytes_per_token,
    available_devices,
    bytes_per_parameter,
    count_parameters,
    loaded_weights,
    preflight,
    sae_bytes,
    weight_bytes,
)

GIB = 2**30
SPECIAL_TOKENS = {"bos_token_id": 1, "eos_token_id": 2}


def gpt2_config() -> GPT2Config:
    return GPT2Config(
        n_layer=4, n_embd=64, n_head=4, vocab_size=1000, n_positions=128, **SPECIAL_TOKENS
    )


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=176,
        vocab_size=1000,
        tie_word_embeddings=False,
        **SPECIAL_TOKENS,
    )


def bert_config() -> BertConfig:
    return BertConfig(
        num_hidden_layers=3,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=500,
    )


def phi3_config() -> Phi3Config:
    return Phi3Config(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=1000,
        pad_token_id=0,
        **SPECIAL_TOKENS,
    )


def neox_config() -> GPTNeoXConfig:
    return GPTNeoXConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=1000,
    )


def gemma_config() -> GemmaConfig:
    return GemmaConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=128,
        vocab_size=1000,
        **SPECIAL_TOKENS,
    )


TINY_CONFIGS = [gpt2_config, llama_config, bert_config, phi3_config, neox_config, gemma_config]


def real_model(config: PreTrainedConfig) -> nn.Module:
    """The model as a loader builds it, with real weights: BERT as an encoder, the rest as LMs."""
    auto_class = AutoModel if config.model_type == "bert" else AutoModelForCausalLM
    return auto_class.from_config(config)


def real_block(model: nn.Module) -> nn.Module:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len)[0]


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def device(free_gib: float, name: str = "cpu") -> DeviceMemory:
    free = int(free_gib * GIB)
    return DeviceMemory(name=name, label="test device", free_bytes=free, total_bytes=free)


@pytest.mark.parametrize("make_config", TINY_CONFIGS, ids=lambda f: f.__name__)
def test_count_matches_the_real_model(make_config, tmp_path) -> None:
    make_config().save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    model = real_model(config)
    count = count_parameters(config)
    block = real_block(model)

    assert count.total == numel(model)
    assert count.n_layers == config.num_hidden_layers
    assert count.per_layer == numel(block)
    assert (
        count.total == count.embedding + count.n_layers * count.per_layer + count.head + count.other
    )
    quantizable = sum(
        m.weight.numel() for m in block.modules() if type(m) is nn.Linear or isinstance(m, Conv1D)
    )
    assert count.quantizable_per_layer == quantizable


def test_gpt2_head_is_tied_and_positions_count_as_embedding() -> None:
    model = real_model(gpt2_config())
    count = count_parameters(gpt2_config())

    assert count.head == 0
    assert count.embedding == numel(model.transformer.wte) + numel(model.transformer.wpe)
    assert count.other == numel(model.transformer.ln_f)


def test_llama_head_is_untied() -> None:
    config = llama_config()
    count = count_parameters(config)

    assert count.head == config.vocab_size * config.hidden_size
    assert count.embedding == config.vocab_size * config.hidden_size


def test_bert_embedding_includes_its_layernorm() -> None:
    model = real_model(bert_config())
    count = count_parameters(bert_config())

    assert count.embedding == numel(model.embeddings)
    assert count.head == 0
    assert count.other == numel(model.pooler)


def test_llama3_8b_is_counted_without_allocating() -> None:
    process = psutil.Process()
    before = process.memory_info().rss
    count = count_parameters(llama3_8b_config())
    grown = process.memory_info().rss - before

    assert count.total == 8_030_261_248
    assert count.head == count.embedding == 128256 * 4096
    assert count.n_layers == 32
    assert grown < GIB  # real fp32 weights would be 32 GB


def test_phi3_mini_shape_is_counted() -> None:
    config = Phi3Config(
        hidden_size=3072,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=8192,
        vocab_size=32064,
        tie_word_embeddings=False,
    )
    count = count_parameters(config)

    assert count.total == 3_821_079_552
    assert count.per_layer == 113_252_352


def test_partial_loading_counts_embedding_and_blocks_up_to_the_layer() -> None:
    count = count_parameters(llama_config())
    sizes = [count.up_to_layer(layer) for layer in range(count.n_layers)]

    assert sizes == [count.embedding + (layer + 1) * count.per_layer for layer in range(4)]
    assert sizes == sorted(set(sizes))
    assert sizes[-1] == count.total - count.head - count.other
    assert count.up_to_layer(None) == count.total


@pytest.mark.parametrize("layer", [-1, 4, 100])
def test_layer_out_of_range_is_a_user_error(layer: int) -> None:
    with pytest.raises(MistudioError) as caught:
        preflight(llama_config(), model_id="tiny", layer=layer, devices=[device(100)])
    assert "0 to 3" in caught.value.hint
    with pytest.raises(MistudioError):
        count_parameters(llama_config()).up_to_layer(layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantization_shrinks_bytes_per_parameter(dtype: torch.dtype) -> None:
    none, int8, nf4 = (bytes_per_parameter(q, dtype) for q in QUANTIZATIONS)

    assert none == dtype.itemsize
    assert nf4 < int8 < none
    assert nf4 == pytest.approx(0.5 + 0.127 / 8, abs=1e-4)


def test_unknown_quantization_is_a_user_error() -> None:
    with pytest.raises(MistudioError):
        bytes_per_parameter("3bit", torch.bfloat16)


def test_quantized_weights_are_smaller_but_keep_embeddings_unquantized() -> None:
    report = preflight(llama3_8b_config(), model_id="llama-3-8b", devices=[device(1000)])
    none, int8, nf4 = (e.weights_bytes for e in report.estimates)
    unquantized = report.parameters.total - 32 * report.parameters.quantizable_per_layer

    assert nf4 < int8 < none
    assert none == report.parameters.total * 2
    assert nf4 > unquantized * 2  # embeddings, head and norms stay in bf16


def test_loaded_weights_part_the_blocks_from_the_rest() -> None:
    """A split places the blocks and the rest apart: the parts must add up to the weights, the
    rest (embeddings; with the whole model also the head and final norm) unquantized."""
    params = count_parameters(llama3_8b_config())
    for quantization in QUANTIZATIONS:
        partial = loaded_weights(params, 16, quantization, torch.bfloat16)
        assert partial.n_blocks == 17
        assert partial.outside_bytes == params.embedding * 2
        assert partial.total == weight_bytes(params, 16, quantization, torch.bfloat16)
    whole = loaded_weights(params, None, "4bit", torch.bfloat16)
    assert whole.outside_bytes == (params.embedding + params.head + params.other) * 2
    assert whole.block_bytes == round(
        params.quantizable_per_layer * bytes_per_parameter("4bit", torch.bfloat16)
        + (params.per_layer - params.quantizable_per_layer) * 2
    )


def test_little_memory_fits_nothing() -> None:
    report = preflight(llama_config(), model_id="tiny", devices=[device(0.0001)])

    assert not any(e.fits for e in report.estimates)
    assert all(e.recommended_batch_tokens is None for e in report.estimates)
    assert report.recommended_quantization is None
    assert "nothing fits" in report.summary()


def test_plenty_of_memory_recommends_no_quantization() -> None:
    report = preflight(llama_config(), model_id="tiny", devices=[device(1), device(500)])

    assert report.device.free_bytes == 500 * GIB
    assert report.recommended_quantization == "none"
    assert all(e.fits and e.recommended_batch_tokens == 65536 for e in report.estimates)
    assert "recommended: none" in report.summary()


def test_only_4bit_fits_between_the_4bit_and_8bit_needs() -> None:
    config = llama3_8b_config()
    needs = {
        e.quantization: e.total_bytes
        for e in preflight(config, model_id="8b", layer=16, devices=[device(0.001)]).estimates
    }
    free = (needs["4bit"] + needs["8bit"]) // 2
    gpu = DeviceMemory("cuda:0", "test GPU", free, free)
    report = preflight(config, model_id="8b", layer=16, devices=[gpu])

    assert needs["4bit"] < needs["8bit"] < needs["none"]
    assert [e.fits for e in report.estimates] == [False, False, True]
    assert report.recommended_quantization == "4bit"


def test_a_gpu_also_needs_room_for_the_cuda_context() -> None:
    cpu_need = preflight(llama_config(), model_id="tiny", devices=[device(0.001)]).estimates[0]
    on_cpu = DeviceMemory("cpu", "RAM", cpu_need.total_bytes, cpu_need.total_bytes)
    on_gpu = DeviceMemory("cuda:0", "GPU", cpu_need.total_bytes, cpu_need.total_bytes)

    assert preflight(llama_config(), model_id="tiny", devices=[on_cpu]).estimates[0].fits
    assert not preflight(llama_config(), model_id="tiny", devices=[on_gpu]).estimates[0].fits


def test_recommended_batch_is_the_largest_power_of_two_that_fits() -> None:
    config = llama3_8b_config()
    report = preflight(config, model_id="8b", layer=16, devices=[device(25)])
    estimate = report.estimates[0]
    per_token = activation_bytes_per_token(config, 128, torch.bfloat16, logits=False)
    fixed = estimate.weights_bytes + estimate.sae_bytes

    def needed(tokens: int) -> int:
        return round((fixed + per_token * tokens) * 1.1)

    batch = estimate.recommended_batch_tokens
    assert batch is not None and batch < 65536
    assert batch & (batch - 1) == 0
    assert needed(batch) <= report.device.free_bytes < needed(2 * batch)


def test_partial_loading_needs_less_than_the_whole_model() -> None:
    report = preflight(llama3_8b_config(), model_id="8b", layer=16, devices=[device(1000)])

    for partial, full in zip(report.estimates, report.full_model_estimates, strict=True):
        assert partial.weights_bytes < full.weights_bytes
        assert partial.activations_bytes < full.activations_bytes  # no logits
        assert partial.total_bytes < full.total_bytes


def test_whole_model_estimates_are_the_estimates_without_a_layer() -> None:
    report = preflight(gpt2_config(), model_id="tiny", devices=[device(8)])

    assert report.layer is None
    assert report.estimates == report.full_model_estimates


def test_logits_are_priced_in_fp32_only_when_the_head_runs() -> None:
    config = llama_config()
    without = activation_bytes_per_token(config, 128, torch.bfloat16, logits=False)
    with_logits = activation_bytes_per_token(config, 128, torch.bfloat16, logits=True)

    assert with_logits - without == config.vocab_size * 4
    bert = preflight(bert_config(), model_id="bert", devices=[device(8)])
    assert bert.estimates[0].activations_bytes == 128 * activation_bytes_per_token(
        bert_config(), 128, torch.bfloat16, logits=False
    )


def test_sae_defaults_to_16x_expansion_with_adam_state() -> None:
    report = preflight(llama_config(), model_id="tiny", devices=[device(8)])
    d_sae = 16 * 64
    weights = 2 * 64 * d_sae + d_sae + 64

    assert report.estimates[0].sae_bytes == sae_bytes(64, d_sae) == (4 * weights + 4096 * d_sae) * 4
    smaller = preflight(llama_config(), model_id="tiny", d_sae=256, devices=[device(8)])
    assert smaller.estimates[0].sae_bytes < report.estimates[0].sae_bytes


def test_report_is_json_ready() -> None:
    report = preflight(llama_config(), model_id="tiny", layer=1, devices=[device(8)])
    data = json.loads(json.dumps(report.to_dict()))

    assert data["model_id"] == "tiny"
    assert data["architecture"] == "llama"
    assert data["layer"] == 1
    assert data["parameters"]["total"] == report.parameters.total
    assert data["device"]["name"] == "cpu"
    assert [e["quantization"] for e in data["estimates"]] == list(QUANTIZATIONS)
    assert data["recommended_quantization"] == "none"


def test_summary_fits_a_terminal() -> None:
    report = preflight(
        llama3_8b_config(), model_id="meta-llama/Meta-Llama-3-8B", layer=16, devices=[device(100)]
    )
    text = report.summary()

    assert "up to layer 16" in text
    assert "8.03B params" in text
    assert all(len(line) <= 80 for line in text.splitlines())


def test_available_devices_reports_this_machine() -> None:
    devices = available_devices()

    assert devices
    assert all(0 < d.free_bytes <= d.total_bytes for d in devices)
    assert all(d.name == "cpu" or d.name.startswith("cuda:") for d in devices)


def test_no_cuda_and_no_nvml_degrades_to_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError

    (cpu,) = available_devices()

    assert cpu.name == "cpu"
    assert cpu.label == "CPU RAM"
    assert cpu.total_bytes == psutil.virtual_memory().total


def test_failing_nvml_degrades_to_cpu(monkeypatch) -> None:
    import pynvml

    def broken() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pynvml, "nvmlInit", broken)

    assert [d.name for d in available_devices()] == ["cpu"]


def test_nvml_reports_gpus_when_torch_has_no_cuda(monkeypatch) -> None:
    gib = 2**30
    fake = types.SimpleNamespace(
        NVMLError=RuntimeError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetName=lambda handle: [b"NVIDIA H200", "NVIDIA A100"][handle],
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(
            free=(handle + 1) * 10 * gib, total=141 * gib
        ),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    devices = available_devices()

    assert [(d.name, d.label, d.free_bytes) for d in devices] == [
        ("cuda:0", "NVIDIA H200", 10 * gib),
        ("cuda:1", "NVIDIA A100", 20 * gib),
    ]
    report = preflight(llama_config(), model_id="tiny", devices=devices)
    assert report.device.name == "cuda:1"


@pytest.mark.parametrize("sizes", [{"context_size": 0}, {"d_sae": -1}])
def test_sizes_must_be_positive(sizes: dict) -> None:
    with pytest.raises(MistudioError):
        preflight(llama_config(), model_id="tiny", devices=[device(8)], **sizes)


def test_a_busy_cuda_device_falls_back(monkeypatch) -> None:
    def busy(index: int) -> tuple[int, int]:
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", busy)
    monkeypatch.setitem(sys.modules, "pynvml", None)

    assert [d.name for d in available_devices()] == ["cpu"]


def test_unbuildable_config_is_a_user_error(monkeypatch) -> None:
    def refuse(config: PreTrainedConfig) -> nn.Module:
        raise ValueError("Unrecognized configuration class")

    monkeypatch.setattr(memory.AutoModelForCausalLM, "from_config", refuse)
    monkeypatch.setattr(memory.AutoModel, "from_config", refuse)

    with pytest.raises(MistudioError):
        count_parameters(llama_config())
