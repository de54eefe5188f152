"""One registry of model-family adapters. `ff.load` asks each adapter whether it recognises what a
path holds (fastforget.json `family`, a diffusers `_class_name`, a known release layout, a
checkpoint file) and loads with the first that does; built-in names ("demo") map to the testbed.
Adapters register by name, as methods do."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastforget.errors import ModelLoadError

MANIFEST = "fastforget.json"


@dataclass
class Adapter:
    name: str
    detect: Callable[[Path], bool]      # does this path hold a model of the family?
    load: Callable[..., object]         # load(path, **kwargs) -> model
    model_types: tuple = ()             # classes whose instances `load` passes through


_ADAPTERS: dict[str, Adapter] = {}
_BUILTINS: dict[str, Callable[[], object]] = {}


def register_adapter(name: str, *, detect, load, model_types=()) -> None:
    _ADAPTERS[name] = Adapter(name, detect, load, tuple(model_types))


def register_builtin(name: str, loader) -> None:
    """A built-in model name (the testbed's "demo"); the loaded model is marked `is_testbed`."""
    _BUILTINS[name] = loader


def available_families() -> list[str]:
    _register_builtins()
    return sorted(_ADAPTERS)


def read_manifest(root: Path) -> dict | None:
    """fastforget.json of a folder, or None; a corrupt one raises ModelLoadError naming it."""
    f = root / MANIFEST
    return read_json_config(f) if f.is_file() else None


def read_json_config(f: Path) -> dict:
    """A config JSON as a dict; missing, unreadable or non-object files raise ModelLoadError naming them."""
    if not f.is_file():
        raise ModelLoadError(f"{f.parent}: no {f.name}")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{f}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{f}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def class_name_of(folder: Path) -> str | None:
    """diffusers' `_class_name` of a folder's config.json / model_index.json / scheduler_config.json."""
    for n in ("model_index.json", "config.json"):
        f = folder / n
        if f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
            return cfg.get("_class_name") if isinstance(cfg, dict) else None
    return None


def _register_builtins() -> None:
    # importing the adapter modules registers them (models know nothing of methods)
    from fastforget.models import arc2face, stylegan2, unconditional  # noqa: F401
    from fastforget.models import ip_adapter  # noqa: F401  (SD / SDXL pipeline folders + IP-Adapter checkpoints)


def load(spec="demo", base=None, **kwargs):
    """A model from a built-in name, a folder or a checkpoint file; adapters are tried in
    registration order. Local files only: nothing is downloaded."""
    _register_builtins()
    kwargs = {k: v for k, v in {"base": base, **kwargs}.items() if v is not None}
    for a in _ADAPTERS.values():
        if a.model_types and isinstance(spec, a.model_types):
            if kwargs:
                raise ModelLoadError(f"model: options {sorted(kwargs)} apply only when loading from a path")
            return spec
    if isinstance(spec, str) and spec in _BUILTINS:
        _check_options(spec, _BUILTINS[spec], kwargs)
        model = _BUILTINS[spec](**kwargs)
        model.is_testbed = True
        return model
    if not isinstance(spec, (str, Path)):
        raise ModelLoadError(f"cannot load a model from {type(spec).__name__}; pass a built-in name "
                             f"({', '.join(sorted(_BUILTINS))}), a model folder or a checkpoint file")
    path = Path(spec)
    try:
        found = path.exists()
    except OSError as exc:  # a name too long for the file system, a folder that cannot be searched
        raise ModelLoadError(f"model {path}: {exc.strerror or exc}") from None
    if not found:
        raise ModelLoadError(f"model not found: {path} (built-in names: {', '.join(sorted(_BUILTINS))})")
    for a in _ADAPTERS.values():
        if a.detect(path):
            _check_options(a.name, a.load, kwargs)
            model = a.load(path, **kwargs)
            model.is_testbed = False  # a copy of the testbed's folder is a user's model
            return model
    raise ModelLoadError(f"{path}: unknown model layout; known families: {', '.join(_ADAPTERS)} "
                         f"(expected {MANIFEST}, a diffusers folder, or an Arc2Face release layout)")


def _check_options(what: str, fn, kwargs: dict) -> None:
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        from fastforget.errors import InputError

        raise InputError(f"load: option(s) {unknown} do not apply to {what} models "
                         f"(it takes: {', '.join(n for n in params if n != 'path') or 'none'})")


# ---------------------------------------------------------------- weight hashes (cache keys)
_FP_CACHE: dict = {}


def module_fingerprint(*modules) -> str:
    """sha256 over the names and bytes of every parameter and buffer of the modules. Memoised per
    module object and torch's in-place version counters, so an edited weight gives a new hash."""
    key = tuple((id(m), sum(t._version for t in m.state_dict(keep_vars=True).values()))
                for m in modules if m is not None)
    if key in _FP_CACHE:
        return _FP_CACHE[key]
    h = hashlib.sha256()
    for m in modules:
        if m is None:
            h.update(b"none")
            continue
        for name, t in m.state_dict().items():
            h.update(name.encode())
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            t = t.detach().cpu().contiguous()
            h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy())  # buffer: no copy
    if len(_FP_CACHE) > 64:
        _FP_CACHE.clear()
    _FP_CACHE[key] = h.hexdigest()
    return _FP_CACHE[key]
