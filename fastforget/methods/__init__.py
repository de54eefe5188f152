"""Erasure methods, registered by name: each `fit(model, request, ...)` returns a Patch."""
from fastforget.methods.base import ErasureRequest, available_methods, get_method, register_method

# built-in methods register themselves on import
from fastforget.methods import closed_form  # noqa: E402,F401

try:  # fine-tuning methods (PIU, ESD-x) live in their own module
    from fastforget.methods import finetune  # noqa: E402,F401
except ImportError as _exc:  # pragma: no cover - only while the module is absent
    if "finetune" not in str(_exc):
        raise

__all__ = ["ErasureRequest", "register_method", "get_method", "available_methods"]
