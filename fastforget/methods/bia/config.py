"""BIA's options, each defined once: default, range, whose value it is, and why."""
from __future__ import annotations

from fastforget.methods.base import MAX_BATCH, MAX_LR, MAX_SAMPLES, MethodConfig, Option
from fastforget.models.common import MAX_GUIDANCE

BIA_CONFIG = MethodConfig("bia", {
    "mode": Option("absorb", "choice", "absorb returns a Patch (the paper's claim); edit edits images (the public "
                   "code), use bia_edit", choices=("absorb", "edit")),
    # inversion / decoding (Asyrp)
    "t0": Option(500, "int", "BIA/Asyrp inversion depth: deep enough to change identity, shallow enough to keep "
                 "pose and background", lo=1, source="paper"),
    "inversion_steps": Option(40, "int", "BIA's DDIM (η = 0) inversion steps", lo=1, source="paper"),
    "decode_steps": Option(40, "int", "BIA's DDIM decoding steps", lo=1, source="paper"),
    "asymmetric": Option(True, "bool", "Asyrp's step: x0 from the edited ε, direction from the original ε "
                         "(a shift in both terms cancels)", source="paper"),
    # neighbourhood and labels (the region)
    "neighbours": Option(128, "int", "BIA's M", lo=2, hi=MAX_SAMPLES, source="paper"),
    "radius_max": Option(0.35, "float", "BIA's radius 0.35, here × ||h_r|| (CelebA h units do not carry over)",
                         lo=0.0, strict=True, hi=1e6, source="paper"),
    "radius_units": Option("relative", "choice", "relative to ||h_r|| carries across models",
                           choices=("relative", "absolute")),
    "tau": Option(0.35, "float", "BIA's ArcFace label threshold", lo=-1.0, hi=1.0, source="paper"),
    "C": Option(1.0, "float", "BIA's LinearSVC C", lo=0.0, strict=True, source="paper"),
    "rebalance_tries": Option(2, "int", "radius probes when all neighbours fall on one side", lo=0),
    # walk / push
    "k_nearest": Option(8, "int", "BIA's K codes nearest the hyperplane", lo=1, hi=MAX_SAMPLES, source="paper"),
    "push_margin": Option([1.0, 1.2], "pair", "push past the boundary by U(lo, hi)·R (BIA's Δ ~ U(100, 120) in "
                          "CelebA h units)", lo=0.0),
    "wrapper_threshold": Option(0.35, "float", "BIA's acceptance threshold on 1.0·MSE + 0.5·perceptual",
                                lo=0.0, source="public code"),
    "mse_weight": Option(1.0, "float", "BIA's wrapper MSE weight", lo=0.0, source="public code"),
    "perceptual_weight": Option(0.5, "float", "BIA's wrapper perceptual weight", lo=0.0, source="public code"),
    "halvings": Option(5, "int", "BIA halves a rejected push at most 5 times", lo=0, source="public code"),
    "chunk": Option(64, "int", "decodes per UNet batch (memory only)", lo=1),
    # sources (erase only has embeddings: the model renders the person)
    "n_augment": Option(15, "int", "augmented copies (pose, scale, shift, flip, brightness) of each given photo: "
                        "the black hole must catch the person's other photos, not one picture", lo=0, hi=MAX_BATCH),
    "n_sources": Option(16, "int", "without photos: the model's renditions of each target's embedding "
                        "(ID-conditioned models); on the testbed they look unlike its photos, so photos are better",
                        lo=1, hi=MAX_BATCH),
    "source_steps": Option(25, "int", "sampling steps of the renditions", lo=1),
    "source_guidance": Option(3.0, "float", "guidance of the renditions", lo=0.0, hi=MAX_GUIDANCE),
    "source_images": Option(None, "any", "photos of each target (required for unconditional models)"),
    "encoder": Option(None, "any", "identity encoder (default: the request's)"),
    # absorb (weight update)
    "absorb_target": Option("anchor", "choice", "what a target's inverted photo must decode to: 'anchor' (ours): "
                            "the teacher's decode of the same inversion under the anchor's condition, a different "
                            "person in the same pose; 'push' (the paper's walk): the decode of the code pushed across "
                            "the boundary, which keeps the person on the testbed", choices=("anchor", "push")),
    "anchor_guidance": Option(8.0, "float", "guidance of the anchor decode: 3 leaves cos ~0.4 to the person, 8 "
                              "reaches ~0.1", lo=0.0, hi=MAX_GUIDANCE),
    "steps": Option(300, "int", "optimiser steps (the losses flatten by ~250 on the testbed)", lo=1),
    "lr": Option(3e-4, "float", "AdamW learning rate", lo=0.0, strict=True, hi=MAX_LR),
    "weight_decay": Option(0.0, "float", "AdamW weight decay: the patch should stay small, not shrink", lo=0.0),
    "batch": Option(16, "int", "trajectory points per step, half erase / half keep", lo=1, hi=MAX_BATCH),
    "preserve_weight": Option(2.0, "float", "weight of the keep term: at 1.0 the 20 held-out people kept 0.85 of "
                              "their cosine", lo=0.0),
    "trainable": Option(["up_blocks"], "names", "the decoder: every block that reads h (the paper edits h "
                        "only; one resnet group cannot tell the person from others)"),
    "n_negatives": Option(16, "int", "hard negatives per target (ours): other people decoded from the sources' "
                          "inversions (same pose and background) held fixed, so the background cannot stand for "
                          "the person", lo=0, hi=MAX_BATCH),
    "n_preserve": Option(64, "int", "other identities whose inversions must decode as before", lo=0, hi=MAX_BATCH),
    "n_random": Option(8, "int", "random samples (from pure noise) held fixed", lo=0, hi=MAX_BATCH),
})
BIA_DEFAULTS = BIA_CONFIG.defaults
EDIT_KEYS = ("t0", "inversion_steps", "decode_steps", "asymmetric", "neighbours", "radius_max", "radius_units", "tau",
             "C", "rebalance_tries", "k_nearest", "push_margin", "wrapper_threshold", "mse_weight",
             "perceptual_weight", "halvings", "source_steps", "source_guidance", "chunk")


def resolve_options(options: dict, *, allowed=None) -> dict:
    """Defaults + options, checked. Unknown names raise InputError naming them."""
    return BIA_CONFIG.resolve(options, allowed)


def public_config(cfg: dict, encoder) -> dict:
    """The resolved options as JSON-able metadata: no images, no embeddings, the encoder by name."""
    out = dict(cfg)
    if "encoder" in out:
        out["encoder"] = getattr(encoder, "name", type(encoder).__name__) if encoder is not None else None
    if out.get("source_images") is not None:
        out["source_images"] = f"given ({len(out['source_images'])} images, not stored)"
    return out
