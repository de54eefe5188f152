"""Shared diffusion pieces for every diffusion family: the unconditional branch of a UNet, DDIM (η = 0)
inversion and decoding, Asyrp's asymmetric step, and h-space (the `mid_block` output) hooks.

BIA reads and shifts h-space here; attacks and benchmarks use the same inversion and decoding. Works for an
Arc2Face-family adapter (UNet2DConditionModel fed its null condition) and for an unconditional
`UNet2DModel` (bare, in an `UnconditionalDiffusion`, or any object with `.unet` and `.scheduler`)."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from fastforget.errors import InputError
from fastforget.models.common import UNetPlacement


class MidBlockHook:
    """Forward hook on `mid_block`: records its output (h) and/or adds a per-sample shift to it."""

    def __init__(self):
        self.delta: torch.Tensor | None = None
        self.capture = False
        self.h: torch.Tensor | None = None

    def __call__(self, module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        if self.capture:
            self.h = out.detach()
        if self.delta is not None:
            out = out + self.delta.to(out.dtype)
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
        return output


@contextmanager
def mid_block_hook(unet):
    """A `MidBlockHook` on `unet.mid_block` for the duration of the block (always removed)."""
    if getattr(unet, "mid_block", None) is None:
        raise InputError(f"h-space: {type(unet).__name__} has no mid_block: h-space needs a UNet with a middle block")
    hook = MidBlockHook()
    handle = unet.mid_block.register_forward_hook(hook)
    try:
        yield hook
    finally:
        handle.remove()


def ddim_step(x: torch.Tensor, eps_x0: torch.Tensor, eps_dir: torch.Tensor, a: torch.Tensor,
              a_next: torch.Tensor) -> torch.Tensor:
    """One DDIM (η = 0) step from ᾱ = a to ᾱ = a_next: x0 from `eps_x0`, the direction term from `eps_dir`
    (the same tensor for plain DDIM; Asyrp's asymmetric step uses the edited ε for x0 only)."""
    x0 = (x - (1 - a).sqrt() * eps_x0) / a.sqrt()
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps_dir


class HSpace(UNetPlacement):
    """A UNet called through its unconditional branch, with DDIM (η = 0) inversion and Asyrp decoding.

    `null_states` is the null condition (1, L, D) of an ID-conditioned model, or None."""

    def __init__(self, model):
        from diffusers import DDPMScheduler

        if hasattr(model, "null_condition") and hasattr(model, "unet"):
            self.unet = model.unet
            with torch.no_grad():
                self.null_states = model.null_condition(1).detach()
            self.codec = model.codec
            self.scheduler_config = model.scheduler.config
            self.resolution = int(model.resolution)
        else:
            unet, sched = (model.unet, getattr(model, "scheduler", None)) if hasattr(model, "unet") else (model, None)
            if not hasattr(unet, "mid_block") or not hasattr(unet, "config"):
                raise InputError(f"h-space: cannot use a {type(model).__name__}: expected an Arc2Face-family model, "
                                 "a diffusers UNet2DModel, or an object with .unet (and .scheduler)")
            self.unet = unet
            self.null_states = None
            self.codec = getattr(model, "codec", None)
            self.scheduler_config = (sched if sched is not None else DDPMScheduler(num_train_timesteps=1000)).config
            ss = unet.config.sample_size
            self.resolution = int(ss if isinstance(ss, int) else ss[0])
        self.model = model
        sched = DDPMScheduler.from_config(self.scheduler_config)
        self.alphas_cumprod = sched.alphas_cumprod.double()
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        self.prediction_type = sched.config.prediction_type

    # -------------------------------------------------------- basics
    @property
    def conditional(self) -> bool:
        return self.null_states is not None

    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Images in [-1, 1] -> sample space."""
        x = x.to(self.device, self.dtype)
        if self.codec is None:
            return x
        return self.codec.encode(x, generator=torch.Generator(self.device).manual_seed(seed))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = z if self.codec is None else self.codec.decode(z)
        return out.float().clamp(-1, 1)

    def abar(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        return self.alphas_cumprod[t.long().cpu()].to(self.device, torch.float32)

    def call(self, unet, x, t, states=None, hook: MidBlockHook | None = None, delta=None) -> torch.Tensor:
        """ε prediction of `unet` (this model's UNet or a copy of it) at (x, t), the mid-block output
        shifted by `delta` (per sample, or None). `states` None means the unconditional branch."""
        n = x.shape[0]
        dtype = next(unet.parameters()).dtype
        tt = torch.as_tensor(t, device=x.device)
        tt = (tt.expand(n) if tt.ndim == 0 else tt).long()
        if hook is not None:
            hook.delta = delta
        try:
            if self.null_states is not None:
                s = self.null_states.expand(n, -1, -1) if states is None else states
                out = unet(x.to(dtype), tt, encoder_hidden_states=s.to(x.device, dtype)).sample
            else:
                out = unet(x.to(dtype), tt).sample
        finally:
            if hook is not None:
                hook.delta = None
        out = out.float()
        if self.prediction_type == "epsilon":
            return out
        ab = self.abar(tt).view(-1, *([1] * (x.ndim - 1)))
        a, s_ = ab.sqrt(), (1 - ab).sqrt()
        if self.prediction_type == "v_prediction":
            return a * out + s_ * x.float()
        if self.prediction_type == "sample":
            return (x.float() - a * out) / s_
        raise InputError(f"h-space: unsupported prediction_type {self.prediction_type!r}")

    def timesteps(self, t0: int, steps: int) -> list[int]:
        """The DDIM grid 0 = t_0 < ... < t0 (ascending; at most steps + 1 points)."""
        if not 0 < t0 < self.num_train_timesteps:
            raise InputError(f"h-space: t0 must lie in (0, {self.num_train_timesteps}), got {t0}")
        seq = np.round(np.linspace(0, t0, steps + 1)).astype(int)
        return sorted(set(seq.tolist()))

    # -------------------------------------------------------- DDIM η = 0
    @torch.no_grad()
    def invert(self, z0: torch.Tensor, t0: int, steps: int, unet=None) -> torch.Tensor:
        """DDIM inversion (η = 0, unconditional branch) from t = 0 to t0; returns x_t0."""
        unet = self.unet if unet is None else unet
        seq = self.timesteps(t0, steps)
        x = z0.float()
        for t, t_next in zip(seq[:-1], seq[1:]):
            eps = self.call(unet, x, t)
            x = ddim_step(x, eps, eps, self.abar(t), self.abar(t_next))
        return x

    @torch.no_grad()
    def code(self, x_t: torch.Tensor, t0: int) -> torch.Tensor:
        """h = mid-block output of the unconditional UNet at (x_t0, t0)."""
        with mid_block_hook(self.unet) as hook:
            hook.capture = True
            self.call(self.unet, x_t, t0, hook=hook)
            return hook.h.float().clone()

    @torch.no_grad()
    def generate_from(self, x_t: torch.Tensor, t0: int, steps: int, delta: torch.Tensor | None = None,
                      asymmetric: bool = True, chunk: int = 64, progress: bool = False,
                      desc: str = "decode", decode: bool = True, unet=None,
                      trajectory: list | None = None) -> torch.Tensor:
        """Asyrp's generative process from x_t0 to 0 with the mid-block output shifted by `delta` (one row
        per output, or None) at every step. Asymmetric: x0 from the edited ε, the direction term from the
        original ε (one batched call for both). `unet`: another copy of the UNet (e.g. an erased one).
        `trajectory`: a list that receives (x_t, t, ε̂) per step, ε̂ being the single ε that a plain DDIM
        step would need to take the same step (what a student must predict to follow this path).
        Returns images in [-1, 1] (the UNet's samples when decode=False)."""
        from tqdm import tqdm

        unet = self.unet if unet is None else unet
        seq = self.timesteps(t0, steps)[::-1]
        n = x_t.shape[0] if delta is None else delta.shape[0]
        if x_t.shape[0] == 1 and n > 1:
            x_t = x_t.expand(n, *x_t.shape[1:])
        outs = []
        with mid_block_hook(unet) as hook:
            for i in tqdm(range(0, n, chunk), desc=desc, disable=not progress, leave=False):
                x = x_t[i:i + chunk].float().clone()
                d = None if delta is None else delta[i:i + chunk].to(self.device)
                b = x.shape[0]
                for t, t_prev in zip(seq[:-1], seq[1:]):
                    if d is None:
                        eps_e = eps_o = self.call(unet, x, t)
                    elif asymmetric:
                        eps = self.call(unet, torch.cat([x, x]), t, hook=hook, delta=torch.cat([d, torch.zeros_like(d)]))
                        eps_e, eps_o = eps[:b], eps[b:]
                    else:
                        eps_e = eps_o = self.call(unet, x, t, hook=hook, delta=d)
                    a, a_p = self.abar(t), self.abar(t_prev)
                    x_next = ddim_step(x, eps_e, eps_o, a, a_p)
                    if trajectory is not None:
                        trajectory.append((x.cpu(), int(t), self.equivalent_eps(x, x_next, a, a_p).cpu(), i))
                    x = x_next
                outs.append(self.decode(x) if decode else x)
        return torch.cat(outs)

    @staticmethod
    def equivalent_eps(x: torch.Tensor, x_next: torch.Tensor, a: torch.Tensor, a_next: torch.Tensor) -> torch.Tensor:
        """The ε with which one plain DDIM step from x (ᾱ = a) lands on x_next (ᾱ = a_next)."""
        r = (a_next / a).sqrt()
        return (x_next - r * x) / ((1 - a_next).sqrt() - r * (1 - a).sqrt())

    def bridge(self, x_t0: torch.Tensor, z_target: torch.Tensor, t0: int, steps: int) -> list:
        """The DDIM path from x_t0 that ends exactly at `z_target` (sample space): with the constant
        ε = (x_t0 − √ᾱ₀·z)/√(1 − ᾱ₀), every plain DDIM step predicts x0 = z, so a UNet that predicts this ε at
        the path's points decodes x_t0 to z. Returns [(x_t, t, ε)] per step, t descending."""
        seq = self.timesteps(t0, steps)[::-1]
        a0 = self.abar(seq[0])
        eps = (x_t0.float() - a0.sqrt() * z_target.float()) / (1 - a0).sqrt()
        out = []
        for t in seq[:-1]:
            a = self.abar(t)
            out.append((a.sqrt() * z_target.float() + (1 - a).sqrt() * eps, int(t), eps))
        return out
