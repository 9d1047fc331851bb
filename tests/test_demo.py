"""Tests for the offline demo model: corpus extraction, build, cache and determinism.

The builds here use the real corpus, tokenizer and training loop but a one-layer, 64-wide model
(patched in through `DEMO_RECIPE`) and 25 steps, so each takes seconds on two CPU cores.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mistudio_core import demo
from mistudio_core.errors import MistudioError

TINY_STEPS = 25
LONG_DOC = "Return the number of items in the container, counting nested ones too."


@pytest.fixture(scope="module")
def small_recipe():
    """Shrink the model (not the corpus, tokenizer or loop) and read the stdlib once per module.

    One thread: a model this small only loses time to thread hand-offs, many times over on a
    machine that other processes keep busy.
    """
    recipe = replace(
        demo.DEMO_RECIPE, n_layer=1, n_embd=64, n_head=2, batch_size=8, eval_contexts=8
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setattr(demo, "DEMO_RECIPE", replace(recipe, steps=TINY_STEPS))
        patch.setattr(demo, "collect_docstrings", functools.cache(demo.collect_docstrings))
        yield recipe


@pytest.fixture(scope="module")
def built(small_recipe, tmp_path_factory) -> tuple[Path, list[str]]:
    """One tiny build shared by the tests below, with the progress lines it reported."""
    lines: list[str] = []
    out = tmp_path_factory.mktemp("demo") / "model"
    path = demo.build_demo_model(out, steps=TINY_STEPS, progress=lines.append)
    return path, lines


def _marker(model_dir: Path) -> dict:
    return json.loads((model_dir / demo.MARKER_NAME).read_text())


def _write(path: Path, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)


def test_collect_docstrings_keeps_long_unique_library_docs_in_order(tmp_path):
    _write(
        tmp_path / "b.py",
        f'"""Module b explains what this module is for, at some length."""\n'
        f'class C:\n    """{LONG_DOC}"""\n'
        f'    def f(self):\n        """Too short."""\n',
    )
    _write(tmp_path / "a.py", f'def g():\n    """\n    {LONG_DOC}\n    """\n')
    _write(tmp_path / "broken.py", '"""An unparsable file is skipped, docstring and all."""\ndef (')
    _write(tmp_path / "tests" / "test_x.py", '"""Test suites are not library documentation."""')
    _write(
        tmp_path / "site-packages" / "p.py",
        '"""Third-party code differs from machine to machine."""',
    )

    docs = demo.collect_docstrings(tmp_path)

    assert docs == [LONG_DOC, "Module b explains what this module is for, at some length."]


def test_split_is_deterministic_disjoint_and_balanced():
    docs = [f"document number {i} with some words in it" for i in range(2000)]
    train, held_out = demo.split_documents(docs, 0.5)
    assert demo.split_documents(docs, 0.5) == (train, held_out)
    assert demo.split_documents(docs[::-1], 0.5) == (train[::-1], held_out[::-1])
    assert sorted(train + held_out) == sorted(docs)
    assert not set(train) & set(held_out)
    assert 800 < len(held_out) < 1200
    assert demo.split_documents(docs, 0.0) == (docs, [])


def test_default_demo_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MISTUDIO_DEMO_DIR", str(tmp_path / "explicit"))
    assert demo.default_demo_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MISTUDIO_DEMO_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert demo.default_demo_dir() == tmp_path / "cache" / "mistudio" / "demo-model-v1"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_demo_dir() == tmp_path / "home" / ".cache" / "mistudio" / "demo-model-v1"
    assert demo.demo_corpus_path() == demo.default_demo_dir() / "corpus.jsonl"


def test_build_loads_with_the_auto_classes_and_generates(built):
    path, _ = built
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer) == _marker(path)["vocab_size"]
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    prompt = tokenizer("Return the", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 5)


def test_tokenizer_round_trips_text(built):
    tokenizer = AutoTokenizer.from_pretrained(built[0])
    text = "Return the value of `x`.\n\n    >>> f(1, 'é')  # ünïcode too\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.eos_token_id not in ids
    assert len(ids) < len(text.encode())
    assert tokenizer.decode(ids) == text


def test_corpus_jsonl_holds_the_held_out_docstrings(built):
    path, _ = built
    corpus = demo.demo_corpus_path(path)
    assert corpus == path / "corpus.jsonl"
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    stats = _marker(path)["corpus"]
    assert len(docs) == stats["held_out_documents"] > 1000
    assert len(set(docs)) == len(docs)
    assert all(len(doc) >= 40 and doc == doc.strip() for doc in docs)
    assert stats["lm_documents"] > 1000
    assert stats["held_out_tokens"] > 100_000
    _, held_out = demo.split_documents(docs, demo.DEMO_RECIPE.held_out_fraction)
    assert held_out == docs


def test_training_lowers_the_held_out_loss(built):
    marker = _marker(built[0])
    vocab_entropy = torch.log(torch.tensor(float(marker["vocab_size"]))).item()
    assert abs(marker["loss_before"] - vocab_entropy) < 1.0
    assert marker["loss_after"] < marker["loss_before"] - 0.5
    assert marker["steps"] == TINY_STEPS
    assert marker["torch_threads"] == 1
    assert any(line.startswith(f"training step {TINY_STEPS}/{TINY_STEPS}") for line in built[1])


def test_second_call_returns_the_cache_without_building(built):
    path, _ = built
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    lines: list[str] = []
    assert demo.build_demo_model(path, steps=TINY_STEPS, progress=lines.append) == path
    assert weights.stat().st_mtime_ns == stamp
    assert lines == [f"demo model already built at {path}"]


def test_ensure_demo_model_uses_the_default_dir(built, monkeypatch):
    monkeypatch.setenv("MISTUDIO_DEMO_DIR", str(built[0]))
    assert demo.ensure_demo_model() == built[0]


def test_a_cache_of_another_recipe_is_not_complete(built, small_recipe):
    path, _ = built
    assert demo.is_complete_build(path, replace(small_recipe, steps=TINY_STEPS))
    assert not demo.is_complete_build(path, replace(small_recipe, steps=TINY_STEPS + 1))
    assert not demo.is_complete_build(path.parent / "missing", small_recipe)


def test_forced_rebuild_gives_identical_weights(built, tmp_path):
    path, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    lines: list[str] = []
    demo.build_demo_model(copy, steps=TINY_STEPS, force=True, progress=lines.append)
    assert any(line.startswith("training step") for line in lines)
    first, second = load_file(path / "model.safetensors"), load_file(copy / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert (path / "tokenizer.json").read_text() == (copy / "tokenizer.json").read_text()
    assert (path / "corpus.jsonl").read_text() == (copy / "corpus.jsonl").read_text()
    assert not (tmp_path / ".copy.building").exists()


def test_unwritable_out_dir_is_a_user_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(MistudioError) as caught:
        demo.build_demo_model(blocker / "model", steps=TINY_STEPS)
    assert "cannot write the demo model" in caught.value.message
    assert caught.value.hint


def test_a_foreign_directory_is_never_replaced(tmp_path):
    (tmp_path / "precious.txt").write_text("user data")
    with pytest.raises(MistudioError, match="not a miStudio demo model directory"):
        demo.build_demo_model(tmp_path, steps=TINY_STEPS, force=True)
    assert (tmp_path / "precious.txt").read_text() == "user data"


def test_steps_must_be_positive(tmp_path):
    with pytest.raises(MistudioError, match="steps must be at least 1"):
        demo.build_demo_model(tmp_path / "model", steps=0)


def test_the_config_is_known_without_building_and_matches_the_build(built, monkeypatch,
                                                                    tmp_path):
    from mistudio_core.models import ModelSpec, load_config

    monkeypatch.setenv("MISTUDIO_DEMO_DIR", str(tmp_path / "not-built"))
    config = load_config(ModelSpec(demo.DEMO_MODEL_ALIAS))
    assert not (tmp_path / "not-built").exists()  # nothing was trained to answer
    assert (config.n_layer, config.n_embd) == (demo.DEMO_RECIPE.n_layer, demo.DEMO_RECIPE.n_embd)
    built_config = json.loads((built[0] / "config.json").read_text())
    assert demo.demo_config(demo.DEMO_RECIPE).vocab_size == built_config["vocab_size"]
    assert built_config["eos_token_id"] == 0 == config.eos_token_id
