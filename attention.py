"""
attention.py -- what every attention in this repository shares: RoPE and the causal attention call.

train.py's CausalSelfAttention and tpa.py's TPAttention both rotate queries and keys with Rotary and
attend with causal_attention (training, prompts) and cached_attention (one generated token). They
live here, in a file that imports only torch, so that tpa.py never needs train.py (train.py imports
the technique files, never the other way round).

Notation (shape comments): B batch, T time, H heads, D head width, L cache length.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Rotary(nn.Module):
    """RoPE (Su et al. 2021): rotate each pair (x_i, x_{i+D/2}) of a head by angle t * base^(-2i/D).

    The dot product of two rotated vectors depends only on their distance, so attention sees relative
    positions. We use the half-split pairing (GPT-NeoX / Llama style), a convention choice.
    """

    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, D/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x, start_pos: int | torch.Tensor = 0):
        # x: (B, T, H, D), positions start_pos .. start_pos+T-1. Rotating in this layout (before the
        # heads are transposed) keeps reads and writes contiguous, which makes the backward several
        # times faster than rotating (B, H, T, D) views.
        T = x.size(1)
        if isinstance(start_pos, torch.Tensor):  # a decode step's position, kept on the device (CUDA graphs)
            positions = start_pos + torch.arange(T, device=x.device)  # (T,)
            cos, sin = self.cos[positions, None, :].to(x.dtype), self.sin[positions, None, :].to(x.dtype)
        else:
            cos = self.cos[start_pos:start_pos + T, None, :].to(x.dtype)  # (T, 1, D/2)
            sin = self.sin[start_pos:start_pos + T, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)  # (B, T, H, D/2) each
        # [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def causal_attention(q, k, v, start_pos: int = 0):
    """softmax(q k^T / sqrt(D)) v through SDPA, for queries at positions start_pos .. start_pos+T_q-1
    over keys at 0 .. start_pos+T_q-1. q (B, H, T_q, D), k and v (B, H, T_k, D)."""
    T_q, T_k = q.size(-2), k.size(-2)
    if T_q == T_k:  # training, or a prefill from position 0
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if T_q == 1:  # one new token sees every cached one
        return F.scaled_dot_product_attention(q, k, v)
    # query i sits at position start_pos + i and sees keys 0 .. start_pos + i
    mask = torch.ones(T_q, T_k, dtype=torch.bool, device=q.device).tril(diagonal=start_pos)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def cached_attention(q, k_cache, v_cache, pos: torch.Tensor):
    """One decode step: the query of the token at position pos (a (1,) tensor) over a cache allocated at its
    full length L, q (B, H, 1, D), k_cache and v_cache (B, H, L, D), entries after pos masked out.
    Every step has the same shapes whatever pos is, so one captured CUDA graph serves them all (and SDPA
    builds no new plan per cache length); the price is reading the whole cache, filled or not."""
    visible = (torch.arange(k_cache.size(-2), device=q.device) <= pos)[None, :]  # (1, L): keys 0 .. pos
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible)
