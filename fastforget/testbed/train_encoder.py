"""Train the testbed's ArcFace-style identity encoder (additive angular margin loss).

    python -m fastforget.testbed.train_encoder --out fastforget/testbed/weights [--steps 1500]

Renders 4,000 training identities x 12 images, trains with ArcFace's loss
(s = 32, m = 0.4, margin warmed up), and prints TAR at FAR = 1e-3 and the same / different
identity cosines on 1,000 identities never seen in training.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from fastforget.testbed.nets import TestbedArcFace
from fastforget.testbed.renderer import render
from fastforget.testbed.splits import ENCODER_TRAIN_IDS


def to_input(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)


def render_dataset(ids, per_identity, seed, chunk=250):
    ims, labels = [], []
    for i in tqdm(range(0, len(ids), chunk), desc="render", leave=False):
        im, lab = render(ids[i:i + chunk], per_identity, seed=seed * 100_003 + i)
        ims.append(im)
        labels.append(lab)
    return np.concatenate(ims), np.concatenate(labels)


def arcface_logits(emb, weight, labels, s, m):
    cos = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1 + 1e-7, 1 - 1e-7)
    target = cos.gather(1, labels[:, None])
    theta = torch.acos(target)
    # cos(theta + m) where theta + m < pi, otherwise CosFace-style fallback keeps it monotonic
    with_margin = torch.where(theta + m < math.pi, torch.cos(theta + m), target - m * math.sin(m))
    return s * cos.scatter(1, labels[:, None], with_margin)


@torch.no_grad()
def evaluate(model, n_ids=1000, per_identity=4, seed=7, far=1e-3):
    from fastforget.metrics import verification_rates

    model.eval()
    im, lab = render(range(n_ids), per_identity, seed=seed)
    emb = torch.cat([F.normalize(model(to_input(im[i:i + 500]))) for i in range(0, len(im), 500)])
    return verification_rates(emb, torch.from_numpy(lab), far=far)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--per-identity", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()
    ids = list(ENCODER_TRAIN_IDS)
    images, labels = render_dataset(ids, args.per_identity, args.seed)
    labels = torch.from_numpy(labels - ids[0])
    data = to_input(images)
    print(f"rendered {len(images)} training images of {len(ids)} identities in {time.time() - t0:.0f}s")

    model = TestbedArcFace()
    head = torch.nn.Parameter(torch.randn(len(ids), 512) * 0.01)
    opt = torch.optim.AdamW([{"params": model.parameters(), "weight_decay": 5e-4},
                             {"params": [head], "weight_decay": 5e-4}], lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    bar = tqdm(range(args.steps), desc="encoder")
    for step in bar:
        idx = torch.randint(0, len(data), (args.batch,), generator=gen)
        m = 0.4 * min(1.0, step / (0.3 * args.steps))
        loss = F.cross_entropy(arcface_logits(model(data[idx]), head, labels[idx], 32.0, m), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", m=f"{m:.2f}")
    rates = evaluate(model)
    print(f"encoder: {time.time() - t0:.0f}s  held-out identities: " +
          "  ".join(f"{k}={v:.4f}" for k, v in rates.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / "encoder.safetensors"),
              metadata={"steps": str(args.steps), **{k: f"{v:.4f}" for k, v in rates.items()}})
    return rates


if __name__ == "__main__":
    main()
