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

    def fingerprint(self) -> str:
        """sha256 of the recognition model file (and the detector's, when there is one)."""
        import hashlib

        if getattr(self, "_fp", None) is None:
            h = hashlib.sha256()
            for f in (self.path, getattr(self.det, "model_file", None)):
                if f is not None and Path(f).is_file():
                    h.update(Path(f).read_bytes())
            self._fp = h.hexdigest()
        return self._fp

    def _embed(self, crops: list[np.ndarray], batch_size: int = 64) -> torch.Tensor:
        feats = [self.rec.get_feat(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)]
        emb = torch.from_numpy(np.concatenate(feats).astype(np.float32))
        if not torch.isfinite(emb).all():
            raise ModelLoadError(f"{self.path}: produced non-finite embeddings")
        if (emb.norm(dim=1) == 0).any():
            raise ModelLoadError(f"{self.path}: produced a zero embedding")
        return F.normalize(emb, dim=1)

    @torch.no_grad()
    def encode(self, images, name: str = "images", batch_size: int = 64) -> torch.Tensor:
        from fastforget.models.common import check_int

        check_int(batch_size, "batch_size")
        arrs, labels = as_image_batch(images, name=name, with_labels=True)
        return self._embed([self._crop(a, lab) for a, lab in zip(arrs, labels)], batch_size)

    @torch.no_grad()
    def encode_tensor(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Generated images (N, 3, H, W) in [-1, 1]. With a detector beside the model each image is
        detected and aligned (Arc2Face's evaluation); an image with no face, or any image when there is
        no detector, is taken as an aligned face and resized to 112x112 (generators in this family
        draw centred, aligned faces). Not differentiable: ONNX Runtime has no gradients."""
        from fastforget.identity.embeddings import to_uint8

        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"generated images: expected (N, 3, H, W), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise InputError("generated images: contain NaN or inf")
        arrs = to_uint8(x)
        crops = []
        for a in arrs:
            crop = None
            if self.det is not None and a.shape[:2] != (112, 112):
                try:
                    crop = self._crop(a, "generated image")
                except NoFaceError:
                    crop = None
            if crop is None:
                resized = F.interpolate(torch.from_numpy(a).permute(2, 0, 1)[None].float(), size=(112, 112),
                                        mode="area" if a.shape[0] >= 112 else "bilinear", align_corners=None)
                crop = np.ascontiguousarray(resized[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()[..., ::-1])
            crops.append(crop)
        return self._embed(crops, batch_size)
