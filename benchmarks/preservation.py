"""Do people nobody named stay put without a face gallery? (issue: production path, section 2)

    python benchmarks/preservation.py [--scenario testbed-copy|random-arc2face|both] [--drawn 256]

Two scenarios, the issue's anchors printed beside the measured figures, one table:

* `testbed-copy`: a copy of the testbed folder loaded as a user's model (its 2,000-identity gallery
  is not used). 5 targets (ids 200-204), 8 retained (300-307), 20 identities nobody named (400-419),
  closed_form, 2 generations per identity at 25 DDIM steps. AccR / ISM_r on the 20 unnamed must be
  >= 0.95 x the unedited model's and AccU <= 0.05. Rows: no preservation set, 2,000 random unit
  vectors, the default set (preserve="auto"), and the testbed gallery for reference.
* `random-arc2face`: a real-layout random-weight Arc2Face folder with a random-weight ArcFace ONNX
  encoder; retain = 8 random identities, 20 random unit vectors nobody named. Movement at fixed x_t
  (fastforget.metrics.identity_movement) of unnamed identities <= 0.10 of the target->anchor distance,
  of the named ones <= 0.05.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastforget as ff
from fastforget.identity import preservation
from fastforget.identity.embeddings import random_unit_vectors, to_embeddings
from fastforget.metrics import identity_movement, identity_scores


def testbed_copy(args, rows):
    from fastforget.identity.anchors import testbed_gallery
    from fastforget.testbed import weights_dir

    enc = ff.load_encoder("demo")
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(weights_dir() / "generator", tmp / "model")
    model = ff.load(tmp / "model")
    assert not model.is_testbed
    T = to_embeddings(list(range(200, 205)), enc)
    R = to_embeddings(list(range(300, 308)), enc)
    U = to_embeddings(list(range(400, 420)), enc)
    cents = torch.cat([T, R, U])
    lab = torch.arange(len(cents))

    def score(m):
        out = {}
        for name, e, off in (("u", U, len(T) + len(R)), ("f", T, 0)):
            g = m.generate_tensor(e.repeat_interleave(args.n, 0), seed=1, steps=25, guidance=3.0)
            s = identity_scores(enc.encode_tensor(g), lab[off:off + len(e)].repeat_interleave(args.n), cents, lab)
            out[name] = s
        return {"acc_r": out["u"]["accuracy"], "ism_r": out["u"]["ism"], "acc_u": out["f"]["accuracy"],
                "ism_f": out["f"]["ism"]}

    base = score(model)
    rows.append(("testbed-copy", "unedited", None, base, None))
    cases = [("none", None), ("2,000 random unit vectors", random_unit_vectors(2000, seed=3)),
             ("default (preserve='auto')", "auto"), ("testbed gallery (reference)", testbed_gallery(enc))]
    for label, pres in cases:
        t0 = time.perf_counter()
        res = ff.erase(model, T, method="closed_form", retain=R, encoder=enc, preserve=pres, report=False,
                       progress=True, anchor_tau=args.anchor_tau)
        cold = time.perf_counter() - t0
        warm = None
        if isinstance(pres, str):  # the second request reuses the cached statistics
            t0 = time.perf_counter()
            ff.erase(model, T, method="closed_form", retain=R, encoder=enc, report=False, progress=False,
                     anchor_tau=args.anchor_tau)
            warm = time.perf_counter() - t0
        m = score(res.model)
        ok = m["acc_r"] >= 0.95 * base["acc_r"] and m["ism_r"] >= 0.95 * base["ism_r"] and m["acc_u"] <= 0.05
        rows.append(("testbed-copy", label, (cold, warm), m, ok))
        print(rows[-1], flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


def random_arc2face(args, rows):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_arcface_onnx import export_tiny_arcface
    from test_models import _tiny_parts

    from fastforget.testbed.nets import write_tokenizer

    tmp = Path(tempfile.mkdtemp())
    unet, text, vae, sched = _tiny_parts()
    unet.save_pretrained(tmp / "models" / "arc2face")
    text.save_pretrained(tmp / "models" / "encoder")
    write_tokenizer(tmp / "sd15" / "tokenizer", max_length=77)
    vae.save_pretrained(tmp / "sd15" / "vae")
    sched.save_pretrained(tmp / "sd15" / "scheduler")
    export_tiny_arcface(tmp / "arcface.onnx")
    enc = ff.load_encoder(tmp / "arcface.onnx")
    model = ff.load(tmp / "models", base=tmp / "sd15")
    T, R, U = random_unit_vectors(3, seed=11), random_unit_vectors(8, seed=12), random_unit_vectors(20, seed=13)
    for label, pres in (("none", None), ("default (preserve='auto')", "auto")):
        t0 = time.perf_counter()
        res = ff.erase(model, T, method="closed_form", retain=R, encoder=enc, preserve=pres, report=False,
                       progress=False)
        fit = time.perf_counter() - t0
        un = identity_movement(model, res.model, T, res.anchors, U).mean().item()
        named = identity_movement(model, res.model, T, res.anchors, R).mean().item()
        rows.append(("random-arc2face", label, (fit, None), {"unnamed_move": un, "named_move": named},
                     un <= 0.10 and named <= 0.05))
        print(rows[-1], flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="both", choices=["testbed-copy", "random-arc2face", "both"])
    ap.add_argument("--n", type=int, default=2, help="generations per identity")
    ap.add_argument("--anchor-tau", type=float, default=0.2)
    ap.add_argument("--drawn", type=int, help="override the default recipe's drawn identities")
    ap.add_argument("--random", type=int, help="override the default recipe's random unit vectors")
    ap.add_argument("--cache", help="preservation cache folder (default: a fresh temporary one: cold)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "preservation"))
    args = ap.parse_args(argv)
    import os

    os.environ["FASTFORGET_CACHE"] = args.cache or tempfile.mkdtemp()
    for k in ("drawn", "random"):
        if getattr(args, k) is not None:
            preservation.DEFAULT_RECIPE[k] = getattr(args, k)
    torch.set_num_threads(2)
    rows = []
    if args.scenario in ("random-arc2face", "both"):
        random_arc2face(args, rows)
    if args.scenario in ("testbed-copy", "both"):
        testbed_copy(args, rows)
    recipe = dict(preservation.DEFAULT_RECIPE)
    lines = [f"default recipe: {recipe}", "",
             f"{'scenario':<16} {'preservation set':<30} {'fit s (cold/warm)':>18}  figures  (anchor)  met"]
    for scen, label, t, m, ok in rows:
        ts = "-" if t is None else f"{t[0]:.1f}" + ("" if t[1] is None else f" / {t[1]:.1f}")
        if scen == "testbed-copy":
            anchor = "" if ok is None else "(AccR, ISM_r >= 0.95x unedited; AccU <= 0.05)"
            fig = f"AccR {m['acc_r']:.3f} ISM_r {m['ism_r']:.3f} AccU {m['acc_u']:.3f} ISM_f {m['ism_f']:.3f}"
        else:
            anchor = "(unnamed <= 0.10, named <= 0.05)"
            fig = f"unnamed move {m['unnamed_move']:.3f} named move {m['named_move']:.3f}"
        lines.append(f"{scen:<16} {label:<30} {ts:>18}  {fig}  {anchor}  {'' if ok is None else ('yes' if ok else 'NO')}")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"recipe": recipe, "rows": [
        {"scenario": s, "set": l, "seconds": t, "metrics": m, "met": ok} for s, l, t, m, ok in rows]}, indent=2))


if __name__ == "__main__":
    main()
