"""Model adapters: one per family, registered by name; `load` picks by what the folder or file holds."""
from __future__ import annotations

from fastforget.identity.embeddings import check_embeddings
from fastforget.models.arc2face import Arc2FaceModel, load_arc2face
from fastforget.models.ip_adapter import InstantIDModel, PortraitModel, load_portrait
from fastforget.models.registry import available_families, load, register_adapter, register_builtin
from fastforget.models.stylegan2 import StyleGAN2Model, load_stylegan2
from fastforget.models.unconditional import UnconditionalDiffusion, load_unconditional

__all__ = ["load", "register_adapter", "register_builtin", "available_families", "Arc2FaceModel",
           "UnconditionalDiffusion", "StyleGAN2Model", "check_embeddings", "load_arc2face", "load_stylegan2",
           "load_unconditional"]
__all__ += ["PortraitModel", "InstantIDModel", "load_portrait"]
