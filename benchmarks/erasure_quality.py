"""Erasure quality on the testbed, every method in one table (issue: PIU / closed form / baselines).

    python benchmarks/erasure_quality.py [--targets 10] [--held-out 40] [--n 4] [--piu-steps 400]

Targets are testbed identities 0..T-1. AccR, ISM_r and drift are measured on identities
100.. that were NOT passed to erase() (PIU evaluates on held-out identities the same way): a
method must not harm people nobody named. closed_form and uce erase all targets in one call;
piu and esd_x erase `--finetune-targets` of them in one training run (their CPU cost is minutes
per step budget), and the table says how many and with how many steps.

AccU / AccR are nearest-centroid accuracy among targets, held-out identities, strangers and
the anchors (PIU's protocol: its anchors are retained identities, so a generation that became
the anchor counts as the anchor). anchor ISM = the anchors' own generations scored against
their targets: where an anchor-replacement method's neighbour ISM bottoms out.

Anchors (who the target should become): AccU, SRK, the neighbour ISM (generations from
embeddings at cosine 0.7-0.9 of a target, scored against the target) next to the stranger ISM
(the floor: other people's generations scored against the targets), and the time ratio
piu(one target) / closed_form(all targets).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import fastforget as ff
from fastforget.api import to_embeddings
from fastforget.identity.anchors import select_anchors, testbed_gallery
from fastforget.methods import ErasureRequest, get_method


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=10)
    ap.add_argument("--finetune-targets", type=int, default=1, help="targets erased by piu / esd_x")
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--strangers", type=int, default=30, help="extra candidate identities (500..) for AccU / AccR")
    ap.add_argument("--n", type=int, default=4, help="generations per identity")
    ap.add_argument("--neighbours", type=int, default=8, help="neighbour embeddings per target (cos 0.7-0.9)")
    ap.add_argument("--steps", type=int, default=25, help="sampling steps")
    ap.add_argument("--piu-steps", type=int, default=400)
    ap.add_argument("--esd-steps", type=int, default=1000)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--methods", default="closed_form,uce,piu,esd_x")
    ap.add_argument("--anchor-tau", type=float, default=0.2, help="anchor rule's target cosine (PIU: 0.2)")
    ap.add_argument("--out", default="benchmarks/results/erasure_quality.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, enc = ff.load("demo"), ff.load_encoder("demo")
    target_ids = list(range(args.targets))
    held = list(range(100, 100 + args.held_out))
    tgt = to_embeddings(target_ids, enc, "targets")
    preserve = testbed_gallery(enc)
    anchors, _ = select_anchors(tgt, preserve, tau=args.anchor_tau, seed=0)

    def measure(m, ids, t_emb):
        return ff.verify(m, t_emb, retain=held, encoder=enc, n=args.n, seed=1, steps=args.steps,
                         baseline=model if m is not model else None, target_ids=ids,
                         strangers=list(range(500, 500 + args.strangers)), neighbours=args.neighbours,
                         anchors=anchors[:len(ids)]).metrics

    rows = []
    base = measure(model, target_ids, tgt)
    rows.append(("unedited", args.targets, None, base))
    options = {"piu": {"steps": args.piu_steps, "micro_batch": args.micro_batch},
               "esd_x": {"steps": args.esd_steps, "micro_batch": args.micro_batch}}
    times = {}
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        k = args.targets if name in ("closed_form", "uce") else args.finetune_targets
        req = ErasureRequest(tgt[:k], anchors[:k], None, preserve)
        t0 = time.perf_counter()
        patch = get_method(name)(model, req, seed=0, progress=True, **options.get(name, {}))
        fit_s = time.perf_counter() - t0
        times[name] = (fit_s, k)
        erased = patch.apply(model.clone())
        label = name
        if name in options:
            label += f" ({options[name]['steps']} steps)"
        rows.append((label, k, fit_s, measure(erased, target_ids[:k], tgt[:k])))
        print(f"{label}: {k} target(s) in {fit_s:.2f}s", file=sys.stderr, flush=True)

    keys = ["acc_u", "acc_r", "srk", "ism_f", "ism_r", "neighbour_ism", "other_photo_ism", "stranger_ism",
            "anchor_ism", "drift"]
    head = f"{'method':<22}{'targets':>8}{'fit s':>9}" + "".join(f"{k:>16}" for k in keys)
    print(head)
    for label, k, fit_s, m in rows:
        cells = "".join(f"{m[c]:>16.3f}" if m.get(c) is not None else f"{'-':>16}" for c in keys)
        print(f"{label:<22}{k:>8}{'-' if fit_s is None else f'{fit_s:.2f}':>9}" + cells)
    print("\nanchors (targets of the issue):")
    for label, k, fit_s, m in rows[1:]:
        ok_u = m["acc_u"] <= 0.05
        ok_r = m["acc_r"] >= 0.95 * base["acc_r"]
        gap = m["neighbour_ism"] - m["stranger_ism"]
        gap_a = m["neighbour_ism"] - m["anchor_ism"]
        print(f"  {label:<22} AccU<=0.05: {'met' if ok_u else 'NOT met'} ({m['acc_u']:.3f});  "
              f"AccR>=0.95x unedited ({0.95 * base['acc_r']:.3f}): {'met' if ok_r else 'NOT met'} ({m['acc_r']:.3f});  "
              f"neighbour ISM - stranger ISM = {gap:.3f} ({'met' if gap <= 0.05 else 'NOT met'}, <= 0.05; "
              f"neighbour ISM - anchor ISM = {gap_a:.3f})")
    if "closed_form" in times and "piu" in times:
        cf_s, cf_k = times["closed_form"]
        piu_s, piu_k = times["piu"]
        per_one = piu_s / piu_k
        print(f"  speed: closed_form erased {cf_k} in {cf_s:.2f}s; piu {piu_s:.1f}s for {piu_k} "
              f"-> ratio piu(one) / closed_form(all) = {per_one / cf_s:.0f}x (anchor: >= 100x)")
    srk = {label.split()[0]: m["srk"] for label, _, _, m in rows[1:]}
    if {"piu", "esd_x", "uce"} <= set(srk):
        print(f"  SRK: piu {srk['piu']:.2f} vs esd_x {srk['esd_x']:.2f}, uce {srk['uce']:.2f} "
              f"({'piu beats both' if srk['piu'] > max(srk['esd_x'], srk['uce']) else 'piu does NOT beat both'})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": [
        {"method": label, "targets": k, "fit_seconds": fit_s, "metrics": m} for label, k, fit_s, m in rows]},
        indent=2, default=float))


if __name__ == "__main__":
    main()
