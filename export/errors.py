"""Errors of the export layer (the rest live in fastforget.errors)."""
from fastforget.errors import FastForgetError

INSTALL_HINT = ("TensorRT needs the `tensorrt` Python package (TensorRT 10: `pip install tensorrt`, which pulls "
                "the wheels from NVIDIA's index https://pypi.nvidia.com, or `pip install fastforget[gpu]`) and a "
                "CUDA GPU with a recent NVIDIA driver")


class BackendUnavailableError(FastForgetError, RuntimeError):
    """An export backend (TensorRT, a CUDA GPU) is not installed or not visible."""


class ExportParityError(FastForgetError, ArithmeticError):
    """An exported graph's output differs from the torch model's by more than the stated tolerance."""
