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
    sim = F.normalize(gen_emb.float(), dim=1) @ centroids.T
    own = (gen_labels[:, None] == centroid_labels[None, :])
    if not own.any(dim=1).all():
        raise ValueError("every generated label needs a centroid")
    ism = sim[own].mean().item()
    stranger = sim[~own].mean().item() if (~own).any() else float("nan")
    pred = centroid_labels[sim.argmax(dim=1)]
    return {"ism": ism, "stranger_ism": stranger, "accuracy": (pred == gen_labels).float().mean().item()}
