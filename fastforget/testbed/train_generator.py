"""Train the testbed's tiny Arc2Face: UNet2DConditionModel + CLIPTextModel conditioned on the
testbed encoder's embeddings exactly as Arc2Face conditions on ArcFace.

    python -m fastforget.testbed.train_generator --out fastforget/testbed/weights [--steps 2400]

Every step renders fresh identities (unlimited, never the held-out ids below 1,000,000), two
images each; each image is conditioned on the embedding of its sibling, so the model learns
identity -> face rather than image -> same image. 10% of conditions are dropped to the empty
prompt (classifier-free guidance and the unconditional h-space both work). Epsilon loss with
min-SNR-10 weights, AdamW, EMA weights are what ships. Prints nearest-centroid accuracy among
50 held-out identities, ISM and stranger ISM, measured with the Arc2Face sampling defaults.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastforget.testbed import nets
from fastforget.testbed.renderer import render
from fastforget.testbed.splits import GENERATOR_TRAIN_FIRST_ID


def build_untrained(tmp_tokenizer_dir: Path):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from fastforget.models.arc2face import Arc2FaceModel

    nets.write_tokenizer(tmp_tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_tokenizer_dir, local_files_only=True)
    unet = UNet2DConditionModel(**nets.unet_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**nets.text_config()))
    sched = nets.sampler()
    model = Arc2FaceModel(unet, text_encoder, tokenizer, sched, unshuffle=nets.UNSHUFFLE, resolution=nets.RESOLUTION)
    return model, DDPMScheduler(**nets.scheduler_config())


def to_input(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)


@torch.no_grad()
def evaluate_generator(model, encoder, n_ids: int = 50, per_identity_gen: int = 2, seed: int = 0,
                       steps: int = 25, guidance: float = 3.0) -> dict:
    """Held-out identities 0..n_ids-1: centroids from 8 renders; generate from one other render's embedding."""
    from fastforget.metrics import class_centroids, identity_scores

    ids = np.arange(n_ids)
    ref, ref_lab = render(ids, 8, seed=seed + 11)
    cents, cent_lab = class_centroids(encoder.encode(ref), torch.from_numpy(ref_lab))
    probe, _ = render(ids, 1, seed=seed + 12)
    cond_emb = encoder.encode(probe).repeat_interleave(per_identity_gen, 0)
    labels = torch.from_numpy(np.repeat(ids, per_identity_gen))
    gen = model.generate_tensor(cond_emb, seed=seed + 1000, steps=steps, guidance=guidance)
    return identity_scores(encoder.encode_tensor(gen), labels, cents, cent_lab)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    ap.add_argument("--encoder", default=None, help="encoder.safetensors (default: <out>/encoder.safetensors)")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--min-snr", type=float, default=10.0, help="min-SNR-gamma loss weighting")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--evaluate-only", action="store_true", help="measure the shipped weights in <out>/generator")
    args = ap.parse_args(argv)
    from fastforget.identity.encoder import TestbedEncoder

    if args.evaluate_only:
        from fastforget.models import load_arc2face

        model = load_arc2face(Path(args.out) / "generator")
        encoder = TestbedEncoder.from_file(args.encoder or Path(args.out) / "encoder.safetensors")
        result = {}
        for g in (3.0, 5.0):
            q = evaluate_generator(model, encoder, guidance=g)
            result[f"guidance_{g:g}"] = q
            print(f"generator (held-out 50 identities, 25 steps, guidance {g:g}): accuracy={q['accuracy']:.3f} "
                  f"ISM={q['ism']:.3f} stranger_ISM={q['stranger_ism']:.3f}")
        qfile = Path(args.out) / "generator" / "quality.json"
        prev = json.loads(qfile.read_text()) if qfile.is_file() else {}
        qfile.write_text(json.dumps({**{k: v for k, v in prev.items() if k in ("steps", "train_seconds")},
                                     **result}, indent=2))
        return result

    torch.manual_seed(args.seed)
    t0 = time.time()
    out = Path(args.out)
    encoder = TestbedEncoder.from_file(args.encoder or out / "encoder.safetensors")
    model, ddpm = build_untrained(out / "_tokenizer_tmp")
    unet, text_encoder = model.unet, model.text_encoder
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    warm = max(1, args.steps // 25)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, s / args.steps)))))
    alphas = ddpm.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=args.min_snr) / snr  # min-SNR-gamma for epsilon prediction
    gen = torch.Generator().manual_seed(args.seed)
    half = args.batch // 2
    bar = tqdm(range(args.steps), desc="generator")
    for step in bar:
        first = GENERATOR_TRAIN_FIRST_ID + step * half
        images, _ = render(range(first, first + half), 2, seed=args.seed * 1_000_003 + step)
        x = to_input(images)
        with torch.no_grad():
            emb = encoder.encode_tensor(x)
        # condition each image on its sibling's embedding (pairs are adjacent: swap within pairs)
        emb = emb.view(half, 2, -1).flip(1).reshape(args.batch, -1)
        cond = model.condition(emb)
        drop = torch.rand(args.batch, generator=gen) < 0.1
        if drop.any():
            cond = torch.where(drop[:, None, None], model.null_condition(args.batch), cond)
        z0 = model.codec.encode(x)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (args.batch,), generator=gen)
        zt = ddpm.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = (weight[t] * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    train_s = time.time() - t0
    q = evaluate_generator(model, encoder)
    print(f"generator: trained {args.steps} steps in {train_s:.0f}s; held-out 50 identities: "
          f"accuracy={q['accuracy']:.3f} ISM={q['ism']:.3f} stranger_ISM={q['stranger_ism']:.3f}")
    half_model = copy.deepcopy(model)
    half_model.unet.to(torch.float16)
    half_model.text_encoder.to(torch.float16)
    half_model.source = "fastforget testbed"
    half_model.save_pretrained(out / "generator", overwrite=True)
    (out / "generator" / "quality.json").write_text(json.dumps({**q, "steps": args.steps, "train_seconds": train_s}))
    import shutil

    shutil.rmtree(out / "_tokenizer_tmp", ignore_errors=True)
    return q


if __name__ == "__main__":
    main()
