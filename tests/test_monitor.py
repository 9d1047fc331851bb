"""Monitor: per-token features while a model reads or generates text.

The SAEs are built by hand on a tiny one-layer Llama, whose `layers.0.resid_pre` is the token
embeddings: feature 0 of the one-token SAE fires on exactly one token (at a known activation),
feature 1 on every token at 0.01. Other SAEs have random weights and are checked against an
offline recomputation (the model run on the whole sequence, then encoded)."""

from __future__ import annotations

import pytest
import torch
from sae_builders import save_relu_sae

from mistudio_core.errors import MistudioError
from mistudio_core.feature_store import FeatureStore
from mistudio_core.hooks import HookPoint
from mistudio_core.models import ModelSpec, load_model
from mistudio_core.monitor import FeatureHit, Monitor, TokenFeatures
from mistudio_core.sae import load_sae

TEXT = "The cat watched the cat after lunch."
PROMPT = "The cat watched"


def _random_sae(directory, hook: str, d_sae: int = 24, seed: int = 1, context_size: int = 64):
    generator = torch.Generator().manual_seed(seed)
    decoder = torch.randn(d_sae, 32, generator=generator)
    encoder = torch.randn(d_sae, 32, generator=generator) * 0.3
    return save_relu_sae(directory, decoder, encoder, torch.zeros(d_sae), hook, context_size)


@pytest.fixture(scope="module")
def llama_dir(make_tiny_model) -> str:
    return str(make_tiny_model("llama", 1))


@pytest.fixture(scope="module")
def hooked(llama_dir):
    return load_model(ModelSpec(llama_dir), with_lm_head=True)


@pytest.fixture(scope="module")
def text_ids(tiny_tokenizer) -> list[int]:
    return tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def one_token(tmp_path_factory, hooked, text_ids):
    """(directory, margin, target): feature 0 reads the target token's embedding with its bias
    halfway between that token's score and the best other token's."""
    target = text_ids[1]
    embeddings = hooked.model.get_input_embeddings().weight.detach().float()
    scores = embeddings @ embeddings[target]
    own = float(scores[target])
    best_other = float(torch.cat([scores[:target], scores[target + 1:]]).max())
    margin = (own - best_other) / 2
    assert margin > 0.01
    encoder = torch.zeros(4, embeddings.shape[1])
    encoder[0] = embeddings[target]
    b_enc = torch.tensor([-(own + best_other) / 2, 0.01, -1.0, -1.0])
    decoder = torch.randn(4, embeddings.shape[1], generator=torch.Generator().manual_seed(0))
    directory = save_relu_sae(tmp_path_factory.mktemp("one") / "one", decoder, encoder, b_enc)
    store = FeatureStore.create(directory, {"d_sae": 4})
    store.save_explanations("stats", [(0, "the token cat", {})])
    store.close()
    return directory, margin, target


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _offline_codes(hooked, sae_dir, ids: list[int]) -> torch.Tensor:
    """[len(ids), d_sae]: the model run on the whole sequence at once, then encoded."""
    loaded = load_sae(sae_dir)
    hook = HookPoint.parse(loaded.metadata.hook_name)
    acts = hooked.activations(torch.tensor([ids]), [hook])[hook][0]
    return loaded.sae.encode(acts.float())


def _assert_matches(report: TokenFeatures, name: str, codes_row: torch.Tensor, top: int):
    hits = report.features[name]
    best = codes_row.topk(top)
    expected = [(int(i), float(v)) for v, i in zip(best.values, best.indices, strict=True)
                if v > 0]
    assert [hit.id for hit in hits] == [i for i, _ in expected]
    for hit, (_, value) in zip(hits, expected, strict=True):
        assert hit.activation == pytest.approx(value, rel=1e-4, abs=1e-5)


def test_read_reports_the_feature_exactly_on_its_token(hooked, one_token, text_ids,
                                                        tiny_tokenizer):
    directory, margin, target = one_token
    monitor = Monitor(hooked, [load_sae(directory)])
    streamed: list[TokenFeatures] = []

    tokens = monitor.read(TEXT, top=3, on_token=streamed.append)

    assert streamed == tokens
    assert [t.token_id for t in tokens] == text_ids  # BOS left out
    assert [t.position for t in tokens] == list(range(1, len(text_ids) + 1))
    assert [t.token for t in tokens] == [tiny_tokenizer.decode([i]) for i in text_ids]
    fired = [t.position for t in tokens if any(h.id == 0 for h in t.features["one"])]
    assert fired == [i + 1 for i, token in enumerate(text_ids) if token == target]
    assert len(fired) >= 2
    for token in tokens:
        hits = token.features["one"]
        if token.token_id == target:
            assert hits[0] == FeatureHit(0, pytest.approx(margin, abs=1e-3), "the token cat")
            assert [h.id for h in hits] == [0, 1]
        else:
            assert [h.id for h in hits] == [1]
        assert hits[-1] == (1, pytest.approx(0.01, abs=1e-6), None)
    document = tokens[fired[0] - 1].to_dict()
    assert document["features"]["one"][0] == {"id": 0, "activation": pytest.approx(margin,
                                              abs=1e-3), "explanation": "the token cat"}
    assert document["token_id"] == target and document["generated"] is False


def test_watched_features_are_reported_on_every_token(hooked, one_token, text_ids):
    """top=1 shows only feature 1 off the target token; watching 0 and 2 reports them on every
    token, firing or not, in the order asked, and refuses what does not exist."""
    directory, margin, target = one_token
    monitor = Monitor(hooked, [load_sae(directory)])
    tokens = monitor.read(TEXT, top=1, watch={"one": [2, 0]})
    for token in tokens:
        watched = token.watched["one"]
        assert [hit.id for hit in watched] == [2, 0]
        assert watched[0].activation == 0.0  # b_enc -1: never fires
        expected = margin if token.token_id == target else 0.0
        assert watched[1] == (0, pytest.approx(expected, abs=1e-3), "the token cat")
    assert tokens[0].to_dict()["watched"]["one"][0] == {"id": 2, "activation": 0.0,
                                                      "explanation": None}
    generation = monitor.generate(TEXT, max_new_tokens=2, watch={"one": [0]})
    assert all(len(t.watched["one"]) == 1 for t in generation.prompt_tokens + generation.tokens)
    for watch, message in (({"two": [0]}, "no SAE 'two'"), ({"one": [4]}, "has 4 features"),
                           ({"one": [True]}, "cannot watch True"), ({"one": 3}, "list of ids")):
        with pytest.raises(MistudioError, match=message) as caught:
            monitor.read(TEXT, watch=watch)
        assert caught.value.field == "watch"


def test_two_saes_at_two_hooks_come_from_one_pass(hooked, one_token, tmp_path, tiny_tokenizer):
    directory = one_token[0]
    post = _random_sae(tmp_path / "post", "layers.0.resid_post")
    monitor = Monitor(hooked, {"pre": load_sae(directory), "post": load_sae(post)})
    passes = []
    handle = hooked.model.get_input_embeddings().register_forward_hook(
        lambda *_: passes.append(1))
    try:
        tokens = monitor.read(TEXT, top=4)
    finally:
        handle.remove()
    assert len(passes) == 1
    ids = monitor.token_ids(TEXT)
    codes = {"pre": _offline_codes(hooked, directory, ids), "post": _offline_codes(hooked, post,
                                                                                   ids)}
    assert any(t.features["post"] for t in tokens)
    for token in tokens:
        for name in ("pre", "post"):
            _assert_matches(token, name, codes[name][token.position], 4)


def test_chunked_read_streams_the_same_features(hooked, tmp_path):
    post = _random_sae(tmp_path / "post", "layers.0.resid_post")
    monitor = Monitor(hooked, [load_sae(post)])
    whole = monitor.read(TEXT, top=3)
    streamed = []
    chunked = monitor.read(TEXT, top=3, chunk_tokens=3, on_token=streamed.append)
    assert streamed == chunked
    assert [t.position for t in chunked] == [t.position for t in whole]
    for a, b in zip(whole, chunked, strict=True):
        assert [h.id for h in a.features["post"]] == [h.id for h in b.features["post"]]
        for x, y in zip(a.features["post"], b.features["post"], strict=True):
            assert x.activation == pytest.approx(y.activation, rel=1e-4, abs=1e-5)


def test_generate_is_seeded_streams_each_token_and_matches_offline(hooked, tmp_path):
    post = _random_sae(tmp_path / "post", "layers.0.resid_post")
    monitor = Monitor(hooked, [load_sae(post)])
    streamed: list[TokenFeatures] = []
    first = monitor.generate(PROMPT, max_new_tokens=12, seed=3, top=3, on_token=streamed.append,
                             stop_at_eos=False)
    again = monitor.generate(PROMPT, max_new_tokens=12, seed=3, top=3, stop_at_eos=False)

    assert first.token_ids == again.token_ids and first.text == again.text
    assert streamed == first.prompt_tokens + first.tokens  # the prompt's first, after its pass
    assert len(first.tokens) == len(first.token_ids) == 12 and first.stopped == "length"
    other_seed = monitor.generate(PROMPT, max_new_tokens=12, seed=4, stop_at_eos=False)
    assert other_seed.token_ids != first.token_ids
    eos = hooked.tokenizer.eos_token_id
    assert eos in first.token_ids  # this tiny random model's seed-3 sample has one
    stopped = monitor.generate(PROMPT, max_new_tokens=12, seed=3)
    assert stopped.stopped == "eos"
    assert stopped.token_ids == first.token_ids[:first.token_ids.index(eos)]
    prompt_ids = monitor.token_ids(PROMPT)
    assert [t.token_id for t in first.tokens] == first.token_ids
    assert [t.position for t in first.tokens] == list(
        range(len(prompt_ids), len(prompt_ids) + len(first.tokens)))
    assert all(t.generated for t in first.tokens)
    assert not any(t.generated for t in first.prompt_tokens)
    assert [t.position for t in first.prompt_tokens] == list(range(1, len(prompt_ids)))

    codes = _offline_codes(hooked, post, prompt_ids + first.token_ids)
    for token in [*first.prompt_tokens, *first.tokens]:
        _assert_matches(token, "post", codes[token.position], 3)
    assert first.to_dict()["tokens"][0]["generated"] is True


def test_generate_greedy_follows_the_argmax(hooked, tmp_path):
    monitor = Monitor(hooked, [load_sae(_random_sae(tmp_path / "s", "layers.0.resid_pre"))])
    result = monitor.generate(PROMPT, max_new_tokens=5, temperature=0, seed=1)
    ids = monitor.token_ids(PROMPT)
    for token in result.token_ids:
        logits = hooked.forward(torch.tensor([ids])).logits[0, -1]
        assert token == int(logits.argmax())
        ids.append(token)
    different_seed = monitor.generate(PROMPT, max_new_tokens=5, temperature=0, seed=9)
    assert different_seed.token_ids == result.token_ids


def _recording_passes(hooked) -> tuple[list[dict], object]:
    """Record each forward pass's input width, cached length and attention-mask width."""
    passes: list[dict] = []

    def record(_module, _args, kwargs):
        cache = kwargs.get("past_key_values")
        mask = kwargs.get("attention_mask")
        passes.append({"tokens": kwargs["input_ids"].shape[1],
                       "cached": 0 if cache is None else cache.get_seq_length(),
                       "mask": None if mask is None else mask.shape[1]})

    return passes, hooked.model.register_forward_pre_hook(record, with_kwargs=True)


def test_generate_streams_the_prompt_after_one_pass_with_a_full_attention_mask(hooked,
                                                                               tmp_path):
    monitor = Monitor(hooked, [load_sae(_random_sae(tmp_path / "s", "layers.0.resid_post"))])
    passes, handle = _recording_passes(hooked)
    passes_at_first_report: list[int] = []
    try:
        result = monitor.generate(PROMPT, max_new_tokens=4, stop_at_eos=False, on_token=lambda _:
                                  passes_at_first_report.append(len(passes)))
    finally:
        handle.remove()
    assert passes_at_first_report[0] == 1  # the prompt's own pass, nothing sampled yet
    assert len(passes_at_first_report) == len(result.prompt_tokens) + 4
    prompt_length = len(monitor.token_ids(PROMPT))
    assert passes[0] == {"tokens": prompt_length, "cached": 0, "mask": prompt_length}
    for step, seen in enumerate(passes[1:]):  # each new token, its mask over all positions
        assert seen == {"tokens": 1, "cached": prompt_length + step,
                        "mask": prompt_length + step + 1}


def test_cancel_stops_generate_and_a_chunked_read(hooked, tmp_path):
    monitor = Monitor(hooked, [load_sae(_random_sae(tmp_path / "s", "layers.0.resid_post"))])
    whole = monitor.generate(PROMPT, max_new_tokens=8, seed=2, stop_at_eos=False)
    asked: list[int] = []
    cancelled = monitor.generate(PROMPT, max_new_tokens=8, seed=2, stop_at_eos=False,
                                 cancelled=lambda: asked.append(1) or len(asked) > 3)
    assert cancelled.stopped == "cancelled" and len(asked) == 4
    assert cancelled.token_ids == whole.token_ids[:3]
    assert cancelled.prompt_tokens == whole.prompt_tokens
    assert cancelled.to_dict()["stopped"] == "cancelled"
    never = monitor.generate(PROMPT, max_new_tokens=8, cancelled=lambda: False,
                             stop_at_eos=False)
    assert never.stopped == "length" and len(never.token_ids) == 8

    all_tokens = monitor.read(TEXT, chunk_tokens=3)
    asked.clear()
    part = monitor.read(TEXT, chunk_tokens=3, cancelled=lambda: asked.append(1) or len(asked) > 2)
    assert len(asked) == 3
    assert [t.position for t in part] == [t.position for t in all_tokens if t.position < 6]
    assert _hook_count(hooked.model) == 0


def test_hooks_are_removed_also_after_an_exception(hooked, one_token):
    monitor = Monitor(hooked, [load_sae(one_token[0])])
    ids = torch.tensor([monitor.token_ids(TEXT)])
    before_logits = hooked.forward(ids).logits
    before_hooks = _hook_count(hooked.model)

    monitor.read(TEXT)
    monitor.generate(PROMPT, max_new_tokens=3)
    assert _hook_count(hooked.model) == before_hooks

    def fail(_token):
        raise RuntimeError("the client went away")

    with pytest.raises(RuntimeError, match="went away"):
        monitor.generate(PROMPT, max_new_tokens=3, on_token=fail)
    with pytest.raises(RuntimeError, match="went away"):
        monitor.read(TEXT, on_token=fail, chunk_tokens=4)
    with pytest.raises(RuntimeError, match="went away"):
        monitor.read(TEXT, on_token=fail)
    assert _hook_count(hooked.model) == before_hooks
    torch.testing.assert_close(hooked.forward(ids).logits, before_logits, rtol=0, atol=0)


@pytest.mark.parametrize(("call", "field", "message"), [
    (lambda m: m.read("   "), "text", "empty"),
    (lambda m: m.read("word " * 40), "text", "at most 24"),
    (lambda m: m.read(TEXT, top=0), "top", "at least 1"),
    (lambda m: m.read(TEXT, chunk_tokens=0), "chunk_tokens", "positive"),
    (lambda m: m.generate(""), "prompt", "empty"),
    (lambda m: m.generate(PROMPT, max_new_tokens=0), "max_new_tokens", "positive"),
    (lambda m: m.generate(PROMPT, max_new_tokens=30), "max_new_tokens", "24-token context"),
    (lambda m: m.generate(PROMPT, temperature=-1.0), "temperature", ">= 0"),
    (lambda m: m.generate(PROMPT, top="5"), "top", "at least 1"),
])
def test_bad_input_is_refused_and_the_monitor_stays_usable(hooked, tmp_path, call, field,
                                                           message):
    monitor = Monitor(hooked, [load_sae(_random_sae(tmp_path / "s", "layers.0.resid_pre",
                                                    context_size=24))])
    hooks = _hook_count(hooked.model)
    with pytest.raises(MistudioError, match=message) as error:
        call(monitor)
    assert error.value.field == field
    assert _hook_count(hooked.model) == hooks
    assert monitor.read(TEXT)  # still usable


def test_saes_that_do_not_fit_the_model_are_refused(hooked, llama_dir, tmp_path):
    narrow = save_relu_sae(tmp_path / "narrow", torch.randn(4, 16))
    with pytest.raises(MistudioError, match="16-wide activations") as wide:
        Monitor(hooked, [load_sae(narrow)])
    assert wide.value.field == "sae" and wide.value.code == "bad_sae"
    assert str(narrow) in wide.value.message  # which of the session's SAEs
    deep = _random_sae(tmp_path / "deep", "layers.3.resid_post")
    with pytest.raises(MistudioError, match="has 1 layers") as layer:
        Monitor.load(ModelSpec(llama_dir), [deep])
    assert (layer.value.field, layer.value.code) == ("sae", "bad_sae")
    unnamed = load_sae(_random_sae(tmp_path / "unnamed", "layers.0.resid_pre"))
    unnamed.metadata.hook_name = ""
    with pytest.raises(MistudioError, match="which hook") as no_hook:
        Monitor(hooked, [unnamed])
    assert (no_hook.value.field, no_hook.value.code) == ("sae", "bad_sae")
    with pytest.raises(MistudioError, match="no SAE") as none:
        Monitor(hooked, [])
    assert none.value.field == "sae"


def test_load_names_saes_by_directory_and_reads_explanations(llama_dir, one_token, tmp_path):
    other = _random_sae(tmp_path / "one", "layers.0.resid_post")  # same directory name
    monitor = Monitor.load(ModelSpec(llama_dir), [one_token[0], other])
    assert monitor.names == ["one", "one-2"]
    assert monitor.saes[0].explanations == {0: "the token cat"}
    assert monitor.saes[1].explanations == {}
    tokens = monitor.read(TEXT, top=2)
    assert set(tokens[0].features) == {"one", "one-2"}


def test_gpt2_saes_at_two_layers_read_and_generate_as_offline(make_tiny_model, tmp_path):
    gpt2 = load_model(ModelSpec(str(make_tiny_model("gpt2", 3))), with_lm_head=True)
    mlp = _random_sae(tmp_path / "mlp", "layers.1.mlp_out", seed=2)
    post = _random_sae(tmp_path / "post", "layers.2.resid_post", seed=3)
    monitor = Monitor(gpt2, [load_sae(mlp), load_sae(post)])
    ids = monitor.token_ids(TEXT)
    codes = {"mlp": _offline_codes(gpt2, mlp, ids), "post": _offline_codes(gpt2, post, ids)}
    for chunk in (None, 5):
        for token in monitor.read(TEXT, top=3, chunk_tokens=chunk):
            for name in ("mlp", "post"):
                _assert_matches(token, name, codes[name][token.position], 3)
    result = monitor.generate(PROMPT, max_new_tokens=6, seed=0, top=3)
    full = monitor.token_ids(PROMPT) + result.token_ids
    offline = _offline_codes(gpt2, post, full)
    for token in result.tokens:
        _assert_matches(token, "post", offline[token.position], 3)
    assert _hook_count(gpt2.model) == 0
