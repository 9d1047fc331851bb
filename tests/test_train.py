"""The trainer and the training job: metrics, exact resume, OOM back-off, activation cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mistudio_core.activations import ExtractionConfig
from mistudio_core.errors import MistudioError
from mistudio_core.models import ModelSpec
from mistudio_core.runs import TrainJob, train_sae
from mistudio_core.sae import SparseAutoencoder
from mistudio_core.train import TrainConfig


@pytest.fixture(scope="module")
def gpt2_dir(make_tiny_model):
    return make_tiny_model("gpt2", n_layers=3)


def _job(model_dir, corpus, out, **overrides) -> TrainJob:
    train = dict(total_tokens=12 * 512, batch_tokens=512, log_every=2, checkpoint_every=3,
                 warmup_steps=2, seed=0)
    train.update(overrides.pop("train", {}))
    settings = dict(
        model=ModelSpec(str(model_dir)), hook="layers.1.resid_post", corpus=str(corpus),
        out=str(out), architecture="topk", k=4, expansion=4,
        extraction=ExtractionConfig(context_size=32, batch_windows=8),
        train=TrainConfig(**train),
    )
    settings.update(overrides)
    return TrainJob(**settings)


def test_training_writes_metrics_checkpoint_and_saelens_files(gpt2_dir, tiny_corpus, tmp_path):
    events = []
    result = train_sae(_job(gpt2_dir, tiny_corpus, tmp_path / "run"),
                       lambda kind, payload: events.append((kind, payload)))
    run = tmp_path / "run"
    assert result.steps == 12
    for name in ("cfg.json", "sae_weights.safetensors", "mistudio.json", "metrics.jsonl",
                 "checkpoint.pt"):
        assert (run / name).exists(), name
    points = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [2, 4, 6, 8, 10, 12]
    for field in ("loss", "mse", "l0", "fve", "dead_pct", "tokens_per_s", "lr"):
        assert field in points[-1]
    assert points[-1]["l0"] == pytest.approx(4.0)
    assert points[-1]["loss"] < points[0]["loss"]
    assert [kind for kind, _ in events].count("metrics") == 6
    assert events[-1][0] == "result"
    facts = json.loads((run / "mistudio.json").read_text())
    assert facts["hook"] == "layers.1.resid_post" and len(facts["corpus_sha256"]) == 64


def _weights(directory):
    return load_file(directory / "sae_weights.safetensors")


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(gpt2_dir, tiny_corpus, tmp_path):
    train_sae(_job(gpt2_dir, tiny_corpus, tmp_path / "whole"))

    class Interrupt(Exception):
        pass

    def stop_at_first_checkpoint(kind, payload):
        if kind == "checkpoint" and payload["step"] == 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_sae(_job(gpt2_dir, tiny_corpus, tmp_path / "split"), stop_at_first_checkpoint)
    assert not (tmp_path / "split" / "cfg.json").exists()
    train_sae(_job(gpt2_dir, tiny_corpus, tmp_path / "split", resume=True))
    whole, split = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    for name in whole:
        assert torch.equal(whole[name], split[name]), name
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]  # no point lost or repeated


def test_resume_with_other_settings_is_refused(gpt2_dir, tiny_corpus, tmp_path):
    train_sae(_job(gpt2_dir, tiny_corpus, tmp_path / "run"))
    with pytest.raises(MistudioError, match="other settings"):
        train_sae(_job(gpt2_dir, tiny_corpus, tmp_path / "run", k=8, resume=True))


def test_out_of_memory_halves_the_batch_and_goes_on(gpt2_dir, tiny_corpus, tmp_path, monkeypatch):
    original = SparseAutoencoder.training_forward

    def fails_on_big_batches(self, x, *args):
        if x.shape[0] > 256:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return original(self, x, *args)

    monkeypatch.setattr(SparseAutoencoder, "training_forward", fails_on_big_batches)
    logs = []
    result = train_sae(
        _job(gpt2_dir, tiny_corpus, tmp_path / "run"),
        lambda kind, payload: logs.append(payload["message"]) if kind == "log" else None,
    )
    assert result.steps == 12
    assert any("out of memory" in line and "2 micro-batches" in line for line in logs)
    assert sum("out of memory" in line for line in logs) == 1  # the split is kept, not redone


def test_activation_cache_is_reused_without_loading_the_model(gpt2_dir, tiny_corpus, tmp_path,
                                                               monkeypatch):
    cache = tmp_path / "cache"
    train_sae(_job(gpt2_dir, tiny_corpus, tmp_path / "first", cache=str(cache)))
    assert (cache / "manifest.json").exists()

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model must not be loaded when the cache has the data")

    monkeypatch.setattr("mistudio_core.runs.load_model", no_model)
    train_sae(_job(gpt2_dir, tiny_corpus, tmp_path / "second", cache=str(cache)))
    first, second = _weights(tmp_path / "first"), _weights(tmp_path / "second")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_every_architecture_trains_end_to_end(gpt2_dir, tiny_corpus, tmp_path):
    for architecture in ("relu", "batchtopk", "jumprelu"):
        result = train_sae(_job(gpt2_dir, tiny_corpus, tmp_path / architecture,
                                architecture=architecture))
        assert result.final_metrics["step"] == 12
        cfg = json.loads((tmp_path / architecture / "cfg.json").read_text())
        assert cfg["architecture"] == {"relu": "standard"}.get(architecture, "jumprelu")


def test_training_settings_are_validated():
    with pytest.raises(MistudioError, match="at least one batch"):
        TrainConfig(total_tokens=100, batch_tokens=4096)
    with pytest.raises(MistudioError, match="learning rate"):
        TrainConfig(lr=5.0)
    with pytest.raises(MistudioError, match="context size"):
        ExtractionConfig(context_size=1)


def test_learning_rate_schedule_warms_up_and_decays():
    config = TrainConfig(total_tokens=100 * 10, batch_tokens=10, warmup_steps=10,
                         decay_fraction=0.2)
    factors = [config.lr_factor(step) for step in range(100)]
    assert factors[0] < factors[5] < factors[10] == 1.0
    assert factors[50] == 1.0
    assert factors[99] < factors[90] < factors[80] <= 1.0
    assert config.learning_rate(2**14) == pytest.approx(2e-4)
