"""erase_batch(structure="keyed"): added MLP units that each fire on one erased person at one token position.

What a user relies on: each erased target's conditioning becomes its anchor's, people nobody named and the
empty prompt are left exactly as they were, the widened model saves and reloads in transformers' own
CLIPTextModel (every layer of a deeper text encoder too), adds and withdrawals equal one build over the
resulting queue, and a bad option is refused before any work."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fastforget as ff
from fastforget.errors import InputError
from test_arcface_onnx import onnx_encoder  # noqa: F401  (fixture: tiny random-weight ArcFace ONNX)

TARGETS = list(range(7300, 7312))
UNNAMED = list(range(7400, 7420))


def _emb(encoder, ids, seed=0):
    from fastforget.identity.embeddings import to_embeddings

    return to_embeddings(list(ids), encoder, per_identity=2, seed=seed)


@pytest.fixture(scope="module")
def targets(encoder):
    return _emb(encoder, TARGETS)


@pytest.fixture(scope="module")
def queue(targets):
    return [{"id": f"req-{i}", "targets": [row.tolist()]} for i, row in enumerate(targets)]


@pytest.fixture(scope="module")
def keyed(demo_model, queue):
    return ff.erase_batch(demo_model, queue, structure="keyed", progress=False)


def test_targets_draw_their_anchors_and_nobody_else_moves(demo_model, encoder, keyed, targets):
    with torch.no_grad():
        un = _emb(encoder, UNNAMED)
        c0, ce = demo_model.condition(un), keyed.model.condition(un)
        # people nobody named and the CFG branch: unchanged up to float rounding (the wider fc1 / fc2 products
        # may round differently at another thread count; a firing unit moves a state by ~1)
        assert (c0 - ce).abs().max() < 1e-5
        assert (demo_model.null_condition(1) - keyed.model.null_condition(1)).abs().max() < 1e-5
        t0, te, ca = demo_model.condition(targets), keyed.model.condition(targets), demo_model.condition(keyed.anchors)
    residual = (te - ca).flatten(1).norm(dim=1) / (t0 - ca).flatten(1).norm(dim=1)
    assert residual.max() < 0.2, residual
    m = keyed.report.metrics
    assert m["preserve_movement"] < 1e-5 and m["target_residual"] < 0.2
    assert m["units"] == 2 * len(m["positions"]) * len(targets)
    # generations from an erased embedding are its anchor's person, not the target
    g = keyed.model.generate_tensor(targets[:3], seed=1, steps=10)
    e = encoder.encode_tensor(g)
    to_target = (e * targets[:3]).sum(1)
    to_anchor = (e * keyed.anchors[:3]).sum(1)
    assert (to_anchor > to_target).all(), (to_target, to_anchor)


def test_saved_widened_model_loads_in_transformers_and_matches(keyed, targets, tmp_path):
    from transformers import CLIPTextModel

    out = keyed.save(tmp_path / "out")
    cfg = json.loads((out / "model" / "text_encoder" / "config.json").read_text())
    assert cfg["intermediate_size"] == 1024 + keyed.report.metrics["units"]
    te = CLIPTextModel.from_pretrained(out / "model" / "text_encoder")  # the ecosystem's own loader
    assert te.text_model.encoder.layers[-1].mlp.fc1.out_features == cfg["intermediate_size"]
    again = ff.load(str(out / "model"))
    with torch.no_grad():
        assert torch.equal(again.condition(targets), keyed.model.condition(targets))
    # the patch reverts the folder's model to the unedited one (shapes and config included)
    patch = ff.Patch.load(out / "patch.safetensors")
    patch.revert(again)
    assert again.text_encoder.config.intermediate_size == 1024


def test_onnx_export_of_the_widened_model_runs_in_onnxruntime(keyed, targets, tmp_path):
    import onnxruntime as ort

    ff.export.to_onnx(keyed.model, tmp_path / "onnx", patch=keyed.patch)
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "conditioner.onnx"))
    got = sess.run(None, {sess.get_inputs()[0].name: targets.numpy()})[0]
    with torch.no_grad():
        want = keyed.model.condition(targets).numpy()
    assert abs(got - want).max() < 1e-4


def test_tensorrt_refit_refuses_a_shape_change(demo_model, keyed, tmp_path):
    """Engines cannot be refitted with wider tensors: the refit plan says so (typed) instead of failing in TensorRT."""
    from fastforget.export.trt import refit_weights

    plain = ff.export.to_onnx(demo_model, tmp_path / "plain", verify=False)
    with pytest.raises(InputError, match="cannot change shapes"):
        refit_weights(plain, keyed.patch)


def _close(a, b, rel=1e-5):
    """The same tensors within float rounding, relative to each tensor's largest value (byte-identical at one
    thread; the text-encoder products of a different queue split can round differently at two)."""
    assert a.names == b.names
    for k in b.names:
        assert a.new[k].shape == b.new[k].shape, k
        scale = b.new[k].abs().max()
        assert (a.new[k] - b.new[k]).abs().max() <= rel * scale, (k, float((a.new[k] - b.new[k]).abs().max() / scale))


def test_incremental_and_withdrawal_equal_one_build(demo_model, queue, keyed, targets, tmp_path):
    first = ff.erase_batch(demo_model, queue[:5], structure="keyed", progress=False)
    first.save(tmp_path / "first")
    more = ff.erase_batch(tmp_path / "first", queue[5:], progress=False)
    assert more.patch.names == keyed.patch.names
    _close(more.patch, keyed.patch)
    back = ff.withdraw(keyed, ["req-3"])
    fresh = ff.erase_batch(demo_model, queue[:3] + queue[4:], structure="keyed", progress=False)
    _close(back.patch, fresh.patch)
    with torch.no_grad():
        restored = back.model.condition(targets[3:4]) - demo_model.condition(targets[3:4])
        assert restored.abs().max() < 1e-5  # the withdrawn person: the unedited states again
        assert not torch.allclose(back.model.condition(targets[4:5]), demo_model.condition(targets[4:5]))
    assert back.ledger["requests"][3]["status"] == "withdrawn"


def test_same_request_same_bytes(demo_model, queue, keyed):
    again = ff.erase_batch(demo_model, queue, structure="keyed", progress=False)
    assert again.patch.to_bytes() == keyed.patch.to_bytes()


def test_bad_keyed_options_are_refused_before_work(demo_model, queue):
    with pytest.raises(InputError, match="tau_lo"):
        ff.erase_batch("/nonexistent/model", queue, structure="keyed", tau_lo=0.96, tau_hi=0.9, progress=False)
    with pytest.raises(InputError, match="neighbours"):  # a closed-form option is not a keyed one
        ff.erase_batch("/nonexistent/model", queue, structure="keyed", neighbours=4, progress=False)
    with pytest.raises(InputError, match="preservation set"):
        ff.erase_batch(demo_model, [{"id": "a", "targets": queue[0]["targets"], "retain": queue[1]["targets"]}],
                       structure="keyed", preserve=None, progress=False)


def _two_layer_model():
    """A random-weight Arc2Face-family model (test_models' tiny parts) whose CLIP text encoder has 2 layers
    (Arc2Face's has 12)."""
    import tempfile
    from pathlib import Path

    from transformers import CLIPTokenizer

    from fastforget.models.arc2face import Arc2FaceModel
    from fastforget.testbed.nets import write_tokenizer
    from test_models import _tiny_parts

    unet, text, vae, sched = _tiny_parts(text_layers=2)
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(Path(d) / "tok", max_length=77)
        tok = CLIPTokenizer.from_pretrained(Path(d) / "tok")
    return Arc2FaceModel(unet, text, tok, sched, vae)


def test_deeper_text_encoder_every_layer_widened_and_reloads(tmp_path):
    """A random 2-layer CLIP spreads identity over most positions: the default is refused (typed, naming the
    option); on one position the units are built, every layer is widened and the folder reloads."""
    from transformers import CLIPTextModel

    model = _two_layer_model()
    g = torch.Generator().manual_seed(3)
    gallery = F.normalize(torch.randn(400, 512, generator=g), dim=1)
    tg = F.normalize(torch.randn(3, 512, generator=g), dim=1)
    reqs = [{"id": f"r{i}", "targets": [t.tolist()]} for i, t in enumerate(tg)]
    with pytest.raises(InputError, match="max_positions"):
        ff.erase_batch(model, reqs, structure="keyed", preserve=gallery, progress=False)
    res = ff.erase_batch(model, reqs, structure="keyed", preserve=gallery, position_coverage=0.05, progress=False)
    layers = res.model.text_encoder.text_model.encoder.layers
    width = 64 + res.report.metrics["units"]
    assert res.report.metrics["units"] == 2 * 3
    assert [layer.mlp.fc1.out_features for layer in layers] == [width, width]
    assert torch.count_nonzero(layers[0].mlp.fc2.weight[:, 64:]) == 0  # layer 0: zero units, output unchanged
    with torch.no_grad():
        assert torch.allclose(model.condition(gallery[:50]), res.model.condition(gallery[:50]), atol=1e-5)
        p = res.report.metrics["positions"][0]
        te, ca = res.model.condition(tg)[:, p], model.condition(res.anchors)[:, p]
        t0 = model.condition(tg)[:, p]
    assert ((te - ca).norm(dim=1) < 0.05 * (t0 - ca).norm(dim=1)).all()  # at its position: the anchor's state
    res.save(tmp_path / "out")
    te = CLIPTextModel.from_pretrained(tmp_path / "out" / "model" / "text_encoder")
    assert te.config.intermediate_size == width
    assert model.text_encoder.config.intermediate_size == 64  # the input model is untouched


def test_users_model_onnx_encoder_and_photo_queue_from_the_cli(onnx_encoder, tmp_path, monkeypatch):
    """A copy of the testbed folder (a user's model), a random-weight ArcFace ONNX encoder, a queue of photo
    paths, the default preservation set drawn by the model: `fastforget batch --structure keyed` end to end."""
    import shutil

    from PIL import Image

    from fastforget.cli import main
    from fastforget.identity import preservation
    from fastforget.testbed import weights_dir

    monkeypatch.setenv("FASTFORGET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(preservation, "DEFAULT_RECIPE", {**preservation.DEFAULT_RECIPE,
                                                         "drawn": 16, "draw_steps": 2, "samples": 256})
    shutil.copytree(weights_dir() / "generator", tmp_path / "mine")
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "mine").rglob("*"))
    lines = []
    for k, person in enumerate([7500, 7501]):
        ims, _ = ff.testbed.render([person], 2, seed=0)
        names = []
        for i, im in enumerate(ims):
            Image.fromarray(im).resize((112, 112)).save(tmp_path / f"p{k}-{i}.png")  # an aligned crop
            names.append(f"p{k}-{i}.png")
        lines.append(json.dumps({"id": f"person-{k}", "targets": names}))
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    enc = str(onnx_encoder[1] / "arcface.onnx")
    rc = main(["batch", str(tmp_path / "q.jsonl"), "--model", str(tmp_path / "mine"), "--out", str(tmp_path / "out"),
               "--structure", "keyed", "--encoder", enc, "--option", "tau_hi=0.92"])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    m = report["metrics"]
    assert m["units"] == 2 * 2 * len(m["positions"]) and m["preserve_movement"] < 1e-5
    assert m["target_residual"] < 0.5  # random-weight encoder: its "people" are random vectors (testbed: < 0.2)
    ledger = (tmp_path / "out" / "ledger.json").read_text()
    assert json.loads(ledger)["config"]["tau_hi"] == 0.92  # --option reached the structure
    assert "p0-0.png" not in ledger and "person-0" in ledger  # ids and fingerprints, never file names
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "mine").rglob("*")) == before  # input untouched
    model = ff.load(str(tmp_path / "out" / "model"))
    assert not model.is_testbed and model.text_encoder.config.intermediate_size == 1024 + m["units"]
