"""Evaluation metrics, checked on cases whose answer is known."""

from __future__ import annotations

import pytest
import torch

from mistudio_core.activations import ExtractionConfig
from mistudio_core.corpus import Corpus
from mistudio_core.evals import evaluate
from mistudio_core.hooks import HookPoint
from mistudio_core.models import ModelSpec, load_model
from mistudio_core.sae import SAEConfig, SparseAutoencoder

HOOK = HookPoint(1, "resid_post")


@pytest.fixture(scope="module")
def causal_model(make_tiny_model):
    return load_model(ModelSpec(str(make_tiny_model("gpt2", n_layers=3))), with_lm_head=True)


def _identity_sae(d_in: int) -> SparseAutoencoder:
    """A ReLU SAE with latents +e_i and -e_i: it reconstructs any input exactly."""
    sae = SparseAutoencoder(SAEConfig("relu", d_in, 2 * d_in))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.encoder_weight.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _zero_sae(d_in: int) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig("relu", d_in, 8))
    with torch.no_grad():
        sae.encoder_weight.zero_()
        sae.b_enc.fill_(-1.0)  # never fires
        sae.b_dec.zero_()
    return sae


def test_a_perfect_sae_recovers_all_the_loss(causal_model, tiny_corpus):
    extraction = ExtractionConfig(context_size=32, batch_windows=4)
    result = evaluate(_identity_sae(causal_model.hidden_size), causal_model,
                      Corpus.open(tiny_corpus), HOOK, extraction, n_tokens=600)
    assert result.n_tokens >= 600
    assert result.fve == pytest.approx(1.0, abs=1e-5)
    assert result.mse == pytest.approx(0.0, abs=1e-6)
    assert result.ce_with_sae == pytest.approx(result.ce_clean, abs=1e-4)
    assert result.ce_loss_recovered == pytest.approx(1.0, abs=1e-3)
    assert result.kl_divergence == pytest.approx(0.0, abs=1e-5)
    assert result.delta_lm_loss == pytest.approx(0.0, abs=1e-4)
    # Every token is the sum of d positive parts: L0 is about d (a coordinate exactly 0 is off).
    assert result.l0 == pytest.approx(causal_model.hidden_size, rel=0.01)


def test_an_sae_that_outputs_zero_is_the_zero_ablation(causal_model, tiny_corpus):
    extraction = ExtractionConfig(context_size=32, batch_windows=4)
    result = evaluate(_zero_sae(causal_model.hidden_size), causal_model,
                      Corpus.open(tiny_corpus), HOOK, extraction, n_tokens=300)
    assert result.ce_with_sae == pytest.approx(result.ce_zero_ablation, abs=1e-4)
    assert result.ce_loss_recovered == pytest.approx(0.0, abs=1e-3)
    assert result.l0 == 0 and result.dead_pct == 100.0
    assert result.fve < 0.05  # reconstructing 0 explains (almost) nothing
    assert result.density_histogram["dead"] == 8
    assert sum(result.density_histogram["counts"]) == 0


def test_fve_uses_the_mean_of_all_evaluated_tokens(causal_model, tiny_corpus):
    """Reconstructing every token as the data mean gives FVE 0 by definition."""
    extraction = ExtractionConfig(context_size=32, batch_windows=4)
    d = causal_model.hidden_size
    corpus = Corpus.open(tiny_corpus)
    probe = evaluate(_identity_sae(d), causal_model, corpus, HOOK, extraction, n_tokens=256)
    sae = _zero_sae(d)
    tokens = []
    from mistudio_core.activations import ModelActivationSource

    source = ModelActivationSource(causal_model, corpus, [HOOK], extraction)
    chunks = source.chunks()
    while sum(t.shape[0] for t in tokens) < probe.n_tokens:
        tokens.append(next(chunks).activations[HOOK])
    mean = torch.cat(tokens)[: probe.n_tokens].double().mean(0)
    with torch.no_grad():
        sae.b_dec.copy_(mean.float())
    result = evaluate(sae, causal_model, corpus, HOOK, extraction, n_tokens=256)
    assert result.n_tokens == probe.n_tokens
    assert result.fve == pytest.approx(0.0, abs=1e-4)


def test_encoder_models_get_reconstruction_metrics_only(make_tiny_model, tiny_corpus):
    bert = load_model(ModelSpec(str(make_tiny_model("bert", n_layers=2))), up_to_layer=1)
    extraction = ExtractionConfig(context_size=32, batch_windows=4)
    result = evaluate(_identity_sae(bert.hidden_size), bert, Corpus.open(tiny_corpus), HOOK,
                      extraction, n_tokens=200)
    assert result.fve == pytest.approx(1.0, abs=1e-5)
    assert result.ce_clean is None and result.ce_loss_recovered is None
