"""`fastforget` console command.

Every user error (a bad argument, a missing or unreadable input, an output that exists or cannot
be written) is reported before any work as one line, `fastforget: error: ...`, with exit status 2
and no traceback. Outputs are checked first (`fastforget.io.check_output_path`) and written
atomically, so an interrupted command leaves the old output or none, never half of a new one.
Set FASTFORGET_DEBUG=1 to get the traceback of an unexpected OSError as well.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

MAX_TESTBED_ID = 2 ** 63 - 1
DEMO_HELD_OUT = 100      # demo: held-out identities are 100, 101, ... (never passed to erase)
DEMO_STRANGERS = range(500, 520)  # demo: more candidate classes for AccU / AccR


def _png_bytes(image) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _grid_png(rows, path, scale: int = 4):
    """rows: lists of uint8 (H, W, 3) tiles -> one PNG written atomically."""
    import numpy as np

    from fastforget.api import image_grid
    from fastforget.io import atomic_write_bytes

    return atomic_write_bytes(path, _png_bytes(image_grid([np.stack(r) for r in rows], scale=scale)),
                              overwrite=True, name="--out")


def _check_demo(args) -> None:
    """Arguments argparse cannot check one at a time."""
    from fastforget.errors import ConflictError

    if args.no_erase:
        return
    held = range(DEMO_HELD_OUT, DEMO_HELD_OUT + args.held_out)
    if args.target in held:
        raise ConflictError(f"--target {args.target} is one of the held-out identities {held.start}..{held.stop - 1} "
                            "(--held-out); pick a target outside that range")
    if args.target in DEMO_STRANGERS:
        raise ConflictError(f"--target {args.target} is one of the demo's stranger identities "
                            f"{DEMO_STRANGERS.start}..{DEMO_STRANGERS.stop - 1}; pick another target")


def cmd_demo(args) -> int:
    from fastforget.io import check_output_path

    _check_demo(args)
    if getattr(args, "family", "arc2face") == "stylegan2":
        return _demo_gan(args)
    out = check_output_path(args.out, name="--out", into=True)  # files are written into it

    import numpy as np
    import torch

    import fastforget as ff
    from fastforget.metrics import class_centroids, identity_scores

    out = Path(args.out)
    torch.manual_seed(0)
    model = ff.load("demo")
    enc = ff.load_encoder("demo")
    ids = np.arange(args.identities)
    print(f"fastforget demo: testbed generator ({model.resolution}x{model.resolution}), "
          f"{args.identities} held-out identities, {args.steps} {type(model.scheduler).__name__} steps, "
          f"guidance {args.guidance}")
    ref, ref_ids = ff.testbed.render(ids, 8, seed=11)
    cents, cent_ids = class_centroids(enc.encode(ref), torch.from_numpy(ref_ids))
    probe, _ = ff.testbed.render(ids, 1, seed=12)
    emb = enc.encode(probe)
    per = args.per_identity
    gen = model.generate_tensor(emb.repeat_interleave(per, 0), seed=args.seed, steps=args.steps,
                                guidance=args.guidance, progress=True)
    gen_emb = enc.encode_tensor(gen)
    labels = torch.from_numpy(np.repeat(ids, per))
    scores = identity_scores(gen_emb, labels, cents, cent_ids)
    sim = gen_emb @ cents.T
    print(f"\n{'identity':>8}  {'ISM (own)':>9}  {'best other':>10}  recognised")
    for k in ids:
        rows = labels == k
        own = sim[rows][:, cent_ids == k].mean().item()
        other = sim[rows][:, cent_ids != k].max().item()
        ok = (cent_ids[sim[rows].argmax(1)] == k).float().mean().item()
        print(f"{k:>8}  {own:>9.3f}  {other:>10.3f}  {ok:>9.0%}")
    print(f"\noverall: nearest-centroid accuracy {scores['accuracy']:.3f}   ISM {scores['ism']:.3f}   "
          f"stranger ISM {scores['stranger_ism']:.3f}")
    from fastforget.models.arc2face import to_uint8

    g = to_uint8(gen)
    rows = [[probe[i]] + [g[i * per + j] for j in range(per)] for i in range(len(ids))]
    path = _grid_png(rows, out / "demo_grid.png")
    print(f"grid (rendered | generated x{per}): {path}")
    if args.no_erase:
        return 0
    return _demo_erase(args, model, enc, out)


def _demo_erase(args, model, enc, out) -> int:
    """Erase testbed identity `--target` with each method; verify on identities nobody named."""
    import time

    import fastforget as ff
    from fastforget.io import atomic_directory

    target = [args.target]
    # never passed to erase(): AccR is on unnamed people
    held_out = list(range(DEMO_HELD_OUT, DEMO_HELD_OUT + args.held_out))
    methods = [("closed_form", {}), ("piu", {"steps": args.piu_steps, "micro_batch": 8, "accumulation": 1})]
    print(f"\nerasing testbed identity {args.target}; retained metrics on {args.held_out} identities nobody named")
    strangers = list(DEMO_STRANGERS)
    rows = []
    for name, opts in methods:
        t0 = time.perf_counter()
        res = ff.erase(model, target, method=name, encoder=enc, seed=0, report=False, progress=True,
                       anchor_tau=args.anchor_tau, **opts)
        fit_s = time.perf_counter() - t0
        # the anchor is a candidate class too (PIU: anchors are retained identities)
        rep = ff.verify(res.model, target, retain=held_out, encoder=enc, n=args.verify_n, seed=1, baseline=model,
                        target_ids=target, strangers=strangers, anchors=res.anchors, neighbours=4)
        rep.details.update(method=name, fit_seconds=fit_s, patch_fingerprint=res.patch.fingerprint(), options=opts)
        with atomic_directory(out / name, overwrite=True, name="--out") as tmp:  # the demo's own subfolder
            rep.save(tmp)
            res.patch.save(tmp / "patch.safetensors")
        label = name if name != "piu" or args.piu_steps == 400 else f"piu ({args.piu_steps} of 400 steps)"
        rows.append((label, fit_s, rep.metrics, out / name / "report.png"))
    base = ff.verify(model, target, retain=held_out, encoder=enc, n=args.verify_n, seed=1, target_ids=target,
                     strangers=strangers, anchors=res.anchors, neighbours=4)  # same candidate classes as the erased rows
    rows.insert(0, ("unedited", None, base.metrics, None))
    keys = [("ism_f", "ISM_f"), ("acc_u", "AccU"), ("ism_r", "ISM_r"), ("acc_r", "AccR"), ("srk", "SRK"),
            ("neighbour_ism", "nbr ISM"), ("other_photo_ism", "photo ISM"), ("stranger_ism", "strgr ISM"),
            ("anchor_ism", "anchr ISM"), ("drift", "drift")]
    print(f"\n{'method':<24}{'fit s':>7}" + "".join(f"{h:>10}" for _, h in keys))
    for label, fit_s, m, _ in rows:
        cells = "".join(f"{m[k]:>10.3f}" if m.get(k) is not None else f"{'-':>10}" for k, _ in keys)
        print(f"{label:<24}{'-' if fit_s is None else f'{fit_s:.1f}':>7}" + cells)
    for label, _, _, png in rows[1:]:
        print(f"{label}: before/after grid {png}")
    return 0


DEMO_GAN_HELD_OUT = 2    # demo --family stylegan2: held-out people 100, 101 (never passed to erase)
DEMO_GAN_RANDOM = 4      # ... and random latents, whose identity should stay put


def _demo_gan(args) -> int:
    """demo --family stylegan2: erase one held-out testbed person from the testbed StyleGAN2 (`demo-gan`) with
    GUIDE from one photo; table of identity cosines before / after, labelled before/after picture."""
    import json
    import time

    import numpy as np
    import torch
    import torch.nn.functional as F

    import fastforget as ff
    from fastforget.identity.embeddings import to_uint8
    from fastforget.io import atomic_write_bytes, check_output_path
    from fastforget.verify_gan import labelled_grid

    check_output_path(args.out, name="--out", into=True)  # files are written into it
    out = Path(args.out)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    gan = ff.load("demo-gan")
    enc = ff.load_encoder("demo")
    held = list(range(DEMO_HELD_OUT, DEMO_HELD_OUT + DEMO_GAN_HELD_OUT))
    people = [args.target] + held
    # one photo each of people the GAN never saw (it was trained on identities from 3,000,000 up)
    photos, _ = ff.testbed.render(people, 1, seed=args.seed)
    print(f"fastforget demo (stylegan2): testbed GAN ({gan.size}x{gan.size}, W+ {gan.n_latent}x{gan.style_dim}); "
          f"erasing testbed person {args.target} from one photo with GUIDE ({args.guide_steps} steps)")
    t0 = time.perf_counter()
    w = gan.invert(photos, encoder=enc, seed=args.seed, progress=True)  # W+ of each photo, unedited generator
    invert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = ff.erase(gan, w[:1], method="guide", encoder=enc, seed=args.seed, progress=True, report=False,
                   steps=args.guide_steps)  # the target's W+ (as erase would invert the photo itself)
    fit_s = time.perf_counter() - t0
    z = torch.randn(DEMO_GAN_RANDOM, gan.style_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        w_rand = gan.mapping(z)[:, None].expand(-1, gan.n_latent, -1).float().cpu()
        w_all = torch.cat([w.float().cpu(), w_rand])
        before, after = gan.generate_tensor(w_all), res.model.generate_tensor(w_all)
        e0, e1 = enc.encode_tensor(before).float(), enc.encode_tensor(after).float()
        ep = enc.encode(photos).float()

    def cos(a, b):
        return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)

    k = len(people)
    photo_before, photo_after, kept = cos(ep, e0[:k]), cos(ep, e1[:k]), cos(e0, e1)
    labels = [f"target {args.target}"] + [f"held-out {i}" for i in held] + \
             [f"random {j}" for j in range(DEMO_GAN_RANDOM)]
    rows = []
    print(f"\n{'who':<16}{'photo~before':>13}{'photo~after':>13}{'before~after':>14}")
    for i, lab in enumerate(labels):
        pb = float(photo_before[i]) if i < k else None
        pa = float(photo_after[i]) if i < k else None
        rows.append({"who": lab, "photo_before": pb, "photo_after": pa, "before_after": float(kept[i])})
        cells = "".join(f"{v:>13.3f}" if v is not None else f"{'-':>13}" for v in (pb, pa))
        print(f"{lab:<16}{cells}{float(kept[i]):>14.3f}")
    rand = kept[k:]
    print(f"\ntarget: cosine of what the generator draws at the photo's latent to the photo {float(photo_before[0]):.3f} "
          f"-> {float(photo_after[0]):.3f}; random latents keep their identity at cosine {float(rand.mean()):.3f} "
          f"(min {float(rand.min()):.3f})")
    blank = np.full((gan.size, gan.size, 3), 255, np.uint8)
    ph = [np.asarray(p) if p.shape[:2] == (gan.size, gan.size) else blank for p in photos]
    grid = labelled_grid([np.stack(ph + [blank] * DEMO_GAN_RANDOM), to_uint8(before), to_uint8(after)],
                         ["photo", "before", "after"], [lab.replace("held-out ", "held ") for lab in labels], scale=3)
    png = atomic_write_bytes(out / "demo_gan_grid.png", _png_bytes(grid), overwrite=True, name="--out")
    total = time.perf_counter() - t_start
    summary = {"family": "stylegan2", "model": "demo-gan", "target": args.target, "held_out": held,
               "guide_steps": args.guide_steps, "patch_fingerprint": res.patch.fingerprint(), "rows": rows,
               "invert_seconds": invert_s, "fit_seconds": fit_s, "seconds": total}
    atomic_write_bytes(out / "demo_gan.json", json.dumps(summary, indent=1).encode(), overwrite=True, name="--out")
    res.patch.save(out / "demo_gan_patch.safetensors", overwrite=True)
    print(f"before/after picture (rows: photo | unedited | erased): {png}")
    print(f"inversion {invert_s:.1f}s, GUIDE {fit_s:.1f}s, total {total:.1f}s; patch {res.patch.fingerprint()} "
          f"({len(res.patch.names)} tensors): {out / 'demo_gan_patch.safetensors'}")
    return 0


def _is_gan(model) -> bool:
    return hasattr(model, "synthesis") and hasattr(model, "invert")


def _gan_photos(values, name: str):
    """A StyleGAN2 erases photos: testbed ids become one rendered photo each (seed 0); paths stay paths."""
    import numpy as np

    if isinstance(values, np.ndarray):
        from fastforget.errors import InputError

        raise InputError(f"{name}: a StyleGAN2 erases people from photos (image paths or testbed ids), "
                         "not from embeddings")
    if not values or not isinstance(values[0], int):
        return values
    import fastforget as ff

    photos, _ = ff.testbed.render(values, 1, seed=0)
    return list(photos)


def _identities(values, name: str):
    """CLI identity list, checked before any model is loaded: integers are testbed ids (>= 0),
    one *.npy file holds (N, 512) embeddings, anything else is image paths (which must exist)."""
    import numpy as np

    from fastforget.errors import InputError

    if values is None:
        return None
    if all(v.lstrip("-").isdigit() for v in values):
        ids = [int(v) for v in values]
        bad = [v for v in ids if not 0 <= v <= MAX_TESTBED_ID]
        if bad:
            raise InputError(f"{name}: testbed identity ids are integers in [0, {MAX_TESTBED_ID}], got {bad[0]}")
        return ids
    if len(values) == 1 and values[0].lower().endswith(".npy"):
        path = Path(values[0])
        if not path.is_file():
            raise InputError(f"{name}: {path}: no such file (expected a .npy of (N, 512) embeddings)")
        try:
            with open(path, "rb") as f:
                if f.read(6) != b"\x93NUMPY":
                    raise InputError(f"{name}: {path}: not a .npy file (expected (N, 512) embeddings saved with "
                                     "numpy.save)")
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            if isinstance(exc, InputError):
                raise
            why = ("it holds Python objects (a pickle), which are never loaded" if "pickle" in str(exc)
                   else str(exc)[:200])
            raise InputError(f"{name}: {path}: not a plain .npy array of (N, 512) embeddings ({why})") from None
        except (OSError, EOFError) as exc:
            raise InputError(f"{name}: {path}: not a readable .npy file ({str(exc)[:200]})") from None
        if not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.floating)
                                                   or np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"{name}: {path}: expected a numeric (N, 512) array, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] != 512 or arr.shape[0] == 0:
            raise InputError(f"{name}: {path}: expected (N, 512) embeddings, got shape {tuple(arr.shape)}")
        return arr.astype(np.float32)
    for v in values:
        if not Path(v).is_file():
            raise InputError(f"{name}: {v}: no such image file (identities are testbed ids, image paths, "
                             "or one .npy of (N, 512) embeddings)")
    return list(values)


def _inputs(args) -> list:
    """Existing input paths of a command: an output may not replace a folder holding one of them."""
    names = ("model", "base", "ip_adapter", "encoder", "baseline", "patch", "bank")
    return [getattr(args, k) for k in names if getattr(args, k, None) and Path(getattr(args, k)).exists()]


def cmd_erase(args) -> int:
    from fastforget import distributed
    from fastforget.io import check_output_path

    distributed.init_from_env()  # under torchrun: fine-tuning runs data-parallel, rank 0 alone writes and prints
    check_output_path(args.out, args.overwrite, "--out", keep=_inputs(args))
    target = _identities(args.target, "--target")
    retain = _identities(args.retain, "--retain")

    import fastforget as ff
    from fastforget.methods import get_method

    if args.method is not None:
        get_method(args.method)  # an unknown name fails before the model is loaded

    enc = ff.load_encoder(args.encoder) if args.encoder else None
    model = ff.load(args.model, base=args.base, ip_adapter=args.ip_adapter)
    gan = _is_gan(model)
    if args.method is None:
        args.method = "guide" if gan else "closed_form"
    options = dict(args.option or {})
    if args.steps is not None:
        options["steps"] = args.steps
    preserve = args.preserve
    if gan:  # GUIDE: photos in, the global loss holds everyone else; no preservation set, no anchors
        target, retain = _gan_photos(target, "--target"), _gan_photos(retain, "--retain")
        if preserve not in ("auto", "none"):
            print("fastforget: note: --preserve is not used for a StyleGAN2 (GUIDE's global loss keeps other "
                  "people)", file=sys.stderr)
        preserve = "auto"
    elif preserve == "none":
        preserve = None
    elif preserve != "auto" and Path(preserve).is_dir():
        preserve = ff.gallery.from_folder(preserve, enc)  # a folder of face photos
    elif preserve != "auto" and not ((preserve.endswith(".npy") and Path(preserve).is_file())
                                     or ff.gallery.is_gallery_file(preserve)):
        from fastforget.errors import InputError

        raise InputError(f"--preserve: expected auto, none, a .npy file of (N, 512) embeddings, a gallery file "
                         f"(ff.gallery.save(..., dtype=...)) or a folder of face photos; {preserve!r} is none of these")
    res = ff.erase(model, target, method=args.method, retain=retain, encoder=enc, seed=args.seed,
                   progress=distributed.is_main(), verify_n=args.verify_n, anchor_tau=args.anchor_tau,
                   preserve=preserve, report=distributed.is_main(), **options)
    if not distributed.is_main():  # the same patch as rank 0's; wait while rank 0 writes it
        distributed.barrier()
        distributed.shutdown()
        return 0
    if hasattr(res.model, "save_ip_adapter"):  # a portrait generator: the erased adapter file, original layout
        out, what = _save_portrait(res, args), Path(res.model.ip_adapter).name
    else:
        out, what = res.save(args.out, overwrite=args.overwrite), "model"
    print(f"erased with {args.method}: patch {res.patch.fingerprint()} ({len(res.patch.names)} tensors)")
    if res.report is not None:
        print(res.report.table())
    print(f"written: {out}/{what}, {out}/patch.safetensors" + (f", {out}/report.json, {out}/report.png"
                                                                 if res.report is not None else ""))
    distributed.barrier()
    distributed.shutdown()
    return 0


def _save_portrait(res, args) -> Path:
    """OUT/<adapter file name> (the erased checkpoint in the input's layout: deployment swaps this one file),
    patch.safetensors and the report, atomically."""
    from fastforget.io import atomic_directory

    with atomic_directory(args.out, overwrite=args.overwrite, name="--out") as tmp:
        res.model.save_ip_adapter(tmp / Path(res.model.ip_adapter).name)
        res.patch.save(tmp / "patch.safetensors")
        if res.report is not None:
            res.report.save(tmp)
    return Path(args.out)


def cmd_verify(args) -> int:
    from fastforget.errors import OutputExistsError
    from fastforget.io import atomic_write_bytes, check_output_path

    out = None
    if args.out:
        out = check_output_path(args.out, name="--out", into=True)  # report.json / report.png go into it
        for f in ("report.json", "report.png"):
            if (out / f).exists() and not args.overwrite:
                raise OutputExistsError(f"--out: {Path(args.out) / f} exists (pass --overwrite to replace it)")
    target = _identities(args.target, "--target")
    retain = _identities(args.retain, "--retain")

    import fastforget as ff

    enc = ff.load_encoder(args.encoder) if args.encoder else None
    model = ff.load(args.model, base=args.base, ip_adapter=args.ip_adapter)
    baseline = ff.load(args.baseline, base=args.base, ip_adapter=args.ip_adapter) if args.baseline else None
    rep = ff.verify(model, target, retain=retain, encoder=enc, n=args.n, seed=args.seed, baseline=baseline)
    print(rep.table())
    if out is not None:
        written = [atomic_write_bytes(out / "report.json", rep.to_json().encode(), overwrite=True, name="--out")]
        if rep.grid is not None:
            written.append(atomic_write_bytes(out / "report.png", _png_bytes(rep.grid), overwrite=True, name="--out"))
        print("written: " + ", ".join(str(Path(args.out) / w.name) for w in written))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with fastforget's error line: usage, then `fastforget: error: ...`, exit 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"fastforget: error: {message}\n")


def _int(lo: int | None = None, hi: int | None = None):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bound = " and ".join(b for b in (f">= {lo}" if lo is not None else "",
                                             f"<= {hi}" if hi is not None else "") if b)
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text}")
        return v

    parse.__name__ = "integer"
    return parse


def _float(lo: float | None = None, hi: float | None = None, hi_open: bool = False):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (lo is not None and v < lo) or (hi is not None and (v >= hi if hi_open else v > hi)):
            rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}" + (")" if hi_open else "]")
            raise argparse.ArgumentTypeError(f"must be in {rng}, got {text}")
        return v

    parse.__name__ = "number"
    return parse


SEED = _int(0, 2 ** 63 - 1)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="fastforget", description="Erase chosen identities from face generators.")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the built-in testbed: generate identities, print the table, write a grid")
    d.add_argument("--out", default="ff_demo",
                   help="folder for the PNG grid and the erasures' reports (default: ./ff_demo; it may exist: "
                        "the demo's own files in it are replaced, nothing else is touched)")
    d.add_argument("--identities", type=_int(2, 10000), default=6, help="identities in the generation table (>= 2)")
    d.add_argument("--per-identity", type=_int(1, 64), default=2)
    d.add_argument("--steps", type=_int(1, 1000), default=25, help="sampling steps (1..1000)")
    d.add_argument("--guidance", type=_float(0.0), default=3.0, help="classifier-free guidance (finite, >= 0)")
    d.add_argument("--seed", type=SEED, default=0)
    d.add_argument("--target", type=_int(0, MAX_TESTBED_ID), default=0, help="testbed identity to erase")
    d.add_argument("--held-out", type=_int(1, 400), default=6, help="identities measured for AccR (never named)")
    d.add_argument("--verify-n", type=_int(1), default=2)
    d.add_argument("--piu-steps", type=_int(1), default=30, help="shortened PIU schedule for the demo (paper: 400)")
    d.add_argument("--no-erase", action="store_true", help="only the generation table")
    d.add_argument("--anchor-tau", type=_float(-1.0, 0.9, hi_open=True), default=0.2,
                   help="anchor rule's cosine to the target, in [-1, 0.9) (PIU: 0.2)")
    d.add_argument("--family", choices=["arc2face", "stylegan2"], default="arc2face",
                   help="arc2face (default): the testbed Arc2Face table and erasures; stylegan2: erase one held-out "
                        "person from the testbed StyleGAN2 (demo-gan) with GUIDE, before/after picture and table")
    d.add_argument("--guide-steps", type=_int(1, 100000), default=40,
                   help="stylegan2: GUIDE unlearning steps (paper: 1000; the demo's default runs in about a minute)")
    d.set_defaults(func=cmd_demo)

    def common(p):
        p.add_argument("model", help="'demo' ('demo-faceid', 'demo-gan', ...), a StyleGAN2 .pt checkpoint, a "
                                     "fastforget model folder, an Arc2Face release "
                                     "folder, or a diffusers pipeline folder (with --ip-adapter)")
        p.add_argument("--base", help="SD-1.5 folder (tokenizer/, vae/, scheduler/) for the Arc2Face layout")
        p.add_argument("--ip-adapter", help="IP-Adapter FaceID / InstantID checkpoint for a diffusers pipeline folder")
        p.add_argument("--target", nargs="+", required=True,
                       help="testbed ids, image paths, or one .npy of (N, 512) embeddings")
        p.add_argument("--retain", nargs="+", help="same forms as --target")
        p.add_argument("--encoder", help="ArcFace .onnx (or 'demo'); default: the testbed encoder for 'demo'")
        p.add_argument("--seed", type=SEED, default=0)

    e = sub.add_parser("erase", help="erase identities; writes model/, patch.safetensors, report.json")
    e.add_argument("--preserve", default="auto",
                   help="identities held fixed: auto (default set; cached per model), none, a .npy gallery of "
                        "(N, 512) embeddings, a gallery file (any size; anchors drawn from all of it), or a "
                        "folder of face photos encoded with --encoder")
    common(e)
    e.add_argument("--method", default=None,
                   help="closed_form (default), piu, uce, esd_x, bia; portrait generators: closed_form, ireu, "
                        "encoder_finetune; StyleGAN2 checkpoints: guide (default), guide_average")
    e.add_argument("--steps", type=_int(1), help="training steps for fine-tuning methods (guide: unlearning steps)")
    add_option_argument(e)
    e.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--verify-n", type=_int(1), default=4, help="generations per identity in the report")
    e.add_argument("--anchor-tau", type=_float(-1.0, 0.9, hi_open=True), default=0.2,
                   help="automatic anchors sit at this cosine to the target (PIU: 0.2; 0 = an unrelated person)")
    e.set_defaults(func=cmd_erase)
    v = sub.add_parser("verify", help="measure ISM / AccU / AccR / SRK / neighbour ISM for a model")
    common(v)
    v.add_argument("--baseline", help="the model before erasure, for drift and before/after grids")
    v.add_argument("--n", type=_int(1), default=25)
    v.add_argument("--out", help="folder for report.json and report.png (created if needed)")
    v.add_argument("--overwrite", action="store_true", help="replace report.json / report.png in --out")
    v.set_defaults(func=cmd_verify)
    from fastforget.export.cli import add_export_parser

    add_export_parser(sub)
    from fastforget.batch import add_parser as add_batch_parser

    add_batch_parser(sub)
    from fastforget.attacks.cli import add_parser as add_attack_parser

    add_attack_parser(sub)
    return ap


def parse_option(text: str):
    """--option KEY=VALUE -> (key, value); VALUE is read as JSON when it parses (2, 0.5, true, [0.7, 0.9],
    null), else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. adversarial_rounds=2), got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


class _Options(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        opts = dict(getattr(namespace, self.dest, None) or {})
        key, value = values
        if key in opts:
            parser.error(f"{option_string}: {key!r} given twice")
        opts[key] = value
        setattr(namespace, self.dest, opts)


def add_option_argument(p) -> None:
    """`--option KEY=VALUE`, repeatable: any option of the method (README's option tables), checked by it."""
    p.add_argument("--option", action=_Options, type=parse_option, default=None, metavar="KEY=VALUE",
                   help="a method option, repeatable (e.g. --option adversarial_rounds=2 --option "
                        "neighbour_cos=[0.7,0.9]); checked by the method before any work")


def main(argv=None) -> int:
    from fastforget.errors import FastForgetError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastForgetError as exc:
        print(f"fastforget: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder the command was pointed at (permissions, a full disk, ...)
        if os.environ.get("FASTFORGET_DEBUG"):
            raise
        print(f"fastforget: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastforget: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
