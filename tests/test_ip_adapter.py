"""Portrait generators (IP-Adapter FaceID, InstantID's face adapter) on tiny random diffusers pipelines and
tiny random checkpoints in the original IP-Adapter key layout: loading through diffusers' own converter,
parity with plain diffusers, generation, edits of the image projection, and saving back in the layout."""
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastforget as ff
from fastforget.errors import EmbeddingError, InputError, ModelLoadError, OutputExistsError, UnsafeCheckpointError
from fastforget.models.ip_adapter import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, InstantIDModel, PortraitModel
from fastforget.patch import Patch, get_parameter
from fastforget.testbed.nets import _tokenizer_vocab, write_tokenizer
from test_models import WIDTH, _emb, _tiny_parts, _tree_hash

SD_STEPS = 2


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    write_tokenizer(tmp / "tok", max_length=77)
    return CLIPTokenizer.from_pretrained(tmp / "tok")


def _rand(g, *shape, std=0.05):
    return torch.randn(*shape, generator=g) * std


def _ip_layers(unet, g, lora_rank=None) -> dict:
    """`<k>.to_k_ip/to_v_ip.weight` for the cross-attention processors (k = 1, 3, ...), with FaceID LoRA on every
    processor when `lora_rank` is given: IP-Adapter's numbering over `unet.attn_processors`."""
    d, out = unet.config.cross_attention_dim, {}
    for k, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name[:-len(".processor")])
        if name.endswith("attn2.processor"):
            out[f"{k}.to_k_ip.weight"] = _rand(g, attn.to_k.out_features, d)
            out[f"{k}.to_v_ip.weight"] = _rand(g, attn.to_v.out_features, d)
        if lora_rank:
            for p, lin in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
                out[f"{k}.{p}_lora.down.weight"] = _rand(g, lora_rank, lin.in_features, std=0.2)
                out[f"{k}.{p}_lora.up.weight"] = _rand(g, lin.out_features, lora_rank, std=0.2)
    return out


def faceid_checkpoint(unet, tokens=4, lora_rank=None, seed=0) -> dict:
    """IP-Adapter FaceID layout: MLPProjModel Linear(512, 1024)-GELU-Linear(1024, D*tokens), LayerNorm(D)."""
    g, d = torch.Generator().manual_seed(seed), unet.config.cross_attention_dim
    proj = {"proj.0.weight": _rand(g, 1024, 512), "proj.0.bias": _rand(g, 1024),
            "proj.2.weight": _rand(g, d * tokens, 1024), "proj.2.bias": _rand(g, d * tokens),
            "norm.weight": 1 + _rand(g, d), "norm.bias": _rand(g, d)}
    return {"image_proj": proj, "ip_adapter": _ip_layers(unet, g, lora_rank)}


def instantid_checkpoint(unet, dim=64, queries=16, seed=0) -> dict:
    """InstantID / IP-Adapter Resampler layout (depth 4, dim_head 64, 512-d input), small `dim`."""
    g, d = torch.Generator().manual_seed(seed), unet.config.cross_attention_dim
    heads, ff_inner = dim // 64, dim * 4
    proj = {"latents": torch.randn(1, queries, dim, generator=g) / dim ** 0.5,
            "proj_in.weight": _rand(g, dim, 512), "proj_in.bias": _rand(g, dim),
            "proj_out.weight": _rand(g, d, dim, std=0.2), "proj_out.bias": _rand(g, d),
            "norm_out.weight": 1 + _rand(g, d), "norm_out.bias": _rand(g, d)}
    for i in range(4):
        p = f"layers.{i}."
        proj |= {p + "0.norm1.weight": 1 + _rand(g, dim), p + "0.norm1.bias": _rand(g, dim),
                 p + "0.norm2.weight": 1 + _rand(g, dim), p + "0.norm2.bias": _rand(g, dim),
                 p + "0.to_q.weight": _rand(g, 64 * heads, dim, std=0.2),
                 p + "0.to_kv.weight": _rand(g, 2 * 64 * heads, dim, std=0.2),
                 p + "0.to_out.weight": _rand(g, dim, 64 * heads, std=0.2),
                 p + "1.0.weight": 1 + _rand(g, dim), p + "1.0.bias": _rand(g, dim),
                 p + "1.1.weight": _rand(g, ff_inner, dim, std=0.2), p + "1.3.weight": _rand(g, dim, ff_inner, std=0.2)}
    return {"image_proj": proj, "ip_adapter": _ip_layers(unet, g)}


def resampler_reference(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """IP-Adapter's resampler.py Resampler.forward (as InstantID ships it) on the original keys: x (N, L, 512)."""
    lat = sd["latents"].repeat(x.shape[0], 1, 1)
    x = F.linear(x, sd["proj_in.weight"], sd["proj_in.bias"])
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    for i in range(4):
        p = f"layers.{i}."
        xn, ln_lat = ln(x, p + "0.norm1"), ln(lat, p + "0.norm2")
        heads = sd[p + "0.to_q.weight"].shape[0] // 64
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q = split(F.linear(ln_lat, sd[p + "0.to_q.weight"]))
        k, v = map(split, F.linear(torch.cat([xn, ln_lat], dim=-2), sd[p + "0.to_kv.weight"]).chunk(2, dim=-1))
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
        out = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1) @ v
        lat = F.linear(out.transpose(1, 2).reshape(lat.shape[0], lat.shape[1], -1), sd[p + "0.to_out.weight"]) + lat
        h = F.linear(F.gelu(F.linear(ln(lat, p + "1.0"), sd[p + "1.1.weight"])), sd[p + "1.3.weight"])
        lat = h + lat
    return ln(F.linear(lat, sd["proj_out.weight"], sd["proj_out.bias"]), "norm_out")


@pytest.fixture(scope="module")
def faceid(tmp_path_factory):
    """A tiny StableDiffusionPipeline folder (diffusers save_pretrained) + FaceID checkpoints (.bin, .safetensors,
    .bin with LoRA) in the original layout."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("faceid")
    unet, text, vae, _ = _tiny_parts()
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=_tokenizer(root), unet=unet, scheduler=_ddim(),
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(root / "sd")
    state = faceid_checkpoint(unet)
    torch.save(state, root / "ip-adapter-faceid.bin")
    save_file({f"{p}.{k}": v for p in state for k, v in state[p].items()}, str(root / "ip-adapter-faceid.safetensors"))
    torch.save(faceid_checkpoint(unet, lora_rank=4, seed=1), root / "faceid-lora.bin")
    return root


@pytest.fixture(scope="module")
def faceid_model(faceid):
    return ff.load(faceid / "sd", ip_adapter=faceid / "ip-adapter-faceid.bin")


@pytest.fixture(scope="module")
def instantid(tmp_path_factory):
    """A tiny StableDiffusionXLPipeline folder + an InstantID-layout ip-adapter.bin."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("instantid")
    _, _, vae, _ = _tiny_parts()
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8)
    vocab = _tokenizer_vocab()[0]
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"])
    tok = _tokenizer(root)
    StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(cfg), text_encoder_2=CLIPTextModelWithProjection(cfg),
                              tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=_ddim(), add_watermarker=False
                              ).save_pretrained(root / "sdxl")
    torch.save(instantid_checkpoint(unet), root / "ip-adapter.bin")
    return root


def _plain_pipeline(folder: Path, ckpt: Path, xl: bool = False):
    """The same folder and checkpoint loaded by diffusers alone (no fastforget code)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_pretrained(folder)
    pipe.load_ip_adapter(str(ckpt.parent), subfolder="", weight_name=ckpt.name, image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_eps(unet, image_embeds, seed=3, width=WIDTH, extra=None):
    g = torch.Generator().manual_seed(seed)
    x, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, width, generator=g)
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=states,
                    added_cond_kwargs={"image_embeds": image_embeds, **(extra or {})}).sample


def _keys(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, weights_only=True)
    return {f"{p}.{k}": v for p in state for k, v in state[p].items()}


# ---------------------------------------------------------------- FaceID
def test_faceid_loads_bin_and_safetensors_through_diffusers(faceid, faceid_model):
    from diffusers.models.embeddings import IPAdapterFaceIDImageProjection, MultiIPAdapterImageProjection

    m = faceid_model
    assert type(m) is PortraitModel and m.family == "ip_adapter_faceid" and not m.is_testbed
    assert isinstance(m.unet.encoder_hid_proj, MultiIPAdapterImageProjection)
    assert isinstance(m.image_proj, IPAdapterFaceIDImageProjection) and m.num_tokens == 4
    assert len(m.ip_processors()) == 4 and all(hasattr(p, "to_k_ip") for p in m.ip_processors().values())
    names = m.identity_parameter_names()
    params = dict(m.image_proj.named_parameters())
    prefix = "unet.encoder_hid_proj.image_projection_layers.0."
    assert len(names) == 6 and all(get_parameter(m, n) is params[n.removeprefix(prefix)] for n in names)
    assert m.id_tokens(_emb(3)).shape == (3, 4, WIDTH) and m.image_embeds(_emb(3)).shape == (3, 1, 512)
    st = ff.load(faceid / "sd", ip_adapter=str(faceid / "ip-adapter-faceid.safetensors"))
    assert ff.load(m) is m
    e = m.image_embeds(_emb(2))
    # the UNet, adapter included, is what plain diffusers' load_ip_adapter builds, from either file
    ref = _plain_pipeline(faceid / "sd", faceid / "ip-adapter-faceid.bin")
    want = _unet_eps(ref.unet, [e])
    assert torch.equal(_unet_eps(m.unet, [e]), want) and torch.equal(_unet_eps(st.unet, [e]), want)
    # and so is the whole sampler: diffusers' pipeline, zeros for the negative image embedding
    noise = m.initial_noise(1, 5)
    img = ref(prompt=DEFAULT_PROMPT, negative_prompt=DEFAULT_NEGATIVE_PROMPT, num_inference_steps=SD_STEPS,
              ip_adapter_image_embeds=[torch.cat([torch.zeros_like(e[:1]), e[:1]])], latents=noise,
              guidance_scale=7.5, output_type="pt").images
    assert torch.allclose(m.generate(_emb(2)[:1], seed=5, steps=SD_STEPS, output_type="pt"), img, atol=1e-5)


def test_generate_is_deterministic_and_follows_output_type(faceid_model):
    m, e = faceid_model, _emb(2, 1)
    a = m.generate(e, seed=7, steps=SD_STEPS, output_type="np")
    assert a.dtype == np.float32 and a.shape == (2, 16, 16, 3) and 0 <= a.min() and a.max() <= 1
    assert a.tobytes() == m.generate(e, seed=7, steps=SD_STEPS, output_type="np").tobytes()
    assert not np.array_equal(a, m.generate(e, seed=8, steps=SD_STEPS, output_type="np"))
    pt = m.generate(e, seed=7, steps=SD_STEPS, output_type="pt")
    assert pt.shape == (2, 3, 16, 16) and np.allclose(pt.permute(0, 2, 3, 1).numpy(), a)
    pil = m.generate(e[:1], seed=7, steps=SD_STEPS)
    assert len(pil) == 1 and pil[0].size == (16, 16)
    # image i uses seed + i: a batch and its parts agree; a prompt changes the image
    assert np.allclose(m.generate(e[1:], seed=8, steps=SD_STEPS, output_type="np"), a[1:], atol=1e-6)
    assert np.allclose(m.generate(e, seed=7, steps=SD_STEPS, output_type="np", batch_size=1), a, atol=1e-6)
    assert not np.allclose(m.generate(e, prompt="a photo", seed=7, steps=SD_STEPS, output_type="np"), a)
    x = m.generate_tensor(e, seed=7, steps=SD_STEPS, guidance=None)
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("call,err,match", [
    (lambda m: m.generate(torch.randn(1, 128)), EmbeddingError, "wrong embedding size"),
    (lambda m: m.generate(torch.zeros(1, 512)), EmbeddingError, "zero"),
    (lambda m: m.generate(_emb(1), output_type="jpg"), InputError, "output_type"),
    (lambda m: m.generate(_emb(2), prompt=["a"]), InputError, "prompt: 1 prompt"),
    (lambda m: m.generate(_emb(1), prompt=3), InputError, "prompt"),
    (lambda m: m.generate(_emb(1), steps=0), InputError, "steps"),
    (lambda m: m.generate(_emb(1), cond=1), InputError, "unknown argument"),
    (lambda m: m.save_ip_adapter("x.onnx"), InputError, "must end in"),
    (lambda m: m.set_ip_adapter_scale(float("nan")), InputError, "scale"),
])
def test_bad_inputs_are_named(faceid_model, call, err, match):
    with pytest.raises(err, match=match):
        call(faceid_model)


def test_image_proj_edit_changes_output_and_saves_in_the_original_layout(faceid, faceid_model, tmp_path):
    m = faceid_model.clone(only=faceid_model.identity_parameter_names())
    e = _emb(2, 4)
    before, tokens = m.generate(e, seed=1, steps=SD_STEPS, output_type="np"), m.id_tokens(e)
    name = m.identity_parameter_names()[2]  # proj.2.weight
    p = get_parameter(m, name)
    with torch.enable_grad():  # differentiable in the projection: what an identity method trains
        p.requires_grad_(True)
        m.id_tokens(e).square().sum().backward()
        p.requires_grad_(False)
    assert p.grad is not None and p.grad.abs().sum() > 0
    Patch.from_edit(m, {name: p + 0.05 * torch.randn_like(p)}).apply(m)
    assert not torch.allclose(m.id_tokens(e), tokens)
    after = m.generate(e, seed=1, steps=SD_STEPS, output_type="np")
    assert np.abs(after - before).max() > 1e-3
    # the model it was cloned from is untouched; the UNet's own weights are shared, not copied
    assert torch.equal(faceid_model.id_tokens(e), tokens)
    assert m.unet.conv_in.weight is faceid_model.unet.conv_in.weight
    for fname in ("erased.bin", "erased.safetensors"):
        out = m.save_ip_adapter(tmp_path / fname)
        src = _keys(faceid / f"ip-adapter-faceid{Path(fname).suffix}")
        saved = _keys(out)
        assert set(saved) == set(src)
        assert all(torch.equal(saved[k], src[k]) for k in src if k != "image_proj." + "proj.2.weight")
        # plain diffusers loads the file and gives what the edited model gives
        ref = _plain_pipeline(faceid / "sd", out)
        x = m.image_embeds(e)
        assert torch.equal(_unet_eps(ref.unet, [x]), _unet_eps(m.unet, [x]))
        again = ff.load(faceid / "sd", ip_adapter=out)
        assert again.generate(e, seed=1, steps=SD_STEPS, output_type="np").tobytes() == after.tobytes()
    with pytest.raises(OutputExistsError, match="erased.bin"):
        m.save_ip_adapter(tmp_path / "erased.bin")
    m.save_ip_adapter(tmp_path / "erased.bin", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erased.bin", "erased.safetensors"]  # no temporaries


def test_faceid_lora_is_applied_and_kept(faceid, tmp_path):
    """The FaceID LoRA acts as IP-Adapter's LoRA processors: W x + up(down(x)) on to_q / to_k / to_v / to_out.0."""
    m = ff.load(faceid / "sd", ip_adapter=faceid / "faceid-lora.bin")
    state = torch.load(faceid / "faceid-lora.bin", weights_only=True)
    ref = _plain_pipeline(faceid / "sd", faceid / "faceid-lora.bin")  # no PEFT here: diffusers skips the LoRA
    ip = state["ip_adapter"]
    with torch.no_grad():
        for k, name in enumerate(n for n in ref.unet.attn_processors if not n.startswith("encoder_hid_proj")):
            attn = ref.unet.get_submodule(name[:-len(".processor")])
            for p, lin in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
                lin.weight += ip[f"{k}.{p}_lora.up.weight"] @ ip[f"{k}.{p}_lora.down.weight"]
    x = m.image_embeds(_emb(2))
    assert torch.allclose(_unet_eps(m.unet, [x]), _unet_eps(ref.unet, [x]), atol=1e-5)
    # the UNet's own weights stay the base pipeline's; the LoRA goes back into the file unchanged
    base = ff.load(faceid / "sd", ip_adapter=faceid / "ip-adapter-faceid.bin").unet.state_dict()
    assert all(torch.equal(v, base[k]) for k, v in m.unet.state_dict().items() if "processor" not in k
               and not k.startswith("encoder_hid_proj"))
    saved = _keys(m.save_ip_adapter(tmp_path / "lora.safetensors"))
    src = _keys(faceid / "faceid-lora.bin")
    assert set(saved) == set(src) and all(torch.equal(saved[k], src[k]) for k in src)


def test_save_pretrained_loads_in_fastforget_and_plain_diffusers(faceid, faceid_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    m, e = faceid_model, _emb(1, 9)
    out = m.save_pretrained(tmp_path / "pm")
    assert not list(out.rglob("*.bin"))
    again = ff.load(out)
    assert type(again) is PortraitModel and again.ip_adapter == str(out / "ip_adapter.safetensors")
    want = m.generate(e, seed=2, steps=SD_STEPS, output_type="np")
    assert again.generate(e, seed=2, steps=SD_STEPS, output_type="np").tobytes() == want.tobytes()
    plain = StableDiffusionPipeline.from_pretrained(out)
    assert plain.unet.config.encoder_hid_dim_type is None  # the base UNet, without the adapter
    plain.load_ip_adapter(str(out), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    x = m.image_embeds(e)
    assert torch.equal(_unet_eps(plain.unet, [x]), _unet_eps(m.unet, [x]))
    with pytest.raises(OutputExistsError):
        m.save_pretrained(out)


def test_inputs_are_never_written(faceid, tmp_path):
    before = _tree_hash(faceid)
    m = ff.load(faceid / "sd", ip_adapter=faceid / "ip-adapter-faceid.bin")
    get_parameter(m, m.identity_parameter_names()[0]).add_(1.0)
    m.generate_tensor(_emb(1), steps=1)
    m.save_ip_adapter(tmp_path / "x.bin")
    m.save_pretrained(tmp_path / "y")
    assert _tree_hash(faceid) == before


class _Evil:
    def __reduce__(self):
        return (print, ("this ran at load time",))


def test_bad_checkpoints_raise_model_load_error_naming_them(faceid, tmp_path):
    from safetensors.torch import save_file

    sd = faceid / "sd"
    state = torch.load(faceid / "ip-adapter-faceid.bin", weights_only=True)
    proj, ip = state["image_proj"], state["ip_adapter"]

    def case(name, obj):
        p = tmp_path / name
        if isinstance(obj, bytes):
            p.write_bytes(obj)
        elif name.endswith(".safetensors"):
            save_file(obj, str(p))
        else:
            torch.save(obj, p)
        return p

    with pytest.raises(ModelLoadError, match="ip_adapter="):
        ff.load(sd)
    with pytest.raises(ModelLoadError, match="nope.bin"):
        ff.load(sd, ip_adapter=tmp_path / "nope.bin")
    with pytest.raises(InputError, match="ip_adapter"):
        ff.load(sd, ip_adapter=3)
    with pytest.raises(UnsafeCheckpointError, match="evil.bin"):
        ff.load(sd, ip_adapter=case("evil.bin", {"image_proj": {"x": _Evil()}, "ip_adapter": {}}))
    good = (faceid / "ip-adapter-faceid.bin").read_bytes()
    bad = [("garbage.bin", b"not a checkpoint", "garbage.bin"),
           ("truncated.bin", good[:len(good) // 2], "truncated.bin"),
           ("garbage.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", "garbage.safetensors"),
           ("flat.bin", proj, "IP-Adapter layout"),
           ("stray.safetensors", {"other.x": torch.zeros(1)}, "unexpected key 'other.x'"),
           ("plain.bin", {"image_proj": {"proj.weight": torch.zeros(4 * WIDTH, 1024),
                                         "proj.bias": torch.zeros(4 * WIDTH)}, "ip_adapter": ip},
            "CLIP image encoder"),
           ("short.bin", {"image_proj": proj, "ip_adapter": dict(list(ip.items())[:-2])}, "does not fit this UNet"),
           ("narrow.bin", {"image_proj": {**proj, "norm.weight": torch.ones(64), "norm.bias": torch.zeros(64),
                                          "proj.2.weight": torch.zeros(256, 1024), "proj.2.bias": torch.zeros(256)},
                           "ip_adapter": ip}, "cross-attention width"),
           ("nan.bin", {"image_proj": {**proj, "norm.bias": torch.full((WIDTH,), float("nan"))}, "ip_adapter": ip},
            "NaN"),
           ("stray_ip.bin", {"image_proj": proj, "ip_adapter": {**ip, "x": torch.ones(1)}},
            "unexpected ip_adapter keys")]
    for name, obj, match in bad:
        with pytest.raises(ModelLoadError, match=match):
            ff.load(sd, ip_adapter=case(name, obj))


# ---------------------------------------------------------------- InstantID
def test_instantid_resampler_loads_generates_edits_and_round_trips(instantid, tmp_path):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    ckpt = instantid / "ip-adapter.bin"
    m = ff.load(instantid / "sdxl", ip_adapter=ckpt)
    assert type(m) is InstantIDModel and m.family == "instantid" and m.pipeline_class == "StableDiffusionXLPipeline"
    assert isinstance(m.image_proj, IPAdapterPlusImageProjection) and m.num_tokens == 16
    e = _emb(2, 3)
    # diffusers' Plus projection on the embedding as a one-token sequence is InstantID's Resampler
    src = torch.load(ckpt, weights_only=True)
    tokens = m.id_tokens(e)
    assert tokens.shape == (2, 16, 64)
    assert torch.allclose(tokens, resampler_reference(src["image_proj"], e[:, None]), atol=1e-5)
    assert m.image_embeds(e).shape == (2, 1, 1, 512)
    # the UNet is what plain diffusers builds from the same file
    ref = _plain_pipeline(instantid / "sdxl", ckpt, xl=True)
    x = m.image_embeds(e)
    extra = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    assert torch.equal(_unet_eps(m.unet, [x], width=64, extra=extra), _unet_eps(ref.unet, [x], width=64, extra=extra))
    a = m.generate(e, seed=0, steps=SD_STEPS, guidance=5.0, output_type="np")
    assert a.shape == (2, 16, 16, 3) and np.isfinite(a).all()
    img = ref(prompt=DEFAULT_PROMPT, negative_prompt=DEFAULT_NEGATIVE_PROMPT, num_inference_steps=SD_STEPS,
              ip_adapter_image_embeds=[torch.cat([torch.zeros_like(x[:1]), x[:1]])], latents=m.initial_noise(1, 0),
              guidance_scale=5.0, output_type="np").images
    assert np.allclose(a[:1], img, atol=1e-5)  # diffusers' SDXL pipeline, same image
    assert a.tobytes() == m.generate(e, seed=0, steps=SD_STEPS, guidance=5.0, output_type="np").tobytes()
    # unedited, the saved file is the input file's tensors under the input's keys
    same = _keys(m.save_ip_adapter(tmp_path / "same.bin"))
    src_flat = _keys(ckpt)
    assert set(same) == set(src_flat) and all(torch.equal(same[k], src_flat[k]) for k in src_flat)
    # an edit of the Resampler changes the images, is saved in the Resampler layout and reloads identically
    name = next(n for n in m.identity_parameter_names() if n.endswith("layers.0.attn.to_k.weight"))
    get_parameter(m, name).add_(0.3 * torch.randn_like(get_parameter(m, name)))
    b = m.generate(e, seed=0, steps=SD_STEPS, guidance=5.0, output_type="np")
    assert np.abs(a - b).max() > 1e-3
    out = m.save_ip_adapter(tmp_path / "erased.safetensors")
    saved = _keys(out)
    assert set(saved) == set(src_flat) and not torch.equal(saved["image_proj.layers.0.0.to_kv.weight"],
                                                           src_flat["image_proj.layers.0.0.to_kv.weight"])
    again = ff.load(instantid / "sdxl", ip_adapter=out)
    assert again.generate(e, seed=0, steps=SD_STEPS, guidance=5.0, output_type="np").tobytes() == b.tobytes()
    # a saved folder comes back as InstantID through its manifest
    folder = m.save_pretrained(tmp_path / "iid")
    assert type(ff.load(folder)) is InstantIDModel
    shutil.rmtree(folder)


def test_embedding_norm_scales_the_projection_input(instantid):
    m1 = ff.load(instantid / "sdxl", ip_adapter=instantid / "ip-adapter.bin")
    m20 = ff.load(instantid / "sdxl", ip_adapter=instantid / "ip-adapter.bin", embedding_norm=20.0)
    e = _emb(1)
    assert torch.allclose(m20.image_embeds(e), 20 * m1.image_embeds(e))
    assert not torch.allclose(m20.id_tokens(e), m1.id_tokens(e))
    with pytest.raises(InputError, match="embedding_norm"):
        ff.load(instantid / "sdxl", ip_adapter=instantid / "ip-adapter.bin", embedding_norm=0)
