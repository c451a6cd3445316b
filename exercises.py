"""
exercises.py -- three exercises per technique, each with an automatic check.

    python exercises.py                    # the list
    python exercises.py mhc.1              # the task, then its check (exit 0 when it passes)
    python exercises.py tpa.1 --answer 100     # a prediction (a wrong one: the check says so)

Three kinds of exercise:
    change   edit the technique file as asked; the check measures the code as it now is and passes
             when it shows what the change should cause (put the original back afterwards: git checkout);
    predict  work out a number or a yes/no before you run anything, pass it with --answer; the check
             computes the truth from the repository's own functions, so it is never a stored answer;
    run      run the commands given; the check reads their outputs (metrics.jsonl, run.json,
             checkpoints) and compares them, with your prediction of the outcome as --answer.
Every check runs on a CPU in seconds, except what the "run" exercises ask you to train.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

EXERCISES = {}  # id -> function(answer) -> (passed, message); its docstring is the task


def exercise(ex_id: str, kind: str):
    def register(fn):
        fn.kind = kind
        EXERCISES[ex_id] = fn
        return fn
    return register


class NotReady(Exception):
    """The exercise's precondition is missing (an answer, a run, the code change): say what to do."""


def need_answer(answer: str | None, form: str) -> str:
    if answer is None:
        raise NotReady(f"give your prediction with --answer ({form})")
    return answer.strip().lower()


def as_number(answer: str) -> float:
    try:
        return float(answer)
    except ValueError:
        raise NotReady(f"--answer {answer!r} is not a number")


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


@exercise("mhc.1", "change")
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
    import mhc
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(64, 1, 4, 4, generator=g)  # 64 sub-layers, n = 4
    res = mhc.sinkhorn_knopp(logits)
    rows, cols = res.sum(-1), res.sum(-2)
    if (cols - 1).abs().max() < 0.2:  # 20 Sinkhorn iterations leave them within ~0.03 here
        raise NotReady("sinkhorn_knopp still makes the columns sum to ~1: it is still Sinkhorn; make the change")
    if (rows - 1).abs().max() > 1e-4 or (res < 0).any():
        return False, "the rows of H_res do not sum to 1 with non-negative entries: that is not a row softmax"
    fwd, bwd = mhc.amax_gain(mhc.composite(list(res)))
    ok = fwd < 1 + 1e-4 and bwd > 1.2
    return ok, (f"composite of 64 layers: forward gain {fwd:.4f}, backward gain {bwd:.3f}. Rows of a product of "
                "row-stochastic matrices still sum to 1, so activations cannot grow going forward; nothing holds "
                "the column sums to 1, so gradients flowing back through the streams are amplified (here up to n, "
                "since the entries are non-negative and total n; unconstrained HC has no such bound). Sinkhorn "
                "holds both sides at 1." if ok else f"forward {fwd:.4f}, backward {bwd:.3f}: not what a row softmax gives")


@exercise("mhc.2", "predict")
def mhc_iterations(answer=None):
    """How many Sinkhorn iterations does a deep stack need?

    Take 24 sub-layers' H_res from logits ~ N(0, 1) (n = 4, 256 tokens, torch.Generator seed 0:
    `torch.randn(24, 256, 4, 4, generator=g)`), project each with `mhc.sinkhorn_knopp(logits, iters=t)`,
    and multiply them (`mhc.composite`). What is the smallest t for which the composite's backward
    Amax gain (`mhc.amax_gain`, averaged over tokens) is below 1.02? Guess first, then write the loop.
    The paper uses 20; each iteration costs time in every sub-layer of every step. --answer t (on the
    unmodified mhc.py)."""
    import mhc
    t_given = int(as_number(need_answer(answer, "an iteration count")))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 256, 4, 4, generator=g)
    gains = {}
    for t in range(1, 41):
        gains[t] = mhc.amax_gain(mhc.composite(list(mhc.sinkhorn_knopp(logits, iters=t))))[1]
        if gains[t] < 1.02:
            break
    else:
        return False, "even 40 iterations leave the backward gain above 1.02: is mhc.py modified (mhc.1)?"
    shown = ", ".join(f"t={k}: {v:.4f}" for k, v in gains.items())
    return t_given == t, f"{'right' if t_given == t else 'not quite'}: smallest t is {t} (backward gain {shown})"


@exercise("mhc.3", "predict")
def mhc_which_sums(answer=None):
    """Which H_res leave mHC's initial streams, and so the plain model, unchanged?

    The n streams start as n copies of the embedding, so h_i = x for every stream i. One write-back
    is h' = H_res h + H_post^T out (`mhc.write_back`). For h' to be n copies of x + out-mixing again,
    which sums of H_res must be 1: "rows", "columns" or "both"? (Sinkhorn makes H_res doubly
    stochastic, and any such H_res is a no-op at step 0; which half of that is actually needed?)
    --answer rows|columns|both"""
    import mhc
    given = need_answer(answer, "rows, columns or both")
    if given not in ("rows", "columns", "both"):
        raise NotReady("--answer rows, columns or both")
    x = torch.randn(1, 1, 1, 8).expand(1, 1, 4, 8)  # (B, T, n, C): four identical streams
    zero_out, post = torch.zeros(1, 1, 8), torch.ones(1, 1, 4)
    m = torch.rand(4, 4) + 0.1
    candidates = {"rows": m / m.sum(-1, keepdim=True), "columns": m / m.sum(-2, keepdim=True)}
    kept = {name: torch.allclose(mhc.write_back(x, zero_out, post, r[None, None]), x, atol=1e-6)
            for name, r in candidates.items()}  # does H_res leave identical streams as they are?
    truth = "both" if all(kept.values()) else next((k for k, v in kept.items() if v), "neither")
    return given == truth, (f"{'right' if given == truth else 'not quite'}: only {truth} (stream i receives "
                            "sum_j H_res[i, j] h_j = (row sum i) x). Columns matter for the backward pass.")


@exercise("mhc.4", "predict")
def mhc_write_back_bytes(answer=None):
    """How many bytes does one write-back move, and what does that say about its speed?

    `kernels.mhc_post_res` computes h' = H_res h + H_post^T f per token: it reads the n streams h and
    the sub-layer output f and writes the n streams h' (the coefficients are small: ignore them). At
    the benchmark's shape (B = 64, T = 512, n = 4, C = 384) and with f stored like the streams, how
    many MB (10^6 bytes) is that with fp32 streams, and with bf16 streams (--residual-dtype bfloat16)?
    At the ~3.0 TB/s an H100 copy reaches, how long must the bf16 one take at least? Compare with the
    write-back's forward in `python kernels.py --bench mhc` (README: 0.082 ms). --answer FP32_MB,BF16_MB"""
    parts = need_answer(answer, "FP32_MB,BF16_MB").replace(" ", "").split(",")
    if len(parts) != 2:
        raise NotReady("--answer two numbers: FP32_MB,BF16_MB")
    given = [as_number(p) for p in parts]
    n, C, tokens = 4, 384, 64 * 512
    truth = [(2 * n + 1) * C * tokens * size / 1e6 for size in (4, 2)]  # read n + 1 rows of C, write n
    ok = all(abs(g - t) <= 0.02 * t for g, t in zip(given, truth))
    return ok, (f"{'right' if ok else 'not quite'}: (2n + 1) C values per token ({n} streams read, f read, {n} "
                f"streams written) x {tokens:,} tokens = {truth[0]:.1f} MB in fp32, {truth[1]:.1f} MB in bf16: "
                f"{truth[1] / 3000:.3f} ms at 3.0 TB/s (the kernel: 0.082 ms). Every mHC sub-layer moves this and "
                "more (README: ~13.5 passes over the streams), which is why mHC's cost is memory traffic, not "
                "arithmetic.")


@exercise("mhc.5", "predict")
def mhc_wide_floor(answer=None):
    """How much of mHC's cost is stream traffic in a wide model?

    The README's width table runs d = 4096, 6 layers (12 sub-layers), 16,384 tokens a step, n = 4
    streams stored in bf16. Counting only passes over the streams (one pass = every stream value of
    every token read or written once) at the ~3.0 TB/s an H100 copy reaches: how many ms a step do
    this repository's kernels (~13.5 passes per sub-layer) need at least, and how many would a design
    that keeps only the ~5 passes no fusion removes? Set them against the measured 39 ms of extra time
    and the plain step's 241 ms (README, "HC and mHC"). --answer MS_13.5_PASSES,MS_5_PASSES"""
    parts = need_answer(answer, "MS_13.5_PASSES,MS_5_PASSES").replace(" ", "").split(",")
    if len(parts) != 2:
        raise NotReady("--answer two numbers: MS_13.5_PASSES,MS_5_PASSES")
    given = [as_number(p) for p in parts]
    n, C, tokens, sublayers = 4, 4096, 32 * 512, 12
    one_pass_ms = n * C * tokens * 2 / 3.0e12 * 1e3  # bf16: 2 bytes a value
    truth = [passes * one_pass_ms * sublayers for passes in (13.5, 5)]
    ok = all(abs(g - t) <= 0.03 * t for g, t in zip(given, truth))
    return ok, (f"{'right' if ok else 'not quite'}: one pass is {n} x {C} x {tokens:,} x 2 bytes = "
                f"{n * C * tokens * 2 / 1e6:.0f} MB, {one_pass_ms:.3f} ms; x {sublayers} sub-layers: {truth[0]:.1f} ms "
                f"a step for 13.5 passes ({100 * truth[0] / 241:.0f}% of the plain step; the kernels take 39 ms), "
                f"{truth[1]:.1f} ms for 5 ({100 * truth[1] / 241:.1f}%). At d = 384 the same 5 passes are 10% of "
                "the step: the matmuls grow with C^2, the streams with C, so the paper's 6.7% is a wide model's "
                "number.")


# ----------------------------------------------------------------------------------------------------
# Hyena (hyena.py)


@exercise("hyena.1", "change")
def hyena_window_off(answer=None):
    """Switch off the implicit filter's exponential window.

    In hyena.py, ImplicitFilter.forward, replace the window by ones (`window = torch.ones_like(...)`).
    Predict: where along the filter does its energy go, and what should that do to a model that
    mostly needs the last few tokens? The check measures the share of each filter's energy past
    position l_max / 4 at init. Then train and compare the losses:
        python train.py --arch hyena --max-iters 300 --eval-interval 50 --out-dir out/hyena-nowindow"""
    import hyena
    torch.manual_seed(0)
    f = hyena.ImplicitFilter(n_embd=64, order=2, l_max=1024)
    f.init_weights()
    with torch.no_grad():
        h = f(1024)  # (N, C, L)
    energy = h.pow(2)
    tail = (energy[..., 256:].sum(-1) / energy.sum(-1)).mean().item()
    if tail < 0.2:
        raise NotReady(f"{100 * tail:.1f}% of the filters' energy is past position 256: the window is still "
                       "on (with it off, about three quarters is); make the change")
    return True, (f"{100 * tail:.1f}% of the filters' energy now lies past position 256 (with the window, a few "
                  "per cent). Without the decay the filters start as long, flat-ish sums over the past; the window "
                  "is the paper's bias towards recent tokens (Sec. 3.3).")


@exercise("hyena.2", "predict")
def hyena_fft_size(answer=None):
    """How much zero-padding does a causal FFT convolution need?

    `hyena.fft_causal_conv` pads u and h to n = 2L before multiplying their DFTs. A product of DFTs is a
    circular convolution: too little padding wraps the end of the sequence onto its start, and the
    output at time t then sees tokens after t. For L = 100, what is the smallest n whose first L
    outputs equal `hyena.direct_causal_conv`? --answer n (then: is 2L a waste?)"""
    n_given = int(as_number(need_answer(answer, "an FFT length")))
    import hyena
    torch.manual_seed(0)
    L = 100
    u, h = torch.randn(1, 3, L, dtype=torch.float64), torch.randn(3, L, dtype=torch.float64)
    ref = hyena.direct_causal_conv(u, h)
    for n in range(L, 2 * L + 1):
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(h, n=n), n=n)[..., :L]
        if torch.allclose(y, ref, atol=1e-9):
            break
    return n_given == n, (f"{'right' if n_given == n else 'not quite'}: n = {n} = 2L - 1 (the linear convolution "
                          f"of two length-L signals has 2L - 1 terms). 2L is used because FFTs of even and "
                          f"power-of-two lengths are faster.")


@exercise("hyena.3", "predict")
def hyena_filter_init(answer=None):
    """Which filter init starts the implicit filters as white noise?

    The filter FFN's linear layers can start as PyTorch's default (`init="kaiming"`: uniform weights of
    bound 1/sqrt(fan_in)) or as safari's training pipeline does (`"normal"`: N(0, 0.02), zero biases;
    the default, --hyena-filter-init). Each feeds sin(w x), w = --hyena-w, three layers deep. Build
    `hyena.ImplicitFilter` at the recall setting (C = 128, order 2, l_max = 128, emb_dim and w as
    train.py's defaults) with each init. Predict: which one's filters h start as white noise along
    time (lag-1 autocorrelation near 0) rather than as smooth curves (near 1)? --answer kaiming|normal
    The check computes both. (Measured on an H100, README's Hyena section: MQAR recall at L = 128,
    3000 steps, 3 seeds, chance 6.2%: the Pile setting w 14, emb_dim 33 with Kaiming init 6.0%, with
    normal init 22.5%; the defaults w 10, emb_dim 5, normal init 38.2%.)"""
    given = need_answer(answer, "kaiming or normal")
    if given not in ("kaiming", "normal"):
        raise NotReady("--answer kaiming or normal")
    import hyena
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
        f"{'right' if given == noisy else 'not quite'}: lag-1 autocorrelation of h along time (mean over the "
        f"N C filters) kaiming {lag1['kaiming']:.2f}, normal {lag1['normal']:.2f} (w = {cfg.hyena_w:g}, "
        f"emb_dim = {cfg.hyena_emb_dim}). Kaiming's weights make each Sin's argument span several radians, so "
        "three Sin layers fold t into a curve that swings faster than 128 samples can follow; N(0, 0.02) keeps "
        "the arguments small, each layer near-linear, and h about as smooth as its positional features. A "
        "white-noise filter mixes the past at random and training must first undo that: at the Pile setting "
        "Kaiming did not learn recall at all (6.0%). Smooth is not everything: at emb_dim 33 with normal init, "
        "w = 1 gives smoother filters than w = 14 yet reached 12.4% to w = 14's 22.5%.")


# ----------------------------------------------------------------------------------------------------
# TPA (tpa.py)


def default_config(**changes):
    import train
    return train.GPTConfig(**changes)


@exercise("tpa.1", "predict")
def tpa_rank_one_cache(answer=None):
    """Rank-1 TPA: how small does the cache get?

    With --tpa-rank-q 1 --tpa-rank-k 1 --tpa-rank-v 1 at the default width (C = 384, d = 64, heads
    matched to MHA's parameters by `tpa.matched_heads`), how many numbers does one layer cache per
    token? (MHA caches 2 C = 768.) Work out the heads first. --answer N. Then train it and compare the
    loss with rank (6, 2, 2) (exercise tpa.3)."""
    import tpa
    n_given = as_number(need_answer(answer, "values per token per layer"))
    cfg = default_config(arch="tpa", tpa_rank_q=1, tpa_rank_k=1, tpa_rank_v=1)
    h = tpa.tpa_heads(cfg)
    n = tpa.kv_cache_values_per_token("tpa", h, cfg.tpa_head_dim, (1, 1, 1))
    return n_given == n, (f"{'right' if n_given == n else 'not quite'}: h = {h} heads, cache (R_K + R_V)(h + d) "
                          f"= 2 x ({h} + {cfg.tpa_head_dim}) = {n}, {2 * cfg.n_embd / n:.1f}x smaller than MHA's.")


@exercise("tpa.2", "predict")
def tpa_long_context_memory(answer=None):
    """The KV cache of one long sequence.

    For one sequence of 65,536 tokens in bf16, how many MiB does the whole KV cache of the default
    model (6 layers, C = 384) take with MHA, and with TPA at ranks (6, 2, 2) (heads matched)?
    --answer MHA,TPA in MiB (within 1%)"""
    import tpa
    given = need_answer(answer, "two numbers: MHA,TPA in MiB")
    try:
        mha_given, tpa_given = (float(x) for x in given.split(","))
    except ValueError:
        raise NotReady("--answer takes two numbers, MHA,TPA, e.g. 100,40")
    cfg = default_config(arch="tpa")
    per_token = {"mha": tpa.kv_cache_values_per_token("mha", cfg.n_head, cfg.n_embd // cfg.n_head),
                 "tpa": tpa.kv_cache_values_per_token("tpa", tpa.tpa_heads(cfg), cfg.tpa_head_dim)}
    mib = {k: v * 2 * 65536 * cfg.n_layer / 2**20 for k, v in per_token.items()}  # 2 bytes per bf16 value
    ok = abs(mha_given / mib["mha"] - 1) <= 0.01 and abs(tpa_given / mib["tpa"] - 1) <= 0.01
    return ok, (f"{'right' if ok else 'not quite'}: MHA {mib['mha']:.0f} MiB ({per_token['mha']} values per token "
                f"and layer), TPA {mib['tpa']:.0f} MiB ({per_token['tpa']}). Decoding reads all of it for every "
                "new token, so the cache size is the decode speed (python kernels.py --bench tpa).")


@exercise("tpa.3", "run")
def tpa_rank_one_training(answer=None):
    """Rank-1 TPA against the paper's ranks, at equal tokens.

        python train.py --arch tpa --max-iters 300 --eval-interval 50 --out-dir out/tpa
        python train.py --arch tpa --tpa-rank-q 1 --tpa-rank-k 1 --tpa-rank-v 1 --max-iters 300 --eval-interval 50 --out-dir out/tpa-r1
    (One GPU, a minute each.) Does rank 1 lose more than 0.02 nats of validation loss? --answer yes|no"""
    given = need_answer(answer, "yes or no")
    if given not in ("yes", "no"):
        raise NotReady("--answer yes or no")
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
    return given == truth, (f"val loss: ranks (6,2,2) {runs['tpa'][1]:.4f}, rank 1 {runs['tpa-r1'][1]:.4f} "
                            f"({d:+.4f}); {'as you predicted' if given == truth else 'not what you predicted'}.")


# ----------------------------------------------------------------------------------------------------
# Linearity (linearity.py)


@exercise("linearity.1", "predict")
def linearity_invariance(answer=None):
    """What the score does not see.

    `linearity.linearity_score(X, Y)` returns (LS, LS_wo). If Y is replaced by 10 Y + 3, does LS
    change? Does LS_wo (which scores Y - X)? --answer yes,no style: LS first, then LS_wo."""
    import linearity
    given = need_answer(answer, "two of yes/no: LS,LS_wo")
    torch.manual_seed(0)
    x = torch.randn(2000, 16, dtype=torch.float64)
    y = x + 0.5 * torch.tanh(x @ torch.randn(16, 16, dtype=torch.float64))
    before, after = linearity.linearity_score(x, y), linearity.linearity_score(x, 10 * y + 3)
    truth = ",".join("yes" if abs(a - b) > 1e-6 else "no" for a, b in zip(before, after))
    return given.replace(" ", "") == truth, (
        f"{'right' if given.replace(' ', '') == truth else 'not quite'}: {truth}. LS {before[0]:.4f} -> "
        f"{after[0]:.4f} (centring and normalising remove shift and scale), LS_wo {before[1]:.4f} -> {after[1]:.4f} "
        "(10 Y + 3 - X is not a rescaled Y - X: the residual's share changes).")


LINEARITY_TOKENS = 200_000  # linearity.py's default --tokens: the same windows as its table and --prune


def checkpoint_profile(path: str, split: str):
    """(LS, LS_wo) per block pair of a train.py checkpoint on the CPU, from the windows linearity.py
    uses: LINEARITY_TOKENS of validation text (its table), or as many windows of training text (what
    --prune ranks blocks by)."""
    import train
    import linearity
    if not os.path.isfile(path):
        raise NotReady(f"no checkpoint {path}: train it first")
    ckpt = train.load_checkpoint(path)
    model, cfg = train.model_from_checkpoint(ckpt, path)
    train_path, val_path = linearity.token_files(ckpt, cache_dir=ckpt["train_config"].get("cache_dir", "out/tokens"),
                                                 log=lambda msg: None)
    T = cfg.block_size
    val = train.TokenData(val_path)
    starts = linearity.window_starts(val, T, LINEARITY_TOKENS)
    data = val if split == "val" else train.TokenData(train_path)
    starts = starts if split == "val" else linearity.window_starts(data, T, len(starts) * T)
    batches = [data.windows(starts[i:i + 16], T)[0] for i in range(0, len(starts), 16)]
    return linearity.layer_profile(model, batches, torch.device("cpu")), ckpt


@exercise("linearity.2", "run")
def linearity_which_block(answer=None):
    """Which block would you prune first?

        python train.py --arch gpt --max-iters 300 --eval-interval 50 --out-dir out/gpt
        python linearity.py out/gpt/ckpt.pt
    From the LS_wo column, which block (0-based: the pair "block k -> block k+1" is block k, and
    "embedding -> block 1" is block 0) is the most linear, the first that `--prune` replaces?
    --answer k. (`--prune` ranks on training text, the table is on validation text; the check uses
    --prune's.) Then run `python linearity.py out/gpt/ckpt.pt --prune 3` and look at what replacing
    it costs, against removing it. The check runs the model over 200K tokens on the CPU (~a minute)."""
    k_given = int(as_number(need_answer(answer, "a block index")))
    profile, _ = checkpoint_profile("out/gpt/ckpt.pt", "train")
    k = max(range(len(profile)), key=lambda l: profile[l][1])
    return k_given == k, (f"{'right' if k_given == k else 'not quite'}: block {k} (LS_wo on training text: "
                          + ", ".join(f"{l}: {p[1]:.3f}" for l, p in enumerate(profile)) + ")")


@exercise("linearity.3", "run")
def linearity_cosine(answer=None):
    """The cosine regulariser: up or down?

    The paper finds that penalising 1 - cos(h_i, h_{i-1}) between consecutive hidden states *lowers*
    the linearity without the residual. Train the same model with it (one GPU, a minute):
        python train.py --arch gpt --reg cosine --max-iters 300 --eval-interval 50 --out-dir out/gpt-cosine
    beside out/gpt (exercise linearity.2). Does the mean LS_wo go up or down with the regulariser in
    your runs? (The mean over the pairs after the first, on `python linearity.py`'s validation tokens,
    as in the README's claims table.) Then retrain with `--reg-pairs all` (the embedding -> block 1 pair
    included, which the default leaves out) and ask again: the paper does not say which. --answer up|down"""
    given = need_answer(answer, "up or down")
    if given not in ("up", "down"):
        raise NotReady("--answer up or down")
    means = {}
    for name, reg in (("gpt", "none"), ("gpt-cosine", "cosine")):
        profile, ckpt = checkpoint_profile(f"out/{name}/ckpt.pt", "val")
        if ckpt["train_config"].get("reg", "none") != reg:
            raise NotReady(f"out/{name}/ckpt.pt was trained with --reg {ckpt['train_config'].get('reg')}, not {reg}")
        later = profile[1:] or profile
        means[name] = sum(p[1] for p in later) / len(later)
    truth = "up" if means["gpt-cosine"] > means["gpt"] else "down"
    return given == truth, (f"mean LS_wo: gpt {means['gpt']:.3f}, gpt + cosine {means['gpt-cosine']:.3f}: {truth}; "
                            f"{'as you predicted' if given == truth else 'not what you predicted'}. Compare with "
                            "the paper's claim in the README's results.")


# ----------------------------------------------------------------------------------------------------
# The command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exercises:\n" + "\n".join(
                                    f"  {k:12s} {fn.kind:7s} {fn.__doc__.splitlines()[0]}" for k, fn in EXERCISES.items()))
    p.add_argument("exercise", nargs="?", help="which one, e.g. mhc.1")
    p.add_argument("--answer", default=None, help="your prediction, for predict and run exercises")
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
        ok, message = fn(args.answer)
    except NotReady as e:
        print(f"not yet: {e}")
        return 1
    print(("PASS: " if ok else "NOT YET: ") + message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
