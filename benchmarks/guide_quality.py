"""GUIDE on the testbed StyleGAN2, measured as GUIDE measures it and beyond (issue: GUIDE, section 4).

    python benchmarks/guide_quality.py [--identities 3] [--steps 1000] [--methods guide guide_average]

For each held-out testbed identity (ids 600, 601, ...; outside every training range), one render is
the photo given to erase (one identity per call, as GUIDE runs); 3 other renders of the person are
ID_others; 20 other people's renders (ids 700-719) are `retain` (inverted with the unedited G); 500
random latents and 2,000 samples (FD_pre) measure everything else. The testbed encoder scores all.
One table: unedited, guide, guide_average, with the issue's anchors and a "met" column.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import fastforget as ff
from fastforget.testbed import render


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--methods", nargs="+", default=["guide", "guide_average"])
    ap.add_argument("--n", type=int, default=500, help="random latents")
    ap.add_argument("--fd-n", type=int, default=2000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "guide_quality"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from fastforget.verify_gan import verify_gan

    gan = ff.load("demo-gan")
    enc = ff.load_encoder("demo")
    ids = list(range(600, 600 + args.identities))
    photos, _ = render(ids, per_identity=4, seed=11)
    photos = photos.reshape(len(ids), 4, *photos.shape[1:])
    others_ppl, _ = render(list(range(700, 720)), per_identity=1, seed=12)
    per = {m: [] for m in ["unedited"] + args.methods}
    for i, pid in enumerate(ids):
        photo, others = photos[i, :1], photos[i, 1:]
        w_u = gan.invert(photo, encoder=enc, progress=False).detach()
        rep = verify_gan(gan, photo, baseline=gan, encoder=enc, others=others, retain=others_ppl, n=args.n,
                         fd_n=args.fd_n, latents=w_u)
        per["unedited"].append({**rep.metrics, "fit_s": 0.0})
        print("unedited", pid, rep.metrics, flush=True)
        for m in args.methods:
            t0 = time.perf_counter()
            res = ff.erase(gan, photo, method=m, encoder=enc, steps=args.steps, report=False, progress=True)
            fit = time.perf_counter() - t0
            rep = verify_gan(res.model, photo, baseline=gan, encoder=enc, others=others, retain=others_ppl,
                             n=args.n, fd_n=args.fd_n, latents=w_u)
            per[m].append({**rep.metrics, "fit_s": fit})
            print(m, pid, f"fit {fit:.1f}s", rep.metrics, flush=True)
            if i == 0:
                from PIL import Image

                out = Path(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rep.grid).save(out.parent / f"guide_quality_{m}.png")
    mean = {m: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for m, rows in per.items()}
    ga = mean.get("guide_average")
    lines = [f"demo-gan, {len(ids)} held-out identities (one photo each), {args.steps} steps, n={args.n}, "
             f"FD samples {args.fd_n}; testbed encoder", "",
             f"{'method':<14} {'ID':>6} {'ID_oth':>6} {'photo':>6} {'oth_ph':>6} {'strngr':>6} {'rand':>6} "
             f"{'retain':>6} {'FD_pre':>7} {'s/id':>6}  met"]
    for m, r in mean.items():
        met = ""
        if m == "guide":
            checks = [r["id_photo"] <= r["stranger"] + 0.05, r["id_others_photo"] <= r["stranger"] + 0.05,
                      r["random_id"] >= 0.90, r["retain_ratio"] >= 0.95, r["fit_s"] <= 180]
            if ga:
                checks += [r["id"] < ga["id"], r["id_others"] < ga["id_others"]]
            met = "yes" if all(checks) else "NO"
        lines.append(f"{m:<14} {r['id']:6.3f} {r['id_others']:6.3f} {r['id_photo']:6.3f} {r['id_others_photo']:6.3f} "
                     f"{r['stranger']:6.3f} {r['random_id']:6.3f} {r['retain_ratio']:6.3f} {r['fd_pre']:7.4f} "
                     f"{r['fit_s']:6.1f}  {met}")
    lines += ["", "anchors (guide): ID and ID_others below guide_average's; photo and oth_ph (the erased generation's "
              "cosine to the person's photos) <= stranger + 0.05; rand (random-latent identity kept) >= 0.90; retain "
              "(other people, after/before cosine to their photo) >= 0.95; <= 180 s per identity on 2 CPU cores",
              "ID / ID_oth: cosine between unedited and erased generations at the inverted latent (GUIDE's ID, "
              "lower is better)"]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"per_identity": per, "mean": mean}, indent=2))


if __name__ == "__main__":
    main()
