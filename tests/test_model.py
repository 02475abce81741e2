"""GroupCDL model, noise estimator, metrics and weight files (tiny configs, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

import circatt_ops as ca
from circatt_cli.metrics import psnr, ssim
from circatt_cli.model import PRESETS, GroupCDLConfig, fit_window, preset_for
from circatt_cli.noise import estimate_sigma
from circatt_cli.weights import WeightsError, card_path, load_model, preset_weights, save_model


def smooth(batch: int, channels: int, h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = 0.5 + 0.3 * torch.sin(3 * xx + 2 * yy) * torch.cos(2 * yy)
    return img.expand(batch, channels, h, w).clone()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(8, 8), (16, 16), (13, 17), (1, 1), (1, 6), (3, 2)])
def test_forward_shapes(tiny_model, channels, size):
    model = tiny_model(channels)
    y = torch.rand(2, channels, *size)
    out = model(y, torch.tensor([0.05, 0.1]))
    assert out.shape == y.shape and torch.isfinite(out).all()


def test_presets_and_window_shrink():
    gray, color = GroupCDLConfig.preset("gray"), GroupCDLConfig.preset("color")
    assert (gray.channels, gray.iterations, gray.filters, gray.attn_channels, gray.window) == (1, 30, 169, 64, 35)
    assert (color.channels, color.iterations, color.filters, color.attn_channels) == (3, 24, 96, 48)
    assert gray.update_layers() == [1, 5, 10, 15, 20, 25, 30]
    assert GroupCDLConfig.from_dict(gray.to_dict()) == gray
    assert [fit_window(35, h, w) for h, w in [(64, 64), (20, 30), (1, 9), (4, 4)]] == [35, 19, 1, 3]
    with pytest.raises(ValueError):
        GroupCDLConfig.preset("sepia")
    assert [PRESETS[preset_for(c)].channels for c in (1, 3)] == [1, 3]


def test_sigma_changes_output(tiny_model):
    model = tiny_model()
    with torch.no_grad():
        model.tau[:, 1] = 1.0
        model.rho[:, 1] = 3.0
    y = torch.rand(1, 1, 16, 16)
    assert not torch.allclose(model(y, 0.02), model(y, 0.2))


def test_attention_at_and_receptive_field(tiny_model):
    model = tiny_model(iterations=6)
    y = torch.rand(1, 1, 8, 12)
    G, theta, phi = model.attention_at(y, 0.1, layer=5)
    assert isinstance(G, ca.Circulant)
    assert G.spatial_size == (4, 6) and G.window == 3
    assert theta.shape == phi.shape == (1, 4, 4, 6)
    rows = G.sum("rows")
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    assert model.receptive_field > model.config.window
    with pytest.raises(ValueError):
        model.attention_at(y, 0.1, layer=7)


def test_initialisation_gram_norm_is_one(tiny_model):
    model = tiny_model()
    z = torch.randn(1, 8, 64, 64)
    for _ in range(100):
        z = z / z.norm()
        z = model._analyse(model._synthesise(z, model.dictionary), model.dictionary)
    assert z.norm().item() == pytest.approx(1.0, rel=0.01)
    assert torch.equal(model.analysis[0], model.synthesis[-1])
    assert (model.w_beta >= 0).all() and model.gamma.item() == pytest.approx(0.8)


def test_projections_hold_after_a_step(tiny_model):
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    y = torch.rand(2, 1, 16, 16)
    (model(y, 0.1) - y).square().mean().backward()
    opt.step()
    with torch.no_grad():
        for p, shift in ((model.tau, -2.0), (model.w_beta, -2.0), (model.rho, -5.0), (model.gamma, 5.0)):
            p.add_(shift)
        model.analysis.mul_(10.0)
    model.project_()
    for kernel in (model.analysis, model.synthesis, model.dictionary.unsqueeze(0)):
        assert (kernel.flatten(3).norm(dim=-1) <= 1 + 1e-5).all()
    assert (model.tau >= 0).all() and (model.w_beta >= 0).all()
    assert (model.rho[:, 0] >= 0.1).all()
    assert 0.05 <= model.gamma.item() <= 0.95


def test_tiny_model_overfits_a_synthetic_image(tiny_model):
    model = tiny_model(iterations=3)
    clean = smooth(1, 1, 24, 24)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = (model(noisy, 0.1) - clean).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.project_()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5


def test_estimate_sigma_on_synthetic_noise():
    clean = smooth(2, 3, 128, 128)
    for sigma in (5 / 255, 25 / 255, 50 / 255):
        noisy = clean + sigma * torch.randn(clean.shape)
        assert estimate_sigma(noisy) == pytest.approx(torch.full((2,), sigma), rel=0.1)
    assert estimate_sigma(torch.rand(1, 1, 1, 5)).item() == 0.0


def test_psnr_by_hand():
    ref = torch.full((2, 1, 4, 4), 0.5)
    x = ref.clone()
    x[0] += 0.1
    x[1, 0, 0, 0] += 0.4
    expected = torch.tensor([20.0, 10 * math.log10(16 / 0.16)])
    assert torch.allclose(psnr(x, ref), expected, atol=1e-4)
    assert torch.isinf(psnr(ref, ref)).all()


def test_ssim_by_hand():
    a, b = 0.2, 0.6
    x, ref = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    c1 = 0.01**2
    assert ssim(x, ref).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    img = torch.rand(1, 1, 20, 20)
    assert ssim(img, img).item() == pytest.approx(1.0)


def test_ssim_matches_scikit_image():
    skimage = pytest.importorskip("skimage.metrics")
    ref = smooth(1, 1, 40, 36)
    x = (ref + 0.1 * torch.randn(ref.shape)).clamp(0, 1)
    theirs = skimage.structural_similarity(
        x[0, 0].double().numpy(), ref[0, 0].double().numpy(), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0,
    )
    assert ssim(x, ref).item() == pytest.approx(theirs, abs=1e-6)


def test_weights_roundtrip_and_corruption(tiny_model, tmp_path, monkeypatch):
    model = tiny_model(3)
    path = preset_weights("color", tmp_path)
    card = save_model(model, path, {"note": "test"})
    assert card_path(path).exists() and len(card["sha256"]) == 64
    monkeypatch.setenv("CIRCATT_WEIGHTS", str(tmp_path))
    loaded = load_model("color")
    assert not loaded.training and loaded.config == model.config
    for name, t in model.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupted"):
        load_model(path)
    with pytest.raises(WeightsError, match="no weights file"):
        load_model("gray")


def test_a_model_that_is_not_a_weights_file_names_the_choices(tiny_weights, tmp_path):
    card = card_path(preset_weights("gray", tiny_weights))
    with pytest.raises(WeightsError, match=r"is not a weights file: give a preset \(gray or color\)"):
        load_model(card)  # the card beside the weights, not the weights (was: "corrupted", its own sha256)
    with pytest.raises(WeightsError, match=r"no weights file at sepia \(give a preset"):
        load_model("sepia")
