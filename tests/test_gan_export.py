"""StyleGAN2 shipping path: ONNX export (mapping.onnx + synthesis.onnx) of the unedited and the erased generator
matches torch under onnxruntime, the manifest says what was exported, outputs are never silently replaced, and
the `fastforget erase` / `export` / `demo --family stylegan2` commands run on a rosinality checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastforget as ff
from fastforget.errors import InputError, OutputExistsError
from fastforget.export.gan import to_onnx_gan
from fastforget.models.stylegan2 import StyleGAN2Model
from fastforget.patch import Patch
from test_stylegan2 import STYLE_DIM, tiny_generator

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOL = 1e-4
# one thread: on a busy 2-core machine torch's thread pool fighting other jobs is 10-50x slower
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gan():
    return StyleGAN2Model(tiny_generator())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """rosinality convert_weight.py layout {"g_ema", "latent_avg"} and a target photo."""
    from PIL import Image

    root = tmp_path_factory.mktemp("gan_export")
    g = tiny_generator()
    torch.save({"g_ema": g.state_dict(), "latent_avg": g.mapping(torch.randn(64, STYLE_DIM)).mean(0).detach()},
               root / "tiny.pt")
    Image.fromarray(ff.testbed.render([3], 1, seed=0)[0][0]).save(root / "photo.png")
    return root


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _inputs(model, n=4, seed=7):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.style_dim, generator=g)
    w_plus = model.mapping(torch.randn(n * model.n_latent, model.style_dim, generator=g)).detach()
    return z, w_plus.reshape(n, model.n_latent, model.style_dim)


def _max_diff(out_dir, model, n=4, seed=7):
    """max |ORT - torch| of both graphs at inputs they were neither traced nor verified with."""
    z, w_plus = _inputs(model, n, seed)
    w_ort = _session(out_dir / "mapping.onnx").run(None, {"z": z.numpy()})[0]
    img_ort = _session(out_dir / "synthesis.onnx").run(None, {"w_plus": w_plus.numpy()})[0]
    with torch.no_grad():
        w_ref, img_ref = model.mapping(z).numpy(), model.synthesis(w_plus).numpy()
    assert w_ort.shape == (n, model.style_dim) and img_ort.shape == (n, 3, model.size, model.size)
    return float(np.abs(w_ort - w_ref).max()), float(np.abs(img_ort - img_ref).max()), img_ort


def test_export_matches_torch_and_manifest(tmp_path, gan):
    out = ff.export.to_onnx(gan, tmp_path / "onnx")
    d_map, d_syn, _ = _max_diff(out, gan)
    assert d_map <= TOL and d_syn <= TOL
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "stylegan2" and m["size"] == gan.size == 16
    assert m["style_dim"] == STYLE_DIM and m["n_latent"] == gan.n_latent == 6
    assert m["patch"] is None and m["firewall"] == {"enabled": False}
    np.testing.assert_allclose(m["w_avg"], gan.w_avg.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.load(out / "w_avg.npy"), gan.w_avg.numpy())
    assert set(m["parts"]) == {"mapping", "synthesis"} and all(v <= TOL for v in m["parity"].values())
    assert m["parts"]["synthesis"]["inputs"]["w_plus"]["shape"] == ["batch", gan.n_latent, STYLE_DIM]
    assert m["parts"]["mapping"]["outputs"]["w"]["shape"] == ["batch", STYLE_DIM]
    assert m["tensorrt_ops"]["problems"] == []  # static Conv kernels, supported operators only


def test_export_with_patch_bakes_in_the_erased_weights(tmp_path, gan):
    name = "generator.convs.1.conv.weight"
    before = {k: v.clone() for k, v in gan.state_dict().items()}
    old = gan.generator.convs[1].conv.weight
    patch = Patch.from_edit(gan, {name: old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))},
                            {"method": "hand-made"})
    out = ff.export.to_onnx(gan, tmp_path / "onnx", patch=patch)  # unedited model: applied to a copy
    assert all(torch.equal(before[k], v) for k, v in gan.state_dict().items())  # the caller's model untouched
    erased = gan.clone(only=patch.names)
    patch.apply(erased)
    d_map, d_syn, img = _max_diff(out, erased)
    assert d_map <= TOL and d_syn <= TOL
    with torch.no_grad():
        unedited = gan.synthesis(_inputs(gan)[1]).numpy()
    assert np.abs(img - unedited).max() > 1e-2  # the edit is in the graph
    m = json.loads((out / "manifest.json").read_text())
    assert m["patch"]["fingerprint"] == patch.fingerprint() and m["patch"]["method"] == "hand-made"
    assert Patch.load(out / "patch.safetensors").fingerprint() == patch.fingerprint()
    # the already-patched model with its patch: recorded, same graph
    again = to_onnx_gan(erased, tmp_path / "onnx2", patch=patch)
    assert _max_diff(again, erased)[1] <= TOL
    # a patch for another model is refused before anything is written
    other = Patch.from_edit(gan, {name: old * 0 + 5.0})
    other.old[name] = old + 1.0
    with pytest.raises(InputError, match="match neither"):
        ff.export.to_onnx(gan, tmp_path / "bad", patch=other)
    assert not (tmp_path / "bad").exists()


def test_fp16_export_within_its_tolerance(tmp_path, gan):
    out = to_onnx_gan(gan, tmp_path / "onnx16", fp16=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "float16" and m["parity_check"]["rtol"] == 2e-2
    d_map, d_syn, _ = _max_diff(out, gan)  # float32 in and out; float16 inside
    assert d_map <= 2e-2 * 4 and d_syn <= 2e-2 * 8


def test_guide_erasure_exports(tmp_path, gan):
    photo = (gan.generate(seed=5, output_type="np")[0] * 255).round().astype(np.uint8)
    res = ff.erase(gan, [photo], method="guide", encoder=ff.load_encoder("demo"), progress=False, report=False,
                   steps=3, invert_steps=5, lr=1e-2)
    out = ff.export.to_onnx(res.model, tmp_path / "onnx", patch=res.patch)
    d_map, d_syn, _ = _max_diff(out, res.model)
    assert d_map <= TOL and d_syn <= TOL
    m = json.loads((out / "manifest.json").read_text())
    assert m["patch"]["fingerprint"] == res.patch.fingerprint() and m["patch"]["method"] == "guide"
    assert m["patch"]["tensors"] == len(res.patch.names)


def test_overwrite_firewall_and_parity_failure(tmp_path, gan, monkeypatch):
    out = ff.export.to_onnx(gan, tmp_path / "onnx")
    stamp = (out / "manifest.json").read_bytes()
    with pytest.raises(OutputExistsError):
        ff.export.to_onnx(gan, out)
    with pytest.raises(OutputExistsError):
        to_onnx_gan(gan, out)
    assert (out / "manifest.json").read_bytes() == stamp
    ff.export.to_onnx(gan, out, overwrite=True)
    bank = torch.nn.functional.normalize(torch.randn(1, 512), dim=1)
    with pytest.raises(InputError, match="firewall"):
        ff.export.to_onnx(gan, tmp_path / "fw", firewall=True, firewall_bank=bank, firewall_anchors=bank)
    assert not (tmp_path / "fw").exists()
    from fastforget.export import gan as gan_export
    from fastforget.export.errors import ExportParityError

    monkeypatch.setitem(gan_export.GAN_PARITY_RTOL, "float32", -1.0)  # a tolerance no graph meets
    with pytest.raises(ExportParityError, match="nothing was written"):
        ff.export.to_onnx(gan, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def _cli(*args, check=True, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "fastforget.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"fastforget {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def test_cli_erase_then_export_a_rosinality_checkpoint(tmp_path, ckpt):
    out = tmp_path / "erased"
    p = _cli("erase", ckpt / "tiny.pt", "--target", ckpt / "photo.png", "--method", "guide", "--steps", "3",
             "--encoder", "demo", "--out", out, "--verify-n", "1")
    assert "erased with guide" in p.stdout
    patch = Patch.load(out / "patch.safetensors")
    assert patch.metadata["method"] == "guide" and patch.metadata["config"]["steps"] == 3
    reloaded = ff.load(out / "model")
    assert isinstance(reloaded, StyleGAN2Model)
    expected = ff.load(ckpt / "tiny.pt").clone()
    patch.apply(expected)
    got, want = reloaded.generator.state_dict(), expected.generator.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    torch.testing.assert_close(reloaded.w_avg, expected.w_avg)
    # a second run into the same folder is refused
    again = _cli("erase", ckpt / "tiny.pt", "--target", ckpt / "photo.png", "--out", out, "--encoder", "demo",
                 check=False)
    assert again.returncode == 2 and "exists" in again.stderr
    # fastforget export of the erased folder
    onnx_dir = tmp_path / "onnx"
    p = _cli("export", out / "model", "--out", onnx_dir, "--patch", out / "patch.safetensors")
    assert "mapping" in p.stdout and "synthesis" in p.stdout
    m = json.loads((onnx_dir / "manifest.json").read_text())
    assert m["family"] == "stylegan2" and m["patch"]["fingerprint"] == patch.fingerprint()
    d_map, d_syn, _ = _max_diff(onnx_dir, reloaded)
    assert d_map <= TOL and d_syn <= TOL
    bad = _cli("export", out / "model", "--out", tmp_path / "fw", "--firewall", "--patch", out / "patch.safetensors",
               "--bank", tmp_path / "missing.npz", check=False)
    assert bad.returncode == 2


def test_cli_erase_gan_defaults_to_guide_and_takes_testbed_ids(tmp_path, ckpt):
    out = tmp_path / "erased"
    p = _cli("erase", ckpt / "tiny.pt", "--target", "3", "--steps", "2", "--encoder", "demo", "--out", out,
             "--verify-n", "1", "--preserve", "none")
    assert "erased with guide" in p.stdout
    assert Patch.load(out / "patch.safetensors").metadata["method"] == "guide"


def test_demo_stylegan2_smoke(tmp_path):
    """The GAN demo end to end with a shortened schedule (about 15 s on one core)."""
    out = tmp_path / "demo"
    p = _cli("demo", "--family", "stylegan2", "--guide-steps", "5", "--out", out)
    assert "target 0" in p.stdout and "held-out 100" in p.stdout and "random 0" in p.stdout
    assert (out / "demo_gan_grid.png").stat().st_size > 0
    summary = json.loads((out / "demo_gan.json").read_text())
    assert summary["family"] == "stylegan2" and summary["guide_steps"] == 5
    target = summary["rows"][0]
    assert target["photo_before"] > target["photo_after"]  # the target's latent draws someone else
    assert Patch.load(out / "demo_gan_patch.safetensors").metadata["method"] == "guide"
