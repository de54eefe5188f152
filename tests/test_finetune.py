"""Fine-tuning erasers (piu, esd_x) on a tiny Arc2Face-architecture model: scope, purity, determinism, learning."""
import json

import pytest
import torch
import torch.nn.functional as F

from fastforget.errors import InputError
from fastforget.methods import ErasureRequest, get_method
from fastforget.methods.finetune import rank_identity_sensitive_attn2, resolve_layers
from fastforget.patch import fingerprint_embeddings

FAST = {"steps": 3, "micro_batch": 2, "accumulation": 1}


def _tiny_model(tmp_path, sd15_layout: bool = False):
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from fastforget.models.arc2face import Arc2FaceModel
    from fastforget.testbed.nets import _tokenizer_vocab, write_tokenizer

    torch.manual_seed(0)
    vocab = _tokenizer_vocab()[0]
    width = 768 if sd15_layout else 512
    if sd15_layout:  # SD-1.5's block layout (16 attn2) with tiny channels
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 8, 8),
            cross_attention_dim=width, attention_head_dim=4, norm_num_groups=4)
    else:
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=width, attention_head_dim=8, norm_num_groups=8)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    write_tokenizer(tmp_path / "tok", max_length=77)
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000)
    return Arc2FaceModel(unet, text, tok, sched, vae=None, unshuffle=1, resolution=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_model(tmp_path_factory.mktemp("tiny"))


def _emb(n, seed):
    return F.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.fixture(scope="module")
def request_():
    return ErasureRequest(targets=_emb(2, 1), anchors=_emb(2, 2), retain=_emb(3, 3), salt="test-salt")


def _state(model):
    return {k: v.clone() for k, v in list(model.unet.state_dict().items()) + list(model.text_encoder.state_dict().items())}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_piu_patch_touches_only_chosen_attn2_and_leaves_model(tiny, request_):
    before = _state(tiny)
    patch = get_method("piu")(tiny, request_, seed=0, progress=False, **FAST)
    assert _same_state(before, _state(tiny))  # the caller's model is untouched
    # tiny UNet (4 attn2) is not SD-1.5: "auto" takes the ceil(9/16 * 4) = 3 most identity-sensitive
    ranked = rank_identity_sensitive_attn2(tiny, seed=0)
    assert len(ranked) == 4
    chosen = patch.metadata["trainable_modules"]
    assert patch.metadata["layer_rule"] == "sensitivity"
    assert sorted(chosen) == sorted(n for n, _ in ranked[:3])
    assert patch.names and all(any(n.startswith(f"unet.{m}.") for m in chosen) for n in patch.names)
    assert {n.split(".attn2.")[0] + ".attn2" for n in patch.names} == {f"unet.{m}" for m in chosen}
    assert any(".to_q." in n for n in patch.names) and any(".to_out." in n for n in patch.names)
    # metadata: fingerprints, never raw embeddings; per-step losses
    m = patch.metadata
    assert m["method"] == "piu" and m["seed"] == 0 and m["config"]["lambda_p"] == 10.0
    assert m["targets"] == fingerprint_embeddings(request_.targets, "test-salt")
    assert m["anchors"] == fingerprint_embeddings(request_.anchors, "test-salt")
    assert len(m["loss"]["forget"]) == 3 and m["retain_source"] == "retain" and m["forget_set_sizes"] == [3, 3]
    assert f"{float(request_.targets[0, 0]):.6f}" not in json.dumps(m)
    # the patch applies to (a clone of) the model and reverts exactly
    clone = tiny.clone()
    patch.apply(clone)
    assert not _same_state(before, _state(clone))
    patch.revert(clone)
    assert _same_state(before, _state(clone))


def test_same_seed_same_patch(tiny, request_):
    fit = get_method("piu")
    a = fit(tiny, request_, seed=7, progress=False, **FAST)
    b = fit(tiny, request_, seed=7, progress=False, **FAST)
    c = fit(tiny, request_, seed=8, progress=False, **FAST)
    assert a.names == b.names and all(torch.equal(a.new[k], b.new[k]) for k in a.names)
    assert a.fingerprint() == b.fingerprint() and a.metadata == b.metadata
    assert not all(torch.equal(a.new[k], c.new[k]) for k in a.names)


@torch.no_grad()
def _forget_objective(model, teacher, target, anchor, n=16):
    """PIU's forget term (η = 1) on a fixed batch of noisy latents: ‖ε(c_f) − (2 ε*(c_a) − ε*(c_f))‖²."""
    from fastforget.methods.finetune import _ddpm, _sample_xt

    x, t = _sample_xt(_ddpm(model), model.sample_shape(n), torch.Generator().manual_seed(123))
    cf, ca = model.condition(target.expand(n, -1)), model.condition(anchor.expand(n, -1))
    ef = teacher.unet(x, t, encoder_hidden_states=cf).sample
    ea = teacher.unet(x, t, encoder_hidden_states=ca).sample
    return F.mse_loss(model.unet(x, t, encoder_hidden_states=cf).sample, 2 * ea - ef).item()


@pytest.mark.parametrize("lambda_p,factor", [(0.0, 0.25), (10.0, 0.9)])
def test_piu_forget_loss_decreases(tiny, lambda_p, factor):
    req = ErasureRequest(targets=_emb(1, 1), anchors=_emb(1, 2), retain=_emb(3, 3))
    patch = get_method("piu")(tiny, req, seed=0, progress=False, steps=30, micro_batch=4, accumulation=1,
                              layers="x", lambda_p=lambda_p)
    forget = patch.metadata["loss"]["forget"]
    assert len(forget) == 30
    if lambda_p == 0:  # the training curve itself (noisy: fresh x_t, t, mixes every step)
        assert sum(forget[-5:]) < factor * sum(forget[:5]), forget
    erased = patch.apply(tiny.clone())
    before = _forget_objective(tiny, tiny, req.targets, req.anchors)
    after = _forget_objective(erased, tiny, req.targets, req.anchors)
    assert after < factor * before, (before, after)


def test_ranking_covers_every_attn2_sorted(tiny):
    before = _state(tiny)
    ranked = rank_identity_sensitive_attn2(tiny, seed=0, n_pairs=3)
    assert sorted(n for n, _ in ranked) == sorted(tiny.attn2_modules())
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    assert ranked == rank_identity_sensitive_attn2(tiny, seed=0, n_pairs=3)
    assert _same_state(before, _state(tiny))
    assert not any(m._forward_hooks for m in tiny.attn2_modules().values())


def test_auto_layers_on_sd15_layout_is_piu_set(tmp_path):
    model = _tiny_model(tmp_path, sd15_layout=True)
    names = list(model.attn2_modules())
    assert len(names) == 16
    chosen, info = resolve_layers(model, "auto")
    assert info["rule"] == "piu_sd15" and len(chosen) == 9
    assert all(n.startswith(("down_blocks.2.", "mid_block.", "up_blocks.1.", "up_blocks.2.")) for n in chosen)
    assert resolve_layers(model, "x")[0] == names
    assert resolve_layers(model, "full")[0] is None
    assert resolve_layers(model, [names[3], "unet." + names[0]])[0] == [names[0], names[3]]


def test_full_and_list_layers(tiny, request_):
    fit = get_method("piu")
    full = fit(tiny, request_, seed=0, progress=False, layers="full", steps=1, micro_batch=2, accumulation=1)
    assert full.metadata["trainable_modules"] == "full"
    assert any(".attn2." not in n for n in full.names) and all(n.startswith("unet.") for n in full.names)
    one = next(iter(tiny.attn2_modules()))
    only = fit(tiny, request_, seed=0, progress=False, layers=[one], **FAST)
    assert only.names and all(n.startswith(f"unet.{one}.") for n in only.names)


def test_esd_x_trains_every_attn2_without_touching_model(tiny, request_):
    before = _state(tiny)
    patch = get_method("esd_x")(tiny, request_, seed=0, progress=False, steps=2, micro_batch=2, lr=1e-3)
    assert _same_state(before, _state(tiny))
    assert {n.split(".attn2.")[0] + ".attn2" for n in patch.names} == {f"unet.{m}" for m in tiny.attn2_modules()}
    assert patch.metadata["config"] == {"steps": 2, "lr": 1e-3, "eta": 1.0, "micro_batch": 2}
    assert len(patch.metadata["loss"]["total"]) == 2 and patch.metadata["method"] == "esd_x"


def test_target_sets_and_random_retain(tiny):
    sets = [_emb(5, 11), _emb(1, 12)]
    req = ErasureRequest(targets=torch.stack([sets[0].mean(0), sets[1][0]]), anchors=_emb(2, 13),
                         extra={"target_sets": sets})
    req.targets = F.normalize(req.targets, dim=1)
    patch = get_method("piu")(tiny, req, seed=0, progress=False, **FAST)
    assert patch.metadata["forget_set_sizes"] == [5, 3] and patch.metadata["retain_source"] == "random"


@pytest.mark.parametrize("method,opts,match", [
    ("piu", {"stpes": 3}, "stpes"),
    ("esd_x", {"lambda_p": 1.0}, "lambda_p"),
    ("piu", {"layers": "everything"}, "layers"),
    ("piu", {"layers": ["down_blocks.9.attn2"]}, "down_blocks.9.attn2"),
    ("piu", {"steps": 0}, "steps"),
    ("esd_x", {"lr": -1.0}, "lr"),
])
def test_bad_options_are_named(tiny, request_, method, opts, match):
    with pytest.raises(InputError, match=match):
        get_method(method)(tiny, request_, progress=False, **opts)
