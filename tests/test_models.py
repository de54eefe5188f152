"""Arc2Face adapter on tiny random configs of the real classes: layouts, conditioning, saving."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastforget as ff
from fastforget.errors import EmbeddingError, ModelLoadError, OutputExistsError
from fastforget.testbed.nets import _tokenizer_vocab, write_tokenizer

WIDTH = 576  # wider than 512, so the zero-padding path of Arc2Face's projection is exercised


def _tiny_parts(text_layers: int = 1):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vocab = _tokenizer_vocab()[0]
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=8, norm_num_groups=8)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=text_layers,
        num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    return unet, text, vae, DPMSolverMultistepScheduler(num_train_timesteps=1000)


def tiny_shuffle_model():
    """A pixel-space (space-to-depth, unshuffle 2) Arc2Face-family model without a VAE, like the testbed."""
    import tempfile

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    from fastforget.models import Arc2FaceModel

    _, text, _, sched = _tiny_parts()
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=12, out_channels=12, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=8, norm_num_groups=8)
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(Path(d) / "tok", max_length=77)
        tok = CLIPTokenizer.from_pretrained(Path(d) / "tok")
    return Arc2FaceModel(unet, text, tok, sched, None, unshuffle=2)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Arc2Face release layout (arc2face/ + encoder/ with a transformers-4 pytorch_model.bin) + SD-1.5-like base."""
    root = tmp_path_factory.mktemp("arc2face_release")
    unet, text, vae, sched = _tiny_parts()
    unet.save_pretrained(root / "models" / "arc2face")
    (root / "models" / "encoder").mkdir(parents=True)
    text.config.save_pretrained(root / "models" / "encoder")
    torch.save(text.state_dict(), root / "models" / "encoder" / "pytorch_model.bin")
    write_tokenizer(root / "sd15" / "tokenizer", max_length=77)
    vae.save_pretrained(root / "sd15" / "vae")
    sched.save_pretrained(root / "sd15" / "scheduler")
    return root / "models", root / "sd15"


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _emb(n, seed=0):
    return F.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_release_layout_loads_and_generates(release):
    models, base = release
    model = ff.load(models, base=base)
    assert model.resolution == 16 and model.text_width == WIDTH
    assert len(model.attn2_modules()) == 4  # down 1, mid 1, up 2
    x = model.generate_tensor(_emb(2), seed=0, steps=2)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_input_folder_is_never_written(release, tmp_path):
    models, base = release
    before = _tree_hash(models), _tree_hash(base)
    model = ff.load(models, base=base)
    model.generate_tensor(_emb(1), steps=1)
    model.save_pretrained(tmp_path / "out")
    assert (_tree_hash(models), _tree_hash(base)) == before


def test_conditioning_is_arc2face_projection(release):
    model = ff.load(*release)
    tm = model.text_encoder.text_model
    ids = model._prompt_ids
    # our causal encoder on the real token embeddings is exactly CLIPTextModel's forward
    ours = model._encode_token_embeddings(tm.embeddings.token_embedding(ids))
    assert torch.allclose(ours, model.text_encoder(ids).last_hidden_state, atol=1e-5)
    # the id token carries the zero-padded embedding; positions before it cannot see the identity
    pos = int(model._id_mask.nonzero()[0])
    assert pos == 4  # <bos> photo of a id
    c1, c2 = model.condition(_emb(1, 1)), model.condition(_emb(1, 2))
    assert c1.shape == (1, 77, WIDTH)
    assert torch.allclose(c1[:, :pos], c2[:, :pos]) and not torch.allclose(c1[:, pos:], c2[:, pos:])
    # the embedding is normalised before projection, as ArcFace embeddings are
    assert torch.allclose(model.condition(3.0 * _emb(1, 1)), c1, atol=1e-5)


def test_saved_model_loads_with_plain_classes_and_round_trips(release, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    model = ff.load(*release)
    out = model.save_pretrained(tmp_path / "erased")
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    UNet2DConditionModel.from_pretrained(out / "unet")
    CLIPTextModel.from_pretrained(out / "text_encoder")
    AutoencoderKL.from_pretrained(out / "vae")
    again = ff.load(out)
    e = _emb(2, 5)
    assert torch.allclose(model.generate_tensor(e, steps=2), again.generate_tensor(e, steps=2), atol=1e-5)
    with pytest.raises(OutputExistsError, match="erased"):
        model.save_pretrained(out)
    model.save_pretrained(out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_release_without_base_or_with_bad_weights(release, tmp_path):
    models, base = release
    with pytest.raises(ModelLoadError, match="base="):
        ff.load(models)
    with pytest.raises(ModelLoadError, match="not found"):
        ff.load(tmp_path / "nope")
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(models, bad)
    (bad / "encoder" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin"):
        ff.load(bad, base=base)


class _Evil:
    def __reduce__(self):
        return (print, ("this ran at load time",))


def test_bin_weights_never_execute_code(release, tmp_path):
    import shutil

    models, base = release
    evil = tmp_path / "evil"
    shutil.copytree(models, evil)
    torch.save({"x": _Evil()}, evil / "encoder" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="plain tensors"):
        ff.load(evil, base=base)


@pytest.mark.parametrize("bad,match", [
    (torch.randn(2, 128), "wrong embedding size"),
    (torch.full((1, 512), float("nan")), "NaN"),
    (torch.zeros(1, 512), "zero"),
    ("hello", "embeddings"),
])
def test_bad_embeddings_are_named(release, bad, match):
    model = ff.load(*release)
    with pytest.raises(EmbeddingError, match=match):
        model.condition(bad)
