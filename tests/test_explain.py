"""Explanations: the token rule, the statistical explainer on a hand-built feature store, the
LLM explainer against a scripted OpenAI-compatible server and a tiny local model, and the job's
resume, overwrite and error paths."""

from __future__ import annotations

import numpy as np
import pytest
from chat_server import ScriptedChatServer

from mistudio_core.errors import MistudioError
from mistudio_core.explain import (
    LLMExplainer,
    StatsExplainer,
    TokenRule,
    explain_features,
    explain_with,
    parse_explanation,
)
from mistudio_core.feature_store import PAD_TOKEN, FeatureStore
from mistudio_core.llm import chat_backend

VOCAB = ["The", " cat", " sat", " on", " the", " mat", " is", " dog", "\n", " a"]
THE, CAT, SAT, ON, THE_, MAT, IS, DOG, NL, A = range(len(VOCAB))
WIDTH, N_TOP = 5, 4
# Per feature, its top examples as (token ids, activations).
TOP = {
    0: [([THE, CAT, SAT, ON, THE_], [0, 2, 0, 0, 0]),  # " cat" only
        ([THE_, DOG, IS, A, CAT], [0, 0, 0, 0, 2]),
        ([A, CAT, SAT, ON, THE_], [0, 2, 0, 0, 0])],
    1: [([THE, CAT, SAT, ON, THE_], [0, 3.5, 0, 0, 0]),  # " cat" 70% and " dog" 30%
        ([A, CAT, IS, THE_, MAT], [0, 3.5, 0, 0, 0]),
        ([THE_, DOG, SAT, ON, THE_], [0, 3, 0, 0, 0])],
    2: [([CAT, SAT, ON, THE_, MAT], [0, 0, 1.5, 0, 0]),  # " on" after " sat", not after " is"
        ([DOG, SAT, ON, THE_, MAT], [0, 0, 1.5, 0, 0]),
        ([CAT, IS, ON, THE_, MAT], [0, 0, 0, 0, 0]),
        ([THE, CAT, SAT, ON, A], [0, 0, 0, 1, 0])],
    3: [],  # dead
    4: [([MAT, NL, THE, CAT, SAT], [0, 1, 0, 0, 0])],  # "\n", promotes " cat" and " dog"
}
N_FIRED = [3, 3, 3, 0, 1]


def build_store(sae_dir) -> FeatureStore:
    """The features of TOP, with quantile examples that fire on " mat" (to be left unseen)."""
    d_sae = len(TOP)
    store = FeatureStore.create(sae_dir, {"d_sae": d_sae, "per_quantile": 1})
    tokens = np.full((d_sae, N_TOP, WIDTH), PAD_TOKEN, dtype=np.int32)
    acts = np.zeros((d_sae, N_TOP, WIDTH), dtype=np.float32)
    values = np.full((d_sae, N_TOP), np.nan, dtype=np.float32)
    for feature, examples in TOP.items():
        for slot, (ids, example_acts) in enumerate(examples):
            tokens[feature, slot], acts[feature, slot] = ids, example_acts
            values[feature, slot] = max(example_acts)
    store.write_examples("top", tokens, acts, values)
    quantile_tokens = np.full((d_sae, 1, WIDTH), MAT, dtype=np.int32)
    quantile_acts = np.full((d_sae, 1, WIDTH), 9.0, dtype=np.float32)
    store.write_examples("quantile", quantile_tokens, quantile_acts, np.full((d_sae, 1), 9.0))
    store.write_statistics(np.array(N_FIRED), np.nanmax(np.nan_to_num(values), axis=1),
                           np.nansum(acts, axis=(1, 2)), n_tokens=1000)
    store.write_vocabulary(VOCAB)
    promoted = np.full((d_sae, 3), -1, dtype=np.int32)
    promoted_values = np.zeros((d_sae, 3), dtype=np.float32)
    promoted[4], promoted_values[4] = [CAT, DOG, SAT], [2.0, 1.0, -0.5]
    store.write_array("promoted_ids", promoted)
    store.write_array("promoted_values", promoted_values)
    return store


@pytest.fixture
def sae_dir(tmp_path):
    build_store(tmp_path).close()
    return tmp_path


def stored(sae_dir, explainer: str = "stats") -> dict[int, dict]:
    store = FeatureStore(sae_dir)
    try:
        return {f: store.explanation(f, explainer) for f in store.explained(explainer)}
    finally:
        store.close()


# ----- TokenRule -----------------------------------------------------------------------------


def test_rule_matches_exactly_then_weaker_without_surrounding_whitespace():
    rule = TokenRule({" cat": 1.0, "dog": 0.8})
    assert rule.simulate([" cat", "cat", "dog", " dog", "", " mat"]) == [1.0, 0.5, 0.8, 0.4,
                                                                          0.0, 0.0]


def test_rule_with_context_predicts_only_after_it():
    rule = TokenRule({" on": 1.0}, previous={" sat": 1.0})
    assert rule.simulate([" on", " sat", " on", " is", " on", "sat", " on"]) == [
        0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.5 * 2]


def test_rule_from_quoted_text():
    rule = TokenRule.from_text('the word "cat", a “dog” or "\\n" before "sat"')
    assert rule.tokens == {"cat": 1.0, "dog": 1.0, "\n": 1.0, "sat": 1.0}
    assert rule.previous == {}
    assert TokenRule.from_text("plural nouns about animals") is None
    assert TokenRule.from_text('an empty "" quote') is None


def test_rule_details_round_trip():
    rule = TokenRule({" on": 0.9}, {" sat": 1.0})
    assert TokenRule.from_details({"rule": rule.to_details()}) == rule
    assert TokenRule.from_details({"n_examples": 3}) is None
    assert TokenRule.from_details({"rule": {"tokens": {}}}) is None


# ----- the statistical explainer -------------------------------------------------------------


def test_stats_explains_each_pattern(sae_dir):
    result = explain_features(sae_dir)
    assert result["explainer"] == "stats"
    assert (result["new"], result["explained"], result["skipped_dead"]) == (4, 4, 1)
    assert result["failed"] == []
    assert result["path"] == str(sae_dir)
    explanations = stored(sae_dir)
    assert set(explanations) == {0, 1, 2, 4}  # the dead feature 3 has none
    texts = {f: e["text"] for f, e in explanations.items()}
    assert texts == {
        0: 'fires on " cat" (100%)',
        1: 'fires on " cat" (70%), " dog" (30%)',
        2: 'fires on " on" (100%) after " sat"',
        4: 'fires on "\\n" (100%); promotes " cat", " dog"',
    }
    assert "fires on" in result["summary"] and "1 never fired" in result["summary"]


def test_stats_rules_simulate_the_examples(sae_dir):
    explain_features(sae_dir)
    rules = {f: TokenRule.from_details(e["details"]) for f, e in stored(sae_dir).items()}
    assert rules[0] == TokenRule({" cat": 1.0})
    assert rules[0].simulate(["The", " cat", " sat", " dog", " mat"]) == [0, 1, 0, 0, 0]
    assert rules[1] == TokenRule({" cat": 1.0, " dog": round(3 / 3.5, 3)})
    # " on" after " sat": mean of 1.5, 1.5 and 1 against the max 1.5
    assert rules[2] == TokenRule({" on": round(4 / 3 / 1.5, 3)}, {" sat": 1.0})
    assert rules[2].simulate([" cat", " is", " on", " sat", " on"]) == [0, 0, 0, 0, 0.889]
    details = stored(sae_dir)[1]["details"]
    assert details["mass"]["tokens"] == {" cat": 0.7, " dog": 0.3}
    assert details["n_examples"] == 3


def test_a_token_that_fires_regardless_of_context_gets_no_context(tmp_path):
    # " cat" always after " the" in the top examples, but nothing shows that " the" matters.
    store = build_store(tmp_path)
    tokens = np.asarray(store.array("top_tokens")).copy()
    tokens[0, :3] = [[THE_, CAT, SAT, ON, A]] * 3
    store.write_array("top_tokens", tokens)
    store.close()
    explain_features(tmp_path, features=[0])
    assert stored(tmp_path)[0]["details"]["rule"]["previous"] == {}


def test_stats_is_deterministic(tmp_path):
    build_store(tmp_path / "a").close()
    build_store(tmp_path / "b").close()
    explain_features(tmp_path / "a")
    explain_features(tmp_path / "b")
    first, second = stored(tmp_path / "a"), stored(tmp_path / "b")
    assert [(e["text"], e["details"]) for e in first.values()] == [
        (e["text"], e["details"]) for e in second.values()]


def test_explaining_resumes_and_overwrites(sae_dir):
    first = explain_features(sae_dir, features=[0, 1, 3])
    assert (first["new"], first["explained"], first["skipped_dead"]) == (2, 2, 1)
    created = {f: e["created_at"] for f, e in stored(sae_dir).items()}

    class Counting(StatsExplainer):
        batch_size = 1
        seen: list[int] = []

        def explain(self, store, features):
            self.seen.extend(features)
            return super().explain(store, features)

    events = []
    second = explain_with(sae_dir, Counting(), callback=lambda kind, payload: events.append(
        (kind, payload)))
    assert Counting.seen == [2, 4]
    assert (second["new"], second["explained"]) == (2, 4)
    assert {f: stored(sae_dir)[f]["created_at"] for f in (0, 1)} == created
    progress = [payload for kind, payload in events if kind == "progress"]
    assert progress == [{"done": 0, "total": 2}, {"done": 1, "total": 2},
                        {"done": 2, "total": 2}]
    assert explain_features(sae_dir)["new"] == 0
    assert explain_features(sae_dir, overwrite=True)["new"] == 4


def test_an_interrupted_run_keeps_the_saved_batches(sae_dir):
    class Interrupted(StatsExplainer):
        batch_size = 2
        calls = 0

        def explain(self, store, features):
            Interrupted.calls += 1
            if Interrupted.calls == 2:
                raise KeyboardInterrupt
            return super().explain(store, features)

    with pytest.raises(KeyboardInterrupt):
        explain_with(sae_dir, Interrupted())
    assert set(stored(sae_dir)) == {0, 1}
    assert explain_features(sae_dir)["new"] == 2


def test_job_errors_are_explained(tmp_path, sae_dir):
    with pytest.raises(MistudioError) as raised:
        explain_features(tmp_path / "nothing-found")
    assert raised.value.code == "not_found" and "mistudio find" in raised.value.hint
    with pytest.raises(MistudioError) as raised:
        explain_features(sae_dir, explainer="gpt4")
    assert raised.value.field == "explainer" and "openai:URL" in raised.value.hint
    with pytest.raises(MistudioError, match="out of range"):
        explain_features(sae_dir, features=[7])


def test_stats_explains_thousands_of_features_in_batches(tmp_path):
    """A wide random store: every firing feature gets a rule naming its strongest token."""
    d_sae, n_top, width, vocab = 600, 8, 16, 50
    rng = np.random.default_rng(0)
    store = FeatureStore.create(tmp_path, {"d_sae": d_sae, "per_quantile": 1})
    tokens = rng.integers(0, vocab, (d_sae, n_top, width)).astype(np.int32)
    acts = np.where(tokens == (np.arange(d_sae) % vocab)[:, None, None], 1.0, 0.0)
    fired = acts.sum(axis=(1, 2))
    store.write_examples("top", tokens, acts, np.where(fired[:, None] > 0, 1.0, np.nan)
                         * np.ones((d_sae, n_top)))
    store.write_statistics(fired.astype(int), acts.max(axis=(1, 2)), fired, n_tokens=10**5)
    store.write_vocabulary([f" w{i}" for i in range(vocab)])
    store.close()
    result = explain_features(tmp_path)
    assert result["new"] == int(np.count_nonzero(fired))
    for feature, entry in list(stored(tmp_path).items())[:50]:
        assert entry["text"] == f'fires on " w{feature % vocab}" (100%)'


# ----- the LLM explainer ---------------------------------------------------------------------


def test_parse_explanation_takes_the_last_tagged_line():
    answer = 'Hmm.\n[EXPLANATION]: first try\nbetter:\n[EXPLANATION]: "the word cat"\n'
    assert parse_explanation(answer) == "the word cat"
    assert parse_explanation("[explanation]: **commas in lists**") == "commas in lists"
    assert parse_explanation('[EXPLANATION]: "cat" and "dog"') == '"cat" and "dog"'
    for bad in ("the word cat", "[EXPLANATION]:   ", "[EXPLANATION]: " + "x" * 400):
        with pytest.raises(ValueError):
            parse_explanation(bad)


def test_llm_explainer_retries_and_shows_marked_examples(sae_dir):
    good = 'It fires on "cat".\n[EXPLANATION]: the word "cat"'
    with ScriptedChatServer(["I think it is about animals.", good]) as server:
        spec = f"openai:{server.url}#judge"
        result = explain_features(sae_dir, explainer=spec, features=[0])
    assert (result["explainer"], result["new"], result["failed"]) == (spec, 1, [])
    assert stored(sae_dir, spec)[0]["text"] == 'the word "cat"'
    assert len(server.requests) == 2
    prompt = server.user_messages(0)[0]
    assert "Example 1: The<< cat>> sat on the" in prompt
    assert "Example 2:  the dog is a<< cat>>\n" in prompt
    assert 'Activations: " cat" (10)' in prompt
    assert " mat" not in prompt  # the quantile examples stay unseen
    assert "could not be used" in server.user_messages(1)[-1]
    assert server.requests[0]["messages"][0]["role"] == "system"
    assert "[EXPLANATION]:" in server.requests[0]["messages"][0]["content"]


def test_llm_explainer_shows_the_promoted_tokens(sae_dir):
    with ScriptedChatServer(["[EXPLANATION]: line breaks"]) as server:
        explain_features(sae_dir, explainer=f"openai:{server.url}", features=[4])
    assert 'more likely next: " cat", " dog"' in server.user_messages(0)[0]
    assert 'Example 1:  mat<<\\n>>The cat sat' in server.user_messages(0)[0]


def test_llm_answers_out_of_format_fail_those_features_only(sae_dir):
    with ScriptedChatServer(["no idea"]) as server:
        result = explain_features(sae_dir, explainer=f"openai:{server.url}", features=[0, 1, 3])
    assert (result["new"], result["explained"], result["skipped_dead"]) == (0, 0, 1)
    assert result["failed"] == [0, 1]
    assert len(server.requests) == 2 * 3  # each feature: one answer and two retries
    assert "2 failed" in result["summary"]


def test_an_unreachable_llm_stops_the_job(sae_dir):
    reply = (500, {"error": {"message": "model not loaded"}})
    with (ScriptedChatServer([reply]) as server,
          pytest.raises(MistudioError, match="model not loaded")):
        explain_features(sae_dir, explainer=f"openai:{server.url}")


def test_a_tiny_local_model_fails_gracefully(sae_dir, make_tiny_model):
    backend = chat_backend("hf:" + str(make_tiny_model("gpt2")), device="cpu")
    result = explain_with(sae_dir, LLMExplainer(backend, max_tokens=4), features=[0])
    assert result["explainer"] == backend.name
    assert (result["new"], result["failed"]) == (0, [0])
