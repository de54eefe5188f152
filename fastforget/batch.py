"""A deletion queue: many requests erased in one solve, added to incrementally, withdrawn one by one.

    res = ff.erase_batch(ff.load("demo"), "requests.jsonl")      # or a list of dicts
    res.save("out")                                               # model/ patch.safetensors report.json
                                                                  # ledger.json statistics.safetensors
    res2 = ff.erase_batch("out", "next-week.jsonl")               # incremental: only the new requests' states
    res3 = ff.withdraw("out", ["req-17"])                         # req-17's person comes back, the rest stay erased

Each request is one line `{"id": ..., "targets": ..., "retain": ...}` (retain optional). `targets` /
`retain` take the forms erase() takes, read relative to the .jsonl file's folder: a list of photo paths
(the photos of ONE person: their embeddings are averaged into one identity), a ".npy" file of (N, 512)
embeddings (one identity per row), testbed identity ids, or a list of embedding rows.

The closed-form edit (fastforget.methods.closed_form) is a regularised least squares whose normal
equations are sums over rows: A = λI + w_e Σ c_t c_tᵀ + w_p Σ c_p c_pᵀ, M = λI + w_e Σ c_a c_tᵀ + w_p Σ c_p c_pᵀ,
W = W0 M A⁻¹. Every request contributes its own rows, so the output keeps them per request
(statistics.safetensors: text-encoder states, float32 as the text encoder computes them): adding requests
adds their terms, withdrawing one subtracts them and holds that person's rows fixed instead (they come
back as the unedited model draws them), and either equals one solve over the resulting set of requests.
statistics.safetensors is derived from the targets' embeddings: keep it under the same access rules as
the requests themselves, and delete it when the requests are final (the ledger never holds it).

`structure="mlp"` solves the same least squares on the last text-encoder MLP's output projection, keyed by
its hidden activations (incremental and withdrawable alike). `structure="keyed"` (fastforget.keyed) adds units
to that MLP instead, two per identity-carrying token position per identity, each firing on one person: the
only structure that holds thousands of identities (benchmarks/batch_capacity.py measures all three).

Requests are checked (typed errors naming the line and the field) before the model is loaded.
"""
from __future__ import annotations

import json
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastforget.errors import ConflictError, InputError

log = logging.getLogger("fastforget")

LEDGER_FORMAT = "fastforget.ledger/1"
STATS_FORMAT = "fastforget.batch-statistics/1"
REQUEST_FIELDS = ("id", "targets", "retain")
STRUCTURES = ("kv", "mlp", "keyed")
# "mlp": measured on the testbed (benchmarks/batch_capacity.py); its key space holds more identities than the
# D x D map, and preserved rows must be held harder there (their keys overlap the targets' more)
MLP_DEFAULTS = {"preserve_weight": 2.0, "neighbours": 0}
MAX_ID_LENGTH = 200
# a preservation row this close to a target is the target (held and erased at once): left out, as erase() does
DROP_COS = 0.9


# ---------------------------------------------------------------- requests
@dataclass
class BatchRequest:
    id: str
    where: str                    # "requests.jsonl line 3" / "requests[2]": named in every error
    targets: object               # as given (paths resolved)
    retain: object = None
    target_emb: torch.Tensor | None = None   # (k, 512) unit, one row per identity
    retain_emb: torch.Tensor | None = None


def _resolve_paths(value, root: Path | None):
    """Relative file names in a request are read relative to the .jsonl file's folder."""
    def one(p):
        q = Path(p)
        return str(q if q.is_absolute() or root is None else root / q)

    if isinstance(value, str):
        return one(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [one(v) for v in value]
    return value


def _check_form(value, where: str, fld: str):
    """A request's targets / retain: photo paths, a .npy file, testbed ids, or embedding rows. Cheap
    checks only (files exist, shapes, finiteness); images are decoded when they are encoded."""
    from fastforget.identity.embeddings import check_embeddings, is_id_list

    what = f"{where}: field {fld!r}"
    if isinstance(value, (list, tuple)) and not value:
        raise InputError(f"{what}: empty (at least one photo, embedding or id is needed)")
    if isinstance(value, str):
        if not value.endswith(".npy"):
            raise InputError(f"{what}: a single file must be a .npy of (N, 512) embeddings, got {value!r} "
                             "(photos go in a list)")
        if not Path(value).is_file():
            raise InputError(f"{what}: file not found: {value}")
        try:
            arr = np.load(value, allow_pickle=False)
        except Exception as exc:
            raise InputError(f"{what}: {value} is not a readable .npy file ({str(exc)[:120]})") from None
        if arr.ndim != 2 or not len(arr):
            raise InputError(f"{what}: {value} must hold (N, 512) embeddings, got shape {arr.shape}")
        try:
            return check_embeddings(torch.from_numpy(np.asarray(arr, dtype=np.float32)), name=f"{what} ({value})")
        except InputError as exc:
            raise type(exc)(str(exc)) from None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        missing = [v for v in value if not Path(v).is_file()]
        if missing:
            raise InputError(f"{what}: photo not found: {missing[0]}")
        return value
    if is_id_list(value):
        if any(int(v) < 0 for v in value):
            raise InputError(f"{what}: testbed identity ids must be >= 0")
        return [int(v) for v in value]
    if isinstance(value, list) and all(isinstance(v, (list, tuple)) for v in value):
        try:
            return check_embeddings(torch.tensor(value, dtype=torch.float32), name=what)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{what}: embedding rows must be lists of numbers ({str(exc)[:120]})") from None
    raise InputError(f"{what}: expected a list of photo paths, a .npy file, testbed identity ids or embedding "
                     f"rows, got {type(value).__name__}")


def parse_requests(requests) -> list[BatchRequest]:
    """A .jsonl path or a list of dicts -> checked BatchRequests. Typed errors name the line and field."""
    root = None
    if isinstance(requests, (str, os.PathLike)):
        path = Path(requests)
        if path.suffix != ".jsonl":
            raise InputError(f"requests: expected a .jsonl file or a list of dicts, got {str(path)!r}")
        if not path.is_file():
            raise InputError(f"requests: file not found: {path}")
        root = path.parent
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path.name} line {n}"
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    elif isinstance(requests, (list, tuple)):
        rows = [(f"requests[{i}]", r) for i, r in enumerate(requests)]
    else:
        raise InputError(f"requests: expected a .jsonl path or a list of dicts, got {type(requests).__name__}")
    if not rows:
        raise InputError("requests: no requests given")
    out, seen = [], {}
    for where, r in rows:
        if not isinstance(r, dict):
            raise InputError(f"{where}: expected a JSON object {{\"id\": ..., \"targets\": ...}}, got "
                             f"{type(r).__name__}")
        unknown = sorted(set(r) - set(REQUEST_FIELDS))
        if unknown:
            raise InputError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(REQUEST_FIELDS)})")
        for fld in ("id", "targets"):
            if fld not in r:
                raise InputError(f"{where}: missing field {fld!r}")
        rid = r["id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip() \
                or len(str(rid)) > MAX_ID_LENGTH:
            raise InputError(f"{where}: field 'id' must be a non-empty string of at most {MAX_ID_LENGTH} "
                             f"characters, got {rid!r}")
        rid = str(rid)
        if rid in seen:
            raise ConflictError(f"{where}: field 'id': duplicate request id {rid!r} (also {seen[rid]})")
        seen[rid] = where
        tgt = _check_form(_resolve_paths(r["targets"], root), where, "targets")
        ret = _check_form(_resolve_paths(r["retain"], root), where, "retain") if r.get("retain") is not None \
            else None
        out.append(BatchRequest(rid, where, tgt, ret))
    return out


def _embed(req: BatchRequest, encoder, seed: int) -> None:
    """Targets / retain -> unit embeddings. The photos of one request are one person (their mean)."""
    from fastforget.identity.embeddings import to_embeddings

    def conv(value, fld):
        if isinstance(value, torch.Tensor):
            return F.normalize(value.float(), dim=1)
        if encoder is None:
            raise InputError(f"{req.where}: field {fld!r}: photos and testbed ids need an encoder "
                             "(pass encoder=ff.load_encoder(...))")
        emb = to_embeddings(value, encoder, f"{req.where}: field {fld!r}", seed=seed)
        if isinstance(value, list) and value and isinstance(value[0], str):
            emb = F.normalize(emb.mean(0, keepdim=True), dim=1)  # several photos of the one person asking
        return emb

    req.target_emb = conv(req.targets, "targets")
    req.retain_emb = conv(req.retain, "retain") if req.retain is not None else None


def _check_conflicts(reqs: list[BatchRequest]) -> None:
    """A person named as a target by one request and as retained by any request is refused."""
    from fastforget.identity.embeddings import SAME_PERSON_COS

    rets = [(r, r.retain_emb) for r in reqs if r.retain_emb is not None and len(r.retain_emb)]
    if not rets:
        return
    for t in reqs:
        for r, emb in rets:
            sim = t.target_emb @ emb.T
            hit = (sim >= SAME_PERSON_COS).nonzero()
            if len(hit):
                i, j = hit[0].tolist()
                raise ConflictError(f"{t.where}: field 'targets'[{i}] is the same person as {r.where}: field "
                                    f"'retain'[{j}] (cosine {float(sim[i, j]):.3f} >= {SAME_PERSON_COS}): a "
                                    "person cannot be both forgotten and retained")


def request_seed(seed: int, request_id: str) -> int:
    """Each request's own seed (its neighbours, its anchor): a request's rows do not depend on which other
    requests share the solve, so an incremental add equals a solve over the union."""
    return (int(seed) * 1_000_003 + zlib.crc32(request_id.encode())) % (2 ** 31)


# ---------------------------------------------------------------- statistics
@dataclass
class RequestStatistics:
    id: str
    src: torch.Tensor             # (rows*L, d) float32: states of the targets and their neighbours
    dst: torch.Tensor             # (rows*L, d) float32: the states each row is sent to (anchor / transported)
    retain: torch.Tensor | None   # (n*L, d) float32: states of the identities this request names to keep
    dropped: list                 # preservation rows left out because they are this request's targets
    fingerprints: list            # salted, one per target identity
    n_targets: int
    time: str
    status: str = "erased"        # "erased" | "withdrawn"
    withdrawn_time: str | None = None


@dataclass
class BatchStatistics:
    config: dict                  # closed-form weights (erase_weight, preserve_weight, retain_weight, lam, ...)
    d: int
    base_gram: torch.Tensor       # (d, d) float64: null condition + preservation set (all its rows)
    drops: dict                   # preservation row index -> (L, d) float32 states (subtracted while dropped)
    preserve: dict                # {"kind", "key", "size"}: which preservation set base_gram holds
    text_encoder: str             # fingerprint of the text encoder the states came from
    salt: str
    seed: int
    requests: list = field(default_factory=list)

    def ids(self, status: str | None = None) -> list[str]:
        return [r.id for r in self.requests if status is None or r.status == status]

    @property
    def structure(self) -> str:
        return self.config.get("structure", "kv")

    def normal_equations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, M) of the closed form over the current requests; withdrawn requests' rows are held fixed.
        structure "mlp": (A, B) with B = w_e Σ Rᵀ K (the residual each key must add), held rows add nothing."""
        cfg, d = self.config, self.d
        eye = torch.eye(d, dtype=torch.float64)
        w_e, w_p = cfg["erase_weight"], cfg["preserve_weight"]
        w_r = cfg["retain_weight"] if cfg["retain_weight"] is not None else w_p
        held = self.base_gram.clone()
        gone = set()
        for r in self.requests:
            if r.status == "erased":
                gone.update(r.dropped)
        for idx in sorted(gone):
            s = self.drops[idx].double()
            held -= s.T @ s
        gtt = torch.zeros(d, d, dtype=torch.float64)
        mlp = self.structure == "mlp"
        gat = torch.zeros(self.dst_dim if mlp else d, d, dtype=torch.float64)
        named = torch.zeros(d, d, dtype=torch.float64)
        erased = [r for r in self.requests if r.status == "erased"]
        # withdrawn: the person's rows are held where the unedited model has them
        held_rows = [r.src for r in self.requests if r.status != "erased"] + \
            [r.retain for r in self.requests if r.retain is not None]
        for i in range(0, len(erased), GRAM_CHUNK):  # a few large float64 products, not one per request
            src = torch.cat([r.src for r in erased[i:i + GRAM_CHUNK]]).double()
            gtt += src.T @ src
            gat += torch.cat([r.dst for r in erased[i:i + GRAM_CHUNK]]).double().T @ src
        for i in range(0, len(held_rows), GRAM_CHUNK):
            named += _xtx(torch.cat(held_rows[i:i + GRAM_CHUNK]))
        a = cfg["lam"] * eye + w_e * gtt + w_p * held + w_r * named
        if mlp:
            return a, w_e * gat
        m = cfg["lam"] * eye + w_e * gat + w_p * held + w_r * named
        return a, m

    @property
    def dst_dim(self) -> int:
        return next((r.dst.shape[1] for r in self.requests), self.d)

    def solve(self) -> torch.Tensor:
        """kv: T (d, d) float64 with W = W0 T for every attn2 to_k / to_v; mlp: Δ (width, d) with
        fc2 = fc2_0 + Δ."""
        from fastforget.errors import FitError

        a, m = self.normal_equations()
        try:
            chol = torch.linalg.cholesky(a)
        except torch.linalg.LinAlgError:
            raise FitError("erase_batch: the solve is not numerically positive definite; raise 'lam'") from None
        return torch.cholesky_solve(m.T, chol).T

    # ------------------------------------------------------------ files
    def to_tensors(self) -> tuple[dict, dict]:
        tensors = {"base_gram": self.base_gram.contiguous()}
        for idx, s in self.drops.items():
            tensors[f"drop/{idx}"] = s.contiguous()
        reqs = []
        for i, r in enumerate(self.requests):
            tensors[f"request/{i}/src"] = r.src.contiguous()
            tensors[f"request/{i}/dst"] = r.dst.contiguous()
            if r.retain is not None:
                tensors[f"request/{i}/retain"] = r.retain.contiguous()
            reqs.append({"id": r.id, "dropped": r.dropped, "fingerprints": r.fingerprints, "n_targets": r.n_targets,
                         "time": r.time, "status": r.status, "withdrawn_time": r.withdrawn_time})
        meta = {"format": STATS_FORMAT, "config": self.config, "d": self.d, "preserve": self.preserve,
                "text_encoder": self.text_encoder, "salt": self.salt, "seed": self.seed, "requests": reqs}
        return tensors, meta

    def save(self, path) -> None:
        from safetensors.torch import save

        from fastforget.io import atomic_write_bytes

        tensors, meta = self.to_tensors()
        atomic_write_bytes(path, save(tensors, metadata={"fastforget": json.dumps(meta, sort_keys=True)}),
                           overwrite=True)

    @classmethod
    def load(cls, path) -> "BatchStatistics":
        from fastforget.io import read_fastforget_safetensors

        meta, t = read_fastforget_safetensors(
            path, STATS_FORMAT, "statistics", missing=f"{path}: not found (a batch output folder holds "
            "statistics.safetensors; without it requests can no longer be added or withdrawn)")
        reqs = [RequestStatistics(r["id"], t[f"request/{i}/src"], t[f"request/{i}/dst"], t.get(f"request/{i}/retain"),
                                  list(r["dropped"]), list(r["fingerprints"]), r["n_targets"], r["time"], r["status"],
                                  r.get("withdrawn_time")) for i, r in enumerate(meta["requests"])]
        drops = {int(k.split("/")[1]): v for k, v in t.items() if k.startswith("drop/")}
        return cls(meta["config"], meta["d"], t["base_gram"], drops, meta["preserve"], meta["text_encoder"],
                   meta["salt"], meta["seed"], reqs)


KEYED_NOTE = ("text-encoder states c: target_residual = |c'(t) - c(anchor)| / |c(t) - c(anchor)| (0: the target "
              "draws its anchor); retain_movement / preserve_movement = |c'(x) - c(x)| / the mean |c(t) - c(anchor)| "
              "(0: unchanged), for the new requests' retained people and 64 preservation identities; on <= "
              "50 new requests evenly spaced; units = added MLP units (2 per identity-carrying position)")
GRAM_CHUNK = 64  # requests per float64 product in the normal equations
METRIC_SAMPLE = 50  # requests the report's state-space metrics are measured on


def _xtx(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x.T @ x


# ---------------------------------------------------------------- states
STATE_BATCH = 256  # identities per text-encoder pass: 256 x 77 x 768 float32 is 60 MB at full size


@torch.no_grad()
def _states(model, emb: torch.Tensor, batch: int = STATE_BATCH, progress: bool = False) -> torch.Tensor:
    """(N, 512) -> (N*L, d) float32 text-encoder states, row-major by identity then token."""
    from tqdm import tqdm

    d, length = model.text_width, model._prompt_ids.shape[1]
    out = torch.empty(len(emb) * length, d)  # filled in place: a list + cat would hold every state twice
    for i in tqdm(range(0, len(emb), batch), desc="erase_batch: text-encoder states",
                  disable=not progress or len(emb) <= batch, leave=False):
        s = model.condition(emb[i:i + batch]).float().cpu().reshape(-1, d)
        out[i * length:i * length + len(s)] = s
    return out


def mlp_name(model) -> str:
    """The one tensor the "mlp" structure edits: the last text-encoder layer's MLP output projection."""
    n = len(model.text_encoder.text_model.encoder.layers)
    return f"text_encoder.text_model.encoder.layers.{n - 1}.mlp.fc2.weight"


@torch.no_grad()
def _mlp_features(model, emb: torch.Tensor, batch: int = STATE_BATCH, progress: bool = False):
    """(N, 512) -> keys (N*L, width) float32 = the last MLP's hidden activations (fc2's input), and the
    residual stream after the last layer (N*L, d) float32 (before the final layer norm)."""
    from tqdm import tqdm

    layer = model.text_encoder.text_model.encoder.layers[-1]
    got = {}
    hooks = [layer.mlp.fc2.register_forward_hook(lambda m, i, o: got.__setitem__("k", i[0])),
             layer.register_forward_hook(lambda m, i, o: got.__setitem__("r", o[0] if isinstance(o, tuple) else o))]
    length = model._prompt_ids.shape[1]
    keys = torch.empty(len(emb) * length, layer.mlp.fc2.in_features)  # filled in place (no list + cat copy)
    res = torch.empty(len(emb) * length, model.text_width)
    try:
        for i in tqdm(range(0, len(emb), batch), desc="erase_batch: text-encoder keys",
                      disable=not progress or len(emb) <= batch, leave=False):
            model.condition(emb[i:i + batch])
            k = got["k"].float().cpu().reshape(-1, keys.shape[1])
            keys[i * length:i * length + len(k)] = k
            res[i * length:i * length + len(k)] = got["r"].float().cpu().reshape(-1, res.shape[1])
    finally:
        for h in hooks:
            h.remove()
    return keys, res


def _rows_x(model, emb, structure: str, progress: bool = False) -> torch.Tensor:
    """What the edited layer reads: kv -> text-encoder states; mlp -> the last MLP's keys."""
    return _states(model, emb, progress=progress) if structure == "kv" else _mlp_features(model, emb,
                                                                                         progress=progress)[0]


_KEY_GRAMS: dict = {}


def _base_gram(model, pres_emb, structure: str) -> torch.Tensor:
    """Null condition + preservation set, Σ x xᵀ in float64 (kv: closed_form's cached Gram)."""
    if structure == "kv":
        from fastforget.methods.closed_form import _gram

        null = model.null_condition(1).double().cpu().reshape(-1, model.text_width)
        g = null.T @ null
        return g + _gram(model, pres_emb, disk=True) if pres_emb is not None and len(pres_emb) else g
    import hashlib

    from fastforget.identity.preservation import load_cached_tensor, save_cached_tensor
    from fastforget.models.registry import module_fingerprint

    with torch.no_grad():
        layer = model.text_encoder.text_model.encoder.layers[-1]
        got = {}
        h = layer.mlp.fc2.register_forward_hook(lambda m, i, o: got.__setitem__("k", i[0]))
        try:
            model.text_encoder(model._null_ids)
        finally:
            h.remove()
        null = got["k"].double().reshape(-1, got["k"].shape[-1])
    g = null.T @ null
    if pres_emb is None or not len(pres_emb):
        return g
    key = hashlib.sha256((module_fingerprint(model.text_encoder) + str(tuple(model._prompt_ids[0].tolist()))
                          + "mlp-keys").encode() + pres_emb.detach().float().cpu().numpy().tobytes()).hexdigest()
    kg = _KEY_GRAMS.get(key)
    if kg is None:
        kg = load_cached_tensor("gram-mlp", key)
    if kg is None:
        kg = torch.zeros_like(g)
        for i in range(0, len(pres_emb), STATE_BATCH):
            k = _mlp_features(model, pres_emb[i:i + STATE_BATCH])[0].double()
            kg += k.T @ k
        save_cached_tensor("gram-mlp", key, kg)
    _KEY_GRAMS.clear()
    _KEY_GRAMS[key] = kg
    return g + kg


def _request_rows(req: BatchRequest, anchors: torch.Tensor, cfg: dict, seed: int):
    """Source and destination embeddings of a request's rows: each target and its neighbours, sent to the
    target's anchor (closed_form's `neighbour_map`: "transport" sends t + δ to a + δ)."""
    from fastforget.identity.embeddings import unit_vectors_at_cosine

    tgt, k, n = req.target_emb, len(req.target_emb), cfg["neighbours"]
    near = unit_vectors_at_cosine(tgt, n, tuple(cfg["neighbour_cos"]), seed) if n else tgt[:0]
    owner = torch.arange(k).repeat_interleave(n)
    src = torch.cat([tgt, near])
    if cfg["neighbour_map"] == "transport":
        dst = torch.cat([anchors, F.normalize(anchors[owner] + near - tgt[owner], dim=1)]) if n else anchors
    else:
        dst = torch.cat([anchors, anchors[owner]])
    return src, dst


# ---------------------------------------------------------------- result
from fastforget.api import ErasureResult  # noqa: E402


@dataclass
class BatchResult(ErasureResult):
    """erase_batch / withdraw output: an ErasureResult (the erased model, ONE patch from the unedited model
    for every request, a report, the targets' anchors) plus the ledger of applied and withdrawn requests and
    the per-request statistics."""

    ledger: dict = None
    statistics: BatchStatistics = None
    base: object = None          # the unedited model (the patch's originals): kept for incremental work

    def _write_extra(self, tmp: Path) -> None:
        """save() (ErasureResult's, atomic) writes model/ + patch + report, then ledger.json + statistics."""
        (tmp / "ledger.json").write_text(json.dumps(self.ledger, indent=2, sort_keys=True))
        self.statistics.save(tmp / "statistics.safetensors")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _ledger(stats: BatchStatistics, patch, method: str) -> dict:
    """Request ids, salted fingerprints, method and times. Never embeddings, photos or file names."""
    return {"format": LEDGER_FORMAT, "method": method, "config": stats.config, "salt_fingerprint":
            _salt_tag(stats.salt), "patch_fingerprint": patch.fingerprint(), "preservation": stats.preserve,
            "requests": [{"id": r.id, "status": r.status, "targets": r.fingerprints, "n_targets": r.n_targets,
                          "applied": r.time, **({"withdrawn": r.withdrawn_time} if r.withdrawn_time else {})}
                         for r in stats.requests]}


def _salt_tag(salt: str) -> str:
    """Which salt made the fingerprints, without revealing it."""
    import hashlib

    return hashlib.sha256(b"fastforget-salt\0" + salt.encode()).hexdigest()[:12]


def _kv_stack(model) -> torch.Tensor:
    from fastforget.methods.base import attn2_kv_names
    from fastforget.patch import get_parameter

    return torch.cat([get_parameter(model, n).detach().double().cpu() for n in attn2_kv_names(model)])


@torch.no_grad()
def _build(base, stats: BatchStatistics, method: str, anchors=None, t_solve: float = 0.0):
    """Solve, make the one patch, apply it to a copy of `base`, measure in state space."""
    from fastforget import __version__
    from fastforget.methods.base import attn2_kv_names
    from fastforget.patch import Patch, get_parameter
    from fastforget.verify import Report

    t0 = time.perf_counter()
    keyed = stats.structure == "keyed"
    tmap = None if keyed else stats.solve()
    if keyed:
        from fastforget.keyed import widened

        units = [r for r in stats.requests if r.status == "erased"]
        src = torch.cat([r.src for r in units]) if units else torch.zeros(0, stats.d + 1)
        dst = torch.cat([r.dst for r in units]) if units else torch.zeros(0, stats.d)
        new = widened(base, src[:, :-1], src[:, -1], dst)
    elif stats.structure == "mlp":
        name = mlp_name(base)
        new = {name: (get_parameter(base, name).detach().double().cpu() + tmap).float()}
    else:
        new = {n: (get_parameter(base, n).detach().double().cpu() @ tmap).float() for n in attn2_kv_names(base)}
    if not all(torch.isfinite(v).all() for v in new.values()):
        from fastforget.errors import FitError

        raise FitError("erase_batch: the solve produced non-finite weights; nothing was applied")
    erased_ids = stats.ids("erased")
    meta = {"method": method, "config": stats.config, "seed": stats.seed, "version": __version__,
            "requests": erased_ids, "withdrawn": stats.ids("withdrawn"),
            "targets": [f for r in stats.requests if r.status == "erased" for f in r.fingerprints]}
    patch = Patch.from_edit(base, new, meta)
    erased = base.clone(only=patch.names)
    patch.apply(erased)
    solve_s = time.perf_counter() - t0
    metrics = {"requests": len(erased_ids), "units": len(src), "intermediate_size":
               erased.text_encoder.config.intermediate_size} if keyed else _state_metrics(base, tmap, stats)
    report = Report(metrics,
                    {"method": method, "requests": len(erased_ids), "withdrawn": len(stats.ids("withdrawn")),
                     "fit_seconds": t_solve + solve_s, "patch_fingerprint": patch.fingerprint(),
                     "preservation": stats.preserve,
                     "metrics_note": KEYED_NOTE if keyed else
                     "state space: W0 = every attn2 to_k/to_v stacked; target_residual = "
                     "|W(c_t) - W0(c_dst)| / |W0(c_t) - W0(c_dst)| (0: fully redirected); "
                     "held_movement = |W(c) - W0(c)| / the same scale, for retained and "
                     f"withdrawn rows (0: unchanged); on <= {METRIC_SAMPLE} requests evenly spaced"})
    return BatchResult(erased, patch, report, anchors, _ledger(stats, patch, method), stats, base)


def _state_metrics(base, tmap: torch.Tensor, stats: BatchStatistics) -> dict:
    if stats.structure == "mlp":  # rows: keys -> the residual they must add; the edit is Δ itself
        delta = tmap
    else:
        w0 = _kv_stack(base)
        delta = w0 @ (tmap - torch.eye(len(tmap), dtype=torch.float64))    # W - W0
    res, scale, held, withdrawn = [], [], [], []
    # measured on an evenly spaced sample of the requests: the whole queue would cost more than the solve
    step = max(1, len(stats.requests) // METRIC_SAMPLE)
    for r in stats.requests[::step]:
        src, dst = r.src.double(), r.dst.double()
        gap = dst if stats.structure == "mlp" else (src - dst) @ w0.T   # what the edit must add per row
        if r.status == "erased":
            res.append(((src @ delta.T - (gap if stats.structure == "mlp" else -gap)).norm()
                        / gap.norm().clamp_min(1e-12)).item())
            scale.append(gap.norm(dim=1).mean().item())
        else:
            withdrawn.append(((src @ delta.T).norm(dim=1).mean()).item())
        if r.retain is not None:
            held.append((r.retain.double() @ delta.T).norm(dim=1).mean().item())
    s = float(np.mean(scale)) if scale else 1.0
    return {"requests": len(stats.ids("erased")), "target_residual": float(np.mean(res)) if res else None,
            "retain_movement": float(np.mean(held)) / s if held else None,
            "withdrawn_movement": float(np.mean(withdrawn)) / s if withdrawn else None}


# ---------------------------------------------------------------- public API
def _load_previous(prev):
    """A BatchResult, or a saved batch folder -> (unedited base model, statistics, previous ledger)."""
    if isinstance(prev, BatchResult):
        base = prev.base if prev.base is not None else prev.patch.revert(prev.model.clone(only=prev.patch.names))
        return base, prev.statistics
    folder = Path(prev)
    if not (folder / "ledger.json").is_file() or not (folder / "patch.safetensors").is_file():
        raise InputError(f"{folder}: not a batch output folder (ledger.json and patch.safetensors expected)")
    from fastforget.models import load
    from fastforget.patch import Patch

    stats = BatchStatistics.load(folder / "statistics.safetensors")
    patch = Patch.load(folder / "patch.safetensors")
    model = load(str(folder / "model"))
    base = patch.revert(model.clone(only=patch.names))  # checks the folder's model holds the patch's values
    return base, stats


def _is_previous(model) -> bool:
    if isinstance(model, BatchResult):
        return True
    return isinstance(model, (str, os.PathLike)) and (Path(model) / "ledger.json").is_file()


def erase_batch(model, requests, *, encoder=None, seed: int = 0, preserve="auto", progress: bool = True,
                structure: str | None = None, salt: str | None = None, anchor_tau: float = 0.2,
                **options) -> BatchResult:
    """Erase every request of a deletion queue in ONE closed-form solve (see the module docstring).

    `model`: a model (or anything ff.load takes) for a fresh queue, or a previous BatchResult / saved batch
    folder to add `requests` to it incrementally (only the new requests' states are computed; the result
    equals one solve over all of them). `options` are closed_form's (erase_weight, neighbours, ...).

    `structure`: "kv" (default; an incremental add keeps the batch's) is closed_form's D x D map on every attn2 to_k / to_v; "mlp" is the same
    least squares on the last text-encoder MLP's output projection, keyed by its hidden activations (a
    wider, nonlinear key space: see README "Deletion queue", capacity). Its defaults: MLP_DEFAULTS."""
    from fastforget.identity.anchors import select_anchors
    from fastforget.identity.encoder import resolve_encoder
    from fastforget.methods.base import validate_options
    from fastforget.methods.closed_form import CLOSED_FORM_DEFAULTS, _resolve
    from fastforget.models import load
    from fastforget.models.common import check_float, check_seed
    from fastforget.patch import DEFAULT_SALT, fingerprint_embeddings
    from fastforget.verify import check_salt

    # ---- cheap checks first: every request line, every option, before the model is loaded
    seed = check_seed(seed, 2 ** 20)
    if not isinstance(progress, bool):
        raise InputError(f"progress: expected True or False, got {progress!r}")
    anchor_tau = check_float(anchor_tau, "anchor_tau")
    if structure is not None and structure not in STRUCTURES:
        raise InputError(f"structure: expected one of {STRUCTURES}, got {structure!r}")
    from fastforget.keyed import resolve_keyed

    if structure == "keyed":
        resolve_keyed(dict(options))
    else:
        validate_options("closed_form", options)
    rounds = options.get("adversarial_rounds", 0)
    if rounds:  # the hardening rounds re-solve on the edited model: not a sum over requests
        raise InputError(f"erase_batch: option 'adversarial_rounds' = {rounds!r} is not supported in a batch (its "
                         "solve must stay a sum over requests to be incremental); harden with ff.erase")
    reqs = parse_requests(requests)
    previous = _is_previous(model)
    if previous:
        if options:
            raise InputError("options: an incremental add uses the options of the batch it extends; pass none")
        base, old = _load_previous(model)
        clash = sorted(set(r.id for r in reqs) & set(old.ids()))
        if clash:
            raise ConflictError(f"request id {clash[0]!r} is already in this batch ({old.ids().count(clash[0])} "
                                "time(s)); ids must be unique across the queue")
        if salt is not None and check_salt(salt) != old.salt:
            raise InputError("salt: differs from the batch being extended (its fingerprints would not match)")
        if structure is not None and structure != old.structure:
            raise InputError(f"structure: the batch being extended uses {old.structure!r}, got {structure!r}")
        cfg, salt, seed = old.config, old.salt, old.seed
        if encoder is None and old.preserve.get("kind") == "testbed":  # a saved copy of the testbed: its encoder
            encoder = "demo"
        structure = old.structure
    else:
        structure = structure or "kv"
        if structure == "keyed":
            cfg = {**resolve_keyed(dict(options)), "structure": structure}
        else:
            defaults = {**CLOSED_FORM_DEFAULTS, **(MLP_DEFAULTS if structure == "mlp" else {})}
            cfg = {**_resolve("closed_form", defaults, dict(options)), "structure": structure}
        salt = check_salt(DEFAULT_SALT if salt is None else salt)
        base = load(model)
        old = None
    if not hasattr(base, "condition") or not hasattr(base, "attn2_modules"):
        raise InputError(f"model: erase_batch solves the closed form on attn2 of an Arc2Face-family model; this "
                         f"{getattr(base, 'family', type(base).__name__)} model has no identity conditioning")
    if structure == "keyed":  # before any encoding or preservation-set work
        from fastforget.keyed import check_text_encoder

        check_text_encoder(base)
    enc = resolve_encoder(encoder, base, "erase_batch") if encoder is not None or getattr(base, "is_testbed", False) \
        else None
    from tqdm import tqdm

    for r in tqdm(reqs, desc="erase_batch: encoding requests", disable=not progress, leave=False):
        _embed(r, enc, seed)
    _check_conflicts(reqs)
    if old is not None:
        _check_old_retains(reqs, old, salt)

    t0 = time.perf_counter()
    from fastforget.api import _resolve_preserve
    from fastforget.models.registry import module_fingerprint

    text_fp = module_fingerprint(base.text_encoder)
    if old is not None and old.preserve.get("kind") == "testbed" and isinstance(preserve, str) and preserve == "auto":
        from fastforget.identity.preservation import testbed_set

        pres = testbed_set(resolve_encoder(encoder, base, "erase_batch"))
    else:
        pres = _resolve_preserve(preserve, base, lambda: resolve_encoder(encoder, base, "erase_batch"), seed,
                                 progress) if cfg.get("use_preserve", True) else None
    if old is not None:
        if old.text_encoder != text_fp:
            raise InputError("model: the batch folder's model is not the one its statistics were computed on")
        if pres is not None and (pres.key != old.preserve.get("key")):
            raise InputError(f"preserve: the batch was solved with preservation set {old.preserve.get('kind')!r} "
                             f"(key {str(old.preserve.get('key'))[:12]}); pass the same one to extend it")
        import copy

        stats = copy.copy(old)  # the batch being extended is not modified
        stats.requests, stats.drops = list(old.requests), dict(old.drops)
    else:
        g = _base_gram(base, pres.embeddings if pres is not None else None, structure) if structure != "keyed" \
            else torch.zeros(1, 1, dtype=torch.float64)  # keyed units need no Gram: each stands alone
        stats = BatchStatistics(cfg, base.text_width if structure == "keyed" else len(g), g, {},
                                {"kind": pres.kind, "key": pres.key, "size": len(pres.embeddings)}
                                if pres is not None else {"kind": None, "key": None, "size": 0}, text_fp, salt, seed)
    if structure == "keyed":
        return _erase_keyed(base, stats, reqs, pres, anchor_tau, t0)
    pool = pres.anchor_pool if pres is not None else None
    all_anchors = []
    stamp = _now()
    rows, retains = [], []
    for r in reqs:  # every request's rows first, then ONE batched text-encoder pass over all of them
        rs = request_seed(seed, r.id)
        rpool = pool if pool is not None else r.retain_emb
        if rpool is None or not len(rpool):
            raise InputError(f"{r.where}: no pool to pick an anchor from (preserve=None and no 'retain')")
        anchors, _ = select_anchors(r.target_emb, rpool, tau=anchor_tau, seed=rs)
        all_anchors.append(anchors)
        src, dst = _request_rows(r, anchors, cfg, rs)
        rows += [src, dst]
        if r.retain_emb is not None:
            retains.append(r.retain_emb)
    length = base._prompt_ids.shape[1]
    sizes = [len(x) * length for x in rows]
    if structure == "kv":
        states = _states(base, torch.cat(rows), progress=progress).split(sizes)
    else:  # src rows: their keys; dst rows: the residual the edit must add (dst's stream - src's stream)
        keys, stream = (t.split(sizes) for t in _mlp_features(base, torch.cat(rows), progress=progress))
        states = [x for i in range(0, len(rows), 2) for x in (keys[i], stream[i + 1] - stream[i])]
    ret_states = iter(_rows_x(base, torch.cat(retains), structure).split([len(x) * length for x in retains])) \
        if retains else iter(())
    gone = set()
    if pres is not None:  # preservation rows that are one of the new targets
        near = (pres.embeddings @ torch.cat([r.target_emb for r in reqs]).T) >= DROP_COS
        owner = torch.cat([torch.full((len(r.target_emb),), i) for i, r in enumerate(reqs)])
        gone = {(int(p), int(owner[t])) for p, t in near.nonzero().tolist()}
        for idx in sorted({p for p, _ in gone} - set(stats.drops)):
            stats.drops[idx] = _rows_x(base, pres.embeddings[idx:idx + 1], structure)
    for i, r in enumerate(reqs):
        stats.requests.append(RequestStatistics(
            r.id, states[2 * i].contiguous(), states[2 * i + 1].contiguous(),
            next(ret_states).contiguous() if r.retain_emb is not None else None,
            sorted(p for p, o in gone if o == i), fingerprint_embeddings(r.target_emb, salt), len(r.target_emb),
            stamp))
    t_states = time.perf_counter() - t0
    res = _build(base, stats, f"batch:closed_form:{structure}", torch.cat(all_anchors) if all_anchors else None, t_states)
    log.info("erase_batch: %d request(s) (%d new) in %.2fs", len(stats.ids("erased")), len(reqs),
             res.report.details["fit_seconds"])
    return res


def _erase_keyed(base, stats: BatchStatistics, reqs: list[BatchRequest], pres, anchor_tau: float, t0: float):
    """structure "keyed": each new request's units (fastforget.keyed), appended to the batch's; one patch."""
    from fastforget.identity.anchors import select_anchors
    from fastforget.keyed import key_statistics, make_units
    from fastforget.patch import fingerprint_embeddings

    kstats = key_statistics(base, pres.embeddings if pres is not None else None, stats.config)
    targets = torch.cat([r.target_emb for r in reqs])
    sizes = [len(r.target_emb) for r in reqs]
    # one scoring pass over the pool for the whole queue; each request still draws under its own seed
    anchor_rows, _ = select_anchors(targets, pres.anchor_pool, tau=anchor_tau,
                                    group_seeds=[(request_seed(stats.seed, r.id), k) for r, k in zip(reqs, sizes)])
    anchors = list(anchor_rows.split(sizes))
    rows, bias, cols = make_units(base, kstats, targets, anchor_rows, stats.config)
    per = len(rows) // len(targets)  # units per identity: 2 per identity-carrying position
    stamp, at = _now(), 0
    for r in reqs:
        n = len(r.target_emb) * per
        stats.requests.append(RequestStatistics(
            r.id, torch.cat([rows[at:at + n], bias[at:at + n, None]], 1).contiguous(), cols[at:at + n].contiguous(),
            None, [], fingerprint_embeddings(r.target_emb, stats.salt), len(r.target_emb), stamp))
        at += n
    t_units = time.perf_counter() - t0
    res = _build(base, stats, "batch:keyed", torch.cat(anchors), t_units)
    res.report.metrics.update(_keyed_measured(base, res.model, reqs, anchors, pres))
    res.report.metrics["positions"] = kstats["positions"]
    log.info("erase_batch: %d request(s) (%d new) in %.2fs", len(stats.ids("erased")), len(reqs),
             res.report.details["fit_seconds"])
    return res


@torch.no_grad()
def _keyed_measured(base, erased, reqs, anchors, pres) -> dict:
    """On <= METRIC_SAMPLE of the new requests: how far each target's conditioning still is from its anchor's
    (relative to where it started), and how much retained and preserved people's conditioning moved."""
    step = max(1, len(reqs) // METRIC_SAMPLE)
    tg = torch.cat([r.target_emb[:1] for r in reqs[::step]])
    an = torch.cat([a[:1] for a in anchors[::step]])
    c0, ca, ce = base.condition(tg).float(), base.condition(an).float(), erased.condition(tg).float()
    gap = (c0 - ca).flatten(1).norm(dim=1)
    out = {"target_residual": float(((ce - ca).flatten(1).norm(dim=1) / gap.clamp_min(1e-12)).mean())}
    scale = float(gap.mean())

    def moved(emb):
        return float((erased.condition(emb).float() - base.condition(emb).float()).flatten(1).norm(dim=1).mean()) / scale

    rets = [r.retain_emb for r in reqs[::step] if r.retain_emb is not None]
    out["retain_movement"] = moved(torch.cat(rets)) if rets else None
    if pres is not None:
        from fastforget.keyed import evenly_spaced

        out["preserve_movement"] = moved(pres.embeddings[evenly_spaced(len(pres.embeddings), 64)].float())
    return out


def _check_old_retains(reqs, old: BatchStatistics, salt: str) -> None:
    """A new request naming (as retained) a person an earlier request erased is refused; retained people of
    earlier requests are compared by their fingerprints only (their embeddings are not kept)."""
    from fastforget.patch import fingerprint_embeddings

    erased = {f: r.id for r in old.requests if r.status == "erased" for f in r.fingerprints}
    for r in reqs:
        if r.retain_emb is None:
            continue
        for j, f in enumerate(fingerprint_embeddings(r.retain_emb, salt)):
            if f in erased:
                raise ConflictError(f"{r.where}: field 'retain'[{j}] is a target of request {erased[f]!r} already "
                                    "in this batch: withdraw that request first")


def withdraw(result_or_folder, request_ids) -> BatchResult:
    """Withdraw requests from a batch: their people are restored (their rows are held where the unedited
    model has them), every other request stays erased. Equals one solve over the remaining requests with
    the withdrawn people held. Returns a new BatchResult; the input is not modified."""
    if isinstance(request_ids, str) or not isinstance(request_ids, (list, tuple)) or not request_ids:
        raise InputError(f"request_ids: expected a non-empty list of request ids, got {request_ids!r}")
    ids = [str(i) for i in request_ids]
    if len(set(ids)) != len(ids):
        raise InputError(f"request_ids: duplicate id in {ids!r}")
    if not _is_previous(result_or_folder):
        raise InputError(f"result_or_folder: expected an erase_batch result or a saved batch folder, got "
                         f"{result_or_folder!r}")
    import copy

    base, stats = _load_previous(result_or_folder)
    stats = copy.copy(stats)
    stats.requests = [copy.copy(r) for r in stats.requests]
    by_id = {r.id: r for r in stats.requests}
    for i in ids:
        if i not in by_id:
            raise InputError(f"request_ids: {i!r} is not in this batch (requests: {', '.join(stats.ids()[:10])}"
                             f"{' ...' if len(stats.requests) > 10 else ''})")
        if by_id[i].status == "withdrawn":
            raise ConflictError(f"request_ids: {i!r} was already withdrawn ({by_id[i].withdrawn_time})")
    stamp = _now()
    for i in ids:
        by_id[i].status, by_id[i].withdrawn_time = "withdrawn", stamp
    return _build(base, stats, f"batch:closed_form:{stats.structure}")


# ---------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("batch", help="erase a deletion queue (requests.jsonl) in one solve; writes model/, "
                                            "patch.safetensors, report.json, ledger.json, statistics.safetensors")
    p.add_argument("requests", help=".jsonl: one {\"id\", \"targets\", \"retain\"?} request per line ('-' with "
                                    "--withdraw)")
    p.add_argument("--model", action="append", required=True,
                   help="model folder / built-in name, or a previous batch output folder (incremental); repeat "
                        "for several models (each gets DIR/<n>-<name>)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--encoder", default=None, help="identity encoder (ArcFace ONNX); the testbed has its own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preserve", default="auto", help="'auto' (default set) or a .npy gallery")
    p.add_argument("--structure", choices=STRUCTURES, default=None,
                   help="kv (default): closed_form's map on attn2 to_k/to_v; mlp: the same least squares on the last "
                        "text-encoder MLP; keyed: added MLP units per identity (holds thousands; README capacity)")
    from fastforget.cli import add_option_argument

    add_option_argument(p)  # the structure's options: closed_form's (kv, mlp) or keyed's (tau_lo, ...)
    p.add_argument("--withdraw", nargs="+", default=None, metavar="ID",
                   help="instead of adding: withdraw these request ids from the batch folder given as --model")
    p.add_argument("--verify", type=int, default=0, metavar="K",
                   help="then verify each output on K of its requests (generations; a job per model, over Ray too)")
    p.add_argument("--verify-n", type=int, default=2, help="generations per identity for --verify")
    p.add_argument("--workers", type=int, default=1, help="fan independent jobs (one per model) out over Ray")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: a local one)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    from fastforget.jobs import BatchJob, WithdrawJob, run_jobs

    if args.workers < 1:
        raise InputError(f"--workers: expected an integer >= 1, got {args.workers}")
    out = Path(args.out)
    if args.withdraw is not None:
        if len(args.model) != 1:
            raise InputError("--withdraw: give exactly one --model (the batch folder)")
        jobs = [WithdrawJob(args.model[0], args.withdraw, str(out), args.overwrite)]
    else:
        if args.requests != "-":
            parse_requests(args.requests)  # every line checked before any model is loaded or any worker started
        many = len(args.model) > 1
        jobs = [BatchJob(m, str(args.requests), str(out / f"{i}-{Path(str(m)).name}") if many else str(out),
                         encoder=args.encoder, seed=args.seed, preserve=args.preserve, structure=args.structure,
                         overwrite=args.overwrite, options=args.option,
                         progress=not args.quiet) for i, m in enumerate(args.model)]
    if args.verify < 0 or args.verify_n < 1:
        raise InputError("--verify / --verify-n: expected K >= 0 requests and N >= 1 generations")
    results = run_jobs(jobs, workers=args.workers, ray_address=args.ray_address, progress=not args.quiet)
    if args.verify and args.withdraw is None:
        from fastforget.jobs import VerifyJob

        checks = [VerifyJob(j.out, j.requests, str(Path(j.out) / "verify.json"), encoder=args.encoder,
                            sample=args.verify, n=args.verify_n, seed=args.seed) for j in jobs]
        results += run_jobs(checks, workers=args.workers, ray_address=args.ray_address, progress=not args.quiet)
    for r in results:
        print(json.dumps(r, sort_keys=True))
    return 0
