"""Corpora, window packing, activation chunks, shuffled resumable batches and the on-disk cache.

The model is conftest's tiny random GPT-2 loaded up to layer 1 through `load_model`; the corpus
is conftest's deterministic text file. Shuffling properties that need every row to be unique are
checked on a fake source whose rows are their own ids.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mistudio_core.activation_cache import MANIFEST, ActivationCache, CachedActivationSource
from mistudio_core.activations import (
    ActivationChunk,
    ExtractionConfig,
    ModelActivationSource,
    ShuffledBatches,
    StreamPosition,
)
from mistudio_core.corpus import Corpus, pack_windows
from mistudio_core.distributed import DataParallel
from mistudio_core.errors import MistudioError
from mistudio_core.hooks import HookPoint
from mistudio_core.models import ModelSpec, load_model

CONTEXT = 16
BATCH_WINDOWS = 4
HOOKS = [HookPoint(1, "resid_post"), HookPoint(0, "mlp_out")]
D_IN = 32  # conftest's tiny hidden size
CPU = torch.device("cpu")


def take(iterator, n: int) -> list:
    return list(itertools.islice(iterator, n))


@pytest.fixture(scope="module")
def hooked(make_tiny_model):
    return load_model(ModelSpec(str(make_tiny_model("gpt2", 3))), up_to_layer=1)


@pytest.fixture(scope="module")
def corpus(tiny_corpus) -> Corpus:
    return Corpus.open(tiny_corpus)


@pytest.fixture(scope="module")
def source(hooked, corpus) -> ModelActivationSource:
    config = ExtractionConfig(context_size=CONTEXT, batch_windows=BATCH_WINDOWS)
    return ModelActivationSource(hooked, corpus, HOOKS, config)


@pytest.fixture(scope="module")
def first_chunks(source) -> list[ActivationChunk]:
    return take(source.chunks(), 6)


def assert_same_chunk(a: ActivationChunk, b: ActivationChunk) -> None:
    assert a.index == b.index
    assert torch.equal(a.tokens, b.tokens)
    assert set(a.activations) == set(b.activations)
    for hook in a.activations:
        assert a.activations[hook].dtype == b.activations[hook].dtype
        assert torch.equal(a.activations[hook], b.activations[hook]), hook


# --- corpora -------------------------------------------------------------------------------------


def test_text_corpus_splits_on_blank_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text(
        "\n\nFirst document,\nover two lines.\n\n\n   \nSecond one.\n\nThird   \n", encoding="utf-8"
    )
    corpus = Corpus.open(path)
    assert list(corpus.documents()) == [
        "First document,\nover two lines.",
        "Second one.",
        "Third",
    ]


def test_tiny_corpus_round_trips(corpus, tiny_documents):
    assert list(corpus.documents()) == tiny_documents


def test_jsonl_corpus_with_default_and_other_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [
        {"text": "alpha", "body": "one"},
        {"text": "", "body": "two"},
        {"text": "gamma", "body": "   "},
        {"text": "delta", "body": "four"},
    ]
    path.write_text(
        "\n".join(json.dumps(r) for r in rows[:2])
        + "\n\n"
        + "\n".join(json.dumps(r) for r in rows[2:])
        + "\n"
    )
    assert list(Corpus.open(path).documents()) == ["alpha", "gamma", "delta"]
    assert list(Corpus.open(path, text_field="body").documents()) == ["one", "two", "four"]


def test_parquet_corpus(tmp_path):
    path = tmp_path / "docs.parquet"
    table = pa.table(
        {
            "id": [1, 2, 3, 4],
            "content": ["first", None, "  ", "fourth"],
            "text": ["a", "b", "c", "d"],
        }
    )
    pq.write_table(table, path)
    assert list(Corpus.open(path, text_field="content").documents()) == ["first", "fourth"]
    assert list(Corpus.open(path).documents()) == ["a", "b", "c", "d"]
    with pytest.raises(MistudioError, match="no column 'body'") as caught:
        Corpus.open(path, text_field="body")
    assert "content" in caught.value.message


def test_missing_corpus_file(tmp_path):
    with pytest.raises(MistudioError, match="does not exist") as caught:
        Corpus.open(tmp_path / "absent.txt")
    assert caught.value.code == "bad_corpus"


def test_unsupported_corpus_suffix(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(MistudioError, match=r"unsupported format \(\.csv\)") as caught:
        Corpus.open(path)
    assert ".jsonl" in caught.value.hint


def test_bad_json_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken}\n')
    corpus = Corpus.open(path)  # the first document is fine
    with pytest.raises(MistudioError, match="line 3 is not valid JSON"):
        list(corpus.documents())
    first_line_bad = tmp_path / "first.jsonl"
    first_line_bad.write_text("not json\n")
    with pytest.raises(MistudioError, match="line 1 is not valid JSON"):
        Corpus.open(first_line_bad)


def test_jsonl_line_without_the_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "elsewhere"}\n')
    with pytest.raises(MistudioError, match="line 2 has no string field 'text'") as caught:
        list(Corpus.open(path).documents())
    assert "--text-field" in caught.value.hint
    not_an_object = tmp_path / "list.jsonl"
    not_an_object.write_text('["text"]\n')
    with pytest.raises(MistudioError, match="line 1 has no string field"):
        Corpus.open(not_an_object)


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.txt", ""), ("blank.txt", "\n   \n\n"), ("empty.jsonl", '{"text": "  "}\n\n')],
)
def test_empty_corpus(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MistudioError, match="holds no text") as caught:
        Corpus.open(path)
    assert caught.value.code == "bad_corpus"


def test_fingerprint_follows_the_bytes(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("one\n\ntwo\n")
    first = Corpus.open(path).fingerprint()
    assert first == Corpus.open(path).fingerprint()
    path.write_text("one\n\ntwo!\n")
    assert Corpus.open(path).fingerprint() != first


# --- packing -------------------------------------------------------------------------------------


def token_stream(documents, tokenizer) -> list[int]:
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    return stream


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_pack_windows(tiny_documents, tiny_tokenizer, prepend_bos):
    windows = list(pack_windows(tiny_documents, tiny_tokenizer, CONTEXT, prepend_bos))
    assert windows == list(pack_windows(tiny_documents, tiny_tokenizer, CONTEXT, prepend_bos))
    assert all(len(window) == CONTEXT for window in windows)
    # The bodies, concatenated, are the token stream (documents + end-of-text), last part dropped.
    stream = token_stream(tiny_documents, tiny_tokenizer)
    body = CONTEXT - 1 if prepend_bos else CONTEXT
    assert len(windows) == len(stream) // body
    if prepend_bos:
        assert all(window[0] == tiny_tokenizer.bos_token_id for window in windows)
        bodies = [token for window in windows for token in window[1:]]
    else:
        bodies = [token for window in windows for token in window]
    assert bodies == stream[: len(windows) * body]
    assert len(tiny_documents) > 256  # so packing crosses its tokenizing batches


# --- activation chunks ---------------------------------------------------------------------------


def test_chunks_drop_special_tokens(source, first_chunks, hooked):
    special = set(hooked.tokenizer.all_special_ids)
    assert special == {hooked.tokenizer.eos_token_id}
    windows = take(source.windows(), BATCH_WINDOWS * len(first_chunks))
    for index, chunk in enumerate(first_chunks):
        assert chunk.index == index
        batch = windows[index * BATCH_WINDOWS : (index + 1) * BATCH_WINDOWS]
        flat = [token for window in batch for token in window]
        n_special = sum(token in special for token in flat)
        assert n_special >= BATCH_WINDOWS  # at least the BOS of each window
        assert chunk.n_tokens == BATCH_WINDOWS * CONTEXT - n_special
        assert chunk.tokens.tolist() == [token for token in flat if token not in special]
        for hook in HOOKS:
            assert chunk.activations[hook].shape == (chunk.n_tokens, D_IN)
        # The kept rows are exactly the non-special positions of a plain forward pass.
        ids = torch.tensor(batch)
        keep = ~torch.isin(ids, torch.tensor(sorted(special))).reshape(-1)
        direct = hooked.activations(ids, HOOKS)
        for hook in HOOKS:
            expected = direct[hook].reshape(-1, D_IN)[keep]
            torch.testing.assert_close(chunk.activations[hook], expected, atol=1e-5, rtol=0)


def test_chunks_resume_at_any_index(source, first_chunks):
    for start in (1, 4):
        resumed = take(source.chunks(start), 2)
        for chunk, expected in zip(resumed, first_chunks[start : start + 2], strict=True):
            assert_same_chunk(chunk, expected)


def test_keeping_special_tokens(hooked, corpus):
    config = ExtractionConfig(
        context_size=CONTEXT, batch_windows=BATCH_WINDOWS, exclude_special_tokens=False
    )
    chunk = next(ModelActivationSource(hooked, corpus, HOOKS, config).chunks())
    assert chunk.n_tokens == BATCH_WINDOWS * CONTEXT
    assert chunk.tokens[0].item() == hooked.tokenizer.bos_token_id


def test_windows_cycle_over_the_corpus(source, corpus, hooked):
    per_epoch = len(list(pack_windows(corpus.documents(), hooked.tokenizer, CONTEXT)))
    windows = take(source.windows(), per_epoch + 2)
    assert windows[per_epoch : per_epoch + 2] == windows[:2]


def test_source_errors(hooked, corpus, tmp_path):
    with pytest.raises(MistudioError, match="longer than") as caught:
        ModelActivationSource(hooked, corpus, HOOKS, ExtractionConfig(context_size=256))
    assert "128" in caught.value.hint
    with pytest.raises(MistudioError, match="past the last loaded layer"):
        ModelActivationSource(hooked, corpus, [HookPoint(2, "resid_post")], ExtractionConfig())
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.\n")
    small = ModelActivationSource(hooked, Corpus.open(short), HOOKS, ExtractionConfig(64, 2))
    with pytest.raises(MistudioError, match="fewer tokens than one context window"):
        next(small.chunks())


@pytest.mark.parametrize(
    "kwargs", [{"context_size": 1}, {"context_size": 1 << 17}, {"batch_windows": 0}]
)
def test_extraction_config_ranges(kwargs):
    with pytest.raises(MistudioError):
        ExtractionConfig(**kwargs)


# --- shuffled batches ----------------------------------------------------------------------------


class CountingSource:
    """Chunks whose rows are their own global ids (hook A) and twice that (hook B)."""

    hooks = [HookPoint(0, "resid_post"), HookPoint(1, "resid_post")]

    def __init__(self) -> None:
        sizes = [40 + (7 * index) % 13 for index in range(64)]
        self.starts = np.cumsum([0, *sizes]).tolist()
        self.requested: list[int] = []

    def chunks(self, start: int = 0, wanted=None):
        self.requested.append(start)
        for index in itertools.count(start):
            if wanted is not None and not wanted(index):
                continue
            ids = torch.arange(self.starts[index], self.starts[index + 1], dtype=torch.float32)
            rows = ids[:, None].expand(-1, 3)
            yield ActivationChunk(index, {self.hooks[0]: rows, self.hooks[1]: 2 * rows}, ids.long())


def test_data_parallel_ranks_take_disjoint_blocks_that_cover_the_stream():
    """Two ranks of a data-parallel run: rank r takes blocks r, r + 2, ...; together they see
    every block's rows once, the same rows a single stream's blocks hold; positions count the
    whole stream's blocks, and a resumed rank goes on from its own."""
    batch_tokens, block_chunks = 32, 3
    single = ShuffledBatches(CountingSource(), CountingSource.hooks, batch_tokens, block_chunks,
                             seed=7, device=CPU)
    ranks = [ShuffledBatches(CountingSource(), CountingSource.hooks, batch_tokens, block_chunks,
                             seed=7, device=CPU, parallel=DataParallel(rank, 2))
             for rank in range(2)]
    hook = CountingSource.hooks[0]

    def rows_by_block(stream, n_blocks):
        blocks: dict[int, set] = {}
        for batch, position in stream:
            if position.block >= n_blocks:
                return blocks
            blocks.setdefault(position.block, set()).update(batch[hook][:, 0].tolist())
        return blocks

    everything = rows_by_block(single.batches(), 6)
    shards = [rows_by_block(shuffled.batches(), 6) for shuffled in ranks]
    assert sorted(shards[0]) == [0, 2, 4] and sorted(shards[1]) == [1, 3, 5]
    assert {**shards[0], **shards[1]} == everything
    resumed = next(ranks[1].batches(StreamPosition(2, 1)))[1]
    assert resumed == StreamPosition(3, 1)  # block 2 is rank 0's: rank 1 goes on at block 3


def test_batches_cover_each_block_without_repeats():
    fake = CountingSource()
    batch_tokens, block_chunks = 32, 3
    shuffled = ShuffledBatches(fake, fake.hooks, batch_tokens, block_chunks, seed=7, device=CPU)
    by_block: dict[int, list[torch.Tensor]] = {}
    for batch, position in take(shuffled.batches(), 30):
        a, b = batch[fake.hooks[0]], batch[fake.hooks[1]]
        assert a.shape == (batch_tokens, 3)
        assert torch.equal(b, 2 * a)  # the same rows for every hook
        by_block.setdefault(position.block, []).append(a[:, 0])
    assert fake.requested == [0]
    assert len(by_block) >= 3
    for block, batches in list(by_block.items())[:-1]:  # the last one may be incomplete
        rows = torch.cat(batches).long()
        first, end = fake.starts[block * block_chunks], fake.starts[(block + 1) * block_chunks]
        assert rows.unique().numel() == rows.numel()
        assert rows.min() >= first and rows.max() < end
        assert rows.numel() == (end - first) // batch_tokens * batch_tokens
        assert not torch.equal(rows, torch.arange(first, first + rows.numel()))  # shuffled


def test_seeds_give_different_orders_of_the_same_rows():
    fake = CountingSource()

    def first_block(seed: int) -> torch.Tensor:
        shuffled = ShuffledBatches(fake, fake.hooks, 8, 2, seed=seed, device=CPU)
        batches = take(shuffled.batches(), (fake.starts[2] - fake.starts[0]) // 8)
        return torch.cat([batch[fake.hooks[0]][:, 0] for batch, _ in batches])

    zero, one = first_block(0), first_block(1)
    assert torch.equal(first_block(0), zero)
    assert not torch.equal(zero, one)
    # Both are the block's rows (2 chunks), each once; only the tail that fits no batch differs.
    n_rows = fake.starts[2] // 8 * 8
    for order in (zero, one):
        assert order.numel() == n_rows
        assert order.unique().numel() == n_rows
        assert order.min() >= 0 and order.max() < fake.starts[2]
    assert torch.isin(zero, one).sum() >= n_rows - 7


def test_resuming_gives_exactly_the_same_batches(source):
    shuffled = ShuffledBatches(source, HOOKS, batch_tokens=16, block_chunks=2, seed=3, device=CPU)
    uninterrupted = take(shuffled.batches(), 16)
    positions = [position for _, position in uninterrupted]
    assert positions[0] == StreamPosition(0, 1)
    assert len({p.block for p in positions}) >= 3
    per_block = max(p.batch for p in positions if p.block == 0)
    assert positions[per_block] == StreamPosition(1, 1)
    for k in (2, per_block, per_block + 3):
        resumed = take(shuffled.batches(positions[k - 1]), len(uninterrupted) - k)
        assert len(resumed) == len(uninterrupted) - k
        for (batch, position), (expected, expected_position) in zip(
            resumed, uninterrupted[k:], strict=True
        ):
            assert position == expected_position
            for hook in HOOKS:
                assert torch.equal(batch[hook], expected[hook]), (k, position, hook)


def test_batch_larger_than_a_block(source):
    shuffled = ShuffledBatches(
        source, HOOKS, batch_tokens=10_000, block_chunks=1, seed=0, device=CPU
    )
    with pytest.raises(MistudioError, match="fewer than a batch"):
        next(shuffled.batches())
    with pytest.raises(MistudioError, match="must be positive"):
        ShuffledBatches(source, HOOKS, batch_tokens=0, block_chunks=1, seed=0, device=CPU)


# --- activation cache ----------------------------------------------------------------------------


def cache_key(data: Corpus, /, **changes) -> dict:
    key = {
        "model": "tiny-gpt2",
        "revision": None,
        "hooks": [hook.name for hook in HOOKS],
        "corpus": data.fingerprint(),
        "context_size": CONTEXT,
        "batch_windows": BATCH_WINDOWS,
        "prepend_bos": True,
        "d_in": D_IN,
    }
    return {**key, **changes}


def no_extractor():
    raise AssertionError("the extractor was built although every chunk is cached")


def test_cache_writes_then_reads_without_the_model(tmp_path, source, corpus, first_chunks):
    directory = tmp_path / "cache"
    cache = ActivationCache(directory, cache_key(corpus), torch.float32)
    assert cache.n_chunks == 0
    built = []

    def factory():
        built.append(True)
        return source

    written = take(CachedActivationSource(cache, factory).chunks(), 3)
    cache.flush()
    assert built == [True]
    for chunk, expected in zip(written, first_chunks, strict=False):
        assert_same_chunk(chunk, expected)
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["n_tokens"] == sum(c.n_tokens for c in first_chunks[:3])
    assert manifest["key"]["context_size"] == CONTEXT
    assert cache.n_chunks == 3
    shard = manifest["shards"][0]
    assert set(shard["files"]) == {*cache_key(corpus)["hooks"], "tokens"}
    assert all((directory / name).is_file() for name in shard["files"].values())

    again = ActivationCache(directory, cache_key(corpus), torch.float32)
    assert again.n_chunks == 3
    reader = CachedActivationSource(again, no_extractor)
    assert reader.d_in == D_IN
    for chunk, expected in zip(take(reader.chunks(), 3), first_chunks, strict=False):
        assert_same_chunk(chunk, expected)
    assert_same_chunk(next(reader.chunks(2)), first_chunks[2])

    # A cache with more hooks serves a run that needs fewer of them.
    subset = ActivationCache(directory, cache_key(corpus, hooks=[HOOKS[0].name]), torch.float32)
    assert subset.n_chunks == 3


def test_cache_is_extended_by_the_extractor(tmp_path, source, corpus, first_chunks):
    directory = tmp_path / "cache"
    cache = ActivationCache(directory, cache_key(corpus), torch.float32)
    take(CachedActivationSource(cache, lambda: source).chunks(), 2)
    cache.flush()
    longer = ActivationCache(directory, cache_key(corpus), torch.float32)
    chunks = take(CachedActivationSource(longer, lambda: source).chunks(), 5)
    longer.flush()
    for chunk, expected in zip(chunks, first_chunks, strict=False):
        assert_same_chunk(chunk, expected)
    final = ActivationCache(directory, cache_key(corpus), torch.float32)
    assert final.n_chunks == 5
    assert len(final.shards) == 2
    assert_same_chunk(final.chunk(4), first_chunks[4])


def test_shuffled_batches_from_the_cache_match_the_model(tmp_path, source, corpus):
    cache = ActivationCache(tmp_path / "cache", cache_key(corpus), torch.float32)
    take(CachedActivationSource(cache, lambda: source).chunks(), 4)
    cache.flush()
    reader = CachedActivationSource(
        ActivationCache(tmp_path / "cache", cache_key(corpus), torch.float32), no_extractor
    )
    from_model = ShuffledBatches(source, HOOKS, 16, 2, seed=5, device=CPU)
    from_cache = ShuffledBatches(reader, HOOKS, 16, 2, seed=5, device=CPU)
    n_batches = 2 * sum(1 for _ in take(from_model.batches(), 100) if _[1].block == 0)
    for (a, pa_), (b, pb) in zip(
        take(from_model.batches(), n_batches), take(from_cache.batches(), n_batches), strict=True
    ):
        assert pa_ == pb
        for hook in HOOKS:
            assert torch.equal(a[hook], b[hook])


@pytest.mark.parametrize(
    ("changes", "dtype", "difference"),
    [
        ({"context_size": 32}, torch.float32, "context_size: cached 16, asked 32"),
        ({"corpus": "0" * 64}, torch.float32, "corpus"),
        ({"hooks": ["layers.1.resid_post", "layers.1.mlp_out"]}, torch.float32, "hooks"),
        ({}, torch.bfloat16, "dtype"),
    ],
)
def test_cache_with_other_settings_is_refused(
    tmp_path, corpus, first_chunks, changes, dtype, difference
):
    cache = ActivationCache(tmp_path, cache_key(corpus), torch.float32)
    cache.append(first_chunks[0])
    cache.flush()
    with pytest.raises(MistudioError, match="made with other settings") as caught:
        ActivationCache(tmp_path, cache_key(corpus, **changes), dtype)
    assert difference in caught.value.message
    assert "--cache" in caught.value.hint


def test_bfloat16_activations_round_trip_exactly(tmp_path):
    hooks = [HookPoint(0, "resid_post"), HookPoint(3, "mlp_out")]
    key = {"model": "hand-made", "hooks": [h.name for h in hooks], "d_in": 8}
    generator = torch.Generator().manual_seed(0)
    special = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), 1e-40, -3.0e38, 1.0, -2.5], dtype=torch.bfloat16
    )
    chunks = []
    for index, n in enumerate((5, 3, 7)):
        activations = {
            hook: (torch.randn(n, 8, generator=generator) * 10 ** (i + 1)).to(torch.bfloat16)
            for i, hook in enumerate(hooks)
        }
        activations[hooks[0]][0] = special
        chunks.append(ActivationChunk(index, activations, torch.arange(n) + 100 * index))
    cache = ActivationCache(tmp_path, key, torch.bfloat16)
    for chunk in chunks[:2]:
        cache.append(chunk)
    cache.flush()
    cache.append(chunks[2])
    cache.flush()
    with pytest.raises(ValueError, match="out of order"):
        cache.append(chunks[0])

    reread = ActivationCache(tmp_path, key, torch.bfloat16)
    assert reread.n_chunks == 3
    assert reread.chunk_tokens == [5, 3, 7]
    for chunk in chunks:
        back = reread.chunk(chunk.index)
        assert torch.equal(back.tokens, chunk.tokens)
        for hook in hooks:
            assert back.activations[hook].dtype == torch.bfloat16
            assert torch.equal(
                back.activations[hook].view(torch.int16), chunk.activations[hook].view(torch.int16)
            )
    with pytest.raises(MistudioError, match="other settings"):
        ActivationCache(tmp_path, key, torch.float16)


def test_cache_directory_is_only_created_on_flush(tmp_path, corpus):
    directory = Path(tmp_path) / "lazy"
    ActivationCache(directory, cache_key(corpus), torch.float32).flush()
    assert not directory.exists()
