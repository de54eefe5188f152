"""TensorRT: build engines from a `to_onnx` folder, refit them with a new erasure patch.

    to_tensorrt("onnx_out", "engines", fp16=True, refittable=True)   # one .plan per part
    refit("engines", new_patch)                                       # new weights, no rebuild

`refit` maps each patch tensor (`unet.…attn2.to_k.weight`) to the ONNX initializer that holds it,
using the map `to_onnx` recorded in the manifest (name, and the transform constant folding
applied: none, reshape, or transpose), and hands the new values to TensorRT's Refitter under
the initializer's name — the name TensorRT's ONNX parser gives the weights. The engine ends up
holding base model + new patch: tensors the previous patch changed and the new one does not
are set back to their original values (from the previous patch's `old`).

TensorRT is imported only inside these functions; without it, or without a CUDA GPU, they raise
BackendUnavailableError saying what to install. `check_tensorrt_ops` needs only onnx.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from fastforget.errors import FastForgetError, InputError, ModelLoadError
from fastforget.export._compat import FORMAT, MANIFEST, TRT_FORMAT, read_manifest
from fastforget.export.errors import INSTALL_HINT, BackendUnavailableError

# Operators TensorRT 10's ONNX parser (onnx-tensorrt, docs/operators.md) supports, restricted to the
# ones a diffusion UNet / CLIP text encoder / VAE decoder / the firewall can produce plus the common
# neighbours. An exported graph with an operator outside this set fails `check_tensorrt_ops`.
TRT10_ONNX_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid
HardSwish Identity If InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax LpNormalization LpPool LRN MatMul Max MaxPool Mean Min Mish Mod Mul Neg NonZero Not OneHot Or Pad
Pow PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round ScatterElements
ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())
_RESIZE_MODES = {"nearest", "linear", "cubic"}
_RESIZE_COORDS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_NEEDS_INITIALIZER = {"Conv": (1,), "ConvTranspose": (1,), "InstanceNormalization": (1, 2)}
_PREFIX = {"conditioner": "text_encoder.", "unet": "unet.", "vae_decoder": "vae."}


# ---------------------------------------------------------------- availability
def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when TensorRT >= 10 imports and a CUDA GPU is visible; else (False, why)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return False, f"TensorRT is not installed ({exc}). {INSTALL_HINT}"
    try:
        major = int(str(trt.__version__).split(".")[0])
    except ValueError:
        major = 0
    if major < 10:
        return False, f"TensorRT {trt.__version__} found; fastforget needs TensorRT >= 10. {INSTALL_HINT}"
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # nullptr factory: no driver / no GPU
        builder, err = None, exc
    else:
        err = None
    if builder is None:
        return False, (f"TensorRT {trt.__version__} is installed but cannot create a builder "
                       f"({err or 'no CUDA device'}): a CUDA GPU and NVIDIA driver are needed. {INSTALL_HINT}")
    return True, str(trt.__version__)


def _require_trt():
    ok, why = tensorrt_available()
    if not ok:
        raise BackendUnavailableError(why)
    import tensorrt as trt

    return trt


# ---------------------------------------------------------------- op check
def check_tensorrt_ops(model_or_dir) -> list[str]:
    """Problems TensorRT 10's ONNX parser would have with a graph (or every part of a `to_onnx`
    folder): operators outside TRT10_ONNX_OPS, non-constant Conv / InstanceNormalization weights,
    Resize modes it lacks, float64 tensors. Returns [] when the graph(s) are fine."""
    import onnx

    if isinstance(model_or_dir, (str, Path)) and Path(model_or_dir).is_dir():
        root = Path(model_or_dir)
        manifest = read_manifest(root)
        problems = []
        for name, part in manifest["parts"].items():
            if part is not None:
                problems += [f"{name}: {p}" for p in check_tensorrt_ops(root / part["file"])]
        return problems
    proto = model_or_dir if isinstance(model_or_dir, onnx.ModelProto) else onnx.load(
        str(model_or_dir), load_external_data=False)
    problems = []
    graph = proto.graph
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"operator {node.domain}::{node.op_type} ({node.name}) is a custom-domain op")
            continue
        if node.op_type not in TRT10_ONNX_OPS:
            problems.append(f"operator {node.op_type} ({node.name}) is not supported by TensorRT 10's ONNX parser")
            continue
        for idx in _NEEDS_INITIALIZER.get(node.op_type, ()):
            if idx < len(node.input) and node.input[idx] and node.input[idx] not in constants:
                problems.append(f"{node.op_type} ({node.name}): input {idx} must be an initializer")
        if node.op_type == "Resize":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            mode = attrs.get("mode", b"nearest")
            coord = attrs.get("coordinate_transformation_mode", b"half_pixel")
            mode, coord = (x.decode() if isinstance(x, bytes) else x for x in (mode, coord))
            if mode not in _RESIZE_MODES or coord not in _RESIZE_COORDS:
                problems.append(f"Resize ({node.name}): mode {mode!r} / {coord!r} is not supported")
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.DOUBLE:
            problems.append(f"initializer {init.name} is float64")
    return problems


# ---------------------------------------------------------------- build
def _rel_or_abs(target: Path, start: Path) -> str:
    try:
        return os.path.relpath(target.resolve(), start.resolve())
    except ValueError:  # different drives
        return str(target.resolve())


def to_tensorrt(onnx_dir, out_dir, fp16: bool = True, refittable: bool = True, *, max_batch: int = 8,
                opt_batch: int = 1, workspace_gb: float | None = None, overwrite: bool = False) -> Path:
    """Build one TensorRT engine (`<part>.plan`) per part of a `to_onnx` folder.

    Batch profiles: conditioner / decoder 1..max_batch images (optimised for opt_batch); the UNet
    2..2*max_batch (classifier-free guidance doubles its batch), min 1. refittable=True builds
    with BuilderFlag.REFIT so `refit` can swap an erasure patch without a rebuild. The folder also
    gets the manifest (with a `tensorrt` section), null_condition.npy and the patch, and records
    where the ONNX folder is (refit reads initializers the engine may ask for from it)."""
    from fastforget.io import atomic_directory, check_output_path

    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    if max_batch < 1 or not (1 <= opt_batch <= max_batch):
        raise InputError(f"max_batch / opt_batch: need 1 <= opt_batch <= max_batch, got {opt_batch}, {max_batch}")
    check_output_path(out_dir, overwrite, "out_dir", keep=[onnx_dir])  # before the (long) engine builds
    problems = check_tensorrt_ops(onnx_dir)
    if problems:
        raise InputError(f"{onnx_dir}: graph(s) TensorRT cannot parse: " + "; ".join(problems[:10]))
    trt = _require_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    out_dir = Path(out_dir)
    engines = {}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for part, info in manifest["parts"].items():
            if info is None:
                continue
            builder = trt.Builder(logger)
            network = builder.create_network(0)  # TensorRT 10: explicit batch always
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx_dir / info["file"])):
                errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise FastForgetError(f"{part}: TensorRT's ONNX parser failed: {errs[:1000]}")
            config = builder.create_builder_config()
            if workspace_gb:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2 ** 30))
            if fp16:
                config.set_flag(trt.BuilderFlag.FP16)
            if refittable:
                config.set_flag(trt.BuilderFlag.REFIT)
            mult = 2 if part == "unet" else 1
            profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                inp = network.get_input(i)
                dims = list(inp.shape)

                def at(b, dims=dims):
                    return tuple(b if d == -1 else d for d in dims)

                profile.set_shape(inp.name, at(1), at(opt_batch * mult), at(max_batch * mult))
            config.add_optimization_profile(profile)
            blob = builder.build_serialized_network(network, config)
            if blob is None:
                raise FastForgetError(f"{part}: TensorRT engine build failed (see the TensorRT log above)")
            with open(tmp / f"{part}.plan", "wb") as f:
                f.write(blob)
            engines[part] = f"{part}.plan"
        for extra in ("null_condition.npy", "patch.safetensors"):
            if (onnx_dir / extra).is_file():
                shutil.copy2(onnx_dir / extra, tmp / extra)
        trt_manifest = dict(manifest)
        trt_manifest["format"] = TRT_FORMAT
        trt_manifest["tensorrt"] = {
            "version": str(trt.__version__), "fp16": bool(fp16), "refittable": bool(refittable),
            "max_batch": int(max_batch), "opt_batch": int(opt_batch), "engines": engines,
            "onnx_dir": _rel_or_abs(onnx_dir, out_dir.resolve()), "onnx_format": FORMAT,
            "weights_state": "export"}
        (tmp / MANIFEST).write_text(json.dumps(trt_manifest, indent=1, sort_keys=True))
    return out_dir


# ---------------------------------------------------------------- refit
def _as_np(t, dtype: str) -> np.ndarray:
    import torch

    return t.detach().cpu().to(torch.float32).numpy().astype(dtype)


def _transform(arr: np.ndarray, entry: dict) -> np.ndarray:
    if entry["transform"] == "transpose":
        arr = arr.T
    return np.ascontiguousarray(arr.reshape(entry["shape"]).astype(entry["dtype"]))


def _digest32(arr: np.ndarray) -> str:
    from fastforget.export.onnx_export import _digest

    return _digest(arr)[:32]


def refit_weights(onnx_dir, patch, current=None) -> dict:
    """{part: {onnx_initializer_name: array}}: the weights to hand TensorRT so an engine built from
    `onnx_dir` holds base model + `patch`. `current` is the patch the engine holds now (default:
    the one baked into the ONNX export); tensors it changed that `patch` does not are set back to
    their original values. Checks that `patch` was made from the same base model (its `old` values
    match the base weights) and that no edited tensor shares an initializer with another one."""
    from fastforget.patch import Patch

    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    if isinstance(patch, (str, Path)):
        patch = Patch.load(patch)
    baked = Patch.load(onnx_dir / "patch.safetensors") if manifest.get("patch") else None
    if current is None:
        current = baked
    elif isinstance(current, (str, Path)):
        current = Patch.load(current)
    names = set(patch.new) | set(current.new if current else ()) | set(baked.new if baked else ())

    def target(k):  # value of torch tensor k in base + patch (None: as exported)
        if k in patch.new:
            return patch.new[k]
        if baked is not None and k in baked.old:
            return baked.old[k]
        return None

    out = {}
    for part, info in manifest["parts"].items():
        if info is None:
            continue
        mine = sorted(k for k in names if k.startswith(_PREFIX[part]))
        if not mine:
            continue
        mapping = info["initializers"]
        users = {}
        for k, e in mapping.items():
            users.setdefault(e["onnx"], []).append(k)
        weights, exported = {}, None
        for k in mine:
            if k not in mapping:
                where = "was folded into a constant" if k in info.get("unmapped", []) else "is not in the graph"
                raise InputError(f"patch tensor {k!r} cannot be refitted: it {where} in {info['file']}")
            e = mapping[k]
            if k in patch.old:  # same base model?
                base = baked.old[k] if baked is not None and k in baked.old else None
                base_digest = _digest32(_as_np(base, e["dtype"])) if base is not None else e["sha256"]
                if _digest32(_as_np(patch.old[k], e["dtype"])) != base_digest:
                    raise InputError(f"patch {patch.fingerprint()}: tensor {k!r} was not made from the model "
                                     "these engines were exported from (its original values differ)")
            value = target(k)
            if value is None:  # changed by the engine's current patch only: back to the exported value
                exported = exported or _Initializers(onnx_dir / info["file"])
                weights[e["onnx"]] = exported.get(e["onnx"])
                continue
            if int(np.prod(e["shape"])) != value.numel():
                raise InputError(f"patch tensor {k!r} has shape {list(value.shape)}, the engine's initializer "
                                 f"{e['onnx']!r} {list(e['shape'])} (a keyed queue adds MLP units): a refit cannot "
                                 "change shapes; export this model again and build new engines")
            arr = _transform(_as_np(value, e["dtype"]), e)
            for other in users[e["onnx"]]:
                if other == k:
                    continue
                ov = target(other)
                same = (ov is not None and _transform(_as_np(ov, e["dtype"]), e).tobytes() == arr.tobytes()) or (
                    ov is None and _digest32(_as_np(value, e["dtype"])) == mapping[other]["sha256"])
                if not same:
                    raise InputError(f"patch tensor {k!r} shares ONNX initializer {e['onnx']!r} with {other!r} "
                                     "(equal values at export were merged); it cannot be refitted alone — re-export")
            weights[e["onnx"]] = arr
        if weights:
            out[part] = weights
    return out


class _Initializers:
    """Initializers of one ONNX file, loaded on first use."""

    def __init__(self, path: Path):
        self.path, self._arrays = Path(path), None

    def get(self, name: str) -> np.ndarray:
        if self._arrays is None:
            import onnx
            from onnx import numpy_helper

            proto = onnx.load(str(self.path), load_external_data=True)
            self._arrays = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        if name not in self._arrays:
            raise ModelLoadError(f"{self.path}: no initializer {name!r}")
        return np.ascontiguousarray(self._arrays[name])


def refit(engine_dir, patch, *, onnx_dir=None) -> dict:
    """Apply erasure `patch` (a Patch or patch.safetensors) to refittable engines in `engine_dir`
    with TensorRT's Refitter, in place (the folder is rewritten atomically). Returns a summary."""
    from fastforget.io import atomic_directory
    from fastforget.patch import Patch

    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir, expect=(TRT_FORMAT,))
    info = manifest["tensorrt"]
    if not info.get("refittable"):
        raise InputError(f"{engine_dir}: engines were built with refittable=False; rebuild with to_tensorrt("
                         "..., refittable=True) to refit")
    if isinstance(patch, (str, Path)):
        patch = Patch.load(patch)
    onnx_dir = Path(onnx_dir) if onnx_dir is not None else (engine_dir / info["onnx_dir"])
    if not (onnx_dir / MANIFEST).is_file():
        raise ModelLoadError(f"{onnx_dir}: the ONNX folder these engines were built from is needed for refit "
                             "(pass onnx_dir=)")
    current = Patch.load(engine_dir / "patch.safetensors") if (engine_dir / "patch.safetensors").is_file() else None
    plan = refit_weights(onnx_dir, patch, current=current)
    trt = _require_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    onnx_manifest = read_manifest(onnx_dir)
    new_blobs, summary = {}, {"fingerprint": patch.fingerprint(), "parts": {}}
    for part, weights in plan.items():
        eng_file = engine_dir / info["engines"][part]
        engine = runtime.deserialize_cuda_engine(eng_file.read_bytes())
        if engine is None:
            raise ModelLoadError(f"{eng_file}: TensorRT cannot deserialize it (built by another TensorRT version?)")
        refitter = trt.Refitter(engine, logger)
        refittable = set(refitter.get_all_weights())
        keep = []
        for name, arr in weights.items():
            if name not in refittable:
                raise InputError(f"{part}: initializer {name!r} is not refittable in {eng_file.name}")
            keep.append(arr)
            if not refitter.set_named_weights(name, trt.Weights(arr)):
                raise FastForgetError(f"{part}: TensorRT rejected new weights for {name!r}")
        # weights TensorRT fused with the ones set (e.g. q/k/v packed together) must be supplied too;
        # none of them is edited by a patch (those are all in `weights`), so the exported value is right
        exported = _Initializers(onnx_dir / onnx_manifest["parts"][part]["file"])
        for name in refitter.get_missing_weights():
            arr = exported.get(name)
            keep.append(arr)
            refitter.set_named_weights(name, trt.Weights(arr))
        if not refitter.refit_cuda_engine():
            raise FastForgetError(f"{part}: TensorRT refit failed (missing: {refitter.get_missing_weights()})")
        new_blobs[part] = bytes(engine.serialize())
        summary["parts"][part] = len(weights)
        del keep
    with atomic_directory(engine_dir, overwrite=True) as tmp:
        for p in engine_dir.iterdir():
            if p.name in {info["engines"][k] for k in new_blobs} | {"patch.safetensors", MANIFEST}:
                continue
            if p.is_file():
                try:
                    os.link(p, tmp / p.name)
                except OSError:
                    shutil.copy2(p, tmp / p.name)
        for part, blob in new_blobs.items():
            (tmp / info["engines"][part]).write_bytes(blob)
        patch.save(tmp / "patch.safetensors")
        manifest["patch"] = {"fingerprint": patch.fingerprint(), "method": patch.metadata.get("method"),
                             "tensors": len(patch.names), "parameters": patch.num_parameters(),
                             "file": "patch.safetensors", "targets": patch.metadata.get("targets"),
                             "anchors": patch.metadata.get("anchors")}
        manifest["tensorrt"]["weights_state"] = "refit"
        manifest["tensorrt"]["onnx_dir"] = _rel_or_abs(onnx_dir, engine_dir.resolve())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return summary
