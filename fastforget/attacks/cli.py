"""`fastforget attack`: re-emergence attacks on an (erased) model, the unedited model side by side."""
from __future__ import annotations

from pathlib import Path


def cmd_attack(args) -> int:
    from fastforget.cli import _identities
    from fastforget.errors import OutputExistsError
    from fastforget.io import atomic_write_bytes, check_output_path

    out = None
    if args.out:
        out = check_output_path(args.out, name="--out", into=True)
        if (out / "attack.json").exists() and not args.overwrite:
            raise OutputExistsError(f"--out: {Path(args.out) / 'attack.json'} exists (pass --overwrite to replace it)")
    target = _identities(args.target, "--target")

    import fastforget as ff

    enc = ff.load_encoder(args.encoder) if args.encoder else None
    model = ff.load(args.model, base=args.base, ip_adapter=args.ip_adapter)
    baseline = ff.load(args.baseline, base=args.base, ip_adapter=args.ip_adapter) if args.baseline else None
    rep = ff.attack(model, target, encoder=enc, kind=args.kind, baseline=baseline, seed=args.seed,
                    budget=args.budget, threshold=args.threshold, n_verify=args.n_verify, progress=True)
    print(rep.table())
    if out is not None:
        w = atomic_write_bytes(out / "attack.json", rep.to_json().encode(), overwrite=True, name="--out")
        print(f"written: {Path(args.out) / w.name}")
    return 0


def add_parser(subparsers) -> None:
    from fastforget.attacks import KINDS
    from fastforget.cli import SEED, _float, _int

    a = subparsers.add_parser("attack", help="try to bring erased people back (white-box embedding search, "
                                             "neighbour sweep, relearning); prints ASR and best similarity")
    a.add_argument("model", help="the model to attack: 'demo' ('demo-gan', 'demo-faceid'), a fastforget model "
                                 "folder, an Arc2Face release folder, a StyleGAN2 .pt, or a diffusers pipeline "
                                 "folder (with --ip-adapter)")
    a.add_argument("--target", nargs="+", required=True,
                   help="the erased people: testbed ids, image paths (one person each), or one .npy of (N, 512) "
                        "embeddings (embedding / neighbours attacks only)")
    a.add_argument("--kind", choices=KINDS, default="embedding")
    a.add_argument("--baseline", help="the unedited model, attacked the same way for the side-by-side row")
    a.add_argument("--budget", type=_int(1, 100_000),
                   help="Adam steps (embedding; W+ steps on a GAN), inputs per cosine level (neighbours), "
                        "fine-tuning steps (relearn); default: the library's")
    a.add_argument("--threshold", type=_float(-1.0, 1.0, hi_open=True),
                   help="verification cosine at FAR 1e-3 (default: calibrated on the testbed; required for other "
                        "encoders)")
    a.add_argument("--n-verify", type=_int(1, 1000), default=4, help="generations per found input")
    a.add_argument("--base", help="SD-1.5 folder (tokenizer/, vae/, scheduler/) for the Arc2Face layout")
    a.add_argument("--ip-adapter", help="IP-Adapter FaceID / InstantID checkpoint for a diffusers pipeline folder")
    a.add_argument("--encoder", help="ArcFace .onnx (or 'demo'); default: the testbed encoder for 'demo'")
    a.add_argument("--seed", type=SEED, default=0)
    a.add_argument("--out", help="folder for attack.json (created if needed)")
    a.add_argument("--overwrite", action="store_true", help="replace attack.json in --out")
    a.set_defaults(func=cmd_attack)
