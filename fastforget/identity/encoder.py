"""Identity encoders: images in, unit-norm 512-d embeddings out.

`IdentityEncoder` is the one interface; the testbed's ArcFace-style network and real
insightface ArcFace ONNX models both implement it.
"""
from __future__ import annotations

import abc
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastforget.errors import InputError, ModelLoadError

EMBED_DIM = 512


def as_image_batch(images, name: str = "images") -> list[np.ndarray]:
    """Normalise images to a list of uint8 (H, W, 3) arrays.

    Accepts a uint8 array (N, H, W, 3) or (H, W, 3), or a list of paths / PIL images / arrays.
    """
    from PIL import Image

    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(f"{name}: expected uint8 (N, H, W, 3) or (H, W, 3), got shape {images.shape}")
        items = list(images)
    elif isinstance(images, (str, os.PathLike, Image.Image)):
        items = [images]
    else:
        try:
            items = list(images)
        except TypeError:
            raise InputError(f"{name}: expected images (array, paths or PIL images), got {type(images).__name__}") from None
    out = []
    for i, item in enumerate(items):
        label = f"{name}[{i}]" + (f" ({item})" if isinstance(item, (str, os.PathLike)) else "")
        if isinstance(item, (str, os.PathLike)):
            if not Path(item).is_file():
                raise InputError(f"{label}: no such image file")
            try:
                with Image.open(item) as im:
                    item = np.asarray(im.convert("RGB"))
            except Exception as exc:  # PIL raises several types for unreadable files
                raise InputError(f"{label}: cannot read image: {exc}") from None
        elif isinstance(item, Image.Image):
            item = np.asarray(item.convert("RGB"))
        arr = np.asarray(item)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise InputError(f"{label}: expected an (H, W, 3) RGB image, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1:
                arr = (arr * 255 + 0.5).astype(np.uint8)
            else:
                raise InputError(f"{label}: expected uint8 pixels (or floats in [0, 1]), got {arr.dtype}")
        out.append(np.ascontiguousarray(arr))
    if not out:
        raise InputError(f"{name}: no images given")
    return out


class IdentityEncoder(abc.ABC):
    """Base interface: `encode(images) -> torch.float32 (N, 512)`, unit norm."""

    embedding_dim: int = EMBED_DIM
    name: str = "encoder"

    @abc.abstractmethod
    def encode(self, images) -> torch.Tensor:
        """images: uint8 (N, H, W, 3), or a list of paths / PIL images / arrays."""

    def __call__(self, images) -> torch.Tensor:
        return self.encode(images)


class TestbedEncoder(IdentityEncoder):
    """The testbed's ArcFace-style network (32x32 faces). Images of any size are area-resized."""

    name = "testbed-arcface"

    def __init__(self, net: torch.nn.Module, resolution: int = 32):
        self.net = net.eval()
        self.resolution = resolution

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TestbedEncoder":
        from safetensors.torch import load_file

        from fastforget.testbed.nets import TestbedArcFace

        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"testbed encoder weights not found: {path}")
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from None
        net = TestbedArcFace()
        try:
            net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        except RuntimeError as exc:
            raise ModelLoadError(f"{path}: weights do not match the testbed encoder ({str(exc)[:200]})") from None
        return cls(net)

    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable: x (N, 3, H, W) in [-1, 1] -> unit embeddings (N, 512)."""
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="area")
        return F.normalize(self.net(x).float(), dim=1)

    @torch.no_grad()
    def encode(self, images, batch_size: int = 512) -> torch.Tensor:
        arrs = as_image_batch(images)
        out = []
        for i in range(0, len(arrs), batch_size):
            chunk = arrs[i:i + batch_size]
            if len({a.shape for a in chunk}) == 1:
                x = torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2).float()
                out.append(self.encode_tensor(x.sub_(127.5).div_(127.5)))
            else:  # mixed sizes: one at a time
                out += [self.encode_tensor(torch.from_numpy(a).permute(2, 0, 1)[None].float().sub(127.5).div(127.5))
                        for a in chunk]
        return torch.cat(out)


def load_encoder(spec="demo", **kwargs) -> IdentityEncoder:
    """`"demo"`: the testbed encoder shipped with the package; a path to an insightface-format
    ArcFace `.onnx` (or a folder holding one): the real encoder, run with ONNX Runtime."""
    if isinstance(spec, IdentityEncoder):
        return spec
    if spec == "demo":
        from fastforget.testbed import weights_dir

        return TestbedEncoder.from_file(weights_dir() / "encoder.safetensors")
    path = Path(spec)
    if path.suffix == ".safetensors":
        return TestbedEncoder.from_file(path)
    from fastforget.identity.arcface import ArcFaceOnnxEncoder

    return ArcFaceOnnxEncoder.load(path, **kwargs)
