"""Train the testbed's portrait generators: an IP-Adapter FaceID on the testbed UNet (generator A,
`ff.load("demo-faceid")`) and a shifted-domain fine-tune of that UNet (generator B,
`ff.load("demo-faceid-b")`) that uses the same adapter unchanged.

    python -m fastforget.testbed.train_faceid [--out fastforget/testbed/weights] [--steps 400] [--b-steps 400]

Adapter (A). IP-Adapter FaceID in its original layout: MLPProjModel Linear(512, 512)-GELU-Linear(512, 4 x 512)
-> LayerNorm(512) (hidden width 512 instead of FaceID's 1024: the smallest diffusers' converter accepts, so the
shipped file stays under 5 MB in float16) and to_k_ip / to_v_ip on every cross-attention layer, initialised
from the UNet's own to_k / to_v as IP-Adapter does. The UNet and the text encoder are frozen: identity reaches
the UNet only through the adapter. The text prompt is the empty prompt (the testbed text encoder knows only
Arc2Face's prompt and the empty one), the negative branch is the zero embedding, as in IP-Adapter. Trained by
distillation from the Arc2Face path of the same UNet (`ff.load("demo")`): on noisy renders x_t of fresh
identities (ids from 3,000,000; never the held-out ids below 1,000,000), the student's
eps(x_t, "", tokens(e)) is fitted to the teacher's eps(x_t, c(e)), e being the embedding of a sibling render
(another photo of the person); 10% of rows drop to the zero embedding against the teacher's empty prompt
(classifier-free guidance).

Generator B. The testbed UNet fine-tuned, as community fine-tunes of SD-1.5 are, on a shifted domain of the
renderer: "evening light" (a mild warm colour cast, a strong directional light from the left or right, a
vignette; `shift_domain`), with its own Arc2Face conditioning (no adapter), epsilon loss with min-SNR-10
weights. LoRA (rank `--b-rank`) on every Linear / Conv2d of the UNet; what ships is the LoRA factors
(weights/faceid_b/unet_lora.safetensors), merged into the testbed UNet at load (`apply_unet_delta`).

Quality (printed and written to weights/faceid/quality.json): nearest-centroid accuracy, ISM and stranger ISM
of 50 held-out identities (centroids of 8 plain renders each, generation from one other render's embedding,
2 images each, 25 DDIM steps, guidance 3), for A and for B with the same adapter, measured on the float16
weights that ship. Targets (issue 13): accuracy >= 0.70 on A, >= 0.60 on B.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastforget.testbed import nets
from fastforget.testbed.renderer import render

FACEID_TRAIN_FIRST_ID = 3_000_000   # adapter distillation: fresh identities (held-out ids stay below 1,000,000)
B_TRAIN_FIRST_ID = 4_000_000        # generator B's fine-tune
HIDDEN = 512                        # MLPProjModel hidden width (diffusers needs a multiple of 512)
TOKENS = 4                          # FaceID's ID tokens (diffusers assumes 4)
ADAPTER_FILE = "ip-adapter-faceid.safetensors"
LORA_FILE = "unet_lora.safetensors"
MANIFEST_B = {"family": "ip_adapter_faceid", "unet_lora": LORA_FILE, "base": "../generator",
              "domain": "evening light: mild warm cast, directional side light, vignette (train_faceid.shift_domain)"}


# ---------------------------------------------------------------- generator B's domain
def shift_domain(images_u8: np.ndarray, seed: int = 0) -> np.ndarray:
    """"Evening light": a mild warm colour cast, a strong directional light from the left or the right (per
    image), and a vignette. uint8 (N, H, W, 3) -> uint8, deterministic in `seed`."""
    rng = np.random.default_rng([0xB0B, int(seed)])
    n, h, w, _ = images_u8.shape
    x = images_u8.astype(np.float32) / 255.0
    gy, gx = np.meshgrid(np.linspace(-1, 1, h, dtype=np.float32), np.linspace(-1, 1, w, dtype=np.float32),
                         indexing="ij")
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)[:, None, None]
    light = 1.0 + 0.35 * side * gx[None]
    vignette = 1.0 - 0.35 * np.clip(gx ** 2 + gy ** 2, 0, 2)[None] / 2
    # a mild cast: the testbed encoder reads skin and hair colour as identity (measured on 100 renders of 50
    # held-out people: nearest-centroid accuracy 1.00 and ISM 0.87 against plain renders' 1.00 / 0.94)
    warm = np.array([1.05, 1.0, 0.92], np.float32)
    x = x * (light * vignette)[..., None] * warm
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------- LoRA for generator B
def lora_targets(unet) -> dict:
    """Every Linear / Conv2d of the base UNet (no adapter modules), by qualified name."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and "processor" not in n and not n.startswith("encoder_hid_proj")}


class _LoRA(torch.nn.Module):
    """weight -> weight + up @ down (reshaped to the weight's shape); up starts at zero (no change)."""

    def __init__(self, weight: torch.Tensor, rank: int, gen: torch.Generator):
        super().__init__()
        out, fan_in = weight.shape[0], weight[0].numel()
        r = min(rank, out, fan_in)
        self.down = torch.nn.Parameter(torch.randn(r, fan_in, generator=gen) / fan_in ** 0.5)
        self.up = torch.nn.Parameter(torch.zeros(out, r))

    def forward(self, w):
        return w + (self.up @ self.down).view_as(w)


def add_lora(unet, rank: int, seed: int) -> dict:
    from torch.nn.utils import parametrize

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in lora_targets(unet).items():
        p = _LoRA(m.weight.detach(), rank, gen)
        parametrize.register_parametrization(m, "weight", p)
        out[name] = p
    return out


def remove_lora(unet) -> None:
    """Merge every LoRA into its weight (plain modules again)."""
    from torch.nn.utils import parametrize

    for m in lora_targets(unet).values():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


def apply_unet_delta(unet, folder) -> None:
    """Merge generator B's LoRA factors (folder/unet_lora.safetensors) into `unet`'s base weights, in place."""
    from safetensors.torch import load_file

    from fastforget.errors import ModelLoadError

    path = Path(folder) / LORA_FILE
    if not path.is_file():
        raise ModelLoadError(f"testbed generator B weights missing at {path}: reinstall fastforget or run "
                             "python -m fastforget.testbed.train_faceid")
    state = load_file(str(path))
    modules = lora_targets(unet)
    names = {k.rsplit(".lora_", 1)[0] for k in state}
    if not names <= set(modules):
        raise ModelLoadError(f"{path}: LoRA for modules this UNet lacks: {sorted(names - set(modules))[:3]}")
    with torch.no_grad():
        for n in sorted(names):
            w = modules[n].weight
            w += (state[f"{n}.lora_up"].float() @ state[f"{n}.lora_down"].float()).view_as(w).to(w.dtype)


# ---------------------------------------------------------------- the adapter
def initial_adapter(unet, seed: int) -> dict:
    """FaceID layout, original keys: the projection as nn.Linear initialises, to_k_ip / to_v_ip copies of each
    cross-attention's to_k / to_v (k = 1, 3, ... over attn_processors, IP-Adapter's numbering)."""
    torch.manual_seed(seed)
    d = unet.config.cross_attention_dim
    l0, l2 = torch.nn.Linear(512, HIDDEN), torch.nn.Linear(HIDDEN, d * TOKENS)
    proj = {"proj.0.weight": l0.weight, "proj.0.bias": l0.bias, "proj.2.weight": l2.weight, "proj.2.bias": l2.bias,
            "norm.weight": torch.ones(d), "norm.bias": torch.zeros(d)}
    ip = {}
    for k, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name[:-len(".processor")])
            ip[f"{k}.to_k_ip.weight"] = attn.to_k.weight
            ip[f"{k}.to_v_ip.weight"] = attn.to_v.weight
    return {"image_proj": {k: v.detach().clone().contiguous() for k, v in proj.items()},
            "ip_adapter": {k: v.detach().clone().contiguous() for k, v in ip.items()}}


def adapter_manifest() -> dict:
    return {"family": "ip_adapter_faceid", "ip_adapter": ADAPTER_FILE, "pipeline": "StableDiffusionPipeline",
            "unshuffle": nets.UNSHUFFLE, "prompt": "", "negative_prompt": "", "embedding_norm": 1.0,
            "base": "../generator", "source": "fastforget testbed"}


def load_student(weights: Path, ckpt: Path, *, b: bool = False):
    """A / B as `ff.load("demo-faceid[-b]")` builds them, from `weights` (generator/, faceid_b/) and `ckpt`."""
    from fastforget.models.ip_adapter import _assemble

    model = _assemble(weights / "generator", ckpt, adapter_manifest(), "StableDiffusionPipeline", False, None)
    if b:
        apply_unet_delta(model.unet, weights / "faceid_b")
    return model


def to_input(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)


def _lr_lambda(steps: int):
    warm = max(1, steps // 20)
    return lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))


def train_adapter(teacher, student, encoder, ddpm, *, steps: int, batch: int, lr: float, seed: int) -> list:
    """Distil the teacher's Arc2Face conditioning into the adapter (see the module docstring)."""
    params = list(student.image_proj.parameters()) + [p for proc in student.ip_processors().values()
                                                      for p in proc.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    gen = torch.Generator().manual_seed(seed)
    half = batch // 2
    with torch.no_grad():
        null_text = teacher.null_condition(1)
    losses = []
    bar = tqdm(range(steps), desc="adapter (A)")
    for step in bar:
        first = FACEID_TRAIN_FIRST_ID + step * half
        images, _ = render(range(first, first + half), 2, seed=seed * 1_000_003 + step)
        x = to_input(images)
        with torch.no_grad():
            emb = encoder.encode_tensor(x).view(half, 2, -1).flip(1).reshape(batch, -1)  # sibling's embedding
            drop = torch.rand(batch, generator=gen) < 0.1
            cond = torch.where(drop[:, None, None], null_text.expand(batch, -1, -1), teacher.condition(emb))
            emb = torch.where(drop[:, None], torch.zeros_like(emb), emb)
            z0 = F.pixel_unshuffle(x, nets.UNSHUFFLE)
            noise = torch.randn(z0.shape, generator=gen)
            t = torch.randint(0, ddpm.config.num_train_timesteps, (batch,), generator=gen)
            zt = ddpm.add_noise(z0, noise, t)
            target = teacher.unet(zt, t, encoder_hidden_states=cond).sample
        pred = student.unet(zt, t, encoder_hidden_states=null_text.expand(batch, -1, -1),
                            added_cond_kwargs={"image_embeds": [emb[:, None]]}).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    for p in params:
        p.requires_grad_(False)
    return losses


def train_b(model, encoder, ddpm, *, steps: int, batch: int, lr: float, rank: int, seed: int) -> dict:
    """Fine-tune the testbed UNet (its Arc2Face conditioning) on the shifted domain with LoRA; returns the
    LoRA factors {module.lora_down / module.lora_up}."""
    loras = add_lora(model.unet, rank, seed)
    params = [p for m in loras.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    alphas = ddpm.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=10.0) / snr
    gen = torch.Generator().manual_seed(seed + 1)
    half = batch // 2
    null = model.null_condition(1).detach()
    bar = tqdm(range(steps), desc="generator B")
    for step in bar:
        first = B_TRAIN_FIRST_ID + step * half
        plain, _ = render(range(first, first + half), 2, seed=seed * 1_000_003 + 7 + step)
        with torch.no_grad():  # identity from a plain photo of the person; the image in B's domain
            emb = encoder.encode_tensor(to_input(plain)).view(half, 2, -1).flip(1).reshape(batch, -1)
            cond = model.condition(emb)
        drop = torch.rand(batch, generator=gen) < 0.1
        cond = torch.where(drop[:, None, None], null.expand(batch, -1, -1), cond)
        z0 = F.pixel_unshuffle(to_input(shift_domain(plain, seed=step)), nets.UNSHUFFLE)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (batch,), generator=gen)
        pred = model.unet(ddpm.add_noise(z0, noise, t), t, encoder_hidden_states=cond).sample
        loss = (weight[t] * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    state = {}
    for name, m in loras.items():
        state[f"{name}.lora_down"] = m.down.detach().to(torch.float16).contiguous()
        state[f"{name}.lora_up"] = m.up.detach().to(torch.float16).contiguous()
    remove_lora(model.unet)
    return state


@torch.no_grad()
def evaluate(model, encoder, n_ids: int = 50, per_identity: int = 2, seed: int = 0, steps: int = 25,
             guidance: float = 3.0) -> dict:
    """Held-out identities 0..n_ids-1 (train_generator.evaluate_generator's protocol) for any model with
    `generate_tensor(emb, seed=, steps=, guidance=)`; also the mean colour of the generations."""
    from fastforget.metrics import class_centroids, identity_scores

    ids = np.arange(n_ids)
    ref, ref_lab = render(ids, 8, seed=seed + 11)
    cents, cent_lab = class_centroids(encoder.encode(ref), torch.from_numpy(ref_lab))
    probe, _ = render(ids, 1, seed=seed + 12)
    emb = encoder.encode(probe).repeat_interleave(per_identity, 0)
    gen = model.generate_tensor(emb, seed=seed + 1000, steps=steps, guidance=guidance)
    q = identity_scores(encoder.encode_tensor(gen), torch.from_numpy(np.repeat(ids, per_identity)), cents, cent_lab)
    q.update(domain_statistics(gen))
    return q


def domain_statistics(images: torch.Tensor) -> dict:
    """What generator B's domain changes, on images (N, 3, H, W) in [-1, 1]: mean colour, vignette (centre minus
    border brightness) and side light (mean |left half - right half| brightness)."""
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    border = torch.cat([x[..., :h // 8, :].flatten(1), x[..., -(h // 8):, :].flatten(1)], 1).mean()
    centre = x[..., h // 4:-(h // 4), w // 4:-(w // 4)].mean()
    side = (x[..., :w // 2].mean(dim=(1, 2, 3)) - x[..., w // 2:].mean(dim=(1, 2, 3))).abs().mean()
    return {"mean_rgb": [round(v, 4) for v in x.mean(dim=(0, 2, 3)).tolist()],
            "vignette": round(float(centre - border), 4), "side_light": round(float(side), 4)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    ap.add_argument("--steps", type=int, default=400, help="adapter distillation steps")
    ap.add_argument("--b-steps", type=int, default=400, help="generator B fine-tune steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--b-lr", type=float, default=2e-3)
    ap.add_argument("--b-rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-ids", type=int, default=50)
    ap.add_argument("--evaluate-only", action="store_true", help="measure the weights in <out>/faceid*")
    ap.add_argument("--reuse-adapter", action="store_true", help="keep <out>/faceid; train generator B only")
    args = ap.parse_args(argv)

    from diffusers import DDPMScheduler

    from fastforget.identity.encoder import TestbedEncoder
    from fastforget.io import atomic_write_bytes
    from fastforget.models import load_arc2face
    from fastforget.models.ip_adapter import _adapter_bytes

    torch.manual_seed(args.seed)
    out = Path(args.out)
    encoder = TestbedEncoder.from_file(out / "encoder.safetensors")
    adapter_dir, b_dir = out / "faceid", out / "faceid_b"
    ckpt = adapter_dir / ADAPTER_FILE
    t0 = time.time()
    record = {}
    prev = json.loads((adapter_dir / "quality.json").read_text()) if (adapter_dir / "quality.json").is_file() else {}
    if not args.evaluate_only:
        teacher = load_arc2face(out / "generator")
        ddpm = DDPMScheduler(**nets.scheduler_config())
        if args.reuse_adapter:
            record = {k: prev[k] for k in ("adapter_steps", "adapter_seconds", "adapter_final_loss") if k in prev}
        else:
            init = adapter_dir / ".init-adapter.safetensors"
            adapter_dir.mkdir(parents=True, exist_ok=True)
            init.write_bytes(_adapter_bytes(initial_adapter(teacher.unet, args.seed), ".safetensors"))
            student = load_student(out, init)
            init.unlink()
            losses = train_adapter(teacher, student, encoder, ddpm, steps=args.steps, batch=args.batch, lr=args.lr,
                                   seed=args.seed)
            adapter_s = time.time() - t0
            student.save_ip_adapter(ckpt, overwrite=True, dtype=torch.float16)
            atomic_write_bytes(adapter_dir / "fastforget.json", json.dumps(adapter_manifest(), indent=2).encode(),
                               overwrite=True)
            print(f"adapter: {args.steps} steps in {adapter_s:.0f}s, last-50 loss {np.mean(losses[-50:]):.4f}; "
                  f"{ckpt} ({ckpt.stat().st_size / 2 ** 20:.2f} MiB)")
            record = {"adapter_steps": args.steps, "adapter_seconds": adapter_s,
                      "adapter_final_loss": float(np.mean(losses[-50:]))}
        t1 = time.time()
        lora = train_b(teacher, encoder, ddpm, steps=args.b_steps, batch=args.batch, lr=args.b_lr,
                       rank=args.b_rank, seed=args.seed)
        b_s = time.time() - t1
        from safetensors.torch import save

        b_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(b_dir / LORA_FILE, save(lora, metadata={"format": "pt"}), overwrite=True)
        atomic_write_bytes(b_dir / "fastforget.json", json.dumps(MANIFEST_B, indent=2).encode(), overwrite=True)
        print(f"generator B: {args.b_steps} steps in {b_s:.0f}s; {b_dir / LORA_FILE} "
              f"({(b_dir / LORA_FILE).stat().st_size / 2 ** 20:.2f} MiB)")
        record.update(b_steps=args.b_steps, b_seconds=b_s, b_rank=args.b_rank, b_lr=args.b_lr, batch=args.batch,
                      seed=args.seed)
    else:
        record = {k: v for k, v in prev.items() if k not in ("A", "B", "eval_seconds", "total_seconds", "met",
                                                             "targets")}
    t2 = time.time()
    result = {}
    for name, b in (("A", False), ("B", True)):
        q = evaluate(load_student(out, ckpt, b=b), encoder, n_ids=args.eval_ids)
        result[name] = q
        print(f"generator {name} + adapter (held-out {args.eval_ids} identities, 25 steps, guidance 3): "
              f"accuracy={q['accuracy']:.3f} ISM={q['ism']:.3f} stranger_ISM={q['stranger_ism']:.3f} "
              f"mean RGB={q['mean_rgb']} vignette={q['vignette']:.3f} side light={q['side_light']:.3f}")
    result["eval_seconds"] = time.time() - t2
    if not args.evaluate_only:
        result["total_seconds"] = time.time() - t0 + (record.get("adapter_seconds", 0) if args.reuse_adapter else 0)
    plain, _ = render(np.arange(args.eval_ids), 2, seed=12)
    result["renders"] = {"plain": domain_statistics(to_input(plain)),
                         "shifted (B's training domain)": domain_statistics(to_input(shift_domain(plain, 0)))}
    record.update(result, targets={"A_accuracy": 0.70, "B_accuracy": 0.60},
                  met={"A": result["A"]["accuracy"] >= 0.70, "B": result["B"]["accuracy"] >= 0.60})
    atomic_write_bytes(adapter_dir / "quality.json", json.dumps(record, indent=2).encode(), overwrite=True)
    print(f"quality: {adapter_dir / 'quality.json'} (met: A {record['met']['A']}, B {record['met']['B']})")
    return record


if __name__ == "__main__":
    main()
