"""Train the testbed's StyleGAN2 (`ff.load("demo-gan")`) by distillation from the renderer.

    python -m fastforget.testbed.train_gan [--out fastforget/testbed/weights/gan]
    python -m fastforget.testbed.train_gan --evaluate-only      # measure the shipped weights

The network is rosinality's StyleGAN2 generator (fastforget.models.stylegan2.Generator) at 32x32,
narrowed (style_dim 64, 4 mapping layers, widths 128/128/96/48 at 4/8/16/32 px). It is trained by
regression, not adversarially (a GAN would not converge in an hour on 2 CPU cores). Every render
of the testbed is a deterministic function of 38 numbers in [0, 1) (25 identity factors, the 10
nuisance draws it uses, 3 background draws, re-drawn here from the renderer's seeded generator), up
to its sensor noise. Those numbers, through the normal quantile, are the first 38 coordinates of z;
the other 26 point in a random direction and scale z to norm √64, so z is already what the
mapping's PixelNorm passes on, and z ~ N(0, I) draws near-uniform factors: random samples are
random people in random poses. Identities come from GAN_TRAIN_FIRST_ID up, never from the held-out
ids below 1,000,000. The loss is pixel MSE + 0.2 · (1 − cos) of the testbed encoder's embeddings.
Straight regression through mapping and synthesis only learns the mean face in an hour (measured:
MSE stalls at the renders' variance), so training has three stages:
1. generative latent optimisation: 4,096 fixed renders, each with its own learnable residual added to
   mapping(z) (penalised), train the synthesis network to draw faces from W;
2. the mapping regresses onto those W (mapping(z) + residual), cheap: no synthesis;
3. everything end to end on fresh renders of fresh identities through z -> mapping -> synthesis.
Adam, cosine decay; the EMA weights are what ships.

Quality (held-out identities, testbed encoder), printed beside the targets and written to
quality.json next to the weights:
- random samples are distinct people: mean pairwise identity cosine of 200 samples (target <= 0.25);
- inversion: renders of held-out identities inverted into W+ (`model.invert`, encoder given) come back
  as the same person: cosine of the reconstruction's embedding to the photo's (target >= 0.6); also
  without the encoder (pixel loss only) and against other photos of the same identity;
- W is smooth around an identity: GUIDE's adjacency step Δ = α · w_scale · (w_r − w_u) / ‖w_r − w_u‖
  (norms over the whole W+ tensor; w_scale = this model's typical ‖w⁺ − w_avg⁺‖ / 30, GUIDE's d, i.e.
  model.w_scale = w_spread·√n_latent / 30), from inverted held-out identities w_u towards random samples
  w_r, for α = 1, 2.5, 5 keeps the identity: cos(G(w_u + Δ), G(w_u)) (target >= 0.5 at every α <= 5).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastforget.testbed.renderer import identity_factors, render
from fastforget.testbed.splits import HELD_OUT_LIMIT

GAN_TRAIN_FIRST_ID = 3_000_000  # the GAN sees fresh identities from here upward
assert GAN_TRAIN_FIRST_ID >= HELD_OUT_LIMIT
SIZE, STYLE_DIM, N_MLP = 32, 64, 4
CHANNELS = {4: 128, 8: 128, 16: 96, 32: 48}
N_NUISANCE = 10  # render() uses draws 0..9 of its 16 per-image nuisance numbers
N_CODES = 25 + N_NUISANCE + 3
RENDER_SALT = 0x5EED  # render()'s generator: default_rng([RENDER_SALT, seed, size])
TARGETS = {"random_pairwise_cos": ("<=", 0.25), "inversion_cos": (">=", 0.6), "smoothness_cos_alpha5": (">=", 0.5)}


def default_out() -> Path:
    return Path(__file__).resolve().parent / "weights" / "gan"


def render_with_codes(ids, seed: int, nuisance: float = 1.0):
    """One render per id and the 38 numbers in [0, 1) that determine it: identity factors, then the
    nuisance and background draws render() makes from default_rng([RENDER_SALT, seed, SIZE]) in this order."""
    ids = np.asarray(ids, np.int64)
    images, _ = render(ids, 1, seed=seed, size=SIZE, nuisance=nuisance)
    rng = np.random.default_rng([RENDER_SALT, int(seed), SIZE])
    nuisance = rng.random((len(ids), 16)).astype(np.float32)[:, :N_NUISANCE]
    background = rng.random((len(ids), 3)).astype(np.float32)
    return images, np.concatenate([identity_factors(ids), nuisance, background], 1)


def codes_to_z(codes: np.ndarray, generator: torch.Generator, style_dim: int = STYLE_DIM) -> torch.Tensor:
    """z whose PixelNorm is itself: normal quantiles of the codes, then a random direction filling the
    remaining coordinates up to norm √style_dim."""
    c = torch.from_numpy(codes).double().clamp(1e-4, 1 - 1e-4)
    g = torch.special.ndtri(c)
    rest = torch.randn(len(c), style_dim - g.shape[1], generator=generator, dtype=torch.float64)
    room = (style_dim - g.square().sum(1, keepdim=True)).clamp_min(1e-3 * style_dim).sqrt()
    return torch.cat([g, rest / rest.norm(dim=1, keepdim=True) * room], 1).float()


def to_input(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1)


# ---------------------------------------------------------------- quality
def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1)


@torch.no_grad()
def _embed(model, encoder, w_plus) -> torch.Tensor:
    return encoder.encode_tensor(model.generate_tensor(w_plus))


def evaluate(model, encoder, n_samples: int = 200, n_ids: int = 24, invert_steps: int = 150, seed: int = 0,
             progress: bool = True) -> dict:
    """The figures of the module docstring on held-out identities 0..n_ids-1."""
    assert n_ids <= HELD_OUT_LIMIT
    t0 = time.time()
    emb = _embed(model, encoder, model.latents(n=n_samples, seed=seed))
    sim = emb @ emb.T
    off = ~torch.eye(n_samples, dtype=torch.bool)
    q = {"random_pairwise_cos": sim[off].mean().item()}
    ids = np.arange(n_ids)
    photos, _ = render(ids, 1, seed=seed + 7)
    others, _ = render(ids, 4, seed=seed + 8)
    e_photo = encoder.encode(photos)
    e_other = F.normalize(encoder.encode(others).view(n_ids, 4, -1).mean(1), dim=1)
    q["render_same_identity_cos"] = _cos(e_photo, e_other).mean().item()  # the encoder's own ceiling
    w_u = model.invert(photos, encoder=encoder, steps=invert_steps, seed=seed, progress=progress)
    e_rec = _embed(model, encoder, w_u)
    q["inversion_cos"] = _cos(e_rec, e_photo).mean().item()
    q["inversion_cos_min"] = _cos(e_rec, e_photo).min().item()
    q["inversion_cos_other_photos"] = _cos(e_rec, e_other).mean().item()
    with torch.no_grad():
        q["inversion_pixel_mse"] = F.mse_loss(model.generate_tensor(w_u), model.image_tensor(photos)).item()
    w_pix = model.invert(photos, encoder=None, steps=invert_steps, seed=seed, progress=progress)
    q["inversion_cos_pixel_only"] = _cos(_embed(model, encoder, w_pix), e_photo).mean().item()
    w_r = model.latents(n=n_ids, seed=seed + 10_000)
    direction = (w_r - w_u)
    direction = direction / direction.flatten(1).norm(dim=1)[:, None, None]
    for alpha in (1.0, 2.5, 5.0):
        c = _cos(_embed(model, encoder, w_u + alpha * model.w_scale * direction), e_rec)
        q[f"smoothness_cos_alpha{alpha:g}"] = c.mean().item()
        q[f"smoothness_cos_alpha{alpha:g}_min"] = c.min().item()
    q["w_spread"] = model.w_spread
    q["w_scale"] = model.w_scale
    q["eval_ids"] = n_ids
    q["eval_samples"] = n_samples
    q["invert_steps"] = invert_steps
    q["eval_seconds"] = time.time() - t0
    return q


def report(q: dict) -> str:
    lines = ["demo-gan quality (held-out identities, testbed encoder):"]
    for k, (op, target) in TARGETS.items():
        ok = q[k] <= target if op == "<=" else q[k] >= target
        lines.append(f"  {k:<28} {q[k]:7.3f}   target {op} {target:<5} {'met' if ok else 'NOT MET'}")
    for k in ("inversion_cos_min", "inversion_cos_other_photos", "inversion_cos_pixel_only", "inversion_pixel_mse",
              "render_same_identity_cos", "smoothness_cos_alpha1", "smoothness_cos_alpha2.5",
              "smoothness_cos_alpha5_min", "w_spread", "w_scale"):
        if k in q:
            lines.append(f"  {k:<28} {q[k]:7.3f}")
    return "\n".join(lines)


def targets_met(q: dict) -> bool:
    return all((q[k] <= t) if op == "<=" else (q[k] >= t) for k, (op, t) in TARGETS.items())


# ---------------------------------------------------------------- training
def _lr_scale(step: int, steps: int) -> float:
    warm = max(1, steps // 50)
    return min(1.0, (step + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def _set_lr(opt, base, scale):
    for g, b in zip(opt.param_groups, base):
        g["lr"] = b * scale


def train(*, glo_steps: int, map_steps: int, tune_steps: int, n_glo: int, batch: int, lr: float, id_weight: float,
          mapping_lr: float, residual_penalty: float, seed: int, encoder, progress: bool = True,
          style_dim: int = STYLE_DIM, history: list | None = None):
    """Three stages (see the module docstring); returns the EMA generator."""
    from fastforget.models.stylegan2 import Generator

    torch.manual_seed(seed)
    gen = Generator(SIZE, style_dim, N_MLP, channels=CHANNELS).train()
    g_ema = copy.deepcopy(gen).eval().requires_grad_(False)
    params, ema = list(gen.parameters()), list(g_ema.parameters())
    mapping = list(gen.style.parameters())
    rest = [p for n, p in gen.named_parameters() if not n.startswith("style.")]
    encoder.net.requires_grad_(False)
    z_gen = torch.Generator().manual_seed(seed + 1)
    ema_step = [0]

    def update_ema():
        decay = min(0.998, (1 + ema_step[0]) / (10 + ema_step[0]))
        ema_step[0] += 1
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)

    def image_loss(out, x):
        mse = F.mse_loss(out, x)
        with torch.no_grad():
            e_x = encoder.encode_tensor(x)
        id_loss = (1 - _cos(encoder.encode_tensor(out), e_x)).mean()
        return mse, id_loss

    def synth(w):
        return gen(w[:, None].expand(-1, gen.n_latent, -1))

    # stage 1: a fixed set of renders, each with its own learnable residual in W (generative latent
    # optimisation): the synthesis network learns to draw faces far faster than through the mapping alone
    images, codes = render_with_codes(range(GAN_TRAIN_FIRST_ID, GAN_TRAIN_FIRST_ID + n_glo), seed=seed * 1_000_003)
    x_all, z_all = to_input(images), codes_to_z(codes, z_gen, style_dim)
    residual = torch.nn.Embedding(n_glo, style_dim, sparse=True)
    torch.nn.init.zeros_(residual.weight)
    # EqualLinear's lr_mul 0.01 slows the mapping 100x (right for a GAN); mapping_lr undoes part of it
    opt = torch.optim.Adam([{"params": mapping, "lr": lr * mapping_lr}, {"params": rest, "lr": lr}], betas=(0.9, 0.99))
    r_opt = torch.optim.SparseAdam(list(residual.parameters()), lr=10 * lr)
    base, r_base = [g["lr"] for g in opt.param_groups], [10 * lr]
    pick = torch.Generator().manual_seed(seed + 2)
    bar = tqdm(range(glo_steps), desc="demo-gan 1/3 renders + W residuals", disable=not progress)
    for step in bar:
        scale = _lr_scale(step, glo_steps)
        _set_lr(opt, base, scale)
        _set_lr(r_opt, r_base, scale)
        idx = torch.randint(0, n_glo, (batch,), generator=pick)
        r = residual(idx)
        mse, id_loss = image_loss(synth(gen.mapping(z_all[idx]) + r), x_all[idx])
        loss = mse + id_weight * id_loss + residual_penalty * r.square().sum(1).mean()
        opt.zero_grad(set_to_none=True)
        r_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        r_opt.step()
        update_ema()
        if history is not None:
            history.append(("glo", mse.item(), id_loss.item()))
        if step % 20 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}", id=f"{id_loss.item():.3f}")

    # stage 2: the mapping absorbs the residuals (regression in W: cheap, no synthesis)
    with torch.no_grad():
        w_target = torch.cat([gen.mapping(c) for c in z_all.split(1024)]) + residual.weight
    m_opt = torch.optim.Adam(mapping, lr=lr * mapping_lr, betas=(0.9, 0.99))
    m_base = [lr * mapping_lr]
    bar = tqdm(range(map_steps), desc="demo-gan 2/3 mapping", disable=not progress)
    for step in bar:
        _set_lr(m_opt, m_base, _lr_scale(step, map_steps))
        idx = torch.randint(0, n_glo, (256,), generator=pick)
        loss = F.mse_loss(gen.mapping(z_all[idx]), w_target[idx])
        m_opt.zero_grad(set_to_none=True)
        loss.backward()
        m_opt.step()
        if step % 50 == 0:
            bar.set_postfix(w_mse=f"{loss.item():.4f}")
    with torch.no_grad():  # the EMA restarts from here: its mapping must be the fitted one
        for e, p in zip(ema, params):
            e.copy_(p)
    ema_step[0] = 50

    # stage 3: everything end to end on fresh renders of fresh identities through z -> mapping -> synthesis
    opt = torch.optim.Adam([{"params": mapping, "lr": lr * mapping_lr}, {"params": rest, "lr": lr}], betas=(0.9, 0.99))
    first_id = GAN_TRAIN_FIRST_ID + n_glo
    bar = tqdm(range(tune_steps), desc="demo-gan 3/3 fresh renders", disable=not progress)
    for step in bar:
        _set_lr(opt, base, 0.3 * _lr_scale(step, tune_steps))
        first = first_id + step * batch
        images, codes = render_with_codes(range(first, first + batch), seed=seed * 1_000_003 + 1 + step)
        mse, id_loss = image_loss(synth(gen.mapping(codes_to_z(codes, z_gen, style_dim))), to_input(images))
        loss = mse + id_weight * id_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema()
        if history is not None:
            history.append(("tune", mse.item(), id_loss.item()))
        if step % 20 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}", id=f"{id_loss.item():.3f}")
    for b_ema, b in zip(g_ema.buffers(), gen.buffers()):
        b_ema.copy_(b)
    return g_ema


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(default_out()))
    ap.add_argument("--glo-steps", type=int, default=1500, help="stage 1 steps (fixed renders + W residuals)")
    ap.add_argument("--map-steps", type=int, default=800, help="stage 2 steps (mapping regression)")
    ap.add_argument("--tune-steps", type=int, default=600, help="stage 3 steps (fresh renders, end to end)")
    ap.add_argument("--n-glo", type=int, default=4096, help="renders in stage 1")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mapping-lr", type=float, default=100.0, help="mapping lr multiplier (undoes EqualLinear's "
                    "lr_mul 0.01)")
    ap.add_argument("--id-weight", type=float, default=0.2)
    ap.add_argument("--residual-penalty", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-ids", type=int, default=24)
    ap.add_argument("--evaluate-only", action="store_true", help="measure the weights in --out")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fastforget.identity.encoder import load_encoder
    from fastforget.models.stylegan2 import StyleGAN2Model, load_stylegan2

    out = Path(args.out)
    encoder = load_encoder("demo")
    qfile = out / "quality.json"
    prev = json.loads(qfile.read_text()) if qfile.is_file() else {}
    train_info = {k: prev[k] for k in ("glo_steps", "map_steps", "tune_steps", "n_glo", "batch", "train_seconds",
                                       "seed") if k in prev}
    if not args.evaluate_only:
        t0 = time.time()
        g_ema = train(glo_steps=args.glo_steps, map_steps=args.map_steps, tune_steps=args.tune_steps,
                      n_glo=args.n_glo, batch=args.batch, lr=args.lr, id_weight=args.id_weight,
                      mapping_lr=args.mapping_lr, residual_penalty=args.residual_penalty, seed=args.seed,
                      encoder=encoder, progress=not args.no_progress)
        train_info = {"glo_steps": args.glo_steps, "map_steps": args.map_steps, "tune_steps": args.tune_steps,
                      "n_glo": args.n_glo, "batch": args.batch, "seed": args.seed,
                      "train_seconds": time.time() - t0}
        print(f"demo-gan: trained in {train_info['train_seconds']:.0f}s")
        model = StyleGAN2Model(g_ema, source="fastforget testbed (demo-gan)")
        model.save_pretrained(out, overwrite=True)
    model = load_stylegan2(out)  # measure what ships
    q = {**evaluate(model, encoder, n_ids=args.eval_ids, seed=args.seed, progress=not args.no_progress),
         **train_info}
    q["targets_met"] = targets_met(q)
    q["weights_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(report(q))
    qfile.write_text(json.dumps(q, indent=2))
    return q


if __name__ == "__main__":
    main()
