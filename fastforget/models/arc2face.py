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

from fastforget.errors import InputError, ModelLoadError
from fastforget.identity.embeddings import check_embeddings, to_uint8  # noqa: F401  (re-exported)
from fastforget.models.common import UNetPlacement
from fastforget.models.registry import MANIFEST, read_json_config, read_manifest, register_adapter, register_builtin

PROMPT = "photo of a id person"
ID_TOKEN = "id"


class Codec:
    """Maps images (N,3,H,W) in [-1,1] to the UNet's sample space and back."""

    def __init__(self, vae=None, unshuffle: int = 1):
        self.vae, self.unshuffle = vae, unshuffle

    def encode(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        if self.vae is not None:
            return self.vae.encode(x).latent_dist.sample(generator) * self.vae.config.scaling_factor
        return F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:  # one latent at a time: a 512-px SD decode holds ~1 GB of activations each
            return torch.cat([self.vae.decode(zi[None] / self.vae.config.scaling_factor).sample for zi in z])
        return F.pixel_shuffle(z, self.unshuffle) if self.unshuffle > 1 else z


def share_copy(module, prefix: str, only=None):
    """deepcopy of `module`; with `only` (qualified names `prefix.param`), tensors not named there are
    the same objects as in `module` (deepcopy's memo maps each to itself)."""
    import copy

    if module is None:
        return None
    if only is None:
        return copy.deepcopy(module)
    keep = {n.partition(".")[2] for n in only if n.partition(".")[0] == prefix}
    memo = {id(t): t for n, t in list(module.named_parameters()) + list(module.named_buffers()) if n not in keep}
    return copy.deepcopy(module, memo)


class Arc2FaceModel(UNetPlacement):
    """UNet2DConditionModel + CLIPTextModel conditioned on ArcFace embeddings."""

    family = "arc2face"
    is_testbed = False  # True only when loaded by its built-in name ("demo")

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
        # a plain CLIPTokenizer save may lack model_max_length (then it is ~1e30): the text encoder's
        # positions are the length to use (77 for Arc2Face)
        positions = text_encoder.config.max_position_embeddings
        if not isinstance(tokenizer.model_max_length, int) or not 0 < tokenizer.model_max_length <= positions:
            tokenizer.model_max_length = positions
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
    def _encode_token_embeddings(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP text transformer on given input token embeddings (causal mask, final layer norm)."""
        tm = self.text_encoder.text_model
        h = tm.embeddings(inputs_embeds=token_embeds)
        n, length = token_embeds.shape[:2]
        causal = torch.full((length, length), torch.finfo(h.dtype).min, device=h.device, dtype=h.dtype).triu(1)
        out = tm.encoder(inputs_embeds=h, causal_attention_mask=causal[None, None].expand(n, 1, length, length))
        return tm.final_layer_norm(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

    def condition(self, embeddings, name: str = "embeddings", length: int | None = None) -> torch.Tensor:
        """ArcFace embeddings (N, 512) -> text-encoder states (N, 77, D), differentiable in the text encoder and,
        for a tensor that requires grad, in the embedding itself (the white-box attacks optimise it).
        `length`: only the first `length` prompt tokens (the same states there: the attention is causal)."""
        emb = check_embeddings(embeddings, name=name).to(self.device)
        if isinstance(embeddings, torch.Tensor) and embeddings.requires_grad:  # checked above; keep its graph
            emb = F.normalize(embeddings.reshape(emb.shape).float(), dim=1).to(self.device)
        n = emb.shape[0]
        ids = self._prompt_ids[:, :length].to(self.device).expand(n, -1)
        tok = self.text_encoder.text_model.embeddings.token_embedding(ids)
        padded = F.pad(emb, (0, self.text_width - emb.shape[1])).to(tok.dtype)
        tok = torch.where(self._id_mask[:length].to(self.device)[None, :, None], padded[:, None, :], tok)
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
        from fastforget.models.common import check_seed

        if isinstance(seed, (list, tuple)) and len(seed) != n:
            raise InputError(f"seed: {len(seed)} seed(s) given for {n} image(s); give one integer or one per image")
        seeds = [check_seed(s, 1, f"seed[{i}]") for i, s in enumerate(seed)] if isinstance(seed, (list, tuple)) \
            else [check_seed(seed, n) + i for i in range(n)]
        shape = self.sample_shape(1)[1:]
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    @torch.no_grad()
    def generate_tensor(self, embeddings=None, *, seed=0, steps: int = 25, guidance: float = 3.0,
                        cond: torch.Tensor | None = None, batch_size: int = 64, scheduler=None,
                        progress: bool = False) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1]. Give embeddings, or precomputed `cond` states."""
        from tqdm import tqdm

        from fastforget.models.common import check_int, check_sampling

        steps, guidance = check_sampling(steps, guidance, scheduler=self.scheduler)
        check_int(batch_size, "batch_size")
        if not isinstance(progress, bool):
            raise InputError(f"progress: expected True or False, got {progress!r}")
        if scheduler is not None and not all(hasattr(scheduler, a) for a in ("set_timesteps", "step", "timesteps")):
            raise InputError(f"scheduler: expected a diffusers scheduler, got {type(scheduler).__name__}")
        if cond is None:
            cond = self.condition(embeddings)
        elif not isinstance(cond, torch.Tensor) or not cond.is_floating_point() or cond.ndim != 3 or not len(cond) \
                or cond.shape[1:] != (self._prompt_ids.shape[1], self.text_width) or not torch.isfinite(cond).all():
            raise InputError(f"cond: expected finite text-encoder states (N, {self._prompt_ids.shape[1]}, "
                             f"{self.text_width}) as model.condition() returns, got "
                             f"{tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__}")
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

    def generate(self, embeddings, seed=0, steps: int = 25, guidance: float = 3.0, output_type: str = "pil", **kw):
        """Images generated from identity embeddings (Arc2Face defaults: 25 DPM steps, CFG 3), in diffusers'
        `output_type` convention: "pil" (list of PIL images), "np" (float32 NHWC in [0, 1]), "pt" (NCHW in [0, 1])."""
        from fastforget.models.common import check_sampling, format_images

        unknown = sorted(set(kw) - {"cond", "batch_size", "scheduler", "progress"})
        if unknown:
            raise InputError(f"generate: unknown argument(s) {unknown} (also takes: cond, batch_size, scheduler, "
                             "progress)")
        if output_type is None:  # check_sampling skips None; format_images would refuse it after the work
            raise InputError("output_type: expected one of ('pil', 'np', 'pt'), got None")
        check_sampling(steps, guidance, output_type, self.scheduler)
        return format_images(self.generate_tensor(embeddings, seed=seed, steps=steps, guidance=guidance, **kw),
                             output_type)

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

    def clone(self, only=None) -> "Arc2FaceModel":
        """A copy whose weights can be edited without touching this model. With `only` (qualified
        parameter names, e.g. a patch's `names`), every other parameter and buffer is shared with this
        model instead of copied: an erased model costs the size of its patch, not a second model."""
        m = Arc2FaceModel(share_copy(self.unet, "unet", only), share_copy(self.text_encoder, "text_encoder", only),
                          self.tokenizer, self.scheduler, share_copy(self.vae, "vae", only), unshuffle=self.unshuffle,
                          resolution=self.resolution, source=self.source)
        m.is_testbed = getattr(self, "is_testbed", False)
        return m


# ---------------------------------------------------------------- loading
def _check_finite(module, where: Path, allow_nonfinite: bool) -> None:
    """Weights with NaN / inf generate NaN images; refuse them unless the caller opts out."""
    if module is None or allow_nonfinite:
        return
    for name, p in module.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ModelLoadError(f"{where}: weight {name!r} contains NaN or inf (pass allow_nonfinite=True to load "
                                 "it anyway)")


def low_cpu_mem() -> dict:
    """diffusers loads straight into the weights (no random init, no second copy) only with accelerate."""
    import importlib.util

    return {"low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}


def _config_class(folder: Path, config_cls):
    cfg = read_json_config(folder / "config.json")
    try:
        return config_cls.from_dict(cfg)
    except Exception as exc:
        raise ModelLoadError(f"{folder / 'config.json'}: not a valid {config_cls.__name__} ({str(exc)[:200]})") from None


def _load_text_encoder(folder: Path):
    """CLIPTextModel from safetensors, or from Arc2Face's transformers-4 `pytorch_model.bin`
    (keys under `text_model.`), which is read with weights_only=True (no code runs)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: missing (expected a CLIPTextModel folder)")
    config = _config_class(folder, CLIPTextConfig)
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        where = folder / "model.safetensors"
        try:
            state = load_file(str(where))
        except Exception as exc:
            raise ModelLoadError(f"{where}: unreadable ({str(exc)[:200]})") from None
    elif (folder / "pytorch_model.bin").is_file():
        where = folder / "pytorch_model.bin"
        try:  # plain tensors only (no code runs), memory-mapped: no second copy while loading
            state = torch.load(where, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise ModelLoadError(f"{where}: cannot be read as plain tensors ({str(exc)[:200]})") from None
        if not isinstance(state, dict):
            raise ModelLoadError(f"{where}: expected a state dict, got {type(state).__name__}")
    else:
        raise ModelLoadError(f"{folder}: no model.safetensors or pytorch_model.bin")
    try:
        with torch.device("meta"):  # no random init: the weights are assigned, not copied
            model = CLIPTextModel(config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except Exception as exc:
        raise ModelLoadError(f"{where}: weights do not fit {folder / 'config.json'} ({str(exc)[:200]})") from None
    emb = model.text_model.embeddings
    if emb.position_ids.is_meta:  # a non-persistent buffer: not in the file
        emb.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)),
                            persistent=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing or still_meta:
        raise ModelLoadError(f"{where}: missing weights {(missing or still_meta)[:5]}")
    return model.float()


def _load_unet(folder: Path):
    from diffusers import UNet2DConditionModel

    read_json_config(folder / "config.json")  # missing / garbage config names the file
    try:
        return UNet2DConditionModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32,
                                                    **low_cpu_mem())
    except Exception as exc:
        raise ModelLoadError(f"{folder}: cannot load UNet2DConditionModel ({str(exc)[:300]})") from None


def _load_vae(folder: Path):
    from diffusers import AutoencoderKL

    read_json_config(folder / "config.json")
    try:
        return AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32,
                                                    **low_cpu_mem())
    except Exception as exc:
        raise ModelLoadError(f"{folder}: cannot load AutoencoderKL ({str(exc)[:300]})") from None


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise ModelLoadError(f"{folder}: missing CLIP tokenizer files (vocab.json, merges.txt); nothing is "
                             "downloaded, so the tokenizer must be on disk")
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{folder}: cannot load CLIPTokenizer ({str(exc)[:200]})") from None


SCHEDULERS = ("DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "PNDMScheduler",
              "DDPMScheduler", "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler")


def load_scheduler(folder: Path, default: str = "DPMSolverMultistepScheduler"):
    """The scheduler class named in the folder's config (from a fixed list of diffusers classes).
    An SD-1.5 base folder names PNDM: Arc2Face samples with DPMSolverMultistep, so `default` wins there."""
    import diffusers

    cfg_file = folder / "scheduler_config.json"
    cfg = read_json_config(cfg_file)
    name = cfg.get("_class_name", default)
    name = name if name in SCHEDULERS and name != "PNDMScheduler" else default
    try:
        sched = getattr(diffusers, name).from_config(cfg)
    except Exception as exc:
        raise ModelLoadError(f"{cfg_file}: not a valid {name} config ({str(exc)[:200]})") from None
    n = sched.config.num_train_timesteps
    if not isinstance(n, int) or n < 2:
        raise ModelLoadError(f"{cfg_file}: num_train_timesteps must be an integer >= 2, got {n!r}")
    return sched


def _check_geometry(unet, unshuffle, vae, where: Path) -> int:
    """The sample space must match: pixel models carry 3·unshuffle² channels, latent models the VAE's."""
    if isinstance(unshuffle, bool) or not isinstance(unshuffle, int) or unshuffle < 1:
        raise ModelLoadError(f"{where}: 'unshuffle' must be an integer >= 1, got {unshuffle!r}")
    c = unet.config
    want = vae.config.latent_channels if vae is not None else 3 * unshuffle ** 2
    if c.in_channels != want or c.out_channels != want:
        what = "the VAE's latent channels" if vae is not None else f"3 x unshuffle^2 (unshuffle = {unshuffle})"
        raise ModelLoadError(f"{where}: the UNet has {c.in_channels} in / {c.out_channels} out channels, but "
                             f"{what} is {want}")
    return unshuffle


def load_arc2face(path, base=None, allow_nonfinite: bool = False) -> Arc2FaceModel:
    """Load a fastforget folder, or the Arc2Face release layout with `base` = SD-1.5 folder."""
    root = Path(path)
    if not isinstance(allow_nonfinite, bool):
        raise InputError(f"allow_nonfinite: expected True or False, got {allow_nonfinite!r}")
    if not root.is_dir():
        raise ModelLoadError(f"model folder not found: {root}")
    meta = read_manifest(root)
    if meta is not None:
        if meta.get("family", "arc2face") != "arc2face":
            raise ModelLoadError(f"{root / MANIFEST}: family {meta.get('family')!r} is not arc2face")
        unet = _load_unet(root / "unet")
        text_encoder = _load_text_encoder(root / "text_encoder")
        tokenizer = _load_tokenizer(root / "tokenizer")
        scheduler = load_scheduler(root / "scheduler")
        vae = _load_vae(root / "vae") if (root / "vae").is_dir() else None
        unshuffle = _check_geometry(unet, meta.get("unshuffle", 1), vae, root / MANIFEST)
        resolution = meta.get("resolution")
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
            raise ModelLoadError(f"{root / MANIFEST}: 'resolution' must be a positive integer, got {resolution!r}")
    elif (root / "arc2face").is_dir() and (root / "encoder").is_dir():
        if base is None:
            raise ModelLoadError(f"{root}: Arc2Face release layout needs base= an SD-1.5 folder "
                                 "(tokenizer/, vae/, scheduler/)")
        from os import PathLike

        if not isinstance(base, (str, PathLike)):
            raise InputError(f"base: expected the path of an SD-1.5 folder, got {type(base).__name__}")
        base = Path(base)
        for sub in ("tokenizer", "vae", "scheduler"):
            try:
                found = (base / sub).is_dir()
            except OSError as exc:  # a name too long for the file system
                raise ModelLoadError(f"base {base}: {exc.strerror or exc}") from None
            if not found:
                raise ModelLoadError(f"base {base}: missing {sub}/")
        unet = _load_unet(root / "arc2face")
        text_encoder = _load_text_encoder(root / "encoder")
        tokenizer = _load_tokenizer(base / "tokenizer")
        scheduler = load_scheduler(base / "scheduler")
        if type(scheduler).__name__ != "DPMSolverMultistepScheduler":  # Arc2Face's sampler
            from diffusers import DPMSolverMultistepScheduler

            scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config)
        vae = _load_vae(base / "vae")
        unshuffle, resolution = _check_geometry(unet, 1, vae, root / "arc2face"), None
    else:
        raise ModelLoadError(f"{root}: unknown layout (expected {MANIFEST}, or arc2face/ + encoder/)")
    for part, where in ((unet, "unet"), (text_encoder, "text_encoder"), (vae, "vae")):
        _check_finite(part, root / where, allow_nonfinite)
    if text_encoder.config.hidden_size < 512:
        raise ModelLoadError(f"{root}: the text encoder is {text_encoder.config.hidden_size} wide; Arc2Face zero-pads "
                             "the 512-d ArcFace embedding to the text width, so it must be at least 512")
    try:
        return Arc2FaceModel(unet, text_encoder, tokenizer, scheduler, vae, unshuffle=unshuffle,
                             resolution=resolution, source=str(root))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{root}: the parts do not fit together ({str(exc)[:200]})") from None


def _detect(path: Path) -> bool:
    if not path.is_dir():
        return False
    meta = read_manifest(path)
    if meta is not None:
        return meta.get("family", "arc2face") == "arc2face"
    return (path / "arc2face").is_dir() and (path / "encoder").is_dir()


def _load_demo(allow_nonfinite: bool = False):
    from fastforget.testbed import weights_dir

    folder = weights_dir() / "generator"
    if not folder.is_dir():
        raise ModelLoadError(f"testbed generator weights missing at {folder}: reinstall fastforget or run "
                             "python -m fastforget.testbed.train_generator")
    return load_arc2face(folder, allow_nonfinite=allow_nonfinite)


register_adapter("arc2face", detect=_detect, load=load_arc2face, model_types=(Arc2FaceModel,))
register_builtin("demo", _load_demo)
