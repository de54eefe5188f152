"""What every erasure method receives and returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastforget.errors import UnknownMethodError

_REGISTRY: dict = {}


@dataclass
class ErasureRequest:
    """Who to forget, who they become, who must stay. All (N, 512) float32, unit norm.

    targets[i] is replaced by anchors[i]; `retain` are identities named by the caller;
    `preserve` is a large set of other identities (a gallery) held fixed where a method
    supports it, so that identities nobody named also stay put.
    """

    targets: torch.Tensor
    anchors: torch.Tensor
    retain: torch.Tensor | None = None
    preserve: torch.Tensor | None = None
    salt: str = "fastforget"
    extra: dict = field(default_factory=dict)


def register_method(name: str):
    """Decorator: `fit(model, request, *, seed, progress, **options) -> Patch` registered under `name`."""

    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def get_method(name: str):
    from fastforget import methods  # noqa: F401  (imports register every built-in method)

    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    from fastforget import methods  # noqa: F401

    return sorted(_REGISTRY)


def attn2_kv_names(model, modules: dict | None = None) -> list[str]:
    """Qualified parameter names of to_k / to_v weights of the given (default: all) attn2 modules."""
    modules = modules if modules is not None else model.attn2_modules()
    return [f"unet.{m}.{p}.weight" for m in modules for p in ("to_k", "to_v")]
