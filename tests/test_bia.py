"""BIA (h-space black hole): inversion, the mid-block hook on both UNet classes, neighbours, SVM,
edit mode, and the absorb patch (scope, purity, determinism, option checks). Tiny random models."""
import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastforget.errors import InputError
from fastforget.methods import ErasureRequest, available_methods, get_method
from fastforget.methods import bia
from fastforget.patch import fingerprint_embeddings

# small enough for a CPU test run; the defaults are the paper's (M = 128, 40 steps, t0 = 500)
TINY = {"neighbours": 16, "inversion_steps": 5, "decode_steps": 5, "k_nearest": 3, "halvings": 1, "chunk": 32,
        "rebalance_tries": 0}
TINY_ABSORB = {**TINY, "steps": 3, "n_sources": 2, "n_preserve": 2, "n_random": 1, "batch": 4,
               "source_steps": 4}


def _emb(n, seed):
    return F.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)), dim=1)


def _state_hash(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny_cond(tmp_path_factory):
    """Arc2Face-family model from test_models._tiny_parts (UNet2DConditionModel + VAE, 16 px)."""
    from transformers import CLIPTokenizer

    from fastforget.models.arc2face import Arc2FaceModel
    from fastforget.testbed.nets import write_tokenizer
    from test_models import _tiny_parts

    tok_dir = tmp_path_factory.mktemp("bia_tok")
    write_tokenizer(tok_dir, max_length=77)
    unet, text, vae, sched = _tiny_parts()
    return Arc2FaceModel(unet, text, CLIPTokenizer.from_pretrained(tok_dir), sched, vae)


@pytest.fixture(scope="module")
def tiny_uncond():
    """DDPM-CelebA-HQ-like unconditional pixel UNet2DModel (tiny), wrapped for fit/Patch."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    return bia.UnconditionalDiffusion(unet, DDPMScheduler(num_train_timesteps=1000))


@pytest.fixture(scope="module")
def request_():
    return ErasureRequest(targets=_emb(1, 1), anchors=_emb(1, 2), retain=_emb(2, 3), preserve=_emb(6, 4),
                          salt="bia-salt")


@pytest.fixture(scope="module")
def absorb_patch(tiny_cond, request_, encoder):
    before = _state_hash(tiny_cond.unet), _state_hash(tiny_cond.text_encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = get_method("bia")(tiny_cond, request_, seed=0, progress=False, encoder=encoder, **TINY_ABSORB)
    after = _state_hash(tiny_cond.unet), _state_hash(tiny_cond.text_encoder)
    return patch, before, after


def _image(seed, size=16):
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(1, 3, size * 2, size * 2, generator=g), 2)  # smooth-ish, in [0, 1]
    return x * 2 - 1


# ---------------------------------------------------------------- h-space plumbing
def test_registered():
    assert "bia" in available_methods()


def test_ddim_round_trip_converges_and_is_deterministic(tiny_uncond):
    hs = bia.HSpace(tiny_uncond)
    x = _image(0)
    errs = []
    recs = {}
    for steps in (10, 60):
        xt = hs.invert(hs.encode(x), 500, steps)
        assert torch.isfinite(xt).all() and not torch.allclose(xt, x)
        recs[steps] = hs.generate_from(xt, 500, steps, decode=False)
        errs.append((recs[steps] - x).abs().mean().item())
    # η = 0 DDIM is invertible up to its discretisation error, which shrinks with the step count
    assert errs[1] < errs[0] / 3 and errs[1] < 0.1, errs
    again = hs.generate_from(hs.invert(hs.encode(x), 500, 10), 500, 10, decode=False)
    assert torch.equal(again, recs[10])


def test_round_trip_conditional_model_is_finite_and_deterministic(tiny_cond):
    hs = bia.HSpace(tiny_cond)
    assert hs.conditional
    z0 = hs.encode(_image(1), seed=0)
    a = hs.generate_from(hs.invert(z0, 500, 20), 500, 20, decode=False)
    b = hs.generate_from(hs.invert(hs.encode(_image(1), seed=0), 500, 20), 500, 20, decode=False)
    assert torch.isfinite(a).all() and torch.equal(a, b) and a.shape == z0.shape


@pytest.mark.parametrize("which,shape", [("tiny_cond", (1, 64, 4, 4)), ("tiny_uncond", (1, 64, 8, 8))])
def test_mid_block_hook_captures_and_shifts_h(which, shape, request):
    model = request.getfixturevalue(which)
    hs = bia.HSpace(model)
    size = (4, 8, 8) if which == "tiny_cond" else (3, 16, 16)
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    h = hs.code(x, 500)
    assert tuple(h.shape) == shape and torch.isfinite(h).all()
    assert len(hs.unet.mid_block._forward_hooks) == 0  # removed after use
    with bia.mid_block_hook(hs.unet) as hook:
        plain = hs.call(hs.unet, x, 500)
        zero = hs.call(hs.unet, x, 500, hook=hook, delta=torch.zeros(shape))
        moved = hs.call(hs.unet, x, 500, hook=hook, delta=torch.ones(shape))
        assert hook.delta is None  # a shift never leaks into the next call
    assert torch.equal(plain, zero) and not torch.allclose(plain, moved)
    assert len(hs.unet.mid_block._forward_hooks) == 0


def test_neighbours_within_radius_and_svm_fits_labels(tiny_uncond, encoder):
    hs = bia.HSpace(tiny_uncond)
    cfg = bia.resolve_options({**TINY, "neighbours": 24, "rebalance_tries": 2, "halvings": 0},
                              allowed=bia.EDIT_KEYS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        region = bia.build_region(hs, _image(3), encoder, cfg, seed=0)
    norms = region.codes.norm(dim=1)
    assert len(norms) == 24 and (norms <= region.radius * (1 + 1e-4)).all() and norms.max() > 0
    assert region.radius > 0 and set(np.unique(region.labels)) == {0, 1}
    dec = (region.codes / region.radius).double().numpy() @ region.w + region.b
    assert region.accuracy == pytest.approx(((dec > 0) == (region.labels == 1)).mean())
    assert region.accuracy >= 0.75
    # the normal points to the dissimilar side: moving along it lowers the decision value
    n = region.normal.reshape(-1).double().numpy()
    assert n @ region.w < 0 and abs(np.linalg.norm(n) - 1) < 1e-5
    d = region.outside_distance(region.codes)
    assert ((d > 0) == (dec <= 0)).mean() > 0.99
    if region.label_rule == "tau":
        assert ((region.cos > cfg["tau"]) == (region.labels == 1)).all()
    # a push is the distance to the boundary plus a margin: without halving, every pushed code is outside
    pushed = bia.push_codes(hs, region, region.codes[:2], _image(3), encoder, cfg, torch.Generator().manual_seed(0))
    assert pushed["crossed"].all() and pushed["images"].shape == (2, 3, 16, 16)
    assert (pushed["push"] >= cfg["push_margin"][0] * region.radius - 1e-4).all()


# ---------------------------------------------------------------- edit mode
def test_edit_returns_images_and_acceptance_flags(tiny_cond, encoder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = bia.bia_edit(tiny_cond, _emb(1, 1), encoder, seed=0, **TINY)
    k = TINY["k_nearest"]
    assert out["images"].shape == (1, k, 3, 16, 16) and torch.isfinite(out["images"]).all()
    assert out["images"].min() >= -1 and out["images"].max() <= 1
    assert out["accepted"].dtype == torch.bool and out["accepted"].shape == (1, k)
    assert torch.equal(out["accepted"], out["wrapper_loss"] < bia.BIA_DEFAULTS["wrapper_threshold"])
    assert out["crossed"].shape == (1, k) and out["identity_cos"].shape == (1, k)
    assert (out["tries"] >= 1).all() and (out["tries"] <= TINY["halvings"] + 1).all()
    assert out["source_origin"] == "generated" and out["sources"].shape == (1, 3, 16, 16)
    assert out["reconstructions"].shape == (1, 3, 16, 16)
    assert 0 <= out["regions"][0]["svm_accuracy"] <= 1


def test_edit_accepts_image_tensors_on_unconditional_unet(tiny_uncond, encoder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = bia.bia_edit(tiny_uncond.unet, _image(5, size=24), encoder, seed=0, **{**TINY, "k_nearest": 2})
    assert out["images"].shape == (1, 2, 3, 16, 16) and out["source_origin"] == "images"
    with pytest.raises(InputError, match="unconditional model cannot render"):
        bia.bia_edit(tiny_uncond, _emb(1, 1), encoder, **TINY)


# ---------------------------------------------------------------- absorb mode
def test_absorb_patch_scope_and_input_unchanged(absorb_patch, tiny_cond, request_):
    patch, before, after = absorb_patch
    assert before == after  # the input model is never modified
    assert patch.names and all(n.startswith("unet.up_blocks.") for n in patch.names)
    meta = patch.metadata
    assert meta["method"] == "bia" and meta["mode"] == "absorb"
    assert meta["targets"] == fingerprint_embeddings(request_.targets, "bia-salt")
    assert meta["anchors"] == fingerprint_embeddings(request_.anchors, "bia-salt")
    assert set(bia.BIA_DEFAULTS) == set(meta["config"]) and meta["config"]["steps"] == 3
    assert meta["config"]["encoder"] == "testbed-arcface"
    text = json.dumps(meta, default=str)
    assert f"{request_.targets[0, 0].item():.6f}" not in text  # no raw embedding values
    assert len(meta["loss"]["erase"]) == 3 and len(meta["loss"]["keep"]) == 3
    assert len(meta["absorb_target_cos"]) == 1 and meta["erase_points"] > 0 and meta["keep_points"] > 0
    erased = tiny_cond.clone()
    patch.apply(erased)
    x = erased.generate_tensor(request_.targets, seed=0, steps=2)
    assert torch.isfinite(x).all()
    assert not torch.equal(x, tiny_cond.generate_tensor(request_.targets, seed=0, steps=2))


def test_absorb_same_seed_same_bytes(absorb_patch, tiny_cond, request_, encoder):
    patch, _, _ = absorb_patch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = get_method("bia")(tiny_cond, request_, seed=0, progress=False, encoder=encoder, **TINY_ABSORB)
        other = get_method("bia")(tiny_cond, request_, seed=1, progress=False, encoder=encoder,
                                  **{**TINY_ABSORB, "steps": 1})
    assert patch.metadata == again.metadata
    assert patch.to_bytes() == again.to_bytes()
    assert patch.fingerprint() != other.fingerprint()


def test_absorb_unconditional_unet2d_with_source_images(tiny_uncond, encoder):
    req = ErasureRequest(targets=_emb(1, 7), anchors=_emb(1, 8))
    before = _state_hash(tiny_uncond.unet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = get_method("bia")(tiny_uncond, req, seed=0, progress=False, encoder=encoder,
                                  source_images=torch.cat([_image(9), _image(10)]), absorb_target="push",
                                  trainable=["up_blocks.0.resnets.0"], **{**TINY_ABSORB, "n_sources": 1})
    assert _state_hash(tiny_uncond.unet) == before
    assert patch.names and all(n.startswith("unet.up_blocks.0.resnets.0.") for n in patch.names)
    assert patch.metadata["config"]["source_images"].startswith("given (2 images")
    assert 0 <= patch.metadata["regions"][0]["svm_accuracy"] <= 1
    erased = tiny_uncond.clone()
    patch.apply(erased)
    patch.revert(erased)
    assert _state_hash(erased.unet) == before
    with pytest.raises(InputError, match="cannot render the targets"):
        get_method("bia")(tiny_uncond, req, progress=False, encoder=encoder, absorb_target="push", **TINY_ABSORB)
    with pytest.raises(InputError, match="absorb_target='anchor'"):
        get_method("bia")(tiny_uncond, req, progress=False, encoder=encoder, **TINY_ABSORB)


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("opts,match", [
    ({"bogus": 1}, "bogus"),
    ({"neighbors": 8}, "neighbors"),
    ({"tau": 2.0}, "tau"),
    ({"steps": 0}, "steps"),
    ({"radius_units": "cm"}, "radius_units"),
    ({"push_margin": [2, 1]}, "push_margin"),
    ({"trainable": []}, "trainable"),
    ({"trainable": ["up_blocks.9"]}, "up_blocks.9"),
    ({"mode": "edit"}, "bia_edit"),
    ({"absorb_target": "x0"}, "absorb_target"),
    ({"sigma": 0.15}, "sigma"),  # it cancelled in normalize(σ·N(0, I)); the option is gone
])
def test_bad_options_raise_input_error(tiny_cond, request_, encoder, opts, match):
    with pytest.raises(InputError, match=match):
        get_method("bia")(tiny_cond, request_, progress=False, encoder=encoder, **{**TINY_ABSORB, **opts})


def test_edit_rejects_absorb_only_options(tiny_cond, encoder):
    with pytest.raises(InputError, match="steps"):
        bia.bia_edit(tiny_cond, _emb(1, 1), encoder, steps=10)


# ---------------------------------------------------------------- what BIA promises, on the testbed
FAST_DEMO = {"inversion_steps": 10, "decode_steps": 10, "steps": 80, "n_augment": 3, "n_negatives": 4,
             "n_preserve": 8, "n_random": 2, "batch": 8}


def test_absorb_on_testbed_person_reconstructs_as_someone_else_others_keep_theirs():
    """The person's photo, DDIM-inverted by the unedited model and regenerated by the erased one, loses the
    identity; other people's photos come back as themselves (BIA's protocol at 10 steps)."""
    import fastforget as ff
    from fastforget.testbed import render
    from fastforget.verify import verify_reconstruction

    model, enc = ff.load("demo"), ff.load_encoder("demo")
    photos, _ = render([7], 1, seed=0)
    others, _ = render([100, 101, 102, 103], 1, seed=0)
    res = ff.erase(model, photos, method="bia", encoder=enc, report=False, progress=False, source_images=photos,
                   **FAST_DEMO)
    rep = verify_reconstruction(res.model, photos, baseline=model, encoder=enc, retain=others, steps=10,
                                n_random=2, fd_n=0)
    m = rep.metrics
    assert m["source_cos_before"] > 0.95
    assert m["source_cos"] < 0.5, m
    # at these 10-step test settings others keep ~0.88 of their cosine (the benchmark measures the defaults)
    assert m["retain_cos"] >= 0.8 * m["retain_cos_before"], m
    lost_person = m["source_cos_before"] - m["source_cos"]
    lost_others = m["retain_cos_before"] - m["retain_cos"]
    assert lost_person > 4 * lost_others, m
    assert m["random_cos"] > 0.8, m


def test_reconstruction_protocol_checks_its_inputs(tiny_cond):
    import fastforget as ff

    photo = np.zeros((1, 16, 16, 3), np.uint8)
    with pytest.raises(InputError, match="baseline"):
        ff.verify(tiny_cond, photo, protocol="reconstruction")
    with pytest.raises(InputError, match="protocol"):
        ff.verify(tiny_cond, photo, protocol="bia")


def test_every_option_has_one_definition():
    """Validation, defaults and the README table come from BIA_CONFIG; sigma (it cancelled) is gone."""
    table = bia.BIA_CONFIG.table()
    assert all(f"`{k}`" in table for k in bia.BIA_DEFAULTS) and "sigma" not in bia.BIA_DEFAULTS
    assert bia.resolve_options({})["trainable"] == ["up_blocks"]
    for key, option in bia.BIA_CONFIG.options.items():
        assert option.reason, key
    with pytest.raises(InputError, match="anchor_guidance"):
        bia.resolve_options({"anchor_guidance": -1.0})
