"""Steering on the demo model with an SAE trained on it: the issue's checks on learned features.

The model is a real demo build (the stdlib-docstring corpus, its BPE tokenizer and the demo's
training loop, as tests/test_demo.py builds it) shrunk through `DEMO_RECIPE` to two 64-wide
layers and a 1024-token vocabulary, so it trains in seconds and still learns (held-out loss
6.9 -> 5.7 nats). A TopK SAE is trained on its corpus with `runs.train_sae` at
`layers.1.resid_post`, the last block's output, which the final norm and the unembedding read
directly: a feature's top promoted tokens are then its logit effects as `find` computes them
(`logit_effects`: W_U @ (gamma * W_dec[i]), centred for the LayerNorm).

Which feature: steering is for making a model say what it would not, so `add` is checked on the
feature, among those firing on the prompt, whose promoted tokens the model finds least likely
after the prompt. (A feature whose promoted tokens the model already predicts is a poor probe:
through the final LayerNorm, adding a large vector flattens the whole distribution, and the
already likely tokens can lose probability even though the direction favours them.) `clamp` is
checked on the feature that fires most on the baseline continuation, so there is something to
remove. Decoding is greedy, so every number here is the same on every run on one machine.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mistudio_core import demo
from mistudio_core.activations import ExtractionConfig
from mistudio_core.hooks import HookPoint
from mistudio_core.logit_effects import logit_effects, read_unembedding
from mistudio_core.models import ModelSpec, load_model
from mistudio_core.runs import TrainJob, train_sae
from mistudio_core.sae import load_sae
from mistudio_core.steer import Steering, steer
from mistudio_core.train import TrainConfig

HOOK = "layers.1.resid_post"
PROMPT = "Return the number of items in the list"
NEW_TOKENS = 12
TOP_PROMOTED = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A two-layer demo build on one thread, as in tests/test_demo.py: a model this small only
    loses time to thread hand-offs, and its weights then do not depend on the core count."""
    recipe = replace(demo.DEMO_RECIPE, n_layer=2, n_embd=64, n_head=2, vocab_size=1024,
                     context_size=64, batch_size=16, eval_contexts=16, steps=200)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setattr(demo, "DEMO_RECIPE", recipe)
        return demo.build_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def sae(model_dir, tmp_path_factory):
    """A TopK SAE (256 latents, k 8) trained on 32k tokens of the demo's held-out corpus."""
    out = tmp_path_factory.mktemp("sae") / "sae"
    train_sae(TrainJob(
        model=ModelSpec(str(model_dir)), hook=HOOK, corpus=str(demo.demo_corpus_path(model_dir)),
        out=str(out), architecture="topk", k=8, expansion=4,
        extraction=ExtractionConfig(context_size=64, batch_windows=16),
        train=TrainConfig(total_tokens=32_768, batch_tokens=512, checkpoint_every=10**6)))
    return load_sae(out)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(ModelSpec(str(model_dir), device="cpu"), with_lm_head=True)


@pytest.fixture(scope="module")
def promoted(model_dir, model, sae) -> torch.Tensor:
    """[d_sae, TOP_PROMOTED]: every feature's most promoted tokens, as find stores them."""
    unembedding = read_unembedding(ModelSpec(str(model_dir)), len(model.tokenizer))
    return logit_effects(sae.sae.W_dec.detach(), unembedding, TOP_PROMOTED)["promoted_ids"].long()


def _prompt_ids(model) -> list[int]:
    return [model.tokenizer.bos_token_id, *model.tokenizer(PROMPT, add_special_tokens=False)[
        "input_ids"]]


def _codes(model, sae, ids: list[int]) -> torch.Tensor:
    """[len(ids), d_sae]: the SAE's codes of an unsteered forward pass over `ids`."""
    hook = HookPoint.parse(HOOK)
    with torch.inference_mode():
        h = model.activations(torch.tensor([ids]), [hook])[hook][0]
        return sae.sae.encode(h.float())


def _plain_logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model.forward(torch.tensor([_prompt_ids(model)])).logits.clone()


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.modules())


def _promoted_probability(logits: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Per step: the mean probability the step's next-token distribution gives `tokens`."""
    return torch.stack([torch.softmax(row, -1)[tokens].mean() for row in logits])


def _steer(model, sae, steering: Steering, **settings):
    return steer(model, sae, PROMPT, [steering], max_new_tokens=NEW_TOKENS, temperature=0,
                 stop_at_eos=False, **settings)


def test_add_raises_the_feature_and_the_probability_of_its_promoted_tokens(model, sae,
                                                                          promoted):
    before = _plain_logits(model)
    ids = _prompt_ids(model)
    on_prompt = (_codes(model, sae, ids)[1:] > 0).any(dim=0).nonzero().flatten()
    with torch.inference_mode():
        next_token = torch.softmax(model.forward(torch.tensor([ids])).logits[0, -1], -1)
    feature = int(on_prompt[next_token[promoted[on_prompt]].mean(dim=1).argmin()])
    tokens = promoted[feature]

    raised = _steer(model, sae, Steering(feature, 4.0), keep_logits=True)
    assert raised.steerings[0].a_max_source == "prompt_norm"  # find never ran on this SAE
    steered, baseline = raised.steered, raised.baseline
    assert len(steered.logits) == len(baseline.logits) == NEW_TOKENS
    mean = torch.tensor(steered.activations).mean(), torch.tensor(baseline.activations).mean()
    assert mean[0] > mean[1] + raised.steerings[0].a_max  # the feature, on the generated tokens
    # Step by step, the probability each side gave the promoted tokens for its next token ...
    # (For SAEs of 17 seeds on three demo builds: at least 30x, and 7x the control below.)
    plus = _promoted_probability(steered.logits, tokens)
    assert (plus > 2 * _promoted_probability(baseline.logits, tokens)).all()
    # ... and it is the feature's direction that does it, not the size of the vector added:
    # through the final LayerNorm a large vector flattens the distribution, which alone lifts
    # unlikely tokens a little, but the same vector against the feature lifts them far less.
    lowered = _steer(model, sae, Steering(feature, -4.0), keep_logits=True)
    assert (plus > 2 * _promoted_probability(lowered.steered.logits, tokens)).all()
    assert lowered.baseline.token_ids == baseline.token_ids  # the same greedy baseline
    assert torch.equal(_plain_logits(model), before) and _hook_count(model) == 0


def test_clamp_to_zero_removes_the_feature_from_the_steered_pass(model, sae):
    before = _plain_logits(model)
    ids = _prompt_ids(model)
    greedy = steer(model, sae, PROMPT, [], max_new_tokens=NEW_TOKENS, temperature=0,
                   stop_at_eos=False).baseline.token_ids
    # The positions the generated tokens are predicted from: the prompt's last, then each one.
    codes = _codes(model, sae, ids + greedy)[len(ids) - 1:-1]
    feature = int(codes.mean(dim=0).argmax())

    unedited, edited, late = [], [], []
    block = model.blocks[HookPoint.parse(HOOK).layer]
    # Registered before steer's own hook: sees the steered row as the model made it.
    early = block.register_forward_hook(lambda _m, _a, out: unedited.append(_row(out, 1)))

    def watch(_side, _text, _activations):  # registered after steer's hook: sees its edit
        if not late:
            late.append(block.register_forward_hook(
                lambda _m, _a, out: edited.append(_row(out, 1))))

    try:
        result = _steer(model, sae, Steering(feature, 0.0, mode="clamp"), on_token=watch)
    finally:
        early.remove()
        for handle in late:
            handle.remove()
    assert result.baseline.token_ids == greedy
    assert max(row[0] for row in result.baseline.activations) > 0
    assert all(row == [0.0] for row in result.steered.activations)

    # The steered passes after the first (the watcher hooks in after it), one position each:
    # the clamp is exactly "f_i := 0, error term kept", h' = h - f_i * W_dec[i] ...
    h, h_clamped = torch.cat(unedited[1:]).float(), torch.cat(edited).float()
    assert len(h) == NEW_TOKENS - 1
    with torch.inference_mode():
        f = sae.sae.encode(h)
        again = sae.sae.encode(h_clamped)
    decoder = sae.sae.W_dec.detach()[feature]
    assert (f[:, feature] > 0).sum() > len(h) // 2  # the feature fired there
    torch.testing.assert_close(h_clamped, h - f[:, feature, None] * decoder, rtol=0, atol=1e-5)
    # ... and re-encoding the clamped stream finds the feature gone. Its pre-activation keeps
    # only (1 - e_i . d_i) of itself (encoder and decoder rows are not exactly aligned: e . d
    # was 0.86-0.97 for the features tried), far below what TopK keeps, so the code is 0, not
    # merely small (for the five most active features of SAEs trained with eight seeds).
    assert again[:, feature].abs().max() == 0
    assert torch.equal(_plain_logits(model), before) and _hook_count(model) == 0


def _row(output, row: int) -> torch.Tensor:
    tensor = output[0] if isinstance(output, tuple) else output
    return tensor[row].detach().clone()
