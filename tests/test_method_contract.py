"""The contract every registered method passes (table-driven over available_methods()), on a tiny
real-layout Arc2Face with a real (tiny, random-weight) ArcFace ONNX encoder:

- the caller's model is untouched; apply then revert restores every byte;
- the same request and seed give the same patch bytes, in this process and in another one;
- neither the patch, the report nor the saved model holds the raw float32 bytes of a target embedding;
- bad options raise typed errors naming them, before any work."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastforget as ff
from fastforget.errors import InputError
from fastforget.methods import available_methods
from test_arcface_onnx import onnx_encoder  # noqa: F401  (fixture)
from test_models import _emb, release  # noqa: F401  (fixture)

BUILTIN = ["bia", "closed_form", "esd_x", "piu", "uce"]
FAST = {  # schedules small enough for CPU CI; the algorithms are the defaults'
    "closed_form": {}, "uce": {},
    "piu": {"steps": 2, "micro_batch": 2, "accumulation": 1},
    "esd_x": {"steps": 2, "micro_batch": 2},
    "bia": {"neighbours": 8, "inversion_steps": 3, "decode_steps": 3, "k_nearest": 2, "halvings": 1, "chunk": 16,
            "rebalance_tries": 0, "steps": 2, "n_sources": 1, "n_negatives": 1, "n_preserve": 1, "batch": 2,
            "source_steps": 2},
}
TARGETS, RETAIN, PRESERVE = _emb(1, 101), _emb(4, 102), _emb(48, 103)


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for part in (model.unet, model.text_encoder, model.vae):
        for k, v in sorted(part.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _erase(models, base, encoder_path, method, report=False):
    model = ff.load(models, base=base)
    return model, ff.erase(model, TARGETS, method=method, retain=RETAIN, encoder=ff.load_encoder(encoder_path),
                           preserve=PRESERVE, report=report, verify_n=1, progress=False, seed=3, **FAST[method])


def test_every_builtin_method_is_in_the_table():
    assert set(BUILTIN) <= set(available_methods()) and set(BUILTIN) == set(FAST)


@pytest.fixture(scope="module")
def results(release, onnx_encoder):
    models, base = release
    enc_path = onnx_encoder[1] / "arcface.onnx"
    out = {}
    for m in BUILTIN:
        model = ff.load(models, base=base)
        before = _state_hash(model)
        res = ff.erase(model, TARGETS, method=m, retain=RETAIN, encoder=ff.load_encoder(enc_path), preserve=PRESERVE,
                       report=(m == "closed_form"), verify_n=1, progress=False, seed=3, **FAST[m])
        out[m] = (model, before, res)
    return out


@pytest.mark.parametrize("method", BUILTIN)
def test_callers_model_untouched_and_revert_exact(results, method):
    model, before, res = results[method]
    assert _state_hash(model) == before
    assert res.patch.names, f"{method} changed nothing"
    assert _state_hash(res.model) != before
    res.patch.revert(res.model)
    assert _state_hash(res.model) == before


def test_same_request_same_bytes_in_another_process(results, release, onnx_encoder, tmp_path):
    models, base = release
    script = f"""
import sys, hashlib, json
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_method_contract as c
out = {{}}
for m in c.BUILTIN:
    _, res = c._erase({str(models)!r}, {str(base)!r}, {str(onnx_encoder[1] / 'arcface.onnx')!r}, m)
    out[m] = hashlib.sha256(res.patch.to_bytes()).hexdigest()
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    other = json.loads(proc.stdout.strip().splitlines()[-1])
    here = {m: hashlib.sha256(results[m][2].patch.to_bytes()).hexdigest() for m in BUILTIN}
    assert other == here


@pytest.mark.parametrize("method", BUILTIN)
def test_no_raw_target_embedding_anywhere(results, method, tmp_path):
    _, _, res = results[method]
    needles = [t.numpy().astype(np.float32).tobytes() for t in TARGETS] + \
        [t.numpy().astype(np.float32).tobytes()[:64] for t in TARGETS]  # any 16 leading floats
    res.save(tmp_path / "out")
    blobs = [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    blobs.append(res.patch.to_bytes())
    if res.report is not None:
        blobs.append(res.report.to_json().encode())
        assert json.loads(res.report.to_json())["targets"]  # fingerprints are there instead
    for blob in blobs:
        assert not any(n in blob for n in needles)


@pytest.mark.parametrize("method", BUILTIN)
def test_bad_options_are_typed_and_named_before_any_work(method, monkeypatch):
    from fastforget.methods.base import _REGISTRY

    monkeypatch.setitem(_REGISTRY, method, lambda *a, **k: pytest.fail("fit ran"))
    monkeypatch.setattr(ff.models, "load", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(InputError, match="no_such_option"):
        ff.erase("demo", TARGETS, method=method, no_such_option=1)
    bad_value = {"closed_form": ("lam", -1), "uce": ("erase_weight", float("nan")), "piu": ("lr", "fast"),
                 "esd_x": ("steps", 1.5), "bia": ("tau", 7)}[method]
    with pytest.raises(InputError, match=bad_value[0]):
        ff.erase("demo", TARGETS, method=method, **{bad_value[0]: bad_value[1]})
