"""Find: hand-checkable features on a tiny Llama whose layer-0 input is the token embedding.

The SAE is built by hand so that every expectation can be computed directly from the embedding
matrix: feature 0 fires on exactly one token X, feature 1 is a copy of it, feature 2 fires with
varying strength on about half the vocabulary, feature 3 never fires.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mistudio_core import feature_recorder, logit_effects
from mistudio_core.corpus import Corpus, pack_windows
from mistudio_core.errors import MistudioError
from mistudio_core.feature_recorder import CooccurrenceCounter, FeatureRecorder
from mistudio_core.feature_store import PAD_TOKEN, FeatureStore
from mistudio_core.find import CHECKPOINT_FILE, FindConfig, find_features, vocabulary_texts
from mistudio_core.logit_effects import read_unembedding
from mistudio_core.models import ModelSpec
from mistudio_core.sae import SAEConfig, SAEMetadata, SparseAutoencoder, SparseCodes, save_sae

CONTEXT = 32
HOOK = "layers.0.resid_pre"
CONFIG = FindConfig(tokens=10**9, top=5, radius=3, quantile_groups=3, per_quantile=2,
                    negatives=4, batch_windows=8, logits=5, neighbours=3)


@pytest.fixture(scope="module")
def llama_dir(make_tiny_model, tiny_tokenizer, tmp_path_factory):
    """The tiny one-layer Llama with a random (not all-ones) final norm weight, so that the
    logit effects test can tell whether gamma is applied."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", n_layers=1))
    with torch.no_grad():
        gamma = torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        model.model.norm.weight.copy_(gamma + 0.5)
    directory = tmp_path_factory.mktemp("llama-norm")
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_weights(llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    return {"embed": model.model.embed_tokens.weight.detach().clone(),
            "unembed": model.lm_head.weight.detach().clone(),
            "gamma": model.model.norm.weight.detach().clone()}


@pytest.fixture(scope="module")
def stream(tiny_corpus, tiny_tokenizer):
    """The corpus's windows and the mask of their non-special tokens, as find reads them."""
    windows = list(pack_windows(Corpus.open(tiny_corpus).documents(), tiny_tokenizer, CONTEXT))
    ids = torch.tensor(windows)
    special = torch.tensor(sorted(set(tiny_tokenizer.all_special_ids)))
    return ids, ~torch.isin(ids, special)


@pytest.fixture(scope="module")
def hand_sae(llama_weights, tiny_tokenizer, stream):
    """The hand-made SAE, and token X, the one token feature 0 fires on."""
    embed = llama_weights["embed"]
    norms = embed.norm(dim=1)
    ids, keep = stream
    counts = torch.bincount(ids[keep], minlength=embed.shape[0])
    x_token = None
    for candidate in counts.argsort(descending=True).tolist():  # the most frequent that works
        others = embed @ (embed[candidate] / norms[candidate])
        others[candidate] = -math.inf
        if norms[candidate] > others.max() + 0.1:
            x_token, margin_low = candidate, float(others.max())
            break
    assert x_token is not None
    direction = embed[x_token] / norms[x_token]
    threshold = (margin_low + float(norms[x_token])) / 2
    generator = torch.Generator().manual_seed(3)
    sae = SparseAutoencoder(SAEConfig("relu", d_in=embed.shape[1], d_sae=8))
    rows = torch.randn(8, embed.shape[1], generator=generator)
    rows = rows / rows.norm(dim=1, keepdim=True)
    bias = torch.zeros(8)
    rows[0], rows[1], rows[3] = direction, direction, direction
    bias[0], bias[1], bias[3] = -threshold, -threshold, -1e6
    bias[4:] = -0.2
    with torch.no_grad():
        sae.encoder_weight.copy_(rows)
        sae.b_enc.copy_(bias)
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.randn(8, embed.shape[1], generator=generator))
    return sae, x_token


def save_hand_sae(sae, directory, model_dir, hook=HOOK):
    metadata = SAEMetadata(model_name=str(model_dir), hook_name=hook, context_size=CONTEXT)
    save_sae(sae, directory, metadata, {})
    return directory


def expected_acts(sae, embed, token_ids):
    """Every feature's activation on every token: at layer 0's input a token is its embedding."""
    with torch.no_grad():
        return sae.encode(embed[token_ids])


@pytest.fixture(scope="module")
def found(hand_sae, llama_dir, tiny_corpus, tmp_path_factory):
    sae, _ = hand_sae
    directory = save_hand_sae(sae, tmp_path_factory.mktemp("sae"), llama_dir)
    events = []
    result = find_features(directory, ModelSpec(str(llama_dir)), str(tiny_corpus), CONFIG,
                           callback=lambda kind, payload: events.append((kind, payload)))
    return result, FeatureStore(directory), events


def test_statistics_and_density(found, hand_sae, stream, llama_weights):
    result, store, events = found
    sae, x_token = hand_sae
    ids, keep = stream
    kept = ids[keep]
    acts = expected_acts(sae, llama_weights["embed"], kept)
    assert result["n_tokens"] == kept.numel()
    assert store.meta["n_tokens"] == kept.numel()
    stats = store.statistics(0)
    n_x = int((kept == x_token).sum())
    assert n_x > 0
    assert stats["n_fired"] == n_x
    assert stats["density"] == pytest.approx(n_x / kept.numel())
    for feature in range(8):
        stats = store.statistics(feature)
        fired = acts[:, feature] > 0
        assert stats["n_fired"] == int(fired.sum())
        assert stats["max_act"] == pytest.approx(float(acts[:, feature].max()), rel=1e-5)
        if fired.any():
            mean = float(acts[fired, feature].mean())
            assert stats["mean_act"] == pytest.approx(mean, rel=1e-5)
    assert store.statistics(3)["n_fired"] == 0 and store.statistics(3)["density"] == 0
    assert result["alive"] == 7 and result["dead"] == 1
    progress = [p for kind, p in events if kind == "progress"]
    assert progress[-2]["total"] == CONFIG.tokens  # the corpus ended before the budget:
    assert progress[-1] == {"done": kept.numel(), "total": kept.numel()}  # then all done
    assert "7 of 8 features fired" in result["summary"]


def test_top_examples_are_the_strongest_windows(found, hand_sae, stream, llama_weights,
                                                tiny_tokenizer):
    _, store, _ = found
    sae, x_token = hand_sae
    ids, keep = stream
    embed = llama_weights["embed"]
    dense = expected_acts(sae, embed, ids) * keep[..., None]
    per_token = expected_acts(sae, embed, torch.arange(embed.shape[0]))
    unencoded = {PAD_TOKEN, *tiny_tokenizer.all_special_ids}
    for feature in (0, 2):
        examples = store.examples(feature, "top")
        peaks = dense[..., feature].max(dim=1).values
        expected = peaks[peaks > 0].sort(descending=True).values[: CONFIG.top]
        assert [e.value for e in examples] == pytest.approx(expected.tolist(), rel=1e-5)
        for example in examples:
            assert len(example.token_ids) == CONFIG.width and example.center == CONFIG.radius
            want = [0.0 if t in unencoded else float(per_token[t, feature])
                    for t in example.token_ids]
            assert example.acts == pytest.approx(want, abs=2e-3, rel=2e-3)
            assert example.acts[example.center] == pytest.approx(example.value, rel=2e-3)
            assert example.value == max(want)
            if feature == 0:
                assert example.token_ids[example.center] == x_token


def test_quantile_examples_fire_and_are_grouped(found):
    _, store, _ = found
    groups = store.quantile_groups(2)
    assert len(groups) == CONFIG.quantile_groups
    values = []
    for group in groups:
        assert len(group["examples"]) == CONFIG.per_quantile  # feature 2 fires in every window
        for example in group["examples"]:
            assert example["value"] > 0
            assert group["low"] <= example["value"] <= group["high"]
            values.append(example["value"])
    assert values == sorted(values)
    assert not store.quantile_groups(3)[0]["examples"]  # the dead feature has none


def test_negative_examples_never_contain_the_feature(found, hand_sae):
    _, store, _ = found
    _, x_token = hand_sae
    negatives = store.examples(0, "negative")
    assert len(negatives) == CONFIG.negatives
    for example in negatives:
        assert x_token not in example.token_ids
        assert set(example.acts) == {0.0} and example.value == 0.0
        assert any(t != PAD_TOKEN for t in example.token_ids)
    # the other example sets of a dead feature are empty
    assert store.examples(3, "top") == [] and store.examples(3, "quantile") == []


def test_histogram_counts_every_firing(found):
    _, store, _ = found
    histogram = store.array("histogram")
    edges = store.meta["histogram_log10_edges"]
    assert len(edges) == histogram.shape[1] + 1
    for feature in range(8):
        assert int(histogram[feature].sum()) == store.statistics(feature)["n_fired"]


def test_cooccurrence_is_the_exact_jaccard(found, hand_sae, stream, llama_weights):
    _, store, _ = found
    sae, _ = hand_sae
    ids, keep = stream
    fired = (expected_acts(sae, llama_weights["embed"], ids[keep]) > 0).double()
    both = fired.T @ fired
    counts = both.diagonal()
    jaccard = both / (counts[:, None] + counts[None, :] - both).clamp(min=1)
    jaccard.fill_diagonal_(0)
    assert store.neighbours(0, "cooccurrence")[0] == {"id": 1, "value": 1.0, "explanation": None}
    assert store.neighbours(1, "cooccurrence")[0]["id"] == 0
    for feature in range(8):
        stored = [n["value"] for n in store.neighbours(feature, "cooccurrence")]
        wanted = jaccard[feature][jaccard[feature] > 0].sort(descending=True).values
        assert stored == pytest.approx(wanted[: CONFIG.neighbours].tolist(), abs=1e-4)
    assert store.neighbours(3, "cooccurrence") == []


def test_logit_effects_match_a_direct_computation(found, hand_sae, llama_weights):
    _, store, _ = found
    sae, _ = hand_sae
    effects = (sae.W_dec.detach() * llama_weights["gamma"]) @ llama_weights["unembed"].T
    for side, largest in (("promoted", True), ("suppressed", False)):
        top = effects.topk(CONFIG.logits, dim=1, largest=largest)
        np.testing.assert_array_equal(store.array(f"{side}_ids"), top.indices.numpy())
        np.testing.assert_allclose(store.array(f"{side}_values"), top.values.numpy(), rtol=1e-5)
    card = store.card(0)
    assert card["logits"]["promoted"][0][0] == store.vocabulary[int(effects[0].argmax())]
    assert store.meta["logit_effects"] == "checkpoint tensors"


def test_card_and_meta(found, hand_sae, tiny_corpus):
    _, store, _ = found
    _, x_token = hand_sae
    card = store.card(0)
    assert card["n_fired"] > 0 and len(card["top"]) == CONFIG.top
    assert card["cooccurring"][0]["id"] == 1
    assert card["histogram"]["counts"]
    meta = store.meta
    assert meta["hook"] == HOOK and meta["d_sae"] == 8 and meta["d_in"] == 32
    assert meta["corpus_sha256"] == Corpus.open(tiny_corpus).fingerprint()
    assert meta["per_quantile"] == CONFIG.per_quantile
    assert meta["find_config"]["top"] == CONFIG.top
    assert meta["cooccurrence"] == "exact"
    assert not (store.directory / CHECKPOINT_FILE).exists()
    assert card["top"][0]["tokens"][CONFIG.radius] == store.vocabulary[x_token]


def test_vocabulary_keeps_leading_spaces(tiny_tokenizer):
    texts = vocabulary_texts(tiny_tokenizer)
    assert len(texts) == len(tiny_tokenizer)
    the = tiny_tokenizer(" the", add_special_tokens=False)["input_ids"]
    assert len(the) == 1 and texts[the[0]] == " the"
    assert texts[tiny_tokenizer.eos_token_id] == "<|endoftext|>"


def test_resume_equals_an_uninterrupted_run(hand_sae, llama_dir, tiny_corpus, tmp_path):
    sae, _ = hand_sae
    config = FindConfig(tokens=600, top=3, radius=2, quantile_groups=2, per_quantile=2,
                        negatives=2, batch_windows=2, logits=3, neighbours=2, checkpoint_every=2)
    spec = ModelSpec(str(llama_dir))
    whole = save_hand_sae(sae, tmp_path / "whole", llama_dir)
    result = find_features(whole, spec, str(tiny_corpus), config)
    assert 600 <= result["n_tokens"] < 600 + CONTEXT

    parts = save_hand_sae(sae, tmp_path / "parts", llama_dir)
    reports = []

    def interrupt(kind, payload):
        if kind == "progress":
            reports.append(payload["done"])
            if len(reports) == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        find_features(parts, spec, str(tiny_corpus), config, callback=interrupt)
    assert (parts / "features" / CHECKPOINT_FILE).is_file()
    with pytest.raises(MistudioError, match="other settings"):
        find_features(parts, spec, str(tiny_corpus), FindConfig(**{**vars(config), "top": 4}),
                      resume=True)
    resumed_reports = []
    resumed = find_features(parts, spec, str(tiny_corpus), config, resume=True,
                            callback=lambda k, p: resumed_reports.append(p) if k == "progress"
                            else None)
    assert resumed["n_tokens"] == result["n_tokens"]
    assert resumed_reports[0]["done"] == reports[4]  # checkpoint after batch 4: batch 5 redone
    first, second = FeatureStore(whole), FeatureStore(parts)
    arrays = sorted(p.name for p in first.directory.glob("*.npy"))
    assert arrays == sorted(p.name for p in second.directory.glob("*.npy"))
    for name in arrays:
        np.testing.assert_array_equal(np.load(first.directory / name),
                                      np.load(second.directory / name), err_msg=name)
    rows = "SELECT * FROM features ORDER BY id"
    assert list(first.db.execute(rows)) == list(second.db.execute(rows))
    assert second.card(0)["top"]


def test_recorder_keeps_the_global_top_one_per_window():
    """Two batches of two windows; feature 0's best windows are spread over both batches."""
    config = FindConfig(top=2, radius=1, quantile_groups=1, per_quantile=8, negatives=1)
    recorder = FeatureRecorder(3, config, "cpu")

    def batch(ids, entries):
        token_ids = torch.tensor(ids)
        keep = torch.ones_like(token_ids, dtype=torch.bool)
        keep[:, 0] = False  # BOS
        row_of = (keep.reshape(-1).cumsum(0) - 1).reshape(keep.shape)
        rows = torch.tensor([int(row_of[w, p]) for w, p, _, _ in entries])
        cols = torch.tensor([f for _, _, f, _ in entries])
        values = torch.tensor([v for _, _, _, v in entries])
        codes = SparseCodes.from_coordinates(rows, cols, values, int(keep.sum()), 3)
        recorder.add(token_ids, keep, codes)

    # (window, position, feature, value)
    batch([[0, 11, 12, 13], [0, 21, 22, 23]],
          [(0, 1, 0, 0.5), (0, 2, 0, 0.9), (0, 3, 2, 0.1), (1, 3, 0, 0.3), (1, 3, 1, 0.4)])
    batch([[0, 31, 32, 33], [0, 41, 42, 43]],
          [(0, 2, 0, 0.7), (0, 3, 0, 0.7), (1, 1, 0, 0.2), (1, 2, 1, 0.6)])
    assert recorder.n_tokens == 12 and recorder.windows_seen == 4
    keys, top = recorder.top.ordered()
    assert keys[0].tolist() == pytest.approx([0.9, 0.7])  # 0.5 shares 0.9's window
    assert top["tokens"][0].tolist() == [[11, 12, 13], [31, 32, 33]]  # earliest equal peak
    torch.testing.assert_close(top["acts"][0].float(),
                               torch.tensor([[0.5, 0.9, 0.0], [0.0, 0.7, 0.7]]),
                               atol=1e-3, rtol=0)
    assert keys[1].tolist() == pytest.approx([0.6, 0.4])
    assert top["tokens"][1].tolist() == [[41, 42, 43], [22, 23, PAD_TOKEN]]
    assert recorder.n_fired.tolist() == [6, 2, 1]
    # the quantile sample holds every window peak of feature 0 (4 of them), sorted at the end
    tokens, acts, values, edges = recorder.quantile_examples()
    assert values[0, :4].tolist() == pytest.approx([0.2, 0.3, 0.7, 0.9])
    assert math.isnan(float(values[0, 4]))
    assert edges[0].tolist() == pytest.approx([0.2, 0.9])
    # co-occurrence: features 0 and 1 share one token (window 1, position 3 of batch 1)
    ids, scores = recorder.cooccurring()
    assert ids[0, 0] == 1 and scores[0, 0] == pytest.approx(1 / (6 + 2 - 1))


def test_recorder_matches_a_brute_force_reference():
    """Random sparse codes over several batches, as CSR rows of any length (ReLU/JumpReLU
    SAEs) and as TopK rows of k entries, zeros included: every piece of the recorder against a
    direct computation on the dense stream."""
    n_features, n_windows, context, radius = 6, 3, 10, 2
    config = FindConfig(top=3, radius=radius, quantile_groups=2, per_quantile=2, negatives=2,
                        neighbours=2, seed=5)
    recorder = FeatureRecorder(n_features, config, "cpu")
    generator = torch.Generator().manual_seed(0)
    all_ids, all_dense = [], []
    for batch in range(7):
        ids = torch.randint(0, 1000, (n_windows, context), generator=generator)
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[:, 0] = False
        shape = (n_windows, context, n_features)
        dense = torch.rand(shape, generator=generator) * (
            torch.rand(shape, generator=generator) < 0.3) * keep[..., None]
        kept = dense[keep]
        if batch % 2:
            top = kept.topk(n_features, dim=1)
            codes = SparseCodes.from_topk(top.values, top.indices, n_features)
        else:
            rows, cols = kept.nonzero(as_tuple=True)
            codes = SparseCodes.from_coordinates(rows, cols, kept[rows, cols], kept.shape[0],
                                                 n_features)
        recorder.add(ids, keep, codes)
        all_ids.append(ids)
        all_dense.append(dense)
    ids, dense = torch.cat(all_ids), torch.cat(all_dense)
    padded_ids = torch.nn.functional.pad(ids, (radius, radius), value=PAD_TOKEN)
    padded = torch.nn.functional.pad(dense, (0, 0, radius, radius))

    fired = dense > 0
    assert recorder.n_fired.tolist() == fired.sum((0, 1)).tolist()
    torch.testing.assert_close(recorder.max_act, dense.amax((0, 1)))
    assert recorder.histogram.sum(1).tolist() == recorder.n_fired.tolist()
    keys, top = recorder.top.ordered()
    _, _, quantile_values, _ = recorder.quantile_examples()
    for feature in range(n_features):
        peaks, centres = dense[..., feature].max(dim=1)
        windows = peaks.argsort(descending=True)[: config.top]
        assert keys[feature].tolist() == pytest.approx(peaks[windows].tolist())
        for slot, window in enumerate(windows.tolist()):
            span = slice(int(centres[window]), int(centres[window]) + 2 * radius + 1)
            assert top["tokens"][feature, slot].tolist() == padded_ids[window, span].tolist()
            torch.testing.assert_close(top["acts"][feature, slot].float(),
                                       padded[window, span, feature], atol=1e-3, rtol=1e-3)
        # the quantile sample: the activating windows of highest hash priority
        active = (peaks > 0).nonzero().squeeze(1)
        priority = feature_recorder._hash(config.seed, feature_recorder._SALT_QUANTILE,
                                     torch.full_like(active, feature), active)
        chosen = active[priority.argsort(descending=True)[: config.quantile_samples]]
        sample = quantile_values[feature][~quantile_values[feature].isnan()]
        assert sorted(sample.tolist()) == pytest.approx(sorted(peaks[chosen].tolist()))
        # negatives: pooled spans on which the feature is zero everywhere
        tokens, _, values = recorder.negative_examples()
        for span_tokens, value in zip(tokens[feature], values[feature], strict=True):
            assert value == 0.0
            matches = [(w, c) for w in recorder.pool.payload["window"][0].tolist()
                       for c in range(context)
                       if padded_ids[w, c:c + 2 * radius + 1].tolist() == span_tokens.tolist()]
            assert len(matches) == 1
            window, start = matches[0]
            assert not fired[window, max(start - radius, 0):start + radius + 1, feature].any()
    both = fired.reshape(-1, n_features).double()
    both = both.T @ both
    jaccard = both / (both.diagonal()[:, None] + both.diagonal()[None, :] - both)
    jaccard.fill_diagonal_(0)
    ids_, scores = recorder.cooccurring()
    torch.testing.assert_close(scores, jaccard.topk(2, dim=1).values.float())
    assert ids_.tolist() == jaccard.topk(2, dim=1).indices.tolist()


def test_quantile_groups_are_equal_count():
    config = FindConfig(top=1, radius=0, quantile_groups=2, per_quantile=2, negatives=1)
    recorder = FeatureRecorder(1, config, "cpu")
    recorder.quantile.payload["values"][0, :3] = torch.tensor([0.3, 0.1, 0.2])
    recorder.quantile.payload["tokens"][0, :3, 0] = torch.tensor([3, 1, 2], dtype=torch.int32)
    tokens, _, values, edges = recorder.quantile_examples()
    # 3 samples in 2 groups: starts at ranks 0 and 1 -> group 0 = [0.1], group 1 = [0.2, 0.3]
    assert torch.equal(values[0].isnan(), torch.tensor([False, True, False, False]))
    assert values[0, [0, 2, 3]].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert tokens[0, :, 0].tolist() == [1, PAD_TOKEN, 2, 3]
    assert edges[0].tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_approximate_cooccurrence_counts_the_strongest_pairs(monkeypatch):
    monkeypatch.setattr(feature_recorder, "EXACT_COOCCURRENCE_MAX_FEATURES", 4)
    counter = CooccurrenceCounter(12, torch.device("cpu"))
    assert not counter.exact
    latents = torch.tensor([list(range(10)), [0, 1, -1, -1, -1, -1, -1, -1, -1, -1]])
    values = torch.tensor([[float(10 - i) for i in range(10)], [1.0, 1.0, *[-math.inf] * 8]])
    counter.add(latents, values)
    i, j, n = counter.pairs()
    pairs = {(int(a), int(b)): int(c) for a, b, c in zip(i, j, n, strict=True)}
    assert len(pairs) == 28  # the 8 strongest latents of token 0 (0..7) pair up
    assert pairs[(0, 1)] == 2 and (8, 9) not in pairs and (0, 9) not in pairs


@pytest.mark.parametrize(("model_type", "offset", "centre"),
                         [("gpt2", 0.0, True), ("gemma2", 1.0, False)])
def test_unembedding_conventions(make_tiny_model, model_type, offset, centre):
    """GPT-2: tied head, LayerNorm (centres); Gemma 2: tied, RMSNorm scaling by 1 + weight."""
    from transformers import AutoModelForCausalLM

    directory = make_tiny_model(model_type, n_layers=1)
    model = AutoModelForCausalLM.from_pretrained(directory)
    unembedding = read_unembedding(ModelSpec(str(directory)))
    assert unembedding.source == "checkpoint tensors" and unembedding.centre is centre
    torch.testing.assert_close(unembedding.weight, model.get_output_embeddings().weight)
    norm = logit_effects._final_norm(model)
    torch.testing.assert_close(unembedding.scale, norm.weight.detach() + offset)


def test_unembedding_falls_back_to_the_full_model(llama_dir, llama_weights, monkeypatch):
    monkeypatch.setattr(logit_effects, "_checkpoint_index", lambda source, spec: {})
    logs = []
    unembedding = read_unembedding(ModelSpec(str(llama_dir)), callback=lambda k, p: logs.append(p))
    assert unembedding.source == "full model"
    torch.testing.assert_close(unembedding.weight, llama_weights["unembed"])
    torch.testing.assert_close(unembedding.scale, llama_weights["gamma"])
    assert any("whole" in entry["message"] for entry in logs)


def test_encoders_have_no_logit_effects(make_tiny_model):
    assert read_unembedding(ModelSpec(str(make_tiny_model("bert", n_layers=1)))) is None


def test_user_mistakes(hand_sae, llama_dir, tiny_corpus, tmp_path):
    sae, _ = hand_sae
    spec = ModelSpec(str(llama_dir))
    with pytest.raises(MistudioError) as error:
        FindConfig(top=0)
    assert error.value.field == "top" and error.value.hint
    no_hook = save_hand_sae(sae, tmp_path / "no-hook", llama_dir, hook="")
    with pytest.raises(MistudioError, match="which hook"):
        find_features(no_hook, spec, str(tiny_corpus))
    narrow = SparseAutoencoder(SAEConfig("relu", d_in=16, d_sae=4))
    narrow_dir = save_hand_sae(narrow, tmp_path / "narrow", llama_dir)
    with pytest.raises(MistudioError, match="16-wide"):
        find_features(narrow_dir, spec, str(tiny_corpus))
    small = tmp_path / "small.txt"
    small.write_text("Just a few words.\n")
    good = save_hand_sae(sae, tmp_path / "good", llama_dir)
    with pytest.raises(MistudioError) as error:
        find_features(good, spec, str(small))
    assert error.value.code == "bad_corpus"
    with pytest.raises(MistudioError) as error:
        find_features(good, ModelSpec(str(tmp_path / "no-such-model")), str(tiny_corpus))
    assert error.value.code == "model_not_found"
    assert not (good / "features" / "features.sqlite").exists()
