"""Identity metrics, measured the way the papers measure them (cosines of unit embeddings)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def verification_rates(emb: torch.Tensor, labels: torch.Tensor, far: float = 1e-3) -> dict:
    """1:1 verification over all pairs: TAR at the threshold giving `far`, mean genuine / impostor cosine."""
    emb = F.normalize(emb.float(), dim=1)
    sim = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    iu = torch.triu_indices(len(emb), len(emb), offset=1)
    s, g = sim[iu[0], iu[1]], same[iu[0], iu[1]]
    genuine, impostor = s[g], s[~g]
    threshold = impostor.kthvalue(max(1, int(round((1 - far) * impostor.numel())))).values.item()
    return {"tar": (genuine > threshold).double().mean().item(), "far": far, "threshold": threshold,
            "same_cos": genuine.mean().item(), "diff_cos": impostor.mean().item()}


def class_centroids(emb: torch.Tensor, labels: torch.Tensor):
    """Unit-norm mean embedding per label: (centroids (K, D), their labels (K,))."""
    uniq = torch.unique(labels)
    cents = torch.stack([F.normalize(emb[labels == u].float().mean(0), dim=0) for u in uniq])
    return cents, uniq


def identity_scores(gen_emb: torch.Tensor, gen_labels: torch.Tensor, centroids: torch.Tensor,
                    centroid_labels: torch.Tensor) -> dict:
    """ISM (cosine to own centroid), stranger ISM (mean cosine to the other centroids), and
    nearest-centroid accuracy of generated images' embeddings."""
    for what, x in (("generated embeddings", gen_emb), ("centroids", centroids)):
        if not torch.isfinite(x).all():
            from fastforget.errors import InputError

            raise InputError(f"metrics: {what} contain NaN or inf (non-finite generations?); no score is reported")
    sim = F.normalize(gen_emb.float(), dim=1) @ centroids.T
    own = (gen_labels[:, None] == centroid_labels[None, :])
    if not own.any(dim=1).all():
        raise ValueError("every generated label needs a centroid")
    ism = sim[own].mean().item()
    stranger = sim[~own].mean().item() if (~own).any() else float("nan")
    pred = centroid_labels[sim.argmax(dim=1)]
    return {"ism": ism, "stranger_ism": stranger, "accuracy": (pred == gen_labels).float().mean().item()}


@torch.no_grad()
def conditional_eps(model, emb: torch.Tensor, *, seed: int = 0, t: int = 500, n_noise: int = 2) -> torch.Tensor:
    """UNet outputs ε(x_t, t, c(e)) at fixed noisy samples: (N, n_noise, C·H·W). The same x_t for every
    identity, so differences are what the condition changes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n_noise,) + tuple(model.sample_shape(1)[1:]), generator=g).to(model.device, model.dtype)
    c = model.condition(emb).to(model.dtype)
    out = []
    for i in range(len(emb)):
        ci = c[i:i + 1].expand(n_noise, -1, -1)
        out.append(model.unet(x, torch.full((n_noise,), t, device=x.device), encoder_hidden_states=ci).sample
                   .float().flatten(1).cpu())
    return torch.stack(out)


@torch.no_grad()
def identity_movement(before, after, targets: torch.Tensor, anchors: torch.Tensor, others: torch.Tensor, *,
                      seed: int = 0) -> torch.Tensor:
    """How far an edit moved each of `others`, as a fraction of how far it had to move the targets: per
    identity ‖ε_after(c_o) − ε_before(c_o)‖ / mean_t ‖ε_before(c_t) − ε_before(c_anchor(t))‖, at fixed x_t.
    0 = untouched; 1 = moved as far as a target is moved onto its anchor."""
    e_t, e_a = conditional_eps(before, targets, seed=seed), conditional_eps(before, anchors, seed=seed)
    scale = (e_t - e_a).norm(dim=-1).mean()
    moved = (conditional_eps(after, others, seed=seed) - conditional_eps(before, others, seed=seed)).norm(dim=-1)
    return (moved.mean(1) / scale).float()
