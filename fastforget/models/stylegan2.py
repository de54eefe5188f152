"""StyleGAN2 family adapter (`stylegan2`): rosinality/stylegan2-pytorch's `Generator` in plain torch.

The modules below carry rosinality's state-dict names and shapes (`style.{1..n_mlp}`, `input.input`,
`conv1.conv.weight` [1, out, in, 3, 3], `conv1.conv.modulation`, `conv1.noise.weight`,
`conv1.activate.bias`, `to_rgb1`, `convs.{i}`, `to_rgbs.{i}`, blur kernels and `noises.noise_{i}`
buffers), and compute what its CPU branches compute (`upfirdn2d_native`, the CPU `fused_leaky_relu`)
with no CUDA extension to compile. Modulated convolutions run rosinality's unfused form (style on the
input, one convolution with the shared weight, demodulation on the output): the same numbers as its
grouped form up to float rounding, and several times faster on CPU batches.

What loads (`ff.load(path)`):
- `{"g_ema": state_dict, "latent_avg"?: w}` as rosinality's `convert_weight.py` writes, a training
  checkpoint `{"g", "d", "g_ema", "g_optim", "d_optim", "args", ...}` (g_ema is used), or a bare
  generator state dict; read with `torch.load(weights_only=True)`, so no code in the file runs.
  size, style_dim, n_mlp and the channel widths are read from the tensor shapes.
- a folder written by `StyleGAN2Model.save_pretrained` (safetensors + fastforget.json).
- NVlabs `.pkl` only with `allow_pickle=True`: unpickling runs code stored in the file.
- the built-in testbed `"demo-gan"` (fastforget/testbed/weights/gan, trained by
  `python -m fastforget.testbed.train_gan`).

Latent conventions: z (N, style_dim) ~ N(0, I); w = mapping(z) (N, style_dim); W+ (N, n_latent,
style_dim), one w per style input, n_latent = 2·log2(size) − 2. Synthesis uses the stored noise
buffers (rosinality's randomize_noise=False), so an image is a deterministic function of W+.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastforget.errors import InputError, ModelLoadError, UnsafeCheckpointError
from fastforget.models.registry import MANIFEST, read_manifest, register_adapter, register_builtin

FAMILY = "stylegan2"
WEIGHTS = "generator.safetensors"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl")
# GUIDE's distances (UFO target d = 30, adjacency steps alpha up to 15, norms over the whole W+ tensor)
# are taken as those of a generator whose samples lie about this far from w_avg; `w_scale` rescales them.
GUIDE_W_DISTANCE = 30.0
W_STATS_SAMPLES = 4096  # mapped z behind w_avg (when the file has none) and the W spread
W_STATS_SEED = 0
DEFAULT_BLUR = (1, 3, 3, 1)


# ---------------------------------------------------------------- ops (rosinality's CPU branches)
def make_kernel(k) -> torch.Tensor:
    """Separable FIR taps -> normalised 2-D kernel (sums to 1)."""
    k = torch.as_tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative values crop), convolve with `kernel` (a true
    convolution: the flipped kernel is correlated), keep every `down`-th pixel. x: (N, C, H, W);
    pad: (p0, p1) for both axes or (x0, x1, y0, y1). rosinality's `upfirdn2d_native`, in NCHW."""
    px0, px1, py0, py1 = (pad[0], pad[1], pad[0], pad[1]) if len(pad) == 2 else pad
    n, c, h, w = x.shape
    if up > 1:  # (n, c, h, 1, w, 1): zeros after every pixel along both axes
        x = F.pad(x.reshape(n, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(n, c, h * up, w * up)
    x = F.pad(x, (max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)))
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    kh, kw = kernel.shape
    # one depthwise convolution (groups=c): CPU backends run it ~10x faster than rosinality's (n·c, 1, h, w) form
    taps = torch.flip(kernel, [0, 1]).to(x.dtype).reshape(1, 1, kh, kw).expand(c, 1, kh, kw).contiguous()
    return F.conv2d(x, taps, groups=c)[:, :, ::down, ::down]


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor | None = None, negative_slope: float = 0.2,
                     scale: float = 2 ** 0.5) -> torch.Tensor:
    """leaky_relu(x + bias) · √2, bias broadcast along dim 1 (rosinality's CPU `fused_leaky_relu`)."""
    if bias is not None:
        x = x + bias.view(1, bias.shape[0], *([1] * (x.ndim - 2)))
    return F.leaky_relu(x, negative_slope) * scale


# ---------------------------------------------------------------- modules (rosinality's names)
class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class Upsample(nn.Module):
    def __init__(self, kernel, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor ** 2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class Blur(nn.Module):
    def __init__(self, kernel, pad, upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * (upsample_factor ** 2 if upsample_factor > 1 else 1))
        self.pad = pad

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


class EqualLinear(nn.Module):
    """Equalised-learning-rate linear layer: weights stored divided by lr_mul, scaled at run time."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x):
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated (and demodulated) convolution; with `upsample`, a stride-2 transposed
    convolution followed by the blur, as rosinality does it."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, blur_kernel=DEFAULT_BLUR):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)

    def forward(self, x, style):
        batch = x.shape[0]
        weight = self.scale * self.weight.squeeze(0)  # (out, in, k, k), shared by the batch
        style = self.modulation(style)  # (batch, in)
        x = x * style.reshape(batch, self.in_channel, 1, 1)
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, weight.transpose(0, 1), padding=0, stride=2))
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:  # 1/‖W·s‖ per output channel: Σ_in s² Σ_k W² as one (batch,in)@(in,out) product
            dcoefs = (style.square() @ weight.square().sum((2, 3)).t() + 1e-8).rsqrt()
            out = out * dcoefs.reshape(batch, self.out_channel, 1, 1)
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image, noise=None):
        if noise is None:
            noise = image.new_empty(image.shape[0], 1, image.shape[2], image.shape[3]).normal_()
        return image + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, latent):
        return self.input.expand(latent.shape[0], -1, -1, -1)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))

    def forward(self, x):
        return fused_leaky_relu(x, self.bias)


class StyledConv(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, style_dim, upsample=False, blur_kernel=DEFAULT_BLUR):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample,
                                    blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x, style, noise=None):
        return self.activate(self.noise(self.conv(x, style), noise=noise))


class ToRGB(nn.Module):
    def __init__(self, in_channel, style_dim, upsample=True, blur_kernel=DEFAULT_BLUR):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias
        return out + self.upsample(skip) if skip is not None else out


def default_channels(channel_multiplier: int = 2) -> dict:
    """rosinality's widths by resolution."""
    cm = channel_multiplier
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm, 512: 32 * cm,
            1024: 16 * cm}


class Generator(nn.Module):
    """rosinality's Generator (same state-dict keys and shapes). `channels` overrides the widths
    by resolution (the testbed's are narrower); `forward(w_plus)` is the synthesis network."""

    def __init__(self, size: int, style_dim: int, n_mlp: int, channel_multiplier: int = 2,
                 blur_kernel=DEFAULT_BLUR, lr_mlp: float = 0.01, channels: dict | None = None):
        super().__init__()
        log_size = int(round(math.log2(size))) if size > 0 else 0
        if 2 ** log_size != size or size < 8:
            raise InputError(f"size: expected a power of two >= 8, got {size}")
        self.size, self.style_dim, self.n_mlp, self.lr_mlp = size, style_dim, n_mlp, lr_mlp
        self.channel_multiplier, self.blur_kernel = channel_multiplier, tuple(blur_kernel)
        self.channels = {int(k): int(v) for k, v in (channels or default_channels(channel_multiplier)).items()}
        missing = [2 ** i for i in range(2, log_size + 1) if 2 ** i not in self.channels]
        if missing:
            raise InputError(f"channels: no width for resolution(s) {missing}")
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True)
                                                  for _ in range(n_mlp)])
        ch = self.channels
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)
        self.log_size = log_size
        self.num_layers = (log_size - 2) * 2 + 1
        self.convs, self.upsamples, self.to_rgbs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):
            res = (i + 5) // 2
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, 2 ** res, 2 ** res))
        in_channel = ch[4]
        for i in range(3, log_size + 1):
            out_channel = ch[2 ** i]
            self.convs.append(StyledConv(in_channel, out_channel, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, style_dim, blur_kernel=blur_kernel))
            in_channel = out_channel
        self.n_latent = log_size * 2 - 2

    def config(self) -> dict:
        return {"size": self.size, "style_dim": self.style_dim, "n_mlp": self.n_mlp,
                "channel_multiplier": self.channel_multiplier, "lr_mlp": self.lr_mlp,
                "blur_kernel": list(self.blur_kernel), "channels": {str(k): v for k, v in sorted(self.channels.items())
                                                                   if k <= self.size}}

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        return self.style(z)

    def stored_noise(self) -> list:
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def forward(self, latent: torch.Tensor, noise=None) -> torch.Tensor:
        """W+ (N, n_latent, style_dim) -> images (N, 3, size, size), nominally in [-1, 1]. noise: None uses
        the stored buffers; a list gives one tensor (or None = fresh random) per layer."""
        noise = self.stored_noise() if noise is None else noise
        out = self.conv1(self.input(latent), latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, noise1, noise2, to_rgb in zip(self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2],
                                                         self.to_rgbs):
            out = conv1(out, latent[:, i], noise=noise1)
            out = conv2(out, latent[:, i + 1], noise=noise2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip


# ---------------------------------------------------------------- the model object
def _random_z(n: int, dim: int, seed: int) -> torch.Tensor:
    """Image i's z comes from seed + i, so a batch and its parts give the same images."""
    return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


class StyleGAN2Model(nn.Module):
    """A StyleGAN2 generator with its mean latent. Parameters are named `generator.<rosinality key>`
    (what patches of the synthesis network name, e.g. `generator.convs.3.conv.weight`).

    `w_spread` is the median ‖w − w_avg‖ of mapped z (one style_dim vector), so a typical W+ lies
    w_spread·√n_latent from w_avg in the norm over the whole W+ tensor, the norm GUIDE's formulas use.
    `w_scale` = w_spread·√n_latent / 30 turns GUIDE's distances (UFO d = 30, adjacency α ≤ 15, chosen
    for a generator whose samples lie about 30 from w_avg) into this model's: use d·w_scale, α·w_scale."""

    family = FAMILY
    is_testbed = False  # True only when loaded by its built-in name ("demo-gan")

    def __init__(self, generator: Generator, w_avg: torch.Tensor | None = None, source: str | None = None):
        super().__init__()
        self.generator = generator.eval().requires_grad_(False)
        self.source = source
        with torch.no_grad():  # W statistics from a fixed set of z: w_avg (unless the file has it), the spread
            z = _random_z(W_STATS_SAMPLES, generator.style_dim, W_STATS_SEED).to(self._param_device())
            ws = torch.cat([generator.mapping(c) for c in z.split(1024)]).float().cpu()
            w_avg = ws.mean(0) if w_avg is None else torch.as_tensor(w_avg).detach().float().reshape(-1).cpu()
            self.w_spread = float((ws - w_avg).norm(dim=1).median())
        self.register_buffer("w_avg", w_avg.to(self._param_device()))

    def _param_device(self):
        return next(self.generator.parameters()).device

    # ------------------------------------------------------------ shape facts
    @property
    def device(self):
        return self._param_device()

    @property
    def dtype(self):
        return next(self.generator.parameters()).dtype

    @property
    def style_dim(self) -> int:
        return self.generator.style_dim

    @property
    def n_latent(self) -> int:
        return self.generator.n_latent

    @property
    def size(self) -> int:
        return self.generator.size

    @property
    def resolution(self) -> int:
        return self.generator.size

    @property
    def w_scale(self) -> float:
        return self.w_spread * math.sqrt(self.n_latent) / GUIDE_W_DISTANCE

    def components(self) -> dict:
        """The modules a patch may edit, by name prefix."""
        return {"generator": self.generator}

    def fingerprint(self) -> str:
        from fastforget.models.registry import module_fingerprint

        return module_fingerprint(self.generator)

    # ------------------------------------------------------------ latents and images
    def _latent(self, value, name: str, allow_plus: bool) -> torch.Tensor:
        """A finite float tensor (N, style_dim) [or W+ (N, n_latent, style_dim)] on the model's device."""
        if isinstance(value, np.ndarray):
            if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)) \
                    or value.dtype == np.bool_:
                raise InputError(f"{name}: expected a float array, got dtype {value.dtype}")
            value = torch.from_numpy(np.asarray(value, np.float32))
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{name}: expected a tensor or array, got {type(value).__name__}")
        if value.dtype == torch.bool or value.is_complex():
            raise InputError(f"{name}: expected real numbers, got {value.dtype}")
        d, L = self.style_dim, self.n_latent
        shapes = f"(N, {d})" + (f" or W+ (N, {L}, {d})" if allow_plus else "")
        ok = (value.ndim == 2 and value.shape[1] == d) or (allow_plus and value.ndim == 3 and value.shape[1:] == (L, d))
        if not ok or value.shape[0] == 0:
            raise InputError(f"{name}: expected shape {shapes} with N >= 1, got {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise InputError(f"{name}: contains NaN or inf")
        return value.to(self.device, self.dtype)

    def mapping(self, z) -> torch.Tensor:
        """z (N, style_dim) -> w (N, style_dim); differentiable."""
        return self.generator.mapping(self._latent(z, "z", allow_plus=False))

    def synthesis(self, w_plus) -> torch.Tensor:
        """W+ (N, n_latent, style_dim) (or w (N, style_dim), repeated) -> images (N, 3, size, size),
        nominally in [-1, 1] and not clamped; differentiable in W+ and in the synthesis weights.
        Noise: the stored buffers."""
        if isinstance(w_plus, torch.Tensor) and w_plus.requires_grad:  # an optimised latent: check shape only
            if w_plus.ndim not in (2, 3) or w_plus.shape[-1] != self.style_dim or \
                    (w_plus.ndim == 3 and w_plus.shape[1] != self.n_latent):
                raise InputError(f"w_plus: expected (N, {self.n_latent}, {self.style_dim}) or (N, {self.style_dim}), "
                                 f"got {tuple(w_plus.shape)}")
        else:
            w_plus = self._latent(w_plus, "w_plus", allow_plus=True)
        if w_plus.ndim == 2:
            w_plus = w_plus[:, None].expand(-1, self.n_latent, -1)
        return self.generator(w_plus)

    forward = synthesis

    @torch.no_grad()
    def generate_tensor(self, w_plus, batch_size: int = 64) -> torch.Tensor:
        """Images (N, 3, size, size) in [-1, 1] (clamped) from W+ or w; no gradients."""
        from fastforget.models.common import check_int

        check_int(batch_size, "batch_size")
        w_plus = self._latent(w_plus, "w_plus", allow_plus=True)
        return torch.cat([self.synthesis(c).float().clamp(-1, 1) for c in w_plus.split(batch_size)])

    def latents(self, z=None, *, w=None, seed=0, n: int | None = None, truncation: float = 1.0) -> torch.Tensor:
        """The W+ that `generate` renders: from z (mapped), w / W+, or n random z (image i from seed + i);
        truncation ψ pulls towards w_avg: w_avg + ψ (w − w_avg)."""
        from fastforget.models.common import check_float, check_int, check_seed

        truncation = check_float(truncation, "truncation", 0.0)
        if truncation > 1.0:
            raise InputError(f"truncation: must be in [0, 1] (1 = none), got {truncation}")
        if z is not None and w is not None:
            raise InputError("z, w: give one of them, not both")
        if n is not None:
            n = check_int(n, "n", 1, 100_000)
        given = z if z is not None else w
        if given is None:
            n = 1 if n is None else n
            seed = check_seed(seed, n)
            with torch.no_grad():
                w_plus = self.generator.mapping(_random_z(n, self.style_dim, seed).to(self.device, self.dtype))
        else:
            name = "z" if z is not None else "w"
            t = self._latent(given, name, allow_plus=z is None)
            if n is not None and n != t.shape[0]:
                raise InputError(f"n: {n} does not match the {t.shape[0]} latent(s) given in {name}")
            with torch.no_grad():
                w_plus = self.generator.mapping(t) if z is not None else t
        if w_plus.ndim == 2:
            w_plus = w_plus[:, None].expand(-1, self.n_latent, -1)
        if truncation != 1.0:
            w_plus = self.w_avg + truncation * (w_plus - self.w_avg)
        return w_plus

    def generate(self, z=None, *, w=None, seed=0, n: int | None = None, truncation: float = 1.0,
                 output_type: str = "pil", batch_size: int = 64):
        """Images from z (N, style_dim), or w (N, style_dim) / W+ (N, n_latent, style_dim), or with
        neither n random z from `seed`; diffusers' output_type: "pil" (list of PIL images), "np" (float32
        NHWC in [0, 1]), "pt" (float32 NCHW in [0, 1])."""
        from fastforget.models.common import OUTPUT_TYPES, format_images

        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        w_plus = self.latents(z, w=w, seed=seed, n=n, truncation=truncation)
        return format_images(self.generate_tensor(w_plus, batch_size=batch_size), output_type)

    # ------------------------------------------------------------ inversion
    def image_tensor(self, images, name: str = "images") -> torch.Tensor:
        """Photos (uint8 arrays / PIL / paths, any size) or float tensors (N, 3, H, W) in [-1, 1] ->
        (N, 3, size, size) in [-1, 1] on the model's device, area-resized (bilinear when enlarging)."""
        if isinstance(images, torch.Tensor):
            x = images.detach()
            if x.ndim == 3:
                x = x[None]
            if not x.is_floating_point() or x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
                raise InputError(f"{name}: a tensor must be float (N, 3, H, W) in [-1, 1], got {x.dtype} "
                                 f"{tuple(images.shape)}")
            if not torch.isfinite(x).all():
                raise InputError(f"{name}: contains NaN or inf")
            if x.min() < -1.001 or x.max() > 1.001:
                raise InputError(f"{name}: tensor values must be in [-1, 1] (images as generators return them), got "
                                 f"[{x.min().item():.3g}, {x.max().item():.3g}]")
            xs = [x.float().cpu()]
        else:
            from fastforget.identity.encoder import as_image_batch

            xs = [torch.as_tensor(np.array(a)).permute(2, 0, 1)[None].float().div(127.5).sub(1) for a in  # copy: read-only input
                  as_image_batch(images, name=name)]
        out = []
        for x in xs:
            if x.shape[-2:] != (self.size, self.size):
                mode = "area" if min(x.shape[-2:]) >= self.size else "bilinear"
                x = F.interpolate(x, size=(self.size, self.size), mode=mode,
                                  **({"align_corners": False} if mode == "bilinear" else {}))
            out.append(x)
        return torch.cat(out).clamp(-1, 1).to(self.device, self.dtype)

    def invert(self, images, *, encoder=None, steps: int = 300, seed=0, progress: bool = True, lr: float = 0.1,
               id_weight: float = 0.3, batch_size: int = 32) -> torch.Tensor:
        """W+ (N, n_latent, style_dim) whose images reproduce `images`: Adam on W+ from w_avg, loss =
        pixel MSE + id_weight · (1 − cos) of `encoder.encode_tensor` embeddings when an encoder is given.
        lr is in units of W's per-dimension spread (rosinality's projector: lr 0.1, ramped, with
        latent noise fading out over the first 3/4 of the steps, drawn from seed + i for image i, so
        an image's result does not depend on the batch it is in)."""
        from tqdm import tqdm

        from fastforget.models.common import check_float, check_int, check_seed

        steps = check_int(steps, "steps", 1, 100_000)
        lr = check_float(lr, "lr", 0.0)
        id_weight = check_float(id_weight, "id_weight", 0.0)
        batch_size = check_int(batch_size, "batch_size")
        if not isinstance(progress, bool):
            raise InputError(f"progress: expected True or False, got {progress!r}")
        if encoder is not None:
            from fastforget.identity.encoder import IdentityEncoder, load_encoder

            encoder = load_encoder(encoder) if not isinstance(encoder, IdentityEncoder) else encoder
            if not encoder.differentiable:
                raise InputError(f"encoder: {encoder.name} gives no gradients (ONNX Runtime); invert's identity "
                                 "loss needs a differentiable encoder; pass encoder=None for the pixel loss alone")
        x = self.image_tensor(images)
        seed = check_seed(seed, len(x))
        step_size = lr * self.w_spread / math.sqrt(self.style_dim)  # per-dimension units
        out = []
        bar = tqdm(total=steps * math.ceil(len(x) / batch_size), desc="invert", disable=not progress, leave=False)
        for start in range(0, len(x), batch_size):
            out.append(self._invert_batch(x[start:start + batch_size], encoder, steps, seed + start, step_size,
                                          id_weight, bar))
        bar.close()
        return torch.cat(out)

    def _invert_batch(self, x, encoder, steps, seed, step_size, id_weight, bar) -> torch.Tensor:
        n = len(x)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        w = self.w_avg.detach().float()[None, None].repeat(n, self.n_latent, 1).to(self.device).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=step_size, betas=(0.9, 0.999))
        target_emb = None
        if encoder is not None and id_weight > 0:
            with torch.no_grad():
                target_emb = encoder.encode_tensor(x.float())
        noise_scale = self.w_spread / math.sqrt(self.style_dim) * 0.05
        for step in range(steps):
            t = step / steps
            ramp = min(1.0, (1 - t) / 0.25)  # rosinality's projector: cosine ramp-down, linear ramp-up
            ramp = 0.5 - 0.5 * math.cos(ramp * math.pi) if ramp < 1 else 1.0
            for g in opt.param_groups:
                g["lr"] = step_size * ramp * min(1.0, t / 0.05)
            strength = noise_scale * max(0.0, 1 - t / 0.75) ** 2
            jitter = torch.stack([torch.randn(self.n_latent, self.style_dim, generator=g) for g in gens]) * strength
            img = self.generator(w + jitter.to(w.device, w.dtype))
            loss = F.mse_loss(img.float(), x.float(), reduction="none").mean((1, 2, 3)).sum()
            if target_emb is not None:
                emb = encoder.encode_tensor(img.float().clamp(-1, 1))
                loss = loss + id_weight * (1 - (emb * target_emb).sum(1)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
        return w.detach().float().cpu()

    # ------------------------------------------------------------ persistence
    def save_pretrained(self, directory, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
        """Folder with generator.safetensors (rosinality's g_ema keys + `latent_avg`) and fastforget.json
        (family, config); written to a temporary folder and renamed into place. dtype: e.g.
        torch.float16 to halve the file (loading returns float32)."""
        from safetensors.torch import save_file

        from fastforget.io import atomic_directory

        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InputError(f"dtype: expected torch.float32, float16 or bfloat16, got {dtype!r}")
        state = {k: v.detach().cpu().contiguous() for k, v in self.generator.state_dict().items()}
        state["latent_avg"] = self.w_avg.detach().float().cpu().contiguous()
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            save_file(state, str(tmp / WEIGHTS), metadata={"format": "rosinality-stylegan2-g_ema"})
            (tmp / MANIFEST).write_text(json.dumps({"family": FAMILY, "weights": WEIGHTS, "source": self.source,
                                                    **self.generator.config()}, indent=2))
        return Path(directory)

    def clone(self, only=None) -> "StyleGAN2Model":
        """A copy whose weights can be edited without touching this model; with `only` (qualified names,
        `generator.…`), every other tensor is shared with this model instead of copied."""
        from fastforget.models.arc2face import share_copy

        m = StyleGAN2Model.__new__(StyleGAN2Model)
        nn.Module.__init__(m)
        m.generator = share_copy(self.generator, "generator", only)
        m.source, m.w_spread = self.source, self.w_spread
        m.register_buffer("w_avg", self.w_avg.clone())
        m.is_testbed = getattr(self, "is_testbed", False)
        return m

    def __repr__(self):
        return (f"StyleGAN2Model(size={self.size}, style_dim={self.style_dim}, n_mlp={self.generator.n_mlp}, "
                f"n_latent={self.n_latent}, source={self.source!r})")


# ---------------------------------------------------------------- loading
_STYLE_KEY = re.compile(r"^style\.(\d+)\.weight$")


def config_from_state(state: dict, where) -> dict:
    """size, style_dim, n_mlp and channel widths read from the shapes of a g_ema state dict."""
    try:
        n_mlp = len([k for k in state if _STYLE_KEY.match(k)])
        style_dim = int(state["conv1.conv.modulation.weight"].shape[1])
        n_rgbs = len({k.split(".")[1] for k in state if k.startswith("to_rgbs.")})
        size = 2 ** (n_rgbs + 2)
        channels = {4: int(state["input.input"].shape[1])}
        for i in range(n_rgbs):
            channels[2 ** (i + 3)] = int(state[f"convs.{2 * i}.conv.weight"].shape[1])
        blur = state.get("to_rgbs.0.upsample.kernel")
    except KeyError as exc:
        raise ModelLoadError(f"{where}: not a rosinality StyleGAN2 generator (missing {exc.args[0]!r})") from None
    except (AttributeError, IndexError, TypeError):
        raise ModelLoadError(f"{where}: not a rosinality StyleGAN2 generator (unexpected tensor shapes)") from None
    if n_mlp == 0 or n_rgbs == 0:
        raise ModelLoadError(f"{where}: not a rosinality StyleGAN2 generator (no style.N.weight / to_rgbs.N keys)")
    cm = None
    for m in (1, 2, 4):
        std = default_channels(m)
        if all(std.get(r) == c for r, c in channels.items()):
            cm = m
            break
    cfg = {"size": size, "style_dim": style_dim, "n_mlp": n_mlp, "channel_multiplier": cm or 2,
           "channels": channels}
    if isinstance(blur, torch.Tensor):  # rosinality always blurs with [1, 3, 3, 1]
        ref = make_kernel(DEFAULT_BLUR) * 4
        if blur.shape != ref.shape or not torch.allclose(blur.float(), ref, atol=1e-6):
            raise ModelLoadError(f"{where}: blur kernel differs from StyleGAN2's [1, 3, 3, 1]; not supported")
    return cfg


def generator_from_state(state: dict, where, config: dict | None = None) -> Generator:
    cfg = dict(config or config_from_state(state, where))
    try:
        channels = {int(k): int(v) for k, v in cfg["channels"].items()} if cfg.get("channels") else None
        with torch.device("meta"):  # no random init: the file's tensors are assigned
            gen = Generator(int(cfg["size"]), int(cfg["style_dim"]), int(cfg["n_mlp"]),
                            channel_multiplier=int(cfg.get("channel_multiplier") or 2),
                            lr_mlp=float(cfg.get("lr_mlp", 0.01)), channels=channels,
                            blur_kernel=tuple(cfg.get("blur_kernel", DEFAULT_BLUR)))
    except (InputError, KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: invalid StyleGAN2 config ({exc})") from None
    own = gen.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state))
    fixed = [k for k in missing if k.endswith(".kernel")]  # blur kernels are constants: rebuild them
    missing = [k for k in missing if k not in fixed]
    if unexpected or missing:
        raise ModelLoadError(f"{where}: tensors do not fit a StyleGAN2 generator of size {gen.size} "
                             f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    bad = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ModelLoadError(f"{where}: tensor {bad[0]!r} has shape {tuple(state[bad[0]].shape)}, expected "
                             f"{tuple(own[bad[0]].shape)}")
    full = {k: (state[k].float() if state[k].is_floating_point() else state[k]) for k in state}
    for k in fixed:
        mod = gen.get_submodule(k.rsplit(".", 1)[0])
        full[k] = make_kernel(gen.blur_kernel) * (4 if isinstance(mod, (Upsample, Blur)) else 1)
    gen.load_state_dict(full, assign=True)
    return gen


def _check_finite(gen: Generator, w_avg, where, allow_nonfinite: bool) -> None:
    if allow_nonfinite:
        return
    for name, t in list(gen.named_parameters()) + list(gen.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelLoadError(f"{where}: weight {name!r} contains NaN or inf (pass allow_nonfinite=True to load it "
                                 "anyway)")
    if w_avg is not None and not torch.isfinite(w_avg).all():
        raise ModelLoadError(f"{where}: latent_avg contains NaN or inf (pass allow_nonfinite=True to load it anyway)")


def _torch_load(path: Path):
    """Plain tensors and containers only (weights_only): no code in the file runs. rosinality's training
    checkpoints hold an argparse.Namespace (`args`), which is allowed as data."""
    import argparse
    import zipfile

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot be read as a torch checkpoint of plain tensors "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None


def _state_from_checkpoint(ckpt, where):
    if not isinstance(ckpt, dict):
        raise ModelLoadError(f"{where}: expected a dict ({{'g_ema': ..., 'latent_avg': ...}} or a training "
                             f"checkpoint), got {type(ckpt).__name__}")
    if "g_ema" in ckpt:
        state, w_avg = ckpt["g_ema"], ckpt.get("latent_avg")
    elif "conv1.conv.weight" in ckpt:  # a bare generator state dict
        state, w_avg = {k: v for k, v in ckpt.items() if k != "latent_avg"}, ckpt.get("latent_avg")
    else:
        raise ModelLoadError(f"{where}: not a rosinality StyleGAN2 checkpoint (no 'g_ema' entry; keys: "
                             f"{sorted(map(str, ckpt))[:6]})")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{where}: 'g_ema' is not a state dict of tensors")
    if w_avg is not None and (not isinstance(w_avg, torch.Tensor) or not w_avg.is_floating_point()):
        raise ModelLoadError(f"{where}: 'latent_avg' is not a float tensor")
    return state, w_avg


def _load_pickle(path: Path, allow_pickle: bool):
    """NVlabs pickles unpickle by running code stored in the file (dnnlib persistence)."""
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path}: NVlabs .pkl files run code stored in them when unpickled; refusing. Convert it to a plain "
            "tensor file with rosinality/stylegan2-pytorch's convert_weight.py (python convert_weight.py --repo "
            "<stylegan2 repo> network.pkl -> {'g_ema', 'latent_avg'} .pt) and load the .pt, or pass "
            "allow_pickle=True if you trust the file")
    import importlib.util

    if importlib.util.find_spec("dnnlib") is None or importlib.util.find_spec("torch_utils") is None:
        raise ModelLoadError(f"{path}: unpickling an NVlabs .pkl needs NVlabs' dnnlib and torch_utils "
                             "(stylegan2-ada-pytorch / stylegan3) importable; or convert it with rosinality's "
                             "convert_weight.py and load the .pt")
    import pickle

    try:
        with open(path, "rb") as f:
            data = pickle.load(f)  # noqa: S301 (the caller opted in)
        g = data["G_ema"]
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot unpickle an NVlabs network ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
    lr_mlp = float(getattr(getattr(getattr(g, "mapping", None), "fc0", None), "bias_gain", 0.01))
    conv_clamp = [m.conv_clamp for m in g.modules() if getattr(m, "conv_clamp", None) is not None]
    if conv_clamp:
        import logging

        logging.getLogger("fastforget").warning("%s: conv_clamp=%s is dropped (rosinality's generator has none); "
                                                "outputs may differ where activations exceed it", path, conv_clamp[0])
    return nvlabs_to_rosinality({k: v for k, v in g.state_dict().items()}, path, lr_mlp)


def nvlabs_to_rosinality(sd: dict, where, lr_mlp: float = 0.01) -> tuple[dict, torch.Tensor | None]:
    """stylegan2-ada-pytorch / stylegan3-repo StyleGAN2 `G_ema.state_dict()` (unconditional, 'skip'
    architecture) -> rosinality g_ema keys and `mapping.w_avg`. Both store equalised weights the same
    way and compute the same images (checked against NVlabs' code on CPU: max |diff| ~2e-6)."""
    if any(k.startswith("mapping.embed") for k in sd):
        raise ModelLoadError(f"{where}: class-conditional networks are not supported")
    if any(".skip." in k for k in sd) or any(k.startswith("synthesis.input.") for k in sd):
        raise ModelLoadError(f"{where}: only StyleGAN2 generators with the 'skip' architecture are supported")
    try:
        out = {}
        n_mlp = len([k for k in sd if re.match(r"^mapping\.fc\d+\.weight$", k)])
        for i in range(n_mlp):
            out[f"style.{i + 1}.weight"] = sd[f"mapping.fc{i}.weight"]
            out[f"style.{i + 1}.bias"] = sd[f"mapping.fc{i}.bias"]
        res = sorted(int(m.group(1)) for k in sd if (m := re.match(r"^synthesis\.b(\d+)\.torgb\.weight$", k)))

        def layer(dst, src):
            out[f"{dst}.conv.weight"] = sd[f"{src}.weight"][None]
            out[f"{dst}.conv.modulation.weight"] = sd[f"{src}.affine.weight"]
            out[f"{dst}.conv.modulation.bias"] = sd[f"{src}.affine.bias"]
            out[f"{dst}.noise.weight"] = sd[f"{src}.noise_strength"].reshape(1)
            out[f"{dst}.activate.bias"] = sd[f"{src}.bias"]
            return sd[f"{src}.noise_const"][None, None]

        def rgb(dst, src):
            out[f"{dst}.conv.weight"] = sd[f"{src}.weight"][None]
            out[f"{dst}.conv.modulation.weight"] = sd[f"{src}.affine.weight"]
            out[f"{dst}.conv.modulation.bias"] = sd[f"{src}.affine.bias"]
            out[f"{dst}.bias"] = sd[f"{src}.bias"].reshape(1, -1, 1, 1)

        out["input.input"] = sd["synthesis.b4.const"][None]
        out["noises.noise_0"] = layer("conv1", "synthesis.b4.conv1")
        rgb("to_rgb1", "synthesis.b4.torgb")
        for i, r in enumerate(res[1:]):
            out[f"noises.noise_{2 * i + 1}"] = layer(f"convs.{2 * i}", f"synthesis.b{r}.conv0")
            out[f"noises.noise_{2 * i + 2}"] = layer(f"convs.{2 * i + 1}", f"synthesis.b{r}.conv1")
            rgb(f"to_rgbs.{i}", f"synthesis.b{r}.torgb")
    except KeyError as exc:
        raise ModelLoadError(f"{where}: not an NVlabs StyleGAN2 generator (missing {exc.args[0]!r})") from None
    if lr_mlp != 0.01:
        raise ModelLoadError(f"{where}: mapping lr_multiplier {lr_mlp} is not StyleGAN2's 0.01")
    return {k: v.detach().float().cpu() for k, v in out.items()}, sd.get("mapping.w_avg")


def load_stylegan2(path, allow_pickle: bool = False, allow_nonfinite: bool = False) -> StyleGAN2Model:
    """A rosinality checkpoint (.pt), a folder written by save_pretrained, or (opt-in) an NVlabs .pkl."""
    for flag, value in (("allow_pickle", allow_pickle), ("allow_nonfinite", allow_nonfinite)):
        if not isinstance(value, bool):
            raise InputError(f"{flag}: expected True or False, got {value!r}")
    root = Path(path)
    config = None
    if root.is_dir():
        meta = read_manifest(root)
        if meta is None or meta.get("family") != FAMILY:
            raise ModelLoadError(f"{root}: not a {FAMILY} folder ({MANIFEST} with family {FAMILY!r})")
        where = root / str(meta.get("weights", WEIGHTS))
        if not where.is_file():
            raise ModelLoadError(f"{where}: missing")
        from safetensors.torch import load_file

        try:
            state = load_file(str(where))
        except Exception as exc:
            raise ModelLoadError(f"{where}: unreadable ({str(exc)[:200]})") from None
        w_avg = state.pop("latent_avg", None)
        config = {k: meta[k] for k in ("size", "style_dim", "n_mlp", "channel_multiplier", "lr_mlp", "blur_kernel",
                                       "channels") if k in meta}
        inferred = config_from_state(state, where)
        for k in ("size", "style_dim", "n_mlp"):
            if k in config and config[k] != inferred[k]:
                raise ModelLoadError(f"{root / MANIFEST}: {k} = {config[k]!r} but the weights have {inferred[k]}")
        config = {**inferred, **{k: v for k, v in config.items() if k in ("lr_mlp", "channel_multiplier")}}
        source = meta.get("source") or str(root)
    elif root.is_file():
        where = root
        if root.suffix.lower() == ".pkl":
            state, w_avg = _load_pickle(root, allow_pickle)
        else:
            state, w_avg = _state_from_checkpoint(_torch_load(root), root)
        source = str(root)
    else:
        raise ModelLoadError(f"model not found: {root}")
    gen = generator_from_state(state, where, config)
    if w_avg is not None:
        w_avg = w_avg.float().reshape(-1)
        if w_avg.numel() != gen.style_dim:
            raise ModelLoadError(f"{where}: latent_avg has {w_avg.numel()} values, the generator's style_dim is "
                                 f"{gen.style_dim}")
    _check_finite(gen, w_avg, where, allow_nonfinite)
    return StyleGAN2Model(gen, w_avg, source=source)


def _detect(path: Path) -> bool:
    if path.is_dir():
        meta = read_manifest(path)
        return meta is not None and meta.get("family") == FAMILY
    return path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES


def _load_demo_gan(allow_nonfinite: bool = False):
    from fastforget.testbed import weights_dir

    folder = weights_dir() / "gan"
    if not (folder / MANIFEST).is_file():
        raise ModelLoadError(f"testbed GAN weights missing at {folder}: reinstall fastforget or run "
                             "python -m fastforget.testbed.train_gan")
    model = load_stylegan2(folder, allow_nonfinite=allow_nonfinite)
    model.source = "fastforget testbed (demo-gan)"
    return model


register_adapter(FAMILY, detect=_detect, load=load_stylegan2, model_types=(StyleGAN2Model,))
register_builtin("demo-gan", _load_demo_gan)
