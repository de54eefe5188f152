"""diffusers attention processor that routes cross-attention (attn2) through masked_cross_attention.

It follows diffusers' AttnProcessor2_0 step by step (spatial/group norm, norm_cross, 4-D hidden
states, residual connection, rescale_output_factor); only the attention product differs. It
duck-types diffusers' `Attention` module, so kernels/ does not import diffusers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cross_attention import masked_cross_attention

# diffusers marks hidden keys with a bias of -10000: exp() of such a score is exactly 0 next to a
# visible key unless the scores themselves span more than ~9,900
_HIDDEN_BIAS = -1e4


def key_mask_from_attention_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """A prepared diffusers mask (B, heads, 1 or Lq, Lk) as a (B, Lk) bool key mask, or None if it is not one.

    A bool mask qualifies when it is the same for every head and query; a float bias when, in
    addition, each row holds only its maximum and values at least 1e4 below it.
    """
    if not (mask == mask[:, :1, :1]).all():
        return None  # differs across heads or query positions
    row = mask[:, 0, 0]
    if row.dtype == torch.bool:
        return row
    top = row.amax(-1, keepdim=True)
    visible = row == top  # a constant shift of all scores does not change softmax
    if not (visible | (row <= top + _HIDDEN_BIAS)).all():
        return None  # a soft bias: only SDPA can apply it
    return visible


class FusedCrossAttnProcessor:
    """Like diffusers' AttnProcessor2_0, with attention computed by `masked_cross_attention`.

    The dispatch picks the backend (Triton on CUDA, torch SDPA elsewhere). Masks that are not a
    per-key mask (soft biases, per-query or per-head masks) go to SDPA exactly as in
    AttnProcessor2_0. `attn.scale` is honoured (AttnProcessor2_0 always uses head_dim**-0.5; the
    two agree for every model that keeps the default scale). A batch element whose mask hides
    every key gets zeros, where SDPA would give NaN.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        key_mask = None if attention_mask is None else key_mask_from_attention_mask(attention_mask)
        if attention_mask is not None and key_mask is None:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale
            )
        else:
            hidden_states = masked_cross_attention(query, key, value, key_mask, scale=attn.scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_fused_cross_attention(unet: torch.nn.Module) -> int:
    """Install FusedCrossAttnProcessor on every cross-attention module ("...attn2") of a UNet; returns how many."""
    processor = FusedCrossAttnProcessor()
    replaced = 0
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "set_processor"):
            module.set_processor(processor)
            replaced += 1
    return replaced
