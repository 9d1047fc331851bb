"""Models larger than one GPU: the preflight's split plan and the loader's device map.

No GPU is needed: the plans are made for fake `DeviceMemory` lists (a 70B-class model is counted
on the meta device, as the preflight always does), and `load_model`'s multi-GPU path is followed
up to `from_pretrained`, whose arguments are captured. The device maps themselves are checked
against the real models (every parameter placed) and loaded for real with every GPU replaced
by the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from accelerate import init_empty_weights
from accelerate.utils.modeling import check_device_map
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
)

from mistudio_core import memory
from mistudio_core.errors import MistudioError
from mistudio_core.hooks import HookPoint
from mistudio_core.memory import (
    CUDA_CONTEXT_BYTES,
    SAFETY_MARGIN,
    DeviceMemory,
    activation_bytes_per_token,
    auto_placement,
    check_memory,
    loaded_weights,
    preflight,
    sae_bytes,
)
from mistudio_core.models import ModelSpec, load_model, split_device_map, truncated_config

GIB = 2**30


def llama_70b_config() -> LlamaConfig:
    """Llama-3-70B's shape (70.6B parameters), built locally."""
    return LlamaConfig(
        num_hidden_layers=80,
        hidden_size=8192,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    )


def gpus(*free_gib: float) -> list[DeviceMemory]:
    return [
        DeviceMemory(f"cuda:{index}", "test GPU", int(free * GIB), int(free * GIB))
        for index, free in enumerate(free_gib)
    ]


def check_plan(estimate, devices: list[DeviceMemory], n_blocks: int) -> None:
    """The split's invariants: every loaded block placed once, in order, GPU after GPU; the
    GPUs' weights add up to the model's; no GPU asked for more than it has free."""
    split = estimate.split
    assert split is not None
    shares = split.shares
    assert [s.device for s in shares] == [d.name for d in devices[: len(shares)]]
    assert sum(s.weights_bytes for s in shares) == estimate.weights_bytes
    assert sum(s.n_layers for s in shares) == n_blocks
    assert [s.first_layer for s in shares] == [
        sum(s.n_layers for s in shares[:i]) for i in range(len(shares))
    ]
    free = {d.name: d.free_bytes for d in devices}
    assert all(s.total_bytes <= free[s.device] == s.free_bytes for s in shares)
    assert all(s.n_layers > 0 for s in shares[1:])  # a GPU holding nothing is not used
    assert split.block_gpus() == [i for i, s in enumerate(shares) for _ in range(s.n_layers)]


# --- the plan -------------------------------------------------------------------------------------


def test_70b_in_4bit_fits_split_over_two_gpus_but_not_on_one() -> None:
    devices = gpus(47, 47)  # two 48 GB cards
    report = preflight(llama_70b_config(), model_id="70b", devices=devices)
    none, int8, nf4 = report.estimates

    assert not nf4.fits  # 36.8 GiB of weights and a 34 GiB SAE: not on one 48 GB card
    check_plan(nf4, devices, 80)
    first, second = nf4.split.shares
    assert 0 < first.n_layers < second.n_layers  # the first GPU also holds the SAE
    assert none.split is None and int8.split is None  # 131 and 68 GiB: not even split
    assert report.recommended_quantization is None
    assert report.recommended_split == "4bit"
    assert [g.name for g in report.gpus] == ["cuda:0", "cuda:1"]


def test_each_gpu_is_priced_like_one_device_for_its_own_part() -> None:
    """A share's need: its weights, the activations of the plan's batch (the logits where the
    head is), the SAE on the first GPU, plus the margin and the CUDA context."""
    config, devices = llama_70b_config(), gpus(47, 47)
    estimate = preflight(config, model_id="70b", devices=devices).estimate_for("4bit")
    split = estimate.split
    tokens = split.recommended_batch_tokens
    block_acts = activation_bytes_per_token(config, 128, torch.bfloat16, logits=False)
    with_logits = activation_bytes_per_token(config, 128, torch.bfloat16, logits=True)
    sae = sae_bytes(8192, 16 * 8192)

    def need(payload: int) -> int:
        return round(payload * (1 + SAFETY_MARGIN)) + CUDA_CONTEXT_BYTES

    first, second = split.shares
    assert first.total_bytes == need(first.weights_bytes + tokens * with_logits + sae)
    assert second.total_bytes == need(second.weights_bytes + tokens * block_acts)
    assert tokens & (tokens - 1) == 0 and 128 <= tokens <= 65536


def test_the_plan_keeps_room_for_the_largest_batch_that_fits() -> None:
    """The first GPU bounds the batch (the SAE, the embeddings and the logits are there): more
    room on it buys a larger batch, another GPU behind it does not."""

    def batch(*free_gib: float) -> int:
        report = preflight(llama_70b_config(), model_id="70b", devices=gpus(*free_gib))
        return report.estimate_for("4bit").split.recommended_batch_tokens

    assert batch(47, 47) < 65536
    assert batch(60, 47) > batch(47, 47) == batch(47, 47, 47)


def test_bf16_70b_needs_more_than_two_80gb_gpus() -> None:
    two = preflight(llama_70b_config(), model_id="70b", devices=gpus(79, 79))
    four = preflight(llama_70b_config(), model_id="70b", devices=gpus(79, 79, 79, 79))

    assert two.estimate_for("none").split is None
    check_plan(four.estimate_for("none"), gpus(79, 79, 79, 79), 80)
    assert four.recommended_quantization == "4bit"  # fits on one: no split recommended
    assert four.recommended_split is None


def test_partial_loading_splits_only_the_blocks_it_loads() -> None:
    config = llama_70b_config()
    params = memory.count_parameters(config)
    devices = gpus(30, 30)
    report = preflight(config, model_id="70b", layer=39, d_sae=4 * 8192, devices=devices)
    estimate = report.estimate_for("8bit")  # 40 blocks of 8-bit (34 GiB), a 9 GiB SAE

    check_plan(estimate, devices, 40)
    first = estimate.split.shares[0]
    block = loaded_weights(params, 39, "8bit", torch.bfloat16).block_bytes
    assert first.weights_bytes == params.embedding * 2 + first.n_layers * block  # no head
    assert report.full_model_estimates[1].split is None  # the whole model would not fit


def test_a_model_too_big_for_every_gpu_together_is_said_so() -> None:
    report = preflight(llama_70b_config(), model_id="70b", devices=gpus(23, 23))
    text = report.summary()

    assert all(e.split is None for e in report.estimates)
    assert report.recommended_split is None
    assert "too big for 2 GPUs" in text
    assert "nothing fits" in text and "more GPUs" in text


def test_one_gpu_or_the_cpu_is_never_split() -> None:
    for devices in (gpus(20), [DeviceMemory("cpu", "RAM", 20 * GIB, 20 * GIB)]):
        report = preflight(llama_70b_config(), model_id="70b", devices=devices)
        assert all(e.split is None for e in report.estimates)


def test_summary_shows_the_split_gpu_by_gpu_in_80_columns() -> None:
    report = preflight(llama_70b_config(), model_id="meta-llama/Llama-3.3-70B",
                       layer=60, devices=gpus(79, 79, 79))
    lines = report.summary().splitlines()
    split = report.estimate_for("none").split

    assert all(len(line) <= 80 for line in lines)
    assert any("none" in line and "split, batch" in line for line in lines)
    for share in split.shares:
        layers = f"layers {share.first_layer}-{share.first_layer + share.n_layers - 1}"
        assert any(share.device in line and layers in line for line in lines)


def test_check_memory_json_adds_the_split_and_keeps_its_fields(tmp_path) -> None:
    llama_70b_config().save_pretrained(tmp_path)
    document = check_memory(ModelSpec(str(tmp_path)), quantization="4bit", devices=gpus(47, 47))
    data = json.loads(json.dumps(document))

    for key in ("model_id", "architecture", "n_layers", "hidden_size", "parameters", "layer",
                "device", "estimates", "full_model_estimates", "recommended_quantization",
                "summary"):
        assert key in data
    assert data["asked"] == {"quantization": "4bit", "fits": False, "fits_split": True}
    assert data["recommended_split"] == "4bit"
    assert [g["name"] for g in data["gpus"]] == ["cuda:0", "cuda:1"]
    split = data["estimates"][2]["split"]
    assert [s["device"] for s in split["shares"]] == ["cuda:0", "cuda:1"]
    assert sum(s["n_layers"] for s in split["shares"]) == 80
    assert data["estimates"][0]["split"] is None


# --- the loader's placement decision --------------------------------------------------------------


def test_auto_placement_reads_the_other_gpus_only_when_the_first_is_too_small(monkeypatch):
    config, read = llama_70b_config(), []
    fake = gpus(60, 60)  # 4-bit up to layer 20 fits on one, the whole model (78 GiB) not

    def torch_gpu(index: int) -> DeviceMemory:
        read.append(index)
        return fake[index]

    monkeypatch.setattr(memory, "_torch_gpu", torch_gpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    assert auto_placement(config, layer=20, quantization="4bit", dtype=torch.bfloat16) is None
    assert read == [0]
    read.clear()
    plan = auto_placement(config, layer=None, quantization="4bit", dtype=torch.bfloat16)
    assert read == [0, 1]
    assert plan.main_gpu == 0 and set(plan.block_gpus()) == {0, 1}


def test_auto_placement_refuses_what_fits_nowhere_with_a_hint() -> None:
    with pytest.raises(MistudioError) as caught:
        auto_placement(llama_70b_config(), layer=None, quantization="none", dtype=torch.bfloat16,
                       gpus=gpus(79, 79))
    error = caught.value
    assert error.code == "out_of_memory"
    assert "2 GPUs" in error.message
    assert "4bit" in error.hint and "layer" in error.hint and "more GPUs" in error.hint


# --- the device map -------------------------------------------------------------------------------


def _tiny(model_type: str):
    shapes = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
              "intermediate_size": 64, "vocab_size": 100}
    if model_type == "gpt2":
        return GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=100, bos_token_id=0,
                          eos_token_id=0)
    if model_type == "bert":
        return BertConfig(**shapes)
    return LlamaConfig(**shapes, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.mark.parametrize(
    ("model_type", "model_class", "blocks"),
    [
        ("llama", AutoModel, "layers"),
        ("llama", AutoModelForCausalLM, "model.layers"),
        ("gpt2", AutoModelForCausalLM, "transformer.h"),
        ("bert", AutoModel, "encoder.layer"),
    ],
)
def test_split_device_map_places_every_parameter(model_type, model_class, blocks) -> None:
    config = _tiny(model_type)
    device_map = split_device_map(model_class, config, [2, 3, 3], 2)
    with init_empty_weights():
        empty = model_class.from_config(config)

    check_device_map(empty, device_map)  # raises if a parameter is left out
    assert [device_map[f"{blocks}.{i}"] for i in range(3)] == [2, 3, 3]
    others = {name: gpu for name, gpu in device_map.items() if not name.startswith(blocks)}
    assert others and set(others.values()) == {2}


def test_a_tied_head_stays_with_the_embeddings() -> None:
    device_map = split_device_map(AutoModelForCausalLM, _tiny("llama"), [0, 1, 1], 0)

    assert device_map["lm_head"] == device_map["model.embed_tokens"] == 0


def test_from_pretrained_loads_by_the_split_map(make_tiny_model, tiny_tokenizer, tmp_path):
    """transformers places the model by the map's keys and accelerate dispatches it (and refuses
    a map that leaves a parameter out). Without GPUs the first one is played by the CPU and the
    second by disk offload, which runs those blocks through the same device hooks."""
    directory = make_tiny_model("llama", 3)
    config = AutoConfig.from_pretrained(directory)
    device_map = split_device_map(AutoModelForCausalLM, config, [0, 1, 1], 0)
    stand_in = {name: "cpu" if gpu == 0 else "disk" for name, gpu in device_map.items()}
    placed = AutoModelForCausalLM.from_pretrained(
        directory, device_map=stand_in, offload_folder=tmp_path
    ).eval()
    whole = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.tensor([tiny_tokenizer("the cat watched the river")["input_ids"]])

    assert placed.hf_device_map == stand_in
    with torch.no_grad():
        torch.testing.assert_close(placed(ids).logits, whole(ids).logits)


class _Captured(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by the fake from_pretrained, with its arguments, to stop the load there."""

    def __init__(self, kwargs: dict) -> None:
        super().__init__("captured")
        self.kwargs = kwargs


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """A machine with two GPUs as far as load_model can tell: `set_free(bytes0, bytes1)` sets
    their free memory; returns (set_free, reads), `reads` the GPU indexes whose memory was read.
    from_pretrained raises `_Captured` with its keyword arguments."""
    free: list[DeviceMemory] = []
    reads: list[int] = []

    def set_free(*free_bytes: int) -> None:
        free[:] = [DeviceMemory(f"cuda:{i}", "fake GPU", b, b) for i, b in enumerate(free_bytes)]

    def torch_gpu(index: int) -> DeviceMemory:
        reads.append(index)
        return free[index]

    def from_pretrained(_source, **kwargs):
        raise _Captured(kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(memory, "_torch_gpu", torch_gpu)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", from_pretrained)
    return set_free, reads


def _captured_load(spec: ModelSpec, **options) -> dict:
    with pytest.raises(_Captured) as caught:
        load_model(spec, **options)
    return caught.value.kwargs


def _one_gpu_need(directory, layer: int) -> int:
    """What the 4-bit tiny model up to `layer` needs on one GPU, by the preflight."""
    gpu = DeviceMemory("cuda:0", "big", 2**40, 2**40)
    report = preflight(AutoConfig.from_pretrained(directory), model_id="tiny", layer=layer,
                       devices=[gpu])
    return report.estimate_for("4bit").total_bytes


def test_load_model_spreads_a_model_too_big_for_the_first_gpu(make_tiny_model, two_fake_gpus):
    set_free, reads = two_fake_gpus
    directory = make_tiny_model("llama", 3)
    set_free(_one_gpu_need(directory, 1) - 1, 2**40)  # one block short on the first GPU

    kwargs = _captured_load(ModelSpec(str(directory), quantization="4bit"), up_to_layer=1)

    assert kwargs["device_map"] == {
        "embed_tokens": 0, "norm": 0, "rotary_emb": 0, "layers.0": 0, "layers.1": 1,
    }
    assert kwargs["config"].num_hidden_layers == 2  # partial loading, split
    assert kwargs["quantization_config"].load_in_4bit
    assert kwargs["dtype"] == torch.bfloat16
    assert reads == [0, 1]


def test_load_model_keeps_a_model_that_fits_on_the_first_gpu(make_tiny_model, two_fake_gpus):
    set_free, reads = two_fake_gpus
    directory = make_tiny_model("llama", 3)
    set_free(_one_gpu_need(directory, 1), 0)

    kwargs = _captured_load(ModelSpec(str(directory), quantization="4bit"), up_to_layer=1)

    assert kwargs["device_map"] == {"": 0}
    assert reads == [0]  # the second GPU was never opened


def test_load_model_never_splits_a_model_given_a_device(make_tiny_model, two_fake_gpus):
    set_free, reads = two_fake_gpus
    set_free(0, 0)

    kwargs = _captured_load(ModelSpec(str(make_tiny_model("llama", 3)), quantization="4bit",
                                      device="cuda:1"), up_to_layer=1)

    assert kwargs["device_map"] == {"": 1}
    assert reads == []


def test_load_model_refuses_a_model_that_fits_nowhere(make_tiny_model, two_fake_gpus):
    set_free, _ = two_fake_gpus
    set_free(2**20, 2**20)

    with pytest.raises(MistudioError, match="even split") as caught:
        load_model(ModelSpec(str(make_tiny_model("llama", 3))), up_to_layer=1)
    assert caught.value.code == "out_of_memory"


def test_truncated_split_map_matches_the_loaded_blocks(make_tiny_model) -> None:
    config = truncated_config(AutoConfig.from_pretrained(make_tiny_model("llama", 3)), 2)

    assert set(split_device_map(AutoModel, config, [0, 1], 0)) == {
        "embed_tokens", "norm", "rotary_emb", "layers.0", "layers.1",
    }


# --- activations on the model's device ------------------------------------------------------------


def test_a_hook_hands_the_activation_over_on_the_model_device(make_tiny_model) -> None:
    """A split model runs block i on its own GPU; `replace` (an SAE, a capture) still sees the
    activation on the model's device, and the block goes on with its own tensor. The meta
    device stands in for the first GPU."""
    hooked = load_model(ModelSpec(str(make_tiny_model("gpt2", 3)), device="cpu"), up_to_layer=1)
    block = hooked.blocks[1]
    hidden = torch.randn(2, 5, 32)
    expected = block(hidden)
    hooked.device = torch.device("meta")
    seen: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        seen.append(tensor)
        return tensor

    with hooked.replaced(HookPoint(1, "resid_post"), keep), \
            hooked.replaced(HookPoint(1, "resid_pre"), keep):
        output = block(hidden)

    assert [t.device.type for t in seen] == ["meta", "meta"]
    assert [t.shape for t in seen] == [hidden.shape, expected.shape]
    assert output.device.type == "cpu"
    torch.testing.assert_close(output, expected)
