"""The scorers, on a hand-made feature store whose right answers can be worked out by hand.

Five features share one vocabulary. Features 0, 1, 2 and 4 fire with activation 1.0 on every
" cat" token and nowhere else; feature 3 has no held-out activating examples; feature 5 has no
explanation. Their `stats` explanations: 0 names " cat" in its rule, 1 names " dog" (wrong),
2 has no rule but quotes " cat" in its text, 4 names nothing.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mistudio_core.errors import MistudioError
from mistudio_core.explain import TokenRule
from mistudio_core.feature_store import PAD_TOKEN, FeatureStore
from mistudio_core.score import (
    Vocabulary,
    distribution,
    held_out_examples,
    pearson,
    roc_auc,
    rule_predictions,
    score_features,
)

VOCAB = ["The", " cat", " sat", " on", " the", " mat", ".", " A", " dog", " ran", " away",
         " big", " tree", " grew", " tall"]
WIDTH = 8
PAD = None
ACTIVATING = [  # the held-out quantile examples of the cat features
    ["The", " cat", " sat", " on", " the", " mat", ".", PAD],
    [PAD, PAD, "The", " big", " cat", " ran", " away", "."],
    [" the", " cat", " sat", ".", "The", " cat", " ran", "."],
    ["The", " tree", " grew", " tall", ".", "The", " cat", " sat"],
]
TOP = [  # what the explanations were written from: other spans than the held-out ones
    ["The", " cat", " ran", ".", PAD, PAD, PAD, PAD],
    [" A", " big", " cat", " sat", ".", PAD, PAD, PAD],
]
NEGATIVE = [  # no " cat", and (for the hashing embedder) no character n-gram of "cat"
    [" A", " dog", " ran", " away", ".", PAD, PAD, PAD],
    ["The", " big", " dog", " ran", ".", PAD, PAD, PAD],
    ["The", " tree", " grew", " tall", ".", PAD, PAD, PAD],
]
N_POSITIONS = 44  # non-padding tokens of the 7 examples above
N_CAT = 5
QUANTILE_SLOTS = 10
CAT_FEATURES = (0, 1, 2, 4)
EXPLANATIONS = [
    (0, 'fires on " cat" (100%)', {"rule": {"tokens": {" cat": 1.0}, "previous": {}}}),
    (1, 'fires on " dog" (100%)', {"rule": {"tokens": {" dog": 1.0}, "previous": {}}}),
    (2, 'the word " cat" in a sentence', {}),
    (3, 'fires on " cat" (100%)', {"rule": {"tokens": {" cat": 1.0}, "previous": {}}}),
    (4, "something vague", {}),
]


def _example_set(rows: list[list[str | None]], slots: int, features: tuple[int, ...],
                 d_sae: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens = np.full((d_sae, slots, WIDTH), PAD_TOKEN, dtype=np.int32)
    acts = np.zeros((d_sae, slots, WIDTH), dtype=np.float32)
    values = np.full((d_sae, slots), np.nan, dtype=np.float32)
    for feature in features:
        for slot, row in enumerate(rows):
            tokens[feature, slot] = [PAD_TOKEN if t is None else VOCAB.index(t) for t in row]
            acts[feature, slot] = [1.0 if t == " cat" else 0.0 for t in row]
            values[feature, slot] = acts[feature, slot].max()
    return tokens, acts, values


@pytest.fixture
def sae_dir(tmp_path):
    d_sae = 6
    store = FeatureStore.create(tmp_path, {"d_sae": d_sae, "per_quantile": 1})
    store.write_vocabulary(VOCAB)
    fired = np.array([N_CAT if f in CAT_FEATURES else 0 for f in range(d_sae)])
    store.write_statistics(fired, (fired > 0).astype(float), fired.astype(float), n_tokens=1000)
    store.write_examples("top", *_example_set(TOP, 2, CAT_FEATURES, d_sae))
    store.write_examples("quantile",
                         *_example_set(ACTIVATING, QUANTILE_SLOTS, CAT_FEATURES, d_sae))
    store.write_examples("negative", *_example_set(NEGATIVE, 3, (*CAT_FEATURES, 3), d_sae))
    store.save_explanations("stats", EXPLANATIONS)
    store.close()
    return tmp_path


def _score(sae_dir, feature: int, scorer: str = "rule", explainer: str = "stats") -> dict:
    store = FeatureStore(sae_dir)
    try:
        return next(s for s in store.scores(feature)
                    if s["scorer"] == scorer and s["explainer"] == explainer)
    finally:
        store.close()


# ----- statistics -------------------------------------------------------------------------------


def test_roc_auc_by_hand_with_ties():
    # positives 0.5 and 0.9, negatives 0.5 and 0.2: pairs won 1 + 1 + 1 and one tie (a half)
    assert roc_auc([0.5, 0.5, 0.2, 0.9], [True, False, False, True]) == 0.875
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert roc_auc([0.3, 0.3, 0.3], [True, False, True]) == 0.5
    assert roc_auc([0.9, 0.1], [False, True]) == 0.0
    assert roc_auc([0.1, 0.2], [True, True]) is None


def test_pearson_exact_and_constant_cases():
    x = np.array([0.0, 1.0, 0.0, 1.0, 0.0])
    assert pearson(x, x) == (1.0, None)
    assert pearson(x, -x) == (-1.0, None)
    assert pearson(np.zeros(5), x) == (0.0, "prediction")
    assert pearson(x, np.ones(5)) == (0.0, "activations")


def test_distribution_numbers_by_hand():
    numbers = distribution([0.5, None, 0.1, 0.4, 0.2, 0.3])
    assert numbers["count"] == 5
    for key, expected in {"mean": 0.3, "median": 0.3, "p25": 0.2, "p75": 0.4, "min": 0.1,
                          "max": 0.5}.items():
        assert numbers[key] == pytest.approx(expected, abs=1e-12), key
    assert distribution([None])["count"] == 0


# ----- the rule scorer --------------------------------------------------------------------------


def test_rule_scores_a_right_rule_a_wrong_rule_and_a_quoted_token(sae_dir):
    events = []
    result = score_features(sae_dir, "rule", callback=lambda kind, payload:
                            events.append((kind, payload)))
    right = _score(sae_dir, 0)
    assert right["value"] == 1.0  # predictions equal the activations token for token
    assert right["details"] == {"pearson_r": 1.0, "precision": 1.0, "recall": 1.0,
                                "n_positions": N_POSITIONS, "n_activating": N_CAT}

    wrong = _score(sae_dir, 1)
    # binary vectors of 44 positions: 2 predicted (the dogs), 5 true, none in common
    expected = (0 - 2 * 5) / np.sqrt((44 * 2 - 2**2) * (44 * 5 - 5**2))
    assert wrong["value"] == pytest.approx(expected, abs=1e-9)
    assert wrong["value"] < 0
    assert wrong["details"]["recall"] == 0.0
    assert wrong["details"]["precision"] == 0.0

    quoted = _score(sae_dir, 2)  # no rule in the details: the quoted " cat" is the rule
    assert quoted["value"] == 1.0

    assert _score(sae_dir, 3)["value"] is None
    assert _score(sae_dir, 3)["details"] == {"reason": "no held-out activating examples"}
    assert _score(sae_dir, 4)["value"] is None
    assert "error" in _score(sae_dir, 4)["details"]

    assert result["failed"] == [4]
    assert (result["scored"], result["new"]) == (5, 5)
    assert score_features(sae_dir, "rule")["new"] == 1  # only the failed feature is retried
    assert result["distribution"]["count"] == 3
    assert result["distribution"]["max"] == 1.0
    assert ("progress", {"done": 5, "total": 5}) in events


@pytest.mark.parametrize("rule", [
    TokenRule({" cat": 1.0, "the": 0.4}),
    TokenRule({" cat": 1.0, "the": 0.4}, {" the": 0.5, "\n": 0.2}),
    TokenRule({"cat": 0.7}, {" ": 1.0}),
    TokenRule({"\n": 1.0}),
    TokenRule({" owl": 1.0}),
])
def test_rule_predictions_equal_simulating_every_token(rule):
    texts = ["cat", " cat", " Cat", "\n", " ", " the", "the", "The", " dog", "\ncat "]
    rng = np.random.default_rng(0)
    token_ids = rng.integers(-1, len(texts), size=(40, 12)).astype(np.int32)
    token_ids[:, :2] = np.where(rng.random((40, 2)) < 0.5, PAD_TOKEN, token_ids[:, :2])
    vocabulary = Vocabulary(texts)
    expected = [rule.simulate([texts[i] if i >= 0 else "" for i in row])
                for row in token_ids.tolist()]
    assert rule_predictions(rule, token_ids, vocabulary).tolist() == expected


def test_rule_that_predicts_nothing_gets_zero_and_says_why(tmp_path):
    store = FeatureStore.create(tmp_path, {"d_sae": 1, "per_quantile": 1})
    store.write_vocabulary(VOCAB)
    store.write_statistics(np.array([N_CAT]), np.ones(1), np.full(1, 5.0), n_tokens=100)
    store.write_examples("quantile", *_example_set(ACTIVATING, 4, (0,), 1))
    store.write_examples("negative", *_example_set(NEGATIVE, 3, (0,), 1))
    store.save_explanations("stats", [(0, 'fires on " tall" after " big"',
                                       {"rule": {"tokens": {" tall": 1.0},
                                                 "previous": {" big": 1.0}}})])
    store.close()
    score_features(tmp_path, "rule")
    score = _score(tmp_path, 0)
    assert score["value"] == 0.0
    assert score["details"]["constant"] == "prediction"
    assert score["details"]["precision"] is None
    assert score["details"]["recall"] == 0.0


def test_scoring_resumes_and_overwrites(sae_dir):
    first = score_features(sae_dir, "rule", features=[0, 5])  # 5 has no explanation: left out
    assert (first["scored"], first["new"]) == (1, 1)
    second = score_features(sae_dir, "rule")
    assert (second["scored"], second["new"]) == (5, 4)
    assert score_features(sae_dir, "rule")["new"] == 1  # feature 4 failed: tried again
    assert score_features(sae_dir, "rule", overwrite=True)["new"] == 5
    assert score_features(sae_dir, " embedding : hashing ", features=[0])["scorer"] == \
        "embedding:hashing"


def test_summary_covers_every_stored_score(sae_dir):
    store = FeatureStore(sae_dir)
    store.save_scores("rule", "stats", [(f, v, {}) for f, v in
                                        zip(range(5), [0.5, 0.1, 0.4, 0.2, 0.3], strict=True)])
    store.close()
    result = score_features(sae_dir, "rule")
    assert result["new"] == 0
    assert result["summary"].splitlines()[0] == (
        "rule scores of 5 stats explanations: median r 0.30 (IQR 0.20-0.40), mean 0.30")
    assert result["distribution"]["min"] == 0.1


def test_user_mistakes_are_explained(sae_dir):
    for scorer in ("bogus", "embedding:", "embedding", "rule:x"):
        with pytest.raises(MistudioError) as caught:
            score_features(sae_dir, scorer)
        assert caught.value.field == "scorer"
    with pytest.raises(MistudioError) as caught:
        score_features(sae_dir, "detection")
    assert caught.value.field == "llm"
    with pytest.raises(MistudioError) as caught:
        score_features(sae_dir, "rule", explainer="hf:some-model")
    assert "mistudio explain" in caught.value.hint
    with pytest.raises(MistudioError) as caught:
        score_features(sae_dir, "rule", features=[5])
    assert caught.value.field == "features"
    with pytest.raises(MistudioError):
        score_features(sae_dir, "rule", features=[99])
    with pytest.raises(MistudioError):
        score_features(sae_dir.parent / "nowhere", "rule")


# ----- the embedding scorer ---------------------------------------------------------------------


def test_hashing_embedding_separates_texts_that_share_the_explanations_words(sae_dir):
    store = FeatureStore(sae_dir)
    store.save_explanations("words", [(0, "cat", {})])
    store.close()
    result = score_features(sae_dir, "embedding:hashing", explainer="words")
    score = _score(sae_dir, 0, "embedding:hashing", "words")
    assert score["value"] == 1.0
    assert score["details"]["n_activating"] == 4
    assert score["details"]["n_negative"] == 3
    assert score["details"]["mean_similarity_negative"] == 0.0
    assert result["summary"].startswith("embedding:hashing scores of 1 words explanations: "
                                        "median AUC 1.00")


def test_embedding_with_a_tiny_transformer(sae_dir, make_tiny_model):
    model = make_tiny_model("bert", n_layers=1)
    scorer = f"embedding:{model}"
    result = score_features(sae_dir, scorer, features=[0, 1], device="cpu")
    assert result["new"] == 2
    for feature in (0, 1):
        value = _score(sae_dir, feature, scorer)["value"]
        assert 0.0 <= value <= 1.0


# ----- the LLM scorers --------------------------------------------------------------------------


class FakeChat:
    """A chat backend that answers from the prompt with `answer(user_message)`."""

    name = "fake"

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls = 0

    def chat(self, messages, max_tokens=256, temperature=0.0):
        self.calls += 1
        return self.answer(messages[1]["content"])  # the question, not the retry reminders


def _excerpts(prompt: str) -> list[str]:
    return re.findall(r"^Example \d+: (.*)$", prompt, flags=re.MULTILINE)


def _detects_cats(prompt: str) -> str:
    return "Looking at each one.\n" + json.dumps([int("cat" in e) for e in _excerpts(prompt)])


def _checks_cat_highlights(prompt: str) -> str:
    verdicts = []
    for excerpt in _excerpts(prompt):
        marked = re.findall(r"<<(.*?)>>", excerpt)
        verdicts.append(int(bool(marked) and all(m == " cat" for m in marked)))
    return json.dumps(verdicts)


def _says_yes(prompt: str) -> str:
    return json.dumps([1] * len(_excerpts(prompt)))


def _rambles(prompt: str) -> str:
    return "It is hard to say."


def _tokens(prompt: str) -> list[str]:
    return [json.loads(t) for t in re.findall(r"^\d+: (\".*\")$", prompt, flags=re.MULTILINE)]


def _simulates_cats(prompt: str) -> str:
    return json.dumps([10 if t == " cat" else 0 for t in _tokens(prompt)])


def _simulates_cats_in_lines(prompt: str) -> str:
    return "\n".join(f"{i}: {10 if t == ' cat' else 0}" for i, t in enumerate(_tokens(prompt)))


@pytest.mark.parametrize(("scorer", "answer", "expected"), [
    ("detection", _detects_cats, 1.0),
    ("detection", _says_yes, 0.5),
    ("fuzzing", _checks_cat_highlights, 1.0),
    ("fuzzing", _says_yes, 0.5),
])
def test_detection_and_fuzzing_balanced_accuracy(sae_dir, scorer, answer, expected):
    result = score_features(sae_dir, scorer, features=[0, 3], llm=FakeChat(answer))
    score = _score(sae_dir, 0, scorer)
    assert score["value"] == expected
    details = score["details"]
    assert details["true_positives"] + details["false_negatives"] == 4
    assert details["true_negatives"] + details["false_positives"] == 3
    assert details["unparsed"] == 0
    assert _score(sae_dir, 3, scorer)["details"] == {"reason": "no held-out activating examples"}
    assert result["failed"] == []


def test_fuzzing_highlights_activating_tokens_and_random_ones_elsewhere(sae_dir):
    prompts = []
    score_features(sae_dir, "fuzzing", features=[0],
                   llm=FakeChat(lambda p: prompts.append(p) or _says_yes(p)))
    excerpts = _excerpts(prompts[0])
    cats = [e for e in excerpts if "cat" in e]
    dogs = [e for e in excerpts if "cat" not in e]
    assert sorted(cats) == sorted(["The<< cat>> sat on the mat.",
                                   "The big<< cat>> ran away.",
                                   " the<< cat>> sat.The<< cat>> ran.",
                                   "The tree grew tall.The<< cat>> sat"])
    assert len(dogs) == 3
    assert all(len(re.findall(r"<<(.*?)>>", e)) == 1 for e in dogs)  # one token, like most cats
    again = []
    score_features(sae_dir, "fuzzing", features=[0], overwrite=True,
                   llm=FakeChat(lambda p: again.append(p) or _says_yes(p)))
    assert again == prompts  # the same shuffle and highlights on every run


@pytest.mark.parametrize("answer", [_simulates_cats, _simulates_cats_in_lines])
def test_simulation_correlates_predicted_with_true_activations(sae_dir, answer):
    chat = FakeChat(answer)
    score_features(sae_dir, "simulation", features=[0], llm=chat)
    score = _score(sae_dir, 0, "simulation")
    assert score["value"] == pytest.approx(1.0, abs=1e-12)
    assert score["details"]["n_examples"] == 7 == chat.calls  # one call per example
    assert score["details"]["n_tokens"] == N_POSITIONS


@pytest.mark.parametrize("scorer", ["detection", "fuzzing", "simulation"])
def test_unparseable_answers_fail_the_feature_not_the_job(sae_dir, scorer):
    chat = FakeChat(_rambles)
    result = score_features(sae_dir, scorer, features=[0, 1], llm=chat)
    assert result["failed"] == [0, 1]
    assert result["distribution"]["count"] == 0
    score = _score(sae_dir, 0, scorer)
    assert score["value"] is None
    assert score["details"]["unparsed"] == 7  # every example went unjudged
    assert "error" in score["details"]
    assert score["details"]["llm"] == "fake"
    calls_per_question = 3  # the question and two retries
    questions = 2 * (1 if scorer != "simulation" else 7)
    assert chat.calls == calls_per_question * questions
    sensible = _simulates_cats if scorer == "simulation" else _says_yes
    retried = score_features(sae_dir, scorer, features=[0, 1], llm=FakeChat(sensible))
    assert (retried["new"], retried["failed"]) == (2, [])


def test_an_interrupted_job_keeps_its_saved_batches_and_resumes(sae_dir):
    def interrupted_at_feature_4(prompt: str) -> str:
        if "something vague" in prompt:  # feature 4's explanation, in the second batch
            raise KeyboardInterrupt
        return _detects_cats(prompt)

    with pytest.raises(KeyboardInterrupt):
        score_features(sae_dir, "detection", llm=FakeChat(interrupted_at_feature_4))
    store = FeatureStore(sae_dir)
    assert store.scored("detection", "stats") == {0, 1, 2, 3}
    store.close()
    chat = FakeChat(_detects_cats)
    result = score_features(sae_dir, "detection", llm=chat)
    assert (result["new"], result["scored"]) == (1, 5)
    assert chat.calls == 1  # only feature 4 was asked about
    assert result["summary"].startswith(
        "detection scores of 4 stats explanations: median balanced accuracy 1.00")


def test_a_quantile_sample_that_is_a_top_example_is_not_held_out(tmp_path):
    store = FeatureStore.create(tmp_path, {"d_sae": 1, "per_quantile": 1})
    store.write_vocabulary(VOCAB)
    store.write_examples("top", *_example_set(ACTIVATING[:1], 1, (0,), 1))
    store.write_examples("quantile", *_example_set(ACTIVATING[:2], 2, (0,), 1))
    store.write_examples("negative", *_example_set(NEGATIVE, 3, (0,), 1))
    held_out = held_out_examples(store, [0], Vocabulary(VOCAB))[0]
    assert held_out.n_activating == 1  # ACTIVATING[0] is the top example: left out
    assert [e.tokens for e in held_out.activating] == [
        ["" if t is None else t for t in ACTIVATING[1]]]
    assert len(held_out.negative) == len(NEGATIVE)


def test_a_store_without_held_out_examples_is_refused(tmp_path):
    store = FeatureStore.create(tmp_path, {"d_sae": 1})
    store.write_vocabulary(VOCAB)
    store.write_examples("top", *_example_set(TOP, 2, (0,), 1))
    store.save_explanations("stats", [(0, 'fires on " cat"', {})])
    store.close()
    with pytest.raises(MistudioError) as caught:
        score_features(tmp_path, "rule")
    assert "mistudio find" in caught.value.hint


def test_explain_and_score_jobs_load_no_torch():
    """A worker that only explains or scores starts in a fraction of a second: no torch."""
    import subprocess
    import sys

    code = ("import sys, mistudiod.worker, mistudio_core.explain, mistudio_core.score;"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"
