"""Encoder-only erasure of portrait generators (fastforget.methods.portrait: closed_form's portrait branch,
encoder_finetune, ireu) on tiny random-weight IP-Adapter FaceID and InstantID checkpoints in the original key
layout, the ONNX export of the erased projection, the CLI round trip, and a quick erase on the shipped testbed
pair (`demo-faceid`, `demo-faceid-b`; skipped if its weights are missing)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastforget as ff
from fastforget.errors import InputError
from fastforget.methods import ErasureRequest, get_method
from fastforget.patch import Patch
from test_ip_adapter import (_ddim, _plain_pipeline, _tokenizer, _unet_eps, faceid, faceid_checkpoint,  # noqa: F401
                             faceid_model, instantid)
from test_models import _emb, _tiny_parts

FAST = {"closed_form": {}, "ireu": {}, "encoder_finetune": {"steps": 10}}


def _rel(a, b):
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


def _request(k=2, seed=0):
    """targets, anchors, named retained identities, a preservation set."""
    return ErasureRequest(_emb(k, seed + 1), _emb(k, seed + 2), _emb(6, seed + 3), _emb(300, seed + 4))


@pytest.fixture(scope="module")
def faceid_b(faceid):
    """Generator B: the same FaceID checkpoint on another UNet of the same architecture (a fine-tune)."""
    from diffusers import StableDiffusionPipeline

    unet, text, vae, _ = _tiny_parts()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * p.std().nan_to_num() * torch.randn(p.shape, generator=g))
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=_tokenizer(faceid), unet=unet, scheduler=_ddim(),
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(faceid / "sd_b")
    return ff.load(faceid / "sd_b", ip_adapter=faceid / "ip-adapter-faceid.bin")


@pytest.fixture(scope="module")
def instantid_model(instantid):
    return ff.load(instantid / "sdxl", ip_adapter=instantid / "ip-adapter.bin")


@pytest.mark.parametrize("method", ["closed_form", "ireu", "encoder_finetune"])
def test_faceid_methods_edit_only_the_projection_and_transfer_to_generator_b(faceid_model, faceid_b, method):
    m, req = faceid_model, _request()
    patch = get_method(method)(m, req, seed=0, progress=False, **FAST[method])
    assert patch.names and set(patch.names) <= set(m.identity_parameter_names())
    erased = m.clone(only=patch.names)
    patch.apply(erased)
    t, a, r = req.targets, req.anchors, req.retain
    before = _rel(m.id_tokens(t), m.id_tokens(a))
    if method == "encoder_finetune":  # the baseline pushes targets away from themselves, not to an anchor
        cos = lambda x, y: F.cosine_similarity(x.flatten(1), y.flatten(1)).mean().item()  # noqa: E731
        assert cos(erased.id_tokens(t), m.id_tokens(t)) < cos(erased.id_tokens(r), m.id_tokens(r))
    else:  # the target's tokens go (most of the way) to its anchor's; the retained stay
        assert _rel(erased.id_tokens(t), m.id_tokens(a)) < 0.35 * before
        assert _rel(erased.id_tokens(r), m.id_tokens(r)) < (1e-3 if method == "closed_form" else 0.05)
    # the UNet is untouched, and the same patch lands unchanged on generator B (same adapter, other UNet)
    assert all(torch.equal(x, y) for x, y in zip(erased.unet.conv_in.parameters(), m.unet.conv_in.parameters()))
    b = faceid_b.clone(only=patch.names)
    patch.apply(b)
    assert torch.equal(b.id_tokens(t), erased.id_tokens(t))
    x = b.image_embeds(t)
    assert not torch.equal(_unet_eps(b.unet, [x]), _unet_eps(faceid_b.unet, [x]))


@pytest.mark.parametrize("method", ["closed_form", "ireu"])
def test_instantid_resampler_is_erased_too(instantid_model, method):
    m, req = instantid_model, _request(seed=10)
    patch = get_method(method)(m, req, seed=0, progress=False, **FAST[method])
    want = "proj_in"  # the Resampler: both edit the layer that reads the embedding
    assert patch.names and all(f".{want}." in n for n in patch.names)
    erased = m.clone(only=patch.names)
    patch.apply(erased)
    t, a, r = req.targets, req.anchors, req.retain
    assert _rel(erased.id_tokens(t), m.id_tokens(a)) < 0.5 * _rel(m.id_tokens(t), m.id_tokens(a))
    assert _rel(erased.id_tokens(r), m.id_tokens(r)) < (1e-3 if method == "closed_form" else 0.05)


def test_patches_are_deterministic_and_depend_on_the_seed(faceid_model):
    first = {}
    for method in ("ireu", "closed_form", "encoder_finetune"):
        a, b = (get_method(method)(faceid_model, _request(), seed=3, progress=False, **FAST[method])
                for _ in range(2))
        assert a.to_bytes() == b.to_bytes()
        first[method] = a
    # the fine-tune draws its batches from the seed (ireu and closed_form are solves: no randomness to seed)
    other = get_method("encoder_finetune")(faceid_model, _request(), seed=4, progress=False,
                                           **FAST["encoder_finetune"])
    assert other.fingerprint() != first["encoder_finetune"].fingerprint()


@pytest.mark.parametrize("method,options,match", [
    ("ireu", {"gate_cos": [0.9, 0.5]}, "gate_cos"),
    ("ireu", {"coverage": 1.5}, "coverage"),
    ("ireu", {"identity_share": 0}, "identity_share"),
    ("ireu", {"population": 3}, "population"),
    ("ireu", {"units": 3}, "unknown option"),
    ("encoder_finetune", {"objective": "pixels"}, "objective"),
    ("encoder_finetune", {"lr": float("nan")}, "lr"),
    ("closed_form", {"lam": 0}, "lam"),
])
def test_bad_options_are_typed_and_come_before_any_work(faceid_model, method, options, match):
    with pytest.raises(InputError, match=match):
        ff.erase(faceid_model, _emb(1, 7), method=method, encoder="demo", preserve=None, report=False,
                 progress=False, **options)


def test_portrait_methods_refuse_other_families(demo_model):
    for method in ("ireu", "encoder_finetune"):
        with pytest.raises(InputError, match="image projection of a portrait generator"):
            ff.erase(demo_model, [3], method=method, report=False, progress=False)


def test_generation_objective_needs_a_differentiable_encoder(faceid_model):
    with pytest.raises(InputError, match="differentiable"):
        get_method("encoder_finetune")(faceid_model, _request(), objective="generation", progress=False)


def test_erased_projection_exports_to_onnx_within_1e5(faceid_model, instantid_model, tmp_path):
    import onnxruntime as ort

    for name, m in (("faceid", faceid_model), ("instantid", instantid_model)):
        patch = get_method("closed_form")(m, _request(), progress=False)
        out = ff.export.to_onnx(m, tmp_path / name, patch=patch)  # unedited model + patch: applied to a copy
        manifest = (out / "manifest.json").read_text()
        assert '"family": "' + m.family + '"' in manifest and patch.fingerprint() in manifest
        sess = ort.InferenceSession(str(out / "image_proj.onnx"), providers=["CPUExecutionProvider"])
        e = _emb(5, 11)
        got = sess.run(None, {"embedding": e.numpy()})[0]
        erased = m.clone(only=patch.names)
        patch.apply(erased)
        want = erased.id_tokens(e).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_cli_round_trip_writes_the_erased_checkpoint_in_the_original_layout(faceid, faceid_model, tmp_path):
    from fastforget.cli import main

    np.save(tmp_path / "t.npy", _emb(1, 21).numpy())
    np.save(tmp_path / "p.npy", _emb(64, 22).numpy())
    out = tmp_path / "erased"
    rc = main(["erase", str(faceid / "sd"), "--ip-adapter", str(faceid / "ip-adapter-faceid.bin"), "--target",
               str(tmp_path / "t.npy"), "--method", "ireu", "--encoder", "demo", "--preserve",
               str(tmp_path / "p.npy"), "--verify-n", "1", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["ip-adapter-faceid.bin", "patch.safetensors", "report.json",
                                                     "report.png"]
    patch = Patch.load(out / "patch.safetensors")
    erased = faceid_model.clone(only=patch.names)
    patch.apply(erased)
    # plain diffusers loads the erased file; fastforget reloads it as the erased model
    ref = _plain_pipeline(faceid / "sd", out / "ip-adapter-faceid.bin")
    x = erased.image_embeds(_emb(2, 23))
    assert torch.equal(_unet_eps(ref.unet, [x]), _unet_eps(erased.unet, [x]))
    again = ff.load(faceid / "sd", ip_adapter=out / "ip-adapter-faceid.bin")
    assert torch.equal(again.id_tokens(_emb(2, 23)), erased.id_tokens(_emb(2, 23)))
    from PIL import Image

    assert Image.open(out / "report.png").size[0] > 3 * 16  # labelled: wider than the tiles alone


@pytest.mark.skipif(not (Path(ff.testbed.weights_dir()) / "faceid" / "ip-adapter-faceid.safetensors").is_file(),
                    reason="testbed FaceID weights not built (python -m fastforget.testbed.train_faceid)")
def test_testbed_pair_quick_erase_reaches_low_accu_on_both_generators(encoder):
    a, b = ff.load("demo-faceid"), ff.load("demo-faceid-b")
    assert a.is_testbed and b.is_testbed and a.family == "ip_adapter_faceid"
    res = ff.erase(a, [7], method="ireu", encoder=encoder, report=False, progress=False)
    held = list(range(100, 104))
    for gen in (res.model, res.patch.apply(b.clone(only=res.patch.names))):
        rep = ff.verify(gen, [7], retain=held, encoder=encoder, n=2, steps=10, neighbours=1, anchors=res.anchors)
        assert rep["acc_u"] <= 0.05 and rep["acc_r"] >= 0.5


@pytest.mark.parametrize("method", ["ireu", "encoder_finetune"])
def test_erase_with_an_onnx_encoder_end_to_end(faceid_model, tmp_path, method):
    """A user's portrait model and a real (tiny, random-weight) ArcFace ONNX: photos in, the default report
    out (generations scored by ONNX Runtime); the non-differentiable encoder makes encoder_finetune use its
    token objective."""
    from PIL import Image
    from test_arcface_onnx import export_tiny_arcface

    export_tiny_arcface(tmp_path / "arcface.onnx")
    enc = ff.load_encoder(tmp_path / "arcface.onnx")
    rng = np.random.default_rng(0)
    photos = []
    for i in range(2):
        f = tmp_path / f"photo_{i}.png"
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(f)
        photos.append(str(f))
    res = ff.erase(faceid_model, photos[:1], method=method, retain=photos[1:], encoder=enc, preserve=_emb(64, 31),
                   verify_n=1, progress=False, **FAST[method])
    assert set(res.patch.names) <= set(faceid_model.identity_parameter_names())
    assert all(np.isfinite(v) for v in res.report.metrics.values() if isinstance(v, float))
    if method == "encoder_finetune":
        assert res.patch.metadata["objective"] == "tokens"
    t = enc.encode(photos[:1])
    assert not torch.equal(res.model.id_tokens(t), faceid_model.id_tokens(t))
