"""erase() and verify(): the orchestration every front end (Python, CLI, benchmarks) goes through."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastforget.errors import InputError
from fastforget.identity.embeddings import (check_embeddings, identity_sets, is_embedding_like,  # noqa: F401
                                            is_id_list, to_embeddings)
from fastforget.verify import Report, check_salt, image_grid, verify  # noqa: F401  (public here too)

log = logging.getLogger("fastforget")


# ---------------------------------------------------------------- erase
@dataclass
class ErasureResult:
    model: object
    patch: object
    report: Report | None
    anchors: torch.Tensor | None = None  # who each target was mapped to (gallery identities; never saved)

    def save(self, directory, overwrite: bool = False) -> Path:
        """Erased model (self-contained folder) + patch.safetensors + report.json/png, atomically."""
        from fastforget.io import atomic_directory

        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.model.save_pretrained(tmp / "model")
            self.patch.save(tmp / "patch.safetensors")
            if self.report is not None:
                self.report.save(tmp)
            self._write_extra(tmp)
        return Path(directory)

    def _write_extra(self, tmp: Path) -> None:
        """Subclasses add their files (a batch's ledger and statistics) inside the same atomic write."""


def _resolve_preserve(preserve, model, encoder_fn, seed: int, progress: bool):
    """preserve= "auto" (the default set), None (only `retain`: warned), a .npy path, or a gallery in any
    identity form -> PreservationSet or None."""
    import os

    from fastforget.identity import preservation

    if isinstance(preserve, str) and preserve == "auto":
        return preservation.default_set(model, encoder_fn(), progress=progress)
    if preserve is None:
        log.warning("preserve=None: only `retain` is held fixed, so identities nobody named may move with the edit")
        return None
    if isinstance(preserve, (str, os.PathLike)):
        from fastforget.identity.gallery import is_gallery_file

        if is_gallery_file(preserve):  # ff.gallery.save(..., dtype=...): any size, memory-mapped
            return preservation.from_gallery_file(preserve)
    if isinstance(preserve, (str, os.PathLike)) and str(preserve).endswith(".npy"):
        from fastforget.identity.gallery import load as load_gallery

        return preservation.from_gallery(load_gallery(preserve))
    if isinstance(preserve, str):
        raise InputError(f"preserve: expected 'auto', None, a .npy or gallery file or (N, 512) embeddings, "
                         f"got {preserve!r}")
    enc = None if is_embedding_like(preserve) else encoder_fn()
    return preservation.from_gallery(to_embeddings(preserve, enc, "preserve", seed=seed))


def _same_person(a: torch.Tensor, b: torch.Tensor, what_a: str, what_b: str) -> None:
    from fastforget.errors import ConflictError
    from fastforget.identity.embeddings import SAME_PERSON_COS

    hit = ((a @ b.T) >= SAME_PERSON_COS).nonzero()
    if len(hit):
        i, j = hit[0].tolist()
        raise ConflictError(f"{what_a}[{i}] is also in retain ({what_b}[{j}]: cosine {float(a[i] @ b[j]):.3f} >= "
                            f"{SAME_PERSON_COS}, the same person): a person cannot be both forgotten and retained")


def _fit_checked(method, fit, model, request, seed, progress, options):
    """Run the method; refuse non-finite weights (nothing applied); the erased copy shares every other tensor."""
    from fastforget.errors import FitError

    t0 = time.perf_counter()
    patch = fit(model, request, seed=seed, progress=progress, **options)
    fit_s = time.perf_counter() - t0
    bad = [k for k, v in patch.new.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FitError(f"{method}: produced non-finite weights in {bad[0]!r} ({len(bad)} tensor(s)); nothing was "
                       "applied. Lower the learning rate / weights and retry")
    erased = model.clone(only=patch.names)
    patch.apply(erased)
    return patch, erased, fit_s


def erase(model, targets, method: str = "piu", retain=None, anchor="auto", encoder=None, seed: int = 0,
          progress: bool = True, *, preserve="auto", salt: str | None = None, report: bool = True,
          verify_n: int = 4, anchor_tau: float = 0.2, **options) -> ErasureResult:
    """Erase `targets` from `model`; returns ErasureResult(model, patch, report). The input model is
    not modified: the patch is applied to a copy that shares every tensor the patch does not change.

    `encoder` is the identity encoder the model was trained with (insightface ArcFace ONNX for Arc2Face);
    it encodes images, scores the report and builds the default preservation set. Only the testbed
    (`ff.load("demo")`) has a default. `preserve="auto"` holds a large set of identities nobody named
    fixed (see fastforget.identity.preservation); pass a gallery (embeddings, a .npy file, photos) to use
    real faces instead. `anchor="auto"` picks, per target, an identity of `retain` (when it has >= 4) or
    of the preservation set at cosine `anchor_tau` (PIU: 0.2; 0.0 maps a target to someone unrelated), or,
    given a gallery file's path (`ff.gallery.save(..., dtype=...)`, any size), from that file's rows."""
    from fastforget.identity.anchors import check_request, select_anchors
    from fastforget.identity.encoder import resolve_encoder
    from fastforget.methods import ErasureRequest
    from fastforget.methods.base import get_method, validate_options
    from fastforget.models import load
    from fastforget.models.common import check_float, check_int, check_seed
    from fastforget.patch import DEFAULT_SALT

    # ---- everything cheap first: a bad option never costs a model load or a fit
    if not isinstance(method, str):
        raise InputError(f"method: expected a method name, got {type(method).__name__}")
    validate_options(method, options)  # unknown method / option names and bad values
    seed = check_seed(seed, 2 ** 20)
    salt = check_salt(DEFAULT_SALT if salt is None else salt)
    if not isinstance(progress, bool) or not isinstance(report, bool):
        raise InputError("progress / report: expected True or False")
    if report:
        from fastforget.verify import MAX_PER_IDENTITY

        check_int(verify_n, "verify_n", 1, MAX_PER_IDENTITY)
    anchor_tau = check_float(anchor_tau, "anchor_tau")
    fit = get_method(method)
    model = load(model)
    from fastforget.methods.base import check_model

    check_model(method, model)  # e.g. closed_form on an unconditional model: refused here, not mid-fit
    if hasattr(model, "synthesis") and hasattr(model, "invert"):  # a latent generator (StyleGAN2): GUIDE's path
        return _erase_latent_generator(model, targets, method, fit, retain, encoder, seed, progress, salt, report,
                                       verify_n, options)
    if report and not (hasattr(model, "condition") or hasattr(model, "id_tokens")):  # Arc2Face or a portrait model
        raise InputError(f"report: the report generates identities, which this {getattr(model, 'family', '')} "
                         "model cannot (it has no identity conditioning); pass report=False")
    encoder = resolve_encoder(encoder, model, "erase") if encoder is not None or model.is_testbed else None

    def need_encoder():
        return encoder if encoder is not None else resolve_encoder(None, model, "erase")

    def encoder_for(x):  # embeddings need no encoder; ids and images do
        return None if is_embedding_like(x) else need_encoder()

    target_sets = identity_sets(targets, encoder_for(targets), "targets", seed=seed)
    tgt = F.normalize(torch.stack([s.mean(0) for s in target_sets]), dim=1)
    ret = None
    if retain is not None:
        ret = to_embeddings(retain, encoder_for(retain), "retain", seed=seed)
        _same_person(tgt, ret, "targets", "retain")
    if report:
        need_encoder()  # the report scores generations: fail now, not after the fit
    pres = _resolve_preserve(preserve, model, need_encoder, seed, progress)
    if pres is not None:
        # a target inside the preservation set would be held and erased at once: drop those rows
        keep = (pres.embeddings @ tgt.T).amax(1) < 0.9
        if not keep.all():
            log.info("preservation set: %d row(s) are a target and were left out", int((~keep).sum()))
            pres.embeddings = pres.embeddings[keep]
    check_request(tgt, None, ret)
    if isinstance(anchor, str) and anchor == "auto":
        pool = ret if ret is not None and len(ret) >= 4 else pres.anchor_pool if pres is not None else ret
        anchors, _ = select_anchors(tgt, pool, tau=anchor_tau, seed=seed)
    elif isinstance(anchor, (str, Path)):  # a gallery file: PIU's rule over its rows, streamed
        anchors, _ = select_anchors(tgt, anchor, tau=anchor_tau, seed=seed)
    else:
        anchors = check_embeddings(anchor, name="anchor")
    check_request(tgt, anchors, ret)
    extra = {"target_sets": target_sets}
    if not is_id_list(targets) and not is_embedding_like(targets):  # photos: methods that work from images
        from fastforget.identity.encoder import as_image_batch  # (bia inverts them) get them, never stored

        extra["target_images"] = as_image_batch(targets, "targets")
    request = ErasureRequest(tgt, anchors, ret, pres.embeddings if pres is not None else None, salt=salt,
                             extra=extra, encoder=encoder)
    patch, erased, fit_s = _fit_checked(method, fit, model, request, seed, progress, options)
    rep = None
    if report:
        rep = verify(erased, tgt, retain=ret, encoder=need_encoder(), n=verify_n, seed=seed, baseline=model,
                     target_ids=targets if is_id_list(targets) and model.is_testbed else None, anchors=anchors,
                     salt=request.salt)
        rep.details["method"] = method
        rep.details["fit_seconds"] = fit_s
        rep.details["patch_fingerprint"] = patch.fingerprint()
        rep.details["preservation"] = None if pres is None else {"kind": pres.kind, "size": len(pres.embeddings)}
    log.info("erased %d identities with %s in %.2fs (patch %s)", len(tgt), method, fit_s, patch.fingerprint())
    return ErasureResult(erased, patch, rep, anchors)


def _erase_latent_generator(model, targets, method, fit, retain, encoder, seed, progress, salt, report, verify_n,
                            options) -> ErasureResult:
    """erase() on a StyleGAN2: targets are photos (each inverted into W+ by the method) or W+ latents
    (N, n_latent, style_dim); the encoder scores identity (inversion, the ID loss, the report)."""
    from fastforget.identity.encoder import as_image_batch, resolve_encoder
    from fastforget.methods import ErasureRequest

    encoder = resolve_encoder(encoder, model, "erase")
    if isinstance(targets, torch.Tensor) and targets.ndim == 3:
        w = targets.detach().float()
        if tuple(w.shape[1:]) != (model.n_latent, model.style_dim) or not len(w) or not torch.isfinite(w).all():
            raise InputError(f"targets: W+ latents must be finite (N, {model.n_latent}, {model.style_dim}), got "
                             f"{tuple(w.shape)}")
        with torch.no_grad():
            emb = encoder.encode_tensor(model.synthesis(w)).float()
        extra = {"target_latents": w}
    else:
        photos = as_image_batch(targets, "targets")
        emb = encoder.encode(photos, name="targets").float()
        extra = {"target_images": photos}
    ret = as_image_batch(retain, "retain") if retain is not None else None
    if ret is not None:
        extra["retain_images"] = ret  # methods that can hold people fixed (guide) invert and keep them
    emb = F.normalize(emb, dim=1)
    request = ErasureRequest(emb, emb, None, None, salt=salt, extra=extra, encoder=encoder)
    patch, erased, fit_s = _fit_checked(method, fit, model, request, seed, progress, options)
    rep = None
    if report:
        from fastforget.verify_gan import verify_gan

        photos = extra.get("target_images")
        if photos is None:
            with torch.no_grad():
                from fastforget.identity.embeddings import to_uint8

                photos = list(to_uint8(model.synthesis(extra["target_latents"])))
        rep = verify_gan(erased, photos, baseline=model, encoder=encoder, retain=ret, n=max(16, verify_n * 16),
                         fd_n=max(64, verify_n * 64), seed=seed, latents=request.extra.get("w_u"))
        rep.details.update(method=method, fit_seconds=fit_s, patch_fingerprint=patch.fingerprint())
    log.info("erased %d photo(s) with %s in %.2fs (patch %s)", len(emb), method, fit_s, patch.fingerprint())
    return ErasureResult(erased, patch, rep, None)
