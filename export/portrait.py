"""ONNX export of a portrait generator's (erased) image projection: the one part an encoder-only erasure
changes (fastforget.methods.portrait), and the part a serving stack swaps.

    ff.export.to_onnx(res.model, "proj_onnx", patch=res.patch)    # a PortraitModel: this branch

One graph, `image_proj.onnx`: `embedding` (N, 512) float32 -> `id_tokens` (N, tokens, D), exactly
`PortraitModel.id_tokens` (normalise; scale by `embedding_norm`; FaceID's MLP + LayerNorm or InstantID's
Resampler on a one-token sequence), erased weights baked in, dynamic batch. With the firewall the normalised
embedding is first replaced by its anchor when it is within `threshold` of an erased identity (the rule of the
Arc2Face conditioner graph). The UNet with its to_k_ip / to_v_ip is the base model's and is not exported here
(an encoder-only erasure never changes it). `manifest.json` records the family, token shape, the patch, the
source checkpoint's sha256 and the ORT-vs-torch parity, checked at export: max |ORT - torch| <= 1e-5 ·
max(1, max |torch|) for float32 graphs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PORTRAIT_FORMAT = "fastforget.portrait-onnx/1"
PORTRAIT_PARITY_RTOL = {"float32": 1e-5, "float16": 2e-2}


class ImageProjectionGraph(nn.Module):
    """`PortraitModel.id_tokens` as a traceable module (+ the optional identity firewall)."""

    def __init__(self, model, dtype=torch.float32, bank=None, anchors=None, threshold: float = 0.5):
        super().__init__()
        import copy

        proj = model.image_proj
        if dtype != next(proj.parameters()).dtype:
            proj = copy.deepcopy(proj).to(dtype)
        self.proj = proj.eval()
        self.norm = float(model.embedding_norm)
        self.sequence = model.family == "instantid"  # the Resampler takes a one-token sequence
        self.firewall = bank is not None
        if self.firewall:
            self.register_buffer("firewall_bank_t", F.normalize(torch.as_tensor(bank).float(), dim=1).T.contiguous())
            self.register_buffer("firewall_anchors", F.normalize(torch.as_tensor(anchors).float(), dim=1))
            self.threshold = float(threshold)

    def forward(self, embedding):
        e = embedding.float()
        e = e / torch.sqrt((e * e).sum(dim=1, keepdim=True)).clamp_min(1e-12)
        if self.firewall:
            best, idx = (e @ self.firewall_bank_t).max(dim=1)
            e = torch.where((best >= self.threshold)[:, None], self.firewall_anchors[idx], e)
        x = (e * self.norm).to(next(self.proj.parameters()).dtype)
        return self.proj(x[:, None] if self.sequence else x)


def to_onnx_portrait(model, out_dir, *, patch=None, opset: int = 17, fp16: bool = False, firewall: bool = False,
                     firewall_bank=None, firewall_anchors=None, firewall_threshold: float = 0.5,
                     verify: bool = True, overwrite: bool = False) -> Path:
    """Write `image_proj.onnx` + `manifest.json` for a PortraitModel (called by `to_onnx`)."""
    from fastforget import __version__
    from fastforget.export.errors import ExportParityError
    from fastforget.export.onnx_export import (_check_bank, _export_part, _jsonable, _ort_parity, _reference,
                                               file_sha256)
    from fastforget.io import atomic_directory
    from fastforget.patch import fingerprint_embeddings

    bank = anchors = None
    if firewall:
        bank, anchors = _check_bank(firewall_bank, firewall_anchors, firewall_threshold)
    dtype = torch.float16 if fp16 else torch.float32
    graph = ImageProjectionGraph(model, dtype, bank, anchors, firewall_threshold).eval()
    src = getattr(model, "ip_adapter", None)
    manifest = {
        "format": PORTRAIT_FORMAT, "fastforget_version": __version__, "family": model.family,
        "dtype": "float16" if fp16 else "float32", "opset": opset, "embedding_dim": 512,
        "embedding_norm": float(model.embedding_norm), "tokens": int(model.num_tokens),
        "token_dim": int(model.cross_attention_dim), "parts": {}, "parity": {},
        "patch": None if patch is None else {
            "fingerprint": patch.fingerprint(), "method": patch.metadata.get("method"), "tensors": len(patch.names),
            "parameters": patch.num_parameters(), "targets": patch.metadata.get("targets"),
            "anchors": patch.metadata.get("anchors")},
        "source": {"ip_adapter": src, "sha256": file_sha256(src) if src and Path(src).is_file() else None},
        "firewall": {"enabled": bool(firewall)}}
    if firewall:
        manifest["firewall"].update({
            "identities": int(len(bank)), "threshold": float(firewall_threshold),
            "targets": fingerprint_embeddings(bank), "anchors": fingerprint_embeddings(anchors),
            "stores": "the K erased identities' unit embeddings and their anchors, as constants of image_proj.onnx",
            "rule": "e = normalize(x); k = argmax(bank @ e); if bank[k] . e >= threshold: e = anchors[k]"})
    meta = {"fastforget_version": __version__, "patch_fingerprint": patch.fingerprint() if patch else "",
            "firewall": str(bool(firewall)), "family": model.family}
    trace = F.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(0)), dim=1)
    check = F.normalize(torch.randn(3, 512, generator=torch.Generator().manual_seed(1)), dim=1)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp, torch.no_grad():
        info = _export_part(graph, (trace,), tmp / "image_proj.onnx", input_names=["embedding"],
                            output_names=["id_tokens"], dynamic_axes={"embedding": {0: "batch"},
                                                                      "id_tokens": {0: "batch"}},
                            opset=opset, external_data=None, doc="ArcFace embedding -> ID tokens (image projection)",
                            metadata=meta)
        info["sha256"] = file_sha256(tmp / info["file"])
        manifest["parts"]["image_proj"] = info
        if verify:
            diff, scale = _ort_parity(tmp / info["file"], _reference(graph), {"embedding": check})
            rtol = PORTRAIT_PARITY_RTOL[manifest["dtype"]]
            tol = rtol * max(1.0, scale)
            manifest["parity"]["image_proj"] = diff
            manifest["parity_check"] = {"reference": "the torch projection in float32 on the CPU, batch of 3",
                                        "runtime": "onnxruntime CPUExecutionProvider", "rtol": rtol,
                                        "tolerance": {"image_proj": tol}, "rule": "max |ORT - torch| <= rtol * max(1, max |torch|)"}
            if not np.isfinite(diff) or diff > tol:
                raise ExportParityError(f"image_proj: the exported {manifest['dtype']} graph differs from the torch "
                                        f"projection by max |diff| {diff:.3g} (tolerance {tol:.3g}); nothing was "
                                        "written")
        (tmp / "manifest.json").write_text(json.dumps(_jsonable(manifest), indent=1, sort_keys=True))
    return Path(out_dir)

