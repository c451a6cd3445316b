"""
mhc.py -- Hyper-Connections (HC) and Manifold-Constrained Hyper-Connections (mHC).

    python mhc.py                       # CPU self-demo: Sinkhorn, composite gains, init == plain residual
    python train.py --arch hc           # dynamic HC, expansion rate 4 (--hc-rate, --hc-mode static)
    python train.py --arch mhc          # mHC

Papers
    Zhu et al., "Hyper-Connections", ICLR 2025, arXiv 2409.19606 (HC; Sec. 2-3, Eq. 1-7).
    Xie et al. (DeepSeek-AI), "mHC: Manifold-Constrained Hyper-Connections", arXiv 2512.24880 (Eq. 7-9).

The idea. A transformer keeps one residual vector per token. HC keeps n of them, a stream matrix
h in R^{n x C} per token. Every sub-layer (attention and MLP count separately) reads a weighted mix of
the streams, writes its output back into each stream with its own weight, and the streams mix with
each other through an n x n matrix:

    h' = H_res h + H_post^T F(H_pre h)          H_pre, H_post in R^{1 x n},  H_res in R^{n x n}

HC learns these freely (plus a token-dependent part). Over L sub-layers the residual path multiplies
the H_res's together, and nothing stops that product from growing or shrinking exponentially with
depth: the mHC paper measures composite gains near 3000 in a 27B HC model. mHC projects each H_res onto
the doubly-stochastic matrices (entries >= 0, every row and column sums to 1) with Sinkhorn-Knopp.
Those are closed under products and never amplify (spectral norm <= 1), so the composite stays bounded.

Notation (shape comments use these letters)
    B batch, T time, C model width, n number of streams (expansion rate), N = B*T tokens
    h (B, T, n, C)       the residual streams          f (B, T, C)       a sub-layer's output
    pre, post (B, T, n)  H_pre, H_post per token       res (B, T, n, n)  H_res per token
Convention: res[i, j] is the weight of input stream j in output stream i, out_i = sum_j res_ij h_j
(the paper's H_res x_l with x_l's rows as streams). HC's A_r is its transpose.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

# ----------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp and the gain diagnostic


def sinkhorn_knopp(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """Project (..., n, n) logits onto (nearly) doubly-stochastic matrices, in fp32 (fp64 stays fp64).

    The paper's map (mHC Eq. 9): M_0 = exp(logits), then iters times: divide each column by its sum, then
    each row by its sum. Iteration 1's column step is a softmax per column, so we start there, shifted by
    each column's own max, and add eps to every entry (as DeepSeek's code does): no column or row can
    underflow to zero, however far its logits lie below the rest, and the gradients stay finite (with one
    max per matrix and eps only in the divisions, logits of std 40 give NaN). Rows are normalised last,
    so they sum to 1 up to eps (~1e-6); columns only as closely as iters iterations converge. Without eps
    this is exactly the paper's map."""
    if iters < 1:
        raise ValueError(f"sinkhorn_knopp: iters must be at least 1 (got {iters})")
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32, or fp64 for gradcheck
    m = torch.softmax(x, dim=-2) + eps  # iteration 1, columns: M_ij = exp(x_ij) / sum_k exp(x_kj), + eps
    m = m / (m.sum(dim=-1, keepdim=True) + eps)  # iteration 1, rows: M_ij / sum_k M_ik
    for _ in range(iters - 1):  # iterations 2 .. iters
        m = m / (m.sum(dim=-2, keepdim=True) + eps)  # columns: M_ij / sum_k M_kj
        m = m / (m.sum(dim=-1, keepdim=True) + eps)  # rows: M_ij / sum_k M_ik
    return m


def amax_gain(res: torch.Tensor) -> tuple[float, float]:
    """The mHC paper's Amax gain magnitude of (..., n, n) matrices, averaged over the leading dims.

    forward gain = max_i sum_j |res_ij| (max absolute row sum: how much a stream can grow going up),
    backward gain = max_j sum_i |res_ij| (max absolute column sum: the same for gradients going down).
    The paper's words (Fig. 3 and 7), "maximum absolute row sum ... averaged over all tokens", allow other
    readings that give different HC values: averaging the matrices over tokens first, or |sum_j res_ij|
    rather than sum_j |res_ij|. We take each token's own max (the induced infinity-norm of that token's
    map, a bound on how much it can amplify any signal), then average over tokens. Averaging the matrices
    first is never larger and hides growth when tokens amplify different streams (n tokens, each scaling
    its own stream by a: a for us, (a + n - 1) / n for it). For mHC the readings agree up to Sinkhorn's
    tolerance: entries are >= 0 and every token's rows sum to 1."""
    a = res.abs().float()
    return a.sum(-1).amax(-1).mean().item(), a.sum(-2).amax(-1).mean().item()


def composite(res_list: list[torch.Tensor]) -> torch.Tensor:
    """P = res_L ... res_2 res_1: the map from the first sub-layer's streams to the last one's output."""
    p = res_list[0].float()
    for res in res_list[1:]:
        p = res.float() @ p  # (..., n, n)
    return p


# ----------------------------------------------------------------------------------------------------
# The stream update shared by HC and mHC


def pre_mix(h: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """x_in = H_pre h = sum_j pre_j h_j: the sub-layer's input. h (B, T, n, C), pre (B, T, n) -> (B, T, C),
    fp32 with autocast off: the streams are the residual path, and bf16 mixing would lose what a plain
    fp32 residual keeps."""
    with torch.autocast(h.device.type, enabled=False):
        return torch.einsum("btn,btnc->btc", pre, h.float())


def write_back(h: torch.Tensor, out: torch.Tensor, post: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """h' = H_res h + H_post^T out: h (B, T, n, C), out (B, T, C), post (B, T, n), res (B, T, n, n) ->
    (B, T, n, C) in fp32 (autocast off, as in pre_mix). kernels.mhc_post_res fuses it."""
    with torch.autocast(h.device.type, enabled=False):
        mixed = torch.einsum("btij,btjc->btic", res, h.float())  # (B, T, n, C): H_res h
        return mixed + post.unsqueeze(-1) * out.float().unsqueeze(2)


def hyper_update(h: torch.Tensor, pre, post, res, f) -> torch.Tensor:
    """One sub-layer with hyper-connections: h' = res h + post^T f(pre h).

    h (B, T, n, C); pre, post (B, T, n) and res (B, T, n, n) in fp32; f maps (B, T, C) -> (B, T, C)
    and normalises its input itself (the sub-layer's pre-norm)."""
    out = f(pre_mix(h, pre).to(h.dtype))
    return write_back(h, out, post, res).to(h.dtype)


class HyperStream(nn.Module):
    """Residual-stream policy for HC and mHC: n streams per token.

    expand: repeat the embedding n times (HC Sec. 2.1). collapse: the papers sum the streams; we take
    their mean. After the final RMSNorm the two differ only through the norm's eps, and the mean keeps
    the hidden states on the plain model's scale (at init they equal it). Subclasses set Connection.
    Storage: the streams keep the dtype GPT.forward casts the embedding to (--residual-dtype): fp32 by default, or
    bf16 as the mHC paper stores them (Eq. 11), which halves the bytes every connection moves; the
    connections compute in fp32 either way (pre_mix, write_back, the kernels)."""

    def __init__(self, cfg):
        super().__init__()
        self.n = cfg.hc_rate

    def expand(self, x):
        return x.unsqueeze(2).repeat(1, 1, self.n, 1)  # (B, T, C) -> (B, T, n, C)

    def collapse(self, h):
        return h.mean(dim=2)  # (B, T, n, C) -> (B, T, C)

    @torch.no_grad()
    def diagnostics(self, model, idx) -> dict:
        """H_res of every sub-layer on the tokens idx: per-layer and composite Amax gains, and the range
        of column sums (the side Sinkhorn leaves approximate)."""
        connections = [m for m in model.modules() if isinstance(m, (HCConnection, MHCConnection))]
        for c in connections:
            c.record = True
        model(idx)
        res_list = [c.last_res for c in connections]  # sub-layer order: block 0 mixer, block 0 MLP, ...
        for c in connections:
            c.record, c.last_res = False, None
        layer = [amax_gain(r) for r in res_list]
        fwd, bwd = amax_gain(composite(res_list))
        cols = torch.stack([r.sum(-2) for r in res_list])  # (2L, B, T, n)
        return {"gain_fwd": fwd, "gain_bwd": bwd, "layer_gain_fwd": [g[0] for g in layer],
                "layer_gain_bwd": [g[1] for g in layer], "col_sum_min": cols.min().item(),
                "col_sum_max": cols.max().item()}


# ----------------------------------------------------------------------------------------------------
# HC (Zhu et al.): static and dynamic


class HCConnection(nn.Module):
    """Hyper-connection of one sub-layer (HC Sec. 2.2-2.3), in the paper's names:

        A_m (n,)    input weights   -> pre  = A_m(h)          (H_pre)
        B   (n,)    output weights  -> post = B(h)            (H_post)
        A_r (n, n)  stream mixing   -> res  = A_r(h)^T        (H_res; A_r[j, i] = weight of stream j in i)
    Static: the parameters themselves. Dynamic (DHC), per token with hbar = norm(h) per stream:
        B(h)   = s_b * tanh(hbar W_b)^T + B        A_m(h) = s_a * tanh(hbar W_m) + A_m
        A_r(h) = s_a * tanh(hbar W_r) + A_r        W_b, W_m (C,), W_r (C, n), zero-initialised
    Init (HC Sec. 3, "equivalent to Pre-Norm"): B = 1, A_m = one-hot at stream (index mod n), A_r = I,
    s_a = s_b = 0.01. The norm is an RMSNorm with a learnable gain, like the rest of our GPT (the
    paper's code uses its model's norm layer).
    """

    def __init__(self, cfg, index: int):
        super().__init__()
        n, C = cfg.hc_rate, cfg.n_embd
        self.n, self.index, self.dynamic = n, index, cfg.hc_mode == "dynamic"
        self.static_pre = nn.Parameter(torch.empty(n))  # A_m
        self.static_post = nn.Parameter(torch.empty(n))  # B
        self.static_res = nn.Parameter(torch.empty(n, n))  # A_r
        for p in (self.static_pre, self.static_post, self.static_res):
            p.no_weight_decay = True  # HC: no weight decay on the static matrices
        if self.dynamic:
            self.norm_weight = nn.Parameter(torch.empty(C))
            self.w_pre = nn.Parameter(torch.empty(C))  # W_m
            self.w_post = nn.Parameter(torch.empty(C))  # W_b
            self.w_res = nn.Parameter(torch.empty(C, n))  # W_r
            self.scale_a = nn.Parameter(torch.empty(()))  # s_a
            self.scale_b = nn.Parameter(torch.empty(()))  # s_b
            # HC Sec. 4: the static parts get no weight decay, "the dynamic component does": W and s of
            # Eqs. 11-13, vectors and scalars too (train.py decays only matrices unless told); the norm's
            # gain is treated as every norm's gain in the model (no decay).
            for p in (self.w_pre, self.w_post, self.w_res, self.scale_a, self.scale_b):
                p.weight_decay = True
        self.record, self.last_res = False, None
        self.use_kernels = False  # train.py --kernels: an edit of write_back runs only with --kernels off
        self.kernel_replaces = ("mhc.write_back",)
        self.kernel_supported = kernels.mhc_post_res_supports(n)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        self.static_pre.copy_(F.one_hot(torch.tensor(self.index % self.n), self.n).float())
        self.static_post.fill_(1.0)
        self.static_res.copy_(torch.eye(self.n))
        if self.dynamic:
            self.norm_weight.fill_(1.0)
            for w in (self.w_pre, self.w_post, self.w_res):
                w.zero_()
            self.scale_a.fill_(0.01)
            self.scale_b.fill_(0.01)

    def coefficients(self, h):
        """pre, post (B, T, n) and res (B, T, n, n), fp32."""
        pre, post, a_r = self.static_pre, self.static_post, self.static_res
        if self.dynamic:
            with torch.autocast(h.device.type, enabled=False):
                hbar = F.rms_norm(h.float(), (h.size(-1),), self.norm_weight, 1e-6)  # (B, T, n, C)
                pre = pre + self.scale_a * torch.tanh(hbar @ self.w_pre)  # (B, T, n)
                post = post + self.scale_b * torch.tanh(hbar @ self.w_post)  # (B, T, n)
                a_r = a_r + self.scale_a * torch.tanh(hbar @ self.w_res)  # (B, T, n, n): A_r[j, i]
        else:
            shape = h.shape[:2]
            pre, post, a_r = pre.expand(*shape, -1), post.expand(*shape, -1), a_r.expand(*shape, -1, -1)
        return pre, post, a_r.transpose(-2, -1)  # res = A_r^T

    def forward(self, h, f):
        pre, post, res = self.coefficients(h)
        if self.record:
            self.last_res = res.detach()
        write = kernels.mhc_post_res if self.use_kernels else write_back  # the pre-mix stays plain
        return write(h, f(pre_mix(h, pre).to(h.dtype)), post, res).to(h.dtype)  # hyper_update's two steps


class HCStream(HyperStream):
    Connection = HCConnection


# ----------------------------------------------------------------------------------------------------
# mHC (Xie et al.): Eq. 7-9


class MHCConnection(nn.Module):
    """Manifold-constrained hyper-connection of one sub-layer (mHC Eq. 7-9). Per token:

        v = vec(h) (nC,),  r = 1 / sqrt(mean(v^2) + eps)                 RMSNorm of the flattened streams
        c = r * (v phi)    (n^2 + 2n,)   phi = [phi_pre | phi_post | phi_res]  (nC, n^2 + 2n), one matmul
        pre  = sigmoid(a_pre * c[:n] + b_pre)                            H_pre  >= 0
        post = 2 sigmoid(a_post * c[n:2n] + b_post)                      H_post in (0, 2)
        res  = SinkhornKnopp(a_res * mat(c[2n:]) + b_res)                H_res doubly stochastic
    All coefficient math runs in fp32. The RMSNorm is applied after the matmul (DeepSeek's order; the
    same value) and has no gain of its own: phi would absorb it.

    Choices the paper leaves open (ours): phi = 0, so every token starts with the same coefficients and
    the gates a = 0.01 (paper Table 5) decide how fast they become token-dependent; b_pre = logit(1/n)
    (pre = 1/n: the mean of identical streams is the plain residual); b_post = 0 (post = 1);
    b_res = 0 on the diagonal and -5 elsewhere (res close to I). At init the streams are identical, so
    any row-stochastic res leaves them unchanged and the model computes what a plain pre-norm residual
    model computes, up to Sinkhorn's eps: res's rows sum to 1 - 1e-6, so each sub-layer scales the
    residual by that, a relative drift of ~1e-6 per sub-layer (~3e-5 in the hidden state after 24 layers;
    test_all.py checks 3 layers within 1e-5).
    """

    def __init__(self, cfg, index: int):
        super().__init__()
        n, C = cfg.hc_rate, cfg.n_embd
        if n < 2:  # H_pre starts at 1/n = sigmoid(b_pre): n = 1 would need b_pre = +inf
            raise ValueError(f"mHC needs at least 2 streams (hc_rate {n})")
        self.n, self.iters = n, cfg.sinkhorn_iters
        self.phi = nn.Parameter(torch.empty(n * C, n * n + 2 * n))
        self.gates = nn.Parameter(torch.empty(3))  # a_pre, a_post, a_res
        self.b_pre = nn.Parameter(torch.empty(n))
        self.b_post = nn.Parameter(torch.empty(n))
        self.b_res = nn.Parameter(torch.empty(n, n))
        self.b_res.no_weight_decay = True  # a bias, though 2-D
        self.record, self.last_res = False, None
        self.use_kernels = False  # train.py --kernels: edits of the functions below run only with --kernels off
        self.kernel_replaces = ("mhc.MHCConnection.coefficients", "mhc.sinkhorn_knopp", "mhc.pre_mix",
                                "mhc.write_back")
        self.kernel_supported = kernels.mhc_pre_supports(n) and kernels.mhc_post_res_supports(n)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        n = self.n
        self.phi.zero_()
        self.gates.fill_(0.01)
        self.b_pre.fill_(math.log((1 / n) / (1 - 1 / n)))  # logit(1/n)
        self.b_post.zero_()
        self.b_res.copy_(torch.full((n, n), -5.0).fill_diagonal_(0.0))

    def coefficients(self, h):
        n = self.n
        B, T = h.shape[:2]
        with torch.autocast(h.device.type, enabled=False):
            v = h.float().reshape(B, T, n * h.size(-1))  # (B, T, nC)
            r = torch.rsqrt(v.pow(2).mean(dim=-1, keepdim=True) + 1e-6)  # (B, T, 1)
            c = (v @ self.phi) * r  # (B, T, n^2 + 2n)
            pre = torch.sigmoid(self.gates[0] * c[..., :n] + self.b_pre)  # (B, T, n)
            post = 2 * torch.sigmoid(self.gates[1] * c[..., n:2 * n] + self.b_post)  # (B, T, n)
            logits = self.gates[2] * c[..., 2 * n:].reshape(B, T, n, n) + self.b_res  # (B, T, n, n)
            res = sinkhorn_knopp(logits, self.iters)
        return pre, post, res

    def forward(self, h, f):
        if self.use_kernels:  # kernels.py: the pre path (coefficients, pre-mix), then the write-back
            x_in, post, res, h = kernels.mhc_pre(h, self.phi, self.gates, self.b_pre, self.b_post, self.b_res,
                                                 self.iters)  # h passed through: see MHCPreFunction
            out = kernels.mhc_post_res(h, f(x_in), post, res)
        else:
            pre, post, res = self.coefficients(h)
            out = hyper_update(h, pre, post, res, f)
        if self.record:
            self.last_res = res.detach()
        return out


class MHCStream(HyperStream):
    Connection = MHCConnection


# ----------------------------------------------------------------------------------------------------
# The gain curves of training runs (python mhc.py --gains METRICS...)


def plot_gains(metrics_paths: list[str], out: str) -> None:
    """Amax gain over training from train.py's metrics.jsonl of hc/mhc runs (the rows it writes at each
    evaluation): a table of each run's largest values, and, with matplotlib, a plot of the composite's
    forward gain and the largest single sub-layer's against the step."""
    runs = {}
    for path in metrics_paths:
        if not os.path.isfile(path):
            raise SystemExit(f"error: no metrics file {path} (train.py writes OUT_DIR/metrics.jsonl)")
        with open(path) as f:
            rows = [r for r in map(json.loads, f) if "gain_fwd" in r]
        if not rows:
            raise SystemExit(f"error: {path} has no Amax gain rows (was it an --arch hc or mhc run?)")
        runs[os.path.basename(os.path.dirname(os.path.abspath(path)))] = rows
    print("| run | evaluations | composite gain fwd (max) | composite gain bwd (max) | largest sub-layer fwd (max) |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in runs.items():
        print(f"| {name} | {len(rows)} | {max(r['gain_fwd'] for r in rows):.3f} | "
              f"{max(r['gain_bwd'] for r in rows):.3f} | {max(max(r['layer_gain_fwd']) for r in rows):.3f} |")
    try:  # matplotlib is optional: the table above is the result, the plot a view of it
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in runs.items():
        steps = [r["step"] for r in rows]
        line, = ax.plot(steps, [r["gain_fwd"] for r in rows], marker="o", label=f"{name}: composite")
        ax.plot(steps, [max(r["layer_gain_fwd"]) for r in rows], ls="--", color=line.get_color(),
                label=f"{name}: largest sub-layer")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("forward Amax gain (max abs row sum)")
    ax.legend()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"plot: {out}")


# ----------------------------------------------------------------------------------------------------
# Self-demo (CPU, seconds), or --gains

if __name__ == "__main__":
    import argparse
    from types import SimpleNamespace

    parser = argparse.ArgumentParser(description="CPU self-demo of HC/mHC; or plot Amax gains of training runs.")
    parser.add_argument("--gains", nargs="+", metavar="METRICS_JSONL",
                        help="plot the Amax gain curves of these runs (e.g. out/hc/metrics.jsonl out/mhc/metrics.jsonl)")
    parser.add_argument("--out", default="out/amax_gain.png", help="where --gains writes its plot")
    args = parser.parse_args()
    if args.gains:
        plot_gains(args.gains, args.out)
        raise SystemExit(0)

    torch.manual_seed(0)
    n, depth = 4, 48
    print("1. Sinkhorn-Knopp (20 iterations) of random logits, 10k matrices of 4 x 4:")
    m = sinkhorn_knopp(3 * torch.randn(10_000, n, n))
    print(f"   min entry {m.min():.2e}; |row sum - 1| max {(m.sum(-1) - 1).abs().max():.1e} (exact side); "
          f"|column sum - 1| max {(m.sum(-2) - 1).abs().max():.1e} (approximate side)")
    assert m.min() >= 0 and (m.sum(-1) - 1).abs().max() < 1e-5 and (m.sum(-2) - 1).abs().max() < 0.1

    print(f"\n2. Composite gain of {depth} stacked residual mixings (forward / backward Amax gain):")
    hc = [torch.eye(n) + 0.05 * torch.rand(n, n) for _ in range(depth)]  # each amplifies a little (~1.1)
    mhc = [sinkhorn_knopp(torch.randn(n, n)) for _ in range(depth)]
    last_hc = (1.0, 1.0)
    for d in (1, 6, 12, 24, 48):
        g_hc, g_mhc = amax_gain(composite(hc[:d])), amax_gain(composite(mhc[:d]))
        print(f"   depth {d:2d}: HC {g_hc[0]:8.2f} / {g_hc[1]:8.2f}    mHC {g_mhc[0]:.4f} / {g_mhc[1]:.4f}")
        assert all(abs(g - 1) < 1e-3 for g in g_mhc) and all(g > last for g, last in zip(g_hc, last_hc))
        last_hc = g_hc
    assert min(last_hc) > 10  # HC's gain compounds with depth

    print("\n3. At init, HC and mHC compute what a plain residual stack computes (4 random sub-layers;\n"
          "   mHC up to Sinkhorn's eps: its rows sum to 1 - 1e-6, a relative drift of ~1e-6 per sub-layer):")
    cfg = SimpleNamespace(hc_rate=n, n_embd=16, hc_mode="dynamic", sinkhorn_iters=20)
    layers = [nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU()) for _ in range(4)]
    x = torch.randn(2, 5, 16)
    plain = x
    for f in layers:
        plain = plain + f(plain)
    for name, stream in (("HC", HCStream(cfg)), ("mHC", MHCStream(cfg))):
        h = stream.expand(x)
        for i, f in enumerate(layers):
            h = stream.Connection(cfg, i)(h, f)
        err = (stream.collapse(h) - plain).abs().max().item()
        print(f"   {name}: max |mean of the streams - plain residual| = {err:.1e}")
        # relative to the largest entry: HC to rounding; mHC 4 sub-layers of ~1e-6 drift each, with margin
        assert err < (1e-6 if name == "HC" else 1e-5) * plain.abs().max().item(), (name, err)
