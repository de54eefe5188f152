"""The production path: a real-layout Arc2Face folder, an insightface-format ArcFace ONNX encoder, a copy of
the testbed folder (a user's model), the adapter registry, the default preservation set and its cache."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastforget as ff
from fastforget.errors import ConflictError, InputError, ModelLoadError
from fastforget.identity import preservation
from fastforget.methods import ErasureRequest, register_method
from fastforget.methods.base import _REGISTRY
from test_arcface_onnx import onnx_encoder  # noqa: F401  (fixture: tiny random-weight ArcFace ONNX)
from test_models import _emb, _tiny_parts, release  # noqa: F401  (fixture: tiny Arc2Face release layout)

# a small default-set recipe so the tiny model draws in seconds; the recipe logic is the same
SMALL = {"drawn": 16, "draw_steps": 2, "samples": 256}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFORGET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(preservation, "DEFAULT_RECIPE", {**preservation.DEFAULT_RECIPE, **SMALL})


@pytest.fixture(scope="module")
def user_model(release):
    models, base = release
    return ff.load(models, base=base)


@pytest.fixture(scope="module")
def enc(onnx_encoder):
    return ff.load_encoder(onnx_encoder[1] / "arcface.onnx")


def test_onnx_encoder_has_the_whole_contract(enc):
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    e = enc.encode_tensor(x)
    assert e.shape == (3, 512) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    # the tensor path is the image path on the same pixels
    up = F.interpolate(((x + 1) * 127.5).round(), size=(112, 112), mode="bilinear")
    same = enc.encode(up.clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
    assert torch.allclose(e, same, atol=2e-2)
    assert enc.fingerprint() == ff.load_encoder(enc.path).fingerprint() and len(enc.fingerprint()) == 64
    assert not enc.differentiable


def test_image_errors_name_the_file(enc, tmp_path):
    from PIL import Image

    f = tmp_path / "holiday_photo.png"
    Image.fromarray(np.zeros((150, 200, 3), np.uint8)).save(f)
    with pytest.raises(InputError, match=r"targets\[0\] \(.*holiday_photo.png\).*no face detector"):
        enc.encode([str(f)], name="targets")


def test_erase_and_verify_end_to_end_with_onnx_encoder(user_model, enc, tmp_path):
    """closed_form on a real-layout folder with a real ONNX encoder: the default report runs (it crashed
    before: no encode_tensor), the default preservation set is drawn, cached on disk and reused."""
    calls = []
    real = preservation.drawn_identities
    targets, retain = _emb(2, 1), _emb(8, 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(preservation, "drawn_identities", lambda *a, **k: calls.append(1) or real(*a, **k))
        res = ff.erase(user_model, targets, method="closed_form", retain=retain, encoder=enc, verify_n=1,
                       progress=False)
        assert res.report.details["preservation"] == {"kind": "drawn+random",
                                                      "size": 16 + 256 + preservation.DEFAULT_RECIPE["random"]}
        assert all(np.isfinite(v) for v in res.report.metrics.values() if isinstance(v, float))
        again = ff.erase(user_model, targets, method="closed_form", retain=retain, encoder=enc, report=False)
    assert len(calls) == 1  # second request: statistics from the disk cache
    assert list((tmp_path / "cache" / "preservation").glob("*.safetensors"))
    assert list((tmp_path / "cache" / "gram").glob("*.safetensors"))
    assert again.patch.to_bytes() == res.patch.to_bytes()
    rep = ff.verify(res.model, targets, retain=retain, encoder=enc, n=1, steps=2, baseline=user_model)
    assert np.isfinite(rep["ism_f"]) and np.isfinite(rep["drift"])


def test_no_silent_encoder_fallback(user_model, monkeypatch):
    fitted = []
    monkeypatch.setitem(_REGISTRY, "closed_form", lambda *a, **k: fitted.append(1))
    with pytest.raises(InputError, match="encoder"):
        ff.erase(user_model, _emb(1, 1), method="closed_form")
    with pytest.raises(InputError, match="encoder"):
        ff.verify(user_model, _emb(1, 1), n=1)
    assert not fitted  # refused before any work


def test_every_method_receives_the_callers_encoder(user_model, enc):
    seen = []

    @register_method("_probe_encoder")
    def _probe(model, request: ErasureRequest, *, seed=0, progress=True, **options):
        seen.append(request.encoder)
        return ff.Patch({}, {}, {"method": "_probe_encoder"})

    try:
        ff.erase(user_model, _emb(1, 1), method="_probe_encoder", encoder=enc, preserve=_emb(32, 5), report=False)
    finally:
        _REGISTRY.pop("_probe_encoder")
    assert seen == [enc]


def test_copy_of_testbed_folder_is_a_users_model(tmp_path, encoder):
    from fastforget.testbed import weights_dir

    shutil.copytree(weights_dir() / "generator", tmp_path / "mine")
    demo, mine = ff.load("demo"), ff.load(tmp_path / "mine")
    assert demo.is_testbed and not mine.is_testbed
    with pytest.raises(InputError, match="encoder"):
        ff.erase(mine, [0], method="closed_form")
    # the testbed's ids still render with an explicit encoder; the testbed gallery is not used
    captured = {}
    real = preservation.default_set
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(preservation, "default_set", lambda m, e, **k: captured.setdefault("s", real(m, e, **k)))
        ff.erase(mine, [0], method="closed_form", encoder=encoder, report=False, progress=False)
    assert captured["s"].kind == "drawn+random"


def test_same_person_as_target_and_retain_is_refused(demo_model):
    with pytest.raises(ConflictError, match="also in retain"):
        ff.erase(demo_model, [0], retain=[0, 1], method="closed_form", report=False)


def test_erased_model_shares_unchanged_weights(demo_model):
    before = {k: v.clone() for k, v in demo_model.unet.state_dict().items()}
    res = ff.erase(demo_model, [3], method="closed_form", report=False, progress=False)
    changed = {n.partition(".")[2] for n in res.patch.names}
    for name, p in res.model.unet.named_parameters():
        orig = demo_model.unet.get_parameter(name)
        assert (p.data_ptr() == orig.data_ptr()) == (name not in changed), name
    assert all(torch.equal(v, demo_model.unet.state_dict()[k]) for k, v in before.items())


def test_tokenizer_without_model_max_length(release, tmp_path):
    models, base = release
    shutil.copytree(base, tmp_path / "sd15")
    cfg_file = tmp_path / "sd15" / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("model_max_length", None)
    cfg_file.write_text(json.dumps(cfg))
    model = ff.load(models, base=tmp_path / "sd15")
    assert model._prompt_ids.shape[1] == 77


@pytest.mark.parametrize("output_type,check", [
    ("pil", lambda x: len(x) == 2 and x[0].size == (16, 16)),
    ("np", lambda x: x.shape == (2, 16, 16, 3) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1),
    ("pt", lambda x: x.shape == (2, 3, 16, 16) and 0 <= x.min() and x.max() <= 1),
])
def test_generate_follows_diffusers_output_type(user_model, output_type, check):
    assert check(user_model.generate(_emb(2, 0), steps=2, output_type=output_type))


def test_generate_rejects_bad_arguments(user_model):
    for kw in ({"steps": 0}, {"steps": 1.5}, {"steps": -1}, {"guidance": float("nan")}, {"output_type": "jpg"},
               {"seed": 2 ** 64 - 1}, {"seed": -1}, {"seed": 1.5}):
        with pytest.raises(InputError, match=next(iter(kw))):
            user_model.generate(_emb(2, 0), **{"steps": 2, **kw})


def test_anchor_selection_under_the_triton_backend(monkeypatch):
    from fastforget.identity.anchors import select_anchors

    monkeypatch.setenv("FASTFORGET_KERNELS", "triton")
    pool = F.normalize(torch.randn(300, 512, generator=torch.Generator().manual_seed(1)), dim=1)
    anchors, idx = select_anchors(_emb(3, 0), pool, seed=0)
    assert anchors.shape == (3, 512) and torch.equal(anchors, pool[idx])


def test_registry_picks_the_family_from_the_folder(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "ddpm")
    model = ff.load(tmp_path / "ddpm")
    assert model.family == "unconditional" and not model.is_testbed
    assert set(ff.models.available_families()) >= {"arc2face", "unconditional"}
    model.save_pretrained(tmp_path / "again")
    assert DDPMPipeline.from_pretrained(tmp_path / "again").unet.config.sample_size == 16  # diffusers' own loader
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="junk"):
        ff.load(tmp_path / "junk")
    with pytest.raises(InputError, match="base"):
        ff.load(tmp_path / "ddpm", base=tmp_path)


def test_gallery_from_a_folder_of_photos(encoder, tmp_path):
    from PIL import Image

    imgs, _ = ff.testbed.render([5, 6, 7], 1, seed=0)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"p{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    g = ff.gallery.from_folder(tmp_path, encoder, progress=False)
    assert g.shape == (3, 512) and torch.allclose(g, encoder.encode(imgs), atol=1e-5)
    ff.gallery.save(tmp_path / "g.npy", g)
    assert torch.allclose(ff.gallery.load(tmp_path / "g.npy"), g, atol=1e-6)
    with pytest.raises(InputError, match="nowhere"):
        ff.gallery.from_folder(tmp_path / "nowhere", encoder)


def test_corrupt_or_nonfinite_folders_are_refused_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from fastforget.testbed import weights_dir

    src = weights_dir() / "generator"
    bad = tmp_path / "unshuffle"
    shutil.copytree(src, bad)
    meta = json.loads((bad / "fastforget.json").read_text())
    (bad / "fastforget.json").write_text(json.dumps({**meta, "unshuffle": 3}))
    with pytest.raises(ModelLoadError, match="unshuffle"):
        ff.load(bad)
    nan = tmp_path / "nan"
    shutil.copytree(src, nan)
    f = nan / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    k = sorted(state)[0]
    state[k] = torch.full_like(state[k], float("nan"))
    save_file(state, str(f))
    with pytest.raises(ModelLoadError, match="NaN"):
        ff.load(nan)
    assert ff.load(nan, allow_nonfinite=True).unet is not None
    trunc = tmp_path / "trunc"
    shutil.copytree(src, trunc)
    t = trunc / "text_encoder" / "model.safetensors"
    t.write_bytes(t.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        ff.load(trunc)


def test_verify_refuses_nonfinite_guidance_before_work(demo_model, monkeypatch):
    monkeypatch.setattr(type(demo_model), "generate_tensor", lambda *a, **k: pytest.fail("generated"))
    for kw in ({"guidance": float("nan")}, {"n": 0}, {"neighbours": 0}, {"salt": 123}):
        with pytest.raises(InputError, match=next(iter(kw))):
            ff.verify(demo_model, [0], **kw)


def test_methods_receive_the_photos_of_photo_targets_and_only_then():
    """erase() hands photo targets to the method (BIA inverts the photo, as BIA measures), one per
    identity; ids and embeddings carry none. The photos never reach the patch metadata."""
    from fastforget.methods.base import _REGISTRY, register_method

    seen = []

    @register_method("_capture_extra")
    def _capture(model, request, *, seed=0, progress=True, **options):
        seen.append(request.extra.get("target_images"))
        raise ff.errors.FitError("captured")

    try:
        model, enc = ff.load("demo"), ff.load_encoder("demo")
        photos, _ = ff.testbed.render([3, 4], 1, seed=0)
        for targets in (list(photos), [3, 4], enc.encode(photos)):
            with pytest.raises(ff.errors.FitError, match="captured"):
                ff.erase(model, targets, method="_capture_extra", encoder=enc, anchor=enc.encode(photos[::-1]), report=False,
                         progress=False)
    finally:
        _REGISTRY.pop("_capture_extra", None)
    assert len(seen[0]) == 2 and np.array_equal(seen[0][1], photos[1])
    assert seen[1] is None and seen[2] is None
