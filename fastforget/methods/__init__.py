"""Erasure methods, registered by name: each `fit(model, request, ...)` returns a Patch."""
from fastforget.methods.base import ErasureRequest, available_methods, get_method, register_method

# built-in methods register themselves on import
from fastforget.methods import closed_form  # noqa: E402,F401
from fastforget.methods import bia  # noqa: E402,F401

from fastforget.methods import finetune  # noqa: E402,F401  (piu, esd_x)

__all__ = ["ErasureRequest", "register_method", "get_method", "available_methods"]
from fastforget.methods import guide  # noqa: E402,F401  (guide, guide_average)
from fastforget.methods import portrait  # noqa: E402,F401  (encoder_finetune, ireu; closed_form's portrait branch)
