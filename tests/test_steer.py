"""Steer: add and clamp edits on a tiny GPT-2, the same-seed baseline, hooks always removed,
and a clear error (with the field at fault) for every bad input.

The SAEs are built by hand: ReLU, unit decoder rows, encoder = decoder (so a feature's
pre-activation is the dot product of `h` with its decoder row), zero biases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mistudio_core.errors import MistudioError
from mistudio_core.feature_store import FeatureStore
from mistudio_core.models import ModelSpec, load_model
from mistudio_core.sae import SAEConfig, SAEMetadata, SparseAutoencoder, load_sae, save_sae
from mistudio_core.steer import Steering, steer

D_SAE = 16
PROMPT = "The cat watched the blue window"
FEATURE = 3


def _save_sae(directory, d_in: int = 32, hook: str = "layers.1.resid_post",
              context_size: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    decoder = torch.randn(D_SAE, d_in, generator=generator)
    decoder /= decoder.norm(dim=1, keepdim=True)
    sae = SparseAutoencoder(SAEConfig("relu", d_in, D_SAE))
    with torch.no_grad():
        sae.W_dec.copy_(decoder)
        sae.encoder_weight.copy_(decoder)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    metadata = SAEMetadata(model_name="tiny", hook_name=hook, context_size=context_size)
    return save_sae(sae, directory, metadata, {})


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return load_model(ModelSpec(str(make_tiny_model("gpt2", n_layers=3)), device="cpu"),
                      with_lm_head=True)


@pytest.fixture(scope="module")
def sae(tmp_path_factory):
    return load_sae(_save_sae(tmp_path_factory.mktemp("sae") / "sae"))


@pytest.fixture(scope="module")
def last_layer_sae(tmp_path_factory):
    return load_sae(_save_sae(tmp_path_factory.mktemp("sae") / "sae2", hook="layers.2.resid_post"))


def _plain_logits(model) -> torch.Tensor:
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        return model.forward(ids).logits.clone()


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.modules())


def _mean(rows: list[list[float]], column: int = 0) -> float:
    return float(np.mean([row[column] for row in rows]))


def test_add_raises_the_feature_and_its_promoted_tokens(model, sae, last_layer_sae):
    result = steer(model, sae, PROMPT, [Steering(FEATURE, 2.0)], max_new_tokens=12,
                   stop_at_eos=False)
    assert len(result.baseline.token_ids) == len(result.steered.token_ids) == 12
    assert result.steerings[0].a_max_source == "prompt_norm"  # find never ran
    assert result.steerings[0].a_max > 0
    # The steered feature fires much more on the steered side, on every generated token.
    steered, baseline = result.steered.activations, result.baseline.activations
    assert all(s[0] > b[0] + result.steerings[0].a_max for s, b in
               zip(steered, baseline, strict=True))

    # At the last layer, the tokens the direction promotes through ln_f and the unembedding
    # become far more likely than in the baseline, at every step.
    direction = last_layer_sae.sae.W_dec[FEATURE].detach()
    unembedding = model.model.get_output_embeddings().weight.detach()
    ln_f = model.model.transformer.ln_f
    promoted = (unembedding @ ((direction - direction.mean()) * ln_f.weight)).topk(5).indices
    result = steer(model, last_layer_sae, PROMPT, [Steering(FEATURE, 4.0)], max_new_tokens=8,
                   stop_at_eos=False, keep_logits=True)

    def promoted_mass(logits: list[torch.Tensor]) -> np.ndarray:
        return np.array([float(torch.log_softmax(row, -1)[promoted].logsumexp(0))
                         for row in logits])

    steered_mass = promoted_mass(result.steered.logits)
    baseline_mass = promoted_mass(result.baseline.logits)
    assert (steered_mass > baseline_mass + 1.0).all()
    assert _mean(result.steered.activations) > _mean(result.baseline.activations)


def test_prompt_norm_a_max_comes_from_the_first_pass_unedited(model, sae):
    """The default a_max is the prompt's mean ||h|| at the hook before any edit, measured in the
    generation's first pass: the first token streams after one forward pass."""
    from mistudio_core.hooks import HookPoint

    passes: list[int] = []
    handle = model.model.register_forward_pre_hook(lambda *_: passes.append(1))
    at_first_token: list[int] = []
    try:
        result = steer(model, sae, PROMPT, [Steering(FEATURE, 3.0)], max_new_tokens=3,
                       stop_at_eos=False,
                       on_token=lambda *_: at_first_token.append(len(passes)))
    finally:
        handle.remove()
    assert at_first_token[0] == 1 and len(passes) == 3
    hook = HookPoint.parse("layers.1.resid_post")
    ids = model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    bos = [model.tokenizer.bos_token_id] if model.tokenizer.bos_token_id is not None else []
    h = model.activations(torch.tensor([bos + ids]), [hook])[hook][0, len(bos):].float()
    steering = result.steerings[0]
    assert steering.a_max_source == "prompt_norm"
    assert steering.a_max == pytest.approx(float(h.norm(dim=-1).mean()), rel=1e-5)
    cancelled = steer(model, sae, PROMPT, [Steering(FEATURE, 3.0)], cancelled=lambda: True)
    assert cancelled.cancelled and cancelled.steerings[0].a_max_source == "prompt_norm"
    assert cancelled.steerings[0].a_max is None  # no pass ran to measure it


def test_add_uses_finds_max_activation(model, sae, tmp_path):
    directory = _save_sae(tmp_path / "sae")
    store = FeatureStore.create(directory, {"d_sae": D_SAE})
    store.write_statistics(np.ones(D_SAE), np.full(D_SAE, 2.5), np.ones(D_SAE), 100)
    store.close()
    result = steer(model, load_sae(directory), PROMPT,
                   [Steering(FEATURE, 1.0), Steering(5, 1.0, a_max=7.0)], max_new_tokens=2)
    assert [(s.a_max, s.a_max_source) for s in result.steerings] == [(2.5, "find"),
                                                                       (7.0, "given")]


def test_add_writes_what_the_feature_writes_at_a_max(model, tmp_path):
    """Decoder rows that are not unit-norm (as after miStudio folds its input scaling in): s = 1
    adds exactly a_max * W_dec[i], the feature's own contribution at its max; the prompt-norm
    default adds a vector as long as the prompt's mean ||h||, reported in feature units."""
    from mistudio_core.hooks import HookPoint

    loaded = load_sae(_save_sae(tmp_path / "sae"))
    with torch.no_grad():
        loaded.sae.W_dec.mul_(0.25)
    hook = HookPoint.parse("layers.1.resid_post")
    added: list[torch.Tensor] = []

    def record(h: torch.Tensor) -> torch.Tensor:  # inside steer's edit: sees the edited rows
        added.append((h[1] - h[0]).float())
        return h

    row = loaded.sae.W_dec[FEATURE].detach().float()
    with model.replaced(HookPoint(2, "resid_pre"), record):
        given = steer(model, loaded, PROMPT, [Steering(FEATURE, 2.0, a_max=3.0)],
                      max_new_tokens=1)
    assert given.steerings[0].a_max == 3.0
    assert torch.allclose(added[0], (2.0 * 3.0 * row).expand_as(added[0]), atol=1e-4)

    added.clear()
    with model.replaced(HookPoint(2, "resid_pre"), record):
        default = steer(model, loaded, PROMPT, [Steering(FEATURE, 1.0)], max_new_tokens=1)
    ids = model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    bos = [model.tokenizer.bos_token_id]  # the SAE was trained with BOS; its norm is left out
    h = model.activations(torch.tensor([bos + ids]), [hook])[hook][0, 1:].float()
    mean_norm = float(h.norm(dim=-1).mean())
    assert float(added[0][0].norm()) == pytest.approx(mean_norm, rel=1e-4)
    assert default.steerings[0].a_max == pytest.approx(mean_norm / float(row.norm()), rel=1e-4)


def test_clamp_to_zero_removes_the_feature_on_the_steered_pass(model, sae):
    baseline = steer(model, sae, PROMPT, [], max_new_tokens=10, stop_at_eos=False,
                     temperature=0)
    block = model.blocks[1]
    fired = [i for i in range(D_SAE)
             if max(_codes_of(model, sae, baseline.baseline.token_ids, i)) > 0]
    feature = fired[0]
    seen: list[torch.Tensor] = []
    handles = []

    def watch(side: str, _text: str, _activations: list[float]) -> None:
        # Registered after steer's own hook, so it sees the block's edited output.
        if not handles:
            handles.append(block.register_forward_hook(
                lambda _m, _a, out: seen.append(_first(out)[1].detach().clone())))

    try:
        result = steer(model, sae, PROMPT, [Steering(feature, 0.0, mode="clamp")],
                       max_new_tokens=10, stop_at_eos=False, on_token=watch)
    finally:
        for handle in handles:
            handle.remove()
    assert all(row == [0.0] for row in result.steered.activations)
    assert max(row[0] for row in result.baseline.activations) > 0
    assert len(seen) == 9
    codes = sae.sae.encode(torch.cat(seen).float())[:, feature]
    assert codes.abs().max() < 1e-5  # re-encoding the steered stream: the feature is gone
    other = fired[1]
    assert sae.sae.encode(torch.cat(seen).float())[:, other].max() > 0  # the others are not


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _codes_of(model, sae, token_ids: list[int], feature: int) -> list[float]:
    from mistudio_core.hooks import HookPoint

    hook = HookPoint.parse("layers.1.resid_post")
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"] + token_ids])
    h = model.activations(ids, [hook])[hook][0]
    return sae.sae.encode(h.float())[:, feature].tolist()


def test_same_seed_same_baseline_and_zero_strength_changes_nothing(model, sae):
    settings = {"max_new_tokens": 15, "seed": 7, "stop_at_eos": False, "top_k": 50}
    first = steer(model, sae, PROMPT, [Steering(FEATURE, 0.0)], **settings)
    second = steer(model, sae, PROMPT, [Steering(FEATURE, 3.0)], **settings)
    assert first.baseline.token_ids == second.baseline.token_ids
    assert first.baseline.text == second.baseline.text
    assert first.steered.token_ids == first.baseline.token_ids
    # Equal up to float rounding: the two sides run as the two rows of one batch.
    np.testing.assert_allclose(first.steered.activations, first.baseline.activations,
                               rtol=1e-5, atol=1e-6)
    assert second.steered.token_ids != second.baseline.token_ids
    other = steer(model, sae, PROMPT, [Steering(FEATURE, 0.0)], **{**settings, "seed": 8})
    assert other.baseline.token_ids != first.baseline.token_ids


def test_tokens_stream_side_by_side(model, sae):
    events = []
    result = steer(model, sae, PROMPT, [Steering(FEATURE, 1.0, from_prompt_end=True)],
                   max_new_tokens=5, stop_at_eos=False,
                   on_token=lambda side, text, acts: events.append((side, text, acts)))
    assert [side for side, _, _ in events] == ["baseline", "steered"] * 5
    assert [text for side, text, _ in events if side == "steered"] == result.steered.tokens
    assert "".join(result.steered.tokens) == result.steered.text
    assert result.to_dict()["features"] == ["3"]


def test_hooks_are_removed_after_success_errors_and_interrupts(model, sae):
    before = _plain_logits(model)
    hooks_before = _hook_count(model)
    steer(model, sae, PROMPT, [Steering(FEATURE, 5.0), Steering(2, 1.0, mode="clamp")],
          max_new_tokens=4)
    assert torch.equal(_plain_logits(model), before)

    def fail(side, _text, _acts):
        if side == "steered":
            raise RuntimeError("the client went away")

    with pytest.raises(RuntimeError, match="went away"):
        steer(model, sae, PROMPT, [Steering(FEATURE, 5.0)], max_new_tokens=4, on_token=fail)
    assert torch.equal(_plain_logits(model), before)

    def interrupt(_side, _text, _acts):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        steer(model, sae, PROMPT, [Steering(FEATURE, 5.0)], max_new_tokens=4, on_token=interrupt)
    assert torch.equal(_plain_logits(model), before)
    assert _hook_count(model) == hooks_before == 0

    calls = []
    result = steer(model, sae, PROMPT, [Steering(FEATURE, 5.0)], max_new_tokens=10,
                   stop_at_eos=False, cancelled=lambda: calls.append(1) or len(calls) > 3)
    assert result.cancelled and len(result.steered.token_ids) == 3
    assert _hook_count(model) == 0


@pytest.mark.parametrize(("change", "field"), [
    ({"feature": D_SAE}, "feature"),
    ({"feature": -1}, "feature"),
    ({"feature": 1.5}, "feature"),
    ({"strength": math.nan}, "strength"),
    ({"strength": math.inf}, "strength"),
    ({"strength": "strong"}, "strength"),
    ({"mode": "multiply"}, "mode"),
    ({"sae": "other"}, "sae"),
    ({"a_max": -1.0}, "a_max"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "the cat " * 40}, "prompt"),  # over the SAE's context of 64
    ({"max_new_tokens": 120}, "max_new_tokens"),  # over the model's 128 positions
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": 0}, "top_k"),
])
def test_bad_input_names_the_field(model, sae, change, field):
    steering = {k: v for k, v in change.items() if k in ("feature", "strength", "mode", "sae",
                                                          "a_max")}
    settings = {k: v for k, v in change.items() if k not in steering}
    prompt = settings.pop("prompt", PROMPT)
    with pytest.raises(MistudioError) as error:
        steer(model, {"main": sae}, prompt, [Steering(**{"feature": FEATURE, "strength": 1.0,
                                                          **steering})], **settings)
    assert error.value.field == field
    assert error.value.hint
    assert _hook_count(model) == 0


def test_sae_that_does_not_fit_the_model(model, sae, tmp_path):
    narrow = load_sae(_save_sae(tmp_path / "narrow", d_in=16))
    deep = load_sae(_save_sae(tmp_path / "deep", hook="layers.7.resid_post"))
    for loaded, words in ((narrow, "16-wide"), (deep, "layers.7")):
        with pytest.raises(MistudioError, match=words) as error:
            steer(model, loaded, PROMPT, [Steering(FEATURE, 1.0)])
        assert error.value.field == "sae"
    with pytest.raises(MistudioError) as error:  # two SAEs: the steering must name one
        steer(model, [sae, sae], PROMPT, [Steering(FEATURE, 1.0)])
    assert error.value.field == "sae"
    # The session stays usable after the errors.
    result = steer(model, [sae, sae], PROMPT, [Steering(FEATURE, 1.0, sae=1)], max_new_tokens=2)
    assert result.features == ["1/3"]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_greedy_baseline_is_the_models_own_greedy_generation(make_tiny_model, tmp_path,
                                                             model_type):
    """The token-by-token loop with the KV cache generates what `model.generate` does."""
    hooked = load_model(ModelSpec(str(make_tiny_model(model_type, n_layers=2)), device="cpu"),
                        with_lm_head=True)
    loaded = load_sae(_save_sae(tmp_path / "sae"))
    result = steer(hooked, loaded, PROMPT, [Steering(FEATURE, 8.0)], max_new_tokens=10,
                   temperature=0, stop_at_eos=False)
    ids = [hooked.tokenizer.bos_token_id, *hooked.tokenizer(PROMPT, add_special_tokens=False)[
        "input_ids"]]
    with torch.no_grad():
        expected = hooked.model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                         min_new_tokens=10, pad_token_id=0)
    assert result.baseline.token_ids == expected[0, len(ids):].tolist()
    assert result.steered.token_ids != result.baseline.token_ids
