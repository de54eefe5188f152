"""fastforget.export: ship an erased model as ONNX (optionally with an identity firewall in the
graph), serve it with ONNX Runtime, build TensorRT engines and refit them with a new patch.

    import fastforget as ff
    ff.export.to_onnx(res.model, "onnx_out", patch=res.patch)               # conditioner, UNet, decoder
    pipe = ff.export.OnnxPipeline("onnx_out")                              # numpy + onnxruntime only
    images = pipe.generate(emb, seed=0)                                    # PIL list; output_type="np" / "pt"
    ff.export.to_tensorrt("onnx_out", "engines")                           # needs tensorrt + CUDA
    ff.export.refit("engines", new_patch)                                  # new erasure, no rebuild

Submodules load on first use, so importing the runtime pulls in neither torch nor TensorRT.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "to_onnx": "onnx_export", "load_bank": "onnx_export", "save_bank": "onnx_export",
    "ConditionerGraph": "onnx_export", "UNetGraph": "onnx_export", "VAEDecoderGraph": "onnx_export",
    "OnnxPipeline": "runtime", "default_providers": "runtime", "to_uint8": "runtime",
    "DPMSolverMultistepNumpy": "scheduler",
    "to_onnx_gan": "gan", "to_onnx_portrait": "portrait",
    "to_tensorrt": "trt", "refit": "trt", "check_tensorrt_ops": "trt", "TRT10_ONNX_OPS": "trt",
    "tensorrt_available": "trt",
    "BackendUnavailableError": "errors", "ExportParityError": "errors",
    "pixel_shuffle": "_compat", "read_manifest": "_compat",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
