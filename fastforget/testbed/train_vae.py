"""Train the testbed's KL autoencoder (diffusers AutoencoderKL, 32x32x3 <-> 8x8x4).

    python -m fastforget.testbed.train_vae --out fastforget/testbed/weights [--steps 1200]

Fresh renders every step (unlimited identities); L1 + MSE reconstruction + a small KL term.
Sets `scaling_factor` so that scaled latents have unit variance, as SD-1.5's VAE does.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm import tqdm

from fastforget.testbed.nets import vae_config
from fastforget.testbed.renderer import render
from fastforget.testbed.splits import GENERATOR_TRAIN_FIRST_ID
from fastforget.testbed.train_encoder import to_input


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=args.steps, pct_start=0.05)
    bar = tqdm(range(args.steps), desc="vae")
    first = GENERATOR_TRAIN_FIRST_ID + 10_000_000  # identities the generator never conditions on
    for step in bar:
        ids = range(first + step * args.batch, first + (step + 1) * args.batch)
        x = to_input(render(ids, 1, seed=args.seed * 7919 + step)[0])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval()
    with torch.no_grad():
        x = to_input(render(range(200), 2, seed=123)[0])
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample.clamp(-1, 1)
        mse = F.mse_loss(rec, x).item()
        scaling = 1.0 / z.std().item()
    vae.register_to_config(scaling_factor=scaling)
    print(f"vae: {time.time() - t0:.0f}s  held-out reconstruction MSE={mse:.5f} (PSNR {10 * torch.log10(torch.tensor(4.0 / mse)):.1f} dB)"
          f"  scaling_factor={scaling:.4f}")
    out = Path(args.out) / "vae"
    vae.to(torch.float16).save_pretrained(out, safe_serialization=True)
    return mse


if __name__ == "__main__":
    main()
