"""What every erasure method receives and returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fastforget.errors import InputError, UnknownMethodError

# bounds that keep an accepted option from overflowing float32 or allocating without end
MAX_LR = 1.0           # AdamW: lr beyond float32's range raises inside the optimizer; above 1 nothing is learned
MAX_BATCH = 1024       # images per step (micro_batch, bia's batch / n_sources / n_preserve)
MAX_SAMPLES = 4096     # neighbourhood sizes (bia's neighbours, k_nearest, absorb_codes)

_REGISTRY: dict = {}
_VALIDATORS: dict = {}
_REQUIRES: dict = {}


@dataclass
class ErasureRequest:
    """Who to forget, who they become, who must stay. All (N, 512) float32, unit norm.

    targets[i] is replaced by anchors[i]; `retain` are identities named by the caller;
    `preserve` is a large set of other identities (a gallery) held fixed where a method
    supports it, so that identities nobody named also stay put.
    """

    targets: torch.Tensor
    anchors: torch.Tensor
    retain: torch.Tensor | None = None
    preserve: torch.Tensor | None = None
    salt: str = "fastforget"
    extra: dict = field(default_factory=dict)
    encoder: object = None          # the caller's IdentityEncoder (methods that score images use it)


def register_method(name: str, validate=None, requires=()):
    """Decorator: `fit(model, request, *, seed, progress, **options) -> Patch` registered under `name`.
    `validate(options) -> None` raises InputError for bad options; `requires` names the model attributes the
    method uses (e.g. "condition"); erase() checks both before any work."""

    def deco(fn):
        _REGISTRY[name] = fn
        if validate is not None:
            _VALIDATORS[name] = validate
        _REQUIRES[name] = tuple(requires)
        return fn

    return deco


def check_model(name: str, model) -> None:
    """InputError naming `model` when it lacks what method `name` edits (an unconditional model has no
    identity conditioning for closed_form / uce / piu / esd_x)."""
    # an entry "a|b" is met by either attribute (closed_form: Arc2Face's condition or a portrait's id_tokens)
    missing = [a for a in _REQUIRES.get(name, ()) if not any(hasattr(model, alt) for alt in a.split("|"))]
    if missing:
        family = getattr(model, "family", None) or type(model).__name__
        what = "the synthesis network of a latent generator (StyleGAN2)" if "synthesis" in missing else \
            "the image projection of a portrait generator (IP-Adapter FaceID, InstantID)" if "image_proj" in missing \
            else "the identity conditioning of an Arc2Face-family model"
        raise InputError(f"model: {name} edits {what}; this {family} model has no "
                         f"{', '.join(a.replace('|', ' or ') for a in missing)}")


def validate_options(name: str, options: dict) -> None:
    get_method(name)
    if name in _VALIDATORS:
        _VALIDATORS[name](dict(options))


def get_method(name: str):
    from fastforget import methods  # noqa: F401  (imports register every built-in method)

    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    from fastforget import methods  # noqa: F401

    return sorted(_REGISTRY)


def attn2_kv_names(model, modules: dict | None = None) -> list[str]:
    """Qualified parameter names of to_k / to_v weights of the given (default: all) attn2 modules."""
    modules = modules if modules is not None else model.attn2_modules()
    return [f"unet.{m}.{p}.weight" for m in modules for p in ("to_k", "to_v")]


# ---------------------------------------------------------------- options (shared by every method)
def merge_options(name: str, defaults: dict, options: dict, allowed=None) -> dict:
    """defaults + options; option names outside `allowed` (default: the defaults' keys) raise
    InputError naming them."""
    allowed = set(defaults) if allowed is None else set(allowed)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputError(f"{name}: unknown option(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(sorted(allowed))}")
    return {**{k: v for k, v in defaults.items() if k in allowed}, **options}


def check_int(name: str, cfg: dict, key: str, minimum: int = 1, maximum: int | None = None) -> None:
    """cfg[key] (if present) must be an integer >= minimum (and <= maximum); stored as int."""
    if key in cfg:
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum or \
                (maximum is not None and v > maximum):
            bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            raise InputError(f"{name}: option {key!r} must be an integer {bound}, got {v!r}")
        cfg[key] = int(v)


def check_cos_pair(name: str, cfg: dict, key: str, strict: bool = False) -> None:
    """cfg[key] must be a (low, high) pair of cosines, -1 <= low <= high < 1 (strict: 0 < low < high < 1);
    stored as a list of two floats."""
    v = cfg[key]
    try:
        lo, hi = (float(x) for x in v)
        ok = not isinstance(v, str) and all(not isinstance(x, bool) for x in v) and \
            (0.0 < lo < hi < 1.0 if strict else -1.0 <= lo <= hi < 1.0)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        bounds = "0 < low < high < 1" if strict else "-1 <= low <= high < 1"
        raise InputError(f"{name}: option {key!r} must be a (low, high) pair of cosines with {bounds}, got {v!r}")
    cfg[key] = [lo, hi]


def check_number(name: str, cfg: dict, key: str, lo: float | None = None, strict: bool = False,
                 hi: float | None = None) -> None:
    """cfg[key] (if present) must be a finite number (>= lo, or > lo when strict; <= hi); stored as float."""
    if key in cfg:
        v = cfg[key]
        from fastforget.models.common import is_finite_number

        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not is_finite_number(v):
            raise InputError(f"{name}: option {key!r} must be a finite number, got {v!r}")
        v = float(v)
        if lo is not None and (v <= lo if strict else v < lo):
            raise InputError(f"{name}: option {key!r} must be {'>' if strict else '>='} {lo}, got {v}")
        if hi is not None and v > hi:
            raise InputError(f"{name}: option {key!r} must be <= {hi}, got {v}")
        cfg[key] = v


# ---------------------------------------------------------------- typed configs (one definition per option)
@dataclass(frozen=True)
class Option:
    """One option of a method: its default, what values it takes, and why the default is what it is.

    kind: "int" | "float" | "bool" | "choice" | "names" (a non-empty list of strings; a string is one name)
    | "pair" (a number or a (low, high) pair, low <= high) | "any" (not checked here). `lo` / `hi` bound
    numbers (`strict`: lo excluded); `choices` lists a choice's values; `source` says whose value the default
    is ("paper", "public code", "ours")."""

    default: object
    kind: str
    reason: str
    lo: float | None = None
    hi: float | None = None
    strict: bool = False
    choices: tuple = ()
    source: str = "ours"

    def check(self, method: str, key: str, v):
        if self.kind == "any":
            return v
        if self.kind == "int":
            cfg = {key: v}
            check_int(method, cfg, key, int(self.lo) if self.lo is not None else -2 ** 62,
                      int(self.hi) if self.hi is not None else None)
            return cfg[key]
        if self.kind == "float":
            cfg = {key: v}
            check_number(method, cfg, key, self.lo, self.strict, self.hi)
            return cfg[key]
        if self.kind == "bool":
            if not isinstance(v, (bool, np.bool_)):
                raise InputError(f"{method}: option {key!r} must be True or False, got {v!r}")
            return bool(v)
        if self.kind == "choice":
            if not isinstance(v, str) or v not in self.choices:  # an array would compare elementwise
                raise InputError(f"{method}: option {key!r} must be one of {', '.join(map(repr, self.choices))}, "
                                 f"got {v!r}")
            return v
        if self.kind == "names":
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, str) and s for s in v):
                raise InputError(f"{method}: option {key!r} must be a non-empty list of names, got {v!r}")
            return list(v)
        if self.kind == "pair":
            try:
                if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                    lo, hi = float(v), float(v)
                elif isinstance(v, str) or any(isinstance(x, bool) for x in v):
                    raise TypeError
                else:
                    lo, hi = map(float, v)
            except (TypeError, ValueError, OverflowError):
                raise InputError(f"{method}: option {key!r} must be a number or a (low, high) pair, got {v!r}") from None
            floor = self.lo if self.lo is not None else -float("inf")
            ceil = self.hi if self.hi is not None else float("inf")
            if not (np.isfinite(lo) and np.isfinite(hi) and floor <= lo <= hi <= ceil):
                raise InputError(f"{method}: option {key!r} must satisfy {floor} <= low <= high <= {ceil}, got {v!r}")
            return [lo, hi]
        raise ValueError(f"unknown option kind {self.kind!r}")  # pragma: no cover - a programming error

    def describe_range(self) -> str:
        if self.kind in ("int", "float", "pair"):
            lo = "" if self.lo is None else (f"> {self.lo:g}" if self.strict else f">= {self.lo:g}")
            hi = "" if self.hi is None else f"<= {self.hi:g}"
            return " and ".join(x for x in (lo, hi) if x) or "any"
        if self.kind == "choice":
            return " \\| ".join(f"`{c}`" for c in self.choices)
        return {"bool": "True / False", "names": "list of module names", "any": "see docs"}[self.kind]


class MethodConfig:
    """A method's options, each defined once (`Option`): validation, defaults, metadata and the README table
    all come from here."""

    def __init__(self, method: str, options: dict):
        self.method = method
        self.options = dict(options)

    @property
    def defaults(self) -> dict:
        return {k: o.default for k, o in self.options.items()}

    def resolve(self, options: dict, allowed=None) -> dict:
        """Defaults + `options`, each checked; names outside `allowed` (default: all) raise InputError."""
        cfg = merge_options(self.method, self.defaults, options, allowed)
        for k in list(cfg):
            if k in options or self.options[k].default is not None:
                cfg[k] = self.options[k].check(self.method, k, cfg[k])
        return cfg

    def table(self) -> str:
        """The options as a markdown table (README)."""
        rows = ["| option | default | range | source | why |", "|---|---|---|---|---|"]
        for k, o in self.options.items():
            rows.append(f"| `{k}` | `{o.default!r}` | {o.describe_range()} | {o.source} | {o.reason} |")
        return "\n".join(rows)


def check_request(name: str, request: ErasureRequest, *, anchors: bool = False, dim: int = 512) -> None:
    """The request a method receives: non-empty (N, dim) targets (and, with `anchors`, one anchor per target)."""
    t, a = request.targets, request.anchors
    if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != dim or len(t) == 0:
        raise InputError(f"{name}: request.targets must be a non-empty (N, {dim}) tensor")
    if anchors and (not isinstance(a, torch.Tensor) or tuple(a.shape) != tuple(t.shape)):
        raise InputError(f"{name}: request.anchors must have the shape of request.targets {tuple(t.shape)}, "
                         f"got {tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")


def patch_metadata(name: str, cfg: dict, request: ErasureRequest, seed: int, *, anchors: bool = True,
                   **extra) -> dict:
    """The metadata every method's Patch carries: method, resolved config, seed, salted fingerprints of the
    targets (and anchors), library version, plus the method's own fields. Never raw embeddings."""
    from fastforget import __version__
    from fastforget.patch import fingerprint_embeddings

    meta = {"method": name, "config": cfg, "seed": seed,
            "targets": fingerprint_embeddings(request.targets, request.salt), "version": __version__}
    if anchors:
        meta["anchors"] = fingerprint_embeddings(request.anchors, request.salt)
    meta.update(extra)
    return meta
