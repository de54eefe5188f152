"""Encoder-only erasure of portrait generators on the testbed, measured the way IREU claims it (issue 13 §4).

    python benchmarks/portrait_quality.py [--targets 10] [--held-out 20] [--n 4] [--methods closed_form,ireu,...]

Generator A is `ff.load("demo-faceid")` (the testbed UNet + its IP-Adapter FaceID); generator B is
`ff.load("demo-faceid-b")` (the UNet fine-tuned on a shifted domain, the same adapter). Every method erases the
targets (testbed identities 0..T-1) from A's image projection ONCE; the same patch is then applied unchanged
to B (no re-tuning) and both are measured. The unedited encoder is the first row of each table.

AccR, ISM_r and drift are measured on `--held-out` identities 100.. that nobody named (never passed to
erase); AccU / AccR are nearest-centroid accuracy among targets, those identities and the anchors (PIU's
protocol: a generation that became its anchor counts as the anchor). neighbour ISM: generations from
embeddings at cosine 0.7-0.9 of a target scored against it; drift: mean |pixel change| (0-1) of the held-out
identities' generations against the same generator unedited, same seeds. Fit time: the method's fit on A
(the preservation set, the testbed's 2,000 reserved identities, is built once before).

Anchors (issue 13): AccU <= 0.05 and AccR >= 0.95 x unedited, on A and on B, for ireu and closed_form; and
whether ireu keeps retained fidelity better than encoder_finetune (higher AccR, lower drift), reported
whichever way it comes out. Results: benchmarks/results/portrait_quality.{txt,json}.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

import fastforget as ff
from fastforget.api import to_embeddings
from fastforget.identity.anchors import select_anchors, testbed_gallery
from fastforget.identity.embeddings import identity_sets
from fastforget.methods import ErasureRequest, get_method

KEYS = [("acc_u", "AccU"), ("acc_r", "AccR"), ("ism_f", "ISM_f"), ("ism_r", "ISM_r"), ("drift", "drift"),
        ("neighbour_ism", "nbr ISM"), ("other_photo_ism", "photo ISM"), ("stranger_ism", "strgr ISM"),
        ("anchor_ism", "anchr ISM")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=10)
    ap.add_argument("--held-out", type=int, default=20, help="identities nobody named (100..): AccR, ISM_r, drift")
    ap.add_argument("--n", type=int, default=4, help="generations per identity")
    ap.add_argument("--neighbours", type=int, default=4, help="neighbour embeddings per target (cos 0.7-0.9)")
    ap.add_argument("--steps", type=int, default=25, help="sampling steps (DDIM, guidance 3)")
    ap.add_argument("--methods", default="closed_form,encoder_finetune,ireu")
    ap.add_argument("--options", default="{}", help='JSON {"method": {option: value}} overriding the defaults')
    ap.add_argument("--anchor-tau", type=float, default=0.2)
    ap.add_argument("--out", default="benchmarks/results/portrait_quality")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    gens = {"A": ff.load("demo-faceid"), "B": ff.load("demo-faceid-b")}
    enc = ff.load_encoder("demo")
    target_ids = list(range(args.targets))
    held = list(range(100, 100 + args.held_out))
    tgt = to_embeddings(target_ids, enc, "targets")
    target_sets = identity_sets(target_ids, enc, "targets")
    preserve = testbed_gallery(enc)
    anchors, _ = select_anchors(tgt, preserve, tau=args.anchor_tau, seed=0)
    options = json.loads(args.options)

    def measure(m, base):
        return ff.verify(m, tgt, retain=held, encoder=enc, n=args.n, seed=1, steps=args.steps,
                         baseline=base, target_ids=target_ids, neighbours=args.neighbours, anchors=anchors).metrics

    rows = {g: [("unedited", None, measure(model, None))] for g, model in gens.items()}
    fits = {}
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        req = ErasureRequest(tgt, anchors, None, preserve, extra={"target_sets": target_sets}, encoder=enc)
        t0 = time.perf_counter()
        patch = get_method(name)(gens["A"], req, seed=0, progress=True, **options.get(name, {}))
        fit_s = time.perf_counter() - t0
        fits[name] = {"fit_seconds": fit_s, "tensors": patch.names, "parameters": patch.num_parameters(),
                      "options": options.get(name, {}),
                      **{k: patch.metadata[k] for k in ("identity_units", "edited_units", "units", "objective")
                         if k in patch.metadata}}
        for g, model in gens.items():  # the same patch, unchanged, on both generators
            rows[g].append((name, fit_s, measure(patch.apply(model.clone(only=patch.names)), model)))
        print(f"{name}: fit {fit_s:.2f}s, {patch.num_parameters()} parameters in {len(patch.names)} tensors",
              file=sys.stderr, flush=True)

    buf = io.StringIO()
    with redirect_stdout(buf):
        report(args, rows, fits)
    text = buf.getvalue()
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({
        "args": vars(args), "fits": fits,
        "rows": {g: [{"method": m, "fit_seconds": s, "metrics": x} for m, s, x in r] for g, r in rows.items()}},
        indent=2, default=float))


def report(args, rows, fits):
    print(f"portrait_quality: {args.targets} targets erased from generator A's image projection; the same patch "
          f"on B. AccR / ISM_r / drift on {args.held_out} identities nobody named; n={args.n}, {args.steps} "
          "steps, guidance 3.")
    for g, r in rows.items():
        base = r[0][2]
        print(f"\ngenerator {g} ({'demo-faceid' if g == 'A' else 'demo-faceid-b: shifted-domain UNet, same adapter'})")
        print(f"{'method':<18}{'fit s':>8}" + "".join(f"{h:>10}" for _, h in KEYS) + f"{'AccU met':>10}{'AccR met':>10}")
        for name, fit_s, m in r:
            cells = "".join(f"{m[k]:>10.3f}" if m.get(k) is not None else f"{'-':>10}" for k, _ in KEYS)
            met = "" if fit_s is None else (f"{'yes' if m['acc_u'] <= 0.05 else 'no':>10}"
                                            f"{'yes' if m['acc_r'] >= 0.95 * base['acc_r'] else 'no':>10}")
            print(f"{name:<18}{'-' if fit_s is None else f'{fit_s:.2f}':>8}" + cells + met)
        bound = f">={0.95 * base['acc_r']:.3f}"
        print(f"{'anchor (issue 13)':<18}{'':>8}{'<=0.05':>10}{bound:>10}")
    print("\nanchors (issue 13):")
    for g, r in rows.items():
        base = r[0][2]
        res = {name: m for name, _, m in r[1:]}
        for name in ("ireu", "closed_form"):
            if name in res:
                m = res[name]
                ok = m["acc_u"] <= 0.05 and m["acc_r"] >= 0.95 * base["acc_r"]
                print(f"  {g}: {name:<12} AccU {m['acc_u']:.3f} (<= 0.05), AccR {m['acc_r']:.3f} (>= "
                      f"{0.95 * base['acc_r']:.3f} = 0.95 x unedited {base['acc_r']:.3f}): {'met' if ok else 'NOT met'}")
        if "ireu" in res and "encoder_finetune" in res:
            i, f = res["ireu"], res["encoder_finetune"]
            better = i["acc_r"] >= f["acc_r"] and i["drift"] <= f["drift"]
            print(f"  {g}: ireu vs encoder_finetune: AccR {i['acc_r']:.3f} vs {f['acc_r']:.3f}, drift "
                  f"{i['drift']:.4f} vs {f['drift']:.4f} -> ireu keeps retained fidelity "
                  f"{'better (IREU claim holds)' if better else 'NOT better on both (IREU claim does not hold here)'}")
    print("\nfits:")
    for name, f in fits.items():
        extra = ", ".join(f"{k} {v}" for k, v in f.items() if k not in ("fit_seconds", "tensors", "options"))
        print(f"  {name}: {f['fit_seconds']:.2f}s; tensors {', '.join(t.rsplit('layers.0.', 1)[-1] for t in f['tensors'])}"
              f"; {extra}; options {f['options'] or 'defaults'}")


if __name__ == "__main__":
    main()
