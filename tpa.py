"""
tpa.py -- Tensor Product Attention (TPA), the attention of the T6 model.

    python tpa.py                       # CPU self-demo: RoPE commutes, cache sizes, decode == forward
    python train.py --arch tpa          # TPA, ranks (R_Q, R_K, R_V) = (6, 2, 2), heads matched to MHA
    python train.py --arch tpa-kvonly   # TPA for keys and values only, standard queries

Paper: Zhang, Liu, Yuan et al., "Tensor Product Attention Is All You Need", arXiv 2501.06425
(factorisation: Sec. 3.1; RoPE: Theorem 3.1; KV cache: Sec. 3.3; MHA/MQA/GQA as special cases: Sec. 3.4).

The idea. Multi-head attention projects every token to h query heads of width d_h (likewise keys and
values) and caches all of K and V: 2 h d_h numbers per token per layer. TPA builds each token's
(h x d_h) query, key and value as a sum of a few rank-one outer products of a head factor a (h,) and a
feature factor b (d_h,), both computed from the token:

    Q_t = (1 / R_Q) sum_{r=1..R_Q} a^Q_r(x_t) (outer) b^Q_r(x_t)          (same for K with R_K, V with R_V)
    a^Q(x_t) = W_aQ x_t reshaped to (R_Q, h),   b^Q(x_t) = W_bQ x_t reshaped to (R_Q, d_h)

Attention itself is unchanged (softmax(Q K^T / sqrt(d_h)) V per head). A cache only needs the factors:
(R_K + R_V)(h + d_h) numbers per token, e.g. 4 x 76 = 304 instead of 1536 at h = 12, d_h = 64.

RoPE rotates the feature axis of each head by a position-dependent matrix T_t (d_h x d_h), so
RoPE(Q_t) = Q_t T_t = (1 / R_Q) sum_r a_r (outer) (b_r T_t): rotating the B factors rotates Q and K
(Theorem 3.1). The cache therefore keeps B_K already rotated.

Notation (shape comments): B batch, T time, C model width, h heads, d = d_h head width, R rank.
"""
import torch
import torch.nn as nn

import kernels
from attention import Rotary, cached_attention, causal_attention


def matched_heads(n_embd: int, head_dim: int, ranks: tuple[int, int, int], kv_only: bool) -> int:
    """Heads that give TPA the 4 C^2 attention parameters of MHA (the paper raises h this way).

    TPA:      C (R h + R d) + h d C = 4 C^2,  R = R_Q + R_K + R_V   ->  h = (4C - R d) / (R + d)
    KV-only:  C (h d + R (h + d)) + h d C,    R = R_K + R_V         ->  h = (4C - R d) / (2d + R)
    (At the paper's small size, C = 768, this gives 33 and 21 heads; the paper used 34 and 22.)"""
    rq, rk, rv = ranks
    if kv_only:
        r = rk + rv
        h = (4 * n_embd - r * head_dim) / (2 * head_dim + r)
    else:
        r = rq + rk + rv
        h = (4 * n_embd - r * head_dim) / (r + head_dim)
    return max(1, round(h))


def kv_cache_values_per_token(kind: str, heads: int, head_dim: int, ranks=(6, 2, 2), groups: int = 1) -> int:
    """Numbers cached per token per layer: MHA 2 h d, MQA 2 d, GQA 2 G d, TPA (R_K + R_V)(h + d)."""
    if kind == "mha":
        return 2 * heads * head_dim
    if kind == "mqa":
        return 2 * head_dim
    if kind == "gqa":
        return 2 * groups * head_dim
    if kind in ("tpa", "tpa-kvonly"):
        return (ranks[1] + ranks[2]) * (heads + head_dim)
    raise ValueError(f"unknown attention kind {kind!r}")


def tpa_heads(cfg) -> int:
    kv_only = cfg.arch.endswith("kvonly")
    ranks = (cfg.tpa_rank_q, cfg.tpa_rank_k, cfg.tpa_rank_v)
    return cfg.tpa_heads or matched_heads(cfg.n_embd, cfg.tpa_head_dim, ranks, kv_only)


def cache_table(cfg) -> list[tuple[str, int]]:
    """(mechanism, values cached per token per layer) for MHA / MQA / GQA at the GPT's own heads and
    for TPA at this config's (matched) heads."""
    h, d = cfg.n_head, cfg.n_embd // cfg.n_head
    ranks = (cfg.tpa_rank_q, cfg.tpa_rank_k, cfg.tpa_rank_v)
    g = 2 if h % 2 == 0 else 1  # GQA with 2 key/value groups
    return [(f"MHA (h={h}, d={d})", kv_cache_values_per_token("mha", h, d)),
            (f"GQA (h={h}, G={g})", kv_cache_values_per_token("gqa", h, d, groups=g)),
            (f"MQA (h={h})", kv_cache_values_per_token("mqa", h, d)),
            (f"TPA (h={tpa_heads(cfg)}, d={cfg.tpa_head_dim}, ranks {ranks})",
             kv_cache_values_per_token("tpa", tpa_heads(cfg), cfg.tpa_head_dim, ranks))]


def factor_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(1 / R) sum_r a_r (outer) b_r per token: a (B, T, R, h), b (B, T, R, d) -> (B, T, h, d)."""
    return torch.einsum("btrh,btrd->bthd", a, b) / a.size(2)


class TPAttention(nn.Module):
    """Token mixer 'tpa' (and 'tpa-kvonly'): causal attention with factorised Q, K, V.

    Factor projections: W_A: C -> (R_Q + R_K + R_V) h (R_K + R_V for KV-only), W_B: C -> (R_Q + R_K + R_V) d.
    fixed_a (optional): constant head factors {"q": (R_Q, h), "k": (R_K, h), "v": (R_V, h)} instead of
    W_A x; with them MHA, MQA and GQA are exact special cases (test_all.py shows each one).
    """

    def __init__(self, cfg, layer: int, kv_only: bool = False, fixed_a: dict | None = None):
        super().__init__()
        self.kv_only = kv_only
        self.h, self.d = tpa_heads(cfg), cfg.tpa_head_dim
        self.rq, self.rk, self.rv = cfg.tpa_rank_q, cfg.tpa_rank_k, cfg.tpa_rank_v
        C = cfg.n_embd
        a_ranks = (0 if kv_only else self.rq) + self.rk + self.rv
        self.fixed_a = fixed_a
        if fixed_a is None:
            self.w_a = nn.Linear(C, a_ranks * self.h, bias=False)
        self.w_b = nn.Linear(C, ((0 if kv_only else self.rq) + self.rk + self.rv) * self.d, bias=False)
        if kv_only:
            self.w_q = nn.Linear(C, self.h * self.d, bias=False)
        self.proj = nn.Linear(self.h * self.d, C, bias=False)
        self.rotary = Rotary(self.d, cfg.block_size, cfg.rope_base)
        # kernels.py path (train.set_kernels switches it): Q/K/V built from the factors by one kernel each
        # (training), and decoding over the factor cache; not for the fixed-head-factor special cases
        self.use_kernels = False
        self.kernel_replaces = ("tpa.factor_product", "attention.Rotary on TPA's factors",
                                "tpa.TPAttention.forward's decode step")
        self.kernel_supported = fixed_a is None and kernels.tpa_supports(self.h, self.d)

    @torch.no_grad()
    def init_weights(self):
        # As the official code (tensorgi/TPA): xavier_uniform_ on each projection's own 3-D view, (C, h, R)
        # of its A rows and (C, R, d) of its B rows with that projection's rank, so torch's fans give std
        # sqrt(2 / (R (h + C))) for A and sqrt(2 / (d (R + C))) for B; KV-only W_q 2-D Xavier; output zero.
        C, h, d = self.proj.out_features, self.h, self.d
        start = 0
        for r in ([] if self.kv_only else [self.rq]) + [self.rk, self.rv]:
            if self.fixed_a is None:
                nn.init.xavier_uniform_(self.w_a.weight[start * h:(start + r) * h].view(C, h, r))
            nn.init.xavier_uniform_(self.w_b.weight[start * d:(start + r) * d].view(C, r, d))
            start += r
        if self.kv_only:
            nn.init.xavier_uniform_(self.w_q.weight)
        nn.init.zeros_(self.proj.weight)

    def init_cache(self, batch_size: int, max_len: int, device, dtype):
        """The factorised cache: A_K, pre-rotated B_K, A_V, B_V."""
        z = dict(device=device, dtype=dtype)
        return {"a_k": torch.zeros(batch_size, max_len, self.rk, self.h, **z),
                "b_k": torch.zeros(batch_size, max_len, self.rk, self.d, **z),
                "a_v": torch.zeros(batch_size, max_len, self.rv, self.h, **z),
                "b_v": torch.zeros(batch_size, max_len, self.rv, self.d, **z)}

    def flops_per_token(self, seq_len: int) -> int:
        # the attention itself at h heads of width d (the factor products are small next to it)
        return 12 * self.h * self.d * seq_len

    def factors(self, x):
        """Head factors a (B, T, R, h) and feature factors b (B, T, R, d) for q (None if KV-only), k, v."""
        B, T, _ = x.shape
        ranks = ([] if self.kv_only else [self.rq]) + [self.rk, self.rv]
        if self.fixed_a is None:
            a = self.w_a(x).view(B, T, sum(ranks), self.h).split(ranks, dim=2)
        else:
            names = ([] if self.kv_only else ["q"]) + ["k", "v"]
            a = [self.fixed_a[n].to(x.dtype).expand(B, T, -1, -1) for n in names]
        b = self.w_b(x).view(B, T, sum(ranks), self.d).split(ranks, dim=2)
        if self.kv_only:
            return (None, a[0], a[1]), (None, b[0], b[1])
        return tuple(a), tuple(b)

    def forward(self, x, start_pos: int | torch.Tensor = 0, cache=None):
        """Training (no cache), a prompt chunk at start_pos (cache), or one decode step (cache, T = 1;
        start_pos may be a tensor, and then every shape is fixed, as CUDA graphs need)."""
        B, T, _ = x.shape
        if cache is not None and isinstance(start_pos, int) and start_pos + T > cache["a_k"].size(1):
            raise ValueError(f"TPA cache overflow: positions up to {start_pos + T} for a cache of "
                             f"{cache['a_k'].size(1)} (the configured maximum length)")
        kernel = self.use_kernels  # kernels.py in place of the factor products and the decoding attention
        (a_q, a_k, a_v), (b_q, b_k, b_v) = self.factors(x)
        if self.kv_only:
            q = self.rotary(self.w_q(x).view(B, T, self.h, self.d), start_pos).transpose(1, 2)  # (B, h, T, d)
        elif kernel and cache is None:
            q = kernels.tpa_factor_product(a_q, b_q, self.rotary.cos, self.rotary.sin, start_pos)  # (B, h, T, d)
        else:  # (1/R_Q) sum_r a_r (outer) RoPE(b_r): RoPE on the feature factors (Theorem 3.1)
            q = factor_product(a_q, self.rotary(b_q, start_pos)).transpose(1, 2)  # (B, h, T, d)
        if cache is not None:  # what the cache keeps of these tokens: their factors, B_K rotated
            new = {"a_k": a_k, "b_k": self.rotary(b_k, start_pos), "a_v": a_v, "b_v": b_v}
        if cache is None:
            if kernel:
                k = kernels.tpa_factor_product(a_k, b_k, self.rotary.cos, self.rotary.sin, start_pos)  # (B, h, T, d)
                v = kernels.tpa_factor_product(a_v, b_v)
            else:
                k = factor_product(a_k, self.rotary(b_k, start_pos)).transpose(1, 2)  # (B, h, T, d)
                v = factor_product(a_v, b_v).transpose(1, 2)
            y = causal_attention(q, k, v)  # (B, h, T, d)
        elif T == 1:  # a decode step: keep this token's factors, attend over the whole cache
            pos = torch.as_tensor(start_pos, device=x.device).view(1)
            for name, value in new.items():
                cache[name].index_copy_(1, pos, value)
            if kernel:  # attention straight from the factors, never forming K or V
                y = kernels.tpa_decode(q[:, :, 0], cache["a_k"], cache["b_k"], cache["a_v"], cache["b_v"],
                                       pos + 1)[:, :, None]  # (B, h, 1, d)
            else:
                k = factor_product(cache["a_k"], cache["b_k"]).transpose(1, 2)  # (B, h, L, d)
                v = factor_product(cache["a_v"], cache["b_v"]).transpose(1, 2)
                y = cached_attention(q, k, v, pos)  # (B, h, 1, d)
        else:  # a prompt chunk: keep its factors, rebuild K and V from all cached ones
            end = start_pos + T
            for name, value in new.items():
                cache[name][:, start_pos:end] = value
            k = factor_product(cache["a_k"][:, :end], cache["b_k"][:, :end]).transpose(1, 2)  # (B, h, end, d)
            v = factor_product(cache["a_v"][:, :end], cache["b_v"][:, :end]).transpose(1, 2)
            y = causal_attention(q, k, v, start_pos)  # (B, h, T, d)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.h * self.d))


class TPAKVOnly(TPAttention):
    """Token mixer 'tpa-kvonly': standard multi-head queries, factorised keys and values."""

    def __init__(self, cfg, layer: int):
        super().__init__(cfg, layer, kv_only=True)


# ----------------------------------------------------------------------------------------------------
# Self-demo (CPU, seconds)

if __name__ == "__main__":
    from types import SimpleNamespace

    def config(**changes):  # the settings TPA reads, at train.GPTConfig's defaults (--arch tpa)
        defaults = dict(arch="tpa", n_embd=384, n_head=6, block_size=512, rope_base=10000.0, tpa_rank_q=6,
                        tpa_rank_k=2, tpa_rank_v=2, tpa_heads=0, tpa_head_dim=64)
        return SimpleNamespace(**{**defaults, **changes})

    torch.manual_seed(0)
    cfg = config(n_embd=128, n_head=2, block_size=64, tpa_head_dim=32)
    mixer = TPAttention(cfg, 0)
    mixer.init_weights()
    nn.init.normal_(mixer.proj.weight, std=0.02)
    x = torch.randn(2, 20, cfg.n_embd)  # (B, T, C)

    print("1. RoPE commutes with the head factor: rotating B then forming Q == forming Q then rotating it")
    (a_q, _, _), (b_q, _, _) = mixer.factors(x)
    rotate_b = factor_product(a_q, mixer.rotary(b_q))
    rotate_q = mixer.rotary(factor_product(a_q, b_q))
    print(f"   max difference {(rotate_b - rotate_q).abs().max():.1e}")
    assert (rotate_b - rotate_q).abs().max() < 1e-6

    default = config()
    print(f"2. Values cached per token per layer at the project's default model (C={default.n_embd}, "
          f"{default.n_head} heads of d={default.n_embd // default.n_head}):")
    for name, n in cache_table(default):
        print(f"   {name:38s} {n:5d}")
    h, d, ranks = default.n_head, default.n_embd // default.n_head, default.tpa_rank_k + default.tpa_rank_v
    assert [n for _, n in cache_table(default)] == [2 * h * d, 2 * 2 * d, 2 * d, ranks * (tpa_heads(default) + d)]

    print("3. Prefill 8 tokens, then decode 12 one at a time from the factorised cache == the full forward:")
    full = mixer(x)
    cache = mixer.init_cache(2, 64, x.device, x.dtype)
    steps = [mixer(x[:, :8], 0, cache)] + [mixer(x[:, t:t + 1], t, cache) for t in range(8, 20)]
    print(f"   max difference {(torch.cat(steps, dim=1) - full).abs().max():.1e}")
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-6
