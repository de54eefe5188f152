"""Portrait generators: IP-Adapter FaceID and InstantID's face adapter on a diffusers SD / SDXL pipeline.

Identity enters through the adapter alone: ArcFace embedding (512) -> image projection -> ID tokens ->
`to_k_ip` / `to_v_ip` of every cross-attention layer, added to the text cross-attention (decoupled
cross-attention). The UNet, text encoders and VAE are the base pipeline's, shared and never edited; the
image projection is what identity methods edit (`identity_parameter_names`).

    pm = ff.load("sd15_folder", ip_adapter="ip-adapter-faceid_sd15.bin")     # family "ip_adapter_faceid"
    pm = ff.load("sdxl_folder", ip_adapter="instantid/ip-adapter.bin")        # family "instantid"
    pm.save_ip_adapter("erased-faceid.bin")   # the original checkpoint layout, loads in plain diffusers

Checkpoints are read in the original IP-Adapter layout `{"image_proj": {...}, "ip_adapter": {...}}`
(`.bin` with torch.load(weights_only=True): no code runs; or `.safetensors` with the flattened
`image_proj.` / `ip_adapter.` keys) and loaded by diffusers' own converter
(`UNet2DConditionModel._load_ip_adapter_weights`): the UNet gets `encoder_hid_proj` =
MultiIPAdapterImageProjection and IPAdapterAttnProcessor2_0 processors, exactly as `pipe.load_ip_adapter`.

- FaceID (tencent-ailab/IP-Adapter MLPProjModel, keys proj.0 / proj.2 / norm) becomes diffusers'
  IPAdapterFaceIDImageProjection; its input is `image_embeds=[emb (B, 1, 512)]`. The FaceID LoRA in the
  same checkpoint (`<k>.to_{q,k,v,out}_lora.{down,up}.weight`, k over all attention processors) is
  applied as IP-Adapter's LoRA processors do (output + up(down(input)), scale 1) through forward hooks
  on to_q / to_k / to_v / to_out.0: diffusers would need PEFT for it, and hooks leave the UNet's own
  weights and parameter names untouched (so the base UNet saves unchanged). Plain diffusers without
  PEFT skips that LoRA with a warning; only checkpoints without LoRA then generate identically there.
- InstantID (`ip-adapter.bin`: IP-Adapter Plus Resampler, dim 1280, depth 4, dim_head 64, heads 20,
  16 queries, 512-d input) becomes diffusers' IPAdapterPlusImageProjection, which on the ArcFace
  embedding as a one-token sequence computes InstantID's Resampler (the tests check it against a
  torch copy of the original); its input is `image_embeds=[emb (B, 1, 1, 512)]`. diffusers' converter
  handles depth 4 and dim_head 64 only, as every released Resampler checkpoint has. InstantID's
  IdentityNet (a ControlNet fed the same ID tokens and a face-keypoint image) is out of scope: this
  model runs the adapter path only, so identity is weaker than the full InstantID pipeline's.
  InstantID was trained on insightface's raw (not unit-norm) embeddings: `embedding_norm=` sets the
  norm that unit embeddings are scaled to before the projection (default 1).

Generation follows diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline (built on the shared
modules by `pipeline()`; its `encode_prompt`, its loop) with one embedding per image; with
classifier-free guidance (guidance > 1, diffusers' rule) the negative branch is the projection of a
zero embedding, as in diffusers and IP-Adapter. Not supported: plain / Plus IP-Adapters and FaceID-Plus
(they need a CLIP image encoder), PhotoMaker.
"""
from __future__ import annotations

import io
import json
import re
from os import PathLike
from pathlib import Path

import torch
import torch.nn.functional as F

from fastforget.errors import InputError, ModelLoadError, UnsafeCheckpointError
from fastforget.identity.embeddings import EMBED_DIM, check_embeddings
from fastforget.models.arc2face import Arc2FaceModel
from fastforget.models.common import UNetPlacement
from fastforget.models.registry import (MANIFEST, class_name_of, read_json_config, read_manifest, register_adapter,
                                        register_builtin)

FACEID, INSTANTID = "ip_adapter_faceid", "instantid"
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
IP_ADAPTER_FILE = "ip_adapter.safetensors"  # the adapter inside a folder written by save_pretrained
IMAGE_PROJ = "unet.encoder_hid_proj.image_projection_layers.0"
# tencent-ailab/IP-Adapter's FaceID generate() defaults
DEFAULT_PROMPT = "best quality, high quality"
DEFAULT_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
LORA_PARTS = ("to_q", "to_k", "to_v", "to_out")
_LORA_KEY = re.compile(r"^(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
_FACEID_KEYS = {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"}


class PortraitModel(UNetPlacement):
    """A diffusers SD / SDXL pipeline with an IP-Adapter FaceID adapter (`family = "ip_adapter_faceid"`)."""

    family = FACEID
    is_testbed = False

    def __init__(self, unet, text_encoder, tokenizer, vae, scheduler, *, text_encoder_2=None, tokenizer_2=None,
                 adapter_layout: dict, lora: dict | None = None, base_unet_config: str, pipeline_class: str,
                 embedding_norm: float = 1.0, source: str | None = None, ip_adapter: str | None = None,
                 unshuffle: int = 1, prompt: str = DEFAULT_PROMPT, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT):
        self.unet, self.text_encoder, self.tokenizer, self.vae, self.scheduler = \
            unet, text_encoder, tokenizer, vae, scheduler
        # vae=None: a pixel-space UNet on unshuffle x unshuffle space-to-depth pixels (the testbed's)
        self.unshuffle = int(unshuffle)
        self.default_prompt, self.default_negative_prompt = prompt, negative_prompt
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.pipeline_class = pipeline_class
        self.embedding_norm = float(embedding_norm)
        self.source, self.ip_adapter = source, ip_adapter
        self._layout = adapter_layout          # {"image_proj"/"ip_adapter": {original key: dtype}}
        self._lora = dict(lora or {})          # original FaceID LoRA tensors (applied by hooks, never edited)
        self._base_unet_config = base_unet_config
        for tok, te in ((tokenizer, text_encoder), (tokenizer_2, text_encoder_2)):
            # a plain CLIPTokenizer save may lack model_max_length (then it is ~1e30): use the encoder's positions
            if tok is not None and te is not None:
                positions = te.config.max_position_embeddings
                if not isinstance(tok.model_max_length, int) or not 0 < tok.model_max_length <= positions:
                    tok.model_max_length = positions
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else self.unshuffle
        self.resolution = unet.config.sample_size * self.vae_scale_factor
        for m in (unet, text_encoder, text_encoder_2, vae):
            if m is not None:
                m.eval().requires_grad_(False)

    # ------------------------------------------------------------ the identity path
    def components(self) -> dict:
        """Top-level modules that patch names start with (`unet.encoder_hid_proj...` for the image projection)."""
        comps = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.vae is not None:
            comps["vae"] = self.vae
        if self.text_encoder_2 is not None:
            comps["text_encoder_2"] = self.text_encoder_2
        return comps

    @property
    def image_proj(self) -> torch.nn.Module:
        """The diffusers image projection (ArcFace embedding -> ID tokens): the only part identity methods edit."""
        return self.unet.encoder_hid_proj.image_projection_layers[0]

    def identity_parameter_names(self) -> list[str]:
        """Qualified names (`fastforget.patch.get_parameter(model, name)`) of the image projection's parameters."""
        return [f"{IMAGE_PROJ}.{n}" for n, _ in self.image_proj.named_parameters()]

    @property
    def num_tokens(self) -> int:
        p = self.image_proj
        return p.num_tokens if hasattr(p, "num_tokens") else p.latents.shape[1]

    @property
    def cross_attention_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    def ip_processors(self) -> dict:
        """The cross-attention processors holding `to_k_ip` / `to_v_ip`, in checkpoint (attn_processors) order."""
        return {n: p for n, p in self.unet.attn_processors.items()
                if not n.startswith("encoder_hid_proj") and hasattr(p, "to_k_ip")}

    def _projection_input(self, emb: torch.Tensor) -> torch.Tensor:
        """(N, 512) -> what the projection module takes: FaceID's MLP a vector, the Resampler a 1-token sequence."""
        return emb

    def image_embeds(self, embeddings, name: str = "embeddings") -> torch.Tensor:
        """Unit embeddings scaled to `embedding_norm`, in diffusers' shape for `added_cond_kwargs={"image_embeds":
        [x]}` and `ip_adapter_image_embeds=[x]`: (N, 1, 512) for FaceID, (N, 1, 1, 512) for InstantID. A tensor
        that requires grad keeps its graph."""
        checked = check_embeddings(embeddings, name=name)
        if isinstance(embeddings, torch.Tensor) and embeddings.requires_grad:
            e = embeddings if embeddings.ndim == 2 else embeddings[None]
            checked = F.normalize(e.float(), dim=1)
        x = (checked * self.embedding_norm).to(self.device, self.dtype)
        return self._projection_input(x)[:, None]

    def id_tokens(self, embeddings, name: str = "embeddings") -> torch.Tensor:
        """ArcFace embeddings (N, 512) -> ID tokens (N, num_tokens, cross_attention_dim), differentiable in the
        image projection's parameters (and in `embeddings` when it requires grad)."""
        return self.image_proj(self.image_embeds(embeddings, name)[:, 0])

    def null_id_tokens(self, n: int = 1) -> torch.Tensor:
        """ID tokens of the zero embedding: the negative branch under classifier-free guidance."""
        z = torch.zeros(n, EMBED_DIM, device=self.device, dtype=self.dtype)
        return self.image_proj(self._projection_input(z))

    @property
    def ip_adapter_scale(self) -> float:
        return float(next(iter(self.ip_processors().values())).scale[0])

    def set_ip_adapter_scale(self, scale: float) -> None:
        """Weight of the ID tokens' attention (diffusers' `set_ip_adapter_scale`; FaceID 1.0, InstantID demos 0.8)."""
        from fastforget.models.common import check_float

        scale = check_float(scale, "scale", 0.0)
        for p in self.ip_processors().values():
            p.scale = [scale] * len(p.scale)

    # ------------------------------------------------------------ sampling
    def pipeline(self, scheduler=None):
        """diffusers' own pipeline on this model's modules (shared, not copied); no safety checker, no watermark."""
        import diffusers

        sched = scheduler or type(self.scheduler).from_config(self.scheduler.config)
        common = dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                      scheduler=sched, image_encoder=None, feature_extractor=None)
        if self.vae is None:  # pixel space: diffusers' constructor would turn DDIM's x0 clipping off, with a warning
            sched = type(sched).from_config({**sched.config, "clip_sample": False}) \
                if getattr(sched.config, "clip_sample", False) else sched
            common["scheduler"] = sched
        if self.pipeline_class == "StableDiffusionXLPipeline":
            pipe = diffusers.StableDiffusionXLPipeline(text_encoder_2=self.text_encoder_2,
                                                       tokenizer_2=self.tokenizer_2, add_watermarker=False, **common)
        else:
            pipe = diffusers.StableDiffusionPipeline(safety_checker=None, requires_safety_checker=False, **common)
        return pipe

    def sample_shape(self, n: int) -> tuple:
        c = self.unet.config
        return (n, c.in_channels, c.sample_size, c.sample_size)

    initial_noise = Arc2FaceModel.initial_noise  # per-image noise: image i uses seed + i (one rule for every family)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is None:  # pixel space
            return F.pixel_shuffle(z, self.unshuffle) if self.unshuffle > 1 else z
        cfg = self.vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(z)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(z)
            z = z * std / cfg.scaling_factor + mean
        else:
            z = z / cfg.scaling_factor
        # one latent at a time: a 1024-px SDXL decode holds several GB of activations each
        return torch.cat([self.vae.decode(zi[None]).sample for zi in z])

    @staticmethod
    def _prompts(prompt, n: int, name: str, default: str) -> list[str]:
        if prompt is None:
            prompt = default
        if isinstance(prompt, str):
            return [prompt] * n
        if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
            if len(prompt) != n:
                raise InputError(f"{name}: {len(prompt)} prompt(s) given for {n} embedding(s); give one string or one "
                                 "per embedding")
            return list(prompt)
        raise InputError(f"{name}: expected a string or a list of strings, got {type(prompt).__name__}")

    def _prompt_states(self, pipe, prompts: list, negatives: list, use_cfg: bool) -> tuple[torch.Tensor, dict]:
        """Text states and SDXL's extra conditioning by the pipeline's own `encode_prompt` (negative branch first)."""
        if self.pipeline_class != "StableDiffusionXLPipeline":
            pos, neg = pipe.encode_prompt(prompts, self.device, 1, use_cfg, negative_prompt=negatives)
            return (torch.cat([neg, pos]) if use_cfg else pos), {}
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=use_cfg,
                                                          negative_prompt=negatives)
        size = (self.resolution, self.resolution)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pos.dtype,
                                          text_encoder_projection_dim=self.text_encoder_2.config.projection_dim)
        time_ids = time_ids.to(self.device).repeat(len(prompts) * (2 if use_cfg else 1), 1)
        if use_cfg:
            return torch.cat([neg, pos]), {"text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": time_ids}
        return pos, {"text_embeds": pooled, "time_ids": time_ids}

    @torch.no_grad()
    def generate_tensor(self, embeddings, *, prompt=None, negative_prompt=None, seed=0, steps: int = 25,
                        guidance: float | None = 7.5, batch_size: int = 16, scheduler=None,
                        progress: bool = False) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1], one per embedding. Defaults are IP-Adapter FaceID's: its prompts, CFG 7.5
        (None or <= 1: no guidance, diffusers' rule).

        The denoising loop is diffusers' StableDiffusion(XL)Pipeline loop (its `encode_prompt`, scheduler calls,
        guidance and, with guidance, zeros as the negative image embedding), written out because the pipeline
        repeats `ip_adapter_image_embeds` for every prompt of a batch (one face per call): here each image of a
        batch gets its own embedding. For a single embedding the two give the same image (tested)."""
        from tqdm import tqdm

        from fastforget.models.common import check_int, check_sampling

        steps, guidance = check_sampling(steps, guidance, scheduler=self.scheduler)
        check_int(batch_size, "batch_size")
        if not isinstance(progress, bool):
            raise InputError(f"progress: expected True or False, got {progress!r}")
        if scheduler is not None and not all(hasattr(scheduler, a) for a in ("set_timesteps", "step", "timesteps")):
            raise InputError(f"scheduler: expected a diffusers scheduler, got {type(scheduler).__name__}")
        ip = self.image_embeds(embeddings)
        n = ip.shape[0]
        prompts = self._prompts(prompt, n, "prompt", self.default_prompt)
        negatives = self._prompts(negative_prompt, n, "negative_prompt", self.default_negative_prompt)
        noise = self.initial_noise(n, seed)
        use_cfg = guidance is not None and guidance > 1.0
        out = []
        for i in tqdm(range(0, n, batch_size), desc="generate", disable=not progress, leave=False):
            pipe = self.pipeline(scheduler)  # a fresh scheduler per batch: multistep samplers keep state
            # pixel space keeps the model's sampler (x0 clipped to [-1, 1] is exact there: the testbed's)
            sched = pipe.scheduler if self.vae is not None else \
                (scheduler or type(self.scheduler).from_config(self.scheduler.config))
            e = ip[i:i + batch_size]
            states, added = self._prompt_states(pipe, prompts[i:i + batch_size], negatives[i:i + batch_size], use_cfg)
            added["image_embeds"] = [torch.cat([torch.zeros_like(e), e]) if use_cfg else e]
            sched.set_timesteps(steps, device=self.device)
            z = noise[i:i + batch_size].to(self.device, self.dtype) * sched.init_noise_sigma
            for t in sched.timesteps:
                inp = sched.scale_model_input(torch.cat([z, z]) if use_cfg else z, t)
                eps = self.unet(inp, t, encoder_hidden_states=states, added_cond_kwargs=added, return_dict=False)[0]
                if use_cfg:
                    eu, ec = eps.chunk(2)
                    eps = eu + guidance * (ec - eu)
                z = sched.step(eps, t, z, return_dict=False)[0]
            out.append(self._decode(z).float().clamp(-1, 1))
        return torch.cat(out)

    def generate(self, embeddings, prompt=None, seed=0, steps: int = 25, guidance: float | None = 7.5,
                 output_type: str = "pil", **kw):
        """Images from identity embeddings in diffusers' `output_type` convention: "pil" (list of PIL images),
        "np" (float32 NHWC in [0, 1]), "pt" (NCHW in [0, 1])."""
        from fastforget.models.common import check_sampling, format_images

        unknown = sorted(set(kw) - {"negative_prompt", "batch_size", "scheduler", "progress"})
        if unknown:
            raise InputError(f"generate: unknown argument(s) {unknown} (also takes: negative_prompt, batch_size, "
                             "scheduler, progress)")
        if output_type is None:
            raise InputError("output_type: expected one of ('pil', 'np', 'pt'), got None")
        check_sampling(steps, guidance, output_type, self.scheduler)
        return format_images(self.generate_tensor(embeddings, prompt=prompt, seed=seed, steps=steps,
                                                  guidance=guidance, **kw), output_type)

    # ------------------------------------------------------------ the adapter file
    def _image_proj_to_original(self, state: dict) -> dict:
        """diffusers' IPAdapterFaceIDImageProjection names -> IP-Adapter's MLPProjModel names."""
        return {k.replace("ff.net.0.proj", "proj.0").replace("ff.net.2", "proj.2"): v for k, v in state.items()}

    def ip_adapter_state_dict(self, dtype: torch.dtype | None = None) -> dict:
        """The adapter as it is now, in the original layout {"image_proj": {...}, "ip_adapter": {...}}, each tensor
        in the dtype it was read with (or `dtype`): the key set is the loaded checkpoint's."""
        proj = self._image_proj_to_original(self.image_proj.state_dict())
        ip = {}
        for j, p in enumerate(self.ip_processors().values()):
            ip[f"{2 * j + 1}.to_k_ip.weight"] = p.to_k_ip[0].weight
            ip[f"{2 * j + 1}.to_v_ip.weight"] = p.to_v_ip[0].weight
        ip.update(self._lora)
        out = {}
        for part, state in (("image_proj", proj), ("ip_adapter", ip)):
            want = self._layout[part]
            if set(state) != set(want):
                diff = sorted(set(state) ^ set(want))[:4]
                raise RuntimeError(f"{part}: keys {diff} differ from the loaded checkpoint")
            out[part] = {k: state[k].detach().to("cpu", dtype or want[k]).contiguous().clone() for k in sorted(want)}
        return out

    def save_ip_adapter(self, path, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
        """Write the adapter (with any edit of the image projection) in the original IP-Adapter layout: `.bin` /
        `.pt` / `.pth` via torch.save, `.safetensors` with flattened `image_proj.` / `ip_adapter.` keys. Loads in
        plain diffusers (`pipe.load_ip_adapter(folder, subfolder="", weight_name=name, image_encoder_folder=None)`).
        Atomic; an existing file is kept unless overwrite=True."""
        from fastforget.io import atomic_write_bytes

        if not isinstance(path, (str, PathLike)):
            raise InputError(f"path: expected a file path, got {type(path).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        suffix = Path(path).suffix.lower()
        if suffix not in (".bin", ".pt", ".pth", ".safetensors"):
            raise InputError(f"path: {path} must end in .bin, .pt, .pth or .safetensors (the layout follows the name)")
        return atomic_write_bytes(path, _adapter_bytes(self.ip_adapter_state_dict(dtype), suffix),
                                  overwrite=overwrite, name="ip_adapter")

    # ------------------------------------------------------------ persistence
    def save_pretrained(self, directory, overwrite: bool = False) -> Path:
        """Self-contained folder: the base pipeline as diffusers writes it (model_index.json, unet/ without the
        adapter, text_encoder/, tokenizer/, vae/, scheduler/ [, text_encoder_2/, tokenizer_2/]) + the adapter as
        `ip_adapter.safetensors` + fastforget.json. Loads with `ff.load(directory)`, or in plain diffusers with
        `Pipeline.from_pretrained(directory)` then `load_ip_adapter(directory, "", "ip_adapter.safetensors",
        image_encoder_folder=None)`. Written to a temporary folder and renamed into place."""
        from safetensors.torch import save_file

        from fastforget.io import atomic_directory

        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.pipeline().save_config(tmp)
            (tmp / "unet").mkdir()
            (tmp / "unet" / "config.json").write_text(self._base_unet_config)
            base = {k: v.detach().cpu().contiguous() for k, v in self.unet.state_dict().items()
                    if not k.startswith("encoder_hid_proj.") and ".processor." not in k}
            save_file(base, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
            self.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            if self.text_encoder_2 is not None:
                self.text_encoder_2.save_pretrained(tmp / "text_encoder_2", safe_serialization=True)
                self.tokenizer_2.save_pretrained(tmp / "tokenizer_2")
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            self.scheduler.save_pretrained(tmp / "scheduler")
            (tmp / IP_ADAPTER_FILE).write_bytes(_adapter_bytes(self.ip_adapter_state_dict(), ".safetensors"))
            (tmp / MANIFEST).write_text(json.dumps({
                "family": self.family, "ip_adapter": IP_ADAPTER_FILE, "embedding_norm": self.embedding_norm,
                "ip_adapter_scale": self.ip_adapter_scale, "pipeline": self.pipeline_class,
                "source": self.source, "unshuffle": self.unshuffle, "prompt": self.default_prompt,
                "negative_prompt": self.default_negative_prompt}, indent=2))
        return Path(directory)

    def clone(self, only=None) -> "PortraitModel":
        """A copy whose weights can be edited without touching this model. With `only` (qualified parameter
        names, e.g. a patch's `names`), every other parameter and buffer is shared with this model."""
        from fastforget.models.arc2face import share_copy

        m = type(self)(share_copy(self.unet, "unet", only), share_copy(self.text_encoder, "text_encoder", only),
                       self.tokenizer, share_copy(self.vae, "vae", only), self.scheduler,
                       text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, adapter_layout=self._layout,
                       lora=self._lora, base_unet_config=self._base_unet_config, pipeline_class=self.pipeline_class,
                       embedding_norm=self.embedding_norm, source=self.source, ip_adapter=self.ip_adapter,
                       unshuffle=self.unshuffle, prompt=self.default_prompt,
                       negative_prompt=self.default_negative_prompt)
        m.is_testbed = getattr(self, "is_testbed", False)
        return m

    def __repr__(self):
        return (f"{type(self).__name__}(family={self.family!r}, pipeline={self.pipeline_class}, "
                f"tokens={self.num_tokens}x{self.cross_attention_dim}, resolution={self.resolution}, "
                f"ip_adapter={self.ip_adapter!r})")


class InstantIDModel(PortraitModel):
    """InstantID's face adapter (Resampler image projection, 16 ID tokens) on an SDXL (or SD) pipeline; without
    IdentityNet, its ControlNet (out of scope)."""

    family = INSTANTID

    def _projection_input(self, emb: torch.Tensor) -> torch.Tensor:
        return emb[:, None]  # InstantID feeds the embedding as a sequence of one token: (N, 1, 512)

    def _image_proj_to_original(self, state: dict) -> dict:
        """diffusers' IPAdapterPlusImageProjection names -> IP-Adapter / InstantID Resampler names (to_k, to_v
        joined back into to_kv, as diffusers' converter split them)."""
        out = {}
        for k, v in state.items():
            m = re.match(r"^layers\.(\d+)\.(.+)$", k)
            if not m:
                out[k] = v
                continue
            i, rest = m.groups()
            if rest.startswith("attn.to_v."):
                continue
            if rest.startswith("attn.to_k."):
                out[f"layers.{i}.0.to_kv.weight"] = torch.cat([v, state[f"layers.{i}.attn.to_v.weight"]])
                continue
            for new, old in (("ln0.", "0.norm1."), ("ln1.", "0.norm2."), ("attn.to_q.", "0.to_q."),
                             ("attn.to_out.0.", "0.to_out."), ("ff.0.", "1.0."), ("ff.1.net.0.proj.", "1.1."),
                             ("ff.1.net.2.", "1.3.")):
                if rest.startswith(new):
                    out[f"layers.{i}.{old}{rest[len(new):]}"] = v
                    break
            else:
                raise RuntimeError(f"image projection: no original name for {k!r}")
        return out


# ---------------------------------------------------------------- checkpoint files
def _adapter_bytes(state: dict, suffix: str) -> bytes:
    if suffix == ".safetensors":
        from safetensors.torch import save

        return save({f"{part}.{k}": v for part in ("image_proj", "ip_adapter") for k, v in state[part].items()},
                    metadata={"format": "pt"})
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def read_ip_adapter(path) -> dict:
    """An IP-Adapter checkpoint as {"image_proj": {...}, "ip_adapter": {...}}: `.safetensors` with flattened keys,
    anything else via torch.load(weights_only=True) (a pickle that would run code raises UnsafeCheckpointError)."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"IP-Adapter checkpoint not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        state = {"image_proj": {}, "ip_adapter": {}}
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    part, _, rest = key.partition(".")
                    if part not in state or not rest:
                        raise ModelLoadError(f"{path}: unexpected key {key!r} (an IP-Adapter safetensors file holds "
                                             "'image_proj.*' and 'ip_adapter.*' keys)")
                    state[part][rest] = f.get_tensor(key)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({str(exc)[:200]})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if re.search(r"not an allowed global|Unsupported global", str(exc)):
                raise UnsafeCheckpointError(f"{path}: refused: loading it would run code (it holds objects other than "
                                            "tensors); IP-Adapter checkpoints hold plain tensors only") from None
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ModelLoadError(f"{path}: not a readable torch checkpoint ({first})") from None
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable torch checkpoint ({str(exc)[:200]})") from None
    if not isinstance(state, dict) or set(state) != {"image_proj", "ip_adapter"} \
            or not all(isinstance(state[p], dict) for p in state):
        got = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ModelLoadError(f"{path}: expected the IP-Adapter layout {{'image_proj': {{...}}, "
                             f"'ip_adapter': {{...}}}}, got {got}")
    for part, sd in state.items():
        for k, v in sd.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise ModelLoadError(f"{path}: {part}[{k!r}] is not a floating-point tensor")
    return state


def adapter_family(state: dict, where) -> str:
    """Which image projection a checkpoint holds: FaceID's MLP or InstantID's Resampler; other IP-Adapters
    (they need a CLIP image encoder) raise ModelLoadError naming `where`."""
    proj = state["image_proj"]
    keys = set(proj)
    plus = any(k.startswith("perceiver_resampler.") for k in keys)
    if "norm.weight" in keys and "proj.0.weight" in keys and not plus:
        if keys != _FACEID_KEYS:
            raise ModelLoadError(f"{where}: FaceID image projection with keys {sorted(keys ^ _FACEID_KEYS)[:4]} "
                                 f"missing or unexpected (expected {sorted(_FACEID_KEYS)})")
        if proj["proj.0.weight"].ndim != 2 or proj["proj.0.weight"].shape[1] != EMBED_DIM:
            raise ModelLoadError(f"{where}: image_proj proj.0.weight has shape {tuple(proj['proj.0.weight'].shape)}; "
                                 f"FaceID takes the {EMBED_DIM}-d ArcFace embedding")
        d = proj["norm.weight"].shape[0]
        if proj["proj.2.weight"].shape[0] % d:
            raise ModelLoadError(f"{where}: image_proj proj.2.weight rows ({proj['proj.2.weight'].shape[0]}) are not "
                                 f"a whole number of {d}-d tokens")
        return FACEID
    if "latents" in keys and "proj_in.weight" in keys:
        if proj["proj_in.weight"].ndim != 2 or proj["proj_in.weight"].shape[1] != EMBED_DIM:
            raise ModelLoadError(f"{where}: image_proj proj_in.weight has shape {tuple(proj['proj_in.weight'].shape)}; "
                                 f"InstantID's Resampler takes the {EMBED_DIM}-d ArcFace embedding (another width "
                                 "is an IP-Adapter Plus on CLIP image features, not supported)")
        depth = {int(m.group(1)) for k in keys if (m := re.match(r"^layers\.(\d+)\.", k))}
        if depth != {0, 1, 2, 3}:
            raise ModelLoadError(f"{where}: Resampler with layers {sorted(depth)}; diffusers' converter reads depth 4")
        for i in range(4):
            need = {f"layers.{i}.0.{n}" for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                                   "to_q.weight", "to_kv.weight", "to_out.weight")} | \
                   {f"layers.{i}.1.{n}" for n in ("0.weight", "0.bias", "1.weight", "3.weight")}
            if not need <= keys:
                raise ModelLoadError(f"{where}: Resampler layer {i} lacks {sorted(need - keys)[:3]}")
            if proj[f"layers.{i}.0.to_q.weight"].shape[0] % 64:
                raise ModelLoadError(f"{where}: Resampler attention width {proj[f'layers.{i}.0.to_q.weight'].shape[0]} "
                                     "is not a multiple of 64 (diffusers' converter assumes dim_head 64)")
        extra = keys - {"latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias",
                        "norm_out.weight", "norm_out.bias"} - {k for k in keys if k.startswith("layers.")}
        if extra:
            raise ModelLoadError(f"{where}: unexpected Resampler keys {sorted(extra)[:4]}")
        return INSTANTID
    if "proj.weight" in keys or "proj.3.weight" in keys:
        what = "a plain IP-Adapter" if "proj.weight" in keys else "an IP-Adapter Full-Face"
    elif plus:
        what = "an IP-Adapter FaceID-Plus"
    else:
        raise ModelLoadError(f"{where}: unknown image projection (keys {sorted(keys)[:5]}); expected IP-Adapter "
                             "FaceID (proj.0 / proj.2 / norm) or InstantID's Resampler (latents / proj_in / layers)")
    raise ModelLoadError(f"{where}: {what} checkpoint; it needs a CLIP image encoder, which fastforget does not "
                         "run (supported: IP-Adapter FaceID, InstantID)")


def _cross_attention_names(unet) -> tuple[list[str], list[str]]:
    """All attention processor names (the LoRA keys count these) and the cross-attention ones (the to_k_ip keys
    1, 3, 5, ... count these), in `attn_processors` order, as IP-Adapter and diffusers number them."""
    names = [n for n in unet.attn_processors if not n.startswith("encoder_hid_proj")]
    return names, [n for n in names if not n.endswith("attn1.processor") and "motion_modules" not in n]


def _check_ip_layers(unet, state: dict, where) -> dict:
    """to_k_ip / to_v_ip for every cross-attention layer, nothing else but FaceID LoRA; returns the LoRA tensors."""
    names, cross = _cross_attention_names(unet)
    ip = state["ip_adapter"]
    want = {f"{2 * j + 1}.{n}.weight" for j in range(len(cross)) for n in ("to_k_ip", "to_v_ip")}
    have = {k for k in ip if _IP_KEY.match(k)}
    if have != want:
        missing, extra = sorted(want - have), sorted(have - want)
        what = "; ".join(f"{w} {ks[:3]}" for w, ks in (("missing", missing), ("unexpected", extra)) if ks)
        raise ModelLoadError(f"{where}: the adapter does not fit this UNet ({len(cross)} cross-attention layers): "
                             f"{what}")
    d = unet.config.cross_attention_dim
    for k in want:
        if ip[k].ndim != 2 or ip[k].shape[1] != d:
            raise ModelLoadError(f"{where}: ip_adapter {k!r} has shape {tuple(ip[k].shape)}; the UNet's "
                                 f"cross-attention width is {d}")
    lora = {k: v for k, v in ip.items() if k not in want}
    bad = [k for k in lora if not _LORA_KEY.match(k) or int(_LORA_KEY.match(k).group(1)) >= len(names)]
    if bad:
        raise ModelLoadError(f"{where}: unexpected ip_adapter keys {sorted(bad)[:4]} (expected '<k>.to_k_ip.weight', "
                             "'<k>.to_v_ip.weight' and FaceID LoRA '<k>.to_{q,k,v,out}_lora.{down,up}.weight')")
    for k in {int(_LORA_KEY.match(k).group(1)) for k in lora}:
        need = {f"{k}.{p}_lora.{w}.weight" for p in LORA_PARTS for w in ("down", "up")}
        if not need <= set(lora):
            raise ModelLoadError(f"{where}: FaceID LoRA of layer {k} lacks {sorted(need - set(lora))[:3]}")
        attn = unet.get_submodule(names[k][:-len(".processor")])
        for p in LORA_PARTS:
            lin = attn.to_out[0] if p == "to_out" else getattr(attn, p)
            down, up = lora[f"{k}.{p}_lora.down.weight"], lora[f"{k}.{p}_lora.up.weight"]
            if down.ndim != 2 or up.ndim != 2 or down.shape[1] != lin.in_features or up.shape != (lin.out_features,
                                                                                                    down.shape[0]):
                raise ModelLoadError(f"{where}: FaceID LoRA '{k}.{p}_lora' has shapes {tuple(down.shape)} / "
                                     f"{tuple(up.shape)}; {names[k]} is {lin.in_features} -> {lin.out_features}")
    return lora


def _lora_hook(down: torch.Tensor, up: torch.Tensor):
    def hook(module, inputs, output):  # IP-Adapter's LoRA processors: W x + up(down(x)), lora_scale 1
        x = inputs[0]
        return output + F.linear(F.linear(x, down.to(x.device, x.dtype)), up.to(x.device, x.dtype))
    return hook


def _apply_lora(unet, lora: dict) -> None:
    names, _ = _cross_attention_names(unet)
    for k in sorted({int(_LORA_KEY.match(key).group(1)) for key in lora}):
        attn = unet.get_submodule(names[k][:-len(".processor")])
        for p in LORA_PARTS:
            lin = attn.to_out[0] if p == "to_out" else getattr(attn, p)
            lin.register_forward_hook(_lora_hook(lora[f"{k}.{p}_lora.down.weight"].float(),
                                                 lora[f"{k}.{p}_lora.up.weight"].float()))


# ---------------------------------------------------------------- loading
def _load_text_encoder_2(folder: Path):
    from transformers import CLIPTextModelWithProjection

    read_json_config(folder / "config.json")
    try:  # transformers reads .bin with weights_only=True
        return CLIPTextModelWithProjection.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"{folder}: cannot load CLIPTextModelWithProjection ({str(exc)[:300]})") from None


def _find_checkpoint(ip_adapter, root: Path) -> Path:
    if not isinstance(ip_adapter, (str, PathLike)):
        raise InputError(f"ip_adapter: expected the path of an IP-Adapter checkpoint, got {type(ip_adapter).__name__}")
    p = Path(ip_adapter)
    for cand in (p, root / p) if not p.is_absolute() else (p,):
        try:
            if cand.is_file():
                return cand
        except OSError as exc:
            raise ModelLoadError(f"ip_adapter {p}: {exc.strerror or exc}") from None
    where = f"{p}" + (f" (nor {root / p})" if not p.is_absolute() else "")
    raise ModelLoadError(f"IP-Adapter checkpoint not found: {where}")


def load_portrait(path, ip_adapter=None, allow_nonfinite: bool = False, embedding_norm: float | None = None):
    """A diffusers StableDiffusion(XL)Pipeline folder + an IP-Adapter FaceID or InstantID checkpoint
    (`ip_adapter=`; a relative name is also looked up inside the folder), or a folder written by
    `save_pretrained` (its adapter is found through fastforget.json)."""
    from fastforget.models.common import check_float

    root = Path(path)
    if not isinstance(allow_nonfinite, bool):
        raise InputError(f"allow_nonfinite: expected True or False, got {allow_nonfinite!r}")
    if embedding_norm is not None:
        embedding_norm = check_float(embedding_norm, "embedding_norm", 0.0)
        if embedding_norm <= 0:
            raise InputError(f"embedding_norm: must be > 0, got {embedding_norm}")
    if not root.is_dir():
        raise ModelLoadError(f"model folder not found: {root}")
    meta = read_manifest(root) or {}
    if meta and meta.get("family") not in (FACEID, INSTANTID):
        raise ModelLoadError(f"{root / MANIFEST}: family {meta.get('family')!r} is not a portrait generator")
    pipeline_class = class_name_of(root)
    if pipeline_class not in PIPELINES:
        raise ModelLoadError(f"{root / 'model_index.json'}: pipeline {pipeline_class!r}; expected one of {PIPELINES}")
    if ip_adapter is None:
        if not meta.get("ip_adapter"):
            raise ModelLoadError(f"{root}: a {pipeline_class} folder; pass ip_adapter= the IP-Adapter FaceID or "
                                 "InstantID checkpoint (e.g. ff.load(folder, ip_adapter='ip-adapter-faceid_sd15.bin'))")
        ip_adapter = meta["ip_adapter"]
    return _assemble(root, _find_checkpoint(ip_adapter, root), meta, pipeline_class, allow_nonfinite, embedding_norm)


def _assemble(root: Path, ckpt: Path, meta: dict, pipeline_class: str, allow_nonfinite: bool,
              embedding_norm: float | None):
    """The pipeline parts in `root` (unet/, text_encoder/, tokenizer/, scheduler/, vae/ unless `meta` names
    `unshuffle` and there is no vae/: a pixel-space UNet) + the adapter checkpoint `ckpt`, loaded by diffusers."""
    from fastforget.models.arc2face import (_check_finite, _check_geometry, _load_text_encoder, _load_tokenizer,
                                            _load_unet, _load_vae, load_scheduler, low_cpu_mem)
    from fastforget.models.common import check_float

    state = read_ip_adapter(ckpt)
    family = adapter_family(state, ckpt)
    if meta.get("family", family) != family:
        raise ModelLoadError(f"{ckpt}: holds a {family} adapter, but {root / MANIFEST} says {meta['family']}")
    if embedding_norm is None:
        embedding_norm = check_float(meta.get("embedding_norm", 1.0), f"{root / MANIFEST}: embedding_norm", 0.0)
    for part, sd in state.items():
        for k, v in sd.items():
            if not allow_nonfinite and not torch.isfinite(v).all():
                raise ModelLoadError(f"{ckpt}: {part} weight {k!r} contains NaN or inf (pass allow_nonfinite=True to "
                                     "load it anyway)")

    unet = _load_unet(root / "unet")
    text_encoder = _load_text_encoder(root / "text_encoder")
    tokenizer = _load_tokenizer(root / "tokenizer")
    vae = _load_vae(root / "vae") if "unshuffle" not in meta or (root / "vae").is_dir() else None
    unshuffle = _check_geometry(unet, meta.get("unshuffle", 1), vae, root / MANIFEST)
    prompts = {k: meta.get(k, d) for k, d in (("prompt", DEFAULT_PROMPT), ("negative_prompt", DEFAULT_NEGATIVE_PROMPT))}
    if not all(isinstance(v, str) for v in prompts.values()):
        raise ModelLoadError(f"{root / MANIFEST}: 'prompt' / 'negative_prompt' must be strings")
    scheduler = load_scheduler(root / "scheduler", default="DDIMScheduler")  # IP-Adapter's FaceID demos: DDIM
    text_encoder_2 = tokenizer_2 = None
    if pipeline_class == "StableDiffusionXLPipeline":
        text_encoder_2 = _load_text_encoder_2(root / "text_encoder_2")
        tokenizer_2 = _load_tokenizer(root / "tokenizer_2")
    for part, where in ((unet, "unet"), (text_encoder, "text_encoder"), (text_encoder_2, "text_encoder_2"),
                        (vae, "vae")):
        _check_finite(part, root / where, allow_nonfinite)
    if unet.config.encoder_hid_dim_type is not None:
        raise ModelLoadError(f"{root / 'unet'}: the UNet already has encoder_hid_dim_type "
                             f"{unet.config.encoder_hid_dim_type!r}; an IP-Adapter needs a plain SD / SDXL UNet")
    proj = state["image_proj"]
    out_dim = proj["norm.weight" if family == FACEID else "norm_out.weight"].shape[0]
    if out_dim != unet.config.cross_attention_dim:
        raise ModelLoadError(f"{ckpt}: the image projection makes {out_dim}-d tokens; the UNet's cross-attention "
                             f"width is {unet.config.cross_attention_dim} (an adapter for another base model?)")
    lora = _check_ip_layers(unet, state, ckpt)
    layout = {part: {k: v.dtype for k, v in sd.items()} for part, sd in state.items()}
    base_unet_config = unet.to_json_string()

    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # diffusers' own `.to(dtype)` after loading warns about fp32 modules
    try:
        unet._load_ip_adapter_weights([state], **low_cpu_mem())
    except Exception as exc:
        raise ModelLoadError(f"{ckpt}: diffusers cannot load it into {root / 'unet'} ({str(exc)[:300]})") from None
    finally:
        dlogging.set_verbosity(level)
    if lora:
        _apply_lora(unet, lora)
    cls = InstantIDModel if family == INSTANTID else PortraitModel
    try:
        model = cls(unet, text_encoder, tokenizer, vae, scheduler, text_encoder_2=text_encoder_2,
                    tokenizer_2=tokenizer_2, adapter_layout=layout, lora=lora, base_unet_config=base_unet_config,
                    pipeline_class=pipeline_class, embedding_norm=embedding_norm, source=str(root),
                    ip_adapter=str(ckpt), unshuffle=unshuffle, **prompts)
    except Exception as exc:
        raise ModelLoadError(f"{root}: the parts do not fit together ({str(exc)[:200]})") from None
    if "ip_adapter_scale" in meta:
        model.set_ip_adapter_scale(meta["ip_adapter_scale"])
    return model


def _detect(path: Path) -> bool:
    if not path.is_dir():
        return False
    meta = read_manifest(path)
    if meta is not None:
        return meta.get("family") == FACEID
    return class_name_of(path) in PIPELINES


def _detect_instantid(path: Path) -> bool:
    meta = read_manifest(path) if path.is_dir() else None
    return meta is not None and meta.get("family") == INSTANTID


def _load_demo_faceid(allow_nonfinite: bool = False, generator: str = "a"):
    """The testbed's portrait generators: the testbed UNet (weights/generator; "b": plus the shifted-domain
    fine-tune of weights/faceid_b) with the IP-Adapter FaceID of weights/faceid (fastforget.testbed.train_faceid)."""
    from fastforget.testbed import weights_dir

    folder = weights_dir() / "faceid"
    meta = read_manifest(folder) if folder.is_dir() else None
    if meta is None or not (folder / meta.get("ip_adapter", "")).is_file():
        raise ModelLoadError(f"testbed FaceID adapter missing at {folder}: reinstall fastforget or run "
                             "python -m fastforget.testbed.train_faceid")
    model = _assemble(weights_dir() / "generator", folder / meta["ip_adapter"], meta, meta["pipeline"],
                      allow_nonfinite, None)
    if generator == "b":
        from fastforget.testbed.train_faceid import apply_unet_delta

        apply_unet_delta(model.unet, weights_dir() / "faceid_b")
    return model


# a pipeline folder is claimed here; the checkpoint decides FaceID or InstantID
register_adapter(FACEID, detect=_detect, load=load_portrait, model_types=(PortraitModel,))
register_adapter(INSTANTID, detect=_detect_instantid, load=load_portrait)
register_builtin("demo-faceid", _load_demo_faceid)
register_builtin("demo-faceid-b", lambda allow_nonfinite=False: _load_demo_faceid(allow_nonfinite, "b"))
