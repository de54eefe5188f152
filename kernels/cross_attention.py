"""Masked cross-attention for diffusion UNets: many queries, few keys (Lk <= 128), head dims 40..160.

In order: the Triton kernels, their host launchers, the autograd.Function, the torch backend,
the float64 reference, and the public `masked_cross_attention`.

All keys fit one tile, so each program holds K and V for its (batch, head) and the softmax is
exact in one pass (no online rescaling). Head dims are padded to a power of two with masked
loads (SD-1.5 uses 40/80/160). A batch element whose key_mask hides every key yields zeros
and zero gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import ANY_DEVICE, HAS_TRITON, register, requires_triton, select, triton_interpreted

MAX_KEYS = 128  # K and V for one head live in one tile
MAX_HEAD_DIM = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, acc, FP32_DOT: tl.constexpr):
        if FP32_DOT:
            # fp32 inputs must not drop to tf32; bf16 goes here only on the interpreter, which cannot
            # multiply bf16 (bf16 products are exact in fp32, so the result is that of a bf16 dot)
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _load_keys(K, V, KeyMask, b, h, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, Lk, D,
                   HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        in_k = (offs_n[:, None] < Lk) & (offs_d[None, :] < D)
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=in_k, other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=in_k, other=0.0)
        key_ok = offs_n < Lk
        if HAS_MASK:
            key_ok = key_ok & (tl.load(KeyMask + b * stride_mb + offs_n, mask=offs_n < Lk, other=0) != 0)
        return k, v, key_ok

    @triton.jit
    def _cross_attn_fwd_kernel(
        Q, K, V, KeyMask, O, LSE,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_mb, H, Lq, Lk, D, scale,
        HAS_MASK: tl.constexpr, FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        in_q = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
        k, v, key_ok = _load_keys(K, V, KeyMask, b, h, stride_kb, stride_kh, stride_kn, stride_kd,
                                  stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, Lk, D,
                                  HAS_MASK, BLOCK_N, BLOCK_D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=in_q, other=0.0)

        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), FP32_DOT) * scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)  # no key to attend: keep exp() finite, p becomes 0
        p = tl.exp(s - m[:, None])
        l = tl.sum(p, 1)
        l = tl.where(l > 0.0, l, 1.0)  # fully masked row: output 0 / 1 = 0, never NaN
        o = _dot(p.to(v.dtype), v, tl.zeros((BLOCK_M, BLOCK_D), tl.float32), FP32_DOT) / l[:, None]

        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                 o.to(O.dtype.element_ty), mask=in_q)
        tl.store(LSE + bh * Lq + offs_m, m + tl.log(l), mask=offs_m < Lq)

    @triton.jit
    def _cross_attn_bwd_kernel(
        Q, K, V, KeyMask, O, DO, LSE, DQ, DKV,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        stride_mb, H, BH, Lq, Lk, D, scale, n_split,
        HAS_MASK: tl.constexpr, FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # program (split, bh) walks query blocks split, split + n_split, ... and keeps dK, dV for its
        # (batch, head) in registers; the host sums the n_split partials (deterministic, no atomics)
        split = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k, v, key_ok = _load_keys(K, V, KeyMask, b, h, stride_kb, stride_kh, stride_kn, stride_kd,
                                  stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, Lk, D,
                                  HAS_MASK, BLOCK_N, BLOCK_D)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for mb in range(split, tl.cdiv(Lq, BLOCK_M), n_split):
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < Lq
            in_q = row_ok[:, None] & (offs_d[None, :] < D)
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=in_q, other=0.0)
            o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                        mask=in_q, other=0.0)
            do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                         + offs_d[None, :] * stride_dod, mask=in_q, other=0.0)
            lse = tl.load(LSE + bh * Lq + offs_m, mask=row_ok, other=0.0)

            s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), FP32_DOT) * scale
            p = tl.where(row_ok[:, None] & key_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            dv = _dot(tl.trans(p.to(do.dtype)), do, dv, FP32_DOT)
            dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), FP32_DOT)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # rowsum(dO * O) = sum_j P dP
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(k.dtype), k, tl.zeros((BLOCK_M, BLOCK_D), tl.float32), FP32_DOT) * scale
            tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm
                     + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=in_q)
            dk = _dot(tl.trans(ds.to(q.dtype)), q, dk, FP32_DOT)

        in_k = (offs_n[:, None] < Lk) & (offs_d[None, :] < D)
        part = DKV + (split * BH + bh) * Lk * D + offs_n[:, None] * D + offs_d[None, :]
        tl.store(part, dk * scale, mask=in_k)
        tl.store(part + n_split * BH * Lk * D, dv, mask=in_k)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _config(Lk: int, D: int, backward: bool) -> dict:
    block_d = max(16, _next_pow2(D))  # tl.dot needs every dim >= 16
    # smaller query tiles for wide heads keep K, V (and dK, dV in backward) within registers
    block_m = (32 if block_d <= 64 else 16) if backward else (64 if block_d <= 64 else 32)
    return dict(BLOCK_M=block_m, BLOCK_N=max(16, _next_pow2(Lk)), BLOCK_D=block_d)


def _mask_arg(key_mask, q):
    if key_mask is None:
        return q, 0  # never read: HAS_MASK is False
    m = key_mask.contiguous().view(torch.uint8)
    return m, m.stride(0)


def _fp32_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpreted())


def cross_attention_fwd_triton(q, k, v, key_mask, scale, empty=torch.empty):
    """Forward launcher: (out (B,H,Lq,D) in q.dtype, lse (B*H, Lq) float32). `empty` allocates outputs."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = empty((B * H, Lq), dtype=torch.float32, device=q.device)
    cfg = _config(Lk, D, backward=False)
    mask, stride_mb = _mask_arg(key_mask, q)
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
    _cross_attn_fwd_kernel[grid](
        q, k, v, mask, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        stride_mb, H, Lq, Lk, D, scale,
        HAS_MASK=key_mask is not None, FP32_DOT=_fp32_dot(q.dtype), num_warps=4, **cfg,
    )
    return o, lse


def _default_splits(q: torch.Tensor, n_blocks: int, bh: int) -> int:
    # enough (split, bh) programs to fill the GPU twice over; each split costs one partial dK/dV
    programs = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 2
    return max(1, min(n_blocks, triton.cdiv(programs, bh)))


def cross_attention_bwd_triton(do, q, k, v, key_mask, o, lse, scale, n_split=None, empty=torch.empty):
    """Backward launcher: (dq, dk, dv) in the input dtypes. `empty` allocates every buffer the kernel writes."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    cfg = _config(Lk, D, backward=True)
    if n_split is None:
        n_split = _default_splits(q, triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
    dq = empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dkv = empty((2, n_split, B * H, Lk, D), dtype=torch.float32, device=q.device)
    mask, stride_mb = _mask_arg(key_mask, q)
    _cross_attn_bwd_kernel[(n_split, B * H)](
        q, k, v, mask, o, do, lse, dq, dkv,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        stride_mb, H, B * H, Lq, Lk, D, scale, n_split,
        HAS_MASK=key_mask is not None, FP32_DOT=_fp32_dot(q.dtype), num_warps=4, **cfg,
    )
    dk, dv = dkv.sum(1).view(2, B, H, Lk, D).to(k.dtype).unbind(0)
    return dq, dk, dv


class MaskedCrossAttentionFunction(torch.autograd.Function):
    """Triton forward and backward tied together for autograd."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, scale):
        o, lse = cross_attention_fwd_triton(q, k, v, key_mask, scale)
        ctx.save_for_backward(q, k, v, key_mask, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, key_mask, o, lse = ctx.saved_tensors
        dq, dk, dv = cross_attention_bwd_triton(do, q, k, v, key_mask, o, lse, ctx.scale)
        return dq, dk, dv, None, None


def _fits(lk: int, d: int) -> str | None:
    if lk > MAX_KEYS:
        return f"key length {lk} > {MAX_KEYS} (all keys must fit one tile)"
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM}"
    return None


@register("masked_cross_attention", "triton", devices=("cuda",), dtypes=DTYPES, fits=_fits,
          requires=requires_triton, interpretable=True)
def _cross_attention_triton(q, k, v, key_mask, scale):
    return MaskedCrossAttentionFunction.apply(q, k, v, key_mask, scale)


@register("masked_cross_attention", "torch", devices=ANY_DEVICE, dtypes=DTYPES)
def cross_attention_torch(q, k, v, key_mask, scale):
    """torch backend: SDPA, with fully masked batch elements set to zero instead of NaN."""
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    has_key = key_mask.any(-1)
    # SDPA gives NaN for a row with no key: let that row attend everywhere, then zero it
    attend = key_mask | ~has_key[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :], scale=scale)
    return torch.where(has_key[:, None, None, None], out, out.new_zeros(()))


def cross_attention_reference(q, k, v, key_mask=None, scale=None):
    """Float64 reference with plain torch ops (autograd-able), same contract as the kernels."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if key_mask is None:
        return torch.softmax(s, -1) @ v
    has_key = key_mask.any(-1)
    s = s.masked_fill(~(key_mask | ~has_key[:, None])[:, None, None, :], float("-inf"))
    p = torch.where(has_key[:, None, None, None], torch.softmax(s, -1), 0.0)
    return p @ v


def _check_inputs(q, k, v, key_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, L, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k must have shape (B={B}, H={H}, Lk, D={D}), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[2] == 0:
        raise ValueError("k must have at least one key (Lk >= 1)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_mask is not None:
        if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"key_mask must be a bool tensor of shape (B={B}, Lk={k.shape[2]}), "
                             f"got {key_mask.dtype} {tuple(key_mask.shape)}")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask is on {key_mask.device}, q on {q.device}")


def masked_cross_attention(q, k, v, key_mask=None, scale=None, *, backend=None):
    """softmax(q k^T * scale, keys where key_mask) v for q (B,H,Lq,D), k/v (B,H,Lk,D), key_mask (B,Lk) bool.

    True in key_mask means attend. A batch element with no key to attend gets zeros (and zero
    gradients). `scale` defaults to D**-0.5. `backend` ("auto", "triton", "torch") overrides the
    dispatch choice for this call.
    """
    _check_inputs(q, k, v, key_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    impl = select("masked_cross_attention", q.device, q.dtype, backend, lk=k.shape[2], d=q.shape[3])
    return impl.fn(q, k, v, key_mask, scale)
