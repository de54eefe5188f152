"""Pieces every family's sampling shares: argument checks and diffusers' `output_type` convention."""
from __future__ import annotations

import math

import numpy as np
import torch

from fastforget.errors import InputError

OUTPUT_TYPES = ("pil", "np", "pt")
MAX_SEED = 2 ** 64 - 1  # torch.Generator.manual_seed's range
MAX_GUIDANCE = 100.0  # classifier-free guidance scale; far above any useful value, far below float overflow


def check_seed(seed, n: int = 1, name: str = "seed") -> int:
    """A non-negative integer such that seed + n - 1 is still a valid generator seed."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"{name}: expected an integer, got {seed!r}")
    seed = int(seed)
    if seed < 0 or seed + max(n, 1) - 1 > MAX_SEED:
        raise InputError(f"{name}: must be in [0, {MAX_SEED - max(n, 1) + 1}] for {n} image(s), got {seed}")
    return seed


def check_int(value, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name}: expected an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise InputError(f"{name}: must be an integer {bound}, got {value}")
    return int(value)


def is_finite_number(value) -> bool:
    """math.isfinite, False (not OverflowError) for an int beyond the float range (2**2000)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_float(value, name: str, minimum: float | None = None, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not is_finite_number(value):
        raise InputError(f"{name}: expected a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name}: must be >= {minimum}, got {value}")
    return float(value)


def check_sampling(steps, guidance, output_type: str | None = None, scheduler=None) -> tuple[int, float | None]:
    limit = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    steps = check_int(steps, "steps", 1, limit)
    guidance = check_float(guidance, "guidance", 0.0, allow_none=True)
    if guidance is not None and guidance > MAX_GUIDANCE:  # eps * 1e30 overflows float32: NaN images
        raise InputError(f"guidance: must be <= {MAX_GUIDANCE} (Arc2Face uses 3), got {guidance}")
    if output_type is not None and (not isinstance(output_type, str) or output_type not in OUTPUT_TYPES):
        raise InputError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
    return steps, guidance


def format_images(x: torch.Tensor, output_type: str = "pil"):
    """x: float (N, 3, H, W) in [-1, 1] -> diffusers' convention: "pil" a list of PIL images, "np" float32
    (N, H, W, 3) in [0, 1], "pt" float32 (N, 3, H, W) in [0, 1]. Non-finite images raise."""
    if not torch.isfinite(x).all():
        raise InputError("generated images contain NaN or inf (are the model's weights finite?)")
    x01 = (x.detach().float().cpu() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return x01
    arr = x01.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]
    raise InputError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")


class UNetPlacement:
    """`device` / `dtype` of a diffusion adapter: where its UNet's weights live (every diffusion family)."""

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype
