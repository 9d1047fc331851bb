"""`mistudio monitor` and `mistudio steer` with --local, on the tiny 3-layer GPT-2 and a random
TopK SAE: JSON documents, the text renderings, the streamed tokens, and exit 2 (with the field
or the hint) for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from mistudio_core.sae import SAEConfig, SAEMetadata, SparseAutoencoder, save_sae
from mistudiod.cli import main
from mistudiod.interactive_text import steer_text

D_SAE = 64
TEXT = "The cat watched the blue window"


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig("topk", 32, D_SAE, k=8))
    metadata = SAEMetadata(model_name="tiny", hook_name="layers.1.resid_post", context_size=64)
    return str(save_sae(sae, tmp_path_factory.mktemp("sae") / "sae", metadata, {}))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _json(capsys, *argv: str) -> dict:
    status, out, _ = _run(capsys, *argv, "--json")
    document = json.loads(out)
    assert status == 0, document
    assert document["ok"] is True
    return document


def test_monitor_json_reports_every_token(capsys, sae_dir, model_dir, tiny_tokenizer):
    document = _json(capsys, "monitor", sae_dir, "--model", model_dir, "--text", TEXT,
                     "--top", "3", "--local")
    ids = tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert [t["token_id"] for t in document["tokens"]] == ids  # BOS left out
    assert document["saes"] == ["sae"] and document["mode"] == "read"
    for token in document["tokens"]:
        hits = token["features"]["sae"]
        assert 1 <= len(hits) <= 3
        assert all(0 <= h["id"] < D_SAE and h["activation"] > 0 for h in hits)
        assert [h["activation"] for h in hits] == sorted((h["activation"] for h in hits),
                                                         reverse=True)


def test_monitor_text_is_one_line_per_token_and_streams(capsys, sae_dir, model_dir,
                                                        tiny_tokenizer):
    status, out, err = _run(capsys, "monitor", sae_dir, "--model", model_dir, "--text", TEXT,
                            "--local")
    assert status == 0
    n_tokens = len(tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    lines = out.strip("\n").split("\n")
    assert len(lines) == n_tokens  # streamed as they came, not repeated at the end
    assert all(":" in line for line in lines)  # id:activation
    assert not err.strip()


def test_monitor_generate(capsys, sae_dir, model_dir):
    document = _json(capsys, "monitor", sae_dir, "--model", model_dir, "--text", TEXT,
                     "--generate", "5", "--seed", "3", "--local")
    assert document["mode"] == "generate"
    generated = [t for t in document["tokens"] if t["generated"]]
    assert 1 <= len(generated) <= 5
    assert document["tokens"][:-len(generated)]  # the prompt's tokens come first
    assert not any(t["generated"] for t in document["tokens"][:-len(generated)])


def _steer(capsys, sae_dir, model_dir, *extra: str) -> dict:
    return _json(capsys, "steer", sae_dir, "--model", model_dir, "--prompt", TEXT,
                 "--max-new-tokens", "6", "--local", *extra)


def test_steer_json_baseline_and_steered(capsys, sae_dir, model_dir):
    first = _steer(capsys, sae_dir, model_dir, "--feature", "5", "--strength", "4",
                   "--seed", "7")
    for side in ("baseline", "steered"):
        assert len(first[side]["token_ids"]) == 6 or first[side]["stopped_at_eos"]
        assert len(first[side]["activations"]) == len(first[side]["token_ids"])
    assert first["features"] == ["5"]
    means = first["mean_activation"]
    assert means["steered"][0] > means["baseline"][0]
    again = _steer(capsys, sae_dir, model_dir, "--feature", "9", "--strength", "-2",
                   "--seed", "7")
    assert again["baseline"]["token_ids"] == first["baseline"]["token_ids"]


def test_steer_two_features_and_clamp_to_zero(capsys, sae_dir, model_dir):
    document = _steer(capsys, sae_dir, model_dir, "--feature", "5", "--strength", "0",
                      "--feature", "6", "--strength", "0", "--mode", "clamp")
    assert [s["mode"] for s in document["steerings"]] == ["clamp", "clamp"]
    assert all(value == 0 for row in document["steered"]["activations"] for value in row)
    assert document["mean_activation"]["steered"] == [0.0, 0.0]


def test_steer_text_streams_and_renders_both_sides(capsys, sae_dir, model_dir):
    status, out, err = _run(capsys, "steer", sae_dir, "--model", model_dir, "--prompt", TEXT,
                            "--feature", "5", "--strength", "3", "--max-new-tokens", "4",
                            "--local")
    assert status == 0
    assert "baseline" in out and "steered (5 +3)" in out
    assert "feature 5: baseline" in out
    assert err.strip()  # the steered tokens, streamed
    document = {"prompt": "p", "prompt_tokens": 1, "seed": 0, "temperature": 1.0,
                "steerings": [{"label": "5", "mode": "add", "strength": 3.0}],
                "baseline": {"text": " left"}, "steered": {"text": " right"},
                "mean_activation": {"baseline": [0.5], "steered": [2.0]}}
    wide, narrow = steer_text(document, width=120), steer_text(document, width=40)
    assert any("│" in line and "left" in line and "right" in line for line in wide.split("\n"))
    assert "│" not in narrow
    assert narrow.index("left") < narrow.index("right")


def test_unknown_feature_exits_2_with_the_field(capsys, sae_dir, model_dir):
    status, out, _ = _run(capsys, "steer", sae_dir, "--model", model_dir, "--prompt", TEXT,
                          "--feature", str(D_SAE), "--strength", "1", "--local", "--json")
    assert status == 2
    error = json.loads(out)["error"]
    assert error["field"] == "feature" and str(D_SAE - 1) in error["hint"]


def test_strength_not_a_number_exits_2(capsys, sae_dir, model_dir):
    status, _, err = _run(capsys, "steer", sae_dir, "--model", model_dir, "--prompt", TEXT,
                          "--feature", "1", "--strength", "lots", "--local")
    assert status == 2 and "lots" in err
