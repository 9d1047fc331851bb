"""The feature store: listing pages (sorts, searches, the scored and unscored parts), cards,
explanations and scores, feature selections, and marked example text."""

from __future__ import annotations

import numpy as np
import pytest

from mistudio_core.errors import MistudioError
from mistudio_core.feature_store import Example, FeatureStore, parse_features

D_SAE = 10
SCORED = {1: 0.5, 3: 0.9, 4: 0.1, 7: 0.5}  # feature -> rule score of its stats explanation


@pytest.fixture
def store(tmp_path):
    store = FeatureStore.create(tmp_path, {"d_sae": D_SAE})
    fired = np.arange(D_SAE) * 10
    store.write_statistics(fired, fired / 10.0, fired.astype(float), n_tokens=1000)
    store.save_explanations("stats", [(f, f"fires on \" tok{f}\"", {}) for f in range(8)])
    store.save_scores("rule", "stats", [(f, value, {}) for f, value in SCORED.items()])
    store.save_scores("rule", "other", [(2, 0.99, {})])  # of an explanation no row shows
    yield store
    store.close()


def _ids(page):
    return [row["id"] for row in page[0]]


def test_sorts_put_the_unscored_last_and_page_across_them(store):
    assert _ids(store.list("score")) == [3, 7, 1, 4, 0, 2, 5, 6, 8, 9]
    assert _ids(store.list("score", descending=False)) == [4, 1, 7, 3, 0, 2, 5, 6, 8, 9]
    pages = [_ids(store.list("score", limit=3, offset=offset)) for offset in range(0, 12, 3)]
    assert pages == [[3, 7, 1], [4, 0, 2], [5, 6, 8], [9]]
    assert _ids(store.list("density", limit=3)) == [9, 8, 7]
    assert _ids(store.list("id", limit=3)) == [0, 1, 2]
    rows, total = store.list("score", limit=1)
    assert total == D_SAE and rows[0] == {
        "id": 3, "n_fired": 30, "density": 0.03, "max_act": 3.0, "mean_act": 1.0,
        "explainer": "stats", "explanation": 'fires on " tok3"', "score": 0.9}


def test_searches_filter_by_explanation_text_or_id(store):
    assert store.list("score", search="tok7")[1] == 1
    assert _ids(store.list("id", search="7")) == [7]  # "tok7" or the id 7: the same feature
    assert _ids(store.list("id", search="tok")) == list(range(8))
    assert _ids(store.list("score", search="tok", limit=5, offset=3)) == [4, 0, 2, 5, 6]
    assert store.list("id", search="100%")[1] == 0  # LIKE's wildcards are taken literally
    with pytest.raises(MistudioError) as caught:
        store.list("loudness")
    assert caught.value.field == "sort"


def test_the_latest_explanation_is_the_one_listed(store):
    store.save_explanations("hf:tiny", [(3, "the token tok3 in code", {})])
    assert store.latest_explanations([3, 4]) == {3: "the token tok3 in code",
                                                 4: 'fires on " tok4"'}
    row = store.list("id", search="in code")[0][0]
    assert (row["id"], row["explainer"], row["score"]) == (3, "hf:tiny", None)
    assert [e["explainer"] for e in store.explanations(3)] == ["hf:tiny", "stats"]
    assert store.explained("stats") == set(range(8))
    assert store.fired_features() == list(range(1, D_SAE))


def test_a_card_has_every_part_and_an_id_out_of_range_says_so(store):
    tokens = np.full((D_SAE, 2, 3), -1, dtype=np.int32)
    tokens[3, 0] = [0, 1, 2]
    acts = np.zeros((D_SAE, 2, 3), dtype=np.float32)
    acts[3, 0] = [0.0, 3.0, 0.5]
    values = np.full((D_SAE, 2), np.nan, dtype=np.float32)
    values[3, 0] = 3.0
    store.write_vocabulary(["The", " cat", " sat"])
    store.write_examples("top", tokens, acts, values)
    ids = np.full((D_SAE, 2), -1, dtype=np.int32)
    ids[3] = [7, -1]
    store.write_neighbours("decoder", ids, np.where(ids >= 0, 0.8, np.nan))
    card = store.card(3)
    assert card["top"] == [{"tokens": ["The", " cat", " sat"], "token_ids": [0, 1, 2],
                            "acts": [0.0, 3.0, 0.5], "value": 3.0, "center": 1}]
    assert card["similar"] == [{"id": 7, "value": 0.8, "explanation": 'fires on " tok7"'}]
    assert card["scores"] == [{"scorer": "rule", "explainer": "stats", "value": 0.9,
                               "details": {}}]
    assert card["cooccurring"] == [] and card["quantiles"] == [] and card["histogram"] == {}
    with pytest.raises(MistudioError) as caught:
        store.card(D_SAE)
    assert (caught.value.code, caught.value.field) == ("not_found", "feature")


def test_a_new_find_replaces_the_old_results(store, tmp_path):
    store.close()
    fresh = FeatureStore.create(tmp_path, {"d_sae": D_SAE})
    assert fresh.list("id")[1] == 0 and fresh.explained("stats") == set()
    fresh.close()


def test_an_sae_without_features_points_at_find(tmp_path):
    with pytest.raises(MistudioError) as caught:
        FeatureStore(tmp_path)
    assert caught.value.code == "not_found" and "mistudio find" in caught.value.hint


def test_feature_selections():
    assert parse_features("0-3,7, 5", 10) == [0, 1, 2, 3, 5, 7]
    assert parse_features(None, 10) is None and parse_features("all", 10) is None
    for bad in ("5-20", "3-1", "x", "-1"):
        with pytest.raises(MistudioError) as caught:
            parse_features(bad, 10)
        assert caught.value.field == "features"


def test_marked_text_wraps_each_run_of_activating_tokens():
    example = Example([0, 1, 2, 3], ["The", " cat", " sat", "."], [0.0, 2.0, 1.0, 0.0], 2.0, 1)
    assert example.marked_text() == "The<< cat sat>>."
    assert example.marked_text(1.5, "[", "]") == "The[ cat] sat."
    assert Example([1], [" cat"], [1.0], 1.0, 0).marked_text() == "<< cat>>"
