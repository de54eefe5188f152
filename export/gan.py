"""ONNX export of an (erased) StyleGAN2 (family `stylegan2`): the mapping and the synthesis network.

    res = ff.erase(ff.load("ffhq.pt"), ["photo.png"], method="guide", encoder=enc)
    ff.export.to_onnx(res.model, "gan_onnx", patch=res.patch)        # a StyleGAN2Model: this branch
    from fastforget.export.gan import to_onnx_gan
    to_onnx_gan(res.model, "gan_onnx", patch=res.patch)                # the same, called directly

Two graphs, erased weights baked in (classic TorchScript exporter), dynamic batch, float32 inputs and
outputs (with fp16=True the weights and activations inside are float16):

- mapping.onnx    `z` (N, style_dim) -> `w` (N, style_dim): `StyleGAN2Model.mapping` (PixelNorm + MLP).
  GUIDE never edits it, but it ships with the synthesis so a serving stack needs nothing else.
- synthesis.onnx  `w_plus` (N, n_latent, style_dim) -> `images` (N, 3, size, size), nominally in
  [-1, 1] and unclamped, exactly `StyleGAN2Model.synthesis`: the per-layer noise is the checkpoint's
  stored noise buffers (rosinality's randomize_noise=False), constants of the graph, so an image is a
  deterministic function of W+ as it is in torch.

Truncation is done by the caller: w' = w_avg + psi (w - w_avg), with `w_avg` from the manifest (also in
w_avg.npy). `manifest.json` records family, size, style_dim, n_latent, w_avg, the patch (fingerprint,
method, tensors; the file itself is kept as patch.safetensors), the source checkpoint's sha256, the
TensorRT operator check and the ORT-vs-torch parity, checked at export on inputs the graphs were not
traced with: max |ORT - torch| <= 1e-4 · max(1, max |torch|) for float32 graphs, else ExportParityError
and nothing is written.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastforget.models.stylegan2 import fused_leaky_relu

from fastforget.errors import InputError

log = logging.getLogger("fastforget.export")

GAN_FORMAT = "fastforget.stylegan2-onnx/1"
GAN_PARITY_RTOL = {"float32": 1e-4, "float16": 2e-2}
N_TRACE, N_CHECK = 2, 3


class MappingGraph(nn.Module):
    """z (N, style_dim) float32 -> w (N, style_dim) float32 (the mapping network in `dtype` inside)."""

    def __init__(self, generator, dtype=torch.float32):
        super().__init__()
        style = generator.style
        if next(style.parameters()).dtype != dtype:
            style = copy.deepcopy(style).to(dtype)
        self.style = style.eval()
        self.dtype = dtype

    def forward(self, z):
        return self.style(z.to(self.dtype)).float()


def _taps(kernel: torch.Tensor, channels: int, dtype) -> torch.Tensor:
    """upfirdn2d's depthwise convolution weight (channels, 1, kh, kw): the flipped FIR kernel."""
    kh, kw = kernel.shape
    return torch.flip(kernel.detach().float(), [0, 1]).to(dtype).reshape(1, 1, kh, kw).expand(
        channels, 1, kh, kw).contiguous()


def _upfirdn_static(x, taps, c: int, h: int, w: int, up: int, pad) -> torch.Tensor:
    """`fastforget.models.stylegan2.upfirdn2d` (down = 1) with every size a Python int and the taps a
    constant, so the exported Conv has a static kernel (ONNX and TensorRT need one). The batch is -1."""
    px0, px1, py0, py1 = (pad[0], pad[1], pad[0], pad[1]) if len(pad) == 2 else pad
    if up > 1:
        x = F.pad(x.reshape(-1, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(-1, c, h * up, w * up)
        h, w = h * up, w * up
    x = F.pad(x, (max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)))
    hh, ww = h + max(py0, 0) + max(py1, 0), w + max(px0, 0) + max(px1, 0)
    if min(px0, px1, py0, py1) < 0:
        x = x[:, :, max(-py0, 0): hh - max(-py1, 0), max(-px0, 0): ww - max(-px1, 0)]
    return F.conv2d(x, taps, groups=c)


class SynthesisGraph(nn.Module):
    """W+ (N, n_latent, style_dim) float32 -> images (N, 3, size, size) float32, unclamped: the same
    operations as `Generator.forward` on the generator's own parameters, written with static spatial
    sizes (the model's upfirdn2d reads them from the tensor, which traces to a convolution with a
    kernel of unknown shape). The noise is the generator's stored buffers, constants of the graph."""

    # the synthesis network's parameters (the mapping network's are in the module but not in this graph)
    exported_prefixes = ("generator.input.", "generator.conv1.", "generator.to_rgb1.", "generator.convs.",
                         "generator.to_rgbs.")

    def __init__(self, generator, dtype=torch.float32):
        super().__init__()
        if next(generator.parameters()).dtype != dtype:
            generator = copy.deepcopy(generator).to(dtype)
        self.generator = generator.eval()
        self.dtype = dtype
        g = generator
        # one buffer per distinct taps tensor: the exporter merges equal initializers behind Identity nodes,
        # and TensorRT wants a Conv's weight to be an initializer itself
        self._blur, self._skip, found = [], [], []
        for which, kernel, c in [("_blur", conv.conv.blur.kernel, conv.conv.out_channel) for conv in g.convs[::2]] + \
                                [("_skip", rgb.upsample.kernel, 3) for rgb in g.to_rgbs]:
            t = _taps(kernel, c, dtype)
            name = next((n for n in found if torch.equal(getattr(self, n), t)), None)
            if name is None:
                name = f"taps_{len(found)}"
                self.register_buffer(name, t)
                found.append(name)
            getattr(self, which).append(name)

    @staticmethod
    def _modconv(conv, x, style, res: int, blur_taps=None):
        weight = conv.scale * conv.weight.squeeze(0)
        style = conv.modulation(style)
        x = x * style.reshape(-1, conv.in_channel, 1, 1)
        if conv.upsample:
            out = F.conv_transpose2d(x, weight.transpose(0, 1), padding=0, stride=2)
            size = 2 * res + conv.kernel_size - 2  # (res - 1) * 2 + kernel_size
            out = _upfirdn_static(out, blur_taps, conv.out_channel, size, size, 1, conv.blur.pad)
        else:
            out = F.conv2d(x, weight, padding=conv.padding)
        if conv.demodulate:
            dcoefs = (style.square() @ weight.square().sum((2, 3)).t() + 1e-8).rsqrt()
            out = out * dcoefs.reshape(-1, conv.out_channel, 1, 1)
        return out

    def _styled(self, layer, x, style, noise, res: int, blur_taps=None):
        out = self._modconv(layer.conv, x, style, res, blur_taps)
        out = out + layer.noise.weight * noise
        return fused_leaky_relu(out, layer.activate.bias)

    def _to_rgb(self, rgb, x, style, res: int, skip=None, skip_taps=None):
        out = self._modconv(rgb.conv, x, style, res) + rgb.bias
        if skip is None:
            return out
        return out + _upfirdn_static(skip, skip_taps, 3, res // 2, res // 2, rgb.upsample.factor, rgb.upsample.pad)

    def forward(self, w_plus):
        g = self.generator
        latent = w_plus.to(self.dtype)
        noise = g.stored_noise()
        out = self._styled(g.conv1, g.input(latent), latent[:, 0], noise[0], 4)
        skip = self._to_rgb(g.to_rgb1, out, latent[:, 1], 4)
        i, res = 1, 4
        for k, (conv1, conv2, noise1, noise2, to_rgb) in enumerate(zip(g.convs[::2], g.convs[1::2], noise[1::2],
                                                                        noise[2::2], g.to_rgbs)):
            out = self._styled(conv1, out, latent[:, i], noise1, res, getattr(self, self._blur[k]))
            res *= 2
            out = self._styled(conv2, out, latent[:, i + 1], noise2, res)
            skip = self._to_rgb(to_rgb, out, latent[:, i + 2], res, skip, getattr(self, self._skip[k]))
            i += 2
        return skip.float()


class _TorchSynthesis(nn.Module):
    """The reference: the generator's own forward (what StyleGAN2Model.synthesis runs), float32 out."""

    def __init__(self, generator):
        super().__init__()
        self.generator = generator

    def forward(self, w_plus):
        return self.generator(w_plus.to(next(self.generator.parameters()).dtype)).float()


def is_gan(model) -> bool:
    """A latent generator (StyleGAN2Model): what `to_onnx` sends here."""
    return hasattr(model, "synthesis") and hasattr(model, "invert") and hasattr(model, "generator")


def _resolve(model, patch):
    """(model with the patch applied, patch): an applied patch is recorded, one that fits the unedited
    model is applied to a copy, anything else raises InputError."""
    from fastforget.export.onnx_export import _patch_state
    from fastforget.patch import Patch

    if isinstance(patch, (str, Path)):
        patch = Patch.load(patch)
    if patch is None:
        return model, None
    if not isinstance(patch, Patch):
        raise InputError(f"patch: expected a Patch or a path to patch.safetensors, got {type(patch).__name__}")
    try:
        state = _patch_state(model, patch)
    except (AttributeError, KeyError, RuntimeError, ValueError):
        state = "mismatch"
    if state == "applied":
        return model, patch
    if state == "original":
        model = model.clone(only=patch.names)
        patch.apply(model)
        log.info("patch %s applied to a copy of the generator before export", patch.fingerprint())
        return model, patch
    raise InputError(f"patch {patch.fingerprint()}: its tensors match neither this generator's weights nor the "
                     "weights it was made from (a patch for another model?)")


def _check_inputs(model, n: int, seed: int):
    """(z (n, style_dim), W+ (n, n_latent, style_dim)) float32 on the CPU: z ~ N(0, I); W+ with a
    different mapped z per layer (style mixing), so every style input sees its own vector."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.style_dim, generator=g)
    zs = torch.randn(n * model.n_latent, model.style_dim, generator=g)
    with torch.no_grad():
        w = model.generator.mapping(zs.to(model.device, model.dtype)).float().cpu()
    return z, w.reshape(n, model.n_latent, model.style_dim).contiguous()


def to_onnx_gan(model, out_dir, *, patch=None, opset: int = 17, fp16: bool = False, verify: bool = True,
                overwrite: bool = False) -> Path:
    """Write `mapping.onnx`, `synthesis.onnx`, `manifest.json` and `w_avg.npy` (+ `patch.safetensors`)
    for a StyleGAN2Model into `out_dir` (atomically; an existing out_dir needs overwrite=True).

    patch: the Patch (or patch.safetensors) of the erasure; applied to a copy first when `model` is the
      unedited generator, only recorded when it is already applied.
    verify: run both graphs with onnxruntime (CPUExecutionProvider) on inputs they were not traced with
      and raise ExportParityError (nothing written) when max |ORT - torch float32| exceeds
      GAN_PARITY_RTOL[dtype] · max(1, max |torch|) (1e-4 for float32 graphs)."""
    import onnx  # noqa: F401  (fail early with ImportError if missing)

    from fastforget import __version__
    from fastforget.export.errors import ExportParityError
    from fastforget.export.onnx_export import _export_part, _jsonable, _ort_parity, _reference, file_sha256
    from fastforget.export.trt import check_tensorrt_ops
    from fastforget.io import atomic_directory, check_output_path

    if not is_gan(model):
        raise InputError(f"model: expected a StyleGAN2Model, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 14:
        raise InputError(f"opset: expected an integer >= 14, got {opset!r}")
    if not isinstance(fp16, bool) or not isinstance(verify, bool):
        raise InputError("fp16 / verify: expected True or False")
    check_output_path(out_dir, overwrite, "out_dir")  # before anything is traced
    model, patch = _resolve(model, patch)
    dtype = torch.float16 if fp16 else torch.float32
    gen = model.generator
    if next(gen.parameters()).device.type != "cpu":  # traced on the CPU: the graphs are device-independent
        gen = copy.deepcopy(gen).cpu()
    mapping = MappingGraph(gen, dtype).eval()
    synthesis = SynthesisGraph(gen, dtype).eval()
    src = getattr(model, "source", None)
    w_avg = model.w_avg.detach().float().cpu().numpy()
    dname = "float16" if fp16 else "float32"
    manifest = {
        "format": GAN_FORMAT, "fastforget_version": __version__, "family": model.family, "dtype": dname,
        "opset": opset, "size": int(model.size), "resolution": int(model.size), "style_dim": int(model.style_dim),
        "n_latent": int(model.n_latent), "n_mlp": int(gen.n_mlp), "w_avg": w_avg.tolist(), "w_avg_file": "w_avg.npy",
        "w_spread": float(model.w_spread), "generator_config": gen.config(),
        "noise": "the checkpoint's stored noise buffers (noises.noise_i), constants of synthesis.onnx",
        "images": "(N, 3, size, size) float32, nominally in [-1, 1], unclamped (StyleGAN2Model.synthesis)",
        "truncation": "w' = w_avg + psi * (w - w_avg), done by the caller",
        "parts": {}, "parity": {},
        "patch": None if patch is None else {
            "fingerprint": patch.fingerprint(), "method": patch.metadata.get("method"), "tensors": len(patch.names),
            "parameters": patch.num_parameters(), "file": "patch.safetensors",
            "targets": patch.metadata.get("targets")},
        "source": {"path": src, "sha256": file_sha256(src) if src and Path(src).is_file() else None},
        "firewall": {"enabled": False}}
    meta = {"fastforget_version": __version__, "patch_fingerprint": patch.fingerprint() if patch else "",
            "family": model.family}
    z_trace, w_trace = _check_inputs(model, N_TRACE, 0)
    z_check, w_check = _check_inputs(model, N_CHECK, 1)
    rtol = GAN_PARITY_RTOL[dname]
    with atomic_directory(out_dir, overwrite=overwrite, name="out_dir") as tmp, torch.no_grad():
        parts = (("mapping", mapping, z_trace, "z", "w", {"z": z_check},
                  "z (N, style_dim) -> w (N, style_dim): the mapping network"),
                 ("synthesis", synthesis, w_trace, "w_plus", "images", {"w_plus": w_check},
                  "W+ (N, n_latent, style_dim) -> images (N, 3, H, W), nominally [-1, 1]; stored noise"))
        tolerance, scales = {}, {}
        for part, graph, trace, inp, out, feeds, doc in parts:
            info = _export_part(graph, (trace,), tmp / f"{part}.onnx", input_names=[inp], output_names=[out],
                                dynamic_axes={inp: {0: "batch"}, out: {0: "batch"}}, opset=opset,
                                external_data=None, doc=doc, metadata={**meta, "part": part})
            info["sha256"] = file_sha256(tmp / info["file"])
            manifest["parts"][part] = info
            if verify:  # each part as soon as it exists: a bad one stops the export there
                # the reference is the torch model itself in float32 (for synthesis: Generator.forward)
                ref = MappingGraph(gen) if part == "mapping" else _TorchSynthesis(gen)
                diff, scale = _ort_parity(tmp / info["file"], _reference(ref.eval()), feeds)
                tol = rtol * max(1.0, scale)
                manifest["parity"][part], tolerance[part], scales[part] = diff, tol, scale
                if not np.isfinite(diff) or diff > tol:
                    raise ExportParityError(
                        f"{part}: the exported {dname} graph differs from the torch generator by max |diff| "
                        f"{diff:.3g} (tolerance {tol:.3g} = {rtol:g} x max(1, {scale:.3g})); nothing was written"
                        + ("; export in float32 (fp16=False)" if fp16 else ""))
        if verify:
            manifest["parity_check"] = {
                "reference": f"the torch generator in float32 on the CPU, same inputs, batch of {N_CHECK}",
                "runtime": "onnxruntime CPUExecutionProvider", "dtype": dname, "rtol": rtol,
                "rule": "max |ORT - torch| <= rtol * max(1, max |torch|)", "tolerance": tolerance,
                "reference_max_abs": scales, "passed": True}
        # what TensorRT 10's ONNX parser would refuse (needs only onnx; building engines needs tensorrt + a GPU)
        problems = [f"{p}: {x}" for p in manifest["parts"] for x in check_tensorrt_ops(tmp / f"{p}.onnx")]
        manifest["tensorrt_ops"] = {"checked": "fastforget.export.trt.check_tensorrt_ops (TRT10_ONNX_OPS)",
                                    "problems": problems}
        if problems:
            log.warning("exported GAN graphs TensorRT 10 may not parse: %s", "; ".join(problems[:5]))
        np.save(tmp / "w_avg.npy", w_avg.astype(np.float32))
        if patch is not None:
            patch.save(tmp / "patch.safetensors")
        (tmp / "manifest.json").write_text(json.dumps(_jsonable(manifest), indent=1, sort_keys=True))
    return Path(out_dir)


def load_gan_manifest(directory) -> dict:
    """manifest.json of a `to_onnx_gan` folder (ModelLoadError when it is not one)."""
    from fastforget.export._compat import read_manifest

    return read_manifest(directory, GAN_FORMAT)
