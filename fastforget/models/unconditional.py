"""Unconditional diffusion (family `unconditional`): a diffusers `UNet2DModel` + scheduler, e.g. the
DDPM CelebA-HQ layout (`model_index.json` naming DDPMPipeline, `unet/`, `scheduler/`; or the older
flat layout with `config.json` + `scheduler_config.json` at the root). Identity lives in h-space (the
`mid_block` output); BIA edits it. Pixel space, images in [-1, 1]."""
from __future__ import annotations

from pathlib import Path

import torch

from fastforget.errors import ModelLoadError
from fastforget.models.common import UNetPlacement
from fastforget.models.registry import class_name_of, read_json_config, read_manifest, register_adapter


class UnconditionalDiffusion(UNetPlacement):
    """`.unet` (UNet2DModel), `.scheduler`, no text encoder, pixel-space codec."""

    family = "unconditional"
    is_testbed = False

    def __init__(self, unet, scheduler=None, source: str | None = None):
        from diffusers import DDPMScheduler

        self.unet = unet
        self.scheduler = scheduler if scheduler is not None else DDPMScheduler(num_train_timesteps=1000)
        self.text_encoder = None
        self.vae = None
        self.source = source
        self.codec = None
        ss = unet.config.sample_size
        self.resolution = ss if isinstance(ss, int) else ss[0]
        unet.eval().requires_grad_(False)

    def clone(self, only=None) -> "UnconditionalDiffusion":
        from fastforget.models.arc2face import share_copy

        return UnconditionalDiffusion(share_copy(self.unet, "unet", only), self.scheduler, self.source)

    @torch.no_grad()
    def generate_tensor(self, n: int = 1, *, seed: int = 0, steps: int = 50) -> torch.Tensor:
        """n images (N, 3, H, W) in [-1, 1], DDIM (η = 0) with the model's training schedule."""
        from diffusers import DDIMScheduler

        from fastforget.models.common import check_int, check_sampling, check_seed

        n = check_int(n, "n")
        steps, _ = check_sampling(steps, None, scheduler=self.scheduler)
        check_seed(seed, n)
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        c = self.unet.config
        z = torch.stack([torch.randn(c.in_channels, self.resolution, self.resolution,
                                     generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])
        for t in sched.timesteps:
            z = sched.step(self.unet(z, t).sample, t, z).prev_sample
        return z.clamp(-1, 1)

    def generate(self, n: int = 1, *, seed: int = 0, steps: int = 50, output_type: str = "pil"):
        from fastforget.models.common import check_sampling, format_images

        check_sampling(steps, None, output_type, self.scheduler)
        return format_images(self.generate_tensor(n, seed=seed, steps=steps), output_type)

    def save_pretrained(self, directory, overwrite: bool = False) -> Path:
        """DDPM pipeline layout (model_index.json, unet/, scheduler/): loads with diffusers' DDPMPipeline."""
        import json

        from fastforget.io import atomic_directory

        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            self.scheduler.save_pretrained(tmp / "scheduler")
            (tmp / "model_index.json").write_text(json.dumps({
                "_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", type(self.scheduler).__name__]}, indent=2))
        return Path(directory)


def _unet_folder(root: Path) -> Path | None:
    if class_name_of(root / "unet") == "UNet2DModel":
        return root / "unet"
    if class_name_of(root) == "UNet2DModel":
        return root
    return None


def _detect(path: Path) -> bool:
    if not path.is_dir():
        return False
    meta = read_manifest(path)
    if meta is not None:
        return meta.get("family") == "unconditional"
    return _unet_folder(path) is not None


def load_unconditional(path, allow_nonfinite: bool = False) -> UnconditionalDiffusion:
    from diffusers import UNet2DModel

    from fastforget.models.arc2face import _check_finite, load_scheduler, low_cpu_mem

    root = Path(path)
    if not isinstance(allow_nonfinite, bool):
        from fastforget.errors import InputError

        raise InputError(f"allow_nonfinite: expected True or False, got {allow_nonfinite!r}")
    folder = _unet_folder(root)
    if folder is None:
        raise ModelLoadError(f"{root}: no UNet2DModel (expected unet/config.json or config.json naming it)")
    cfg = read_json_config(folder / "config.json")
    try:
        if (folder / "diffusion_pytorch_model.safetensors").is_file():
            unet = UNet2DModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32,
                                               **low_cpu_mem())
        elif (folder / "diffusion_pytorch_model.bin").is_file():
            state = torch.load(folder / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
            unet = UNet2DModel.from_config(cfg)
            unet.load_state_dict(state)
        else:
            raise ModelLoadError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin")
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{folder}: cannot load UNet2DModel ({str(exc)[:300]})") from None
    _check_finite(unet, folder, allow_nonfinite)
    sched_dir = root / "scheduler" if (root / "scheduler").is_dir() else root
    scheduler = load_scheduler(sched_dir, default="DDPMScheduler") \
        if (sched_dir / "scheduler_config.json").is_file() else None
    return UnconditionalDiffusion(unet.float(), scheduler, source=str(root))


register_adapter("unconditional", detect=_detect, load=load_unconditional, model_types=(UnconditionalDiffusion,))
