"""`fastforget export`: wired into fastforget/cli.py with `add_export_parser(subparsers)`.

    fastforget export MODEL --out OUT [--format onnx|tensorrt] [--patch PATCH]
                      [--firewall --bank bank.npz [--threshold 0.5]] [--fp16] [--overwrite]

MODEL is "demo", a fastforget model folder (e.g. the `model/` folder `fastforget erase --out` writes)
or an Arc2Face release folder (with --base). --patch records the erasure (fingerprint; the file is
kept for TensorRT refit) and, if MODEL is the unedited model, applies it first. --firewall puts the
identity firewall in the conditioner graph; it needs --patch and --bank, an .npz with arrays
`targets` (K x 512: the erased identities' embeddings) and `anchors` (K x 512: who each becomes),
e.g. written with `fastforget.export.save_bank(path, targets, anchors)`.
--format tensorrt writes OUT/onnx (the graphs) and OUT/tensorrt (engines; needs TensorRT + a GPU).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fastforget.cli import _float, _int


def add_export_parser(subparsers):
    p = subparsers.add_parser(
        "export", help="export a (erased) model to ONNX or TensorRT, optionally with the identity firewall",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="'demo', a fastforget model folder, or an Arc2Face release folder (with --base)")
    p.add_argument("--base", help="SD-1.5 folder (tokenizer/, vae/, scheduler/) for the Arc2Face release layout")
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--patch", help="patch.safetensors of the erasure (recorded; applied if MODEL is unedited)")
    p.add_argument("--firewall", action="store_true",
                   help="add the identity firewall to the conditioner graph (stores the erased identities' "
                        "embeddings in the graph); needs --patch and --bank")
    p.add_argument("--bank", help=".npz with arrays `targets` (K x 512) and `anchors` (K x 512) for --firewall")
    p.add_argument("--threshold", type=_float(-1.0, 1.0), default=0.5,
                   help="firewall: cosine to an erased identity at or above which the anchor is substituted")
    p.add_argument("--fp16", action="store_true", help="ONNX weights and activations in float16")
    p.add_argument("--opset", type=_int(14), default=17, help="ONNX opset (>= 14: the UNet's attention)")
    p.add_argument("--fp32-engines", action="store_true", help="tensorrt: build FP32 engines (default: FP16)")
    p.add_argument("--max-batch", type=_int(1), default=8, help="tensorrt: most images per call")
    p.add_argument("--no-refit", action="store_true", help="tensorrt: build non-refittable engines")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    from fastforget.cli import _inputs
    from fastforget.errors import InputError
    from fastforget.io import check_output_path

    # every input that can be checked without loading the model is checked before it is loaded
    if args.firewall:
        if not args.patch:
            raise InputError("--firewall needs --patch (the erasure whose identities the firewall guards)")
        if not args.bank:
            raise InputError("--firewall needs --bank bank.npz with arrays `targets` (K x 512, the erased "
                             "identities) and `anchors` (K x 512); see fastforget.export.save_bank")
    elif args.bank:
        raise InputError("--bank is only used with --firewall")
    check_output_path(args.out, args.overwrite, "--out", keep=_inputs(args))
    if args.format == "tensorrt":
        from fastforget.export.trt import _require_trt

        _require_trt()  # fail before the (long) ONNX export
    patch = None
    if args.patch:
        from fastforget.patch import Patch

        patch = Patch.load(args.patch)  # ModelLoadError naming the file if missing or unreadable
    from fastforget.export.onnx_export import load_bank, to_onnx

    bank, anchors = load_bank(args.bank) if args.firewall else (None, None)
    kw = dict(opset=args.opset, fp16=args.fp16, firewall=args.firewall, firewall_bank=bank,
              firewall_anchors=anchors, firewall_threshold=args.threshold, patch=patch, base=args.base)
    if args.format == "onnx":
        out = to_onnx(args.model, args.out, overwrite=args.overwrite, **kw)
        _summary(out)
        return 0
    from fastforget.export.trt import to_tensorrt
    from fastforget.io import atomic_directory

    with atomic_directory(args.out, overwrite=args.overwrite, name="--out") as tmp:
        to_onnx(args.model, tmp / "onnx", **kw)
        to_tensorrt(tmp / "onnx", tmp / "tensorrt", fp16=not args.fp32_engines, refittable=not args.no_refit,
                    max_batch=args.max_batch)
    print(f"written: {Path(args.out) / 'onnx'} (graphs), {Path(args.out) / 'tensorrt'} (engines)")
    return 0


def _summary(out: Path) -> None:
    import json

    m = json.loads((Path(out) / "manifest.json").read_text())
    parts = [k for k, v in m["parts"].items() if v is not None]
    print(f"written: {out}  parts: {', '.join(parts)}  dtype: {m['dtype']}  opset: {m['opset']}")
    if m.get("patch"):
        print(f"patch: {m['patch']['fingerprint']} ({m['patch']['method']}, {m['patch']['tensors']} tensors)")
    if m["firewall"]["enabled"]:
        print(f"firewall: {m['firewall']['identities']} identities, threshold {m['firewall']['threshold']} "
              "(their embeddings are stored in conditioner.onnx)")
    if m.get("parity"):
        tol = (m.get("parity_check") or {}).get("tolerance", {})
        print(f"ORT ({m['dtype']}) vs torch (float32) max |diff|: " + ", ".join(
            f"{k} {v:.1e}" + (f" (tolerance {tol[k]:.1e})" if k in tol else "") for k, v in m["parity"].items()))
