"""fastforget: erase chosen identities from face generative models and ship the erased model.

    import fastforget as ff
    model = ff.load("demo")                 # the built-in testbed generator
    enc = ff.load_encoder("demo")           # its ArcFace-style identity encoder
    imgs, ids = ff.testbed.render([0, 1], per_identity=4, seed=0)
    emb = enc.encode(imgs)                  # (8, 512) unit norm
    faces = model.generate(emb[:1], seed=0) # PIL images
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from fastforget import errors, testbed  # noqa: E402  (light modules)
from fastforget.identity import IdentityEncoder, load_encoder  # noqa: E402
from fastforget.models import load  # noqa: E402
from fastforget.patch import Patch  # noqa: E402
from fastforget.api import ErasureResult, Report, erase, verify  # noqa: E402

_LAZY = {"kernels": "fastforget.kernels", "svm": "fastforget.svm", "metrics": "fastforget.metrics",
         "export": "fastforget.export", "gallery": "fastforget.identity.gallery",
         "distributed": "fastforget.distributed"}


# public functions whose modules are heavy: imported on first use
_LAZY_ATTRS = {"attack": "fastforget.attacks", "AttackReport": "fastforget.attacks",
               "erase_batch": "fastforget.batch", "withdraw": "fastforget.batch"}


def __getattr__(name):  # heavy or optional subpackages load on first use
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    raise AttributeError(f"module 'fastforget' has no attribute {name!r}")


__all__ = ["load", "load_encoder", "erase", "verify", "attack", "AttackReport", "erase_batch", "withdraw", "Patch", "ErasureResult", "Report", "IdentityEncoder", "errors", "testbed", "kernels", "svm", "metrics", "export", "gallery",
           "distributed", "__version__"]
