"""SAE architectures, sparse kernels and the SAELens file format."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mistudio_core.errors import MistudioError
from mistudio_core.sae import SAEConfig, SAEMetadata, SparseAutoencoder, load_sae, save_sae
from mistudio_core.sae.sparse import SparseCodes, sparse_decode

ARCHITECTURES = ["relu", "topk", "batchtopk", "jumprelu"]


def _sae(architecture: str, d_in: int = 16, d_sae: int = 64, k: int = 4) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(architecture, d_in, d_sae, k=k))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def _dense_topk_loss(sae: SparseAutoencoder, x: torch.Tensor, k: int) -> torch.Tensor:
    """The textbook TopK SAE loss, built from dense tensors, as the reference."""
    pre = F.linear(x - sae.b_dec, sae.encoder_weight, sae.b_enc)
    values, indices = pre.topk(k, dim=1)
    features = torch.zeros_like(pre).scatter(1, indices, F.relu(values))
    x_hat = features @ sae.W_dec + sae.b_dec
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def test_sparse_topk_gradients_equal_the_dense_reference():
    sae = _sae("topk")
    x = torch.randn(128, 16)
    sae.training_forward(x, dead_mask=None).loss.backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    _dense_topk_loss(sae, x, k=4).backward()
    for name, parameter in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], parameter.grad, atol=1e-6, rtol=1e-5)


def test_sparse_decode_matches_dense_product_and_its_gradients():
    torch.manual_seed(1)
    weight = torch.randn(32, 8, requires_grad=True)
    values = torch.rand(10, 3, requires_grad=True)
    indices = torch.stack([torch.randperm(32)[:3] for _ in range(10)])
    codes = SparseCodes.from_topk(values, indices, 32)
    out = sparse_decode(codes, weight)
    dense = codes.to_dense()
    torch.testing.assert_close(out, dense @ weight)
    out.pow(2).sum().backward()
    sparse_grad_weight, sparse_grad_values = weight.grad.clone(), values.grad.clone()
    weight.grad, values.grad = None, None
    dense_values = torch.zeros(10, 32).scatter(1, indices, values)
    (dense_values @ weight).pow(2).sum().backward()
    torch.testing.assert_close(sparse_grad_weight, weight.grad)
    torch.testing.assert_close(sparse_grad_values, values.grad)


def test_topk_keeps_exactly_k_latents_per_token():
    sae = _sae("topk", k=5)
    features = sae.encode(torch.randn(20, 16))
    assert features.shape == (20, 64)
    assert ((features > 0).sum(1) <= 5).all()
    assert (features > 0).sum() > 20 * 3  # most tokens have all k active at init


def test_batchtopk_keeps_k_per_token_on_average_and_tracks_a_threshold():
    sae = _sae("batchtopk", k=4)
    output = sae.training_forward(torch.randn(50, 16), dead_mask=None)
    assert output.l0.item() <= 4.0 + 1e-6
    assert sae.threshold_buffer.min() > 0  # learned from the kept activations
    assert torch.all(sae.threshold_buffer == sae.threshold_buffer[0])  # one global threshold


def test_aux_k_loss_only_with_dead_latents():
    sae = _sae("topk")
    x = torch.randn(64, 16)
    assert sae.training_forward(x, dead_mask=None).aux_loss.item() == 0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    output = sae.training_forward(x, dead_mask=dead)
    assert output.aux_loss.item() > 0
    output.loss.backward()
    # The AuxK gradient reaches the dead latents' encoder rows even if they are not in the top k.
    assert sae.encoder_weight.grad[:10].abs().sum() > 0


def test_dense_and_sparse_aux_k_paths_agree(monkeypatch):
    """AuxK is computed densely for few dead latents and sparsely for many: same loss, grads."""
    import mistudio_core.sae.model as model_module

    x = torch.randn(64, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[5:30] = True
    results = []
    for factor in (1000, 0):  # dense path, then sparse path
        monkeypatch.setattr(model_module, "_DENSE_AUX_K_FACTOR", factor)
        sae = _sae("topk")
        output = sae.training_forward(x, dead_mask=dead)
        output.loss.backward()
        results.append((output.aux_loss, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (dense_aux, dense_grads), (sparse_aux, sparse_grads) = results
    torch.testing.assert_close(dense_aux, sparse_aux)
    for name in dense_grads:
        torch.testing.assert_close(dense_grads[name], sparse_grads[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_learns_to_reconstruct(architecture):
    torch.manual_seed(0)
    basis = torch.randn(32, 16)
    codes = (torch.rand(4096, 32) < 0.08) * torch.rand(4096, 32) * 3
    data = codes @ basis
    sae = SparseAutoencoder(SAEConfig(architecture, 16, 64, k=4, l1_coefficient=0.5,
                                      l0_coefficient=0.01))
    sae.initialize_decoder_bias(data.mean(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    first = None
    for step in range(200):
        batch = data[(step * 256) % 4096:][:256]
        output = sae.training_forward(batch, dead_mask=None)
        output.loss.backward()
        sae.remove_parallel_decoder_gradient()
        optimizer.step()
        optimizer.zero_grad()
        sae.normalize_decoder()
        first = output.fvu.item() if first is None else first
    assert output.fvu.item() < 0.6 * first
    if sae.config.unit_norm_decoder:
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_folding_the_input_scale_keeps_features_and_reconstruction(architecture):
    sae = _sae(architecture)
    with torch.no_grad():
        sae.threshold_buffer.fill_(0.05)
    x = torch.randn(40, 16) * 7
    sae.input_scale = 0.25
    features_before = sae.encode(x * 0.25)
    reconstruction_before = sae(x * 0.25) / 0.25
    sae.fold_input_scale()
    torch.testing.assert_close(sae.encode(x), features_before, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae(x), reconstruction_before, atol=1e-4, rtol=1e-4)


def _metadata() -> SAEMetadata:
    return SAEMetadata(model_name="tiny", hook_name="layers.1.resid_post", context_size=64)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saelens_format_round_trip(tmp_path, architecture):
    sae = _sae(architecture)
    with torch.no_grad():
        sae.threshold_buffer.fill_(0.1)
    save_sae(sae, tmp_path, _metadata(), {"seed": 3})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    expected = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu",
                "jumprelu": "jumprelu"}[architecture]
    assert cfg["architecture"] == expected
    assert cfg["normalize_activations"] == "none"
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["hook_name"] == "layers.1.resid_post"
    if architecture == "topk":
        assert cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "sae_weights.safetensors")
    assert tensors["W_enc"].shape == (16, 64) and tensors["W_dec"].shape == (64, 16)
    assert ("threshold" in tensors) == (expected == "jumprelu")
    loaded = load_sae(tmp_path)
    assert loaded.training["seed"] == 3 and loaded.training["architecture"] == architecture
    x = torch.randn(30, 16)
    torch.testing.assert_close(loaded.sae.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.sae(x), sae(x), atol=1e-5, rtol=1e-5)


def _write_saelens_dir(path, cfg: dict, tensors: dict) -> None:
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, path / "sae_weights.safetensors")


def test_loads_a_saelens_directory_written_by_another_tool(tmp_path):
    """An older SAELens 'standard' SAE: no architecture key, hook at the top level."""
    torch.manual_seed(2)
    tensors = {"W_enc": torch.randn(8, 24), "b_enc": torch.randn(24), "W_dec": torch.randn(24, 8),
               "b_dec": torch.randn(8)}
    cfg = {"d_in": 8, "d_sae": 24, "hook_name": "layers.3.resid_pre", "model_name": "x",
           "context_size": 32, "dtype": "float32", "normalize_activations": "none"}
    _write_saelens_dir(tmp_path / "sae", cfg, tensors)
    loaded = load_sae(tmp_path / "sae")
    assert loaded.sae.config.architecture == "relu"
    assert loaded.metadata.hook_name == "layers.3.resid_pre" and loaded.training == {}
    x = torch.randn(5, 8)
    expected = F.relu((x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"])
    torch.testing.assert_close(loaded.sae.encode(x), expected, atol=1e-5, rtol=1e-5)


def test_topk_with_decoder_norm_rescaling_is_folded_on_load(tmp_path):
    torch.manual_seed(3)
    tensors = {"W_enc": torch.randn(8, 24), "b_enc": torch.randn(24),
               "W_dec": torch.randn(24, 8) * 3, "b_dec": torch.randn(8)}
    cfg = {"architecture": "topk", "d_in": 8, "d_sae": 24, "k": 3,
           "rescale_acts_by_decoder_norm": True,
           "metadata": {"hook_name": "layers.0.resid_post", "model_name": "x"}}
    _write_saelens_dir(tmp_path / "sae", cfg, tensors)
    sae = load_sae(tmp_path / "sae").sae
    x = torch.randn(6, 8)
    norms = tensors["W_dec"].norm(dim=1)
    pre = ((x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]) * norms
    values, indices = pre.topk(3, dim=1)
    features = torch.zeros_like(pre).scatter(1, indices, F.relu(values))
    expected = features @ (tensors["W_dec"] / norms[:, None]) + tensors["b_dec"]
    torch.testing.assert_close(sae(x), expected, atol=1e-4, rtol=1e-4)


def test_bad_sae_directories_get_clear_errors(tmp_path):
    with pytest.raises(MistudioError, match="not an SAE directory"):
        load_sae(tmp_path)
    _write_saelens_dir(tmp_path / "gated", {"architecture": "gated", "d_in": 4, "d_sae": 8},
                       {"W_enc": torch.zeros(4, 8)})
    with pytest.raises(MistudioError, match="cannot run"):
        load_sae(tmp_path / "gated")
    _write_saelens_dir(tmp_path / "no-k", {"architecture": "topk", "d_in": 4, "d_sae": 8},
                       {"W_enc": torch.zeros(4, 8)})
    with pytest.raises(MistudioError, match="without k"):
        load_sae(tmp_path / "no-k")
    _write_saelens_dir(tmp_path / "shapes", {"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2},
                       {"W_enc": torch.zeros(8, 4), "b_enc": torch.zeros(8),
                        "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4)})
    with pytest.raises(MistudioError, match="W_enc should be"):
        load_sae(tmp_path / "shapes")


def test_bad_sae_configs_are_refused():
    with pytest.raises(MistudioError, match="unknown SAE architecture"):
        SAEConfig("gated", 4, 8)
    with pytest.raises(MistudioError, match="k=9"):
        SAEConfig("topk", 4, 8, k=9)
    with pytest.raises(MistudioError, match="widths"):
        SAEConfig("relu", 0, 8)
