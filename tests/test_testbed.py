"""The built-in testbed: renderer determinism, encoder geometry, generator recognisability."""
import numpy as np
import pytest
import torch

import fastforget as ff
from fastforget.metrics import class_centroids, identity_scores, verification_rates
from fastforget.testbed.renderer import N_FACTORS, identity_factors


def test_render_shapes_and_determinism():
    im, ids = ff.testbed.render([3, 7, 11], per_identity=4, seed=5)
    assert im.shape == (12, 32, 32, 3) and im.dtype == np.uint8
    assert ids.tolist() == [3] * 4 + [7] * 4 + [11] * 4
    im2, _ = ff.testbed.render([3, 7, 11], per_identity=4, seed=5)
    assert np.array_equal(im, im2)
    im3, _ = ff.testbed.render([3, 7, 11], per_identity=4, seed=6)
    assert not np.array_equal(im, im3)
    big, _ = ff.testbed.render([3], per_identity=1, seed=0, size=128)
    assert big.shape == (1, 128, 128, 3)


def test_identity_is_a_pure_function_of_its_id():
    assert N_FACTORS >= 12
    f = identity_factors([42, 42, 1_000_000_123])
    assert np.array_equal(f[0], f[1]) and not np.allclose(f[0], f[2])
    # rendering an identity alone or in a crowd gives the same canonical face (no nuisance)
    a, _ = ff.testbed.render([42], 1, seed=0, nuisance=0.0)
    b, _ = ff.testbed.render([5, 42], 1, seed=0, nuisance=0.0)
    face = (slice(10, 22), slice(10, 22))  # the centre of the face; backgrounds are random per image
    assert np.abs(a[0][face].astype(int) - b[1][face].astype(int)).max() <= 8  # only sensor noise differs


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError, match="per_identity"):
        ff.testbed.render([1], per_identity=0)
    with pytest.raises(ValueError, match="identity ids"):
        ff.testbed.render([-1])


def test_encoder_geometry_on_unseen_identities(encoder):
    im, ids = ff.testbed.render(range(200, 260), per_identity=4, seed=3)
    emb = encoder.encode(im)
    assert emb.shape == (240, 512) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(240), atol=1e-5)
    r = verification_rates(emb, torch.from_numpy(ids), far=1e-2)
    assert r["same_cos"] >= 0.6
    assert r["diff_cos"] <= 0.15
    assert r["tar"] >= 0.95


def test_encoder_accepts_paths_pil_and_other_sizes(encoder, tmp_path):
    from PIL import Image

    im, _ = ff.testbed.render([9], 1, seed=0, size=96)
    p = tmp_path / "face.png"
    Image.fromarray(im[0]).save(p)
    e_path = encoder.encode([str(p)])
    e_pil = encoder.encode([Image.open(p)])
    e_arr = encoder.encode(im)
    assert torch.allclose(e_path, e_arr) and torch.allclose(e_pil, e_arr)
    small, _ = ff.testbed.render([9], 1, seed=0, size=32)
    assert (encoder.encode(small) @ e_arr.T).item() > 0.8


def test_encoder_bad_input_names_it(encoder, tmp_path):
    with pytest.raises(ff.errors.InputError, match="no such image file"):
        encoder.encode([str(tmp_path / "missing.png")])
    with pytest.raises(ff.errors.InputError, match=r"images\[0\]"):
        encoder.encode([np.zeros((4, 4), np.uint8)])


def test_generator_makes_recognisable_faces(demo_model, encoder):
    ids = np.arange(300, 312)
    ref, ref_ids = ff.testbed.render(ids, 8, seed=1)
    cents, cent_ids = class_centroids(encoder.encode(ref), torch.from_numpy(ref_ids))
    probe, _ = ff.testbed.render(ids, 1, seed=2)
    gen = demo_model.generate_tensor(encoder.encode(probe), seed=0, steps=12)
    s = identity_scores(encoder.encode_tensor(gen), torch.from_numpy(ids), cents, cent_ids)
    assert s["accuracy"] >= 0.6, s
    assert s["ism"] >= s["stranger_ism"] + 0.3, s


def test_generation_is_deterministic_under_a_seed(demo_model, encoder):
    emb = encoder.encode(ff.testbed.render([5, 6], 1, seed=0)[0])
    a = demo_model.generate_tensor(emb, seed=3, steps=4)
    b = demo_model.generate_tensor(emb, seed=3, steps=4)
    part = demo_model.generate_tensor(emb[1:], seed=[4], steps=4)  # image 1 used seed 3 + 1
    assert torch.equal(a, b)
    assert torch.allclose(a[1:], part, atol=1e-5)
    pil = demo_model.generate(emb[:1], seed=3, steps=4)
    assert pil[0].size == (32, 32)
