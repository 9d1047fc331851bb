"""Shared fixtures: a deterministic text corpus, a tiny BPE tokenizer, tiny random models, and
real daemons that are stopped and cleaned up after each test.

Nothing is downloaded: the tokenizer is trained on the corpus, the models are built from small
configs with random weights and saved with `save_pretrained`, so tests load them through the
same code path as a real checkpoint (`load_model(ModelSpec(str(directory)))`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mistudio_core.demo import END_OF_TEXT

if TYPE_CHECKING:
    from daemon_process import DaemonProcess

TINY_VOCAB = 320
TINY_HIDDEN = 32
TINY_POSITIONS = 128
# Wider than the usual 0.02, so that every sub-layer's update is large next to float32 noise.
INIT_RANGE = 0.2

_SUBJECTS = (
    "the cat",
    "a young teacher",
    "my neighbour",
    "the old engine",
    "every student",
    "the river",
    "a quiet farmer",
    "the city council",
    "our garden",
    "the tall tree",
    "a small dog",
    "the market",
    "her brother",
    "the morning train",
    "a tired doctor",
)
_VERBS = (
    "watched",
    "carried",
    "painted",
    "found",
    "followed",
    "built",
    "remembered",
    "opened",
    "cleaned",
    "described",
    "sold",
    "visited",
    "repaired",
    "counted",
    "ignored",
)
_OBJECTS = (
    "the blue window",
    "a heavy basket",
    "the long road",
    "three apples",
    "the broken clock",
    "a letter from home",
    "the empty station",
    "some warm bread",
    "the wooden bridge",
    "a box of old photographs",
    "the north field",
    "the evening news",
    "a red kite",
)
_ENDINGS = (
    "before the rain started",
    "after lunch",
    "in the quiet village",
    "near the harbour",
    "without a word",
    "for the second time",
    "during the long winter",
    "at the end of the day",
    "with great care",
    "while the children slept",
)


def corpus_documents(n_documents: int = 300, seed: int = 1234) -> list[str]:
    """Short English-ish paragraphs, always the same ones for the same arguments."""
    rng = random.Random(seed)
    documents = []
    for _ in range(n_documents):
        sentences = []
        for _ in range(rng.randint(2, 4)):
            sentence = (
                f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                f"{rng.choice(_ENDINGS)}."
            )
            sentences.append(sentence[0].upper() + sentence[1:])
        documents.append(" ".join(sentences))
    return documents


@pytest.fixture(scope="session")
def tiny_documents() -> list[str]:
    """The documents of `tiny_corpus`, in order."""
    return corpus_documents()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A .txt corpus of a few hundred blank-line-separated paragraphs."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(corpus_documents()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A GPT-2 style byte-level BPE tokenizer (~320 tokens), `<|endoftext|>` as bos/eos/pad:
    the demo model's tokenizer recipe on the tiny corpus."""
    from mistudio_core.demo import train_tokenizer

    return train_tokenizer(corpus_documents(), TINY_VOCAB, TINY_POSITIONS)


TINY_MODEL_TYPES = (
    "gpt2",
    "gpt_neox",
    "llama",
    "mistral",
    "qwen2",
    "phi",
    "phi3",
    "gemma2",
    "bert",
)


def tiny_config(model_type: str, n_layers: int, tokenizer):
    """A small config of `model_type` whose vocabulary and special ids match `tokenizer`."""
    import transformers

    special = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    ids = {"bos_token_id": special, "eos_token_id": special, "pad_token_id": special}
    vocab = len(tokenizer)
    hidden, heads, inner = TINY_HIDDEN, 4, 2 * TINY_HIDDEN
    decoder = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "intermediate_size": inner,
        "max_position_embeddings": TINY_POSITIONS,
        "initializer_range": INIT_RANGE,
        **ids,
    }
    if model_type == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=n_layers,
            n_head=heads,
            n_positions=TINY_POSITIONS,
            initializer_range=INIT_RANGE,
            **ids,
        )
    if model_type == "gpt_neox":
        return transformers.GPTNeoXConfig(
            **decoder, rotary_pct=0.5, use_parallel_residual=True, tie_word_embeddings=False
        )
    if model_type in ("llama", "qwen2"):
        config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
        return config_class[model_type](**decoder, num_key_value_heads=2)
    if model_type == "mistral":
        return transformers.MistralConfig(**decoder, num_key_value_heads=2, sliding_window=16)
    if model_type == "phi":
        return transformers.PhiConfig(**decoder, partial_rotary_factor=0.5)
    if model_type == "phi3":
        return transformers.Phi3Config(**decoder, num_key_value_heads=2)
    if model_type == "gemma2":
        return transformers.Gemma2Config(
            **decoder,
            num_key_value_heads=2,
            head_dim=hidden // heads,
            sliding_window=16,
            query_pre_attn_scalar=hidden // heads,
        )
    if model_type == "bert":
        return transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            intermediate_size=inner,
            max_position_embeddings=TINY_POSITIONS,
            initializer_range=INIT_RANGE,
            pad_token_id=special,
        )
    raise ValueError(f"no tiny config for {model_type!r}")


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory, tiny_tokenizer) -> Callable[..., Path]:
    """`make_tiny_model(model_type, n_layers=3)`: a saved tiny random model (built once)."""
    built: dict[tuple[str, int], Path] = {}

    def make(model_type: str, n_layers: int = 3) -> Path:
        if (model_type, n_layers) in built:
            return built[(model_type, n_layers)]
        import torch
        from transformers import AutoModelForCausalLM, BertForMaskedLM

        config = tiny_config(model_type, n_layers, tiny_tokenizer)
        torch.manual_seed(0)
        if model_type == "bert":
            model = BertForMaskedLM(config)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        directory = tmp_path_factory.mktemp(f"{model_type}-{n_layers}")
        model.save_pretrained(directory)
        tiny_tokenizer.save_pretrained(directory)
        built[(model_type, n_layers)] = directory
        return directory

    return make


@pytest.fixture(scope="module")
def model_dir(make_tiny_model) -> str:
    """The tiny 3-layer GPT-2 that the CLI, daemon and TUI tests run jobs on."""
    return str(make_tiny_model("gpt2", n_layers=3))


@pytest.fixture
def queue(tmp_path):
    """An empty job queue (`mistudiod.queue.JobQueue`) on a temporary database."""
    from mistudiod.queue import JobQueue

    queue = JobQueue(tmp_path / "q.db")
    yield queue
    queue.close()


@pytest.fixture
def start_daemon(tmp_path) -> Iterator[Callable[..., DaemonProcess]]:
    """`start_daemon(*args, env=None)`: a started `mistudiod` with these extra arguments, on
    directories under the test's `tmp_path`. Every daemon it started is stopped and its runtime
    directory removed when the test ends, whether it passed or not."""
    from daemon_process import DaemonProcess

    with contextlib.ExitStack() as cleanup:
        started = 0

        def start(*extra: str, env: dict | None = None) -> DaemonProcess:
            nonlocal started
            root = tmp_path if started == 0 else tmp_path / f"daemon-{started}"
            root.mkdir(exist_ok=True)
            started += 1
            daemon = DaemonProcess(root, *extra, env=env)
            cleanup.callback(daemon.close)
            return daemon.start()

        yield start
