"""Patch: the named tensors an erasure changed, with metadata. The one object every layer shares.

A patch holds, for each changed parameter (qualified by component: `unet.…`, `text_encoder.…`),
its new value and its original value. `apply` checks the model still holds the original (so a
patch cannot land on the wrong model), `revert` checks it holds the new value (so reverting one
erasure's patch cannot undo another's) and restores the original exactly. Saved as safetensors with
the metadata as JSON in the header. Metadata never holds images or raw embeddings: only salted
fingerprints (see `fingerprint_embeddings`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from fastforget.errors import InputError, PatchMismatchError

FORMAT = "fastforget.patch/1"
DEFAULT_SALT = "fastforget"


def fingerprint_embeddings(emb: torch.Tensor, salt: str = DEFAULT_SALT) -> list[str]:
    """One salted SHA-256 prefix per embedding (rounded to 1e-4 so float noise does not change it).
    One-way: it can confirm a known embedding was targeted, never reveal it."""
    q = np.round(emb.detach().double().cpu().numpy() * 1e4).astype(np.int32)
    return [hashlib.sha256(salt.encode() + b"\0" + row.tobytes()).hexdigest()[:16] for row in q]


def _components(model) -> dict:
    """Top-level modules a patch name starts with: `model.components()` where a family defines it
    (a GAN's "generator"), else the diffusion parts."""
    if callable(getattr(model, "components", None)):
        return dict(model.components())
    comps = {"unet": model.unet, "text_encoder": model.text_encoder}
    if getattr(model, "vae", None) is not None:
        comps["vae"] = model.vae
    return comps


def get_parameter(model, name: str) -> torch.Tensor:
    comp, _, rest = name.partition(".")
    comps = _components(model)
    if comp not in comps:
        raise InputError(f"patch tensor {name!r}: unknown component {comp!r} (expected one of {sorted(comps)})")
    try:
        return comps[comp].get_parameter(rest)
    except AttributeError:
        raise InputError(f"patch tensor {name!r}: the model has no such parameter") from None


def set_parameter(model, name: str, value: torch.Tensor) -> None:
    """Write `value` into parameter `name`: in place when the shape is the same; otherwise (a keyed edit that
    adds MLP units) the parameter is replaced, the Linear's in/out_features follow, and a CLIP text encoder's
    config.intermediate_size follows its MLPs (they must agree to save and reload in transformers)."""
    p = get_parameter(model, name)
    if tuple(p.shape) == tuple(value.shape):
        p.copy_(value)
        return
    comp, _, rest = name.partition(".")
    root = _components(model)[comp]
    mod_name, _, attr = rest.rpartition(".")
    mod = root.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(value.to(p.dtype).to(p.device).clone(), requires_grad=p.requires_grad))
    if isinstance(mod, torch.nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    layers = getattr(getattr(getattr(root, "text_model", None), "encoder", None), "layers", None)
    if layers is not None and hasattr(root.config, "intermediate_size"):
        widths = {layer.mlp.fc1.weight.shape[0] for layer in layers}
        if len(widths) == 1 and all(layer.mlp.fc2.weight.shape[1] == next(iter(widths)) for layer in layers):
            root.config.intermediate_size = next(iter(widths))


class Patch:
    def __init__(self, new: dict, old: dict, metadata: dict | None = None):
        if set(new) != set(old):
            raise InputError("patch: new and old tensors must have the same names")
        self.new = {k: v.detach().cpu().contiguous() for k, v in sorted(new.items())}
        self.old = {k: v.detach().cpu().contiguous() for k, v in sorted(old.items())}
        self.metadata = dict(metadata or {})

    @classmethod
    def from_edit(cls, model, new_values: dict, metadata: dict | None = None) -> "Patch":
        """A patch that sets `new_values` (name -> tensor) on `model`, whose current values become `old`."""
        old = {k: get_parameter(model, k).detach().clone() for k in new_values}
        for k, v in new_values.items():
            if v.shape != old[k].shape and not (k.startswith("text_encoder.") and ".mlp.fc" in k and v.ndim == old[k].ndim):
                raise InputError(f"patch tensor {k!r}: shape {tuple(v.shape)} != model's {tuple(old[k].shape)}")
        new = {k: v.detach().to(old[k].dtype) for k, v in new_values.items()}
        return cls(new, old, metadata)

    # ------------------------------------------------------------ use
    @property
    def names(self) -> list[str]:
        return list(self.new)

    def num_parameters(self) -> int:
        return sum(v.numel() for v in self.new.values())

    def _first_mismatch(self, model, expected: dict):
        """Name of the first tensor whose value on `model` is not `expected[name]`, or None."""
        for k, v in expected.items():
            p = get_parameter(model, k)
            if tuple(p.shape) != tuple(v.shape) or not torch.equal(p.detach().cpu().to(v.dtype), v):
                return k
        return None

    def apply(self, model, check: bool = True):
        """Set the new values on `model` in place; returns the model. With check=True (the default)
        every tensor must first hold the patch's original value, else PatchMismatchError names the
        first one that does not and the model is left as it was."""
        with torch.no_grad():
            bad = self._first_mismatch(model, self.old) if check else None
            if bad is not None:
                raise PatchMismatchError(f"patch does not fit this model: {bad!r} is not the tensor the patch was "
                                         "made from (already applied, or another model)")
            for k, v in self.new.items():
                set_parameter(model, k, v)
        return model

    def revert(self, model, check: bool = True):
        """Restore the original values exactly; returns the model. With check=True (the default)
        every tensor must first hold the patch's new value (the model is this patch applied), else
        PatchMismatchError names the first one that does not and the model is left as it was:
        reverting another erasure's patch would otherwise write this patch's originals over it."""
        with torch.no_grad():
            bad = self._first_mismatch(model, self.new) if check else None
            if bad is not None:
                raise PatchMismatchError(f"patch cannot be reverted on this model: {bad!r} does not hold the value "
                                         "the patch set (not applied, already reverted, edited since, or another "
                                         "model); pass check=False to force the original values back")
            for k, v in self.old.items():
                set_parameter(model, k, v)
        return model

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.metadata, sort_keys=True, default=str).encode())
        for k, v in self.new.items():
            h.update(k.encode())
            h.update(v.numpy().tobytes() if v.dtype != torch.bfloat16 else v.view(torch.int16).numpy().tobytes())
        return h.hexdigest()[:16]

    def delta_norms(self) -> dict:
        return {k: (self.new[k].float() - self.old[k].float()).norm().item() for k in self.new}

    # ------------------------------------------------------------ files
    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors = {f"new/{k}": v for k, v in self.new.items()} | {f"old/{k}": v for k, v in self.old.items()}
        # one header key: safetensors keeps header metadata in a hash map, so several keys would
        # come out in a different order each call and the same patch would not give the same bytes
        header = json.dumps({"format": FORMAT, "metadata": self.metadata}, sort_keys=True, default=str)
        return save(tensors, metadata={"fastforget": header})

    def save(self, path, overwrite: bool = False) -> Path:
        from fastforget.io import atomic_write_bytes

        return atomic_write_bytes(path, self.to_bytes(), overwrite=overwrite)

    @classmethod
    def load(cls, path) -> "Patch":
        from fastforget.io import read_fastforget_safetensors

        header, tensors = read_fastforget_safetensors(path, FORMAT, "patch")
        new = {k[4:]: v for k, v in tensors.items() if k.startswith("new/")}
        old = {k[4:]: v for k, v in tensors.items() if k.startswith("old/")}
        return cls(new, old, header.get("metadata", {}))

    def __repr__(self):
        return (f"Patch(method={self.metadata.get('method')!r}, tensors={len(self.new)}, "
                f"parameters={self.num_parameters():,}, fingerprint={self.fingerprint()})")
