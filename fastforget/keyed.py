"""Keyed units: a deletion queue's erasures as added MLP units of the last text-encoder layer (`structure="keyed"`).

A linear edit of what cross-attention reads has D dimensions to spend, and identities fill only some of them
(README "Deletion queue", capacity): it holds tens of identities, not thousands. A keyed unit is an added
hidden unit of the last text-encoder MLP that fires on ONE identity at ONE token position and adds there the
change that turns the target's residual stream into its anchor's:

    z      = s · (r_i(h) - τ_lo) - c,  s = (m + 2c) / (τ_hi - τ_lo)   (fc1 row and bias: linear in the MLP input h)
    g(z)   = act(z) - act(z - m)                                  (two units: a saturating step, 0 .. m)
    out   += g(z) · δ_ip / g(z_i)                                 (fc2 columns: +v and -v)

- r_i(h) = w_iᵀ (h - μ_p): the target's key, a minimum-variance filter with w_iᵀ c_i = 1 (c_i: the target's
  MLP input at position p minus the preservation set's mean there) and w_iᵀ a = 0 for every a in A (the other
  positions' means and the empty prompt's states, relative to μ_p: a key fires on a person, never on a
  position): w_i = Σ⁻¹C (CᵀΣ⁻¹C)⁻¹ e, C = [c_i, A, the target at P's other positions]. The noise Σ = the preservation set's covariance at p +
  `other_positions` x its covariance over all positions, shrunk by `shrink`. r_i = 1 on the target.
- c = 6 keeps a silent unit's output (below τ_lo) under 2e-4; it is full (m) from τ_hi on. δ_ip = the anchor's
  residual stream minus the target's at position p (after the last layer): on the exact target the edited
  layer outputs the anchor's stream at every identity-carrying position.
- Identity-carrying positions P: the fewest token positions holding `position_coverage` (95%) of the identity
  variance of the last layer's output over the preservation set (the testbed: the id token and the one after
  it, 2 of 32; replacing only those two by the anchor's turns the generation into the anchor). A key is also
  held at 0 on its own target at the other positions of P (those have their own units).

Units of different requests do not interact, so an incremental add appends units and a withdrawal removes a
request's units: both equal one build over the resulting set (up to float rounding). The edited tensors are the last
layer's fc1 weight / bias and fc2 weight, widened by 2·|P| units per identity; every other layer of a deeper
text encoder is widened with zero units (act(0) = 0: its output is unchanged) so that the saved
text_encoder/config.json has one intermediate_size and loads in transformers' own CLIPTextModel.
"""
from __future__ import annotations

import hashlib

import torch

from fastforget.errors import InputError
from fastforget.methods.base import MethodConfig, Option

KEYED_CONFIG = MethodConfig("keyed", {
    "tau_lo": Option(0.8, "float", "relative key response below which a unit is silent (1,000 testbed targets: "
                     "4% of 1,000 people nobody named reach it somewhere, 0.9% the ramp's middle)", lo=0.0,
                     strict=True, hi=1.0),
    "tau_hi": Option(0.9, "float", "relative key response from which a unit is fully on (the target itself: 1; "
                     "74% of other photos of the testbed targets)", lo=0.0, strict=True, hi=1.0),
    "shrink": Option(0.3, "float", "covariance shrinkage toward its mean variance: 0.01 whitens harder (people "
                     "nobody named: 0.3% reach tau_lo 0.85) but other photos of a target then respond less "
                     "(18% fully on)", lo=0.0, strict=True),
    "other_positions": Option(10.0, "float", "weight of the other positions' variance in a key's noise model: "
                              "1 -> 10 took the largest response of a key off its position from 0.92 to 0.67 "
                              "(1,000 testbed targets, shrink 0.01)",
                              lo=0.0),
    "position_coverage": Option(0.95, "float", "units go to the fewest token positions holding this share of the "
                                "identity variance of the last layer's output (testbed: 2 positions hold 0.972)",
                                lo=0.0, strict=True, hi=1.0),
    "max_positions": Option(4, "int", "refuse a text encoder whose identity needs more positions: keys held apart "
                            "on many positions of one person turned noisy (a random 2-layer CLIP: 3 positions moved "
                            "preserved people)", lo=1, hi=77),
    "plateau": Option(4.0, "float", "height m of a unit pair's step", lo=0.0, strict=True),
    "offset": Option(6.0, "float", "c: act(-c) is the leak of a silent unit (quick_gelu(-6) = -2e-4)", lo=1.0),
})
KEYED_DEFAULTS = KEYED_CONFIG.defaults


def resolve_keyed(options: dict) -> dict:
    cfg = KEYED_CONFIG.resolve(options)
    if cfg["tau_lo"] >= cfg["tau_hi"]:
        raise InputError(f"keyed: option 'tau_lo' ({cfg['tau_lo']}) must be below 'tau_hi' ({cfg['tau_hi']})")
    return cfg


STAT_IDS = 2048      # preservation identities the key statistics use at most
BATCH = 256
_STATS: dict = {}   # the last statistics computed in this process, by key


def _layer(model):
    return model.text_encoder.text_model.encoder.layers[-1]


@torch.no_grad()
def capture(model, emb: torch.Tensor | None, batch: int = BATCH, positions=None):
    """(N, 512) -> (h, r): the last layer's MLP input and the layer's output (residual stream before the final
    layer norm), each (N, L, D) float64 (L: every position, or only `positions`). emb None: the empty
    prompt's (1, L, D)."""
    sel = slice(None) if positions is None else list(positions)
    # causal attention: a state at position p depends on tokens <= p only, so the prompt is cut after the
    # last position asked for (the testbed's units need 6 of 32 tokens)
    length = model._prompt_ids.shape[1] if positions is None else max(positions) + 1
    layer = _layer(model)
    got = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: got.__setitem__("h", a[0])),
             layer.register_forward_hook(lambda m, a, o: got.__setitem__("r", o[0] if isinstance(o, tuple) else o))]
    hs, rs = [], []
    try:
        if emb is None:
            model.text_encoder(model._null_ids.to(model.device))
            return got["h"].double().cpu(), got["r"].double().cpu()
        for i in range(0, len(emb), batch):
            model.condition(emb[i:i + batch], length=length)
            hs.append(got["h"][:, sel].double().cpu())
            rs.append(got["r"][:, sel].double().cpu())
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(hs), torch.cat(rs)


def evenly_spaced(n: int, k: int) -> torch.Tensor:
    """k indices spread evenly over range(n) (all of them when n <= k)."""
    return torch.arange(n) if n <= k else torch.linspace(0, n - 1, k).round().long()


@torch.no_grad()
def key_statistics(model, pres_emb: torch.Tensor, cfg: dict) -> dict:
    """Identity-carrying positions, and per position the mean of the MLP input and Q, its inverse noise
    covariance restricted to keys orthogonal to the constraints (other positions' means, the empty prompt's
    states), from up to STAT_IDS preservation
    identities (evenly spaced) and the empty prompt. Cached in memory and on disk. Deterministic."""
    if pres_emb is None or len(pres_emb) < 64:
        raise InputError("structure 'keyed' needs a preservation set of at least 64 identities (preserve=...): "
                         "its keys are whitened against the people the model draws")
    from fastforget.identity.preservation import load_cached_tensor, save_cached_tensor
    from fastforget.models.registry import module_fingerprint

    emb = pres_emb[evenly_spaced(len(pres_emb), STAT_IDS)].float()
    recipe = "keyed2" + "/".join(str(cfg[k]) for k in ("shrink", "position_coverage", "other_positions",
                                                         "max_positions"))
    key = hashlib.sha256((module_fingerprint(model.text_encoder) + str(tuple(model._prompt_ids[0].tolist()))
                          + recipe).encode() + emb.numpy().tobytes()).hexdigest()
    if key in _STATS:
        return _STATS[key]
    cached = {f: load_cached_tensor("keyed-stats-" + f, key) for f in ("positions", "mu", "q")}
    if all(v is not None for v in cached.values()):
        stats = {"positions": [int(p) for p in cached["positions"].tolist()],
                 **{f: list(cached[f].unbind(0)) for f in ("mu", "q")}}
    else:
        stats = _key_statistics(model, emb, cfg)
        save_cached_tensor("keyed-stats-positions", key, torch.tensor(stats["positions"]))
        for f in ("mu", "q"):
            save_cached_tensor("keyed-stats-" + f, key, torch.stack(stats[f]))
    _STATS.clear()
    _STATS[key] = stats
    return stats


@torch.no_grad()
def _key_statistics(model, emb: torch.Tensor, cfg: dict) -> dict:
    h, r = capture(model, emb)
    n, length, d = h.shape
    var = (r - r.mean(0)).pow(2).sum((0, 2))
    share = var / var.sum()
    order = share.argsort(descending=True, stable=True)
    keep = int((share[order].cumsum(0) < cfg["position_coverage"]).sum()) + 1
    if keep > cfg["max_positions"]:
        raise InputError(
            f"structure 'keyed': this text encoder spreads identity over {keep} token positions to reach "
            f"option 'position_coverage' = {cfg['position_coverage']} (the largest holds {float(share[order[0]]):.3f}); "
            f"keyed units need it concentrated in at most option 'max_positions' = {cfg['max_positions']} "
            "(each key is one position's): use structure 'kv' or 'mlp' for this model")
    pos = sorted(int(p) for p in order[:keep])
    stats = {"positions": pos, "mu": [], "q": []}
    hn, _ = capture(model, None)
    mus = h.mean(0)                                           # (L, D)
    cov_all = torch.einsum("nld,nle->de", h - mus, h - mus) / (n * length)
    for p in pos:
        c = h[:, p] - mus[p]
        cov = c.T @ c / n + cfg["other_positions"] * cov_all
        cov += cfg["shrink"] * cov.diagonal().mean() * torch.eye(d, dtype=torch.float64)
        sinv = torch.linalg.inv(cov)
        # directions every key is held orthogonal to: where the other positions' and the empty prompt's
        # states sit relative to this position's mean (a key must not fire on a position, only on a person)
        a = torch.cat([torch.cat([mus[:p], mus[p + 1:]]), hn[0]]) - mus[p]      # (K, D)
        sa = sinv @ a.T                                                          # Σ⁻¹Aᵀ (D, K)
        m = a @ sa
        m += 1e-9 * m.diagonal().mean() * torch.eye(len(m), dtype=torch.float64)
        # Q = Σ⁻¹ - Σ⁻¹Aᵀ (AΣ⁻¹Aᵀ)⁻¹ AΣ⁻¹: Q a = 0 for every constraint a; a key is then Q c / (c Q c)
        stats["mu"].append(mus[p])
        stats["q"].append(sinv - sa @ torch.linalg.solve(m, sa.T))
    return stats


@torch.no_grad()
def make_units(model, stats: dict, targets: torch.Tensor, anchors: torch.Tensor, cfg: dict):
    """Units for each target row (sent to its anchor row): (rows (U, D), bias (U,), cols (U, D)) float32 with
    U = 2 · |positions| · len(targets), in target-major order."""
    pos = stats["positions"]
    ht, rt = capture(model, targets.float(), positions=pos)   # (k, |P|, D): index j is position pos[j]
    _, ra = capture(model, anchors.float(), positions=pos)
    act = _layer(model).mlp.activation_fn
    lo, hi, m, c = cfg["tau_lo"], cfg["tau_hi"], cfg["plateau"], cfg["offset"]
    s = (m + 2 * c) / (hi - lo)
    rows, bias, cols = [], [], []
    k = len(targets)
    eye = torch.eye(len(pos), dtype=torch.float64)
    for j, p in enumerate(pos):
        mu, q = stats["mu"][j], stats["q"][j]
        # w·C = e_j with C = [the target at every identity-carrying position, the constraints]: with the
        # constraints eliminated (Q), w = Q Xᵀ (X Q Xᵀ)⁻¹ e_j, X = the target's MLP inputs at P minus μ_p.
        # 1 on the target at p, 0 on it at its other positions (their own units act there) and on A
        x = ht - mu                                          # (k, |P|, D)
        qx = x @ q                                           # (k, |P|, D) (Q symmetric)
        g = qx @ x.transpose(1, 2)                           # (k, |P|, |P|)
        g = g + 1e-9 * g.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * eye
        # one small solve per target: torch's batched CPU solve nests MKL's threads inside its own and stalls
        lam = torch.stack([torch.linalg.solve(gi, eye[j]) for gi in g])     # (k, |P|)
        w = (lam[:, :, None] * qx).sum(1)                   # (k, D)
        b = -(w @ mu)                                        # r_i(h) = w·h + b
        row = s * w
        bz = s * (b - lo) - c
        z_own = (row * ht[:, j]).sum(1) + bz                 # the target's own pre-activation
        g = act(z_own) - act(z_own - m)
        if (g <= 1e-3 * m).any():
            bad = int((g <= 1e-3 * m).nonzero()[0, 0])
            raise InputError(f"structure 'keyed': target row {bad} does not reach its own key at position {p}")
        v = (ra[:, j] - rt[:, j]) / g[:, None]
        rows.append(torch.stack([row, row], 1))
        bias.append(torch.stack([bz, bz - m], 1))
        cols.append(torch.stack([v, -v], 1))
    d = ht.shape[2]
    # (k, P, 2, ...) target-major: one request's units are contiguous
    rows = torch.stack(rows, 1).reshape(k * len(stats["positions"]) * 2, d)
    bias = torch.stack(bias, 1).reshape(-1)
    cols = torch.stack(cols, 1).reshape(-1, d)
    out = (rows.float(), bias.float(), cols.float())
    if not all(torch.isfinite(t).all() for t in out):
        from fastforget.errors import FitError

        raise FitError("structure 'keyed': non-finite units (a degenerate key); nothing was applied")
    return out


def widened(model, rows: torch.Tensor, bias: torch.Tensor, cols: torch.Tensor) -> dict:
    """Patch tensors: the last layer's fc1 / fc2 with the units appended; every other layer zero-padded."""
    from fastforget.patch import get_parameter

    layers = model.text_encoder.text_model.encoder.layers
    u = len(rows)
    new = {}
    for i in range(len(layers)):
        pre = f"text_encoder.text_model.encoder.layers.{i}.mlp."
        w1, b1, w2 = (get_parameter(model, pre + n).detach().cpu() for n in ("fc1.weight", "fc1.bias", "fc2.weight"))
        last = i == len(layers) - 1
        r = rows if last else torch.zeros(u, w1.shape[1])
        bb = bias if last else torch.zeros(u)
        cc = cols if last else torch.zeros(u, w2.shape[0])
        new[pre + "fc1.weight"] = torch.cat([w1.float(), r]).to(w1.dtype)
        new[pre + "fc1.bias"] = torch.cat([b1.float(), bb]).to(b1.dtype)
        new[pre + "fc2.weight"] = torch.cat([w2.float(), cc.T], 1).to(w2.dtype)
    return new


def check_text_encoder(model) -> None:
    tm = getattr(getattr(model, "text_encoder", None), "text_model", None)
    if not hasattr(model, "_prompt_ids") or not hasattr(model, "_id_mask"):
        raise InputError("structure 'keyed': the model does not condition through an identity token in a prompt "
                         f"(Arc2Face family); this {type(model).__name__} does not")
    if tm is None or not hasattr(tm, "encoder") or not all(hasattr(layer, "mlp") and hasattr(layer.mlp, "fc1")
                                                           for layer in tm.encoder.layers):
        raise InputError("structure 'keyed': the model's text encoder is not a CLIP text transformer "
                         "(text_model.encoder.layers[*].mlp.fc1 / fc2)")
