"""fastforget.kernels: Triton kernels, their torch references, and the backend dispatch.

Kernels know nothing of models: they take tensors and return tensors. Each op has a Triton
backend (CUDA; the CPU interpreter under TRITON_INTERPRET=1 when chosen explicitly) and a torch
backend; `FASTFORGET_KERNELS=auto|triton|torch` or `use_backend(...)` chooses.
"""
from .cross_attention import masked_cross_attention
from .dispatch import KernelBackendError, available_backends, use_backend
from .processor import FusedCrossAttnProcessor, set_fused_cross_attention
from .proximity import proximity_topk

__all__ = [
    "masked_cross_attention",
    "proximity_topk",
    "use_backend",
    "KernelBackendError",
    "FusedCrossAttnProcessor",
    "set_fused_cross_attention",
    "available_backends",
]
