"""
bench.py -- the benchmarks: the whole GPT against a plain nanoGPT-style model, the Triton kernels of
kernels.py against the plain PyTorch of the technique files, where a whole operator spends its GPU time,
and the streaming linearity score against the official recipe. Results go to RESULTS.md (with the
command, the device and the commit), never into assertions.

    python bench.py gpt                    # train-step tokens/s, TFLOP/s, MFU: this GPT vs nanoGPT-style
    python bench.py gpt --arch mhc --no-reference --steps 10   # any train.py model flag; gpt vs --arch
    python bench.py mhc                    # Sinkhorn, the mHC pre and write-back paths: ms, speedup vs eager
                                           # and torch.compile, GB/s
    python bench.py linearity              # the cosine regulariser and the cross-Gram statistics
    python bench.py tpa                    # decode us vs cache length (MHA, GQA, TPA); the training kernel
    python bench.py hyena                  # Hyena vs attention from 256 to 64K tokens (table + plot)
    python bench.py hyena --profile 4096   # both whole operators' GPU time per kernel at 4K tokens
    python bench.py generate               # decoding, every arch: eager vs CUDA graphs, batch 1-64, context
                                           # 512-16K, the largest batch within 40 GiB
    python bench.py mhc --set MHC_POST.block_n=32   # the same with a launch setting of kernels.py changed
    python bench.py linearity-score out/gpt/ckpt.pt  # streaming scores vs the official SVD recipe, 1M tokens

The kernel benchmarks time on a CUDA GPU with Triton; gpt and linearity-score run anywhere (gpt on a CPU
at train.py's tiny CPU configuration). The header of each table names the device and the versions.
"""
import argparse
import ast
import contextlib
import dataclasses
import json
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import attention
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
# The whole model (python bench.py gpt): this GPT vs a plain nanoGPT-style model of the same size, side
# by side in one process


class NanoGPTReference(nn.Module):
    """The throughput anchor: learned positions, LayerNorm, GELU MLP, untied head, SDPA attention."""

    def __init__(self, cfg: train.GPTConfig):
        super().__init__()
        C, V = cfg.n_embd, cfg.padded_vocab_size
        self.n_head = cfg.n_head
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(cfg.block_size, C)
        self.ln1 = nn.ModuleList(nn.LayerNorm(C, bias=False) for _ in range(cfg.n_layer))
        self.ln2 = nn.ModuleList(nn.LayerNorm(C, bias=False) for _ in range(cfg.n_layer))
        self.qkv = nn.ModuleList(nn.Linear(C, 3 * C, bias=False) for _ in range(cfg.n_layer))
        self.out = nn.ModuleList(nn.Linear(C, C, bias=False) for _ in range(cfg.n_layer))
        self.fc = nn.ModuleList(nn.Linear(C, 4 * C, bias=False) for _ in range(cfg.n_layer))
        self.fc_out = nn.ModuleList(nn.Linear(4 * C, C, bias=False) for _ in range(cfg.n_layer))
        self.ln_f, self.head = nn.LayerNorm(C, bias=False), nn.Linear(C, V, bias=False)

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for i in range(len(self.qkv)):
            q, k, v = self.qkv[i](self.ln1[i](x)).split(x.size(-1), dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + self.out[i](y)
            x = x + self.fc_out[i](F.gelu(self.fc[i](self.ln2[i](x))))
        logits = self.head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def bench_gpt(mcfg: train.GPTConfig, cfg: train.TrainConfig, steps: int, reference: bool = True,
              per_kernel: bool = False) -> int:
    """Train-step throughput (forward, backward, AdamW) of this GPT vs NanoGPTReference on random
    tokens, compiled and in bf16 on CUDA. Both models are built and warmed up, then timed in
    alternating rounds (so clock drift hits both alike); the table shows each one's median round.
    steps: timed steps per round; reference: include NanoGPTReference; per_kernel: also each model's GPU time
    per kernel over one step. It measures and prints; it asserts nothing."""
    device, _, _ = train.setup_distributed(cfg)
    train.validate(mcfg, cfg, 1)
    seq_len = cfg.seq_len or mcfg.block_size
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and cuda)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cuda else "float32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    peak = train.peak_tflops(device, cfg.peak_tflops)
    B, rounds, warmup = cfg.batch_size // cfg.grad_accum, 5, 10
    train.check_memory(mcfg, B, seq_len, device, dtype)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(mcfg.vocab_size, (B, seq_len + 1), generator=gen).to(device) for _ in range(4)]
    print(f"# bench.py gpt on {torch.cuda.get_device_name(device) if cuda else 'CPU'}, torch {torch.__version__}, "
          f"{dtype}, compile {'on' if use_compile else 'off'}, d={mcfg.n_embd} L={mcfg.n_layer} T={seq_len} "
          f"B={B}: {warmup} warm-up steps, then {rounds} alternating rounds of {steps} steps")
    runs = []
    models = [("this GPT (--arch gpt)", train.GPT, dataclasses.replace(mcfg, arch="gpt"))]
    if reference:
        models.insert(0, ("nanoGPT-style reference", NanoGPTReference, mcfg))
    if mcfg.arch != "gpt":
        models.append((f"--arch {mcfg.arch}", train.GPT, mcfg))
    for name, build, model_cfg in models:
        mem_before = torch.cuda.memory_allocated(device) if cuda else 0
        torch.manual_seed(0)
        model = build(model_cfg).to(device)
        if build is train.GPT and model_cfg.arch != "gpt":
            name += f", kernels {'on' if train.set_kernels(model, cfg.kernels, device) else 'off'}"
        n_params = sum(p.numel() for p in model.parameters())
        if build is train.GPT:
            flops_per_token = model.flops_per_token(seq_len)
        else:  # GPT.flops_per_token's rule: 6 x matmul weights (a lookup table is none) + attention
            lookups = model.wpe.weight.numel() + model.wte.weight.numel()
            flops_per_token = 6 * (n_params - lookups) + 12 * mcfg.n_layer * mcfg.n_embd * seq_len
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        step_model = torch.compile(model) if use_compile else model

        def step(i, step_model=step_model, optimizer=optimizer):
            xy = batches[i % len(batches)]
            with autocast:
                _, loss = step_model(xy[:, :-1], xy[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(warmup):
            step(i)
        mem = (torch.cuda.max_memory_allocated(device) - mem_before) / 2**30 if cuda else float("nan")
        runs.append({"name": name, "params": n_params, "flops": flops_per_token, "mem": mem, "step": step,
                     "ms": []})
    for _ in range(rounds):
        for run in runs:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(steps):
                loss = run["step"](i)
            loss.item()  # waits for the device
            run["ms"].append(1000 * (time.perf_counter() - t0) / steps)
    print(f"| {'model':38s} | params (M) | ms/step (min-max) | tokens/s   | TFLOP/s | MFU (%) | peak mem (GiB) |")
    print(f"|{'-' * 40}|-----------:|------------------:|-----------:|--------:|--------:|---------------:|")
    for run in runs:
        ms = sorted(run["ms"])[len(run["ms"]) // 2]
        run["tokens_per_s"] = B * seq_len / ms * 1000
        tflops = run["flops"] * run["tokens_per_s"] / 1e12
        mfu = 100 * tflops / peak if peak else float("nan")
        spread = f"{ms:6.2f} ({min(run['ms']):.1f}-{max(run['ms']):.1f})"
        print(f"| {run['name']:38s} | {run['params'] / 1e6:10.1f} | {spread:>17s} | {run['tokens_per_s']:10,.0f} | "
              f"{tflops:7.1f} | {mfu:7.1f} | {run['mem']:14.1f} |")
    gpt = runs[1 if reference else 0]
    if reference:
        print(f"this GPT / reference throughput: {gpt['tokens_per_s'] / runs[0]['tokens_per_s']:.3f}x")
    if mcfg.arch != "gpt":
        print(f"--arch {mcfg.arch} step time / gpt step time: {gpt['tokens_per_s'] / runs[-1]['tokens_per_s']:.3f}x")
    if per_kernel:  # where each step's GPU time goes (torch.profiler)
        for run in runs:
            print_gpu_kernels(f"{run['name']}: one training step", lambda run=run: run["step"](0), iters=3)
    return 0


# ----------------------------------------------------------------------------------------------------
# The kernels: one benchmark per technique, in kernels.py's order


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
    rotary = attention.Rotary(d, T, 10000.0).to(dev)
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
# The linearity score on a checkpoint (python bench.py linearity-score CHECKPOINT): the official recipe
# vs the streaming closed form


@torch.no_grad()
def bench_linearity_score(model, data, tokens: int, batch_size: int, device, progress=None) -> int:
    """Scores of every layer pair over `tokens` tokens, three ways, with their wall-clock times:
    the official recipe (hidden states gathered on the CPU, two fp32 SVDs per pair), our streaming
    closed form in float64 (torch), and the same with the fp32 cross-Gram kernel. progress: as
    layer_profile's, told when each timed pass starts (outside the timings)."""
    progress = progress or (lambda msg: None)
    T = model.cfg.block_size
    starts = linearity.window_starts(data, T, tokens)
    if len(starts) * T < tokens:
        print(f"error: the training text has {len(data):,} tokens, fewer than --tokens {tokens:,}", file=sys.stderr)
        return 1
    batches = [data.windows(starts[i:i + batch_size], T)[0] for i in range(0, len(starts), batch_size)]
    n_tokens = len(starts) * T
    cuda = device.type == "cuda"
    model.eval()

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    def forwards():
        for x in batches:
            model(x.to(device), return_hidden=True)

    def gather():  # what the official recipe needs: every hidden state of every token, on the CPU
        hidden = None
        for x in batches:
            hs = [h.reshape(-1, h.size(-1)).float().cpu() for h in model(x.to(device), return_hidden=True)[2]]
            hidden = [[h] for h in hs] if hidden is None else [acc + [h] for acc, h in zip(hidden, hs)]
        return [torch.cat(h) for h in hidden]

    methods = {"float64": False}
    if cuda and kernels.HAVE_TRITON:
        methods["kernel"] = True
    for use_kernel in methods.values():  # warm-up (kernel compilation, cuBLAS handles)
        linearity.layer_profile(model, batches[:1], device, use_kernel)
    progress(f"bench over {n_tokens:,} tokens in {len(batches)} batches: the forward passes alone")
    _, t_forward = timed(forwards)
    scores, seconds = {}, {}
    for name, use_kernel in methods.items():
        progress(f"bench: the streaming score, {name}")
        scores[name], seconds[name] = timed(lambda: linearity.layer_profile(model, batches, device, use_kernel))
    progress("bench: the official recipe, gathering the hidden states")
    hidden, t_gather = timed(gather)
    official, t_svd = [], 0.0
    for l, (x, y) in enumerate(zip(hidden[:-1], hidden[1:]), 1):
        progress(f"bench: the official recipe, SVDs for block {l}/{len(hidden) - 1}")
        (ls, ls_wo), t = timed(lambda: (linearity.official_svd_score(x, y),
                                        linearity.official_svd_score(x, y - x)))
        official.append((ls, ls_wo))
        t_svd += t
    scores["official"], seconds["official"] = official, t_gather + t_svd

    ref = scores["float64"]
    print(f"linearity scores over {n_tokens:,} training tokens, {len(ref)} layer pairs, d={model.cfg.n_embd}; "
          f"device {torch.cuda.get_device_name(device) if cuda else device}, CPU threads {torch.get_num_threads()}")
    names = list(scores)
    print("| block | " + " | ".join(f"LS {n}" for n in names) + " | "
          + " | ".join(f"LS_wo {n}" for n in names) + " |")
    print("|------:|" + "---------:|" * (2 * len(names)))
    for l in range(len(ref)):
        print(f"| {l + 1:5d} | " + " | ".join(f"{scores[n][l][0]:.7f}" for n in names) + " | "
              + " | ".join(f"{scores[n][l][1]:.7f}" for n in names) + " |")
    print("\n| method | what runs | seconds | vs official | max abs diff from float64 (LS, LS_wo) |")
    print("|--------|-----------|--------:|------------:|--------------------------------------:|")
    what = {"official": f"forward on {device.type}, hidden states to the CPU, 2 fp32 SVDs per pair on the CPU",
            "float64": f"forward + streaming float64 statistics, all on {device.type}",
            "kernel": "forward + fp32 cross-Gram kernel, float64 merge, on cuda"}
    for n in names:
        err = max(max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a, b in zip(scores[n], ref))
        print(f"| {n} | {what[n]} | {seconds[n]:.2f} | {seconds['official'] / seconds[n]:.1f}x | {err:.1e} |")
    print(f"(the forward passes alone take {t_forward:.2f} s; the official recipe: gathering {t_gather:.2f} s, "
          f"SVDs {t_svd:.2f} s)")
    return 0



# ----------------------------------------------------------------------------------------------------
# Generation (python bench.py generate): decode steps of every arch, eager vs CUDA graphs


def _decode_model(arch: str, context: int, device) -> train.GPT:
    """The default model of `arch` with block_size = context, random weights, kernels where they apply."""
    model = train.GPT(train.GPTConfig(arch=arch, block_size=context)).to(device).eval()
    with contextlib.redirect_stdout(None):  # set_kernels' notes, once per model, would bury the table
        train.set_kernels(model, "auto", torch.device(device))
    return model


@torch.no_grad()
def time_decode(model: train.GPT, batch: int, graph: bool, steps: int,
                compile: bool = False) -> tuple[float, float, float]:
    """(ms per step, ms of the first step, peak GiB) of greedy decode steps at the end of a full cache.

    The cache holds zeros, not a prompt's keys: a step's cost does not depend on the values. Each step
    runs as GPT.generate runs it: DecodeStep, then the greedy choice of the next token."""
    context, device = model.cfg.block_size, model.wte.weight.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    caches = model.init_caches(batch, device, torch.bfloat16)
    step = train.DecodeStep(model, caches, batch, graph, compile)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)

    def decode(positions) -> float:  # ms they took, each step followed by the greedy choice
        nonlocal token
        torch.cuda.synchronize()
        start = time.perf_counter()
        for pos in positions:
            token = step(token, pos)[:, :model.cfg.vocab_size].float().argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    first_pos = context - steps - 3
    first_ms = decode([first_pos])
    decode(range(first_pos + 1, first_pos + 3))  # warm
    ms = decode(range(first_pos + 3, context)) / steps
    return ms, first_ms, torch.cuda.max_memory_allocated() / 2**30


def cache_bytes(model: train.GPT, batch: int) -> int:
    """Bytes of the caches for `batch` sequences (on the meta device: nothing allocated), bf16; the batch
    difference leaves out what every sequence shares (Hyena's filters), as compare.py counts caches."""
    return sum(t.numel() * t.element_size() for c in model.init_caches(batch, "meta", torch.bfloat16)
               for t in c.values())


def bench_generate(archs: list[str], batches: list[int], contexts: list[int], steps: int, memory_gib: float,
                   compile: bool = False):
    """Decode speed of every arch at the default width (C 384, 6 layers), bf16 autocast, kernels on:
    (1) a fresh GPT.generate, as `train.py --sample` runs it; (2) ms per step, tokens/s and peak memory
    at each batch and context, eager vs CUDA graph; (3) at the longest context, the largest batch that
    fits in memory_gib GiB and its tokens/s (TPA's smaller cache buys batch); (4) with compile, the
    compiled step in its graph at batch 1 and the first context."""
    device = "cuda"
    print(f"# bench.py generate on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; default model (C = 384, 6 layers), random weights, bf16 autocast, kernels on")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)

    print("\n## A fresh generate, as `python train.py --sample` (B = 1, block 512, a 16-token prompt, 200 tokens, "
          "greedy): ms per token, prefill and graph capture included (each call captures its own graph); "
          "then the same call again")
    print("| arch | eager first call | eager again | graph first call | graph again | speedup (again) |")
    print("|------|-----------------:|------------:|-----------------:|------------:|----------------:|")
    for arch in archs:
        model, row = _decode_model(arch, 512, device), []
        prompt = torch.zeros(1, 16, dtype=torch.long, device=device)
        for graph in (False, True):
            for _ in range(2):
                torch.cuda.synchronize()
                start = time.perf_counter()
                with autocast:
                    model.generate(prompt, 200, temperature=0, cuda_graph=graph)
                torch.cuda.synchronize()
                row.append((time.perf_counter() - start) * 1e3 / 200)
        print(f"| {arch} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} | {row[3]:.2f} | {row[1] / row[3]:.1f}x |")
        del model

    print(f"\n## Decode steps at the end of a full cache ({steps} steps timed after 3; the first step's ms includes "
          "the graph's capture): ms per step, tokens/s = batch / step time, peak GiB allocated")
    print("| arch | context | batch | eager ms | graph ms | speedup | graph tokens/s | first step ms (eager / graph) "
          "| peak GiB |")
    print("|------|--------:|------:|---------:|---------:|--------:|---------------:|------------------------------:"
          "|---------:|")
    for context in contexts:
        for arch in archs:
            model = _decode_model(arch, context, device)
            for batch in batches:
                with autocast:
                    eager_ms, eager_first, _ = time_decode(model, batch, False, steps)
                    graph_ms, graph_first, peak = time_decode(model, batch, True, steps)
                print(f"| {arch} | {context} | {batch} | {eager_ms:.3f} | {graph_ms:.3f} | {eager_ms / graph_ms:.1f}x "
                      f"| {batch * 1e3 / graph_ms:,.0f} | {eager_first:.1f} / {graph_first:.1f} | {peak:.2f} |")
            del model

    context = contexts[-1]
    print(f"\n## The largest batch within {memory_gib:g} GiB at context {context} (graph): the peak grows "
          "linearly with the batch; a line through the last two measured peaks predicts the next batch, three "
          "times from batches 1 and 8; the largest measured batch within the budget is shown")
    print("| arch | cache MiB per sequence | batch | peak GiB | ms per step | tokens/s |")
    print("|------|-----------------------:|------:|---------:|------------:|---------:|")
    for arch in archs:
        model = _decode_model(arch, context, device)
        cache_mib = (cache_bytes(model, 2) - cache_bytes(model, 1)) / 2**20  # what a sequence adds
        with autocast:
            measured = [(b, time_decode(model, b, True, 4)) for b in (1, 8)]  # (batch, (ms, first ms, peak))
            for _ in range(3):
                (b0, (_, _, p0)), (b1, (_, _, p1)) = measured[-2:]
                batch = max(1, b1 + int((memory_gib - p1) * (b1 - b0) / max(p1 - p0, 1e-6)))
                if batch in (b for b, _ in measured):
                    break
                try:
                    measured.append((batch, time_decode(model, batch, True, steps)))
                except torch.cuda.OutOfMemoryError:  # past the card itself: the batches measured so far decide
                    break
            fits = [(b, r) for b, r in measured if r[2] <= memory_gib] or [measured[0]]
            batch, (ms, _, peak) = max(fits)  # batches 1 and 8 timed over 4 steps, the others over --steps
        print(f"| {arch} | {cache_mib:.0f} | {batch} | {peak:.1f} | {ms:.2f} | {batch * 1e3 / ms:,.0f} |")
        del model

    if compile:
        print(f"\n## torch.compile inside the graph (DecodeStep(compile=True)), batch 1, context {contexts[0]}: ms "
              "per step; the first step compiles and captures")
        print("| arch | graph ms | compiled graph ms | speedup | first step s |")
        print("|------|---------:|------------------:|--------:|-------------:|")
        for arch in archs:
            model = _decode_model(arch, contexts[0], device)
            with autocast:
                graph_ms = time_decode(model, 1, True, steps)[0]
                compiled_ms, first_ms, _ = time_decode(model, 1, True, steps, compile=True)
            print(f"| {arch} | {graph_ms:.3f} | {compiled_ms:.3f} | {graph_ms / compiled_ms:.1f}x | {first_ms / 1e3:.1f} |")
            del model
    return 0


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


def run_gpt(args) -> int:
    train.check_device(args.cfg.device)
    if args.profile and not (torch.cuda.is_available() and args.cfg.device != "cpu"):
        raise train.UserError("bench.py gpt --profile needs a CUDA GPU (it reads the GPU's kernel timings)")
    return bench_gpt(args.mcfg, args.cfg, args.steps, not args.no_reference, args.profile)


def run_linearity_score(args) -> int:
    ckpt = linearity.read_checkpoint(train, args.checkpoint)
    model, mcfg = train.model_from_checkpoint(ckpt, args.checkpoint)
    if args.tokens <= mcfg.n_embd:
        raise train.UserError(f"--tokens {args.tokens} is not more than the hidden size {mcfg.n_embd}: "
                              "the score would be meaningless (any X maps onto any Y)")
    train_path, _ = linearity.token_files(train, ckpt, args.data, args.cache_dir)
    device = torch.device(args.device)
    model.to(device)
    return bench_linearity_score(model, train.TokenData(train_path), args.tokens, args.batch_size, device,
                                 linearity.stderr_progress())


def run_hyena(args):
    if args.profile is not None:
        profile_hyena(args.profile)
    else:
        bench_hyena(args.max_len, args.plot, args.json)


# name: (what it times, how it runs, the options it adds, whether it needs a CUDA GPU and Triton)
BENCHMARKS = {
    "gpt": ("train-step throughput of this GPT vs a nanoGPT-style model of the same size (and of --arch)",
            run_gpt, ("model",), False),
    "mhc": ("Sinkhorn, the mHC pre path and the write-back: kernels vs eager and compiled PyTorch",
            lambda args: bench_mhc(), (), True),
    "linearity": ("the cosine regulariser and one batch of the cross-Gram statistics",
                  lambda args: bench_linearity(), (), True),
    "linearity-score": ("the official linearity recipe (fp32 SVDs on the CPU) vs the streaming score, on a "
                        "checkpoint's training text", run_linearity_score, ("checkpoint",), False),
    "tpa": ("decoding over the factor cache vs MHA and GQA; the factor-product training kernel",
            lambda args: bench_tpa(args.max_len), ("max_len",), True),
    "hyena": ("order-2 Hyena vs causal attention, 256 to --max-len tokens; the whole token mixers",
              run_hyena, ("max_len", "plot", "json", "profile"), True),
    "generate": ("decode steps of every arch: a fresh generate, ms per step, tokens/s and memory by batch and "
                 "context, eager vs CUDA graphs; the largest batch within --memory-gib",
                 lambda args: bench_generate(args.archs, args.batches, args.contexts, args.steps, args.memory_gib,
                                             args.compile),
                 ("generate",), True),
}


def parse_args(argv=None):
    """The subcommand's options; for gpt, every other flag is train.py's (args.mcfg, args.cfg)."""
    parser = argparse.ArgumentParser(description="Benchmarks: the whole GPT, the Triton kernels against the plain "
                                                 "PyTorch paths (a CUDA GPU and Triton), the linearity score.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="name", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, (what, _, options, _) in BENCHMARKS.items():
        p = sub.add_parser(name, help=what, description=what, allow_abbrev=False,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--set", action="append", default=[], metavar="DICT.key=value",
                       help="change one of kernels.py's launch settings first (repeatable), e.g. MHC_POST.block_n=32")
        if "model" in options:
            p.epilog = ("Every other flag is train.py's (python train.py --help): the model (--arch, --n-embd, ...), "
                        "--batch-size, --seq-len, --grad-accum, --device, --dtype, --compile, --kernels. On a CPU, "
                        "the tiny CPU configuration's model and batch for what is not given.")
            p.add_argument("--steps", type=int, default=30, help="timed steps per model and round")
            p.add_argument("--no-reference", action="store_true",
                           help="leave the nanoGPT-style reference out (its memory and compile time at large "
                                "widths; --arch vs gpt stays)")
            p.add_argument("--profile", action="store_true",
                           help="on a GPU: also each model's GPU time per kernel over one training step")
        if "checkpoint" in options:
            linearity.add_checkpoint_arguments(p, 1_000_000, "training tokens to score")
        if "max_len" in options:
            p.add_argument("--max-len", type=int, default=65536, help="longest sequence / cache timed")
        if "plot" in options:
            p.add_argument("--plot", default="out/hyena_speed.png", help="where to write the plot")
        if "json" in options:
            p.add_argument("--json", default=None, metavar="PATH", help="also write the GPU times here "
                                                                        "(compare.py's speed stage reads them)")
        if "generate" in options:
            p.add_argument("--archs", default="gpt,hc,mhc,tpa,tpa-kvonly,hyena", help="comma-separated arch names")
            p.add_argument("--batches", default="1,16,64", help="batch sizes (sequences decoded at once)")
            p.add_argument("--contexts", default="512,4096,16384",
                           help="cache lengths (the model's block_size); the last one for --memory-gib")
            p.add_argument("--steps", type=int, default=30, help="timed decode steps per row")
            p.add_argument("--memory-gib", type=float, default=40.0,
                           help="memory budget of the largest-batch table")
            p.add_argument("--compile", action="store_true",
                           help="also the compiled step in its graph at batch 1 (a compile of tens of seconds per arch)")
        if "profile" in options:
            p.add_argument("--profile", type=int, default=None, metavar="L",
                           help="instead of the benchmark, the per-kernel GPU time of the whole attention and "
                                "Hyena operators at L tokens")
    args, rest = parser.parse_known_args(argv)
    if args.name == "gpt":
        if args.steps < 1:
            parser.error(f"--steps must be at least 1 (got {args.steps})")
        model_names = {f.name for f in dataclasses.fields(train.GPTConfig)}
        tiny = {k: v for k, v in train.CPU_TINY.items() if k in model_names or k == "batch_size"}
        args.mcfg, args.cfg, _ = train.parse_args(rest, tiny=tiny)  # training-only settings stay as they are
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.name == "hyena" and args.profile is not None and args.profile < 1:
        parser.error("--profile L takes a length L >= 1")
    if args.name == "generate":
        for name in args.archs.split(","):
            if name not in train.ARCHS:
                parser.error(f"--archs: unknown arch {name!r}; choose from {', '.join(train.ARCHS)}")
        args.archs = args.archs.split(",")
        try:
            args.batches, args.contexts = ([int(x) for x in text.split(",")] for text in (args.batches, args.contexts))
        except ValueError:
            parser.error(f"--batches and --contexts take comma-separated integers (got {args.batches!r}, "
                         f"{args.contexts!r})")
        if min(args.batches) < 1 or args.steps < 1 or args.memory_gib <= 0:
            parser.error("--batches and --steps must be at least 1, --memory-gib positive")
        if min(args.contexts) < args.steps + 3:
            parser.error(f"--contexts must be at least --steps + 3 = {args.steps + 3} (the steps run at the end of "
                         "the cache)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    changed = apply_settings(args.set)
    if BENCHMARKS[args.name][3] and (not torch.cuda.is_available() or not kernels.HAVE_TRITON):
        raise SystemExit(f"error: bench.py {args.name} needs a CUDA GPU and Triton")
    for line in changed:
        print(f"# --set {line}")
    return train.run_command(lambda: BENCHMARKS[args.name][1](args))


if __name__ == "__main__":
    sys.exit(main())
