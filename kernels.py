"""
kernels.py -- Triton versions of the technique files' hot paths, each an autograd Function.

Every kernel here has a plain PyTorch reference in its technique file (named in its docstring), which
test_all.py compares it with, forward and backward. On a CPU, Triton's interpreter runs these kernels
when TRITON_INTERPRET=1 is set before this module is imported (fp32 only: its bf16 arithmetic is wrong).
This file imports torch and Triton only; bench.py times it (`python bench.py mhc|linearity|tpa|hyena`, GPU).
The sections follow the reading order: mHC, linearity, TPA, Hyena.

mHC (mhc.py), per token with n = 4 streams of width C:
    sinkhorn          (N, n, n) logits -> doubly-stochastic matrices, 20 iterations in registers
    mhc_pre           h (N, n, C) -> x_in = sum_j pre_j h_j, post (N, n), res (N, n, n), and h passed through:
                      the RMSNorm, the one projection to n^2 + 2n coefficients, sigmoid / 2 sigmoid and
                      Sinkhorn fused in one kernel over whole rows, the pre-mix in a second over (tokens,
                      channels) tiles; three backward kernels
    mhc_post_res      h' = res h + post^T f: the stream mix and the write-back of the sub-layer output
The pre path keeps the projection u = v phi (padded to W = 64 columns for n = 4), the norm's factor and
pre per token for its backward; Sinkhorn's backward recomputes the iterates (run forward once more, each
iteration's input written to a scratch buffer the same program reads back at once, then walked
backwards: O(iters)).

Linearity (linearity.py), hidden states (N, d):
    centred_cross_gram  one batch's Xc^T Xc and Xc^T (Yc - Xc), centred as the tiles load, fp32 products
    cosine_regulariser  sum over layer pairs of the token mean of 1 - cos(h_{i-1}, h_i), fwd and bwd

TPA (tpa.py), factors a (B, T, R, h), b (B, T, R, d):
    tpa_factor_product  (1/R) sum_r a_r (outer) RoPE(b_r) -> (B, h, T, d), SDPA's layout, RoPE in registers
    tpa_decode          one token's attention over the factor cache, K and V never formed (FlashTPA)

Hyena (hyena.py), streams (B, C, L) with time contiguous:
    hyena_short_conv  in_proj output (B, L, K) -> streams (B, K / streams, L): the 3-tap causal depthwise
                      conv, transposed
    hyena_long_conv   x * (h conv u + D u), the causal long convolution with the skip and the gate fused,
                      by one of three paths: blocked Toeplitz matmuls (training batches of short
                      sequences), one Monarch-FFT kernel per pass (the transforms as tensor-core matmuls,
                      FlashFFTConv's design; up to 16K tokens), or cuFFT with fused pointwise kernels
    hyena_filter      the implicit filters h (N, C, L): the Sin MLP per block of positions, then W4 a3^T
                      with the window in the epilogue; the MLP's pre-activations kept for the backward

Launch settings: one dict per kernel, next to it (SINKHORN, MHC_PRE, MHC_POST, CROSS_GRAM, COSINE,
TPA_PRODUCT, TPA_DECODE, HYENA_SHORT_CONV, HYENA_CONV, HYENA_FFT, MONARCH, FILTER). Where one was swept,
its values are the fastest forward + backward GPU time of the sweep at the shape its comment names;
`python bench.py TECHNIQUE --set DICT.key=value` times another setting, and kernels_sweeps.md keeps
what the sweeps found.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # CPU machines without Triton: the plain paths still work
    HAVE_TRITON = False


def _check(name, t, shape=None, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (use one of {dtypes})")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")


def _check_streams(name, h):
    if h.dim() != 4:
        raise ValueError(f"{name}: h must be the streams (B, T, n, C), got shape {tuple(h.shape)}")


def _runnable(t: torch.Tensor, name: str):
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{name}: Triton kernels need a CUDA tensor (got {t.device}); on a CPU set "
                           f"TRITON_INTERPRET=1 before importing kernels.py, or use the plain path")


# ----------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp on (BLOCK_N, n, n) tiles: axis 1 indexes rows i, axis 2 columns j

# Launch settings: tokens per program and warps. Small tiles and one warp, many programs: the
# iterations are a serial chain of small steps per token (`python bench.py mhc --set SINKHORN.block_n=32`).
SINKHORN = {"block_n": 16, "num_warps": 1}

if HAVE_TRITON:
    @triton.jit
    def _sk_softmax(logits):
        """Iteration 1's column step (BLOCK_N, n, n): a softmax over each column i, shifted by that column's
        own max (a constant: no gradient), so no column underflows to zero."""
        e = tl.exp(logits - tl.max(logits, axis=1)[:, None, :])
        return e / tl.sum(e, axis=1)[:, None, :]

    @triton.jit
    def _sk_forward(p, ITERS: tl.constexpr, EPS: tl.constexpr):
        """p = _sk_softmax(logits); + eps, iteration 1's rows, then ITERS - 1 x (columns, rows)."""
        m = p + EPS
        m = m / (tl.sum(m, axis=2)[:, :, None] + EPS)  # rows sum to 1
        for _ in range(ITERS - 1):
            m = m / (tl.sum(m, axis=1)[:, None, :] + EPS)  # columns sum to 1
            m = m / (tl.sum(m, axis=2)[:, :, None] + EPS)  # rows sum to 1
        return m

    @triton.jit
    def _sk_backward(p, g, ITERS: tl.constexpr, EPS: tl.constexpr, scratch_ptr, offs, mask, stride):
        """Gradient w.r.t. the logits, given p = _sk_softmax(logits) and g = dL/d(output).

        Iterations 2..ITERS map m -> a = m / colsum(m) -> out = a / rowsum(a). Going backwards through one:
            g_a[i, k] = (g[i, k] - sum_j g[i, j] out[i, j]) / s_i        s_i = rowsum(a)_i + eps
            g_m[k, j] = (g_a[k, j] - sum_i g_a[i, j] a[i, j]) / t_j      t_j = colsum(m)_j + eps
        Iteration 1 is out = (p + eps) / s with the rows' step as above, then the softmax's Jacobian per
        column: dlogits[i, j] = p[i, j] (g_p[i, j] - sum_k g_p[k, j] p[k, j]). The forward iterations are
        recomputed once and each one's input m is kept in scratch (this program's own rows, written and
        read back at once, so it stays in the L2): O(iters) work."""
        m1 = p + EPS
        s1 = tl.sum(m1, axis=2)[:, :, None] + EPS
        m = m1 / s1
        for it in range(ITERS - 1):
            tl.store(scratch_ptr + it * stride + offs, m, mask=mask)
            m = m / (tl.sum(m, axis=1)[:, None, :] + EPS)
            m = m / (tl.sum(m, axis=2)[:, :, None] + EPS)
        tl.debug_barrier()
        for back in range(ITERS - 1):
            m = tl.load(scratch_ptr + (ITERS - 2 - back) * stride + offs, mask=mask, other=1.0)
            t = tl.sum(m, axis=1)[:, None, :] + EPS
            a = m / t
            s = tl.sum(a, axis=2)[:, :, None] + EPS
            out = a / s
            g_a = (g - tl.sum(g * out, axis=2)[:, :, None]) / s
            g = (g_a - tl.sum(g_a * a, axis=1)[:, None, :]) / t
        g = (g - tl.sum(g * (m1 / s1), axis=2)[:, :, None]) / s1  # iteration 1's rows
        return p * (g - tl.sum(g * p, axis=1)[:, None, :])  # the softmax per column

    @triton.jit
    def _sinkhorn_fwd_kernel(logits_ptr, out_ptr, N, EPS: tl.constexpr, N_STREAMS: tl.constexpr,
                             ITERS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ij = tl.arange(0, N_STREAMS)[:, None] * N_STREAMS + tl.arange(0, N_STREAMS)[None, :]  # (n, n)
        offs = rows[:, None, None] * (N_STREAMS * N_STREAMS) + ij[None, :, :]
        mask = (rows < N)[:, None, None]
        logits = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, _sk_forward(_sk_softmax(logits), ITERS, EPS), mask=mask)

    @triton.jit
    def _sinkhorn_bwd_kernel(logits_ptr, grad_ptr, dlogits_ptr, scratch_ptr, N, EPS: tl.constexpr,
                             N_STREAMS: tl.constexpr, ITERS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ij = tl.arange(0, N_STREAMS)[:, None] * N_STREAMS + tl.arange(0, N_STREAMS)[None, :]
        offs = rows[:, None, None] * (N_STREAMS * N_STREAMS) + ij[None, :, :]
        mask = (rows < N)[:, None, None]
        logits = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dlogits_ptr + offs, _sk_backward(_sk_softmax(logits), g, ITERS, EPS, scratch_ptr, offs, mask,
                                                  N * N_STREAMS * N_STREAMS), mask=mask)


class SinkhornFunction(torch.autograd.Function):
    """Triton Sinkhorn-Knopp: equals mhc.sinkhorn_knopp(logits, iters) on (..., n, n), n a power of 2.
    fp32 out; the backward recomputes the iterations (nothing saved but the logits)."""

    @staticmethod
    def forward(ctx, logits, iters: int, eps: float):
        n = logits.size(-1)
        flat = logits.reshape(-1, n, n).contiguous()
        out = torch.empty(flat.shape, device=flat.device, dtype=torch.float32)
        block = SINKHORN["block_n"]  # small tiles, many programs: the iterations are a serial chain per token
        _sinkhorn_fwd_kernel[(triton.cdiv(flat.size(0), block),)](
            flat, out, flat.size(0), EPS=eps, N_STREAMS=n, ITERS=iters, BLOCK_N=block,
            num_warps=SINKHORN["num_warps"])
        ctx.save_for_backward(flat)
        ctx.iters, ctx.eps, ctx.shape = iters, eps, logits.shape
        return out.view(logits.shape)

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        n = flat.size(-1)
        dlogits = torch.empty(flat.shape, device=flat.device, dtype=torch.float32)
        block = SINKHORN["block_n"]
        scratch = torch.empty((max(ctx.iters - 1, 1),) + tuple(flat.shape), device=flat.device, dtype=torch.float32)
        _sinkhorn_bwd_kernel[(triton.cdiv(flat.size(0), block),)](
            flat, grad.reshape(-1, n, n).contiguous(), dlogits, scratch, flat.size(0), EPS=ctx.eps, N_STREAMS=n,
            ITERS=ctx.iters, BLOCK_N=block, num_warps=SINKHORN["num_warps"])
        return dlogits.view(ctx.shape).to(flat.dtype), None, None


def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """logits (..., n, n) -> doubly-stochastic matrices (..., n, n) fp32, n a power of 2.
    Reference: mhc.sinkhorn_knopp."""
    n = logits.size(-1)
    if logits.size(-2) != n or n & (n - 1) or n < 2:
        raise ValueError(f"sinkhorn kernel: square matrices of a power-of-2 size, got {tuple(logits.shape[-2:])}")
    if iters < 1:
        raise ValueError(f"sinkhorn kernel: iters must be at least 1 (got {iters})")
    _check("logits", logits)
    _runnable(logits, "sinkhorn")
    return SinkhornFunction.apply(logits, iters, eps)


# ----------------------------------------------------------------------------------------------------
# mHC pre path: RMSNorm + projection + sigmoid / 2 sigmoid + Sinkhorn, then the pre-mix
#
# The projection phi (nC, 2n + n^2) is laid out in four groups of G = max(16, n^2) columns, W = 4G wide,
# so that one tl.dot per slice of the row computes all of v phi (tl.dot needs widths >= 16 and powers of
# 2): group 0 holds pre's n columns at 0, G/n, 2G/n, ... (zeros between), group 1 the same for post,
# group 2 res's n^2 columns in row-major order, group 3 is padding. Summing a group (BLOCK_N, G) over
# (n, G/n) gives (BLOCK_N, n); group 2 reshapes to (n, n).
#
# Five kernels, each shaped for its own work: what needs a whole row of a token (nC values) runs on blocks
# of whole rows; what is per element runs on smaller (tokens, channels) or (tokens, stream) blocks, which
# keep many programs in flight and stream at close to the memory bandwidth; Sinkhorn's backward, a serial
# chain of small steps per token, runs on its own with one warp per block of tokens (inside the row
# kernel, the row's wide tiles would wait on it):
#   forward   _mhc_coef_fwd_kernel  rows: u = v phi and sum(v^2) in one pass -> pre, post, res (Sinkhorn)
#             _mhc_mix_kernel       tiles: x_in = sum_j pre_j h_j
#   backward  _mhc_dpre_kernel      rows: d pre_j = <dx_in, h_j>
#             _mhc_coef_bwd_kernel  per token, no row data: through Sinkhorn, the sigmoids and the norm:
#                                   du = dL/du (N, W) and the norm's per-token factor (N,)
#             _mhc_dh_kernel        (tokens, stream): dh = du phi^T + pre dx_in + (norm term) h (+ the
#                                   passed-through streams' gradient)
# The forward keeps u, r and pre (W + 1 + n floats per token), so the backward does not redo the
# projection.

# Launch settings of the five kernels listed above, by prefix: coef_ (rows per program, slice width, warps,
# pipeline stages), mix_ (tokens, channels, warps), dpre_, coef_bwd_ and dh_ likewise. Each the fastest of
# a sweep at bf16 streams, n = 4, C = 384, 32K tokens (`python bench.py mhc --set MHC_PRE.mix_block_c=128`).
# dot: the precision of the fp32 dot products (v phi, and du phi^T in dh): "tf32", as torch runs the plain
# path's v @ phi when training (allow_tf32), or "ieee" for fp32 accuracy (the interpreter computes every
# dot in fp32). How far "tf32" strays can depend on the tile shape and the data (kernels_sweeps.md), so the
# GPU tests run these settings in both.
MHC_PRE = {"coef_block_n": 256, "coef_block_k": 32, "coef_num_warps": 8, "coef_stages": 4, "dot": "tf32",
           "mix_block_n": 8, "mix_block_c": 256, "mix_num_warps": 2,
           "dpre_block_n": 16, "dpre_block_c": 128, "dpre_num_warps": 2,
           "coef_bwd_block_n": 4, "coef_bwd_num_warps": 1,
           "dh_block_n": 128, "dh_block_c": 64, "dh_num_warps": 8}

if HAVE_TRITON:
    @triton.jit
    def _spread(x, N_STREAMS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr):
        """(BLOCK_N, n) -> (BLOCK_N, G) with x[:, j] at column j * G/n, zeros elsewhere."""
        first = (tl.arange(0, G // N_STREAMS) == 0).to(tl.float32)
        return tl.reshape(x[:, :, None] * first[None, None, :], (BLOCK_N, G))

    @triton.jit
    def _gather(x, N_STREAMS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr):
        """(BLOCK_N, G) -> (BLOCK_N, n): the inverse of _spread for a spread-out group."""
        return tl.sum(tl.reshape(x, (BLOCK_N, N_STREAMS, G // N_STREAMS)), axis=2)

    @triton.jit
    def _group(u, k: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr):
        """Group k (BLOCK_N, G) of a (BLOCK_N, 4G) row of the layout."""
        u4 = tl.reshape(u, (BLOCK_N, 4, G))
        return tl.sum(tl.where((tl.arange(0, 4) == k)[None, :, None], u4, 0.0), axis=1)

    @triton.jit
    def _ungroup(g0, g1, g2, G: tl.constexpr, BLOCK_N: tl.constexpr):
        """(BLOCK_N, G) x 3 -> (BLOCK_N, 4G), groups 0, 1, 2 and zero padding: the inverse of _group."""
        k = tl.arange(0, 4)[None, :, None]
        u4 = tl.where(k == 0, g0[:, None, :], tl.where(k == 1, g1[:, None, :], tl.where(k == 2, g2[:, None, :], 0.0)))
        return tl.reshape(u4, (BLOCK_N, 4 * G))

    @triton.jit
    def _mhc_project(h_ptr, phi_ptr, rows, rmask, C, N_STREAMS: tl.constexpr, G: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        """One pass over the nC row (the streams back to back): u = v phi (BLOCK_N, 4G) and sum(v^2)."""
        K = N_STREAMS * C
        cols = tl.arange(0, 4 * G)
        u = tl.zeros((BLOCK_N, 4 * G), dtype=tl.float32)
        squares = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # summed over the row once, after the loop
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            v = tl.load(h_ptr + rows[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_K)
            squares += v * v
            phi = tl.load(phi_ptr + ks[:, None] * (4 * G) + cols[None, :], mask=kmask[:, None], other=0.0)  # (BLOCK_K, 4G)
            u += tl.dot(v, phi, input_precision=DOT)
        return u, tl.sum(squares, axis=1)

    @triton.jit
    def _mhc_coefficients(u, r, coef_ptr, N_STREAMS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr):
        """c = r u; z = gate * c + b per group; pre = sigmoid, post = 2 sigmoid, res logits (n, n)."""
        g_cols = tl.arange(0, G)
        gate_pre, gate_post, gate_res = tl.load(coef_ptr), tl.load(coef_ptr + 1), tl.load(coef_ptr + 2)
        b_pre = tl.load(coef_ptr + 3 + g_cols)
        b_post = tl.load(coef_ptr + 3 + G + g_cols)
        b_res = tl.load(coef_ptr + 3 + 2 * G + g_cols)
        c_pre = _group(u, 0, G, BLOCK_N) * r[:, None]
        c_post = _group(u, 1, G, BLOCK_N) * r[:, None]
        c_res = _group(u, 2, G, BLOCK_N) * r[:, None]
        z_pre = _gather(gate_pre * c_pre + b_pre[None, :], N_STREAMS, G, BLOCK_N)
        z_post = _gather(gate_post * c_post + b_post[None, :], N_STREAMS, G, BLOCK_N)
        logits = tl.reshape(gate_res * c_res + b_res[None, :], (BLOCK_N, N_STREAMS, N_STREAMS))
        return tl.sigmoid(z_pre), 2 * tl.sigmoid(z_post), logits, c_pre, c_post, c_res

    @triton.jit
    def _mhc_coef_fwd_kernel(h_ptr, phi_ptr, coef_ptr, u_ptr, r_ptr, pre_ptr, post_ptr, res_ptr, N, C,
                             EPS: tl.constexpr, SK_EPS: tl.constexpr, N_STREAMS: tl.constexpr, G: tl.constexpr,
                             ITERS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        u, sumsq = _mhc_project(h_ptr, phi_ptr, rows, rmask, C, N_STREAMS, G, BLOCK_N, BLOCK_K, DOT)
        r = tl.rsqrt(sumsq / (N_STREAMS * C) + EPS)  # RMSNorm of the flattened streams, applied after the matmul
        pre, post, logits, _, _, _ = _mhc_coefficients(u, r, coef_ptr, N_STREAMS, G, BLOCK_N)
        res = _sk_forward(_sk_softmax(logits), ITERS, SK_EPS)
        streams = tl.arange(0, N_STREAMS)
        tl.store(u_ptr + rows[:, None] * (4 * G) + tl.arange(0, 4 * G)[None, :], u, mask=rmask[:, None])
        tl.store(r_ptr + rows, r, mask=rmask)
        tl.store(pre_ptr + rows[:, None] * N_STREAMS + streams[None, :], pre, mask=rmask[:, None])
        tl.store(post_ptr + rows[:, None] * N_STREAMS + streams[None, :], post, mask=rmask[:, None])
        ij = streams[:, None] * N_STREAMS + streams[None, :]
        tl.store(res_ptr + rows[:, None, None] * (N_STREAMS * N_STREAMS) + ij[None, :, :], res,
                 mask=rmask[:, None, None])

    @triton.jit
    def _mhc_mix_kernel(h_ptr, pre_ptr, xin_ptr, N, C, N_STREAMS: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_C: tl.constexpr):
        """x_in = sum_j pre_j h_j on one (BLOCK_N tokens, BLOCK_C channels) tile."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rmask = rows < N
        m2 = rmask[:, None] & (cs < C)[None, :]
        x = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for j in tl.static_range(N_STREAMS):
            pre_j = tl.load(pre_ptr + rows * N_STREAMS + j, mask=rmask, other=0.0)
            h_j = tl.load(h_ptr + rows[:, None] * (N_STREAMS * C) + j * C + cs[None, :], mask=m2, other=0.0)
            x += pre_j[:, None] * h_j.to(tl.float32)
        tl.store(xin_ptr + rows[:, None] * C + cs[None, :], x.to(xin_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _mhc_dpre_kernel(h_ptr, dxin_ptr, dpre_ptr, N, C, N_STREAMS: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_C: tl.constexpr):
        """d pre_j = <d x_in, h_j> (N, n): one pass over each row."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        streams = tl.arange(0, N_STREAMS)
        d_pre = tl.zeros((BLOCK_N, N_STREAMS), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            m2 = rmask[:, None] & (cs < C)[None, :]
            dx = tl.load(dxin_ptr + rows[:, None] * C + cs[None, :], mask=m2, other=0.0).to(tl.float32)
            for j in tl.static_range(N_STREAMS):
                h_j = tl.load(h_ptr + rows[:, None] * (N_STREAMS * C) + j * C + cs[None, :], mask=m2,
                              other=0.0).to(tl.float32)
                d_pre += tl.where(streams[None, :] == j, tl.sum(h_j * dx, axis=1)[:, None], 0.0)
        tl.store(dpre_ptr + rows[:, None] * N_STREAMS + streams[None, :], d_pre, mask=rmask[:, None])

    @triton.jit
    def _mhc_coef_bwd_kernel(dpre_ptr, u_ptr, r_ptr, coef_ptr, dpost_ptr, dres_ptr, du_ptr, drc_ptr, partial_ptr,
                             scratch_ptr, N, C, SK_EPS: tl.constexpr, N_STREAMS: tl.constexpr, G: tl.constexpr,
                             ITERS: tl.constexpr, BLOCK_N: tl.constexpr):
        """Per token, from d pre, d post, d res: du = dL/du (N, W) and the norm's factor (N,); no row data."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        K = N_STREAMS * C
        streams = tl.arange(0, N_STREAMS)
        cols = tl.arange(0, 4 * G)
        d_pre = tl.load(dpre_ptr + rows[:, None] * N_STREAMS + streams[None, :], mask=rmask[:, None], other=0.0)
        # the forward's coefficients from its saved u and r
        out_offs = rows[:, None] * (4 * G) + cols[None, :]
        u = tl.load(u_ptr + out_offs, mask=rmask[:, None], other=0.0)
        r = tl.load(r_ptr + rows, mask=rmask, other=1.0)
        pre, post, logits, c_pre, c_post, c_res = _mhc_coefficients(u, r, coef_ptr, N_STREAMS, G, BLOCK_N)
        d_post = tl.load(dpost_ptr + rows[:, None] * N_STREAMS + streams[None, :], mask=rmask[:, None], other=0.0)
        ij = streams[:, None] * N_STREAMS + streams[None, :]
        offs3 = rows[:, None, None] * (N_STREAMS * N_STREAMS) + ij[None, :, :]
        d_res = tl.load(dres_ptr + offs3, mask=rmask[:, None, None], other=0.0)
        # through the activations: sigmoid' = s (1 - s); (2 sigmoid)' = post (1 - post / 2); Sinkhorn
        dz_pre = _spread(d_pre * pre * (1 - pre), N_STREAMS, G, BLOCK_N)
        dz_post = _spread(d_post * post * (1 - 0.5 * post), N_STREAMS, G, BLOCK_N)
        d_logits = _sk_backward(_sk_softmax(logits), d_res, ITERS, SK_EPS, scratch_ptr, offs3, rmask[:, None, None],
                                N * N_STREAMS * N_STREAMS)
        dz_res = tl.reshape(d_logits, (BLOCK_N, G))
        # through z = gate * c + b, c = r u:  du = gate r dz,  dr = sum gate (c / r) dz
        gate_pre, gate_post, gate_res = tl.load(coef_ptr), tl.load(coef_ptr + 1), tl.load(coef_ptr + 2)
        dz = _ungroup(dz_pre, dz_post, dz_res, G, BLOCK_N)  # (BLOCK_N, 4G)
        gz = _ungroup(gate_pre * dz_pre, gate_post * dz_post, gate_res * dz_res, G, BLOCK_N)
        dr = tl.sum(gz * u, axis=1)
        tl.store(du_ptr + out_offs, gz * r[:, None], mask=rmask[:, None])
        # the norm's term of dv, dr dr/dv = -dr r^3 / K * v: its per-token factor
        tl.store(drc_ptr + rows, -dr * r * r * r / K, mask=rmask)
        # for the biases' and gates' gradients: this block's sums over tokens of dz and dz * c (PyTorch adds
        # the blocks' sums); rows past N have dz = 0
        c = _ungroup(c_pre, c_post, c_res, G, BLOCK_N)
        tl.store(partial_ptr + tl.program_id(0) * (8 * G) + cols, tl.sum(dz, axis=0))
        tl.store(partial_ptr + tl.program_id(0) * (8 * G) + 4 * G + cols, tl.sum(dz * c, axis=0))

    @triton.jit
    def _mhc_dh_kernel(h_ptr, dxin_ptr, dhpass_ptr, du_ptr, phi_ptr, pre_ptr, drc_ptr, dh_ptr, N, C,
                       N_STREAMS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                       DOT: tl.constexpr, HAS_DHPASS: tl.constexpr):
        """dh_j = du phi_j^T + pre_j dx_in + drc h_j (+ dh_pass_j) for stream j = program_id(1), BLOCK_N
        tokens, all channels in slices of BLOCK_C."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.program_id(1)
        rmask = rows < N
        K = N_STREAMS * C
        cols = tl.arange(0, 4 * G)
        du = tl.load(du_ptr + rows[:, None] * (4 * G) + cols[None, :], mask=rmask[:, None], other=0.0)  # (BLOCK_N, 4G)
        pre_j = tl.load(pre_ptr + rows * N_STREAMS + j, mask=rmask, other=0.0)
        drc = tl.load(drc_ptr + rows, mask=rmask, other=0.0)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cmask = cs < C
            m2 = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * K + j * C + cs[None, :]
            phi_t = tl.load(phi_ptr + (j * C + cs)[None, :] * (4 * G) + cols[:, None], mask=cmask[None, :],
                            other=0.0)  # (4G, BLOCK_C): rows j C + cs of phi, transposed
            v = tl.load(h_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            dx = tl.load(dxin_ptr + rows[:, None] * C + cs[None, :], mask=m2, other=0.0).to(tl.float32)
            dv = tl.dot(du, phi_t, input_precision=DOT) + pre_j[:, None] * dx + drc[:, None] * v
            if HAS_DHPASS:  # the write-back's gradient of h, added here rather than by autograd
                dv += tl.load(dhpass_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            tl.store(dh_ptr + offs, dv.to(dh_ptr.dtype.element_ty), mask=m2)


def _to_spread(x: torch.Tensor, n: int) -> torch.Tensor:
    """(..., 2n + n^2) columns [pre | post | res] -> (..., 4G) in the spread layout, zeros elsewhere (the
    whole layout, in PyTorch; the kernels' _spread / _gather move one group in and out of registers)."""
    # Slicing only: no index tensor to copy to the GPU (a blocking copy from pageable memory, which would
    # drain the GPU's queue once per sub-layer).
    G = max(16, n * n)
    out = x.new_zeros(*x.shape[:-1], 4, G)
    out[..., 0, ::G // n] = x[..., :n]
    out[..., 1, ::G // n] = x[..., n:2 * n]
    out[..., 2, :n * n] = x[..., 2 * n:]
    return out.flatten(-2)


def _from_spread(y: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of _to_spread: (..., 4G) -> (..., 2n + n^2)."""
    G = max(16, n * n)
    y = y.unflatten(-1, (4, G))
    return torch.cat([y[..., 0, ::G // n], y[..., 1, ::G // n], y[..., 2, :n * n]], dim=-1)


class MHCPreFunction(torch.autograd.Function):
    """Equals mhc.MHCConnection.coefficients + the pre-mix: (x_in, post, res) from the streams h.

    It also passes h itself through (a view, no copy), for the write-back to read: h then has a single
    consumer in the graph, and the write-back's gradient of h comes back here, where the backward
    kernel adds it while it writes dh (otherwise autograd adds the two (N, n, C) gradients in a kernel
    of its own: a read of both and a write)."""

    @staticmethod
    def forward(ctx, h, phi, gates, b_pre, b_post, b_res, iters: int):
        N, n, C = h.shape
        phi_spread = _to_spread(phi.float(), n)  # (nC, W)
        W = phi_spread.size(1)
        bias_spread = _to_spread(torch.cat([b_pre, b_post, b_res.reshape(-1)]).float(), n)[:3 * W // 4]
        coef = torch.cat([gates.float(), bias_spread])
        f32 = dict(device=h.device, dtype=torch.float32)
        u, r = torch.empty(N, W, **f32), torch.empty(N, **f32)  # kept for the backward
        pre, post, res = torch.empty(N, n, **f32), torch.empty(N, n, **f32), torch.empty(N, n, n, **f32)
        x_in = torch.empty(N, C, device=h.device, dtype=h.dtype)
        cfg = MHC_PRE
        _mhc_coef_fwd_kernel[(triton.cdiv(N, cfg["coef_block_n"]),)](
            h, phi_spread, coef, u, r, pre, post, res, N, C, EPS=1e-6, SK_EPS=1e-6, N_STREAMS=n, G=W // 4, ITERS=iters,
            BLOCK_N=cfg["coef_block_n"], BLOCK_K=cfg["coef_block_k"], DOT=cfg["dot"], num_warps=cfg["coef_num_warps"],
            num_stages=cfg["coef_stages"])
        _mhc_mix_kernel[(triton.cdiv(N, cfg["mix_block_n"]), triton.cdiv(C, cfg["mix_block_c"]))](
            h, pre, x_in, N, C, N_STREAMS=n, BLOCK_N=cfg["mix_block_n"], BLOCK_C=cfg["mix_block_c"],
            num_warps=cfg["mix_num_warps"])
        ctx.save_for_backward(h, phi_spread, coef, u, r, pre)
        ctx.iters = iters
        ctx.set_materialize_grads(False)  # an output nobody used gives None, not an (N, n, C) tensor of zeros
        return x_in, post, res, h.view_as(h)

    @staticmethod
    def backward(ctx, d_xin, d_post, d_res, d_hpass):
        h, phi_spread, coef, u, r, pre = ctx.saved_tensors
        N, n, C = h.shape
        W = phi_spread.size(1)
        d_xin = h.new_zeros(N, C) if d_xin is None else d_xin.contiguous()
        d_post = h.new_zeros(N, n, dtype=torch.float32) if d_post is None else d_post.float().contiguous()
        d_res = h.new_zeros(N, n, n, dtype=torch.float32) if d_res is None else d_res.float().contiguous()
        d_hpass = None if d_hpass is None else d_hpass.contiguous()
        f32 = dict(device=h.device, dtype=torch.float32)
        cfg = MHC_PRE
        d_pre = torch.empty(N, n, **f32)
        _mhc_dpre_kernel[(triton.cdiv(N, cfg["dpre_block_n"]),)](
            h, d_xin, d_pre, N, C, N_STREAMS=n, BLOCK_N=cfg["dpre_block_n"], BLOCK_C=cfg["dpre_block_c"],
            num_warps=cfg["dpre_num_warps"])
        blocks = triton.cdiv(N, cfg["coef_bwd_block_n"])
        du, drc = torch.empty(N, W, **f32), torch.empty(N, **f32)
        partial = torch.empty(blocks, 2, W, **f32)  # per block of tokens: sum of dz, sum of dz * c
        scratch = torch.empty(max(ctx.iters - 1, 1), N, n, n, **f32)  # iterations 2..iters' inputs
        _mhc_coef_bwd_kernel[(blocks,)](
            d_pre, u, r, coef, d_post, d_res, du, drc, partial, scratch, N, C, SK_EPS=1e-6, N_STREAMS=n, G=W // 4,
            ITERS=ctx.iters, BLOCK_N=cfg["coef_bwd_block_n"], num_warps=cfg["coef_bwd_num_warps"])
        dh = torch.empty_like(h)
        _mhc_dh_kernel[(triton.cdiv(N, cfg["dh_block_n"]), n)](
            h_ptr=h, dxin_ptr=d_xin, du_ptr=du, phi_ptr=phi_spread, pre_ptr=pre, drc_ptr=drc, dh_ptr=dh, N=N, C=C,
            dhpass_ptr=dh if d_hpass is None else d_hpass,  # read only with HAS_DHPASS
            N_STREAMS=n, G=W // 4, BLOCK_N=cfg["dh_block_n"], BLOCK_C=cfg["dh_block_c"], DOT=cfg["dot"],
            HAS_DHPASS=d_hpass is not None, num_warps=cfg["dh_num_warps"])
        # d_phi = v^T du: one matmul in h's dtype (tensor cores for bf16 streams, as autocast computes a
        # weight's gradient)
        d_phi = _from_spread(h.reshape(N, n * C).t() @ du.to(h.dtype), n).float()  # (nC, 2n + n^2)
        sums = partial.sum(0)  # (2, W)
        d_bias = _from_spread(sums[0], n)
        dzc = sums[1].view(4, W // 4).sum(1)[:3]  # d gate, per group: sum over tokens of dz * c
        return (dh, d_phi, dzc, d_bias[:n], d_bias[n:2 * n], d_bias[2 * n:].view(n, n), None)


def mhc_pre_supports(n: int) -> bool:
    """Whether mhc_pre takes n streams: its tiles lay the n x n matrices out in powers of 2, at least 4."""
    return n >= 4 and n & (n - 1) == 0


def mhc_pre(h, phi, gates, b_pre, b_post, b_res, iters: int = 20):
    """h (B, T, n, C) -> x_in (B, T, C), post (B, T, n), res (B, T, n, n), and h passed through (B, T, n, C):
    give that one to mhc_post_res, so one kernel sums h's two gradients. Reference:
    mhc.MHCConnection.coefficients, then mhc.pre_mix."""
    _check_streams("mhc_pre", h)
    B, T, n, C = h.shape
    if not mhc_pre_supports(n):
        raise ValueError(f"mhc_pre kernel: n must be a power of 2 >= 4 (got {n}); use the plain path")
    if iters < 1:
        raise ValueError(f"mhc_pre kernel: Sinkhorn iters must be at least 1 (got {iters})")
    _check("h", h)
    _runnable(h, "mhc_pre")
    _check("phi", phi, (n * C, n * n + 2 * n))
    for name, t, shape in (("gates", gates, (3,)), ("b_pre", b_pre, (n,)), ("b_post", b_post, (n,)),
                           ("b_res", b_res, (n, n))):
        _check(name, t, shape)
    x_in, post, res, h_pass = MHCPreFunction.apply(h.reshape(B * T, n, C).contiguous(), phi, gates, b_pre,
                                                   b_post, b_res, iters)
    return x_in.view(B, T, C), post.view(B, T, n), res.view(B, T, n, n), h_pass.view(B, T, n, C)


# ----------------------------------------------------------------------------------------------------
# mHC / HC post path: h'_i = sum_j res_ij h_j + post_i f

# The write-back's tiles: tokens per program, channels per slice, warps; bwd_ the backward's. Each the
# fastest of 36 settings at MHC_PRE's shape (`python bench.py mhc --set MHC_POST.bwd_block_n=8`).
MHC_POST = {"block_n": 16, "block_c": 128, "num_warps": 4, "bwd_block_n": 4, "bwd_block_c": 128, "bwd_num_warps": 2}

if HAVE_TRITON:
    @triton.jit
    def _post_res_fwd_kernel(h_ptr, f_ptr, post_ptr, res_ptr, out_ptr, N, C, N_STREAMS: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rmask, cmask = rows < N, cs < C
        m2 = rmask[:, None] & cmask[None, :]
        streams = tl.arange(0, N_STREAMS)
        K = N_STREAMS * C
        post = tl.load(post_ptr + rows[:, None] * N_STREAMS + streams[None, :], mask=rmask[:, None], other=0.0)
        f = tl.load(f_ptr + rows[:, None] * C + cs[None, :], mask=m2, other=0.0).to(tl.float32)
        acc = post[:, :, None] * f[:, None, :]  # (BLOCK_N, n, BLOCK_C)
        for j in tl.static_range(N_STREAMS):
            h_j = tl.load(h_ptr + rows[:, None] * K + j * C + cs[None, :], mask=m2, other=0.0).to(tl.float32)
            res_j = tl.load(res_ptr + rows[:, None] * (N_STREAMS * N_STREAMS) + streams[None, :] * N_STREAMS + j,
                            mask=rmask[:, None], other=0.0)  # column j of res: (BLOCK_N, n)
            acc += res_j[:, :, None] * h_j[:, None, :]
        tl.store(out_ptr + rows[:, None, None] * K + streams[None, :, None] * C + cs[None, None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None, None] & cmask[None, None, :])

    @triton.jit
    def _post_res_bwd_kernel(h_ptr, f_ptr, post_ptr, res_ptr, dout_ptr, dh_ptr, df_ptr, dpost_ptr, dres_ptr,
                             N, C, N_STREAMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """One program covers whole rows (all of C), so the per-token reductions need no atomics."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        streams = tl.arange(0, N_STREAMS)
        K = N_STREAMS * C
        post = tl.load(post_ptr + rows[:, None] * N_STREAMS + streams[None, :], mask=rmask[:, None], other=0.0)
        d_post = tl.zeros((BLOCK_N, N_STREAMS), dtype=tl.float32)
        d_res = tl.zeros((BLOCK_N, N_STREAMS, N_STREAMS), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cmask = cs < C
            m2 = rmask[:, None] & cmask[None, :]
            m3 = rmask[:, None, None] & cmask[None, None, :]
            g = tl.load(dout_ptr + rows[:, None, None] * K + streams[None, :, None] * C + cs[None, None, :],
                        mask=m3, other=0.0).to(tl.float32)  # (BLOCK_N, n, BLOCK_C): dL/dh'_i
            f = tl.load(f_ptr + rows[:, None] * C + cs[None, :], mask=m2, other=0.0).to(tl.float32)
            tl.store(df_ptr + rows[:, None] * C + cs[None, :],
                     tl.sum(post[:, :, None] * g, axis=1).to(df_ptr.dtype.element_ty), mask=m2)  # sum_i post_i g_i
            d_post += tl.sum(g * f[:, None, :], axis=2)  # <g_i, f>
            for j in tl.static_range(N_STREAMS):
                h_j = tl.load(h_ptr + rows[:, None] * K + j * C + cs[None, :], mask=m2, other=0.0).to(tl.float32)
                res_j = tl.load(res_ptr + rows[:, None] * (N_STREAMS * N_STREAMS) + streams[None, :] * N_STREAMS + j,
                                mask=rmask[:, None], other=0.0)  # (BLOCK_N, n): res[:, i, j]
                tl.store(dh_ptr + rows[:, None] * K + j * C + cs[None, :],
                         tl.sum(res_j[:, :, None] * g, axis=1).to(dh_ptr.dtype.element_ty), mask=m2)
                d_res += tl.where(streams[None, None, :] == j, tl.sum(g * h_j[:, None, :], axis=2)[:, :, None], 0.0)
        tl.store(dpost_ptr + rows[:, None] * N_STREAMS + streams[None, :], d_post, mask=rmask[:, None])
        ij = streams[:, None] * N_STREAMS + streams[None, :]
        tl.store(dres_ptr + rows[:, None, None] * (N_STREAMS * N_STREAMS) + ij[None, :, :], d_res,
                 mask=rmask[:, None, None])


class PostResFunction(torch.autograd.Function):
    """Equals mhc.write_back: h' = res h + post^T f, per token."""

    @staticmethod
    def forward(ctx, h, f, post, res):
        N, n, C = h.shape
        out = torch.empty_like(h)
        block_n, block_c = MHC_POST["block_n"], MHC_POST["block_c"]
        _post_res_fwd_kernel[(triton.cdiv(N, block_n), triton.cdiv(C, block_c))](
            h, f, post, res, out, N, C, N_STREAMS=n, BLOCK_N=block_n, BLOCK_C=block_c,
            num_warps=MHC_POST["num_warps"])
        ctx.save_for_backward(h, f, post, res)
        return out

    @staticmethod
    def backward(ctx, d_out):
        h, f, post, res = ctx.saved_tensors
        N, n, C = h.shape
        dh, df = torch.empty_like(h), torch.empty_like(f)
        d_post = torch.empty(N, n, device=h.device, dtype=torch.float32)
        d_res = torch.empty(N, n, n, device=h.device, dtype=torch.float32)
        block_n, block_c = MHC_POST["bwd_block_n"], MHC_POST["bwd_block_c"]
        _post_res_bwd_kernel[(triton.cdiv(N, block_n),)](
            h, f, post, res, d_out.contiguous(), dh, df, d_post, d_res, N, C, N_STREAMS=n, BLOCK_N=block_n,
            BLOCK_C=block_c, num_warps=MHC_POST["bwd_num_warps"])
        return dh, df, d_post, d_res


def mhc_post_res_supports(n: int) -> bool:
    """Whether mhc_post_res takes n streams: a power of 2 (a tile holds all n streams of a token)."""
    return n & (n - 1) == 0


def mhc_post_res(h, f, post, res):
    """h (B, T, n, C), f (B, T, C), post (B, T, n), res (B, T, n, n) -> res h + post^T f (B, T, n, C).
    Reference: mhc.write_back."""
    _check_streams("mhc_post_res", h)
    B, T, n, C = h.shape
    if not mhc_post_res_supports(n):
        raise ValueError(f"mhc_post_res kernel: n must be a power of 2 (got {n}); use the plain path")
    _check("h", h)
    _runnable(h, "mhc_post_res")
    _check("f", f, (B, T, C))
    _check("post", post, (B, T, n))
    _check("res", res, (B, T, n, n))
    N = B * T
    out = PostResFunction.apply(h.reshape(N, n, C).contiguous(), f.reshape(N, C).to(h.dtype).contiguous(),
                                post.reshape(N, n).float().contiguous(), res.reshape(N, n, n).float().contiguous())
    return out.view(B, T, n, C)


# ----------------------------------------------------------------------------------------------------
# Linearity (linearity.py): the centred cross-Gram of a batch of hidden states, and the cosine regulariser


if HAVE_TRITON:
    @triton.jit
    def _add_compensated(total, carry, term):
        # Knuth's TwoSum: total + carry tracks the running sum with the rounding error of every addition
        # kept in carry, so thousands of fp32 additions lose no more than one
        new = total + term
        back = new - total
        carry += (total - (new - back)) + (term - back)
        return new, carry

    @triton.jit
    def _cross_gram_kernel(x_ptr, y_ptr, mx_ptr, md_ptr, out_ptr, tdd_ptr, N, D, rows_per_split,
                           BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        # One (BLOCK, BLOCK) tile of [Xc^T Xc | Xc^T Dc] (D, 2D), Dc = Yc - Xc, over one slice of the token
        # rows. Centring happens on the tile as it is loaded: no centred copy of X or Y is ever written.
        pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_col = tl.cdiv(D, BLOCK)
        is_d = pid_n >= n_col  # columns [0, D) of the output hold Xc^T Xc, [D, 2D) hold Xc^T Dc
        col_block = pid_n % n_col
        rm = pid_m * BLOCK + tl.arange(0, BLOCK)
        rn = col_block * BLOCK + tl.arange(0, BLOCK)
        m_ok, n_ok = rm < D, rn < D
        mean_m = tl.load(mx_ptr + rm, mask=m_ok, other=0.0)
        mean_xn = tl.load(mx_ptr + rn, mask=n_ok, other=0.0)
        mean_dn = tl.load(md_ptr + rn, mask=n_ok, other=0.0)
        acc, acc_carry = tl.zeros((BLOCK, BLOCK), dtype=tl.float32), tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        sq, sq_carry = tl.zeros((BLOCK,), dtype=tl.float32), tl.zeros((BLOCK,), dtype=tl.float32)  # sum of dc^2
        start = split * rows_per_split
        stop = tl.minimum(start + rows_per_split, N)
        y_cols = tl.where(is_d, D, 0)  # Y is read only by the tiles of Xc^T Dc
        # Xc^T Xc is symmetric: tiles below its diagonal do no work (the wrapper mirrors the upper ones)
        stop = tl.where(is_d | (col_block >= pid_m), stop, start)
        for k0 in range(start, stop, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < stop
            tile_m, tile_n = k_ok[:, None] & m_ok[None, :], k_ok[:, None] & n_ok[None, :]
            xm = tl.load(x_ptr + rk[:, None] * D + rm[None, :], mask=tile_m, other=0.0).to(tl.float32)
            xn = tl.load(x_ptr + rk[:, None] * D + rn[None, :], mask=tile_n, other=0.0).to(tl.float32)
            # centre; rows and columns outside the matrix must stay exactly 0
            xm = tl.where(tile_m, xm - mean_m[None, :], 0.0)
            # branch-free, so that the loop's loads can be pipelined
            yn = tl.load(y_ptr + rk[:, None] * D + rn[None, :], mask=k_ok[:, None] & (rn < y_cols)[None, :],
                         other=0.0).to(tl.float32)
            # dc = (y - x) - mean(y - x): y - x first, so that no digits are lost to the two means
            zn = tl.where(tile_n, tl.where(is_d, (yn - xn) - mean_dn[None, :], xn - mean_xn[None, :]), 0.0)
            sq, sq_carry = _add_compensated(sq, sq_carry, tl.sum(zn * zn, axis=0))
            # fp32-accurate products (not plain TF32: 1 - LS can be ~1e-3, TF32's relative error is ~1e-3)
            acc, acc_carry = _add_compensated(acc, acc_carry, tl.dot(tl.trans(xm), zn, input_precision=DOT))
        tl.store(out_ptr + split * D * 2 * D + rm[:, None] * (2 * D) + pid_n // n_col * D + rn[None, :],
                 acc + acc_carry, mask=m_ok[:, None] & n_ok[None, :])
        if is_d and pid_m == 0:
            tl.store(tdd_ptr + split * D + rn, sq + sq_carry, mask=n_ok)

    @triton.jit
    def _cosine_fwd_kernel(a_ptr, b_ptr, cos_ptr, N, D, eps, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)
        ok = (rows < N)[:, None] & (cols < D)[None, :]
        a = tl.load(a_ptr + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        # cos = <a, b> / (max(|a|, eps) max(|b|, eps)), one read of each row
        na = tl.maximum(tl.sqrt(tl.sum(a * a, axis=1)), eps)
        nb = tl.maximum(tl.sqrt(tl.sum(b * b, axis=1)), eps)
        tl.store(cos_ptr + rows, tl.sum(a * b, axis=1) / (na * nb), mask=rows < N)

    @triton.jit
    def _cosine_bwd_kernel(a_ptr, b_ptr, g_ptr, da_ptr, db_ptr, N, D, eps,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)
        ok = (rows < N)[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        a = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows, mask=rows < N, other=0.0)
        la, lb = tl.sqrt(tl.sum(a * a, axis=1)), tl.sqrt(tl.sum(b * b, axis=1))
        na, nb = tl.maximum(la, eps), tl.maximum(lb, eps)
        cos = tl.sum(a * b, axis=1) / (na * nb)
        # dcos/da = b / (|a||b|) - cos a / |a|^2 (the second term is absent where the norm is clamped to eps)
        ca = tl.where(la > eps, cos / (na * na), 0.0)
        cb = tl.where(lb > eps, cos / (nb * nb), 0.0)
        inv = 1.0 / (na * nb)
        da = g[:, None] * (b * inv[:, None] - a * ca[:, None])
        db = g[:, None] * (a * inv[:, None] - b * cb[:, None])
        tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=ok)
        tl.store(db_ptr + offs, db.to(db_ptr.dtype.element_ty), mask=ok)


# Launch settings of the cross-Gram kernel: output tile, token rows per step, warps, the programs aimed at
# (the token rows are split over enough programs to fill the GPU, as the output has only 1.5 (D / block)^2
# tiles; each split's sum is added in float64), and dot, the tile products' precision: "ieee" (fp32 FMAs)
# or "tf32x3" (three TF32 tensor-core products, ~fp32 accurate). The fastest of a sweep at 8192 x 384 fp32
# in which every setting's scores agreed with float64 to 2e-8 (`python bench.py linearity --set
# CROSS_GRAM.block=32`). It buys accuracy per byte: where float64 matmuls run at full rate, torch's float64
# path is as fast.
CROSS_GRAM = {"block": 64, "block_k": 32, "num_warps": 4, "programs": 528, "dot": "ieee"}


def centred_cross_gram(x: torch.Tensor, y: torch.Tensor):
    """One batch's sufficient statistics for the linearity score, centred on the batch's own means, for
    the pair (X, D = Y - X): mean_x, mean_y (D,), C_xx = Xc^T Xc, C_xd = Xc^T Dc (D, D), t_dd = ||Dc||_F^2,
    float64 (the kernel's tiles are fp32 sums of fp32 products). x, y (N, D) in fp32/bf16/fp16.

    Why D and not Y: LS_wo divides by t_dd = ||Yc - Xc||^2, which can be 1% of ||Yc||^2; forming it from
    fp32 sums over Y would cancel away two digits. linearity.PairStats.update turns these into its
    (C_xy, t_yy) in float64 (C_xy = C_xd + C_xx) and merges batches there (Chan's update).
    Reference: the float64 branch of linearity.PairStats.update (use_kernel=False)."""
    _runnable(x, "centred_cross_gram")
    _check("x", x)
    if x.dim() != 2:
        raise ValueError(f"centred_cross_gram: x must be (N, D), got shape {tuple(x.shape)}")
    _check("y", y, x.shape, (x.dtype,))
    x, y = x.contiguous(), y.contiguous()
    N, D = x.shape
    mx, my = x.mean(0, dtype=torch.float64), y.mean(0, dtype=torch.float64)
    # the kernel centres on fp32 roundings of the means (of X and of D); corrected below
    mx32, md32 = mx.float(), (my - mx).float()
    cfg = CROSS_GRAM
    nb = triton.cdiv(D, cfg["block"])
    tiles = nb * 2 * nb
    splits = max(1, min(triton.cdiv(N, 4 * cfg["block_k"]), triton.cdiv(cfg["programs"], tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(N, splits), cfg["block_k"]) * cfg["block_k"]
    splits = triton.cdiv(N, rows_per_split)
    out = torch.empty(splits, D, 2 * D, device=x.device, dtype=torch.float32)
    tdd = torch.empty(splits, D, device=x.device, dtype=torch.float32)
    _cross_gram_kernel[(nb, 2 * nb, splits)](x, y, mx32, md32, out, tdd, N, D, rows_per_split,
                                              BLOCK=cfg["block"], BLOCK_K=cfg["block_k"], DOT=cfg["dot"],
                                              num_warps=cfg["num_warps"])
    out = out.sum(0, dtype=torch.float64)
    # only the tiles on and above the diagonal of Xc^T Xc were computed; they hold every entry (i <= j)
    cxx = torch.triu(out[:, :D]) + torch.triu(out[:, :D], 1).T
    # sums of outer products about a point m' instead of the mean m: sum (a - m')(b - m')^T
    # = sum (a - m)(b - m)^T + N (m - m')(m - m')^T, so subtract N delta delta^T
    dx, dd = mx - mx32.double(), (my - mx) - md32.double()
    cxx -= N * torch.outer(dx, dx)
    cxd = out[:, D:] - N * torch.outer(dx, dd)
    return mx, my, cxx, cxd, tdd.sum(dtype=torch.float64) - N * (dd * dd).sum()


# Rows per program of the cosine kernels: as many whole rows (one read of each) as fit a tile of about
# `tile` elements, at most max_rows; not swept (`python bench.py linearity --set COSINE.tile=8192`).
COSINE = {"tile": 4096, "max_rows": 64}


class CosineFunction(torch.autograd.Function):
    """Per-row cosine similarity of a, b (N, D) -> (N,) fp32, with the norms clamped to eps as in
    torch.nn.functional.cosine_similarity. The backward reads a and b once more instead of saving norms."""

    @staticmethod
    def forward(ctx, a, b, eps):
        N, D = a.shape
        block_d = triton.next_power_of_2(D)
        block_t = max(1, min(COSINE["max_rows"], COSINE["tile"] // block_d))
        cos = torch.empty(N, device=a.device, dtype=torch.float32)
        _cosine_fwd_kernel[(triton.cdiv(N, block_t),)](a, b, cos, N, D, eps, BLOCK_T=block_t, BLOCK_D=block_d)
        ctx.save_for_backward(a, b)
        ctx.eps, ctx.blocks = eps, (block_t, block_d)
        return cos

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        N, D = a.shape
        block_t, block_d = ctx.blocks
        da, db = torch.empty_like(a), torch.empty_like(b)
        _cosine_bwd_kernel[(triton.cdiv(N, block_t),)](a, b, g.contiguous(), da, db, N, D, ctx.eps,
                                                        BLOCK_T=block_t, BLOCK_D=block_d)
        return da, db, None


def cosine_regulariser(hidden: list[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """sum over consecutive pairs of hidden states (..., D) of the token mean of 1 - cos(h_{i-1}, h_i);
    one fused read of each pair forward and one backward. Reference: linearity.cosine_regulariser."""
    total = 0.0
    for a, b in zip(hidden[:-1], hidden[1:]):
        _runnable(a, "cosine_regulariser")
        _check("hidden", a)
        _check("hidden", b, a.shape, (a.dtype,))
        if a.size(-1) > 16384:
            raise ValueError(f"cosine_regulariser: hidden size {a.size(-1)} > 16384 (one row per tile)")
        a2, b2 = a.reshape(-1, a.size(-1)).contiguous(), b.reshape(-1, b.size(-1)).contiguous()
        total = total + (1 - CosineFunction.apply(a2, b2, eps)).mean()
    return total


# ----------------------------------------------------------------------------------------------------
# Tensor Product Attention (tpa.py): Q/K/V built from factors (training), decoding over the factor cache


if HAVE_TRITON:
    @triton.jit
    def _tpa_rope(b1, b2, cos, sin, ROTATE: tl.constexpr, INVERSE: tl.constexpr):
        # half-split RoPE: [b1, b2] -> [b1 cos - b2 sin, b2 cos + b1 sin]; INVERSE rotates back
        # (the transposed rotation, which is what the backward needs)
        if ROTATE:
            if INVERSE:
                return b1 * cos + b2 * sin, b2 * cos - b1 * sin
            return b1 * cos - b2 * sin, b2 * cos + b1 * sin
        return b1, b2

    @triton.jit
    def _tpa_tables(cos_ptr, sin_ptr, pos, dd, ok, D2, ROTATE: tl.constexpr):
        # cos and sin of the rotation angles at positions pos (BLOCK_T,) for the d/2 frequencies
        if ROTATE:
            cos = tl.load(cos_ptr + pos[:, None] * D2 + dd[None, :], mask=ok, other=1.0)
            sin = tl.load(sin_ptr + pos[:, None] * D2 + dd[None, :], mask=ok, other=0.0)
        else:
            cos = tl.full(ok.shape, 1.0, tl.float32)
            sin = tl.zeros(ok.shape, tl.float32)
        return cos, sin

    @triton.jit
    def _tpa_product_fwd_kernel(a_ptr, b_ptr, cos_ptr, sin_ptr, out_ptr, T, H, D2, start_pos, a_row, b_row,
                                inv_r, R: tl.constexpr, ROTATE: tl.constexpr, BLOCK_T: tl.constexpr,
                                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        # out[b, :, t, :] = (1/R) sum_r a_r (outer) RoPE_t(b_r) for BLOCK_T tokens of sequence b, written
        # straight into SDPA's (B, h, T, d) layout; the two halves of d are kept apart for the rotation
        pid_t, pid_b = tl.program_id(0), tl.program_id(1)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        hh, dd = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
        t_ok, h_ok, d_ok = t < T, hh < H, dd < D2
        row = pid_b * T + t
        td = t_ok[:, None] & d_ok[None, :]
        cos, sin = _tpa_tables(cos_ptr, sin_ptr, start_pos + t, dd, td, D2, ROTATE)
        acc1 = tl.zeros((BLOCK_T, BLOCK_H, BLOCK_D), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_T, BLOCK_H, BLOCK_D), dtype=tl.float32)
        for r in tl.static_range(R):
            a = tl.load(a_ptr + row[:, None] * a_row + r * H + hh[None, :], mask=t_ok[:, None] & h_ok[None, :],
                        other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_H)
            b1 = tl.load(b_ptr + row[:, None] * b_row + r * 2 * D2 + dd[None, :], mask=td, other=0.0).to(tl.float32)
            b2 = tl.load(b_ptr + row[:, None] * b_row + r * 2 * D2 + D2 + dd[None, :], mask=td,
                         other=0.0).to(tl.float32)
            b1, b2 = _tpa_rope(b1, b2, cos, sin, ROTATE, False)
            acc1 += a[:, :, None] * b1[:, None, :]
            acc2 += a[:, :, None] * b2[:, None, :]
        offs = ((pid_b * H + hh)[None, :, None] * T + t[:, None, None]) * (2 * D2) + dd[None, None, :]
        ok = t_ok[:, None, None] & h_ok[None, :, None] & d_ok[None, None, :]
        tl.store(out_ptr + offs, (acc1 * inv_r).to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(out_ptr + offs + D2, (acc2 * inv_r).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _tpa_product_bwd_kernel(g_ptr, a_ptr, b_ptr, cos_ptr, sin_ptr, da_ptr, db_ptr, T, H, D2, start_pos,
                                a_row, b_row, inv_r, R: tl.constexpr, ROTATE: tl.constexpr,
                                BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        # dA_r = (1/R) G RoPE(b_r),  dRoPE(b_r) = (1/R) a_r^T G,  db_r = RoPE^-1(dRoPE(b_r)); G read once
        pid_t, pid_b = tl.program_id(0), tl.program_id(1)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        hh, dd = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
        t_ok, h_ok, d_ok = t < T, hh < H, dd < D2
        row = pid_b * T + t
        td, th = t_ok[:, None] & d_ok[None, :], t_ok[:, None] & h_ok[None, :]
        cos, sin = _tpa_tables(cos_ptr, sin_ptr, start_pos + t, dd, td, D2, ROTATE)
        offs = ((pid_b * H + hh)[None, :, None] * T + t[:, None, None]) * (2 * D2) + dd[None, None, :]
        ok = t_ok[:, None, None] & h_ok[None, :, None] & d_ok[None, None, :]
        g1 = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_H, BLOCK_D)
        g2 = tl.load(g_ptr + offs + D2, mask=ok, other=0.0).to(tl.float32)
        for r in tl.static_range(R):
            a = tl.load(a_ptr + row[:, None] * a_row + r * H + hh[None, :], mask=th, other=0.0).to(tl.float32)
            b1 = tl.load(b_ptr + row[:, None] * b_row + r * 2 * D2 + dd[None, :], mask=td, other=0.0).to(tl.float32)
            b2 = tl.load(b_ptr + row[:, None] * b_row + r * 2 * D2 + D2 + dd[None, :], mask=td,
                         other=0.0).to(tl.float32)
            b1, b2 = _tpa_rope(b1, b2, cos, sin, ROTATE, False)
            da = (tl.sum(g1 * b1[:, None, :], axis=2) + tl.sum(g2 * b2[:, None, :], axis=2)) * inv_r
            db1 = tl.sum(g1 * a[:, :, None], axis=1) * inv_r
            db2 = tl.sum(g2 * a[:, :, None], axis=1) * inv_r
            db1, db2 = _tpa_rope(db1, db2, cos, sin, ROTATE, True)
            tl.store(da_ptr + row[:, None] * (R * H) + r * H + hh[None, :], da.to(da_ptr.dtype.element_ty), mask=th)
            tl.store(db_ptr + row[:, None] * (R * 2 * D2) + r * 2 * D2 + dd[None, :],
                     db1.to(db_ptr.dtype.element_ty), mask=td)
            tl.store(db_ptr + row[:, None] * (R * 2 * D2) + r * 2 * D2 + D2 + dd[None, :],
                     db2.to(db_ptr.dtype.element_ty), mask=td)

    @triton.jit
    def _tpa_decode_kernel(q_ptr, ak_ptr, bk_ptr, av_ptr, bv_ptr, o_ptr, m_ptr, l_ptr, len_ptr, H, D,
                           cache_ak, cache_bk, cache_av, cache_bv, blocks_per_split,
                           # a constant, not an argument: torch.compile passes a Python float as fp64, and
                           # logits * fp64 would leave the fp32 softmax
                           scale: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
        # One sequence, one slice of its cache: logits of every head against the cached tokens straight
        # from the factors, an online softmax in fp32, and the unnormalised output of the slice.
        pid_b, split = tl.program_id(0), tl.program_id(1)
        n_splits = tl.num_programs(1)
        M = tl.load(len_ptr)  # cached tokens: a slice past them loops zero times and leaves m = -inf, l = 0
        hh, dd = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
        h_ok, d_ok = hh < H, dd < D
        q = tl.load(q_ptr + pid_b * H * D + hh[:, None] * D + dd[None, :], mask=h_ok[:, None] & d_ok[None, :],
                    other=0.0)  # (BLOCK_H, BLOCK_D), already rotated
        m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
        first = split * blocks_per_split
        last = tl.minimum(first + blocks_per_split, tl.cdiv(M, BLOCK_M))
        for blk in range(first, last):
            mm = blk * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = mm < M
            mh, md = m_ok[:, None] & h_ok[None, :], m_ok[:, None] & d_ok[None, :]
            # logits[m, head] = q_head . K[m, head] = (1/R_K) sum_s a_K[m, s, head] (b_K[m, s] . q_head)
            logits = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            for s in tl.static_range(RK):
                bk = tl.load(bk_ptr + pid_b * cache_bk + mm[:, None] * (RK * D) + s * D + dd[None, :], mask=md,
                             other=0.0)
                ak = tl.load(ak_ptr + pid_b * cache_ak + mm[:, None] * (RK * H) + s * H + hh[None, :], mask=mh,
                             other=0.0).to(tl.float32)
                logits += ak * tl.dot(bk, tl.trans(q.to(bk.dtype)), input_precision=DOT)  # (BLOCK_M, BLOCK_H)
            logits = tl.where(m_ok[:, None], logits * scale, float("-inf"))
            # online softmax over the cache, per head
            m_new = tl.maximum(m_i, tl.max(logits, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(logits - m_new[None, :])  # (BLOCK_M, BLOCK_H)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha[:, None]
            # out[head] += sum_m p[m, head] V[m, head] = sum_u (p * a_V[:, u])^T b_V[:, u]   (1/R_V later)
            for u in tl.static_range(RV):
                av = tl.load(av_ptr + pid_b * cache_av + mm[:, None] * (RV * H) + u * H + hh[None, :], mask=mh,
                             other=0.0).to(tl.float32)
                bv = tl.load(bv_ptr + pid_b * cache_bv + mm[:, None] * (RV * D) + u * D + dd[None, :], mask=md,
                             other=0.0)
                acc += tl.dot(tl.trans((p * av).to(bv.dtype)), bv, input_precision=DOT)  # (BLOCK_H, BLOCK_D)
            m_i = m_new
        part = pid_b * n_splits + split
        tl.store(o_ptr + part * BLOCK_H * BLOCK_D + hh[:, None] * BLOCK_D + dd[None, :], acc)
        tl.store(m_ptr + part * BLOCK_H + hh, m_i)
        tl.store(l_ptr + part * BLOCK_H + hh, l_i)

    @triton.jit
    def _tpa_decode_reduce_kernel(o_ptr, m_ptr, l_ptr, out_ptr, H, D, n_splits, inv_rv,
                                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        # combine the slices: out = sum_s e^(m_s - m) o_s / sum_s e^(m_s - m) l_s, m = max_s m_s
        pid_b = tl.program_id(0)
        hh, dd = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
        m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        for s in range(n_splits):
            m = tl.maximum(m, tl.load(m_ptr + (pid_b * n_splits + s) * BLOCK_H + hh))
        num = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
        den = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for s in range(n_splits):
            part = pid_b * n_splits + s
            w = tl.exp(tl.load(m_ptr + part * BLOCK_H + hh) - m)  # 0 for a slice that saw no token
            den += w * tl.load(l_ptr + part * BLOCK_H + hh)
            num += w[:, None] * tl.load(o_ptr + part * BLOCK_H * BLOCK_D + hh[:, None] * BLOCK_D + dd[None, :])
        out = num / den[:, None] * inv_rv
        tl.store(out_ptr + pid_b * H * D + hh[:, None] * D + dd[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(hh < H)[:, None] & (dd < D)[None, :])


# Tiles of the factor-product kernels: tokens per program (at most 16) such that a (tokens, h, d/2) tile holds
# about fwd_tile (forward) or bwd_tile (backward) elements; warps. The fastest of 18 settings at the default
# model's shape (`python bench.py tpa --set TPA_PRODUCT.bwd_tile=1024`).
TPA_PRODUCT = {"fwd_tile": 2048, "bwd_tile": 512, "num_warps": 4}


def _tpa_blocks(h: int, half_d: int, budget: int):
    block_h, block_d = triton.next_power_of_2(h), triton.next_power_of_2(half_d)
    return max(1, min(16, budget // (block_h * block_d))), block_h, block_d


class TPAProductFunction(torch.autograd.Function):
    """Equals tpa.factor_product(a, RoPE(b)).transpose(1, 2): a (B, T, R, h), b (B, T, R, d) -> (B, h, T, d)."""

    @staticmethod
    def forward(ctx, a, b, cos, sin, start_pos, rotate):
        B, T, R, H = a.shape
        D = b.size(3)
        out = torch.empty(B, H, T, D, device=a.device, dtype=a.dtype)
        bt, bh, bd = _tpa_blocks(H, D // 2, TPA_PRODUCT["fwd_tile"])
        _tpa_product_fwd_kernel[(triton.cdiv(T, bt), B)](a, b, cos, sin, out, T, H, D // 2, start_pos, a.stride(1),
                                                         b.stride(1), 1.0 / R, R=R, ROTATE=rotate, BLOCK_T=bt,
                                                         BLOCK_H=bh, BLOCK_D=bd, num_warps=TPA_PRODUCT["num_warps"])
        ctx.save_for_backward(a, b, cos, sin)
        ctx.start_pos, ctx.rotate = start_pos, rotate
        return out

    @staticmethod
    def backward(ctx, g):
        a, b, cos, sin = ctx.saved_tensors
        B, T, R, H = a.shape
        D = b.size(3)
        da = torch.empty(B, T, R, H, device=a.device, dtype=a.dtype)
        db = torch.empty(B, T, R, D, device=a.device, dtype=b.dtype)
        bt, bh, bd = _tpa_blocks(H, D // 2, TPA_PRODUCT["bwd_tile"])
        _tpa_product_bwd_kernel[(triton.cdiv(T, bt), B)](g.contiguous(), a, b, cos, sin, da, db, T, H, D // 2,
                                                         ctx.start_pos, a.stride(1), b.stride(1), 1.0 / R, R=R,
                                                         ROTATE=ctx.rotate, BLOCK_T=bt, BLOCK_H=bh, BLOCK_D=bd,
                                                         num_warps=TPA_PRODUCT["num_warps"])
        return da, db, None, None, None, None


def tpa_supports(heads: int, head_dim: int) -> bool:
    """Whether tpa_factor_product and tpa_decode both take this head shape (their tiles: up to 256 heads of
    an even width up to 256)."""
    return heads <= 256 and head_dim <= 256 and head_dim % 2 == 0


def tpa_factor_product(a: torch.Tensor, b: torch.Tensor, cos: torch.Tensor | None = None,
                       sin: torch.Tensor | None = None, start_pos: int = 0) -> torch.Tensor:
    """(1/R) sum_r a_r (outer) RoPE(b_r), written in SDPA's (B, h, T, d) layout, forward and backward.
    a (B, T, R, h), b (B, T, R, d): views of the factor projections are fine (each token's R x h, R x d
    block contiguous). cos, sin (max_len, d/2) fp32 (train.Rotary's tables) rotate b at positions
    start_pos ..; None for values (no RoPE). Reference: tpa.factor_product(a, rotary(b)).transpose(1, 2)."""
    _runnable(a, "tpa_factor_product")
    _check("a", a)
    if a.dim() != 4 or b.dim() != 4 or a.shape[:3] != b.shape[:3]:
        raise ValueError(f"tpa_factor_product: a (B, T, R, h) and b (B, T, R, d) expected, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    _check("b", b, dtypes=(a.dtype,))
    B, T, R, H = a.shape
    D = b.size(3)
    if D % 2 or H > 256 or D > 512:
        raise ValueError(f"tpa_factor_product: needs an even head width <= 512 and <= 256 heads (got d={D}, h={H})")
    for name, t in (("a", a), ("b", b)):
        if t.stride(3) != 1 or t.stride(2) != t.size(3) or t.stride(0) != T * t.stride(1):
            raise ValueError(f"tpa_factor_product: {name}'s rank and feature axes must be contiguous within a "
                             f"token and its tokens evenly spaced (got strides {t.stride()})")
    rotate = cos is not None
    if rotate:
        _check("cos", cos, dtypes=(torch.float32,))
        _check("sin", sin, cos.shape, (torch.float32,))
        if cos.dim() != 2 or cos.size(1) != D // 2 or start_pos + T > cos.size(0):
            raise ValueError(f"tpa_factor_product: RoPE tables {tuple(cos.shape)} do not cover positions "
                             f"{start_pos}..{start_pos + T - 1} at d/2 = {D // 2}")
    else:
        cos = sin = torch.empty(1, device=a.device, dtype=torch.float32)
    return TPAProductFunction.apply(a, b, cos.contiguous(), sin.contiguous(), start_pos, rotate)


# Decode launch settings: cached tokens per tile, warps, pipeline stages, and the programs aimed at (the cache
# of each sequence is split into slices so that a small batch still fills the GPU; the slices are combined
# by their maxima). The fastest of 72 settings at B 16, h 12, d 64, ranks (6, 2, 2), 64K cached tokens
# (`python bench.py tpa --set TPA_DECODE.block_m=64`).
TPA_DECODE = {"block_m": 128, "num_warps": 8, "num_stages": 2, "programs": 264}


def tpa_decode(q: torch.Tensor, a_k: torch.Tensor, b_k: torch.Tensor, a_v: torch.Tensor, b_v: torch.Tensor,
               length: int | torch.Tensor) -> torch.Tensor:
    """Attention of one new token per sequence over a factorised cache, never forming K or V:
    q (B, h, d) rotated; cache a_k (B, L, R_K, h), b_k (B, L, R_K, d) (pre-rotated), a_v (B, L, R_V, h),
    b_v (B, L, R_V, d) with the first `length` positions filled -> (B, h, d) in q's dtype. Reads
    (R_K + R_V)(h + d) numbers per cached token instead of MHA's 2 h d. Reference: the decode step of
    tpa.TPAttention.forward: K = factor_product(a_k, b_k), V likewise, then softmax(q K^T / sqrt(d)) V per
    head over the first `length` positions. length: an int, or a one-element integer tensor on q's device
    (read by the kernel, so that one captured CUDA graph serves every length; the launch then covers all
    L positions and the programs past `length` return at once; it must lie in 1..L, unchecked)."""
    _runnable(q, "tpa_decode")
    _check("q", q)
    if q.dim() != 3:
        raise ValueError(f"tpa_decode: q must be (B, h, d), got shape {tuple(q.shape)}")
    B, H, D = q.shape
    L = a_k.size(1)
    rk, rv = a_k.size(2), a_v.size(2)
    _check("a_k", a_k, (B, L, rk, H), (q.dtype,))
    _check("b_k", b_k, (B, L, rk, D), (q.dtype,))
    _check("a_v", a_v, (B, L, rv, H), (q.dtype,))
    _check("b_v", b_v, (B, L, rv, D), (q.dtype,))
    if isinstance(length, torch.Tensor):
        if length.numel() != 1 or length.dtype not in (torch.int32, torch.int64) or length.device != q.device:
            raise ValueError(f"tpa_decode: a tensor length must be one integer on {q.device}, got "
                             f"{length.dtype} of shape {tuple(length.shape)} on {length.device}")
        length_t, launch_len = length.reshape(1), L
    elif not 1 <= length <= L:
        raise ValueError(f"tpa_decode: length {length} outside the cache's 1..{L} positions")
    else:
        length_t, launch_len = torch.full((1,), length, device=q.device, dtype=torch.int64), length
    if H > 256 or D > 256:
        raise ValueError(f"tpa_decode: supports up to 256 heads of width <= 256 (got h={H}, d={D})")
    q, a_k, b_k, a_v, b_v = (t.contiguous() for t in (q, a_k, b_k, a_v, b_v))
    cfg = TPA_DECODE
    block_h, block_d = max(16, triton.next_power_of_2(H)), max(16, triton.next_power_of_2(D))  # tl.dot needs 16
    n_blocks = triton.cdiv(launch_len, cfg["block_m"])
    per_split = triton.cdiv(n_blocks, max(1, min(n_blocks, triton.cdiv(cfg["programs"], B))))
    splits = triton.cdiv(n_blocks, per_split)  # every slice holds at least one token
    o = torch.empty(B, splits, block_h, block_d, device=q.device, dtype=torch.float32)
    m = torch.empty(B, splits, block_h, device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    _tpa_decode_kernel[(B, splits)](q, a_k, b_k, a_v, b_v, o, m, l_sum, length_t, H, D, a_k.stride(0), b_k.stride(0),
                                    a_v.stride(0), b_v.stride(0), per_split, scale=1.0 / (rk * D ** 0.5), RK=rk, RV=rv,
                                    BLOCK_M=cfg["block_m"], BLOCK_H=block_h, BLOCK_D=block_d,
                                    DOT="ieee" if q.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"],
                                    num_stages=cfg["num_stages"])
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    _tpa_decode_reduce_kernel[(B,)](o, m, l_sum, out, H, D, splits, 1.0 / rv, BLOCK_H=block_h, BLOCK_D=block_d)
    return out


# ----------------------------------------------------------------------------------------------------
# Hyena (hyena.py): the short conv, the causal long convolution with its skip and gate, the implicit filters
#
# Layout: the long convolution works on (B, C, L) tensors, time contiguous; the short-conv kernel writes
# that layout from the in_proj output (B, L, K), so the transpose costs nothing extra.

# The short conv's (time, channels) tiles and warps; bwd_ the backward's (one launch per stream). The fastest
# of 18 (forward) and 24 (backward) settings at (B, L, K) = (1, 4096, 2304) and the training shape
# (64, 512, 1152) (`python bench.py hyena --set HYENA_SHORT_CONV.block_t=64`: the whole Hyena operator).
HYENA_SHORT_CONV = {"block_t": 128, "block_k": 32, "num_warps": 4, "bwd_block_t": 128, "bwd_block_k": 32,
                    "bwd_num_warps": 4}

if HAVE_TRITON:
    @triton.jit
    def _short_conv_fwd_kernel(p_ptr, w_ptr, b_ptr, out_ptr, L, K, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[b, k, t] = w[k, 0] p[b, t-2, k] + w[k, 1] p[b, t-1, k] + w[k, 2] p[b, t, k] + bias[k]."""
        ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        b = tl.program_id(2)
        kmask = ks < K
        acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32) + tl.load(b_ptr + ks, mask=kmask, other=0.0)[None, :]
        for j in tl.static_range(3):
            src = ts - 2 + j  # the causal taps; src < 0 is the zero padding
            pv = tl.load(p_ptr + b * L * K + src[:, None] * K + ks[None, :],
                         mask=((src >= 0) & (src < L))[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            acc += tl.load(w_ptr + ks * 3 + j, mask=kmask, other=0.0)[None, :] * pv
        tl.store(out_ptr + b * K * L + ks[None, :] * L + ts[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=(ts < L)[:, None] & kmask[None, :])

    @triton.jit
    def _short_conv_bwd_kernel(p_ptr, w_ptr, g_ptr, dp_ptr, part_ptr, L, K, k0, KS, BLOCK_T: tl.constexpr,
                               BLOCK_K: tl.constexpr):
        """For the stream of channels k0 + (0..KS), g = its output's gradient (B, KS, L):
        dp[b, t, k] = sum_j w[k, j] g[b, k, t + 2 - j]; per-program partial sums of dw and dbias, stored
        as part[program, k] = (dw_0, dw_1, dw_2, dbias) (the wrapper adds the programs: no atomics)."""
        ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # channels within the stream
        ks = k0 + cs  # channels of p
        b = tl.program_id(2)
        kmask = cs < KS
        tmask = ts < L
        g = tl.load(g_ptr + b * KS * L + cs[None, :] * L + ts[:, None], mask=tmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_K)
        dp = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        part = ((b * tl.num_programs(0) + tl.program_id(0)) * K + ks) * 4
        for j in tl.static_range(3):
            dst = ts + 2 - j  # the output this tap of p[t] fed
            gj = tl.load(g_ptr + b * KS * L + cs[None, :] * L + dst[:, None],
                         mask=(dst < L)[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            dp += tl.load(w_ptr + ks * 3 + j, mask=kmask, other=0.0)[None, :] * gj
            src = ts - 2 + j
            pv = tl.load(p_ptr + b * L * K + src[:, None] * K + ks[None, :],
                         mask=((src >= 0) & (src < L))[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            tl.store(part_ptr + part + j, tl.sum(g * pv, axis=0), mask=kmask)
        tl.store(part_ptr + part + 3, tl.sum(g, axis=0), mask=kmask)
        tl.store(dp_ptr + b * L * K + ts[:, None] * K + ks[None, :], dp.to(dp_ptr.dtype.element_ty),
                 mask=tmask[:, None] & kmask[None, :])


class ShortConvFunction(torch.autograd.Function):
    """Equals hyena.short_conv(p, weight, bias).chunk(streams, dim=1): p (B, L, K) -> `streams` outputs
    (B, K / streams, L), views of one (B, K, L) buffer. Each stream's gradient is read where autograd
    leaves it (one backward launch per stream), so they are never concatenated into one (B, K, L) copy."""

    @staticmethod
    def forward(ctx, p, weight, bias, streams):
        B, L, K = p.shape
        out = torch.empty(B, K, L, device=p.device, dtype=p.dtype)
        bt, bk, warps = HYENA_SHORT_CONV["block_t"], HYENA_SHORT_CONV["block_k"], HYENA_SHORT_CONV["num_warps"]
        _short_conv_fwd_kernel[(triton.cdiv(L, bt), triton.cdiv(K, bk), B)](
            p, weight, bias, out, L, K, BLOCK_T=bt, BLOCK_K=bk, num_warps=warps)
        ctx.save_for_backward(p, weight)
        return tuple(out.chunk(streams, dim=1))

    @staticmethod
    def backward(ctx, *grads):
        p, weight = ctx.saved_tensors
        B, L, K = p.shape
        KS = K // len(grads)
        bt, bk, warps = (HYENA_SHORT_CONV[k] for k in ("bwd_block_t", "bwd_block_k", "bwd_num_warps"))
        n_t = triton.cdiv(L, bt)
        dp = torch.empty_like(p)
        part = torch.empty(B * n_t, K, 4, device=p.device, dtype=torch.float32)  # dw (3 taps), dbias
        for s, g in enumerate(grads):  # autograd materialises an unused stream's gradient as zeros
            _short_conv_bwd_kernel[(n_t, triton.cdiv(KS, bk), B)](
                p, weight, g.contiguous(), dp, part, L, K, s * KS, KS, BLOCK_T=bt, BLOCK_K=bk, num_warps=warps)
        dw, db = part.sum(0).split([3, 1], dim=1)  # (K, 3), (K, 1)
        return dp, dw.contiguous(), db.reshape(K), None


def hyena_short_conv(p: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, streams: int = 1) -> tuple:
    """p (B, L, K) -> a tuple of `streams` tensors (B, K / streams, L): the 3-tap causal depthwise conv of
    every in_proj stream, written with time last for the long convolutions, split into the streams.
    Reference: hyena.short_conv (then chunk)."""
    _runnable(p, "hyena_short_conv")
    _check("p", p)
    if p.dim() != 3:
        raise ValueError(f"hyena_short_conv: p must be (B, L, K), got shape {tuple(p.shape)}")
    if streams < 1 or p.size(2) % streams:
        raise ValueError(f"hyena_short_conv: {p.size(2)} channels do not split into {streams} streams")
    _check("weight", weight, (p.size(2), 3), (torch.float32,))
    _check("bias", bias, (p.size(2),), (torch.float32,))
    return ShortConvFunction.apply(p.contiguous(), weight.contiguous(), bias.contiguous(), streams)


# ----------------------------------------------------------------------------------------------------
# The long convolution as blocked Toeplitz matmuls (the causal conv of one channel is a lower-triangular
# Toeplitz matrix T[t, s] = h[t - s]). Cut time into blocks of S: block i of the output is
#     Y_i = sum_{m >= 0} T_m U_{i-m},    T_m[p, q] = h[m S + p - q]  (an S x S Toeplitz tile, zero for lag < 0)
# and every (block i, sequence b) pair is one column of a matmul: T_m (S x S) @ U (S x columns), so even
# B = 1 fills the tensor cores' N dimension with time blocks. T_m is built on-chip from 2S taps of h.
# O(L^2) work, like attention, but dense tensor-core tiles and one read of h: at training lengths
# (short L, many rows) it moves far fewer bytes than the FFT-based paths, which take everything else.

# Which path hyena_long_conv takes, and the Toeplitz kernel's launch settings. Toeplitz (O(L^2) work in dense
# tiles, few bytes) for L <= toeplitz_max_len with at least toeplitz_rows_per_token * L rows (B C); Monarch
# (O(L log L) in small dependent products, a fixed cost per row) for other shapes up to MONARCH["max_len"];
# the FFT path beyond. From an order-2 fwd+bwd sweep over B, C and L (kernels_sweeps.md; `python bench.py
# hyena` times the three paths side by side): Monarch wins at small batches and from L = 1024, Toeplitz with
# many rows at short L; where neither wins clearly, the Toeplitz kernel's tf32 products are the more accurate.
# block: the time block S; block_n: columns (time block, sequence) per program; warps; pipeline stages.
HYENA_CONV = {"block": 64, "block_n": 64, "num_warps": 4, "num_stages": 3, "toeplitz_max_len": 512,
              "toeplitz_rows_per_token": 32}

if HAVE_TRITON:
    @triton.jit
    def _toeplitz_kernel(a_ptr, b_ptr, h_ptr, skip_ptr, pre_ptr, out_ptr, out2_ptr, gy_ptr, Bsz, L, stride_a, stride_b,
                         REVERSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
        """Forward (REVERSE=False): a = u, b = x:      pre = T u + skip u,  out = x * pre   (out2 = pre)
        Backward (REVERSE=True): a = g = dL/dout, b = x, with gy = g * x:
                                 out = T^T gy + skip gy = dL/du,  out2 = g * pre = dL/dx, gy_out = gy.
        Program (channel d, tile of columns); column n = (time block i, sequence b) = i * Bsz + b."""
        d = tl.program_id(0)
        C = tl.num_programs(0)
        nb = tl.cdiv(L, BLOCK)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        blk, seq = cols // Bsz, cols % Bsz  # (BLOCK_N,) output block and sequence of each column
        cmask = blk < nb
        rows = tl.arange(0, BLOCK)  # time within the output block (M)
        ks = tl.arange(0, BLOCK)  # time within the source block (K)
        acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
        first_blk = (tl.program_id(1) * BLOCK_N) // Bsz
        last_blk = tl.minimum((tl.program_id(1) * BLOCK_N + BLOCK_N - 1) // Bsz, nb - 1)
        n_lags = nb - first_blk if REVERSE else last_blk + 1  # lag blocks that reach some column
        for m in range(0, n_lags):
            if REVERSE:  # dL/du_s = sum_{t >= s} h[t - s] gy_t: source block = blk + m, tile T_m^T
                lag = m * BLOCK + ks[None, :] - rows[:, None]
                src_blk = blk + m
            else:  # y_t = sum_{s <= t} h[t - s] u_s: source block = blk - m, tile T_m
                lag = m * BLOCK + rows[:, None] - ks[None, :]
                src_blk = blk - m
            tile = tl.load(h_ptr + d * L + lag, mask=(lag >= 0) & (lag < L), other=0.0)  # (BLOCK, BLOCK) fp32
            src_t = src_blk[None, :] * BLOCK + ks[:, None]  # (K, N)
            smask = cmask[None, :] & (src_blk >= 0)[None, :] & (src_t < L)
            src = tl.load(a_ptr + seq[None, :] * stride_a + d * L + src_t, mask=smask, other=0.0)
            if REVERSE:
                src = (src.to(tl.float32) * tl.load(b_ptr + seq[None, :] * stride_b + d * L + src_t, mask=smask,
                                                    other=0.0).to(tl.float32)).to(a_ptr.dtype.element_ty)
            acc += tl.dot(tile.to(src.dtype), src, input_precision=DOT)
        # epilogue at the output positions: the skip term and the gate
        t = blk[None, :] * BLOCK + rows[:, None]  # (M, N)
        omask = cmask[None, :] & (t < L)
        offs_c = d * L + t
        skip = tl.load(skip_ptr + d)
        a_own = tl.load(a_ptr + seq[None, :] * stride_a + offs_c, mask=omask, other=0.0).to(tl.float32)
        b_own = tl.load(b_ptr + seq[None, :] * stride_b + offs_c, mask=omask, other=0.0).to(tl.float32)
        offs_out = seq[None, :] * (C * L) + offs_c
        if REVERSE:
            gy = a_own * b_own
            pre = tl.load(pre_ptr + offs_out, mask=omask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_out, (acc + skip * gy).to(out_ptr.dtype.element_ty), mask=omask)
            tl.store(out2_ptr + offs_out, (a_own * pre).to(out2_ptr.dtype.element_ty), mask=omask)
            tl.store(gy_ptr + offs_out, gy.to(gy_ptr.dtype.element_ty), mask=omask)  # for the dh kernel
        else:
            pre = acc + skip * a_own
            tl.store(out_ptr + offs_out, (b_own * pre).to(out_ptr.dtype.element_ty), mask=omask)
            tl.store(out2_ptr + offs_out, pre.to(out2_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _toeplitz_dh_kernel(gy_ptr, u_ptr, dh_ptr, scratch_ptr, Bsz, L, stride_u,
                            BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
        """dh[d, k] = sum_{b, t} gy[b, d, t] u[b, d, t - k] (gy = g * x, contiguous), for the lag blocks
        m = program_id(1), + num_programs(1), ... of channel d.

        For lag block m: P = sum over columns (i, b) of gy_block_i (outer) u[(i-m-1) S : (i-m+1) S], a
        (S x 2S) tensor-core matmul over all columns; then dh[m S + a] = sum_p P[p, S + p - a], a diagonal
        sum, done by writing P to this program's scratch slot and reading it back skewed."""
        d = tl.program_id(0)
        C = tl.num_programs(0)
        nb = tl.cdiv(L, BLOCK)
        rows = tl.arange(0, BLOCK)
        win = tl.arange(0, 2 * BLOCK)
        slot = scratch_ptr + (d * tl.num_programs(1) + tl.program_id(1)) * (2 * BLOCK * BLOCK)
        for m in range(tl.program_id(1), nb, tl.num_programs(1)):
            acc = tl.zeros((BLOCK, 2 * BLOCK), dtype=tl.float32)
            for c0 in range(m * Bsz, nb * Bsz, BLOCK_N):  # columns with block i >= m
                cols = c0 + tl.arange(0, BLOCK_N)
                blk, seq = cols // Bsz, cols % Bsz
                cmask = blk < nb
                t = blk[None, :] * BLOCK + rows[:, None]  # (S, N)
                gmask = cmask[None, :] & (t < L)
                gy = tl.load(gy_ptr + seq[None, :] * (C * L) + d * L + t, mask=gmask, other=0.0)  # (S, N)
                s = (blk - m - 1)[:, None] * BLOCK + win[None, :]  # (N, 2S) source times
                umask = cmask[:, None] & (s >= 0) & (s < L)
                uw = tl.load(u_ptr + seq[:, None] * stride_u + d * L + s, mask=umask, other=0.0)
                acc += tl.dot(gy, uw, input_precision=DOT)
            tl.debug_barrier()  # the previous lag block's skewed reads of the slot are done
            tl.store(slot + rows[:, None] * (2 * BLOCK) + win[None, :], acc)
            tl.debug_barrier()
            a = tl.arange(0, BLOCK)
            diag = tl.load(slot + rows[:, None] * (2 * BLOCK) + BLOCK + rows[:, None] - a[None, :])  # (p, a)
            k = m * BLOCK + a
            tl.store(dh_ptr + d * L + k, tl.sum(diag, axis=0), mask=k < L)


class LongConvFunction(torch.autograd.Function):
    """Equals hyena.long_conv_gate: x * (h conv u + skip * u). u, x (B, C, L) with time contiguous and a
    channel stride of L (batch strides may differ: chunks of one tensor are fine); h (C, L) fp32."""

    @staticmethod
    def forward(ctx, u, x, h, skip):
        B, C, L = u.shape
        cfg = HYENA_CONV
        out = torch.empty(B, C, L, device=u.device, dtype=u.dtype)
        pre = torch.empty_like(out)  # h conv u + skip u, kept for dL/dx
        dot = "ieee" if u.dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 products
        grid = (C, triton.cdiv(triton.cdiv(L, cfg["block"]) * B, cfg["block_n"]))
        _toeplitz_kernel[grid](a_ptr=u, b_ptr=x, h_ptr=h, skip_ptr=skip, out_ptr=out, out2_ptr=pre,
                               pre_ptr=pre, gy_ptr=out,  # read and written by the backward only
                               Bsz=B, L=L, stride_a=u.stride(0), stride_b=x.stride(0), REVERSE=False,
                               BLOCK=cfg["block"], BLOCK_N=cfg["block_n"], DOT=dot, num_warps=cfg["num_warps"],
                               num_stages=cfg["num_stages"])
        ctx.save_for_backward(u, x, h, skip, pre)
        ctx.dot, ctx.grid = dot, grid
        return out

    @staticmethod
    def backward(ctx, g):
        u, x, h, skip, pre = ctx.saved_tensors
        B, C, L = u.shape
        cfg = HYENA_CONV
        g = g.contiguous()
        du = torch.empty(B, C, L, device=u.device, dtype=u.dtype)
        dx, gy = torch.empty_like(du), torch.empty_like(du)
        _toeplitz_kernel[ctx.grid](a_ptr=g, b_ptr=x, h_ptr=h, skip_ptr=skip, pre_ptr=pre, out_ptr=du, out2_ptr=dx,
                                   gy_ptr=gy, Bsz=B, L=L, stride_a=g.stride(0), stride_b=x.stride(0), REVERSE=True,
                                   BLOCK=cfg["block"], BLOCK_N=cfg["block_n"], DOT=ctx.dot,
                                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        nb = triton.cdiv(L, cfg["block"])
        # programs per channel: each walks lag blocks `split` apart and reuses one scratch slot, so the
        # scratch (programs x 32 KB) stays small enough to live in the L2 instead of HBM
        split = max(1, min(nb, 1024 // C))
        dh = torch.empty(C, L, device=u.device, dtype=torch.float32)
        scratch = torch.empty(C * split, cfg["block"], 2 * cfg["block"], device=u.device, dtype=torch.float32)
        _toeplitz_dh_kernel[(C, split)](gy, u, dh, scratch, B, L, u.stride(0),
                                        BLOCK=cfg["block"], BLOCK_N=cfg["block_n"], DOT=ctx.dot,
                                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        d_skip = dh[:, 0].clone()  # sum_{b,t} gy u is the lag-0 tap's gradient
        return du, dx, dh, d_skip.to(skip.dtype)


# The long convolution by FFTs, for long sequences and small batches. The transforms are cuFFT's
# (torch.fft, fp32, zero-padded to n >= 2L, a power of 2); the Triton kernels below fuse the pointwise
# work around them into one pass each: the skip and gate after the forward's inverse transform (also
# keeping pre for dL/dx), dL/dx and the zero-padded fp32 x * g before the backward's transform, the skip
# term after its inverse. The transforms and the spectra's products remain separate passes over HBM
# (fusing them too is FlashFFTConv's step: the Monarch kernel below). O(L log L), so it overtakes
# attention's O(L^2) at long L.
#     forward:   y = irfft(rfft(u) H)[:L],              out = x (y + D u),   pre = y + D u
#     backward:  gy = g x,  dx = g pre,                  du = irfft(rfft(gy) conj(H))[:L] + D gy
#                dh = irfft(sum_b rfft(gy_b) conj(rfft(u_b)))[:L]   (a correlation; dD = dh[0])

# Positions per program of the three pointwise kernels around the transforms; not swept.
HYENA_FFT = {"block": 1024}

if HAVE_TRITON:
    @triton.jit
    def _fft_gate_kernel(y_ptr, u_ptr, x_ptr, skip_ptr, out_ptr, pre_ptr, C, L, n, stride_u, stride_x,
                         BLOCK: tl.constexpr):
        """out = x * (y + skip u), pre = y + skip u; y (B, C, n) fp32, the first L of each row used."""
        row, t = tl.program_id(0), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        b, c = row // C, row % C
        ok = t < L
        y = tl.load(y_ptr + row * n + t, mask=ok, other=0.0)
        u = tl.load(u_ptr + b * stride_u + c * L + t, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * stride_x + c * L + t, mask=ok, other=0.0).to(tl.float32)
        pre = y + tl.load(skip_ptr + c) * u
        tl.store(out_ptr + row * L + t, (x * pre).to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(pre_ptr + row * L + t, pre.to(pre_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _fft_gate_bwd_kernel(g_ptr, x_ptr, pre_ptr, gy_ptr, dx_ptr, C, L, n, stride_x, BLOCK: tl.constexpr):
        """gy = g * x into a zero-padded (B, C, n) fp32 buffer (the FFT's input); dx = g * pre."""
        row, t = tl.program_id(0), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        b, c = row // C, row % C
        ok = t < L
        g = tl.load(g_ptr + row * L + t, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * stride_x + c * L + t, mask=ok, other=0.0).to(tl.float32)
        pre = tl.load(pre_ptr + row * L + t, mask=ok, other=0.0).to(tl.float32)
        tl.store(gy_ptr + row * n + t, g * x, mask=t < n)  # zeros past L
        tl.store(dx_ptr + row * L + t, (g * pre).to(dx_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _fft_skip_kernel(corr_ptr, gy_ptr, skip_ptr, du_ptr, C, L, n, BLOCK: tl.constexpr):
        """du = corr + skip * gy; corr and gy (B, C, n) fp32, the first L of each row used."""
        row, t = tl.program_id(0), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = t < L
        corr = tl.load(corr_ptr + row * n + t, mask=ok, other=0.0)
        gy = tl.load(gy_ptr + row * n + t, mask=ok, other=0.0)
        tl.store(du_ptr + row * L + t, (corr + tl.load(skip_ptr + row % C) * gy).to(du_ptr.dtype.element_ty),
                 mask=ok)


class LongConvFFTFunction(torch.autograd.Function):
    """Equals hyena.long_conv_gate, by FFTs: same inputs and layout as LongConvFunction."""

    @staticmethod
    def forward(ctx, u, x, h, skip):
        B, C, L = u.shape
        n = 1 << (2 * L - 1).bit_length()  # >= 2L: the circular convolution's wrap-around falls past L
        block = HYENA_FFT["block"]
        u_f = torch.fft.rfft(u.float(), n=n)  # (B, C, n/2 + 1)
        h_f = torch.fft.rfft(h, n=n)  # (C, n/2 + 1)
        y = torch.fft.irfft(u_f * h_f, n=n)  # (B, C, n) fp32
        out, pre = (torch.empty(B, C, L, device=u.device, dtype=u.dtype) for _ in range(2))
        _fft_gate_kernel[(B * C, triton.cdiv(L, block))](y, u, x, skip, out, pre, C, L, n, u.stride(0),
                                                         x.stride(0), BLOCK=block)
        ctx.save_for_backward(x, skip, pre, u_f, h_f)
        return out

    @staticmethod
    def backward(ctx, g):
        x, skip, pre, u_f, h_f = ctx.saved_tensors
        B, C, L = pre.shape
        n = 2 * (u_f.size(-1) - 1)
        block = HYENA_FFT["block"]
        gy = torch.empty(B, C, n, device=g.device, dtype=torch.float32)
        dx = torch.empty_like(pre)
        _fft_gate_bwd_kernel[(B * C, triton.cdiv(n, block))](g.contiguous(), x, pre, gy, dx, C, L, n, x.stride(0),
                                                             BLOCK=block)
        g_f = torch.fft.rfft(gy)  # (B, C, n/2 + 1)
        corr = torch.fft.irfft(g_f * h_f.conj(), n=n)  # (B, C, n): sum_t gy_t h_{t-s} at s < L
        du = torch.empty_like(pre)
        _fft_skip_kernel[(B * C, triton.cdiv(L, block))](corr, gy, skip, du, C, L, n, BLOCK=block)
        dh = torch.fft.irfft((g_f * u_f.conj()).sum(0), n=n)[:, :L]  # (C, L): sum_{b,t} gy_t u_{t-k}
        return du, dx, dh, dh[:, 0].clone().to(skip.dtype)


# The long convolution in one kernel per (sequence, channel): FlashFFTConv's idea, the transforms as
# matrix products on tensor cores (a Monarch decomposition of the DFT), the input read once and the
# output written once. Notation: n = N1 N2 >= 2L (a power of 2), time index t = N2 t1 + t2, H1 = N1 / 2.
# Our choice: the transform evaluates the spectrum half a bin off the usual grid, at frequencies
# (k + 1/2) / n (an "odd" DFT; a product of two such spectra is a negacyclic convolution, which equals
# the linear one when n >= 2L because nothing wraps). For a real signal the spectrum at bin k is then the
# conjugate of bin n - 1 - k: every bin has a distinct mirror, so exactly half the bins (rows k1 < N1/2
# below) carry the whole transform. On the usual grid row k1 mirrors row N1 - k1, so rows 0 and N1/2
# mirror themselves and rows 0..N1/2 must all be computed: one more 16-row block per pass (3 blocks
# instead of 2 at 1K-2K tokens, 5 instead of 4 at 4K).
# With k = k1 + N1 k2 and e(a) = exp(-2 pi i a), the four-step FFT as matmuls:
#     A = F1 X           X (N1/2, N2) the signal's non-zero half as a matrix (zero padding past L makes
#                        rows t1 >= N1/2 zero), F1[k1, t1] = e(t1 (k1 + 1/2) / N1)
#     A *= T             twiddles T[k1, t2] = e(t2 (k1 + 1/2) / n)
#     Y = A F2           F2[t2, k2] = e(t2 k2 / N2), the size-N2 DFT: Y[k1, k2] is the spectrum at bin k
#     Y *= S             S the filter's spectrum computed the same way (conj(S) for a correlation)
#     z = (2/n) Re(conj(F1)^T (conj(T) * (Y conj(F2))))   the inverse, the same steps backwards, rows
#                        k1 < N1/2 only: the other half are the conjugate mirrors, hence 2 Re
# Every step but the last works on rows k1 independently (the last sums over them), so a program walks
# blocks of k1 rows as flash attention walks key blocks, accumulating z (N1/2, N2).
#     forward:  out = x (u conv h + D u),    pre = u conv h + D u
#     backward: gy = g x, dx = g pre, du = gy corr h + D gy,   dh[k] = sum_{b,t} gy_t u_{t-k} (spectrum
#               gy_f conj(u_f)), all in one kernel: gy's spectrum serves both; dh is added atomically
#               over the batch (stored when B = 1)
# Products: "bf16" rounds each product's operands to bf16 (fp32 accumulation, FlashFFTConv's precision),
# "tf32" keeps ~10 bits, "ieee" full fp32 (for fp32 inputs). bf16 for bf16 inputs: "tf32" products cost
# more time than the little error they save (kernels_sweeps.md, with the other alternatives swept).
# Launch settings per transform size n: the fastest of a sweep at B = 1, D = 768, order-2 fwd+bwd, 512-16384
# tokens, over N1 x N2 splits, 16/32-row blocks and 2-16 warps (`python bench.py hyena --set
# 'MONARCH.launch={...}'`): N2 about sqrt(n), and more warps for larger transforms, as far as the (N1/2, N2)
# accumulators fit in registers.
MONARCH = {
    # transform size n: (N2, rows of the spectrum per block forward, the same backward, warps)
    "launch": {512: (16, 16, 16, 2), 1024: (32, 16, 16, 2), 2048: (32, 32, 32, 2), 4096: (64, 16, 16, 4),
               8192: (64, 32, 16, 4), 16384: (64, 32, 16, 4), 32768: (128, 16, 16, 8)},
    "num_stages": 1,
    "half": "bf16",  # the products' precision for bf16 / fp16 inputs
    # the filter spectrum's products: its error is the same for every sequence and time step (a biased
    # filter, not noise), so it gets ~10 bits; fp32 inputs use "ieee" throughout
    "spectrum": "tf32",
    "fused_backward": True,  # du, dx, dh, dD in one kernel (False: two, "grad_input" then "grad_filter")
    "max_len": 16384,
}


def _monarch_shape(L: int, fp32: bool = False) -> tuple[int, int, int, int, int]:
    """(N1, N2, BLOCK_K forward, BLOCK_K backward, num_warps) for length L: n = N1 N2 the smallest power
    of 2 >= 2L, at least 512 (tensor-core products need 16 rows and columns of X (N1/2, N2)). fp32
    operands take twice the shared memory: at n = 32768 the 128-wide split would need 288 KB, more than
    one program gets, so fp32 inputs keep N2 = 64 there (slower; fp32 is for checking)."""
    n = max(512, 1 << (2 * L - 1).bit_length())
    n2, block_fwd, block_bwd, warps = MONARCH["launch"][n]
    if fp32:
        n2 = min(n2, 64)
    return n // n2, n2, block_fwd, block_bwd, warps


_MONARCH_TABLES = {}


def _monarch_tables(n1: int, n2: int, device) -> dict[str, torch.Tensor]:
    """The Monarch kernels' table arguments, by name (f1r_ptr, ..., f2i_ptr): F1 (N1/2, N1/2) (the rows
    k1 < N1/2 and columns t1 < N1/2 that are ever used), the twiddles (N1/2, N2) and F2 (N2, N2), real and
    imaginary parts in fp32, from float64 angles (integer products reduced first). Cached per shape and
    device. Read from memory rather than computed in the kernel with tl.cos / tl.sin, which is slower
    (kernels_sweeps.md)."""
    key = (n1, n2, str(device))
    if key not in _MONARCH_TABLES:
        n, h1 = n1 * n2, n1 // 2

        def unit(num, den):  # e(num / den) as (cos, -sin) of 2 pi num / den
            ang = 2 * torch.pi * (num % den).double() / den
            return torch.cos(ang).float().to(device), (-torch.sin(ang)).float().to(device)

        odd = 2 * torch.arange(h1) + 1  # 2 (k1 + 1/2): the half-bin shift in integers
        f1 = unit(odd[:, None] * torch.arange(h1)[None, :], 2 * n1)
        tw = unit(odd[:, None] * torch.arange(n2)[None, :], 2 * n)
        f2 = unit(torch.arange(n2)[:, None] * torch.arange(n2)[None, :], n2)
        names = ("f1r_ptr", "f1i_ptr", "twr_ptr", "twi_ptr", "f2r_ptr", "f2i_ptr")
        _MONARCH_TABLES[key] = dict(zip(names, (*f1, *tw, *f2)))
    return _MONARCH_TABLES[key]


if HAVE_TRITON:
    @triton.jit
    def _cdot(a, b, DOT: tl.constexpr):
        # one real product of the complex chain, fp32 accumulation
        if DOT == "bf16":
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT)

    @triton.jit
    def _monarch_rows(x, f1r, f1i, twr, twi, f2r, f2i, DOT: tl.constexpr):
        """Spectrum rows k1 of one block of a real signal X (N1/2, N2): (Yr, Yi) (BLOCK_K, N2)."""
        # A = F1[k1, :N1/2] X
        ar = _cdot(f1r, x, DOT)
        ai = _cdot(f1i, x, DOT)
        # A *= T
        tr = ar * twr - ai * twi
        ti = ar * twi + ai * twr
        # Y = A F2
        yr = _cdot(tr, f2r, DOT) - _cdot(ti, f2i, DOT)
        yi = _cdot(tr, f2i, DOT) + _cdot(ti, f2r, DOT)
        return yr, yi

    @triton.jit
    def _monarch_rows_inverse(yr, yi, f1r, f1i, twr, twi, f2r, f2i, DOT: tl.constexpr):
        """These rows' share of Re(inverse transform) at t1 < N1/2: (N1/2, N2). (F2 is symmetric.)"""
        # B = Y conj(F2)
        br = _cdot(yr, f2r, DOT) + _cdot(yi, f2i, DOT)
        bi = _cdot(yi, f2r, DOT) - _cdot(yr, f2i, DOT)
        # B *= conj(T)
        cr = br * twr + bi * twi
        ci = bi * twr - br * twi
        # Re(conj(F1)^T B)
        return _cdot(tl.trans(f1r), cr, DOT) + _cdot(tl.trans(f1i), ci, DOT)

    @triton.jit
    def _monarch_block_tables(f1r_ptr, f1i_ptr, twr_ptr, twi_ptr, k1, r1, r2, H1: tl.constexpr, N2: tl.constexpr):
        """The rows k1 of F1 (BLOCK_K, N1/2) and of the twiddles (BLOCK_K, N2)."""
        f1 = k1[:, None] * H1 + r1[None, :]
        tw = k1[:, None] * N2 + r2[None, :]
        return tl.load(f1r_ptr + f1), tl.load(f1i_ptr + f1), tl.load(twr_ptr + tw), tl.load(twi_ptr + tw)

    @triton.jit
    def _monarch_f2(f2r_ptr, f2i_ptr, r2, N2: tl.constexpr, OP: tl.constexpr):
        """F2 (N2, N2), held through a program's loop in the products' precision."""
        f2 = r2[:, None] * N2 + r2[None, :]
        return tl.load(f2r_ptr + f2).to(OP), tl.load(f2i_ptr + f2).to(OP)

    @triton.jit
    def _monarch_spectrum_kernel(h_ptr, f1r_ptr, f1i_ptr, twr_ptr, twi_ptr, f2r_ptr, f2i_ptr, sr_ptr, si_ptr, L,
                                 N1: tl.constexpr, N2: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        """The filter's spectrum (C, N1/2, N2), real and imaginary parts, times the inverse's 2/n: one
        channel per program, its row read once, the blocks of rows k1 in turn."""
        H1: tl.constexpr = N1 // 2
        c = tl.program_id(0)
        r1, r2 = tl.arange(0, H1), tl.arange(0, N2)
        t = r1[:, None] * N2 + r2[None, :]
        OP: tl.constexpr = tl.bfloat16 if DOT == "bf16" else tl.float32
        h = tl.load(h_ptr + c * L + t, mask=t < L, other=0.0).to(OP)
        f2r, f2i = _monarch_f2(f2r_ptr, f2i_ptr, r2, N2, OP)
        for k0 in range(0, H1, BLOCK_K):
            k1 = k0 + tl.arange(0, BLOCK_K)
            f1r, f1i, twr, twi = _monarch_block_tables(f1r_ptr, f1i_ptr, twr_ptr, twi_ptr, k1, r1, r2, H1, N2)
            yr, yi = _monarch_rows(h, f1r, f1i, twr, twi, f2r, f2i, DOT)
            s = c * H1 * N2 + k1[:, None] * N2 + r2[None, :]
            tl.store(sr_ptr + s, yr * (2.0 / (N1 * N2)))
            tl.store(si_ptr + s, yi * (2.0 / (N1 * N2)))

    @triton.jit
    def _monarch_conv_kernel(u_ptr, x_ptr, g_ptr, pre_ptr, sr_ptr, si_ptr, skip_ptr, f1r_ptr, f1i_ptr, twr_ptr,
                             twi_ptr, f2r_ptr, f2i_ptr, out_ptr, out2_ptr, dh_ptr, dskip_ptr, B, C, L, stride_u,
                             stride_x, N1: tl.constexpr, N2: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
                             DOT: tl.constexpr):
        """One (sequence, channel) row. MODE "forward": out = x (u conv h + D u), out2 = pre. "grad_input":
        out = du = gy corr h + D gy, out2 = dx = g pre, with gy = g x. "grad_filter": dh (C, L) and dD (C,)
        fp32 += this row's share (stored when B = 1, atomically added otherwise). "backward": "grad_input"
        and "grad_filter" in one pass. (sr, si): the filter's spectrum from _monarch_spectrum_kernel."""
        FORWARD: tl.constexpr = MODE == "forward"
        WITH_H: tl.constexpr = MODE != "grad_filter"  # the product with h's spectrum: out, or du
        GRAD_H: tl.constexpr = (MODE == "grad_filter") | (MODE == "backward")  # dh and dD
        H1: tl.constexpr = N1 // 2
        pid = tl.program_id(0)
        c, b = pid // B, pid % B  # a channel's sequences run side by side: its spectrum stays in the L2
        r1, r2 = tl.arange(0, H1), tl.arange(0, N2)
        t = r1[:, None] * N2 + r2[None, :]  # (N1/2, N2): the time index of each entry of X and z
        ok = t < L
        u_row = u_ptr + b * stride_u + c * L
        x_row = x_ptr + b * stride_x + c * L
        row = (b * C + c) * L  # g, pre and the outputs are contiguous (B, C, L)
        # the operands held through the loop in the products' precision (registers decide the occupancy)
        OP: tl.constexpr = tl.bfloat16 if DOT == "bf16" else tl.float32
        if FORWARD:
            sig = tl.load(u_row + t, mask=ok, other=0.0).to(OP)
        else:
            g = tl.load(g_ptr + row + t, mask=ok, other=0.0).to(tl.float32)
            sig = (g * tl.load(x_row + t, mask=ok, other=0.0).to(tl.float32)).to(OP)  # gy
            if WITH_H:
                pre = tl.load(pre_ptr + row + t, mask=ok, other=0.0).to(tl.float32)
                tl.store(out2_ptr + row + t, (g * pre).to(out2_ptr.dtype.element_ty), mask=ok)
            if GRAD_H:
                sig2 = tl.load(u_row + t, mask=ok, other=0.0).to(OP)
        f2r, f2i = _monarch_f2(f2r_ptr, f2i_ptr, r2, N2, OP)
        z = tl.zeros((H1, N2), dtype=tl.float32)  # the convolution or correlation with h
        z_dh = tl.zeros((H1, N2), dtype=tl.float32)  # the correlation with u
        for k0 in range(0, H1, BLOCK_K):
            k1 = k0 + tl.arange(0, BLOCK_K)
            f1r, f1i, twr, twi = _monarch_block_tables(f1r_ptr, f1i_ptr, twr_ptr, twi_ptr, k1, r1, r2, H1, N2)
            yr, yi = _monarch_rows(sig, f1r, f1i, twr, twi, f2r, f2i, DOT)
            if WITH_H:
                s = c * H1 * N2 + k1[:, None] * N2 + r2[None, :]
                hr, hi = tl.load(sr_ptr + s), tl.load(si_ptr + s)  # includes the inverse's 2/n
                if FORWARD:  # Y S
                    sr = yr * hr - yi * hi
                    si = yr * hi + yi * hr
                else:  # Y conj(S): the correlation
                    sr = yr * hr + yi * hi
                    si = yi * hr - yr * hi
                z += _monarch_rows_inverse(sr, si, f1r, f1i, twr, twi, f2r, f2i, DOT)
            if GRAD_H:
                # the correlation's spectrum gy_f conj(u_f), times the inverse's 2/n
                vr, vi = _monarch_rows(sig2, f1r, f1i, twr, twi, f2r, f2i, DOT)
                sr = (yr * vr + yi * vi) * (2.0 / (N1 * N2))
                si = (yi * vr - yr * vi) * (2.0 / (N1 * N2))
                z_dh += _monarch_rows_inverse(sr, si, f1r, f1i, twr, twi, f2r, f2i, DOT)
        if GRAD_H:
            d_skip = tl.sum(tl.sum(tl.where(t == 0, z_dh, 0.0), axis=1), axis=0)  # dD = sum gy u: the lag-0 tap
            if B == 1:
                tl.store(dh_ptr + c * L + t, z_dh, mask=ok)
                tl.store(dskip_ptr + c, d_skip)
            else:
                tl.atomic_add(dh_ptr + c * L + t, z_dh, mask=ok)
                tl.atomic_add(dskip_ptr + c, d_skip)
        if WITH_H:
            skip = tl.load(skip_ptr + c)
            x = tl.load(x_row + t, mask=ok, other=0.0).to(tl.float32)
            if FORWARD:
                pre = z + skip * tl.load(u_row + t, mask=ok, other=0.0).to(tl.float32)
                tl.store(out_ptr + row + t, (x * pre).to(out_ptr.dtype.element_ty), mask=ok)
                tl.store(out2_ptr + row + t, pre.to(out2_ptr.dtype.element_ty), mask=ok)
            else:
                # du = corr + D gy (gy again in fp32: the loop's copy may be rounded)
                tl.store(out_ptr + row + t, (z + skip * g * x).to(out_ptr.dtype.element_ty), mask=ok)


class LongConvMonarchFunction(torch.autograd.Function):
    """Equals hyena.long_conv_gate, one kernel per pass (forward; du, dx, dh and dD together) after the
    filters' spectrum: same inputs and layout as LongConvFunction; L <= MONARCH["max_len"]."""

    @staticmethod
    def forward(ctx, u, x, h, skip):
        B, C, L = u.shape
        n1, n2, block_fwd, block_bwd, warps = _monarch_shape(L, fp32=u.dtype == torch.float32)
        dot = "ieee" if u.dtype == torch.float32 else MONARCH["half"]
        launch = dict(N1=n1, N2=n2, BLOCK_K=block_fwd, DOT=dot, num_warps=warps, num_stages=MONARCH["num_stages"])
        ctx.launch = dict(launch, BLOCK_K=block_bwd)
        tables = _monarch_tables(n1, n2, u.device)
        spectrum = torch.empty(2, C, n1 // 2, n2, device=u.device, dtype=torch.float32)  # (re/im, C, N1/2, N2)
        _monarch_spectrum_kernel[(C,)](h_ptr=h, sr_ptr=spectrum[0], si_ptr=spectrum[1], L=L, **tables, **dict(
            launch, DOT="ieee" if dot == "ieee" else MONARCH["spectrum"]))
        out, pre = (torch.empty(B, C, L, device=u.device, dtype=u.dtype) for _ in range(2))
        _monarch_conv_kernel[(B * C,)](u_ptr=u, x_ptr=x, sr_ptr=spectrum[0], si_ptr=spectrum[1], skip_ptr=skip,
                                       out_ptr=out, out2_ptr=pre, B=B, C=C, L=L, stride_u=u.stride(0),
                                       stride_x=x.stride(0), MODE="forward", **tables, **launch,
                                       g_ptr=u, pre_ptr=u, dh_ptr=pre, dskip_ptr=pre)  # the backward's: unused
        ctx.save_for_backward(u, x, skip, pre, spectrum)
        return out

    @staticmethod
    def backward(ctx, g):
        u, x, skip, pre, spectrum = ctx.saved_tensors
        B, C, L = u.shape
        g = g.contiguous()
        du, dx = torch.empty_like(pre), torch.empty_like(pre)
        new = torch.empty if B == 1 else torch.zeros  # one program per channel stores; several add
        dh, d_skip = new(C, L, device=u.device, dtype=torch.float32), new(C, device=u.device, dtype=torch.float32)
        tables = _monarch_tables(ctx.launch["N1"], ctx.launch["N2"], u.device)
        args = dict(u_ptr=u, x_ptr=x, g_ptr=g, pre_ptr=pre, sr_ptr=spectrum[0], si_ptr=spectrum[1], skip_ptr=skip,
                    out_ptr=du, out2_ptr=dx, dh_ptr=dh, dskip_ptr=d_skip, B=B, C=C, L=L, stride_u=u.stride(0),
                    stride_x=x.stride(0), **tables, **ctx.launch)
        if MONARCH["fused_backward"]:
            _monarch_conv_kernel[(B * C,)](MODE="backward", **args)
        else:
            _monarch_conv_kernel[(B * C,)](MODE="grad_input", **args)
            _monarch_conv_kernel[(B * C,)](MODE="grad_filter", **args)
        return du, dx, dh, d_skip


def hyena_long_conv(u: torch.Tensor, x: torch.Tensor, h: torch.Tensor, skip: torch.Tensor,
                    path: str | None = None) -> torch.Tensor:
    """x * (h conv u + skip * u), causal, fp32 accumulation: u, x (B, C, L), h (C, L), skip (C,) -> (B, C, L)
    in u's dtype. Reference: hyena.long_conv_gate (FFT) and hyena.direct_causal_conv (the definition).
    Training batches of short sequences run the blocked-Toeplitz kernel (O(L^2) tensor-core work, fewest
    bytes); other shapes up to MONARCH["max_len"] tokens the Monarch kernel (one kernel per pass, the DFTs
    as bf16 matmuls: ~5e-3 relative error for bf16 inputs, fp32-exact for fp32 inputs); longer ones the
    FFT path (cuFFT + fused pointwise kernels). See HYENA_CONV and MONARCH.
    path: "toeplitz", "monarch" or "fft" to take that path whatever the shape (tests, benchmarks); None
    picks."""
    _runnable(u, "hyena_long_conv")
    _check("u", u)
    B, C, L = u.shape
    _check("x", x, (B, C, L), (u.dtype,))
    _check("h", h, (C, L), (torch.float32,))
    _check("skip", skip, (C,), (torch.float32,))
    for name, t in (("u", u), ("x", x)):
        if t.stride(2) != 1 or t.stride(1) != L:
            raise ValueError(f"hyena_long_conv: {name} must have time contiguous and channel stride L "
                             f"(got strides {t.stride()})")
    if path is None:
        if L <= HYENA_CONV["toeplitz_max_len"] and B * C >= HYENA_CONV["toeplitz_rows_per_token"] * L:
            path = "toeplitz"
        else:
            path = "monarch" if L <= MONARCH["max_len"] else "fft"
    conv = {"toeplitz": LongConvFunction, "monarch": LongConvMonarchFunction, "fft": LongConvFFTFunction}.get(path)
    if conv is None:
        raise ValueError(f"hyena_long_conv: path must be 'toeplitz', 'monarch', 'fft' or None (got {path!r})")
    if path == "monarch" and L > MONARCH["max_len"]:
        raise ValueError(f"hyena_long_conv: the monarch path takes L <= {MONARCH['max_len']} (got {L})")
    return conv.apply(u, x, h.contiguous(), skip.contiguous())


# ----------------------------------------------------------------------------------------------------
# Hyena's implicit filters: h (N C, L) = Window * W4 Sin(W3 Sin(W2 Sin(W1 pos + b1) + b2) + b3)
#
# In PyTorch the filter is ~20 small kernels forward and ~50 backward (linears, casts, sin, the window and
# its products), each a pass over memory, for an output of N C L floats. Here: forward, one kernel runs the
# MLP per block of positions (a3 (L, F): 1 MB at 4K, and the three pre-activations, kept for the backward)
# and one writes h = W4 a3^T times the window, computed in its epilogue; backward, one kernel forms
# dW4 = (dh Window) a3 (a sum over time), one da3 = (dh Window)^T W4 (a sum over channels), and one walks
# da3 back through the three Sin layers. Sums too long for one program are split over several, whose
# partial sums the next kernel or PyTorch adds (no atomics).
# The MLP's products are fp32-accurate (the Sin layers amplify rounding, see ImplicitFilter.forward).

# Launch settings: positions per block, channels per product, warps, the programs aimed at when a kernel's
# blocks are split to fill the GPU, and positions per block of the two MLP kernels. The fastest of a sweep
# at C = 768, N = 2, 4K positions (`python bench.py hyena --set FILTER.block_l=64`: the filters' column).
# dot: the two big products' precision, "tf32" (~1e-3 relative error, not amplified) or "ieee" (fp32, the
# tests); mlp_dot: the MLP's, "tf32x3" (three tf32 products: fp32 accuracy on tensor cores, and faster than
# "ieee") or "ieee".
FILTER = {"block_l": 32, "block_c": 32, "num_warps": 4, "programs": 528, "dot": "tf32", "mlp_dot": "tf32x3",
          "mlp_block_l": 16}

if HAVE_TRITON:
    @triton.jit
    def _filter_mlp(pos_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, freq_ptr, ts, L, E,
                    EP: tl.constexpr, F: tl.constexpr, MLP_DOT: tl.constexpr):
        """The MLP at the positions ts (BLOCK_L,): a0 (BLOCK_L, EP), then p_i = a_{i-1} W_i^T + b_i and
        a_i = sin(freq p_i) (BLOCK_L, F) for i = 1, 2, 3. Rows past L start from a0 = 0
        (the callers mask what they produce)."""
        e, f = tl.arange(0, EP), tl.arange(0, F)
        a0 = tl.load(pos_ptr + ts[:, None] * E + e[None, :], mask=(ts < L)[:, None] & (e < E)[None, :], other=0.0)
        freq = tl.load(freq_ptr + f)[None, :]
        w1t = tl.load(w1_ptr + f[None, :] * E + e[:, None], mask=(e < E)[:, None], other=0.0)  # (EP, F): W1^T
        p1 = tl.dot(a0, w1t, input_precision=MLP_DOT) + tl.load(b1_ptr + f)[None, :]
        a1 = tl.sin(freq * p1)
        wt = f[None, :] * F + f[:, None]  # W^T of an (F, F) weight
        p2 = tl.dot(a1, tl.load(w2_ptr + wt), input_precision=MLP_DOT) + tl.load(b2_ptr + f)[None, :]
        a2 = tl.sin(freq * p2)
        p3 = tl.dot(a2, tl.load(w3_ptr + wt), input_precision=MLP_DOT) + tl.load(b3_ptr + f)[None, :]
        a3 = tl.sin(freq * p3)
        return a0, p1, a1, p2, a2, p3, a3

    @triton.jit
    def _filter_mlp_kernel(pos_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, freq_ptr, act_ptr, L, E,
                           EP: tl.constexpr, F: tl.constexpr, BLOCK_L: tl.constexpr, MLP_DOT: tl.constexpr):
        """act (4, L, F) = (p1, p2, p3, a3) for one block of positions: a3 for h, the pre-activations for
        the backward (which then need not run the MLP's chain of dependent products again)."""
        ts = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        a0, p1, a1, p2, a2, p3, a3 = _filter_mlp(pos_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, freq_ptr,
                                                 ts, L, E, EP, F, MLP_DOT)
        offs, mask = ts[:, None] * F + tl.arange(0, F)[None, :], (ts < L)[:, None]
        tl.store(act_ptr + offs, p1, mask=mask)
        tl.store(act_ptr + L * F + offs, p2, mask=mask)
        tl.store(act_ptr + 2 * L * F + offs, p3, mask=mask)
        tl.store(act_ptr + 3 * L * F + offs, a3, mask=mask)

    @triton.jit
    def _filter_window(deltas_ptr, tnorm_ptr, js, ts, L, C, NC):
        """Window(t) = exp(-t_norm |delta_c|) at channels js (c = j mod C) and positions ts: (BLOCK_C, BLOCK_L);
        0 outside the filter, so that loads masked with it contribute nothing."""
        delta = tl.load(deltas_ptr + js % C, mask=js < NC, other=0.0)
        tn = tl.load(tnorm_ptr + ts, mask=ts < L, other=0.0)
        return tl.where((js < NC)[:, None] & (ts < L)[None, :], tl.exp(-delta[:, None] * tn[None, :]), 0.0)

    @triton.jit
    def _filter_fwd_kernel(a3_ptr, w4_ptr, tnorm_ptr, deltas_ptr, h_ptr, L, C, NC, chunks_per_program,
                           F: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, DOT: tl.constexpr):
        """h[j, t] = (W4[j] . a3[t]) Window[j, t], one block of positions, a run of channel blocks."""
        ts = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        f = tl.arange(0, F)
        a3t = tl.load(a3_ptr + ts[None, :] * F + f[:, None], mask=(ts < L)[None, :], other=0.0)  # (F, BLOCK_L)
        for i in range(chunks_per_program):
            js = (tl.program_id(1) * chunks_per_program + i) * BLOCK_C + tl.arange(0, BLOCK_C)
            w4 = tl.load(w4_ptr + js[:, None] * F + f[None, :], mask=(js < NC)[:, None], other=0.0)  # (BLOCK_C, F)
            # W4 a3^T: (BLOCK_C, BLOCK_L), time last, as the long convolutions read it
            # deltas (N, C): one rate per row j of W4, so the window's channel index is j itself
            h = tl.dot(w4, a3t, input_precision=DOT) * _filter_window(deltas_ptr, tnorm_ptr, js, ts, L, NC, NC)
            tl.store(h_ptr + js[:, None] * L + ts[None, :], h, mask=(js < NC)[:, None] & (ts < L)[None, :])

    @triton.jit
    def _filter_grad_window(dh_ptr, deltas_ptr, tnorm_ptr, js, ts, L, C):
        """gw = dh Window, the gradient of W4 a3^T, for one filter's dh (C, L): (BLOCK_C, BLOCK_L)."""
        # masked by the indices, not by win > 0: a mask that waits for the exp would keep the loop's loads
        # from being issued ahead (software pipelining)
        dh = tl.load(dh_ptr + js[:, None] * L + ts[None, :], mask=(js < C)[:, None] & (ts < L)[None, :], other=0.0)
        return dh * _filter_window(deltas_ptr, tnorm_ptr, js, ts, L, C, C)

    @triton.jit
    def _filter_dw4_kernel(a3_ptr, tnorm_ptr, deltas_ptr, dh_ptr, dw4_ptr, L, C, NC, row0, blocks_per_program,
                           F: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, DOT: tl.constexpr):
        """dW4 = gw a3 for one filter's rows row0 + (0..C) of W4 (N C, F), gw = dh Window, dh (C, L): one
        channel block over a run of position blocks, stored as a partial sum (the wrapper adds the runs)."""
        js = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        f = tl.arange(0, F)
        acc = tl.zeros((BLOCK_C, F), dtype=tl.float32)
        for i in range(blocks_per_program):
            ts = (tl.program_id(1) * blocks_per_program + i) * BLOCK_L + tl.arange(0, BLOCK_L)
            gw = _filter_grad_window(dh_ptr, deltas_ptr, tnorm_ptr, js, ts, L, C)
            a3 = tl.load(a3_ptr + ts[:, None] * F + f[None, :], mask=(ts < L)[:, None], other=0.0)  # (BLOCK_L, F)
            acc += tl.dot(gw, a3, input_precision=DOT)
        tl.store(dw4_ptr + (tl.program_id(1) * NC + row0 + js[:, None]) * F + f[None, :], acc, mask=(js < C)[:, None])

    @triton.jit
    def _filter_da3_kernel(w4_ptr, tnorm_ptr, deltas_ptr, dh_ptr, da_ptr, L, C, row0, part0, chunks_per_program,
                           F: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, DOT: tl.constexpr):
        """da3 = gw^T W4 (L, F) for one filter (rows row0 + (0..C) of W4), gw = dh Window: one block of
        positions over a run of channel blocks, stored as partial sum part0 + run (the MLP's backward adds
        them)."""
        ts = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        f = tl.arange(0, F)
        da = tl.zeros((BLOCK_L, F), dtype=tl.float32)
        for i in range(chunks_per_program):
            js = (tl.program_id(1) * chunks_per_program + i) * BLOCK_C + tl.arange(0, BLOCK_C)
            gw = _filter_grad_window(dh_ptr, deltas_ptr, tnorm_ptr, js, ts, L, C)
            w4 = tl.load(w4_ptr + (row0 + js[:, None]) * F + f[None, :], mask=(js < C)[:, None], other=0.0)
            da += tl.dot(tl.trans(gw), w4, input_precision=DOT)  # rows past L stay 0
        tl.store(da_ptr + ((part0 + tl.program_id(1)) * L + ts[:, None]) * F + f[None, :], da, mask=(ts < L)[:, None])

    @triton.jit
    def _filter_sin_backward(da, p, freq):
        """a = sin(freq p): (dL/dp, this block's share of dL/dfreq)."""
        ca = da * tl.cos(freq * p)
        return ca * freq, tl.sum(ca * p, axis=0)

    @triton.jit
    def _filter_mlp_bwd_kernel(pos_ptr, w2_ptr, w3_ptr, freq_ptr, act_ptr, da_ptr, part_ptr, dw4_part_ptr, dw4_ptr,
                               L, E, n_parts, n_dw4_parts, dw4_size, dw4_each, EP: tl.constexpr, F: tl.constexpr,
                               BLOCK_L: tl.constexpr, MLP_DOT: tl.constexpr):
        """One block of positions: da3 (the sum of its partials), back through the three Sin layers (their
        pre-activations saved by the forward). Stores the block's partial sums of dW1, db1, dW2, db2, dW3,
        db3, dfreq, packed in that order, in one row of part (the wrapper adds the rows). Also adds the
        dW4 partials of a slice of dW4's entries (one launch fewer than a separate sum)."""
        ts = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        e, f = tl.arange(0, EP), tl.arange(0, F)
        da = tl.zeros((BLOCK_L, F), dtype=tl.float32)
        for i in range(n_parts):
            da += tl.load(da_ptr + (i * L + ts[:, None]) * F + f[None, :], mask=(ts < L)[:, None], other=0.0)
        offs, mask = ts[:, None] * F + f[None, :], (ts < L)[:, None]
        a0 = tl.load(pos_ptr + ts[:, None] * E + e[None, :], mask=mask & (e < E)[None, :], other=0.0)
        freq = tl.load(freq_ptr + f)[None, :]
        p1 = tl.load(act_ptr + offs, mask=mask, other=0.0)
        p2 = tl.load(act_ptr + L * F + offs, mask=mask, other=0.0)
        p3 = tl.load(act_ptr + 2 * L * F + offs, mask=mask, other=0.0)
        a1, a2 = tl.sin(freq * p1), tl.sin(freq * p2)
        row = part_ptr + tl.program_id(0) * (F * E + 2 * F * F + 4 * F)
        ff = f[:, None] * F + f[None, :]
        # layer 3: p3 = a2 W3^T + b3
        dp, dfreq = _filter_sin_backward(da, p3, freq)
        tl.store(row + F * E + 2 * F + F * F + ff, tl.dot(tl.trans(dp), a2, input_precision=MLP_DOT))  # dW3 = dp3^T a2
        tl.store(row + F * E + 2 * F + 2 * F * F + f, tl.sum(dp, axis=0))  # db3
        da = tl.dot(dp, tl.load(w3_ptr + ff), input_precision=MLP_DOT)  # da2 = dp3 W3
        # layer 2: p2 = a1 W2^T + b2
        dp, dfreq2 = _filter_sin_backward(da, p2, freq)
        tl.store(row + F * E + F + ff, tl.dot(tl.trans(dp), a1, input_precision=MLP_DOT))  # dW2
        tl.store(row + F * E + F + F * F + f, tl.sum(dp, axis=0))  # db2
        da = tl.dot(dp, tl.load(w2_ptr + ff), input_precision=MLP_DOT)  # da1 = dp2 W2
        # layer 1: p1 = a0 W1^T + b1 (the positions are a buffer: nothing below)
        dp, dfreq1 = _filter_sin_backward(da, p1, freq)
        dw1 = tl.dot(tl.trans(dp), a0, input_precision=MLP_DOT)  # (F, EP)
        tl.store(row + f[:, None] * E + e[None, :], dw1, mask=(e < E)[None, :])
        tl.store(row + F * E + f, tl.sum(dp, axis=0))  # db1
        tl.store(row + F * E + 2 * F * F + 3 * F + f, dfreq + dfreq2 + dfreq1)
        # dW4 = the sum of its partials over runs of positions: entries [start, start + dw4_each) here
        start = tl.program_id(0) * dw4_each
        for c0 in range(start, start + dw4_each, 1024):
            cols = c0 + tl.arange(0, 1024)
            cmask = (cols < start + dw4_each) & (cols < dw4_size)
            acc = tl.zeros((1024,), dtype=tl.float32)
            for r in range(n_dw4_parts):
                acc += tl.load(dw4_part_ptr + r * dw4_size + cols, mask=cmask, other=0.0)
            tl.store(dw4_ptr + cols, acc, mask=cmask)


def _filter_split(blocks: int, other_blocks: int) -> tuple[int, int]:
    """Split `blocks` over enough programs (with `other_blocks` programs along the grid's other axis) to
    fill the GPU: (programs, blocks each)."""
    each = triton.cdiv(blocks, max(1, FILTER["programs"] // other_blocks))
    return triton.cdiv(blocks, each), each


class ImplicitFilterFunction(torch.autograd.Function):
    """Equals hyena.ImplicitFilter.forward(L).unbind(0): the MLP's weights in, N filters (C, L) fp32 out."""

    @staticmethod
    def forward(ctx, L, order, dot, pos, t_norm, deltas, freq, w1, b1, w2, b2, w3, b3, w4):
        F_, E = w1.shape
        NC, C = w4.size(0), deltas.size(-1)  # deltas (N, C)
        bl, bc = FILTER["block_l"], FILTER["block_c"]
        mlp = dict(EP=max(16, triton.next_power_of_2(E)), F=F_, BLOCK_L=FILTER["mlp_block_l"],
                   MLP_DOT=FILTER["mlp_dot"], num_warps=FILTER["num_warps"])
        ctx.meta = dict(L=L, E=E, C=C, NC=NC, mlp=mlp, big=dict(F=F_, BLOCK_L=bl, BLOCK_C=bc, DOT=dot,
                                                                num_warps=FILTER["num_warps"]))
        n_l, n_c = triton.cdiv(L, bl), triton.cdiv(NC, bc)
        act = torch.empty(4, L, F_, device=w4.device, dtype=torch.float32)  # p1, p2, p3 and a3, the MLP's output
        _filter_mlp_kernel[(triton.cdiv(L, mlp["BLOCK_L"]),)](pos, w1, b1, w2, b2, w3, b3, freq, act, L, E, **mlp)
        a3 = act[3]
        h = torch.empty(NC, L, device=w4.device, dtype=torch.float32)
        splits, chunks = _filter_split(n_c, n_l)
        _filter_fwd_kernel[(n_l, splits)](a3, w4, t_norm, deltas, h, L, C, NC, chunks, **ctx.meta["big"])
        ctx.save_for_backward(pos, t_norm, deltas, freq, w2, w3, w4, act)
        # one output per filter, so that each comes back with its own gradient (one (N, C, L) output
        # would need them stacked: a copy of dh)
        return tuple(h.view(order, C, L).unbind(0))

    @staticmethod
    def backward(ctx, *dhs):
        pos, t_norm, deltas, freq, w2, w3, w4, act = ctx.saved_tensors
        a3 = act[3]
        m = ctx.meta
        L, E, C, NC, F_ = m["L"], m["E"], m["C"], m["NC"], m["mlp"]["F"]
        bl, bc = m["big"]["BLOCK_L"], m["big"]["BLOCK_C"]
        n_l, n_c = triton.cdiv(L, bl), triton.cdiv(C, bc)
        # dW4: channel blocks x runs of position blocks, per filter
        splits_l, blocks = _filter_split(n_l, n_c)
        dw4 = torch.empty(splits_l, NC, F_, device=w4.device, dtype=torch.float32)
        # da3: position blocks x runs of channel blocks, per filter; then the MLP per position block
        splits_c, chunks = _filter_split(n_c, n_l)
        da = torch.empty(len(dhs) * splits_c, L, F_, device=w4.device, dtype=torch.float32)
        for n, dh in enumerate(dhs):
            dh = dh.contiguous()
            _filter_dw4_kernel[(n_c, splits_l)](a3, t_norm, deltas[n], dh, dw4, L, C, NC, n * C, blocks, **m["big"])
            _filter_da3_kernel[(n_l, splits_c)](w4, t_norm, deltas[n], dh, da, L, C, n * C, n * splits_c, chunks,
                                                **m["big"])
        n_mlp = triton.cdiv(L, m["mlp"]["BLOCK_L"])
        part = torch.empty(n_mlp, F_ * E + 2 * F_ * F_ + 4 * F_, device=w4.device, dtype=torch.float32)
        dw4_sum = torch.empty(NC, F_, device=w4.device, dtype=torch.float32)
        _filter_mlp_bwd_kernel[(n_mlp,)](pos, w2, w3, freq, act, da, part, dw4, dw4_sum, L, E, da.size(0), splits_l,
                                         NC * F_, triton.cdiv(NC * F_, n_mlp), **m["mlp"])
        dw1, db1, dw2, db2, dw3, db3, dfreq = part.sum(0).split([F_ * E, F_, F_ * F_, F_, F_ * F_, F_, F_])
        return (None, None, None, None, None, None, dfreq, dw1.view(F_, E), db1, dw2.view(F_, F_), db2,
                dw3.view(F_, F_), db3, dw4_sum)


def hyena_filter_supports(width: int, pos_trainable: bool = False) -> bool:
    """Whether hyena_filter takes a filter FFN of this width (its tiles: a power of 2, at least 16); it treats
    the positions as constants, so not trainable ones."""
    return width >= 16 and width & (width - 1) == 0 and not pos_trainable


def hyena_filter(filt, L: int, dot: str | None = None) -> torch.Tensor:
    """The N filters (C, L) fp32 of a hyena.ImplicitFilter, a tuple: two kernels forward (the MLP; W4 a3^T and
    the window), 2 N + 1 backward. Reference: hyena.ImplicitFilter.forward. dot: the precision of the big products
    (FILTER["dot"] if None); the MLP's are FILTER["mlp_dot"]."""
    w4 = filt.ffn[-1].weight
    _runnable(w4, "hyena_filter")
    if L > filt.l_max:
        raise ValueError(f"hyena_filter: {L} positions, the filter has l_max = {filt.l_max}")
    F_ = filt.ffn[0].out_features
    if not hyena_filter_supports(F_):
        raise ValueError(f"hyena_filter: the filter width must be a power of 2 >= 16 (got {F_}); "
                         f"use the plain path")
    params = [filt.act.freq, filt.ffn[0].weight, filt.ffn[0].bias, filt.ffn[1].weight, filt.ffn[1].bias,
              filt.ffn[2].weight, filt.ffn[2].bias, w4]
    for p in params:
        _check("filter parameter", p, dtypes=(torch.float32,))
    return ImplicitFilterFunction.apply(L, filt.order, dot or FILTER["dot"], filt.pos, filt.t_norm, filt.deltas,
                                        *[p.contiguous() for p in params])


if __name__ == "__main__":  # no command line of its own: the benchmarks live in bench.py
    import sys
    args = [a for a in sys.argv[1:] if a != "--bench"]
    sys.exit(f"kernels.py has no command line; the benchmarks moved to bench.py: "
             f"python bench.py {' '.join(args) if args else 'mhc|linearity|tpa|hyena'}")
