"""
bench.py -- the benchmarks (GPU): the Triton kernels of kernels.py against the plain PyTorch of the
technique files, and where a whole operator spends its GPU time. Results go to RESULTS.md (with the
command, the device and the commit), never into assertions.

    python bench.py mhc                    # Sinkhorn, the mHC pre and write-back paths: ms, speedup vs eager
                                           # and torch.compile, GB/s
    python bench.py linearity              # the cosine regulariser and the cross-Gram statistics
    python bench.py tpa                    # decode us vs cache length (MHA, GQA, TPA); the training kernel
    python bench.py hyena                  # Hyena vs attention from 256 to 64K tokens (table + plot)
    python bench.py hyena --profile 4096   # both whole operators' GPU time per kernel at 4K tokens
    python bench.py mhc --set MHC_POST.block_n=32   # the same with a launch setting of kernels.py changed

Each times on a CUDA GPU with Triton; the header of each table names the GPU, torch and Triton.
"""
import argparse
import ast
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import hyena
import kernels
import linearity
import mhc
import tpa
import train

if kernels.HAVE_TRITON:
    import triton
    from triton.testing import do_bench


# ----------------------------------------------------------------------------------------------------
# GPU time of a call: the kernels it launches, summed (torch.profiler)


def gpu_kernels(fn, iters: int = 20) -> dict[str, list[float]]:
    """The GPU kernels one call of fn launches (torch.profiler): {name: [ms per call, launches per call]}."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    found = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = found.setdefault(e.name, [0.0, 0.0])
            entry[0] += e.time_range.elapsed_us() / iters / 1e3
            entry[1] += 1 / iters
    return found


def gpu_ms(fn, iters: int = 20) -> float:
    """GPU time of one call of fn, ms: the summed duration of the kernels it launches (torch.profiler),
    without the CPU's launch and autograd cost. do_bench's wall-clock median includes that cost, which
    dominates calls of a few tens of microseconds; the benchmarks print both."""
    return sum(ms for ms, _ in gpu_kernels(fn, iters).values())


def print_gpu_kernels(title: str, fn, iters: int = 10, top: int = 20):
    """Where one call of fn spends its GPU time: the `top` largest kernels, then the rest summed."""
    found = sorted(gpu_kernels(fn, iters).items(), key=lambda kv: -kv[1][0])
    total = sum(ms for _, (ms, _) in found)
    print(f"\n# {title}: {total:.3f} ms of GPU time per call, {sum(n for _, (_, n) in found):.0f} kernel launches")
    print("| GPU ms | launches | kernel |\n|-------:|---------:|--------|")
    for name, (ms, n) in found[:top]:
        print(f"| {ms:6.3f} | {n:8.0f} | {name[:100]} |")
    if len(found) > top:
        print(f"| {sum(ms for _, (ms, _) in found[top:]):6.3f} | {sum(n for _, (_, n) in found[top:]):8.0f} "
              f"| {len(found) - top} other kernels |")


# ----------------------------------------------------------------------------------------------------
# One benchmark per technique, in kernels.py's order (train.py's and linearity.py's benchmarks join here)


_BENCH_HEADER = (
    "| op                         | pass    | tokens | eager ms wall / GPU | compiled ms wall / GPU | kernel ms wall / GPU "
    "| vs eager (GPU) | vs compiled (GPU) | GB/s (GPU) | % peak |\n"
    "|----------------------------|---------|-------:|--------------------:|-----------------------:|--------------------:"
    "|---------------:|------------------:|-----------:|-------:|")


def _bench_rows(name, fns, nbytes, tokens):
    """fns: {variant: (forward, forward+backward)} callables. Prints one row per pass: wall-clock median
    (do_bench) and GPU time (gpu_ms) of eager, compiled and kernel; speedups and GB/s from GPU time."""
    rows = {}
    for variant, pair in fns.items():
        rows[variant] = [(do_bench(f, warmup=25, rep=200), gpu_ms(f)) for f in pair]
    for p, pass_name in enumerate(("fwd", "fwd+bwd")):
        (ew, eg), (cw, cg), (kw, kg) = (rows[v][p] for v in ("eager", "compiled", "kernel"))
        gbs = nbytes[p] / (kg * 1e-3) / 1e9
        print(f"| {name:26s} | {pass_name:7s} | {tokens:6d} | {ew:8.3f} / {eg:8.4f} | {cw:11.3f} / {cg:8.4f} "
              f"| {kw:8.3f} / {kg:8.4f} | {eg / kg:13.1f}x | {cg / kg:16.1f}x | {gbs:10.0f} | {100 * gbs / 3350:5.1f}% |")


def bench_mhc():
    torch.manual_seed(0)
    dev = "cuda"
    print(f"# mHC kernels on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("# ms: wall clock (triton.testing.do_bench median; for calls this short mostly the CPU's launch and "
          "autograd cost) / GPU time (bench.gpu_ms); GB/s counts each input read once and each output written "
          "once, over the GPU time; % of the 3.35 TB/s H100 SXM datasheet peak")
    print(_BENCH_HEADER)

    def variants(ref, kern, inputs, grads):
        compiled = torch.compile(ref)

        def fwd_bwd(f):
            def run():
                outs = f(*inputs)
                outs = outs if isinstance(outs, tuple) else (outs,)
                torch.autograd.backward(outs, grads)
            return run

        def fwd(f):
            def run():
                with torch.no_grad():
                    f(*inputs)
            return run
        return {"eager": (fwd(ref), fwd_bwd(ref)), "compiled": (fwd(compiled), fwd_bwd(compiled)),
                "kernel": (fwd(kern), fwd_bwd(kern))}

    # Sinkhorn alone: n = 4, 20 iterations, 16k tokens
    N, n = 16384, 4
    logits = torch.randn(N, n, n, device=dev, requires_grad=True)
    g = torch.randn(N, n, n, device=dev)
    _bench_rows("sinkhorn n=4, 20 iters",
                variants(lambda x: mhc.sinkhorn_knopp(x, 20), lambda x: kernels.sinkhorn(x, 20), [logits], [g]),
                (2 * N * n * n * 4, 4 * N * n * n * 4), N)

    # the mHC pre and post_res paths at the GPT's width: n = 4, C = 384, 32k tokens, bf16 streams
    B, T, C = 64, 512, 384
    cfg = SimpleNamespace(hc_rate=n, n_embd=C, sinkhorn_iters=20)
    conn = mhc.MHCConnection(cfg, 0).to(dev)
    with torch.no_grad():
        conn.phi.normal_(0, 0.02)
    h = torch.randn(B, T, n, C, device=dev, dtype=torch.bfloat16, requires_grad=True)
    params = (conn.phi, conn.gates, conn.b_pre, conn.b_post, conn.b_res)

    def pre_ref(h):
        pre, post, res = conn.coefficients(h)
        return mhc.pre_mix(h, pre).to(h.dtype), post, res

    def pre_kernel(h):
        return kernels.mhc_pre(h, *params, 20)[:3]
    gx = torch.randn(B, T, C, device=dev, dtype=torch.bfloat16)
    gp, gr = torch.randn(B, T, n, device=dev), torch.randn(B, T, n, n, device=dev)
    Nt = B * T
    io_fwd = Nt * (n * C * 2 + C * 2 + (n + n * n) * 4)
    io_bwd = Nt * (n * C * 2 + C * 2 + (n + n * n) * 4 + n * C * 2 + 3 * 48 * 4)
    _bench_rows("mhc_pre n=4 C=384 bf16", variants(pre_ref, pre_kernel, [h], [gx, gp, gr]),
                (io_fwd, io_fwd + io_bwd), Nt)

    f = torch.randn(B, T, C, device=dev, dtype=torch.bfloat16, requires_grad=True)
    post = torch.rand(B, T, n, device=dev, requires_grad=True)
    res = torch.rand(B, T, n, n, device=dev, requires_grad=True)

    def post_ref(h, f, post, res):
        return mhc.write_back(h, f, post, res).to(h.dtype)
    gout = torch.randn(B, T, n, C, device=dev, dtype=torch.bfloat16)
    io_fwd = Nt * ((2 * n + 1) * C * 2 + (n + n * n) * 4)
    io_bwd = Nt * ((2 * n + 1) * C * 2 + (n + n * n) * 4 + (n + 1) * C * 2 + (n + n * n) * 4)
    _bench_rows("mhc_post_res n=4 C=384 bf16", variants(post_ref, kernels.mhc_post_res, [h, f, post, res], [gout]),
                (io_fwd, io_fwd + io_bwd), Nt)


def bench_linearity():
    """The cosine regulariser (7 hidden states of the GPT, bf16, fwd+bwd) and one batch of the cross-Gram
    statistics (16 x 512 tokens, d = 384) against float64 torch, as linearity.PairStats computes them."""
    torch.manual_seed(0)
    dev = "cuda"
    print(f"# linearity kernels on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(_BENCH_HEADER)
    B, T, C, L = 64, 512, 384, 6
    hidden = [torch.randn(B, T, C, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(L + 1)]
    compiled = torch.compile(linearity.cosine_regulariser)

    def fwd(f):
        def run():
            with torch.no_grad():
                f(hidden)
        return run

    def fwd_bwd(f):
        return lambda: f(hidden).backward()
    fns = {name: (fwd(f), fwd_bwd(f)) for name, f in
           (("eager", linearity.cosine_regulariser), ("compiled", compiled), ("kernel", kernels.cosine_regulariser))}
    io = (L + 1) * B * T * C * 2
    _bench_rows(f"cosine reg, {L + 1} states C={C}", fns, (2 * L * B * T * C * 2, 2 * L * B * T * C * 2 + 4 * io),
                B * T)

    N, D = 16 * 512, 384
    x = torch.randn(N, D, device=dev) * 3 + 10
    y = x + torch.tanh(x)

    t64 = do_bench(lambda: linearity.PairStats(D, dev).update(x, y), warmup=10, rep=100)
    tk = do_bench(lambda: linearity.PairStats(D, dev, use_kernel=True).update(x, y), warmup=10, rep=100)
    flops = 2 * N * D * D * 1.5  # the upper half of X^T X and all of X^T D
    print(f"\nPairStats.update of one batch, N = {N}, d = {D}, fp32 inputs: float64 torch {t64:.3f} ms, "
          f"kernel {tk:.3f} ms ({t64 / tk:.1f}x, {flops / tk / 1e9:.1f} TFLOP/s of fp32 FMA)")


def bench_tpa(max_len: int = 65536):
    """Decoding one token over a cache of 1K..max_len tokens (B = 16, h = 12, d = 64, bf16): MHA and GQA
    (G = 4) through SDPA vs FlashTPA at ranks (6, 2, 2); then the training kernel (Q, K, V of one layer
    from factors at the default model's shape, fwd and fwd+bwd) vs eager and compiled PyTorch."""
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    B, h, d, G, rk, rv = 16, 12, 64, 4, 2, 2
    print(f"# TPA kernels on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"# decode: one query token per sequence, B = {B}, h = {h}, d = {d}, bf16; GPU us (bench.gpu_ms), and "
          f"TPA's wall clock (do_bench median, which adds the CPU's launch cost); GB/s counts the cache bytes read "
          f"over the GPU time; % of the 3.35 TB/s H100 SXM datasheet peak")
    print(f"# values cached per token: MHA {2 * h * d}, GQA (G={G}) {2 * G * d}, TPA ranks (6,2,2) "
          f"{(rk + rv) * (h + d)}")
    print("| cache tokens | MHA us | MHA GB/s | GQA us | GQA GB/s | TPA us | TPA GB/s | TPA % peak | TPA vs MHA "
          "| TPA wall us |")
    print("|-------------:|-------:|---------:|-------:|---------:|-------:|---------:|-----------:|-----------:"
          "|------------:|")
    M = 1024
    while M <= max_len:
        q = torch.randn(B, h, 1, d, device=dev, dtype=bf16)
        k, v = (torch.randn(B, h, M, d, device=dev, dtype=bf16) for _ in range(2))
        t_mha = gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v)) * 1e3
        del k, v
        kg, vg = (torch.randn(B, G, M, d, device=dev, dtype=bf16) for _ in range(2))
        t_gqa = gpu_ms(lambda: F.scaled_dot_product_attention(q, kg, vg, enable_gqa=True)) * 1e3
        del kg, vg
        cache = [torch.randn(B, M, r, n, device=dev, dtype=bf16) for r, n in ((rk, h), (rk, d), (rv, h), (rv, d))]
        t_tpa = gpu_ms(lambda: kernels.tpa_decode(q[:, :, 0], *cache, M)) * 1e3
        wall_tpa = do_bench(lambda: kernels.tpa_decode(q[:, :, 0], *cache, M), warmup=10, rep=100) * 1e3
        del cache
        gbs = [B * M * n * 2 / (t * 1e-6) / 1e9 for n, t in ((2 * h * d, t_mha), (2 * G * d, t_gqa),
                                                             ((rk + rv) * (h + d), t_tpa))]
        print(f"| {M:12d} | {t_mha:6.1f} | {gbs[0]:8.0f} | {t_gqa:6.1f} | {gbs[1]:8.0f} | {t_tpa:6.1f} | "
              f"{gbs[2]:8.0f} | {100 * gbs[2] / 3350:9.1f}% | {t_mha / t_tpa:9.2f}x | {wall_tpa:11.1f} |", flush=True)
        torch.cuda.empty_cache()
        M *= 4

    # training: the three factor products of one TPA layer at the default model (C 384 -> h 12, d 64)
    print()
    print(_BENCH_HEADER)
    Bt, T, ranks = 64, 512, (6, 2, 2)
    rotary = train.Rotary(d, T, 10000.0).to(dev)
    a = torch.randn(Bt, T, sum(ranks) * h, device=dev, dtype=bf16, requires_grad=True)
    b = torch.randn(Bt, T, sum(ranks) * d, device=dev, dtype=bf16, requires_grad=True)

    def split(a, b):
        return (a.view(Bt, T, sum(ranks), h).split(ranks, dim=2), b.view(Bt, T, sum(ranks), d).split(ranks, dim=2))

    def ref(a, b):  # what TPAttention.forward does without kernels, up to SDPA's inputs
        (aq, ak, av), (bq, bk, bv) = split(a, b)
        return (tpa.factor_product(aq, rotary(bq)).transpose(1, 2), tpa.factor_product(ak, rotary(bk)).transpose(1, 2),
                tpa.factor_product(av, bv).transpose(1, 2))

    def kern(a, b):
        (aq, ak, av), (bq, bk, bv) = split(a, b)
        return (kernels.tpa_factor_product(aq, bq, rotary.cos, rotary.sin),
                kernels.tpa_factor_product(ak, bk, rotary.cos, rotary.sin), kernels.tpa_factor_product(av, bv))
    grads = [torch.randn(Bt, h, T, d, device=dev, dtype=bf16) for _ in range(3)]
    compiled = torch.compile(ref)

    def fwd(f):
        def run():
            with torch.no_grad():
                f(a, b)
        return run

    def fwd_bwd(f):
        return lambda: torch.autograd.backward(f(a, b), grads)
    fns = {name: (fwd(f), fwd_bwd(f)) for name, f in (("eager", ref), ("compiled", compiled), ("kernel", kern))}
    n_tok = Bt * T
    io_fwd = n_tok * (sum(ranks) * (h + d) + 3 * h * d) * 2
    io_bwd = n_tok * (3 * h * d + 2 * sum(ranks) * (h + d)) * 2
    _bench_rows("TPA Q/K/V from factors", fns, (io_fwd, io_fwd + io_bwd), n_tok)


def _mixer_step(arch: str, L: int, D: int, filters: str | None = None):
    """One fwd+bwd of a whole token mixer as train.py builds it (B = 1, bf16 autocast; "gpt": attention,
    "hyena": HyenaMixer with kernels), or with filters="kernel" / "plain" only the Hyena filters."""
    dev = "cuda"
    cfg = train.GPTConfig(arch=arch, n_embd=D, n_head=D // 64, block_size=L)
    mixer = (train.CausalSelfAttention(cfg, 0) if arch == "gpt" else hyena.HyenaMixer(cfg, 0)).to(dev)
    if arch == "hyena":
        mixer.use_kernels = True
    x = torch.randn(1, L, D, device=dev, requires_grad=True)
    g = torch.randn(1, L, D, device=dev, dtype=torch.bfloat16)
    g_filters = torch.randn(cfg.hyena_order, D, L, device=dev)

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as train.py trains
            if filters is None:
                y = mixer(x)
            else:  # "kernel" or "plain"
                y = kernels.hyena_filter(mixer.filter, L) if filters == "kernel" else mixer.filter(L).unbind(0)
        torch.autograd.backward(y, g if filters is None else g_filters.unbind(0))
        x.grad = None
        mixer.zero_grad(set_to_none=True)
    return run


def profile_hyena(L: int, D: int = 768):
    """Per-kernel GPU time of the whole attention and Hyena operators at L tokens (B = 1)."""
    print(f"# whole token mixers, B = 1, D = {D}, L = {L}, fwd+bwd under bf16 autocast, "
          f"{torch.cuda.get_device_name()}")
    for arch, name in (("gpt", "attention operator"), ("hyena", "Hyena operator (kernels)")):
        torch.manual_seed(0)
        print_gpu_kernels(name, _mixer_step(arch, L, D))


def bench_hyena(max_len: int = 65536, plot: str | None = "out/hyena_speed.png", json_path: str | None = None):
    """Order-2 Hyena mixing (two long convolutions with skip and gate) vs causal SDPA attention, forward
    + backward, B = 1, D = 768 (12 heads of 64), bf16, from 256 tokens up; then batches at the model's width;
    then, at B = 1, the whole token mixers (projections included; Hyena's short conv and filters). Each
    is timed twice: wall clock (do_bench) and GPU time (gpu_ms); at B = 1 and short lengths the
    wall clock is the CPU's launch and autograd cost for every column, so the ratios use GPU time."""
    dev = "cuda"
    print(f"# Hyena order 2 vs attention on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; fwd+bwd ms, wall clock (do_bench median) / GPU time (kernels' sum)")
    print("# attention = F.scaled_dot_product_attention(is_causal=True); plain = hyena.long_conv_gate (torch.fft, "
          "fp32); Toeplitz, Monarch and FFT = the three kernel paths; kernel = hyena_long_conv, which picks one by "
          f"kernels.HYENA_CONV {kernels.HYENA_CONV} and MONARCH {kernels.MONARCH}")
    print("| B  | D   | L      | attention wall / GPU | plain wall / GPU | Toeplitz GPU | Monarch GPU | FFT path GPU "
          "| kernel wall | kernel vs plain (GPU) | kernel vs attention (GPU) |")
    print("|----|-----|-------:|---------------------:|-----------------:|-------------:|------------:|-------------:"
          "|------------:|----------------------:|--------------------------:|")
    results = []

    def order2(conv, v, x1, x2, h, skip):
        return conv(conv(v, x1, h[0], skip[0]), x2, h[1], skip[1])

    def fwd_bwd(fn, inputs, grad):
        def run():
            torch.autograd.backward(fn(), grad)
            for t in inputs:
                t.grad = None
        return run

    def path(name):  # hyena_long_conv forced onto one path
        return lambda *args: kernels.hyena_long_conv(*args, path=name)

    ops = []  # (L, attention operator ms, Hyena operator ms, its filters' ms)

    shapes = [(1, 768, 256 << i) for i in range(20) if 256 << i <= max_len]
    shapes += [(8, 384, 512), (8, 384, 2048), (32, 384, 512), (64, 384, 512)]  # batches at the model's width
    for B, D, L in shapes:
        torch.manual_seed(0)
        # separate leaf tensors, as q, k, v are for attention: the timings are the operators', without
        # autograd's gathering of gradients into a shared parent
        v, x1, x2 = (torch.randn(B, D, L, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        h = [(torch.randn(D, L, device=dev) * 0.02).requires_grad_() for _ in range(2)]
        skip = [torch.randn(D, device=dev, requires_grad=True) for _ in range(2)]
        leaves = (v, x1, x2, *h, *skip)
        g = torch.randn(B, D, L, device=dev, dtype=torch.bfloat16)
        q, k, val = (torch.randn(B, D // 64, L, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
                     for _ in range(3))
        g_att = torch.randn(B, D // 64, L, 64, device=dev, dtype=torch.bfloat16)
        att = fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, val, is_causal=True), (q, k, val), g_att)
        runs = {name: fwd_bwd(lambda conv=conv: order2(conv, v, x1, x2, h, skip), leaves, g)
                for name, conv in (("plain", hyena.long_conv_gate), ("kernel", kernels.hyena_long_conv))}
        if L <= 16384:  # O(L^2): beyond this it only shows what the FFT path avoids
            runs["toeplitz"] = fwd_bwd(lambda: order2(path("toeplitz"), v, x1, x2, h, skip), leaves, g)
        if L <= kernels.MONARCH["max_len"]:
            runs["monarch"] = fwd_bwd(lambda: order2(path("monarch"), v, x1, x2, h, skip), leaves, g)
        runs["fft"] = fwd_bwd(lambda: order2(path("fft"), v, x1, x2, h, skip), leaves, g)
        wall = {name: do_bench(fn, warmup=10, rep=100)
                for name, fn in (("attention", att), ("plain", runs["plain"]), ("kernel", runs["kernel"]))}
        gpu = {name: gpu_ms(fn) for name, fn in [("attention", att)] + list(runs.items())}
        toe, mon = (f"{gpu[k]:{w}.3f}" if k in gpu else f"{'-':>{w}s}" for k, w in (("toeplitz", 12), ("monarch", 11)))
        if B == 1:
            gpu["attention_op"], gpu["hyena_op"] = (gpu_ms(_mixer_step(arch, L, D)) for arch in ("gpt", "hyena"))
            gpu["hyena_filters"], gpu["hyena_filters_plain"] = (gpu_ms(_mixer_step("hyena", L, D, filters=f))
                                                                for f in ("kernel", "plain"))
            ops.append((L, gpu["attention_op"], gpu["hyena_op"], gpu["hyena_filters"], gpu["hyena_filters_plain"]))
        results.append((B, D, L, gpu))
        print(f"| {B:2d} | {D:3d} | {L:6d} | {wall['attention']:9.3f} / {gpu['attention']:8.3f} "
              f"| {wall['plain']:7.3f} / {gpu['plain']:6.3f} | {toe} | {mon} | {gpu['fft']:12.3f} | {wall['kernel']:11.3f} "
              f"| {gpu['plain'] / gpu['kernel']:20.1f}x | {gpu['attention'] / gpu['kernel']:24.2f}x |", flush=True)
        torch.cuda.empty_cache()
    print("\n# Whole operators, B = 1, D = 768, fwd+bwd GPU ms under bf16 autocast: train.py's CausalSelfAttention "
          "(QKV and output projections, RoPE, SDPA) vs hyena.HyenaMixer with kernels (projections, short conv, "
          "implicit filters, the order-2 mixing above); the filters alone by hyena_filter and in PyTorch")
    print("| L      | attention operator | Hyena operator | of which implicit filters (kernel) | the filters in PyTorch "
          "| Hyena vs attention |")
    print("|-------:|-------------------:|---------------:|-----------------------------------:|-----------------------:"
          "|-------------------:|")
    for L, att_ms, hy_ms, filter_ms, plain_ms in ops:
        print(f"| {L:6d} | {att_ms:18.3f} | {hy_ms:14.3f} | {filter_ms:34.3f} | {plain_ms:22.3f} "
              f"| {att_ms / hy_ms:17.2f}x |")
    if json_path:  # for compare.py's claims table
        with open(json_path + ".tmp", "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "unit": "fwd+bwd GPU ms",
                       "rows": [{"B": B, "D": D, "L": L, "gpu_ms": gpu} for B, D, L, gpu in results]}, f, indent=1)
        os.replace(json_path + ".tmp", json_path)
        print(f"json: {json_path}")
    if plot:
        plt = train.pyplot()
        if plt is None:
            print("(matplotlib is not installed: no plot)")
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, name in (("attention", "attention (SDPA)"), ("plain", "Hyena, plain (torch.fft)"),
                          ("toeplitz", "Hyena, Toeplitz kernel"), ("monarch", "Hyena, Monarch kernel"),
                          ("fft", "Hyena, FFT path kernels"),
                          ("kernel", "Hyena, kernels (dispatched)")):
            pts = [(L, gpu[key]) for B, _, L, gpu in results if B == 1 and key in gpu]
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("fwd+bwd GPU ms (B=1, D=768, bf16)")
        ax.set_title(torch.cuda.get_device_name())
        ax.legend()
        os.makedirs(os.path.dirname(plot) or ".", exist_ok=True)
        fig.savefig(plot, dpi=120, bbox_inches="tight")
        print(f"plot: {plot}")


# ----------------------------------------------------------------------------------------------------
# Command line: one subcommand per benchmark


def apply_settings(assignments: list[str]) -> list[str]:
    """--set DICT.key=value: change one of kernels.py's launch-setting dicts before timing (a Python
    literal, or a bare word for a string: --set MHC_PRE.dot=ieee). Returns the changes, to print."""
    tables = sorted(k for k, v in vars(kernels).items() if k[0] != "_" and k.isupper() and isinstance(v, dict))
    done = []
    for item in assignments:
        name, eq, value = item.partition("=")
        table, _, key = name.partition(".")
        if not eq or table not in tables or key not in getattr(kernels, table):
            raise SystemExit(f"error: --set {item}: expected DICT.key=value with a key of one of kernels.py's "
                             f"launch settings: {', '.join(tables)}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        getattr(kernels, table)[key] = parsed
        done.append(f"kernels.{table}[{key!r}] = {parsed!r}")
    return done


def run_hyena(args):
    if args.profile is not None:
        profile_hyena(args.profile)
    else:
        bench_hyena(args.max_len, args.plot, args.json)


# name: (what it times, how it runs, the options it adds). train.py --bench ("gpt") and linearity.py --bench
# (the streaming score vs the official recipe) join this table as their own subcommands.
BENCHMARKS = {
    "mhc": ("Sinkhorn, the mHC pre path and the write-back: kernels vs eager and compiled PyTorch",
            lambda args: bench_mhc(), ()),
    "linearity": ("the cosine regulariser and one batch of the cross-Gram statistics",
                  lambda args: bench_linearity(), ()),
    "tpa": ("decoding over the factor cache vs MHA and GQA; the factor-product training kernel",
            lambda args: bench_tpa(args.max_len), ("max_len",)),
    "hyena": ("order-2 Hyena vs causal attention, 256 to --max-len tokens; the whole token mixers",
              run_hyena, ("max_len", "plot", "json", "profile")),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmarks of the Triton kernels against the plain PyTorch "
                                                 "paths (a CUDA GPU and Triton).")
    sub = parser.add_subparsers(dest="name", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, (what, _, options) in BENCHMARKS.items():
        p = sub.add_parser(name, help=what, description=what)
        p.add_argument("--set", action="append", default=[], metavar="DICT.key=value",
                       help="change one of kernels.py's launch settings first (repeatable), e.g. MHC_POST.block_n=32")
        if "max_len" in options:
            p.add_argument("--max-len", type=int, default=65536, help="longest sequence / cache timed")
        if "plot" in options:
            p.add_argument("--plot", default="out/hyena_speed.png", help="where to write the plot")
        if "json" in options:
            p.add_argument("--json", default=None, metavar="PATH", help="also write the GPU times here "
                                                                        "(compare.py's speed stage reads them)")
        if "profile" in options:
            p.add_argument("--profile", type=int, default=None, metavar="L",
                           help="instead of the benchmark, the per-kernel GPU time of the whole attention and "
                                "Hyena operators at L tokens")
    args = parser.parse_args(argv)
    if getattr(args, "profile", None) is not None and args.profile < 1:
        parser.error("--profile L takes a length L >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    changed = apply_settings(args.set)
    if not torch.cuda.is_available() or not kernels.HAVE_TRITON:
        raise SystemExit(f"error: bench.py {args.name} needs a CUDA GPU and Triton")
    for line in changed:
        print(f"# --set {line}")
    BENCHMARKS[args.name][1](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
