"""Model adapters: one per family, each exposing the family's identity path."""
from __future__ import annotations

from pathlib import Path

from fastforget.errors import ModelLoadError
from fastforget.models.arc2face import Arc2FaceModel, check_embeddings, load_arc2face


def load(spec="demo", base=None):
    """`"demo"`: the built-in testbed generator; a folder written by fastforget; or the Arc2Face
    release layout (`arc2face/`, `encoder/`) with `base=` an SD-1.5 folder. Local files only."""
    if isinstance(spec, Arc2FaceModel):
        return spec
    if spec == "demo":
        from fastforget.testbed import weights_dir

        folder = weights_dir() / "generator"
        if not folder.is_dir():
            raise ModelLoadError(f"testbed generator weights missing at {folder}: reinstall fastforget or run "
                                 "python -m fastforget.testbed.train_generator")
        return load_arc2face(folder)
    if not isinstance(spec, (str, Path)):
        raise ModelLoadError(f"cannot load a model from {type(spec).__name__}; pass 'demo' or a folder path")
    return load_arc2face(spec, base=base)


__all__ = ["load", "Arc2FaceModel", "check_embeddings", "load_arc2face"]
