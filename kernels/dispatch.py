"""One registry of kernel backends, each registered with the constraints it can run under.

Choice, strongest first: a `backend=` argument, the innermost `use_backend(...)` block, the
`FASTFORGET_KERNELS` environment variable, then "auto". "auto" takes the first registered
backend whose constraints hold and falls back quietly; an explicit choice that cannot run
raises `KernelBackendError` with the reason.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from fastforget.errors import FastForgetError

try:
    import triton
except ImportError:  # triton is Linux x86-64 only
    triton = None
HAS_TRITON = triton is not None

ENV_VAR = "FASTFORGET_KERNELS"
CHOICES = ("auto", "triton", "torch")
ANY_DEVICE = ("*",)  # a backend that runs wherever torch runs


class KernelBackendError(FastForgetError, RuntimeError):
    """An explicitly chosen kernel backend cannot run these inputs, or the choice is not valid."""


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    # triton.jit reads the variable when a kernel is decorated, so the import-time value decides
    return HAS_TRITON and _INTERPRET_AT_IMPORT


_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


@dataclass(frozen=True)
class Backend:
    """A registered implementation of one op and the constraints it runs under."""

    op: str
    name: str
    fn: Callable
    devices: frozenset  # device types "auto" may pick it for
    dtypes: frozenset  # input dtypes it accepts
    fits: Callable[..., str | None]  # shape constraint: why these inputs do not fit, or None
    requires: Callable[[], str | None]  # environment: what is missing, or None
    interpretable: bool = False  # an explicit choice may run it on CPU under TRITON_INTERPRET=1

    def why_not(self, device: torch.device, dtype: torch.dtype, explicit: bool, **shape) -> str | None:
        missing = self.requires()
        if missing:
            return missing
        on_interpreter = explicit and self.interpretable and device.type == "cpu" and triton_interpreted()
        if "*" not in self.devices and device.type not in self.devices and not on_interpreter:
            return f"runs on {sorted(self.devices)} tensors, got {device.type}"
        if dtype not in self.dtypes:
            return f"supports dtypes {sorted(str(d) for d in self.dtypes)}, got {dtype}"
        return self.fits(**shape)


_REGISTRY: dict[str, dict[str, Backend]] = {}
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastforget_kernels", default=None)


def register(op: str, name: str, *, devices, dtypes, fits=None, requires=None, interpretable=False):
    """Decorator: register `fn` as backend `name` of `op`. Registration order is "auto" priority."""
    if name not in CHOICES[1:]:
        raise ValueError(f"backend name must be one of {CHOICES[1:]}, got {name!r}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[name] = Backend(
            op, name, fn, frozenset(devices), frozenset(dtypes),
            fits or (lambda **_: None), requires or (lambda: None), interpretable,
        )
        return fn

    return deco


def requires_triton() -> str | None:
    return None if HAS_TRITON else "triton is not installed"


def _check_choice(choice: str, source: str) -> str:
    choice = choice.strip().lower()
    if choice not in CHOICES:
        raise KernelBackendError(f"{source} must be one of {CHOICES}, got {choice!r}")
    return choice


def current_choice() -> str:
    """The backend choice in force here: use_backend() block, else FASTFORGET_KERNELS, else 'auto'."""
    override = _override.get()
    if override is not None:
        return override
    return _check_choice(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the block with kernel backend `name` ("auto", "triton" or "torch"); nests and is thread-local."""
    token = _override.set(_check_choice(name, "use_backend()"))
    try:
        yield
    finally:
        _override.reset(token)


def select(op: str, device: torch.device, dtype: torch.dtype, backend: str | None = None, **shape) -> Backend:
    """The backend that runs `op` for inputs on `device` of `dtype` with the given shape facts."""
    choice = _check_choice(backend, "backend") if backend is not None else current_choice()
    backends = _REGISTRY[op]
    if choice != "auto":
        if choice not in backends:
            raise KernelBackendError(f"{op}: no {choice!r} backend (registered: {sorted(backends)})")
        reason = backends[choice].why_not(device, dtype, explicit=True, **shape)
        if reason:
            raise KernelBackendError(f"{op}: backend {choice!r} cannot run these inputs: {reason}")
        return backends[choice]
    for b in backends.values():
        if b.why_not(device, dtype, explicit=False, **shape) is None:
            return b
    reasons = {name: b.why_not(device, dtype, explicit=False, **shape) for name, b in backends.items()}
    raise KernelBackendError(f"{op}: no backend can run these inputs: {reasons}")


def available_backends() -> dict[str, list[str]]:
    """For each op, the backends whose environment is present here (triton: installed, and CUDA or the interpreter)."""
    def usable(b: Backend) -> bool:
        if b.requires() is not None:
            return False
        on_interpreter = b.interpretable and triton_interpreted()
        return "*" in b.devices or "cpu" in b.devices or on_interpreter or \
            ("cuda" in b.devices and torch.cuda.is_available())

    return {op: [name for name, b in backends.items() if usable(b)] for op, backends in _REGISTRY.items()}
