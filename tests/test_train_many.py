"""Many SAEs from one extraction: several hooks, `layers.*.SITE`, and sweeps, each SAE the same
as training it alone, resumed exactly after a stop between two SAEs' checkpoint writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mistudio_core.activations import ExtractionConfig
from mistudio_core.errors import MistudioError
from mistudio_core.hooks import HookPoint, parse_hooks
from mistudio_core.models import ModelSpec
from mistudio_core.runs import TrainJob, train_sae
from mistudio_core.sae import load_sae
from mistudio_core.sweep import parse_sweep
from mistudio_core.train import TrainConfig
from mistudiod.cli import main

HOOKS = "layers.0.resid_post,layers.2.mlp_out"


@pytest.fixture(scope="module")
def gpt2_dir(make_tiny_model):
    return make_tiny_model("gpt2", n_layers=3)


def _job(model_dir, corpus, out, **overrides) -> TrainJob:
    settings = dict(
        model=ModelSpec(str(model_dir)), hook=HOOKS, corpus=str(corpus), out=str(out),
        architecture="topk", k=4, expansion=4,
        extraction=ExtractionConfig(context_size=32, batch_windows=8),
        train=TrainConfig(total_tokens=12 * 512, batch_tokens=512, log_every=2,
                          checkpoint_every=3, warmup_steps=2, seed=0),
    )
    settings.update(overrides)
    return TrainJob(**settings)


def _same_weights(one, other) -> None:
    first, second = (load_file(d / "sae_weights.safetensors") for d in (one, other))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_hooks_and_a_sweep_train_one_sae_each_as_if_alone(gpt2_dir, tiny_corpus, tmp_path):
    result = train_sae(_job(gpt2_dir, tiny_corpus, tmp_path / "many", sweep=("k=2,4",)))
    expected = [(hook, k) for hook in HOOKS.split(",") for k in (2, 4)]
    assert [(sae.hook, sae.variant["k"]) for sae in result.saes] == expected
    for hook, k in expected:
        directory = tmp_path / "many" / hook / f"k-{k}"
        loaded = load_sae(directory)
        assert (loaded.metadata.hook_name, loaded.sae.config.k) == (hook, k)
        assert json.loads((directory / "mistudio.json").read_text())["sweep"] == {"k": k}
    assert result.to_dict()["saes"][3]["path"] == str(tmp_path / "many" / "layers.2.mlp_out" /
                                                      "k-4")
    # Each SAE is exactly the one a run of its hook and k alone trains: same batches, same
    # initialisation, nothing shared but the extraction.
    alone = tmp_path / "alone"
    train_sae(_job(gpt2_dir, tiny_corpus, alone, hook="layers.2.mlp_out", k=2))
    _same_weights(alone, tmp_path / "many" / "layers.2.mlp_out" / "k-2")


def test_a_stop_between_two_checkpoint_writes_resumes_exactly(gpt2_dir, tiny_corpus, tmp_path):
    whole = tmp_path / "whole"
    train_sae(_job(gpt2_dir, tiny_corpus, whole))

    class Stop(Exception):
        pass

    written = []

    def stop_after_one_of_two_writes(kind, payload):
        if kind == "checkpoint":
            written.append(payload["step"])
            if payload["step"] == 6:
                raise Stop  # the first SAE has step 6 on disk, the second still step 3

    split = tmp_path / "split"
    with pytest.raises(Stop):
        train_sae(_job(gpt2_dir, tiny_corpus, split), stop_after_one_of_two_writes)
    assert written == [3, 3, 6]
    train_sae(_job(gpt2_dir, tiny_corpus, split, resume=True))
    for hook in HOOKS.split(","):
        _same_weights(whole / hook, split / hook)


def test_every_layer_and_the_cli(gpt2_dir, tiny_corpus, tmp_path, capsys):
    status = main(["train", "--model", str(gpt2_dir), "--hook", "layers.*.resid_post",
                   "--corpus", str(tiny_corpus), "--out", str(tmp_path / "all"), "--k", "4",
                   "--expansion", "2", "--tokens", "2048", "--batch-tokens", "512",
                   "--context-size", "32", "--sweep", "expansion=2,4", "--local", "--json"])
    document = json.loads(capsys.readouterr().out)
    assert status == 0, document
    saes = [(sae["hook"], sae["variant"]) for sae in document["saes"]]
    assert saes == [(f"layers.{layer}.resid_post", {"expansion": e}) for layer in range(3)
                    for e in (2, 4)]
    assert load_sae(tmp_path / "all" / "layers.1.resid_post" / "expansion-4").sae.config.d_sae \
        == 4 * 32


def test_hook_lists_and_sweeps_are_checked():
    assert parse_hooks("layers.*.mlp_out,layers.0.mlp_out", 2) == [
        HookPoint(0, "mlp_out"), HookPoint(1, "mlp_out")]
    assert parse_sweep(["k=16,32,16", "architecture=relu,topk"]) == {
        "k": [16, 32], "architecture": ["relu", "topk"]}
    for bad, message in ((["k=a,b"], "must be int"), (["width=2"], "cannot sweep"),
                         (["k=1", "k=2"], "swept twice"), (["k="], "cannot sweep")):
        with pytest.raises(MistudioError, match=message) as caught:
            parse_sweep(bad)
        assert caught.value.field == "sweep"
    with pytest.raises(MistudioError, match="unknown hook"):
        parse_hooks("layers.*.everything", 2)


def test_gpus_in_this_process_is_refused_with_the_way_to_run_it(gpt2_dir, tiny_corpus, tmp_path,
                                                                capsys):
    status = main(["train", "--model", str(gpt2_dir), "--hook", "layers.0.resid_post",
                   "--corpus", str(tiny_corpus), "--out", str(tmp_path / "x"), "--gpus", "2",
                   "--local"])
    error = capsys.readouterr().err
    assert status == 2 and "torchrun --nproc-per-node 2" in error
    assert not (tmp_path / "x").exists()
