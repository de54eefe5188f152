"""Patch mechanics and the closed-form methods on a tiny random Arc2Face (fast, no trained weights)."""
import pytest
import torch
import torch.nn.functional as F

import fastforget as ff
from fastforget.errors import ConflictError, InputError, ModelLoadError, OutputExistsError, UnknownMethodError
from fastforget.identity.anchors import check_request, select_anchors
from fastforget.methods import ErasureRequest, available_methods, get_method
from fastforget.patch import Patch, fingerprint_embeddings

from test_models import _emb, release  # noqa: F401  (fixture)


@pytest.fixture()
def tiny(release):  # noqa: F811
    return ff.load(*release)


def _request(k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.randn(k * 2 + 40, 512, generator=g), dim=1)
    return ErasureRequest(targets=e[:k], anchors=e[k:2 * k], retain=e[2 * k:2 * k + 8], preserve=e[2 * k + 8:])


def _state(model):
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


def test_registry_names_every_method():
    names = available_methods()
    for m in ("closed_form", "uce"):
        assert m in names
    with pytest.raises(UnknownMethodError, match="nope"):
        get_method("nope")


@pytest.mark.parametrize("method", ["closed_form", "uce"])
def test_closed_form_patch_touches_only_attn2_kv_and_not_the_input(tiny, method):
    before = _state(tiny)
    patch = get_method(method)(tiny, _request(), seed=0)
    assert all(n.startswith("unet.") and ".attn2.to_" in n and n.split(".")[-2] in ("to_k", "to_v")
               for n in patch.names)
    assert len(patch.names) == 2 * len(tiny.attn2_modules())
    after = _state(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_closed_form_maps_target_keys_to_anchor_keys_and_holds_preserved(tiny):
    req = _request()
    patch = get_method("closed_form")(tiny, req, seed=0, neighbours=0, preserve_weight=1.0, erase_weight=50.0)
    erased = patch.apply(tiny.clone())
    name = next(iter(tiny.attn2_modules()))
    k0 = tiny.unet.get_submodule(name).to_k
    k1 = erased.unet.get_submodule(name).to_k
    with torch.no_grad():
        ct, ca, cp = tiny.condition(req.targets), tiny.condition(req.anchors), tiny.condition(req.preserve[:8])
        moved = (k1(ct) - k0(ca)).norm() / (k0(ct) - k0(ca)).norm()
        drift = (k1(cp) - k0(cp)).norm() / k0(cp).norm()
    assert moved < 0.2, moved  # target keys now land (close to) the anchor's
    assert drift < 0.05, drift


def test_patch_apply_revert_save_load_roundtrip(tiny, tmp_path):
    orig = _state(tiny)
    patch = get_method("closed_form")(tiny, _request(), seed=0)
    m = tiny.clone()
    patch.apply(m)
    with pytest.raises(InputError, match="does not fit"):
        patch.apply(m)  # already applied
    patch.revert(m)
    assert all(torch.equal(orig[k], v) for k, v in m.unet.state_dict().items())
    path = patch.save(tmp_path / "p.safetensors")
    with pytest.raises(OutputExistsError):
        patch.save(path)
    again = Patch.load(path)
    assert again.fingerprint() == patch.fingerprint() and again.metadata == patch.metadata
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ModelLoadError, match="bad.safetensors"):
        Patch.load(tmp_path / "bad.safetensors")


def test_same_request_same_patch_bytes(tiny):
    a = get_method("closed_form")(tiny, _request(), seed=3).to_bytes()
    b = get_method("closed_form")(tiny, _request(), seed=3).to_bytes()
    assert a == b


def test_metadata_holds_fingerprints_not_embeddings(tiny):
    req = _request()
    patch = get_method("closed_form")(tiny, req, seed=0)
    blob = patch.to_bytes()
    assert patch.metadata["targets"] == fingerprint_embeddings(req.targets)
    for v in req.targets[0][:4].tolist():
        assert repr(v).encode()[:8] not in blob  # no raw coordinates anywhere in the file
    assert fingerprint_embeddings(req.targets, "other-salt") != patch.metadata["targets"]


def test_unknown_option_is_named(tiny):
    with pytest.raises(InputError, match="bogus"):
        get_method("closed_form")(tiny, _request(), bogus=1)


def test_anchor_rule_and_request_conflicts():
    g = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(1, 512, generator=g), dim=1)
    pool = F.normalize(torch.randn(300, 512, generator=g), dim=1)
    # plant identities at cos 0.2 and 0.95 of the target: the anchor is the 0.2 one, never the near-copy
    u = F.normalize(torch.randn(2, 512, generator=g), dim=1)
    u = F.normalize(u - (u @ t.T) * t, dim=1)
    pool[7] = 0.2 * t[0] + (1 - 0.04) ** 0.5 * u[0]
    pool[9] = 0.95 * t[0] + (1 - 0.95 ** 2) ** 0.5 * u[1]
    a, idx = select_anchors(t, pool, seed=0)
    cos = (pool[idx] @ t.T).item()
    assert abs(cos - 0.2) < 0.01 and idx.item() != 9
    with pytest.raises(ConflictError, match="also in retain"):
        check_request(t, None, torch.cat([pool[:3], t]))
    with pytest.raises(ConflictError, match="anchor"):
        check_request(t, t.clone(), None)


def test_preservation_statistics_cache_follows_text_encoder_edits(tiny):
    req = _request()
    a = get_method("closed_form")(tiny, req, seed=0)
    b = get_method("closed_form")(tiny, req, seed=0)  # served from the cache
    assert a.to_bytes() == b.to_bytes()
    with torch.no_grad():  # same module object, weights edited in place: the cache must not be reused
        tiny.text_encoder.text_model.final_layer_norm.weight.mul_(1.5)
    c = get_method("closed_form")(tiny, req, seed=0)
    from fastforget.methods import closed_form

    closed_form._GRAM_CACHE.clear()
    fresh = get_method("closed_form")(tiny, req, seed=0)
    assert c.to_bytes() == fresh.to_bytes()
