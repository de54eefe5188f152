"""BIA: a black-hole region around an identity in the diffusion h-space (mid-block output).

Following the paper (Shaheryar, Lee, Jung, CVPR 2025) and its public code (mshaheryar91/BlA, built on Asyrp):

* `region` — the source DDIM-inverted (η = 0, t0 = 500, 40 steps) by the unconditional branch; its code h_r
  (mid-block output, read by the shared hook in `fastforget.models.diffusion`); M = 128 neighbours
  h_r + r·normalize(N(0, I)), r ~ U(0, R), decoded by Asyrp's asymmetric process and labelled by identity cosine
  (τ = 0.35); a linear SVM (C = 1) whose normal points out of the black hole; the push across it.
* `edit` — `bia_edit`, the public code's mode: pushed images, accepted under the wrapper loss; never weights.
* `absorb` — `fit_bia`, registered as method "bia": the paper's claim (a model that no longer produces the
  person), by trajectory distillation of the decoder towards each source's absorb target.
* `config` — every option once (`BIA_CONFIG`), from which validation, metadata and the README table come.
"""
from fastforget.methods.bia.absorb import fit_bia
from fastforget.methods.bia.config import BIA_CONFIG, BIA_DEFAULTS, EDIT_KEYS, public_config, resolve_options
from fastforget.methods.bia.edit import bia_edit
from fastforget.methods.bia.region import Region, build_region, encode_images, push_codes, wrapper_loss
from fastforget.models.diffusion import HSpace, MidBlockHook, mid_block_hook
from fastforget.models.unconditional import UnconditionalDiffusion  # noqa: F401  (kept importable here)

__all__ = ["fit_bia", "bia_edit", "BIA_CONFIG", "BIA_DEFAULTS", "EDIT_KEYS", "resolve_options", "public_config",
           "Region", "build_region", "push_codes", "wrapper_loss", "encode_images", "HSpace", "MidBlockHook",
           "mid_block_hook", "UnconditionalDiffusion"]
