"""Re-emergence attacks on the testbed (issue 15): does an erased person come back?

    python benchmarks/attack_suite.py [--family arc2face|gan|portrait|all] [--budget 10] [--rounds 2]

One table per family: method x attack -> ASR and best similarity, the unedited model as the anchor row.
ASR = share of the attack's generations verified as the target (cosine to the target's photos above the
testbed encoder's FAR 1e-3 threshold, calibrated in the run). Attacks: black-box (the target's photos and
inputs at cosine 0.5 ... 0.99 to it; GAN: latents mixed with the target's), white-box (Adam on the input
embedding through a 6-step DDIM sampler from the target's own embedding, one of its photos and a random
vector; GAN: W+ projection of its photos), relearn (fine-tuning attn2 to_k / to_v on 3 photos of the target).

arc2face adds the hardened erase (closed_form with adversarial_rounds): ASR vs attack budget for unedited /
erased / hardened, and rounds vs white-box ASR vs black-box ASR vs AccR (held-out identities 100.., never
named) with the time per round. Targets: testbed identity 0 (held out from every training set).
Each family runs in minutes on one CPU thread; results are merged into benchmarks/results/attack_suite.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fastforget as ff

HELD_OUT = list(range(100, 110))


def _fmt_rows(title: str, rows: list, attacks: list) -> list[str]:
    head = f"{'method':<22}" + "".join(f"{a + ' ASR':>17}{'best sim':>10}" for a in attacks)
    lines = [title, head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r[a]['asr']:>17.3f}{r[a]['best_similarity']:>10.3f}" if a in r else f"{'-':>17}{'-':>10}"
                        for a in attacks)
        lines.append(f"{r['method']:<22}{cells}")
    return lines


def _short(rep) -> dict:
    row = rep.rows[0]
    return {"asr": row["asr"], "best_similarity": row["best_similarity"], "verified": row["verified"],
            "generations": row["generations"], "curve": row["curve"], "seconds": rep.details["seconds"]}


def arc2face(args, enc) -> tuple[list[str], dict]:
    model = ff.load("demo")
    t0 = time.perf_counter()
    fits = {"unedited": (model, 0.0, None)}
    hm = args.hardened
    for name, method, opts in (("closed_form", "closed_form", {}), ("uce", "uce", {})) + tuple(
            (f"{hm} +{r} rounds", hm, {"adversarial_rounds": r, "adversarial_steps": args.round_steps})
            for r in range(1, args.rounds + 1)):
        ts = time.perf_counter()
        res = ff.erase(model, [0], method=method, encoder=enc, report=False, progress=False, **opts)
        fits[name] = (res.model, time.perf_counter() - ts, res.patch.metadata.get("adversarial"))
        print(f"fit {name}: {fits[name][1]:.1f}s", flush=True)
    rows, out = [], {}
    for name, (m, fit_s, adv) in fits.items():
        r = {"method": name, "fit_seconds": fit_s}
        r["black-box"] = _short(ff.attack(m, [0], encoder=enc, kind="neighbours", budget=args.per_level,
                                          progress=False))
        r["white-box"] = _short(ff.attack(m, [0], encoder=enc, kind="embedding", budget=args.budget,
                                          checkpoints=sorted({0, args.budget // 4, args.budget // 2}),
                                          photo_starts=1, random_starts=args.random_starts, n_verify=args.n_verify,
                                          progress=False))
        if not name.startswith(f"{hm} +") or name.endswith(f"+{args.rounds} rounds"):
            r["relearn"] = _short(ff.attack(m, [0], encoder=enc, kind="relearn", budget=args.relearn_steps,
                                            n_verify=args.n_verify, progress=False))
        if name != "unedited":
            v = ff.verify(m, [0], retain=HELD_OUT, encoder=enc, n=args.verify_n, seed=1, baseline=model).metrics
        else:
            v = ff.verify(m, [0], retain=HELD_OUT, encoder=enc, n=args.verify_n, seed=1).metrics
        r["acc_r"], r["ism_r"] = v["acc_r"], v["ism_r"]
        if adv is not None:
            r["rounds"] = adv["rounds"]
        rows.append(r)
        print(name, {k: (v["asr"] if isinstance(v, dict) and "asr" in v else v) for k, v in r.items()
                     if k not in ("method", "rounds")}, flush=True)
    base = rows[0]
    lines = _fmt_rows("ID-conditioned diffusion (demo), target: testbed identity 0", rows,
                      ["black-box", "white-box", "relearn"])
    lines += ["", f"white-box: Adam steps {args.budget}, starts: own embedding, 1 photo, {args.random_starts} random; "
              f"{args.n_verify} verified generations per start (25-step sampler); relearn: {args.relearn_steps} "
              "fine-tuning steps on 3 target photos", "",
              "ASR vs white-box budget (Adam steps)"]
    for r in rows:
        if r["method"] in ("unedited", hm, f"{hm} +{args.rounds} rounds"):
            lines.append(f"  {r['method']:<22}" + "  ".join(f"{c['budget']:>3}: {c['asr']:.2f}"
                                                             for c in r["white-box"]["curve"]))
    lines += ["", f"hardened {hm}:", f"{'rounds':>6} {'white-box ASR':>14} {'black-box ASR':>14} {'AccR':>6} {'AccR/unedited':>14} "
              f"{'fit s':>7} {'s/round':>8}"]
    hard = [r for r in rows if r["method"] == hm] + [r for r in rows if r["method"].startswith(f"{hm} +")]
    for i, r in enumerate(hard):
        per_round = (sum(x["seconds"] for x in r["rounds"]) / len(r["rounds"])) if r.get("rounds") else 0.0
        lines.append(f"{i:>6} {r['white-box']['asr']:>14.3f} {r['black-box']['asr']:>14.3f} {r['acc_r']:>6.3f} "
                     f"{r['acc_r'] / max(base['acc_r'], 1e-9):>14.3f} {r['fit_seconds']:>7.1f} {per_round:>8.1f}")
    last = hard[-1]
    goals = [("white-box ASR (hardened) < unedited, same budget", last["white-box"]["asr"], base["white-box"]["asr"],
              last["white-box"]["asr"] < base["white-box"]["asr"]),
             ("black-box ASR (hardened) <= 0.05", last["black-box"]["asr"], 0.05, last["black-box"]["asr"] <= 0.05),
             ("AccR (hardened) >= 0.95 x unedited", last["acc_r"], 0.95 * base["acc_r"],
              last["acc_r"] >= 0.95 * base["acc_r"])]
    lines += ["", "goals (testbed):"] + [f"  {g:<50} {v:.3f} vs {ref:.3f}  {'met' if ok else 'MISSED'}"
                                         for g, v, ref, ok in goals]
    out = {"rows": rows, "goals": [{"goal": g, "value": v, "reference": ref, "met": ok} for g, v, ref, ok in goals],
           "seconds": time.perf_counter() - t0}
    return lines, out


def gan(args, enc) -> tuple[list[str], dict]:
    model = ff.load("demo-gan")
    t0 = time.perf_counter()
    photos, _ = ff.testbed.render([0], 8, seed=0)  # the photos ff.attack renders for id 0: the first is erased
    ts = time.perf_counter()
    res = ff.erase(model, [photos[0]], method="guide", encoder=enc, report=False, progress=False,
                   steps=args.guide_steps)
    fit_s = time.perf_counter() - ts
    rows = []
    for name, m in (("unedited", model), (f"guide ({args.guide_steps} steps)", res.model)):
        r = {"method": name}
        r["black-box"] = _short(ff.attack(m, [0], encoder=enc, kind="neighbours", budget=args.per_level,
                                          baseline=model if m is not model else None, progress=False))
        r["white-box"] = _short(ff.attack(m, [0], encoder=enc, kind="embedding", budget=args.gan_budget,
                                          checkpoints=[0, args.gan_budget // 4], photo_starts=1, random_starts=1,
                                          progress=False))
        rows.append(r)
        print(name, r["black-box"]["asr"], r["white-box"]["asr"], flush=True)
    lines = _fmt_rows("StyleGAN2 (demo-gan), target: testbed identity 0 (erased from one photo)", rows,
                      ["black-box", "white-box"])
    lines += ["", f"black-box: W+ = a * (the photo's latent on the unedited generator) + (1 - a) * random, a in 0.5 ... "
              f"0.99, {args.per_level} per level; white-box: W+ projection ({args.gan_budget} steps, pixel + ID loss) of "
              f"3 photos on the attacked generator; guide fit {fit_s:.1f}s"]
    return lines, {"rows": rows, "guide_fit_seconds": fit_s, "seconds": time.perf_counter() - t0}


def portrait(args, enc) -> tuple[list[str], dict]:
    model = ff.load("demo-faceid")
    t0 = time.perf_counter()
    rows = []
    fits = [("unedited", model)]
    for method in ("closed_form", "ireu"):
        fits.append((method, ff.erase(model, [0], method=method, encoder=enc, report=False, progress=False).model))
    for name, m in fits:
        r = {"method": name}
        r["black-box"] = _short(ff.attack(m, [0], encoder=enc, kind="neighbours", budget=args.per_level,
                                          progress=False))
        r["white-box"] = _short(ff.attack(m, [0], encoder=enc, kind="embedding", budget=args.portrait_budget,
                                          checkpoints=[0], photo_starts=0, random_starts=1, n_verify=args.n_verify,
                                          progress=False))
        rows.append(r)
        print(name, r["black-box"]["asr"], r["white-box"]["asr"], flush=True)
    lines = _fmt_rows("portrait generator (demo-faceid), target: testbed identity 0", rows, ["black-box", "white-box"])
    lines += ["", f"white-box: {args.portrait_budget} Adam steps from the own embedding and 1 random start"]
    return lines, {"rows": rows, "seconds": time.perf_counter() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["arc2face", "gan", "portrait", "all"], default="all")
    ap.add_argument("--budget", type=int, default=12, help="white-box Adam steps (arc2face)")
    ap.add_argument("--random-starts", type=int, default=1)
    ap.add_argument("--per-level", type=int, default=2, help="black-box inputs per cosine level")
    ap.add_argument("--n-verify", type=int, default=2)
    ap.add_argument("--relearn-steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2, help="hardened closed_form: adversarial rounds")
    ap.add_argument("--round-steps", type=int, default=10, help="hardened closed_form: search steps per round")
    ap.add_argument("--hardened", choices=["closed_form", "uce"], default="closed_form",
                    help="the closed-form method hardened with adversarial_rounds")
    ap.add_argument("--verify-n", type=int, default=2, help="generations per identity for AccR")
    ap.add_argument("--gan-budget", type=int, default=100)
    ap.add_argument("--guide-steps", type=int, default=40)
    ap.add_argument("--portrait-budget", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/attack_suite")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    enc = ff.load_encoder("demo")
    from fastforget.attacks import verification_threshold

    thr = verification_threshold(enc)
    out_json = Path(args.out + ".json")
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    fams = ["arc2face", "gan", "portrait"] if args.family == "all" else [args.family]
    for fam in fams:
        lines, data = {"arc2face": arc2face, "gan": gan, "portrait": portrait}[fam](args, enc)
        results[fam] = {"args": vars(args), "threshold": thr, "table": lines, **data}
    text = [f"verification threshold (testbed encoder, FAR 1e-3, 1000 held-out identities x 4 photos): {thr:.3f}", ""]
    for fam in ("arc2face", "gan", "portrait"):
        if fam in results:
            text += results[fam]["table"] + [""]
    print("\n".join(text))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2, default=float))
    Path(args.out + ".txt").write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
