"""The built-in miniature world: procedural faces, an ArcFace-style encoder, a tiny Arc2Face."""
from pathlib import Path

from fastforget.testbed.renderer import IDENTITY_FACTORS, identity_factors, render


def weights_dir() -> Path:
    """Folder of the shipped testbed weights (encoder.safetensors, generator/)."""
    return Path(__file__).resolve().parent / "weights"


__all__ = ["render", "identity_factors", "IDENTITY_FACTORS", "weights_dir"]
