"""GUIDE on StyleGAN2 (method="guide" / "guide_average"), its report and the GAN erase path, on a tiny
random-weight generator of rosinality's layout and the testbed encoder (plus a random ArcFace ONNX)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastforget as ff
from fastforget.errors import InputError
from fastforget.methods.guide import laplacian_l1, spread, ufo_targets

STEPS = dict(steps=25, invert_steps=20, lr=1e-2)  # a few steps: a large lr so the tiny test moves


@pytest.fixture(scope="module")
def gan():
    from fastforget.models.stylegan2 import Generator, StyleGAN2Model

    torch.manual_seed(0)
    return StyleGAN2Model(Generator(32, 32, 2, channels={4: 16, 8: 16, 16: 8, 32: 8}))


@pytest.fixture(scope="module")
def enc():
    return ff.load_encoder("demo")


def _photos(gan, seeds):
    return [(gan.generate(seed=s, output_type="np")[0] * 255).round().astype(np.uint8) for s in seeds]


@pytest.fixture(scope="module")
def erased(gan, enc):
    return ff.erase(gan, _photos(gan, [5]), method="guide", encoder=enc, progress=False, verify_n=1, **STEPS)


def test_ufo_target_is_the_mirror_point(gan):
    w = gan.mapping(torch.randn(3, gan.style_dim))[:, None].expand(3, gan.n_latent, gan.style_dim)
    t = ufo_targets(gan, w, 1.0)
    avg = gan.w_avg.expand_as(w)
    assert torch.allclose((t - avg).flatten(1).norm(dim=1), torch.full((3,), spread(gan)), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity((t - avg).flatten(1), (w - avg).flatten(1))
    assert torch.allclose(cos, -torch.ones(3), atol=1e-5)
    assert torch.equal(ufo_targets(gan, w, 1.0, "average"), avg)


def test_laplacian_l1_is_zero_on_equal_images_and_grows_with_difference():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.all(laplacian_l1(x, x) == 0)
    assert torch.all(laplacian_l1(x, x + 0.1 * torch.randn_like(x)) < laplacian_l1(x, x + 0.5 * torch.randn_like(x)))


def test_guide_patches_synthesis_only_and_moves_the_target_more_than_others(gan, erased):
    names = erased.patch.names
    assert names and all(n.startswith("generator.") and not n.startswith("generator.style.") for n in names)
    m = erased.report.metrics
    assert all(np.isfinite(v) for v in m.values())
    # the target's latent is redrawn as someone else far more than random latents are
    assert m["id"] < m["random_id"] - 0.05
    assert erased.report.grid is not None and erased.report.grid.ndim == 3
    # the caller's model is untouched; the erased one shares the mapping network
    assert erased.model.generator.style[1].weight is gan.generator.style[1].weight


def test_guide_is_deterministic(gan, enc, erased):
    again = ff.erase(gan, _photos(gan, [5]), method="guide", encoder=enc, progress=False, report=False, **STEPS)
    assert again.patch.to_bytes() == erased.patch.to_bytes()


def test_guide_average_and_several_people_and_latents(gan, enc):
    photos = _photos(gan, [7, 8])
    res = ff.erase(gan, photos, method="guide_average", encoder=enc, progress=False, report=False, **STEPS)
    assert res.patch.metadata["config"]["target"] == "average" and len(res.patch.metadata["targets"]) == 2
    w = gan.mapping(torch.randn(2, gan.style_dim, generator=torch.Generator().manual_seed(3)))
    w = w[:, None].expand(2, gan.n_latent, gan.style_dim).contiguous()
    res = ff.erase(gan, w, method="guide", encoder=enc, progress=False, report=False, steps=5)
    assert res.patch.names


def test_guide_bad_options_and_targets_are_typed(gan, enc):
    with pytest.raises(InputError, match="steps"):
        ff.erase(gan, _photos(gan, [1]), method="guide", encoder=enc, steps=0)
    with pytest.raises(InputError, match="target"):
        ff.erase(gan, _photos(gan, [1]), method="guide", encoder=enc, target="moon")
    with pytest.raises(InputError, match="targets"):
        ff.erase(gan, torch.zeros(1, 3, gan.style_dim), method="guide", encoder=enc)
    with pytest.raises(InputError, match="model"):
        ff.erase(gan, _photos(gan, [1]), method="closed_form", encoder=enc)


def test_guide_with_an_onnx_encoder(gan, tmp_path):
    """A real-layout ArcFace ONNX encoder has no gradients: inversion uses pixels, the ID term is left out."""
    from PIL import Image
    from test_arcface_onnx import export_tiny_arcface

    export_tiny_arcface(tmp_path / "arcface.onnx")
    enc = ff.load_encoder(tmp_path / "arcface.onnx")
    photos = [np.asarray(Image.fromarray(p).resize((112, 112))) for p in _photos(gan, [5])]
    res = ff.erase(gan, photos, method="guide", encoder=enc, progress=False, verify_n=1, steps=5, invert_steps=5,
                   neighbours=2)
    assert res.patch.metadata["id_loss"] is False
    assert res.patch.metadata["neighbours_mined"] == 0  # mining needs encoder gradients: none, and it says so
    assert all(np.isfinite(v) for v in res.report.metrics.values())


def test_identity_neighbours_are_the_same_person_elsewhere_in_w(enc):
    """Mined neighbours (ours) lie `radius` spreads from the target's latent, where other photos of a
    person invert, and the unedited testbed GAN draws them as the target, which the start points are not."""
    from fastforget.methods.guide import mine_neighbours

    gan = ff.load("demo-gan")
    w_u = gan.latents(n=2, seed=4)
    gen = torch.Generator().manual_seed(0)
    start = mine_neighbours(gan, w_u, enc, m=3, radius=1.5, steps=0, gen=torch.Generator().manual_seed(0))
    w_nb = mine_neighbours(gan, w_u, enc, m=3, radius=1.5, steps=40, gen=gen)
    with torch.no_grad():
        e_u = enc.encode_tensor(gan.synthesis(w_u)).repeat_interleave(3, 0)
        cos_nb = (enc.encode_tensor(gan.synthesis(w_nb)) * e_u).sum(-1)
        cos_start = (enc.encode_tensor(gan.synthesis(start)) * e_u).sum(-1)
    dist = (w_nb - w_u.repeat_interleave(3, 0)).flatten(1).norm(dim=1) / spread(gan)
    assert torch.all(dist > 1.0), dist
    assert cos_nb.min() > 0.8 and cos_start.mean() < 0.6, (cos_nb, cos_start)


def test_verify_gan_needs_a_baseline(gan, enc):
    with pytest.raises(InputError, match="baseline"):
        ff.verify(gan, _photos(gan, [1]), encoder=enc)
