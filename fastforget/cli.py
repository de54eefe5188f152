"""`fastforget` console command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _grid_png(rows, path, scale: int = 4):
    """rows: lists of uint8 (H, W, 3) tiles -> one PNG written atomically."""
    import io

    import numpy as np
    from PIL import Image

    from fastforget.api import image_grid
    from fastforget.io import atomic_write_bytes

    buf = io.BytesIO()
    Image.fromarray(image_grid([np.stack(r) for r in rows], scale=scale)).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue(), overwrite=True)


def cmd_demo(args) -> int:
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

    target = [args.target]
    held_out = list(range(100, 100 + args.held_out))  # never passed to erase(): AccR is on unnamed people
    methods = [("closed_form", {}), ("piu", {"steps": args.piu_steps, "micro_batch": 8, "accumulation": 1})]
    print(f"\nerasing testbed identity {args.target}; retained metrics on {args.held_out} identities nobody named")
    strangers = list(range(500, 520))  # more candidate identities for the nearest-centroid AccU / AccR
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
        rep.save(out / name)
        res.patch.save(out / name / "patch.safetensors", overwrite=True)
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


def _identities(values, encoder):
    """CLI identity list: integers are testbed ids, *.npy files hold (N, 512) embeddings, else image paths."""
    import numpy as np

    if values is None:
        return None
    if all(v.lstrip("-").isdigit() for v in values):
        return [int(v) for v in values]
    if len(values) == 1 and values[0].endswith(".npy"):
        return np.load(values[0], allow_pickle=False).astype(np.float32)
    return list(values)


def cmd_erase(args) -> int:
    import fastforget as ff

    enc = ff.load_encoder(args.encoder) if args.encoder else None
    model = ff.load(args.model, base=args.base)
    options = {}
    if args.steps is not None:
        options["steps"] = args.steps
    res = ff.erase(model, _identities(args.target, enc), method=args.method,
                   retain=_identities(args.retain, enc), encoder=enc, seed=args.seed, progress=True,
                   verify_n=args.verify_n, anchor_tau=args.anchor_tau, **options)
    out = res.save(args.out, overwrite=args.overwrite)
    print(f"erased with {args.method}: patch {res.patch.fingerprint()} ({len(res.patch.names)} tensors)")
    if res.report is not None:
        print(res.report.table())
    print(f"written: {out}/model, {out}/patch.safetensors, {out}/report.json, {out}/report.png")
    return 0


def cmd_verify(args) -> int:
    import fastforget as ff

    enc = ff.load_encoder(args.encoder) if args.encoder else None
    model = ff.load(args.model, base=args.base)
    rep = ff.verify(model, _identities(args.target, enc), retain=_identities(args.retain, enc), encoder=enc,
                    n=args.n, seed=args.seed, baseline=ff.load(args.baseline) if args.baseline else None)
    print(rep.table())
    if args.out:
        rep.save(args.out)
        print(f"written: {args.out}/report.json, {args.out}/report.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastforget", description="Erase chosen identities from face generators.")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the built-in testbed: generate identities, print the table, write a grid")
    d.add_argument("--out", default="ff_demo", help="folder for the PNG grid (default: ./ff_demo)")
    d.add_argument("--identities", type=int, default=6)
    d.add_argument("--per-identity", type=int, default=2)
    d.add_argument("--steps", type=int, default=25)
    d.add_argument("--guidance", type=float, default=3.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--target", type=int, default=0, help="testbed identity to erase")
    d.add_argument("--held-out", type=int, default=6, help="identities measured for AccR (never named)")
    d.add_argument("--verify-n", type=int, default=2)
    d.add_argument("--piu-steps", type=int, default=30, help="shortened PIU schedule for the demo (paper: 400)")
    d.add_argument("--no-erase", action="store_true", help="only the generation table")
    d.add_argument("--anchor-tau", type=float, default=0.2, help="anchor rule's cosine to the target (PIU: 0.2)")
    d.set_defaults(func=cmd_demo)

    def common(p):
        p.add_argument("model", help="'demo', a fastforget model folder, or an Arc2Face release folder")
        p.add_argument("--base", help="SD-1.5 folder (tokenizer/, vae/, scheduler/) for the Arc2Face layout")
        p.add_argument("--target", nargs="+", required=True,
                       help="testbed ids, image paths, or one .npy of (N, 512) embeddings")
        p.add_argument("--retain", nargs="+", help="same forms as --target")
        p.add_argument("--encoder", help="ArcFace .onnx (or 'demo'); default: the testbed encoder for 'demo'")
        p.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("erase", help="erase identities; writes model/, patch.safetensors, report.json")
    common(e)
    e.add_argument("--method", default="closed_form", help="closed_form (default), piu, uce, esd_x, bia")
    e.add_argument("--steps", type=int, help="training steps for fine-tuning methods")
    e.add_argument("--out", required=True)
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--verify-n", type=int, default=4, help="generations per identity in the report")
    e.add_argument("--anchor-tau", type=float, default=0.2,
                   help="automatic anchors sit at this cosine to the target (PIU: 0.2; 0 = an unrelated person)")
    e.set_defaults(func=cmd_erase)
    v = sub.add_parser("verify", help="measure ISM / AccU / AccR / SRK / neighbour ISM for a model")
    common(v)
    v.add_argument("--baseline", help="the model before erasure, for drift and before/after grids")
    v.add_argument("--n", type=int, default=25)
    v.add_argument("--out")
    v.set_defaults(func=cmd_verify)
    from fastforget.export.cli import add_export_parser

    add_export_parser(sub)
    return ap


def main(argv=None) -> int:
    from fastforget.errors import FastForgetError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastForgetError as exc:
        print(f"fastforget: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
