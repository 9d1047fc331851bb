"""Correlate: decoder-cosine neighbours, the explanation index and search, features on a text.

The SAEs are built by hand so every expectation can be checked on paper: decoder rows with
known cosines, and an SAE on a tiny Llama's token embeddings (`layers.0.resid_pre`) whose
feature 0 fires on exactly one token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sae_builders import save_relu_sae

from mistudio_core.correlate import (
    CorrelateConfig,
    correlate_features,
    decoder_neighbours,
    features_on_text,
)
from mistudio_core.errors import MistudioError
from mistudio_core.explanation_index import search_explanations
from mistudio_core.feature_store import FeatureStore
from mistudio_core.models import ModelSpec, load_model

NEAR_COSINE = 0.95
TEXT = "The cat watched the cat after lunch."


def _save_sae(directory, decoder: torch.Tensor, encoder: torch.Tensor | None = None,
              b_enc: torch.Tensor | None = None, context_size: int = 32):
    return save_relu_sae(directory, decoder, encoder, b_enc, context_size=context_size)


def _known_cosines_decoder() -> torch.Tensor:
    """Feature 1 = 3 x feature 0 (cosine 1), feature 2 at cosine 0.95 to both, feature 3
    orthogonal to all three."""
    decoder = torch.zeros(4, 8)
    decoder[0, 0] = 1.0
    decoder[1, 0] = 3.0
    decoder[2, 0], decoder[2, 1] = NEAR_COSINE, math.sqrt(1 - NEAR_COSINE**2)
    decoder[3, 2] = 0.5
    return decoder


@pytest.fixture
def sae_dir(tmp_path):
    directory = _save_sae(tmp_path / "sae", _known_cosines_decoder())
    FeatureStore.create(directory, {"d_sae": 4}).close()
    return directory


def _explain(directory, explainer: str, rows: dict[int, str], age: float = 0.0) -> None:
    """Save explanations as if made `age` seconds ago (so which is newest is not left to the
    clock's resolution)."""
    store = FeatureStore(directory)
    store.save_explanations(explainer, [(f, text, {}) for f, text in rows.items()])
    with store.db:
        store.db.execute("UPDATE explanations SET created_at = created_at - ? "
                         "WHERE explainer = ?", (age, explainer))
    store.close()


def test_decoder_neighbours_are_exact_cosines_without_self_matches(sae_dir):
    logs = []
    result = correlate_features(sae_dir, CorrelateConfig(neighbours=10),
                                lambda kind, payload: logs.append((kind, payload)))
    store = FeatureStore(sae_dir)
    ids, values = np.array(store.array("decoder_ids")), np.array(store.array("decoder_values"))
    assert ids.shape == values.shape == (4, 10)
    assert ids[0, :3].tolist() == [1, 2, 3]
    np.testing.assert_allclose(values[0, :3], [1.0, NEAR_COSINE, 0.0], atol=1e-5)
    assert ids[1, :3].tolist() == [0, 2, 3]
    np.testing.assert_allclose(values[1, :3], [1.0, NEAR_COSINE, 0.0], atol=1e-5)
    assert sorted(ids[2, :2].tolist()) == [0, 1] and ids[2, 2] == 3
    assert sorted(ids[3, :3].tolist()) == [0, 1, 2]
    np.testing.assert_allclose(values[3, :3], 0.0, atol=1e-6)
    assert all(feature not in ids[feature] for feature in range(4))
    assert (ids[:, 3:] == -1).all() and np.isnan(values[:, 3:]).all()
    assert [n["id"] for n in store.neighbours(0, "decoder")] == [1, 2, 3]
    assert result["decoder_neighbours"] == 10
    assert result["near_duplicates"] == 3  # 0, 1 and 2 each have one; 3 has none
    assert result["median_nearest_cosine"] == pytest.approx((1.0 + NEAR_COSINE) / 2, abs=1e-4)
    assert "3 features have a near-duplicate" in result["summary"]
    messages = " ".join(p["message"] for kind, p in logs if kind == "log")
    assert "co-occurrence" in messages and "mistudio explain" in messages
    progress = [p for kind, p in logs if kind == "progress"]
    assert progress[-1] == {"done": 4, "total": 4}


def test_blocked_search_equals_brute_force():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    reported = []
    ids, cosines = decoder_neighbours(rows, 5, reported.append, block=7)
    similarity = rows @ rows.T
    np.fill_diagonal(similarity, -np.inf)
    expected = np.argsort(-similarity, axis=1)[:, :5]
    assert ids.tolist() == expected.tolist()
    np.testing.assert_allclose(cosines, np.take_along_axis(similarity, expected, 1), atol=1e-5)
    assert reported == [7, 14, 21, 28, 35, 42, 49, 50]


def test_search_finds_the_newest_explanation_by_meaning(sae_dir):
    _explain(sae_dir, "stats", {0: "closing brackets in code", 1: "the word cat and other cats",
                                2: "numbers and digits", 3: "cats sitting on mats"}, age=100)
    _explain(sae_dir, "hf:tiny", {3: "dates in calendars"})
    result = correlate_features(sae_dir, CorrelateConfig(neighbours=2))
    assert result["explanations_indexed"] == 4
    store = FeatureStore(sae_dir)
    assert store.meta["explanation_index"] == {"embedder": "hashing", "dimensions": 512,
                                               "count": 4}
    hits = search_explanations(sae_dir, "cat")
    assert hits[0] == {"id": 1, "score": hits[0]["score"],
                       "explanation": "the word cat and other cats"}
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
    assert 0 < hits[0]["score"] <= 1.0 and len(hits) == 4
    calendar = search_explanations(sae_dir, "calendar", limit=1)
    assert calendar == [{"id": 3, "score": calendar[0]["score"],
                         "explanation": "dates in calendars"}]


def test_search_before_correlate_says_what_to_run(sae_dir):
    with pytest.raises(MistudioError, match="no explanation index") as no_explanations:
        search_explanations(sae_dir, "cat")
    assert "mistudio explain" in no_explanations.value.hint
    _explain(sae_dir, "stats", {0: "cats"})
    with pytest.raises(MistudioError) as not_correlated:
        search_explanations(sae_dir, "cat")
    assert not_correlated.value.hint.startswith("run `mistudio correlate")


def test_correlate_needs_found_features(tmp_path):
    directory = _save_sae(tmp_path / "sae", _known_cosines_decoder())
    with pytest.raises(MistudioError, match="no features found"):
        correlate_features(directory)


@pytest.fixture
def llama_dir(make_tiny_model) -> str:
    return str(make_tiny_model("llama", 1))


def _one_token_sae(directory, llama_dir: str, target: int):
    """Feature 0 reads the target token's embedding, with its bias halfway between that
    token's score and the best other token's, so it fires on that token only; feature 1 fires
    on every token at 0.01; features 2 and 3 never fire."""
    hooked = load_model(ModelSpec(llama_dir), up_to_layer=0)
    embeddings = hooked.model.get_input_embeddings().weight.detach().float()
    scores = embeddings @ embeddings[target]
    own = float(scores[target])
    best_other = float(torch.cat([scores[:target], scores[target + 1:]]).max())
    margin = (own - best_other) / 2
    assert margin > 0.01  # feature 0 outranks feature 1 where it fires
    encoder = torch.zeros(4, embeddings.shape[1])
    encoder[0] = embeddings[target]
    b_enc = torch.tensor([-(own + best_other) / 2, 0.01, -1.0, -1.0])
    decoder = torch.randn(4, embeddings.shape[1], generator=torch.Generator().manual_seed(0))
    return _save_sae(directory, decoder, encoder, b_enc), margin


def test_features_on_text_fire_exactly_on_their_token(tmp_path, llama_dir, tiny_tokenizer):
    text_ids = tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    target = text_ids[1]
    on_target = [token == target for token in text_ids]
    assert 2 <= sum(on_target) < len(text_ids)
    directory, margin = _one_token_sae(tmp_path / "sae", llama_dir, target)
    FeatureStore.create(directory, {"d_sae": 4}).close()
    _explain(directory, "stats", {0: "the token c"})

    result = features_on_text(directory, ModelSpec(llama_dir), TEXT, top=3)

    assert [t["token"] for t in result["tokens"]] == [tiny_tokenizer.decode([i])
                                                      for i in text_ids]  # BOS left out
    for token, fires in zip(result["tokens"], on_target, strict=True):
        ids = [f["id"] for f in token["features"]]
        if fires:
            assert ids == [0, 1]
            assert token["features"][0] == {"id": 0, "activation": pytest.approx(margin, abs=1e-3),
                                            "explanation": "the token c"}
        else:
            assert ids == [1]
        assert token["features"][-1]["activation"] == pytest.approx(0.01)
    assert [(f["id"], f["tokens_fired"]) for f in result["overall"]] == [
        (0, sum(on_target)), (1, len(text_ids))]
    assert result["overall"][1]["explanation"] is None
    assert result["summary"].startswith(f"{len(text_ids)} tokens, 2 distinct features fired")


def test_features_on_text_refuses_a_model_of_another_width(tmp_path, llama_dir):
    directory = _save_sae(tmp_path / "sae", torch.randn(4, 16))
    with pytest.raises(MistudioError, match="16-wide activations") as error:
        features_on_text(directory, ModelSpec(llama_dir), TEXT)
    assert error.value.field == "model"


def test_features_on_text_refuses_a_text_longer_than_the_context(tmp_path, llama_dir):
    directory = _save_sae(tmp_path / "sae", torch.randn(4, 32), context_size=8)
    with pytest.raises(MistudioError, match="trained on contexts of 8") as error:
        features_on_text(directory, ModelSpec(llama_dir), TEXT)
    assert error.value.field == "text"
