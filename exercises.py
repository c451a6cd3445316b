"""
exercises.py -- three to five exercises per technique, each with an automatic check.

    python exercises.py                    # the list
    python exercises.py mhc.1              # the task, then its check (exit 0 when it passes)
    python exercises.py tpa.1 --answer 100     # a prediction (a wrong one: the check says so, with a hint)
    python exercises.py tpa.1 --reveal         # the solution, once you want it

Three kinds of exercise:
    change   edit the technique file as asked; the check measures the code as it now is and passes
             when it shows what the change should cause (put the original back afterwards: git checkout);
    predict  work out a number or a yes/no before you run anything, pass it with --answer; the check
             computes the truth from the repository's own functions, so it is never a stored answer;
    run      run the commands given; the check reads their outputs (metrics.jsonl, run.json,
             checkpoints) and compares them, with your prediction of the outcome as --answer.
Every check runs on a CPU in seconds, except what the "run" exercises ask you to train. A check that
does not pass prints a hint, never the solution; --reveal prints the solution (for a "run" exercise, the
one your runs give).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import hyena
import linearity
import mhc
import tpa
import train

EXERCISES = {}  # id -> function(answer) -> (passed, solution); its docstring is the task, .hint the hint
REVEAL = object()  # the answer --reveal passes: the check computes its solution and judges nothing


def exercise(ex_id: str, kind: str, hint: str):
    def register(fn):
        fn.kind, fn.hint = kind, hint
        EXERCISES[ex_id] = fn
        return fn
    return register


class NotReady(Exception):
    """The exercise's precondition is missing (an answer, a run, the code change): say what to do."""


def need_answer(answer, form: str) -> str | None:
    """The answer, stripped and lower-case; None while revealing (no answer to judge)."""
    if answer is REVEAL:
        return None
    if answer is None:
        raise NotReady(f"give your prediction with --answer ({form}), or see the solution with --reveal")
    return answer.strip().lower()


def as_number(answer: str | None, kind=float):
    if answer is None:  # revealing
        return None
    try:
        return kind(float(answer))
    except ValueError:
        raise NotReady(f"--answer {answer!r} is not a number")


def need_numbers(answer, form: str, count: int) -> list[float] | None:
    """`count` comma-separated numbers (form names them, e.g. "MHA,TPA"); None while revealing."""
    given = need_answer(answer, form)
    if given is None:
        return None
    parts = given.replace(" ", "").split(",")
    if len(parts) != count:
        raise NotReady(f"--answer takes {count} numbers, {form}")
    return [as_number(p) for p in parts]


def need_choice(answer, choices: tuple[str, ...]) -> str | None:
    """One of `choices`; None while revealing."""
    form = " or ".join(choices)
    given = need_answer(answer, form)
    if given is not None and given not in choices:
        raise NotReady(f"--answer {form}")
    return given


def read_run(out_dir: str, what: str) -> tuple[dict, list[dict]]:
    """run.json and the metrics records of a finished train.py run."""
    info_path, metrics_path = os.path.join(out_dir, "run.json"), os.path.join(out_dir, "metrics.jsonl")
    if not (os.path.isfile(info_path) and os.path.isfile(metrics_path)):
        raise NotReady(f"no finished run in {out_dir}/: run {what} first")
    with open(info_path) as f:
        info = json.load(f)
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in records if "val_loss" in r]
    if not evals or evals[-1]["step"] != info["train_config"]["max_iters"]:
        raise NotReady(f"the run in {out_dir}/ did not finish: run {what} again")
    return info, evals


# ----------------------------------------------------------------------------------------------------
# mHC (mhc.py)


@exercise("mhc.1", "change",
          hint="multiply two 2 x 2 row-stochastic matrices by hand and look at the row sums of the product, "
               "then at its column sums: which property survives a product? The forward gain is the largest "
               "row sum, the backward gain the largest column sum.")
def mhc_row_softmax(answer=None):
    """Replace Sinkhorn-Knopp by a row softmax, and see which gain stays bounded.

    In mhc.py make `sinkhorn_knopp` return `logits.softmax(-1)` (rows sum to 1, columns do not).
    Predict first: the forward gain (max row sum) or the backward gain (max column sum) of a deep
    stack of such H_res: which one stays at 1, which one grows, and why? The check multiplies 64
    random H_res from your function. Then train it and compare with the real mHC (on a GPU; the
    Triton kernels have their own Sinkhorn, so the changed run needs the plain path: --kernels off,
    and --compile off, which compiles too slowly for mHC's plain path):
        python train.py --arch mhc --max-iters 300 --eval-interval 25
        python train.py --arch mhc --max-iters 300 --eval-interval 25 --kernels off --compile off --out-dir out/mhc-softmax
        python mhc.py --gains out/mhc/metrics.jsonl out/mhc-softmax/metrics.jsonl"""
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(64, 1, 4, 4, generator=g)  # 64 sub-layers, n = 4
    res = logits.softmax(-1) if answer is REVEAL else mhc.sinkhorn_knopp(logits)  # revealing: the change made
    rows, cols = res.sum(-1), res.sum(-2)
    if (cols - 1).abs().max() < 0.2:  # 20 Sinkhorn iterations leave them within ~0.03 here
        raise NotReady("sinkhorn_knopp still makes the columns sum to ~1: it is still Sinkhorn; make the change")
    if (rows - 1).abs().max() > 1e-4 or (res < 0).any():
        raise NotReady("the rows of H_res do not sum to 1 with non-negative entries: that is not a row softmax")
    fwd, bwd = mhc.amax_gain(mhc.composite(list(res)))
    if not (fwd < 1 + 1e-4 and bwd > 1.2):
        raise NotReady(f"forward gain {fwd:.4f}, backward {bwd:.3f}: not what a row softmax gives; check the change")
    return True, (f"composite of 64 layers: forward gain {fwd:.4f}, backward gain {bwd:.3f}. Rows of a product of "
                  "row-stochastic matrices still sum to 1, so activations cannot grow going forward; nothing holds "
                  "the column sums to 1, so gradients flowing back through the streams are amplified (here up to n, "
                  "since the entries are non-negative and total n; unconstrained HC has no such bound). Sinkhorn "
                  "holds both sides at 1.")


@exercise("mhc.2", "predict",
          hint="write the loop rather than guess twice: for t = 1, 2, ... project the same logits with "
               "mhc.sinkhorn_knopp(logits, iters=t), multiply the 24 with mhc.composite and read "
               "mhc.amax_gain(...)[1]; each iteration shrinks the column sums' error by a roughly constant factor.")
def mhc_iterations(answer=None):
    """How many Sinkhorn iterations does a deep stack need?

    Take 24 sub-layers' H_res from logits ~ N(0, 1) (n = 4, 256 tokens, torch.Generator seed 0:
    `torch.randn(24, 256, 4, 4, generator=g)`), project each with `mhc.sinkhorn_knopp(logits, iters=t)`,
    and multiply them (`mhc.composite`). What is the smallest t for which the composite's backward
    Amax gain (`mhc.amax_gain`, averaged over tokens) is below 1.02? Guess first, then write the loop.
    The paper uses 20; each iteration costs time in every sub-layer of every step. --answer t (on the
    unmodified mhc.py)."""
    t_given = as_number(need_answer(answer, "an iteration count"), int)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 256, 4, 4, generator=g)
    gains = {}
    for t in range(1, 41):
        gains[t] = mhc.amax_gain(mhc.composite(list(mhc.sinkhorn_knopp(logits, iters=t))))[1]
        if gains[t] < 1.02:
            break
    else:
        raise NotReady("even 40 iterations leave the backward gain above 1.02: is mhc.py modified (mhc.1)?")
    shown = ", ".join(f"t={k}: {v:.4f}" for k, v in gains.items())
    return t_given == t, f"the smallest t is {t} (backward gain {shown})"


@exercise("mhc.3", "predict",
          hint="write out stream i of H_res h when every stream h_j is the same x: a sum over j of H_res[i, j] "
               "times x. Which sum of H_res is that, and which does the forward pass never form?")
def mhc_which_sums(answer=None):
    """Which H_res leave mHC's initial streams, and so the plain model, unchanged?

    The n streams start as n copies of the embedding, so h_i = x for every stream i. One write-back
    is h' = H_res h + H_post^T out (`mhc.write_back`). For h' to be n copies of x + out-mixing again,
    which sums of H_res must be 1: "rows", "columns" or "both"? (Sinkhorn makes H_res doubly
    stochastic, and any such H_res is a no-op at step 0; which half of that is actually needed?)
    --answer rows|columns|both"""
    given = need_choice(answer, ("rows", "columns", "both"))
    x = torch.randn(1, 1, 1, 8).expand(1, 1, 4, 8)  # (B, T, n, C): four identical streams
    zero_out, post = torch.zeros(1, 1, 8), torch.ones(1, 1, 4)
    m = torch.rand(4, 4) + 0.1
    candidates = {"rows": m / m.sum(-1, keepdim=True), "columns": m / m.sum(-2, keepdim=True)}
    kept = {name: torch.allclose(mhc.write_back(x, zero_out, post, r[None, None]), x, atol=1e-6)
            for name, r in candidates.items()}  # does H_res leave identical streams as they are?
    truth = "both" if all(kept.values()) else next((k for k, v in kept.items() if v), "neither")
    return given == truth, (f"only {truth} (stream i receives sum_j H_res[i, j] h_j = (row sum i) x). Columns "
                            "matter for the backward pass.")


@exercise("mhc.4", "predict",
          hint="count per token: which tensors of C values are read (the n streams, f) and which written (the n "
               "new streams)? Multiply by B T tokens and by the bytes of a value (fp32 4, bf16 2); 1 MB is 10^6 "
               "bytes, and the time is bytes / (3.0 x 10^12 bytes/s).")
def mhc_write_back_bytes(answer=None):
    """How many bytes does one write-back move, and what does that say about its speed?

    `kernels.mhc_post_res` computes h' = H_res h + H_post^T f per token: it reads the n streams h and
    the sub-layer output f and writes the n streams h' (the coefficients are small: ignore them). At
    the benchmark's shape (B = 64, T = 512, n = 4, C = 384) and with f stored like the streams, how
    many MB (10^6 bytes) is that with fp32 streams, and with bf16 streams (--residual-dtype bfloat16)?
    Assuming memory moves at 3.0 TB/s (a fast GPU's copy rate), how long must the bf16 one take at least?
    Compare with the write-back's forward in `python bench.py mhc` (RESULTS.md). --answer FP32_MB,BF16_MB"""
    given = need_numbers(answer, "FP32_MB,BF16_MB", 2)
    n, C, tokens = 4, 384, 64 * 512
    truth = [(2 * n + 1) * C * tokens * size / 1e6 for size in (4, 2)]  # read n + 1 rows of C, write n
    ok = given is not None and all(abs(g - t) <= 0.02 * t for g, t in zip(given, truth))
    return ok, (f"(2n + 1) C values per token ({n} streams read, f read, {n} streams written) x {tokens:,} "
                f"tokens = {truth[0]:.1f} MB in fp32, {truth[1]:.1f} MB in bf16: "
                f"{truth[1] / 3000:.3f} ms at 3.0 TB/s (the kernel: 0.082 ms). Every mHC sub-layer moves this and "
                "more (RESULTS.md: ~13.5 passes over the streams), which is why mHC's cost is memory traffic, not "
                "arithmetic.")


@exercise("mhc.5", "predict",
          hint="one pass moves n x C values of 2 bytes (bf16) for every token of the step; divided by "
               "3.0 x 10^12 bytes/s that is its time. Multiply by the passes per sub-layer and by the 12 "
               "sub-layers, and give ms.")
def mhc_wide_floor(answer=None):
    """How much of mHC's cost is stream traffic in a wide model?

    RESULTS.md's width table runs d = 4096, 6 layers (12 sub-layers), 16,384 tokens a step, n = 4
    streams stored in bf16. Counting only passes over the streams (one pass = every stream value of
    every token read or written once) at an assumed 3.0 TB/s: how many ms a step do this repository's
    kernels (~13.5 passes per sub-layer) need at least, and how many would a design that keeps only the
    ~5 passes no fusion removes? Set them against mHC's measured extra time and the plain step's time in
    RESULTS.md's width table ("HC and mHC"). --answer MS_13.5_PASSES,MS_5_PASSES"""
    given = need_numbers(answer, "MS_13.5_PASSES,MS_5_PASSES", 2)
    n, C, tokens, sublayers = 4, 4096, 32 * 512, 12
    one_pass_ms = n * C * tokens * 2 / 3.0e12 * 1e3  # bf16: 2 bytes a value
    truth = [passes * one_pass_ms * sublayers for passes in (13.5, 5)]
    ok = given is not None and all(abs(g - t) <= 0.03 * t for g, t in zip(given, truth))
    return ok, (f"one pass is {n} x {C} x {tokens:,} x 2 bytes = "
                f"{n * C * tokens * 2 / 1e6:.0f} MB, {one_pass_ms:.3f} ms; x {sublayers} sub-layers: {truth[0]:.1f} ms "
                f"a step for 13.5 passes ({100 * truth[0] / 241:.0f}% of the plain step; the kernels take 39 ms), "
                f"{truth[1]:.1f} ms for 5 ({100 * truth[1] / 241:.1f}%). At d = 384 the same 5 passes are 10% of "
                "the step: the matmuls grow with C^2, the streams with C, so the paper's 6.7% is a wide model's "
                "number.")


# ----------------------------------------------------------------------------------------------------
# Hyena (hyena.py)


@exercise("hyena.1", "change",
          hint="the window multiplies tap t by exp(-delta t), with delta chosen so that late taps fade. Take it "
               "away and ask what, if anything, still makes a late tap smaller than an early one; the check "
               "measures the share of each filter's energy past tap 256 of 1024.")
def hyena_window_off(answer=None):
    """Switch off the implicit filter's exponential window.

    In hyena.py, ImplicitFilter.forward, replace the window by ones (`window = torch.ones_like(...)`).
    Predict: where along the filter does its energy go, and what should that do to a model that
    mostly needs the last few tokens? The check measures the share of each filter's energy past
    position l_max / 4 at init. Then train and compare the losses:
        python train.py --arch hyena --max-iters 300 --eval-interval 50 --out-dir out/hyena-nowindow"""
    torch.manual_seed(0)
    f = hyena.ImplicitFilter(n_embd=64, order=2, l_max=1024)
    f.init_weights()
    if answer is REVEAL:
        f.deltas.zero_()  # the change made: exp(-0 t) = 1 replaces the window
    with torch.no_grad():
        h = f(1024)  # (N, C, L)
    energy = h.pow(2)
    tail = (energy[..., 256:].sum(-1) / energy.sum(-1)).mean().item()
    if tail < 0.2:
        raise NotReady(f"{100 * tail:.1f}% of the filters' energy is past position 256: the window is still "
                       "on; make the change")
    return True, (f"{100 * tail:.1f}% of the filters' energy now lies past position 256 (with the window, a few "
                  "per cent). Without the decay the filters start as long, flat-ish sums over the past; the window "
                  "is the paper's bias towards recent tokens (Sec. 3.3).")


@exercise("hyena.2", "predict",
          hint="output t of a length-n circular convolution also collects the linear convolution's term t + n. "
               "What is the last index of the linear convolution of two length-L signals, and how large must n "
               "be for that term to miss outputs 0 .. L-1?")
def hyena_fft_size(answer=None):
    """How much zero-padding does a causal FFT convolution need?

    `hyena.fft_causal_conv` pads u and h to n = 2L before multiplying their DFTs. A product of DFTs is a
    circular convolution: too little padding wraps the end of the sequence onto its start, and the
    output at time t then sees tokens after t. For L = 100, what is the smallest n whose first L
    outputs equal `hyena.direct_causal_conv`? --answer n (then: is 2L a waste?)"""
    n_given = as_number(need_answer(answer, "an FFT length"), int)
    torch.manual_seed(0)
    L = 100
    u, h = torch.randn(1, 3, L, dtype=torch.float64), torch.randn(3, L, dtype=torch.float64)
    ref = hyena.direct_causal_conv(u, h)
    for n in range(L, 2 * L + 1):
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(h, n=n), n=n)[..., :L]
        if torch.allclose(y, ref, atol=1e-9):
            break
    return n_given == n, (f"n = {n} = 2L - 1 (the linear convolution of two length-L signals has 2L - 1 terms). "
                          "2L is used because FFTs of even and power-of-two lengths are faster.")


@exercise("hyena.3", "predict",
          hint="estimate, for each init, how far the argument w x of the first Sin moves between neighbouring "
               "time steps, and how that grows through three layers: an argument that moves by radians per "
               "step folds time into a curve that looks random at 128 samples. Or build both filters and "
               "compute the lag-1 autocorrelation yourself (centre each filter along time first).")
def hyena_filter_init(answer=None):
    """Which filter init starts the implicit filters as white noise?

    The filter FFN's linear layers can start as PyTorch's default (`init="kaiming"`: uniform weights of
    bound 1/sqrt(fan_in)) or as safari's training pipeline does (`"normal"`: N(0, 0.02), zero biases;
    the default, --hyena-filter-init). Each feeds sin(w x), w = --hyena-w, three layers deep. Build
    `hyena.ImplicitFilter` at the recall setting (C = 128, order 2, l_max = 128, emb_dim and w as
    train.py's defaults) with each init. Predict: which one's filters h start as white noise along
    time (lag-1 autocorrelation near 0) rather than as smooth curves (near 1)? --answer kaiming|normal
    The check computes both. (RESULTS.md's Hyena section: MQAR recall at L = 128,
    3000 steps, 3 seeds, chance 6.2%: the Pile setting w 14, emb_dim 33 with Kaiming init 6.0%, with
    normal init 22.5%; the defaults w 10, emb_dim 5, normal init 38.2%.)"""
    given = need_choice(answer, ("kaiming", "normal"))
    cfg = default_config()
    lag1 = {}
    for init in ("kaiming", "normal"):
        torch.manual_seed(0)
        f = hyena.ImplicitFilter(n_embd=128, order=2, l_max=128, emb_dim=cfg.hyena_emb_dim,
                                 width=cfg.hyena_filter_width, w=cfg.hyena_w, init=init)
        with torch.no_grad():
            h = f(128).double()  # (N, C, L)
        x = h - h.mean(-1, keepdim=True)
        lag1[init] = ((x[..., 1:] * x[..., :-1]).sum(-1) / x.pow(2).sum(-1)).mean().item()  # mean over N C
    noisy = min(lag1, key=lag1.get)
    return given == noisy, (
        f"{noisy}: lag-1 autocorrelation of h along time (mean over the N C filters) kaiming "
        f"{lag1['kaiming']:.2f}, normal {lag1['normal']:.2f} (w = {cfg.hyena_w:g}, "
        f"emb_dim = {cfg.hyena_emb_dim}). Kaiming's weights make each Sin's argument span several radians, so "
        "three Sin layers fold t into a curve that swings faster than 128 samples can follow; N(0, 0.02) keeps "
        "the arguments small, each layer near-linear, and h about as smooth as its positional features. A "
        "white-noise filter mixes the past at random and training must first undo that: at the Pile setting "
        "Kaiming did not learn recall at all (6.0%). Smooth is not everything: at emb_dim 33 with normal init, "
        "w = 1 gives smoother filters than w = 14 yet reached 12.4% to w = 14's 22.5%.")


# ----------------------------------------------------------------------------------------------------
# TPA (tpa.py)


def default_config(**changes):
    return train.GPTConfig(**changes)


@exercise("tpa.1", "predict",
          hint="first the heads: tpa.matched_heads solves C (R h + R d) + h d C = 4 C^2 for h with R = R_Q + R_K "
               "+ R_V and rounds to the nearest whole head. Then the cache keeps R_K + R_V pairs of factors, "
               "each a head factor of h numbers and a feature factor of d.")
def tpa_rank_one_cache(answer=None):
    """Rank-1 TPA: how small does the cache get?

    With --tpa-rank-q 1 --tpa-rank-k 1 --tpa-rank-v 1 at the default width (C = 384, d = 64, heads
    matched to MHA's parameters by `tpa.matched_heads`), how many numbers does one layer cache per
    token? (MHA caches 2 C = 768.) Work out the heads first. --answer N. Then train it and compare the
    loss with rank (6, 2, 2) (exercise tpa.3)."""
    n_given = as_number(need_answer(answer, "values per token per layer"))
    cfg = default_config(arch="tpa", tpa_rank_q=1, tpa_rank_k=1, tpa_rank_v=1)
    h = tpa.tpa_heads(cfg)
    n = tpa.kv_cache_values_per_token("tpa", h, cfg.tpa_head_dim, (1, 1, 1))
    return n_given == n, (f"h = {h} heads, cache (R_K + R_V)(h + d) = 2 x ({h} + {cfg.tpa_head_dim}) = {n}, "
                          f"{2 * cfg.n_embd / n:.1f}x smaller than MHA's.")


@exercise("tpa.2", "predict",
          hint="per token and layer MHA caches K and V, 2 C values; TPA caches (R_K + R_V)(h + d) with the "
               "matched heads (tpa.tpa_heads). Multiply by the tokens, the 6 layers and 2 bytes a value; "
               "1 MiB is 2^20 bytes.")
def tpa_long_context_memory(answer=None):
    """The KV cache of one long sequence.

    For one sequence of 65,536 tokens in bf16, how many MiB does the whole KV cache of the default
    model (6 layers, C = 384) take with MHA, and with TPA at ranks (6, 2, 2) (heads matched)?
    --answer MHA,TPA in MiB (within 1%)"""
    given = need_numbers(answer, "MHA,TPA in MiB", 2)
    cfg = default_config(arch="tpa")
    per_token = {"mha": tpa.kv_cache_values_per_token("mha", cfg.n_head, cfg.n_embd // cfg.n_head),
                 "tpa": tpa.kv_cache_values_per_token("tpa", tpa.tpa_heads(cfg), cfg.tpa_head_dim)}
    mib = {k: v * 2 * 65536 * cfg.n_layer / 2**20 for k, v in per_token.items()}  # 2 bytes per bf16 value
    ok = given is not None and all(abs(g / mib[k] - 1) <= 0.01 for g, k in zip(given, ("mha", "tpa")))
    return ok, (f"MHA {mib['mha']:.0f} MiB ({per_token['mha']} values per token "
                f"and layer), TPA {mib['tpa']:.0f} MiB ({per_token['tpa']}). Decoding reads all of it for every "
                "new token, so the cache size is the decode speed (python bench.py tpa).")


@exercise("tpa.3", "run",
          hint="compare the last val_loss of the two runs (their metrics.jsonl, or the final line each printed): "
               "rank 1 loses more than 0.02 nats when its loss is above the (6, 2, 2) run's by more than 0.02.")
def tpa_rank_one_training(answer=None):
    """Rank-1 TPA against the paper's ranks, at equal tokens.

        python train.py --arch tpa --max-iters 300 --eval-interval 50 --out-dir out/tpa
        python train.py --arch tpa --tpa-rank-q 1 --tpa-rank-k 1 --tpa-rank-v 1 --max-iters 300 --eval-interval 50 --out-dir out/tpa-r1
    (One GPU, a minute each.) Does rank 1 lose more than 0.02 nats of validation loss? --answer yes|no"""
    given = need_choice(answer, ("yes", "no"))
    runs = {}
    for name, ranks in (("tpa", [6, 2, 2]), ("tpa-r1", [1, 1, 1])):
        info, evals = read_run(f"out/{name}", f"the out/{name} command")
        mc = info["model_config"]
        if info["arch"] != "tpa" or [mc["tpa_rank_q"], mc["tpa_rank_k"], mc["tpa_rank_v"]] != ranks:
            raise NotReady(f"out/{name}/ is not an --arch tpa run with ranks {ranks}")
        runs[name] = (info, evals[-1]["val_loss"])
    if runs["tpa"][0]["train_config"]["max_iters"] != runs["tpa-r1"][0]["train_config"]["max_iters"]:
        raise NotReady("the two runs trained for different numbers of steps: compare at equal tokens")
    d = runs["tpa-r1"][1] - runs["tpa"][1]
    truth = "yes" if d > 0.02 else "no"
    return given == truth, (f"{truth}: val loss, ranks (6,2,2) {runs['tpa'][1]:.4f}, rank 1 {runs['tpa-r1'][1]:.4f} "
                            f"({d:+.4f}).")


# ----------------------------------------------------------------------------------------------------
# Linearity (linearity.py)


@exercise("linearity.1", "predict",
          hint="the score centres X and Y and divides each by its Frobenius norm before fitting a map: what does "
               "that do to a shift and a scale of Y? For LS_wo the target is (10 Y + 3) - X: is that a shifted "
               "and scaled copy of Y - X?")
def linearity_invariance(answer=None):
    """What the score does not see.

    `linearity.linearity_score(X, Y)` returns (LS, LS_wo). If Y is replaced by 10 Y + 3, does LS
    change? Does LS_wo (which scores Y - X)? --answer yes,no style: LS first, then LS_wo."""
    given = need_answer(answer, "two of yes/no: LS,LS_wo")
    given = None if given is None else given.replace(" ", "")
    torch.manual_seed(0)
    x = torch.randn(2000, 16, dtype=torch.float64)
    y = x + 0.5 * torch.tanh(x @ torch.randn(16, 16, dtype=torch.float64))
    before, after = linearity.linearity_score(x, y), linearity.linearity_score(x, 10 * y + 3)
    truth = ",".join("yes" if abs(a - b) > 1e-6 else "no" for a, b in zip(before, after))
    return given == truth, (
        f"{truth}. LS {before[0]:.4f} -> {after[0]:.4f} (centring and normalising remove shift and scale), "
        f"LS_wo {before[1]:.4f} -> {after[1]:.4f} "
        "(10 Y + 3 - X is not a rescaled Y - X: the residual's share changes).")


LINEARITY_TOKENS = 200_000  # linearity.py's default --tokens: the same windows as its table and --prune


def checkpoint_profile(path: str, split: str):
    """(LS, LS_wo) per block pair of a train.py checkpoint on the CPU, from the windows linearity.py
    uses: LINEARITY_TOKENS of validation text (its table), or as many windows of training text (what
    --prune ranks blocks by)."""
    if not os.path.isfile(path):
        raise NotReady(f"no checkpoint {path}: train it first")
    ckpt = linearity.read_checkpoint(train, path)
    model, cfg = train.model_from_checkpoint(ckpt, path)
    train_path, val_path = linearity.token_files(train, ckpt,
                                                 cache_dir=ckpt["train_config"].get("cache_dir", "out/tokens"),
                                                 log=lambda msg: None)
    T = cfg.block_size
    val = train.TokenData(val_path)
    starts = linearity.window_starts(val, T, LINEARITY_TOKENS)
    data = val if split == "val" else train.TokenData(train_path)
    starts = starts if split == "val" else linearity.window_starts(data, T, len(starts) * T)
    batches = [data.windows(starts[i:i + 16], T)[0] for i in range(0, len(starts), 16)]
    return linearity.layer_profile(model, batches, torch.device("cpu")), ckpt


@exercise("linearity.2", "run",
          hint="read the LS_wo column, not LS: with the residual every block scores close to 1 and the ranking "
               "says little. The block with the largest LS_wo is the most linear; give its number from the "
               "table's block column (1 .. L).")
def linearity_which_block(answer=None):
    """Which block would you prune first?

        python train.py --arch gpt --max-iters 300 --eval-interval 50 --out-dir out/gpt
        python linearity.py out/gpt/ckpt.pt
    From the LS_wo column, which block (numbered 1 .. L as in the table: block l maps h_{l-1} to h_l,
    scored on the pair "block l-1 -> block l", and block 1 on "embedding -> block 1") is the most linear,
    the first that `--prune` replaces? --answer l. (`--prune` ranks on training text, the table is on
    validation text; the check uses --prune's.) Then run `python linearity.py out/gpt/ckpt.pt --prune 3`
    and look at what replacing it costs, against removing it. The check runs the model over 200K tokens
    on the CPU (~a minute)."""
    k_given = as_number(need_answer(answer, "a block number, 1 .. L"), int)
    profile, _ = checkpoint_profile("out/gpt/ckpt.pt", "train")
    k = 1 + max(range(len(profile)), key=lambda l: profile[l][1])  # profile[l]: block l + 1
    return k_given == k, (f"block {k} (LS_wo on training text, by block: "
                          + ", ".join(f"{l}: {p[1]:.3f}" for l, p in enumerate(profile, 1)) + ")")


@exercise("linearity.3", "run",
          hint="run python linearity.py on out/gpt/ckpt.pt and on out/gpt-cosine/ckpt.pt and average the LS_wo "
               "column over every row but the first (embedding -> block 1) for each; then compare the two means.")
def linearity_cosine(answer=None):
    """The cosine regulariser: up or down?

    The paper finds that penalising 1 - cos(h_i, h_{i-1}) between consecutive hidden states *lowers*
    the linearity without the residual. Train the same model with it (one GPU, a minute):
        python train.py --arch gpt --reg cosine --max-iters 300 --eval-interval 50 --out-dir out/gpt-cosine
    beside out/gpt (exercise linearity.2). Does the mean LS_wo go up or down with the regulariser in
    your runs? (The mean over the pairs after the first, on `python linearity.py`'s validation tokens,
    as in the README's claims table.) Then retrain with `--reg-pairs all` (the embedding -> block 1 pair
    included, which the default leaves out) and ask again: the paper does not say which. --answer up|down"""
    given = need_choice(answer, ("up", "down"))
    means = {}
    for name, reg in (("gpt", "none"), ("gpt-cosine", "cosine")):
        profile, ckpt = checkpoint_profile(f"out/{name}/ckpt.pt", "val")
        if ckpt["train_config"].get("reg", "none") != reg:
            raise NotReady(f"out/{name}/ckpt.pt was trained with --reg {ckpt['train_config'].get('reg')}, not {reg}")
        later = profile[1:] or profile
        means[name] = sum(p[1] for p in later) / len(later)
    truth = "up" if means["gpt-cosine"] > means["gpt"] else "down"
    return given == truth, (f"{truth}: mean LS_wo, gpt {means['gpt']:.3f}, gpt + cosine {means['gpt-cosine']:.3f}. "
                            "Compare with the paper's claim in the README's claims table.")


# ----------------------------------------------------------------------------------------------------
# The command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exercises:\n" + "\n".join(
                                    f"  {k:12s} {fn.kind:7s} {fn.__doc__.splitlines()[0]}" for k, fn in EXERCISES.items()))
    p.add_argument("exercise", nargs="?", help="which one, e.g. mhc.1")
    p.add_argument("--answer", default=None, help="your prediction, for predict and run exercises")
    p.add_argument("--reveal", action="store_true",
                   help="print the solution (a wrong answer gets only a hint); for a run exercise, from your runs")
    args = p.parse_args(argv)
    if args.exercise is None:
        print(p.epilog)
        return 0
    if args.exercise not in EXERCISES:
        print(f"error: no exercise {args.exercise!r}; choose from {', '.join(EXERCISES)}", file=sys.stderr)
        return 2
    fn = EXERCISES[args.exercise]
    print(f"{args.exercise} ({fn.kind}): {fn.__doc__.strip()}\n")
    try:
        ok, solution = fn(REVEAL if args.reveal and args.answer is None else args.answer)
    except NotReady as e:
        print(f"not yet: {e}")
        if fn.kind == "change":  # the code is not changed yet: the hint helps with the prediction first
            print(f"hint: {fn.hint}")
        return 1
    if args.reveal and args.answer is None:
        print(f"SOLUTION: {solution}")
        return 0
    if ok:
        print(f"PASS: {solution}")
        return 0
    print(f"NOT YET. Hint: {fn.hint}")
    print(f"SOLUTION: {solution}" if args.reveal else
          f"(python exercises.py {args.exercise} --reveal shows the solution)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
