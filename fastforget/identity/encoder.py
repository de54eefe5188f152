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


def image_label(name: str, i: int, item) -> str:
    """How an error names one image: `targets[2] (photos/ann.jpg)`."""
    return f"{name}[{i}]" + (f" ({item})" if isinstance(item, (str, os.PathLike)) else "")


def as_image_batch(images, name: str = "images", with_labels: bool = False):
    """Normalise images to a list of uint8 (H, W, 3) arrays (and, with `with_labels`, the label that
    names each one in errors: its index and file name).

    Accepts a uint8 array (N, H, W, 3) or (H, W, 3), floats in [0, 1], or a list of paths / PIL
    images / arrays. 8-bit RGB, greyscale and palette files are converted to RGB; 16-bit / float
    files, images below MIN_SIDE pixels a side and empty arrays are refused (never clipped)."""
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
    out, labels = [], []
    for i, item in enumerate(items):
        label = image_label(name, i, item)
        if isinstance(item, (str, os.PathLike)):
            try:
                is_file = Path(item).is_file()
            except OSError as exc:  # a name too long for the file system, a folder that cannot be searched
                raise InputError(f"{label}: {exc.strerror or exc}") from None
            if not is_file:
                raise InputError(f"{label}: no such image file")
            try:
                with Image.open(item) as im:
                    im.load()
                    item = _pil_to_rgb(im, label)
            except InputError:
                raise
            except Exception as exc:  # PIL raises several types for unreadable files
                raise InputError(f"{label}: cannot read image: {exc}") from None
        elif isinstance(item, Image.Image):
            item = _pil_to_rgb(item, label)
        try:
            arr = np.asarray(item)
        except (TypeError, ValueError, OverflowError):  # ragged nested lists, objects numpy cannot hold
            raise InputError(f"{label}: expected an (H, W, 3) RGB image, got {type(item).__name__}") from None
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise InputError(f"{label}: expected an (H, W, 3) RGB image, got shape {arr.shape}")
        if min(arr.shape[:2]) < MIN_SIDE:
            raise InputError(f"{label}: {arr.shape[1]}x{arr.shape[0]} pixels is too small to hold a face "
                             f"(at least {MIN_SIDE}x{MIN_SIDE})")
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1:
                arr = (arr * 255 + 0.5).astype(np.uint8)
            else:
                raise InputError(f"{label}: expected uint8 pixels (or floats in [0, 1]), got {arr.dtype}")
        out.append(np.ascontiguousarray(arr))
        labels.append(label)
    if not out:
        raise InputError(f"{name}: no images given")
    return (out, labels) if with_labels else out


MIN_SIDE = 16  # the testbed's faces are 32 px; nothing smaller holds a recognisable face


def _pil_to_rgb(im, label: str) -> np.ndarray:
    # modes "I;16", "I", "F" hold more than 8 bits: PIL's convert("RGB") clips them to white
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        raise InputError(f"{label}: {im.mode} images ({'16-bit' if '16' in im.mode else '32-bit'} greyscale) are "
                         "not supported; save it as 8-bit RGB")
    return np.asarray(im.convert("RGB"))


class IdentityEncoder(abc.ABC):
    """The contract every identity encoder implements (testbed network, insightface ArcFace ONNX).

    - `encode(images, name=...)`: uint8 (N, H, W, 3), paths or PIL images -> float32 (N, 512), unit
      norm. Errors name the offending image by `name[i]` and file name.
    - `encode_tensor(x)`: generated images, float (N, 3, H, W) in [-1, 1] -> (N, 512) unit norm.
      Differentiable when `differentiable` is True (the testbed network); otherwise computed
      without gradients (ONNX Runtime).
    - `fingerprint()`: a hash of the weights, so caches keyed by it follow the encoder."""

    embedding_dim: int = EMBED_DIM
    name: str = "encoder"
    differentiable: bool = False

    @abc.abstractmethod
    def encode(self, images, name: str = "images") -> torch.Tensor:
        """images: uint8 (N, H, W, 3), or a list of paths / PIL images / arrays."""

    @abc.abstractmethod
    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (N, 3, H, W) in [-1, 1] (what generators return) -> (N, 512) unit norm."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Stable hash of the weights (hex)."""

    def __call__(self, images) -> torch.Tensor:
        return self.encode(images)


class TestbedEncoder(IdentityEncoder):
    """The testbed's ArcFace-style network (32x32 faces). Images of any size are area-resized."""

    name = "testbed-arcface"
    differentiable = True

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

    def fingerprint(self) -> str:
        from fastforget.models.registry import module_fingerprint

        return module_fingerprint(self.net)

    @torch.no_grad()
    def encode(self, images, name: str = "images", batch_size: int = 512) -> torch.Tensor:
        from fastforget.models.common import check_int

        check_int(batch_size, "batch_size")
        arrs = as_image_batch(images, name=name)
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
    if isinstance(spec, str) and spec == "demo":
        from fastforget.testbed import weights_dir

        _check_encoder_options(kwargs, {})
        return TestbedEncoder.from_file(weights_dir() / "encoder.safetensors")
    if not isinstance(spec, (str, os.PathLike)):
        raise InputError(f"encoder: expected 'demo', a path to an ArcFace .onnx, or an IdentityEncoder; got "
                         f"{type(spec).__name__}")
    path = Path(spec)
    try:
        path.exists()
    except OSError as exc:  # a name too long for the file system, a folder that cannot be searched
        raise ModelLoadError(f"encoder {path}: {exc.strerror or exc}") from None
    if path.suffix == ".safetensors":
        _check_encoder_options(kwargs, {})
        return TestbedEncoder.from_file(path)
    from fastforget.identity.arcface import ArcFaceOnnxEncoder

    _check_encoder_options(kwargs, {"providers": None, "det_size": 640})
    return ArcFaceOnnxEncoder.load(path, **kwargs)


def _check_encoder_options(kwargs: dict, known: dict) -> None:
    """load_encoder's options: only those the encoder takes, with usable values."""
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise InputError(f"load_encoder: option(s) {unknown} do not apply here (it takes: "
                         f"{', '.join(known) or 'none'})")
    prov = kwargs.get("providers")
    if prov is not None and (not isinstance(prov, (list, tuple)) or not all(isinstance(p, str) for p in prov)):
        raise InputError(f"providers: expected a list of ONNX Runtime provider names, got {prov!r}")
    if "det_size" in kwargs:
        from fastforget.models.common import check_int

        check_int(kwargs["det_size"], "det_size", 32, 4096)


_DEMO_ENCODER: list = []


def resolve_encoder(encoder, model, what: str) -> IdentityEncoder:
    """The caller's encoder; on the testbed (loaded as "demo") its own encoder by default. Any other model
    needs the caller's: there is no silent fallback to the testbed's network."""
    if encoder is not None:
        return load_encoder(encoder)
    if getattr(model, "is_testbed", False):
        if not _DEMO_ENCODER:
            _DEMO_ENCODER.append(load_encoder("demo"))
        return _DEMO_ENCODER[0]
    raise InputError(f"encoder: {what} on {getattr(model, 'source', None) or type(model).__name__} needs the identity "
                     "encoder the model was trained with; pass encoder=ff.load_encoder('path/to/arcface.onnx') "
                     "(the testbed's encoder is the default only for ff.load('demo'))")
