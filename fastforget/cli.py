"""`fastforget` console command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _grid_png(rows, path, scale: int = 4):
    """rows: list of lists of uint8 (H, W, 3) tiles -> one PNG, nearest-neighbour upscaled."""
    import numpy as np
    from PIL import Image

    from fastforget.io import atomic_write_bytes

    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    pad = 2
    canvas = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = tile
    img = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue(), overwrite=True)


def to_uint8(x):
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    import numpy as np

    return ((x.detach().float().permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)


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
          f"{args.identities} held-out identities, {args.steps} DPM steps, guidance {args.guidance}")
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
    g = to_uint8(gen)
    rows = [[probe[i]] + [g[i * per + j] for j in range(per)] for i in range(len(ids))]
    path = _grid_png(rows, out / "demo_grid.png")
    print(f"grid (rendered | generated x{per}): {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastforget", description="Erase chosen identities from face generators.")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the built-in testbed: generate identities, print the table, write a grid")
    d.add_argument("--out", default="ff_demo", help="folder for the PNG grid (default: ./ff_demo)")
    d.add_argument("--identities", type=int, default=8)
    d.add_argument("--per-identity", type=int, default=3)
    d.add_argument("--steps", type=int, default=25)
    d.add_argument("--guidance", type=float, default=3.0)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
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
