"""Real ArcFace: insightface-format ONNX recognition models, run with ONNX Runtime.

Arc2Face uses antelopev2's SCRFD detector with `arcface.onnx` (not glintr100, Arc2Face issue #5).
Aligned 112x112 crops go straight in; full photos are detected and aligned with insightface
(`norm_crop`) when a detector model sits in the same folder; the largest face wins (Arc2Face's
rule), with a warning when there are several.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastforget.errors import InputError, ModelLoadError, NoFaceError
from fastforget.identity.encoder import EMBED_DIM, IdentityEncoder, as_image_batch

log = logging.getLogger("fastforget")
RECOGNITION_NAMES = ("arcface.onnx", "w600k_r50.onnx", "glintr100.onnx")
DETECTOR_NAMES = ("scrfd_10g_bnkps.onnx", "det_10g.onnx", "det_500m.onnx")


def _providers(providers):
    import onnxruntime as ort

    if providers:
        return list(providers)
    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


class ArcFaceOnnxEncoder(IdentityEncoder):
    name = "arcface-onnx"

    def __init__(self, recognizer, detector=None, path: Path | None = None):
        self.rec, self.det, self.path = recognizer, detector, path

    @classmethod
    def load(cls, path, providers=None, det_size: int = 640) -> "ArcFaceOnnxEncoder":
        from insightface.model_zoo import model_zoo

        path = Path(path)
        if path.is_dir():
            found = [path / n for n in RECOGNITION_NAMES if (path / n).is_file()]
            if not found:
                raise ModelLoadError(f"{path}: no ArcFace model ({', '.join(RECOGNITION_NAMES)})")
            rec_file, folder = found[0], path
        elif path.is_file():
            rec_file, folder = path, path.parent
        else:
            raise ModelLoadError(f"encoder not found: {path} (expected an ArcFace .onnx or a folder holding one)")
        if rec_file.name == "glintr100.onnx":
            warnings.warn("glintr100.onnx is not the encoder Arc2Face was trained with (use arcface.onnx)")
        prov = _providers(providers)
        try:
            rec = model_zoo.get_model(str(rec_file), providers=prov)
        except Exception as exc:
            raise ModelLoadError(f"{rec_file}: not a readable ONNX model ({str(exc)[:200]})") from None
        if rec is None or getattr(rec, "taskname", None) != "recognition":
            raise ModelLoadError(f"{rec_file}: not an insightface recognition model")
        out_dim = rec.session.get_outputs()[0].shape[-1]
        if out_dim != EMBED_DIM or tuple(rec.input_size) != (112, 112):
            raise ModelLoadError(f"{rec_file}: expected 112x112 input and {EMBED_DIM}-d output, "
                                 f"got {rec.input_size} and {out_dim}")
        det = None
        for n in DETECTOR_NAMES:
            if (folder / n).is_file():
                det = model_zoo.get_model(str(folder / n), providers=prov)
                det.prepare(ctx_id=-1, input_size=(det_size, det_size), det_thresh=0.5)
                break
        return cls(rec, det, rec_file)

    def _crop(self, rgb: np.ndarray, label: str) -> np.ndarray:
        """Aligned BGR 112x112 crop of the largest face."""
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        if rgb.shape[:2] == (112, 112):
            return bgr
        if self.det is None:
            raise InputError(f"{label}: {rgb.shape[1]}x{rgb.shape[0]} is not an aligned 112x112 crop and no face "
                             f"detector ({' / '.join(DETECTOR_NAMES)}) sits beside {self.path}")
        from insightface.utils import face_align

        bboxes, kpss = self.det.detect(bgr, max_num=0)
        if bboxes is None or len(bboxes) == 0:
            raise NoFaceError(f"{label}: no face found")
        areas = (bboxes[:, 2] - bboxes[:, 0]) * (bboxes[:, 3] - bboxes[:, 1])
        if len(bboxes) > 1:
            warnings.warn(f"{label}: {len(bboxes)} faces found; using the largest (Arc2Face's rule)")
        return face_align.norm_crop(bgr, landmark=kpss[int(np.argmax(areas))], image_size=112)

    @torch.no_grad()
    def encode(self, images, batch_size: int = 64) -> torch.Tensor:
        arrs = as_image_batch(images)
        crops = [self._crop(a, f"images[{i}]") for i, a in enumerate(arrs)]
        feats = [self.rec.get_feat(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)]
        emb = torch.from_numpy(np.concatenate(feats).astype(np.float32))
        if not torch.isfinite(emb).all():
            raise ModelLoadError(f"{self.path}: produced non-finite embeddings")
        return F.normalize(emb, dim=1)
