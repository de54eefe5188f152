"""fastforget.export on tiny random Arc2Face models: ONNX parity, firewall, numpy runtime, refit plan, CLI.

TensorRT itself is only exercised where TensorRT and a CUDA GPU exist; on CPU the graphs are checked
against the operator set TensorRT 10's ONNX parser supports, and the refit weight plan against a
fresh export of the erased model.
"""
import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastforget as ff
from fastforget.errors import EmbeddingError, FastForgetError, InputError, OutputExistsError
from fastforget.export import OnnxPipeline, to_onnx
from fastforget.export.errors import BackendUnavailableError, ExportParityError
from fastforget.export.onnx_export import PARITY_RTOL
from fastforget.export.scheduler import DPMSolverMultistepNumpy
from fastforget.export.trt import check_tensorrt_ops, refit_weights, tensorrt_available
from fastforget.methods import ErasureRequest, get_method
from fastforget.patch import Patch, fingerprint_embeddings

from test_models import WIDTH, _emb, _tiny_parts, release, tiny_shuffle_model  # noqa: F401  (fixture)

EXPORT_DIR = Path(ff.export.__file__).resolve().parent
ATOL_STATES = 1e-4   # conditioner states (O(1) after the final layer norm)
ATOL_UNET = 1e-4     # one UNet evaluation
ATOL_IMAGE = 1e-3    # a whole sampling chain, [-1, 1] images
TRT_OK, TRT_WHY = tensorrt_available()


def _request(model, k=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.randn(2 * k + 40, 512, generator=g), dim=1)
    return ErasureRequest(targets=e[:k], anchors=e[k:2 * k], retain=e[2 * k:2 * k + 8], preserve=e[2 * k + 8:])


@pytest.fixture(scope="module")
def base(release):  # noqa: F811
    return ff.load(*release)


@pytest.fixture(scope="module")
def erasure(base):
    req = _request(base)
    patch = get_method("closed_form")(base, req, seed=0, progress=False)
    erased = base.clone()
    patch.apply(erased)
    return req, patch, erased


@pytest.fixture(scope="module")
def onnx_erased(base, erasure, tmp_path_factory):
    """The unedited model + patch: to_onnx applies the patch to a copy and records it."""
    _, patch, _ = erasure
    return to_onnx(base, tmp_path_factory.mktemp("exp") / "erased", patch=patch)


@pytest.fixture(scope="module")
def pipe(onnx_erased):
    return OnnxPipeline(onnx_erased, providers=["CPUExecutionProvider"], threads=1)


@pytest.fixture(scope="module")
def shuffle_model():
    """A pixel-space (space-to-depth) model without a VAE, like the testbed."""
    return tiny_shuffle_model()


def _sess(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- scheduler
@pytest.mark.parametrize("cfg", [
    {},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"timestep_spacing": "trailing", "solver_order": 3},
    {"use_karras_sigmas": True, "solver_type": "heun"},
    {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"},
    {"final_sigmas_type": "sigma_min", "lower_order_final": False},
])
def test_numpy_dpm_solver_matches_diffusers_step_for_step(cfg):
    from diffusers import DPMSolverMultistepScheduler

    rng = np.random.default_rng(0)
    for steps in (1, 2, 7, 25):
        ref = DPMSolverMultistepScheduler(**cfg)
        ref.set_timesteps(steps)
        ours = DPMSolverMultistepNumpy(dict(ref.config))
        ours.set_timesteps(steps)
        assert np.array_equal(ref.timesteps.numpy(), ours.timesteps)
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5)
        # a model that predicts the noise towards a fixed clean sample (plus jitter): samples stay O(1)
        x0 = rng.uniform(-1, 1, (2, 4, 4, 4)).astype(np.float32)
        xt = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        chain = xt.numpy().copy()
        for i, t in enumerate(ref.timesteps):
            sig = float(ref.sigmas[i])
            a, s = 1 / np.sqrt(sig ** 2 + 1), sig / np.sqrt(sig ** 2 + 1)
            eps = ((xt.numpy() - a * x0) / s + 0.1 * rng.standard_normal(x0.shape)).astype(np.float32)
            mine = ours.step(eps, int(t), xt.numpy())  # step for step: the same state and model output
            xt = ref.step(torch.from_numpy(eps), t, xt).prev_sample
            np.testing.assert_allclose(mine, xt.numpy(), rtol=1e-5, atol=1e-5)
        # and a whole chain run on its own: float32 rounding grows with alpha_T/alpha_0 (~150) only
        ours.set_timesteps(steps)
        rng2 = np.random.default_rng(steps)
        ref.set_timesteps(steps)
        xr = torch.from_numpy(chain.copy())
        for i, t in enumerate(ref.timesteps):
            e = rng2.standard_normal(x0.shape).astype(np.float32) * 0.1 + chain * 0.5
            chain = ours.step(e, int(t), chain)
            xr = ref.step(torch.from_numpy(e), t, xr).prev_sample
        np.testing.assert_allclose(chain, xr.numpy(), rtol=1e-4, atol=1e-4)


def test_numpy_dpm_solver_names_what_it_does_not_support():
    with pytest.raises(InputError, match="sde-dpmsolver"):
        DPMSolverMultistepNumpy({"algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(InputError, match="use_beta_sigmas"):
        DPMSolverMultistepNumpy({"use_beta_sigmas": True})


# ---------------------------------------------------------------- ONNX parity and manifest
def test_each_part_matches_torch_within_tolerance(pipe, erasure):
    _, _, erased = erasure
    e = _emb(5, 3)
    np.testing.assert_allclose(pipe.condition(e.numpy()), erased.condition(e).numpy(), atol=ATOL_STATES)
    for b in (1, 4):  # dynamic batch, neither is the traced size
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, 4, 8, 8, generator=g)
        states = torch.randn(b, 77, WIDTH, generator=g)
        for t in (999, 1):
            with torch.no_grad():
                ref = erased.unet(x, torch.tensor(t), encoder_hidden_states=states).sample.numpy()
            np.testing.assert_allclose(pipe.unet(x.numpy(), t, states.numpy()), ref, atol=ATOL_UNET)
        with torch.no_grad():
            ref = erased.codec.decode(x).clamp(-1, 1).numpy()
        np.testing.assert_allclose(pipe.decode(x.numpy()), ref, atol=ATOL_UNET)
    np.testing.assert_allclose(pipe.null_condition(2), erased.null_condition(2).numpy(), atol=1e-6)


def test_pipeline_reproduces_torch_images_at_the_same_noise(pipe, erasure):
    req, _, erased = erasure
    e = torch.cat([req.targets, _emb(2, 9)])
    noise = erased.initial_noise(3, seed=4)
    ref = erased.generate_tensor(e, seed=4, steps=4, guidance=3.0).numpy()
    got = pipe.sample(e.numpy(), seed=4, steps=4, guidance=3.0, noise=noise.numpy())
    assert got.shape == ref.shape == (3, 3, 16, 16)
    np.testing.assert_allclose(got, ref, atol=ATOL_IMAGE)
    # batching inside the runtime does not change images; guidance 1 skips the null branch
    np.testing.assert_allclose(pipe.sample(e.numpy(), steps=4, noise=noise.numpy(), batch_size=2), got, atol=1e-5)
    ref1 = erased.generate_tensor(e[:1], seed=4, steps=3, guidance=1.0).numpy()
    np.testing.assert_allclose(pipe.sample(e[:1].numpy(), steps=3, guidance=1.0, noise=noise[:1].numpy()), ref1,
                               atol=ATOL_IMAGE)
    # without explicit noise: numpy noise, deterministic per seed, image i from seed + i
    a = pipe.sample(e.numpy(), seed=7, steps=2)
    b = pipe.sample(e[1:].numpy(), seed=8, steps=2)
    np.testing.assert_allclose(a[1:], b, atol=1e-5)
    assert pipe.generate_uint8(e[:1].numpy(), seed=7, steps=2).dtype == np.uint8
    # the public generate follows diffusers' output_type, as model.generate does
    as_np = pipe.generate(e.numpy(), seed=7, steps=2, output_type="np")
    np.testing.assert_allclose(as_np, np.clip(a / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1), atol=1e-6)
    assert tuple(pipe.generate(e.numpy(), seed=7, steps=2, output_type="pt").shape) == a.shape
    assert len(pipe.generate(e.numpy(), seed=7, steps=2)) == len(a)  # "pil": one image each
    with pytest.raises(EmbeddingError, match="512"):
        pipe.sample(np.ones((1, 128), np.float32))
    with pytest.raises(InputError, match="noise"):
        pipe.sample(e.numpy(), noise=np.zeros((1, 4, 8, 8), np.float32))


def test_manifest_records_patch_source_scheduler_and_parts(onnx_erased, base, erasure, release):  # noqa: F811
    import onnx

    _, patch, _ = erasure
    m = json.loads((onnx_erased / "manifest.json").read_text())
    assert m["patch"]["fingerprint"] == patch.fingerprint() and m["patch"]["method"] == "closed_form"
    assert Patch.load(onnx_erased / "patch.safetensors").fingerprint() == patch.fingerprint()
    models, _ = release
    files = m["source"]["files"]
    assert files["arc2face/diffusion_pytorch_model.safetensors"] == _sha(
        models / "arc2face" / "diffusion_pytorch_model.safetensors")
    assert m["scheduler"]["_class_name"] == "DPMSolverMultistepScheduler"
    assert m["scheduler"]["num_train_timesteps"] == 1000
    assert (m["resolution"], m["unshuffle"], m["sample_shape"], m["text_length"]) == (16, 1, [4, 8, 8], 77)
    assert set(m["parts"]) == {"conditioner", "unet", "vae_decoder"} and m["firewall"] == {"enabled": False}
    assert max(m["parity"].values()) < 1e-4
    for part in m["parts"].values():
        onnx.checker.check_model(str(onnx_erased / part["file"]))
        assert part["sha256"] == _sha(onnx_erased / part["file"]) and part["external_data"] is None
        assert part["inputs"][next(iter(part["inputs"]))]["shape"][0] == "batch"
    # the source model was not touched: the patch went to a copy
    assert all(torch.equal(p, patch.old[k]) for k, p in
               ((k, ff.patch.get_parameter(base, k).detach()) for k in patch.names))


def test_parameter_names_map_to_onnx_initializers(onnx_erased, erasure):
    """Patch tensors are found in the graph (a Linear weight feeding MatMul is stored transposed
    under a folded name) with the erased values, so TensorRT refit can address them."""
    import onnx
    from onnx import numpy_helper

    _, patch, erased = erasure
    m = json.loads((onnx_erased / "manifest.json").read_text())
    unet = m["parts"]["unet"]
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(onnx_erased / "unet.onnx")).graph.initializer}
    assert not unet["unmapped"]
    for k in patch.names:
        e = unet["initializers"][k]
        assert e["transform"] == "transpose" and len(unet["shared"].get(e["onnx"], [k])) == 1
        np.testing.assert_array_equal(inits[e["onnx"]], patch.new[k].numpy().T)
    # names that survive as is (conv weights) keep the torch parameter name
    conv = "unet.conv_in.weight"
    assert unet["initializers"][conv]["onnx"] == conv and unet["initializers"][conv]["transform"] == "none"
    np.testing.assert_array_equal(inits[conv], erased.unet.conv_in.weight.detach().numpy())
    vae = m["parts"]["vae_decoder"]["initializers"]
    assert vae and all(k.startswith(("vae.decoder.", "vae.post_quant_conv.")) for k in vae)


def test_exported_graphs_use_only_tensorrt_operators(onnx_erased, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    assert check_tensorrt_ops(onnx_erased) == []
    g = helper.make_graph([helper.make_node("Unique", ["x"], ["y"], name="u")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    bad = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(bad, tmp_path / "bad.onnx")
    problems = check_tensorrt_ops(tmp_path / "bad.onnx")
    assert len(problems) == 1 and "Unique" in problems[0]


def test_output_is_atomic_and_never_overwritten_silently(onnx_erased, base):
    before = _sha(onnx_erased / "manifest.json")
    with pytest.raises(OutputExistsError, match="overwrite"):
        to_onnx(base, onnx_erased)
    with pytest.raises(InputError, match="patch"):  # a patch for another model
        other = Patch({k: v + 1 for k, v in Patch.load(onnx_erased / "patch.safetensors").new.items()},
                      {k: v + 2 for k, v in Patch.load(onnx_erased / "patch.safetensors").old.items()})
        to_onnx(base, onnx_erased.parent / "never", patch=other)
    assert _sha(onnx_erased / "manifest.json") == before
    assert not (onnx_erased.parent / "never").exists()
    assert not [p for p in onnx_erased.parent.iterdir() if p.name.startswith(".")]


def test_outputs_are_checked_before_the_model_is_loaded(onnx_erased, tmp_path):
    from fastforget.errors import OutputPathError
    from fastforget.export.onnx_export import save_bank

    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError, match="taken"):  # not ModelLoadError: the model is never read
        to_onnx(str(tmp_path / "no-such-model"), tmp_path / "taken")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="not a folder"):
        to_onnx(str(tmp_path / "no-such-model"), tmp_path / "file" / "out")
    # TensorRT: the output is checked before the backend is looked for (and never replaces its input)
    with pytest.raises(OutputExistsError, match="taken"):
        ff.export.to_tensorrt(onnx_erased, tmp_path / "taken")
    with pytest.raises(OutputPathError, match="holds the input"):
        ff.export.to_tensorrt(onnx_erased, onnx_erased.parent, overwrite=True)
    # the firewall bank is written atomically and not over an existing file
    e = F.normalize(torch.randn(2, 512), dim=1)
    path = save_bank(tmp_path / "bank", e[:1], e[1:])
    assert path.name == "bank.npz"
    with pytest.raises(OutputExistsError, match="bank.npz"):
        save_bank(path, e[1:], e[:1])
    np.testing.assert_array_equal(np.load(path)["targets"], e[:1].numpy())
    save_bank(path, e[1:], e[:1], overwrite=True)
    np.testing.assert_array_equal(np.load(path)["targets"], e[1:].numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.npz", "file", "taken"]


def test_runtime_imports_no_torch(onnx_erased, pipe, tmp_path):
    """The serving path loads with torch made unimportable and gives the same images."""
    emb = _emb(2, 11).numpy()
    np.save(tmp_path / "emb.npy", emb)
    code = f"""
import importlib, sys, types
sys.modules["torch"] = None            # any `import torch` now fails
pkg = types.ModuleType("ffx"); pkg.__path__ = [{str(EXPORT_DIR)!r}]; sys.modules["ffx"] = pkg
rt = importlib.import_module("ffx.runtime")
import numpy as np
pipe = rt.OnnxPipeline({str(onnx_erased)!r}, providers=["CPUExecutionProvider"], threads=1)
np.save({str(tmp_path / 'out.npy')!r}, pipe.sample(np.load({str(tmp_path / 'emb.npy')!r}), seed=3, steps=2))
assert not [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("torch", "fastforget")]
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), pipe.sample(emb, seed=3, steps=2), atol=1e-6)


# ---------------------------------------------------------------- firewall (pixel-shuffle model)
def test_firewall_redirects_targets_and_near_copies_only(shuffle_model, tmp_path):
    import onnx

    g = torch.Generator().manual_seed(5)
    e = F.normalize(torch.randn(8, 512, generator=g), dim=1)
    targets, anchors, stranger = e[:2], e[2:4], e[4:6]
    out = to_onnx(shuffle_model, tmp_path / "fw", firewall=True, firewall_bank=targets, firewall_anchors=anchors,
                  firewall_threshold=0.5, verify=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["firewall"]["enabled"] and m["firewall"]["identities"] == 2
    assert m["firewall"]["targets"] == fingerprint_embeddings(targets)
    assert m["parts"]["vae_decoder"] is None and m["unshuffle"] == 2
    ops = set(m["parts"]["conditioner"]["ops"])
    assert {"MatMul", "ArgMax", "ReduceMax", "Gather", "Where", "GreaterOrEqual"} <= ops
    assert check_tensorrt_ops(out) == []
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(out / "conditioner.onnx")).graph.node)
    pipe = OnnxPipeline(out, providers=["CPUExecutionProvider"], threads=1)
    near = F.normalize(targets[1] + 0.6 * F.normalize(torch.randn(512, generator=g), dim=0), dim=0)[None]
    assert 0.5 < float(near @ targets[1]) < 0.95
    query = torch.cat([targets, 2.5 * targets[:1], near, stranger])
    expect = torch.cat([anchors, anchors[:1], anchors[1:2], stranger])
    np.testing.assert_allclose(pipe.condition(query.numpy()), shuffle_model.condition(expect).numpy(),
                               atol=ATOL_STATES)
    # the full runtime with numpy pixel_shuffle matches torch, and the target comes out as its anchor
    noise = shuffle_model.initial_noise(2, 0).numpy()
    got = pipe.sample(torch.cat([targets[:1], stranger[:1]]).numpy(), steps=3, noise=noise)
    ref = shuffle_model.generate_tensor(torch.cat([anchors[:1], stranger[:1]]), seed=0, steps=3).numpy()
    assert got.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(got, ref, atol=ATOL_IMAGE)
    with pytest.raises(InputError, match="firewall_anchors"):
        to_onnx(shuffle_model, tmp_path / "x", firewall=True, firewall_bank=targets)
    with pytest.raises(InputError, match="firewall=True"):
        to_onnx(shuffle_model, tmp_path / "x", firewall_bank=targets, firewall_anchors=anchors)


# ---------------------------------------------------------------- fp16 + external data
def test_fp16_with_external_data(shuffle_model, tmp_path):
    import onnx

    out = to_onnx(shuffle_model, tmp_path / "h", fp16=True, external_data=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "float16"
    for part in ("conditioner", "unet"):
        info = m["parts"][part]
        assert info["external_data"] == f"{part}.onnx.data" and (out / info["external_data"]).is_file()
        assert (out / info["file"]).stat().st_size < (out / info["external_data"]).stat().st_size
        onnx.checker.check_model(str(out / info["file"]))
    assert m["parts"]["unet"]["inputs"]["sample"]["dtype"] == "float16"
    assert m["parts"]["conditioner"]["inputs"]["embedding"]["dtype"] == "float32"
    # fp16 parity is measured against the torch model in float32, and recorded with its tolerance
    check = m["parity_check"]
    assert check["dtype"] == "float16" and check["rtol"] == PARITY_RTOL["float16"] and check["passed"]
    assert set(m["parity"]) == {"conditioner", "unet"}  # no VAE in the pixel-shuffle model
    for part, diff in m["parity"].items():
        assert 0 < diff <= check["tolerance"][part] == check["rtol"] * max(1.0, check["reference_max_abs"][part])
    pipe = OnnxPipeline(out, providers=["CPUExecutionProvider"], threads=1)
    e = _emb(2, 1)
    np.testing.assert_allclose(pipe.condition(e.numpy()), shuffle_model.condition(e).numpy(), atol=2e-2)
    noise = shuffle_model.initial_noise(2, 0).numpy()
    ref = shuffle_model.generate_tensor(e, seed=0, steps=2).numpy()
    assert np.abs(pipe.sample(e.numpy(), steps=2, noise=noise) - ref).mean() < 2e-2


def test_fp16_export_that_overflows_is_refused_and_nothing_is_written(shuffle_model, tmp_path):
    """A UNet whose outputs exceed float16's range (65504) exports to a graph that returns inf:
    the fp16 parity check catches it, names the part, and the output folder is never created."""
    big = shuffle_model.clone()
    with torch.no_grad():
        big.unet.conv_out.weight.mul_(1e6)
        big.unet.conv_out.bias.mul_(1e6)
    with pytest.raises(ExportParityError, match=r"unet: the exported float16 graph .* max \|diff\| (inf|nan)"):
        to_onnx(big, tmp_path / "h", fp16=True)
    assert list(tmp_path.iterdir()) == []


def test_parity_tolerance_is_enforced(shuffle_model, tmp_path, monkeypatch):
    """The recorded fp16 error is a real measurement: a tolerance below it refuses the export."""
    import fastforget.export.onnx_export as oe

    monkeypatch.setattr(oe, "PARITY_RTOL", {"float32": 1e-3, "float16": 1e-7})
    with pytest.raises(ExportParityError, match="conditioner"):
        to_onnx(shuffle_model, tmp_path / "h", fp16=True)
    assert not (tmp_path / "h").exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- TensorRT refit plan (CPU)
def test_refit_plan_turns_an_export_into_the_erased_one(base, erasure, onnx_erased, tmp_path):
    import onnx
    from onnx import numpy_helper

    req, patch, _ = erasure
    plain = to_onnx(base, tmp_path / "plain", verify=False)
    erased_inits = {i.name: numpy_helper.to_array(i)
                    for i in onnx.load(str(onnx_erased / "unet.onnx")).graph.initializer}
    emap = json.loads((onnx_erased / "manifest.json").read_text())["parts"]["unet"]["initializers"]
    pmap = json.loads((plain / "manifest.json").read_text())["parts"]["unet"]["initializers"]
    plan = refit_weights(plain, patch)
    assert set(plan) == {"unet"} and len(plan["unet"]) == len(patch.names)
    for k in patch.names:
        np.testing.assert_array_equal(plan["unet"][pmap[k]["onnx"]], erased_inits[emap[k]["onnx"]])
    # a second erasure touching half the tensors: the rest go back to their original values
    half = sorted(patch.names)[: len(patch.names) // 2]
    p2 = Patch({k: patch.new[k] * 0.5 + patch.old[k] * 0.5 for k in half}, {k: patch.old[k] for k in half})
    plan2 = refit_weights(onnx_erased, p2)["unet"]
    for k in patch.names:
        want = p2.new[k] if k in half else patch.old[k]
        np.testing.assert_array_equal(plan2[emap[k]["onnx"]], want.numpy().T)
    # a patch made from other weights is refused
    bad = Patch({half[0]: patch.new[half[0]]}, {half[0]: patch.new[half[0]] + 1})
    with pytest.raises(InputError, match="not made from"):
        refit_weights(plain, bad)


@pytest.mark.skipif(TRT_OK, reason="TensorRT and a GPU are present: the real build runs below")
def test_tensorrt_without_backend_says_what_to_install(onnx_erased, erasure, tmp_path):
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
        ff.export.to_tensorrt(onnx_erased, tmp_path / "engines")
    assert not (tmp_path / "engines").exists()
    assert issubclass(BackendUnavailableError, FastForgetError)


@pytest.mark.gpu
@pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT >= 10 and a CUDA GPU: {TRT_WHY}")
def test_tensorrt_build_and_refit(base, erasure, tmp_path):  # pragma: no cover - GPU only
    import tensorrt as trt

    req, patch, erased = erasure
    plain = to_onnx(base, tmp_path / "onnx", verify=False)
    engines = ff.export.to_tensorrt(plain, tmp_path / "engines", fp16=False, refittable=True, max_batch=2)
    summary = ff.export.refit(engines, patch)
    assert summary["parts"] == {"unet": len(patch.names)}
    m = json.loads((engines / "manifest.json").read_text())
    assert m["patch"]["fingerprint"] == patch.fingerprint()
    # run the refitted UNet engine and compare with the erased torch UNet
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine((engines / "unet.plan").read_bytes())
    ctx = engine.create_execution_context()
    x = torch.randn(2, 4, 8, 8, device="cuda")
    t = torch.full((2,), 500.0, device="cuda")
    s = torch.randn(2, 77, WIDTH, device="cuda")
    out = torch.empty(2, 4, 8, 8, device="cuda")
    for name, tensor in (("sample", x), ("timestep", t), ("encoder_hidden_states", s), ("noise_pred", out)):
        if name != "noise_pred":
            ctx.set_input_shape(name, tuple(tensor.shape))
        ctx.set_tensor_address(name, tensor.data_ptr())
    assert ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    with torch.no_grad():
        ref = erased.unet(x.cpu(), torch.tensor(500), encoder_hidden_states=s.cpu()).sample
    assert (out.cpu() - ref).abs().max() < 1e-2


# ---------------------------------------------------------------- CLI
def _cli(argv):
    from fastforget.export.cli import add_export_parser

    ap = argparse.ArgumentParser(prog="fastforget")
    add_export_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["export", *argv])
    return args.func(args)


def test_cli_export_with_firewall_bank(shuffle_model, tmp_path, capsys):
    from fastforget.export.onnx_export import save_bank

    folder = shuffle_model.save_pretrained(tmp_path / "model")
    req = _request(shuffle_model, k=2, seed=3)
    patch = get_method("closed_form")(shuffle_model, req, seed=0, progress=False)
    patch.save(tmp_path / "patch.safetensors")
    save_bank(tmp_path / "bank.npz", req.targets, req.anchors)
    with pytest.raises(InputError, match="--bank"):
        _cli([str(folder), "--out", str(tmp_path / "o"), "--firewall", "--patch", str(tmp_path / "patch.safetensors")])
    with pytest.raises(InputError, match="--patch"):
        _cli([str(folder), "--out", str(tmp_path / "o"), "--firewall", "--bank", str(tmp_path / "bank.npz")])
    assert _cli([str(folder), "--out", str(tmp_path / "o"), "--firewall", "--patch",
                 str(tmp_path / "patch.safetensors"), "--bank", str(tmp_path / "bank.npz")]) == 0
    printed = capsys.readouterr().out
    assert "firewall: 2 identities" in printed and patch.fingerprint() in printed
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["firewall"]["enabled"] and m["patch"]["fingerprint"] == patch.fingerprint()
    assert set(m["source"]["files"]) >= {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}
    assert m["firewall"]["targets"] == patch.metadata["targets"]  # same salted fingerprints as the patch
    if not TRT_OK:
        with pytest.raises(BackendUnavailableError):
            _cli([str(folder), "--out", str(tmp_path / "t"), "--format", "tensorrt"])
        assert not (tmp_path / "t").exists()


def test_numpy_ddim_matches_diffusers_for_the_testbed_sampler():
    """The testbed samples with DDIM + x0 clipping; the ONNX runtime must take the same steps."""
    from fastforget.export.scheduler import DDIMNumpy, make_scheduler
    from fastforget.testbed.nets import sampler

    ref = sampler()
    cfg = {**dict(ref.config), "_class_name": "DDIMScheduler"}
    ours = make_scheduler(cfg)
    assert isinstance(ours, DDIMNumpy)
    ref.set_timesteps(25)
    ours.set_timesteps(25)
    assert np.array_equal(ours.timesteps, ref.timesteps.numpy())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 16, 16)).astype(np.float32)
    xt = torch.from_numpy(x.copy())
    for t in ours.timesteps:
        eps = (0.9 * x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)  # a plausible model output
        x = ours.step(eps, t, x)
        xt = ref.step(torch.from_numpy(eps), int(t), xt).prev_sample
        assert np.allclose(x, xt.numpy(), atol=1e-4)
