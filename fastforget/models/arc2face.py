"""Arc2Face-family adapter: an ID-conditioned diffusion model.

Identity enters exactly as in Arc2Face (`arc2face/utils.py::project_face_embs`): tokenize
"photo of a id person" padded to 77, replace the input token embedding at the `id` token by
the unit ArcFace embedding zero-padded to the text width, run the causal CLIP text
transformer and its final layer norm; the last hidden state feeds every attn2.

Three layouts load here: the Arc2Face release (`arc2face/` UNet + `encoder/` CLIPTextModel,
with `base=` an SD-1.5 folder for tokenizer / vae / scheduler), a folder written by
fastforget (self-contained; `fastforget.json` at its root), and "demo" (the testbed).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastforget.errors import EmbeddingError, ModelLoadError

PROMPT = "photo of a id person"
ID_TOKEN = "id"
MANIFEST = "fastforget.json"


def check_embeddings(emb, dim: int = 512, name: str = "embeddings") -> torch.Tensor:
    """(N, dim) finite, non-zero float32, L2-normalised. Raises EmbeddingError naming `name`."""
    if isinstance(emb, np.ndarray):
        emb = torch.from_numpy(emb)
    if not isinstance(emb, torch.Tensor):
        try:
            emb = torch.as_tensor(np.asarray(emb, dtype=np.float32))
        except (TypeError, ValueError):
            raise EmbeddingError(f"{name}: expected an (N, {dim}) array of embeddings, got {type(emb).__name__}") from None
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise EmbeddingError(f"{name}: expected shape (N, {dim}), got {tuple(emb.shape)} "
                             f"(wrong embedding size: ArcFace embeddings are {dim}-d)")
    emb = emb.detach().float()
    bad = ~torch.isfinite(emb).all(dim=1)
    if bad.any():
        raise EmbeddingError(f"{name}: row(s) {bad.nonzero().flatten().tolist()[:10]} contain NaN or inf")
    norms = emb.norm(dim=1)
    if (norms < 1e-6).any():
        raise EmbeddingError(f"{name}: row(s) {(norms < 1e-6).nonzero().flatten().tolist()[:10]} are zero vectors")
    return emb / norms[:, None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((x.detach().float().permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)


class Codec:
    """Maps images (N,3,H,W) in [-1,1] to the UNet's sample space and back."""

    def __init__(self, vae=None, unshuffle: int = 1):
        self.vae, self.unshuffle = vae, unshuffle

    def encode(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        if self.vae is not None:
            return self.vae.encode(x).latent_dist.sample(generator) * self.vae.config.scaling_factor
        return F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            return self.vae.decode(z / self.vae.config.scaling_factor).sample
        return F.pixel_shuffle(z, self.unshuffle) if self.unshuffle > 1 else z


class Arc2FaceModel:
    """UNet2DConditionModel + CLIPTextModel conditioned on ArcFace embeddings."""

    family = "arc2face"

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, *, unshuffle: int = 1,
                 resolution: int | None = None, source: str | None = None):
        self.unet, self.text_encoder, self.tokenizer, self.scheduler = unet, text_encoder, tokenizer, scheduler
        self.vae = vae
        self.codec = Codec(vae, unshuffle)
        self.unshuffle = unshuffle
        self.source = source
        scale = (2 ** (len(vae.config.block_out_channels) - 1)) if vae is not None else unshuffle
        self.resolution = resolution or unet.config.sample_size * scale
        self.text_width = text_encoder.config.hidden_size
        ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        id_token = tokenizer.encode(ID_TOKEN, add_special_tokens=False)
        if len(id_token) != 1 or not (ids[0] == id_token[0]).any():
            raise ModelLoadError(f"tokenizer does not map '{ID_TOKEN}' to a single token of '{PROMPT}'")
        self._prompt_ids = ids
        self._id_mask = ids[0] == id_token[0]
        self._null_ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length,
                                   return_tensors="pt").input_ids
        for m in (unet, text_encoder, vae):
            if m is not None:
                m.eval().requires_grad_(False)

    # ------------------------------------------------------------ conditioning
    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def _encode_token_embeddings(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP text transformer on given input token embeddings (causal mask, final layer norm)."""
        tm = self.text_encoder.text_model
        h = tm.embeddings(inputs_embeds=token_embeds)
        n, length = token_embeds.shape[:2]
        causal = torch.full((length, length), torch.finfo(h.dtype).min, device=h.device, dtype=h.dtype).triu(1)
        out = tm.encoder(inputs_embeds=h, causal_attention_mask=causal[None, None].expand(n, 1, length, length))
        return tm.final_layer_norm(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

    def condition(self, embeddings, name: str = "embeddings") -> torch.Tensor:
        """ArcFace embeddings (N, 512) -> text-encoder states (N, 77, D), differentiable in the text encoder."""
        emb = check_embeddings(embeddings, name=name).to(self.device)
        n = emb.shape[0]
        ids = self._prompt_ids.to(self.device).expand(n, -1)
        tok = self.text_encoder.text_model.embeddings.token_embedding(ids)
        padded = F.pad(emb, (0, self.text_width - emb.shape[1])).to(tok.dtype)
        tok = torch.where(self._id_mask.to(self.device)[None, :, None], padded[:, None, :], tok)
        return self._encode_token_embeddings(tok)

    def null_condition(self, n: int = 1) -> torch.Tensor:
        """States of the empty prompt: Arc2Face's negative branch, the testbed's dropped condition."""
        states = self.text_encoder(self._null_ids.to(self.device))[0]
        return states.expand(n, -1, -1)

    # ------------------------------------------------------------ sampling
    def attn2_modules(self) -> dict:
        """Cross-attention modules fed by the identity condition, by qualified name."""
        return {n: m for n, m in self.unet.named_modules() if n.endswith("attn2")}

    def sample_shape(self, n: int) -> tuple:
        c = self.unet.config
        return (n, c.in_channels, c.sample_size, c.sample_size)

    def initial_noise(self, n: int, seed=0) -> torch.Tensor:
        """Per-image noise: image i uses seed + i, so a batch and its parts give the same images."""
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(n)]
        shape = self.sample_shape(1)[1:]
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    @torch.no_grad()
    def generate_tensor(self, embeddings=None, *, seed=0, steps: int = 25, guidance: float = 3.0,
                        cond: torch.Tensor | None = None, batch_size: int = 64, scheduler=None,
                        progress: bool = False) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1]. Give embeddings, or precomputed `cond` states."""
        from tqdm import tqdm

        if cond is None:
            cond = self.condition(embeddings)
        n = cond.shape[0]
        noise = self.initial_noise(n, seed)
        out = []
        for i in tqdm(range(0, n, batch_size), desc="generate", disable=not progress, leave=False):
            sched = scheduler or type(self.scheduler).from_config(self.scheduler.config)
            sched.set_timesteps(steps)
            c = cond[i:i + batch_size].to(self.device, self.dtype)
            b = c.shape[0]
            z = noise[i:i + batch_size].to(self.device, self.dtype) * sched.init_noise_sigma
            use_cfg = guidance is not None and guidance != 1.0
            states = torch.cat([self.null_condition(b).to(c.dtype), c]) if use_cfg else c
            for t in sched.timesteps:
                inp = sched.scale_model_input(torch.cat([z, z]) if use_cfg else z, t)
                eps = self.unet(inp, t, encoder_hidden_states=states).sample
                if use_cfg:
                    eu, ec = eps.chunk(2)
                    eps = eu + guidance * (ec - eu)
                z = sched.step(eps, t, z).prev_sample
            out.append(self.codec.decode(z).float().clamp(-1, 1))
        return torch.cat(out)

    def generate(self, embeddings, seed=0, steps: int = 25, guidance: float = 3.0, **kw):
        """List of PIL images generated from identity embeddings (Arc2Face defaults: 25 DPM steps, CFG 3)."""
        from PIL import Image

        x = self.generate_tensor(embeddings, seed=seed, steps=steps, guidance=guidance, **kw)
        return [Image.fromarray(a) for a in to_uint8(x)]

    # ------------------------------------------------------------ persistence
    def save_pretrained(self, directory, overwrite: bool = False) -> Path:
        """Self-contained folder: unet/ text_encoder/ tokenizer/ scheduler/ [vae/] fastforget.json.
        Safetensors only; written to a temporary folder and renamed into place."""
        from fastforget.io import atomic_directory

        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            self.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            self.scheduler.save_pretrained(tmp / "scheduler")
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            (tmp / MANIFEST).write_text(json.dumps({
                "family": self.family, "unshuffle": self.unshuffle, "resolution": self.resolution,
                "prompt": PROMPT, "source": self.source}, indent=2))
        return Path(directory)

    def clone(self) -> "Arc2FaceModel":
        """A deep copy whose weights can be edited without touching this model."""
        import copy

        return Arc2FaceModel(copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder), self.tokenizer,
                             self.scheduler, self.vae, unshuffle=self.unshuffle, resolution=self.resolution,
                             source=self.source)


# ---------------------------------------------------------------- loading
def _load_text_encoder(folder: Path):
    """CLIPTextModel from safetensors, or from Arc2Face's transformers-4 `pytorch_model.bin`
    (keys under `text_model.`), which is read with weights_only=True (no code runs)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if (folder / "model.safetensors").is_file():
        return CLIPTextModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    binf = folder / "pytorch_model.bin"
    if not binf.is_file():
        raise ModelLoadError(f"{folder}: no model.safetensors or pytorch_model.bin")
    try:
        state = torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{binf}: cannot be read as plain tensors ({str(exc)[:200]})") from None
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, local_files_only=True))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ModelLoadError(f"{binf}: missing weights {missing[:5]}")
    return model


def _load_unet(folder: Path):
    from diffusers import UNet2DConditionModel

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json (expected a diffusers UNet2DConditionModel folder)")
    try:
        return UNet2DConditionModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32,
                                                    low_cpu_mem_usage=False)
    except Exception as exc:
        raise ModelLoadError(f"{folder}: cannot load UNet2DConditionModel ({str(exc)[:300]})") from None


SCHEDULERS = ("DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "PNDMScheduler",
              "DDPMScheduler", "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler")


def _load_scheduler(folder: Path, default: str = "DPMSolverMultistepScheduler"):
    """The scheduler class named in the folder's config (from a fixed list of diffusers classes).
    An SD-1.5 base folder names PNDM: Arc2Face samples with DPMSolverMultistep, so `default` wins there."""
    import diffusers

    cfg_file = folder / "scheduler_config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{folder}: no scheduler_config.json")
    name = json.loads(cfg_file.read_text()).get("_class_name", default)
    name = name if name in SCHEDULERS and name != "PNDMScheduler" else default
    return getattr(diffusers, name).from_pretrained(folder, local_files_only=True)


def load_arc2face(path, base=None) -> Arc2FaceModel:
    """Load a fastforget folder, or the Arc2Face release layout with `base` = SD-1.5 folder."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"model folder not found: {root}")
    if (root / MANIFEST).is_file():
        meta = json.loads((root / MANIFEST).read_text())
        unet = _load_unet(root / "unet")
        text_encoder = _load_text_encoder(root / "text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        scheduler = _load_scheduler(root / "scheduler")
        vae = (AutoencoderKL.from_pretrained(root / "vae", local_files_only=True, torch_dtype=torch.float32,
                                             low_cpu_mem_usage=False)
               if (root / "vae").is_dir() else None)
        return Arc2FaceModel(unet, text_encoder, tokenizer, scheduler, vae, unshuffle=int(meta.get("unshuffle", 1)),
                             resolution=meta.get("resolution"), source=str(root))
    if (root / "arc2face").is_dir() and (root / "encoder").is_dir():
        if base is None:
            raise ModelLoadError(f"{root}: Arc2Face release layout needs base= an SD-1.5 folder "
                                 "(tokenizer/, vae/, scheduler/)")
        base = Path(base)
        for sub in ("tokenizer", "vae", "scheduler"):
            if not (base / sub).is_dir():
                raise ModelLoadError(f"base {base}: missing {sub}/")
        unet = _load_unet(root / "arc2face")
        text_encoder = _load_text_encoder(root / "encoder")
        tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
        scheduler = _load_scheduler(base / "scheduler")
        if type(scheduler).__name__ != "DPMSolverMultistepScheduler":  # Arc2Face's sampler
            from diffusers import DPMSolverMultistepScheduler

            scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config)
        vae = AutoencoderKL.from_pretrained(base / "vae", local_files_only=True, torch_dtype=torch.float32,
                                            low_cpu_mem_usage=False)
        return Arc2FaceModel(unet, text_encoder, tokenizer, scheduler, vae, source=str(root))
    raise ModelLoadError(f"{root}: unknown layout (expected {MANIFEST}, or arc2face/ + encoder/)")
