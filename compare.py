"""
compare.py -- every arch of this repository on TinyStories at equal tokens, and the four papers' claims
next to what our runs show.

    python compare.py                          # all of it, ~17 min on one H100; results in out/compare/
    python compare.py --runs gpt,mhc+tpa       # some runs only
    python compare.py --stages report          # rebuild the report from the runs already there
    python compare.py --readme README.md       # ... and put it in the README, between its two markers
    python compare.py -- --device cpu          # anything after `--` goes to every train.py run

What it runs, each a plain command you could type yourself (its log is out/compare/RUN/train.log):
    train       train.py --arch ARCH --max-iters 300 --eval-interval 50 for every arch (same seed, same
                data order, same 32K tokens a step, so equal tokens), and gpt with --reg cosine;
    linearity   linearity.py on every checkpoint (+ --prune 3 for gpt and gpt + cosine);
    recall      train.py --task recall for gpt and hyena at two sequence lengths;
    speed       kernels.py --bench hyena (GPU only): Hyena vs attention, 256 to 64K tokens;
    report      results.md (tables) and loss_curves.png (matplotlib, optional) from what the others wrote.
A run that already finished is skipped (delete its folder to redo it), so a stopped comparison continues.
The report reads only small files (metrics.jsonl, run.json, linearity.json, hyena_speed.json), never a
checkpoint, and says which runs are missing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import train

HERE = os.path.dirname(os.path.abspath(__file__))

# Runs on TinyStories: every arch of train.ARCHS but mhc+hyena (one combination is enough to show the
# plug-in points compose), and the plain GPT with the linearity paper's cosine regulariser.
DEFAULT_RUNS = ["gpt", "hc", "mhc", "tpa", "tpa-kvonly", "hyena", "mhc+tpa", "gpt-cosine"]
EXTRA_RUNS = {"gpt-cosine": ["--arch", "gpt", "--reg", "cosine"]}  # run name -> train.py arguments
PRUNED = ("gpt", "gpt-cosine")  # linearity.py --prune 3 on these (the paper prunes plain residual models)

# Associative recall (Hyena paper Sec. 4.1, Zoology's MQAR): 8 key-value pairs over 16 keys and 16
# values, then the 8 keys queried again in random order; a 2-layer, width-128 model of each mixer.
RECALL_ARCHS = ("gpt", "hyena")
RECALL_ARGS = ["--task", "recall", "--recall-vocab", "33", "--recall-pairs", "8", "--n-layer", "2",
               "--n-embd", "128", "--n-head", "2", "--batch-size", "64", "--lr", "1e-3", "--min-lr", "1e-4"]

BEGIN = "<!-- compare.py results: begin (generated; edit compare.py, not this block) -->"
END = "<!-- compare.py results: end -->"


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------
# Running the commands


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def finished(run_dir: str, max_iters: int) -> bool:
    """A training run is done when its metrics hold the evaluation at the last step."""
    return any(r.get("step") == max_iters and "val_loss" in r
               for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")))


def run_logged(cmd: list[str], log_path: str, show=("val loss", "error", "recall accuracy")) -> int:
    """Run cmd with its output in log_path; echo the lines that show progress."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE)
        for line in proc.stdout:
            f.write(line)
            if any(s in line for s in show):
                log("    " + line.rstrip())
        return proc.wait()


def train_runs(runs: list[str], args, extra: list[str]) -> list[str]:
    failed = []
    for i, name in enumerate(runs, 1):
        run_dir = os.path.join(args.out, name)
        if finished(run_dir, args.max_iters):
            log(f"[train {i}/{len(runs)}] {name}: finished earlier ({run_dir})")
            continue
        cmd = [sys.executable, "train.py", *EXTRA_RUNS.get(name, ["--arch", name]),
               "--max-iters", str(args.max_iters), "--eval-interval", str(args.eval_interval),
               "--out-dir", run_dir, *extra]
        log(f"[train {i}/{len(runs)}] {name}: {' '.join(cmd[1:])}")
        stale = os.path.join(run_dir, "linearity.json")  # scores of an earlier checkpoint
        if os.path.isfile(stale):
            os.remove(stale)
        t0 = time.time()
        rc = run_logged(cmd, os.path.join(run_dir, "train.log"))
        log(f"    {'done' if rc == 0 else f'FAILED (exit {rc})'} in {time.time() - t0:.0f} s")
        if rc != 0:
            failed.append(name)
    return failed


def linearity_runs(runs: list[str], args) -> list[str]:
    failed = []
    for name in runs:
        run_dir = os.path.join(args.out, name)
        out = os.path.join(run_dir, "linearity.json")
        if not finished(run_dir, args.max_iters) or not os.path.isfile(os.path.join(run_dir, "ckpt.pt")):
            log(f"[linearity] {name}: no finished run with a checkpoint; skipped")
            continue
        if os.path.isfile(out):
            log(f"[linearity] {name}: done earlier ({out})")
            continue
        cmd = [sys.executable, "linearity.py", os.path.join(run_dir, "ckpt.pt"), "--json", out,
               "--tokens", str(args.linearity_tokens)]
        if name in PRUNED:
            n_layer = read_json(os.path.join(run_dir, "run.json"))["model_config"]["n_layer"]
            cmd += ["--prune", str(min(3, n_layer)), "--distill-steps", str(args.distill_steps)]
        log(f"[linearity] {name}: {' '.join(cmd[1:])}")
        rc = run_logged(cmd, os.path.join(run_dir, "linearity.log"), show=("error",))
        if rc != 0:
            log(f"    FAILED (exit {rc}); see {run_dir}/linearity.log")
            failed.append(name)
    return failed


def recall_runs(args, extra: list[str]) -> list[str]:
    failed = []
    for length in args.recall_lengths:
        for arch in RECALL_ARCHS:
            run_dir = os.path.join(args.out, f"recall-{arch}-{length}")
            if finished(run_dir, args.recall_steps):
                log(f"[recall] {arch} at L={length}: finished earlier")
                continue
            # extra first: the task's own settings below win over anything passed after `--`
            cmd = [sys.executable, "train.py", *extra, "--arch", arch, *RECALL_ARGS, "--block-size", str(length),
                   "--max-iters", str(args.recall_steps), "--eval-interval", str(args.recall_steps // 4),
                   "--log-interval", "100", "--out-dir", run_dir]
            log(f"[recall] {arch} at L={length}: {' '.join(cmd[1:])}")
            rc = run_logged(cmd, os.path.join(run_dir, "train.log"))
            if rc != 0:
                log(f"    FAILED (exit {rc})")
                failed.append(f"recall-{arch}-{length}")
    return failed


def speed_run(args) -> list[str]:
    out = os.path.join(args.out, "hyena_speed.json")
    if os.path.isfile(out):
        log(f"[speed] done earlier ({out})")
        return []
    import torch
    if not torch.cuda.is_available():
        log("[speed] needs a CUDA GPU; skipped")
        return []
    cmd = [sys.executable, "kernels.py", "--bench", "hyena", "--json", out,
           "--plot", os.path.join(args.out, "hyena_speed.png")]
    log(f"[speed] {' '.join(cmd[1:])}")
    rc = run_logged(cmd, os.path.join(args.out, "hyena_speed.log"), show=("| 1 |", "error"))
    return [] if rc == 0 else ["speed"]


# ----------------------------------------------------------------------------------------------------
# Reading the runs


def summarise(name: str, run_dir: str) -> dict | None:
    """One run's numbers: final and best validation loss, the loss curve, steady-state speed, memory."""
    info, records = read_json(os.path.join(run_dir, "run.json")), read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    if info is None or not records:
        return None
    evals = [r for r in records if "val_loss" in r]
    logs = [r for r in records if "ms_per_step" in r]
    gains = [r for r in records if "gain_fwd" in r]
    steady = logs[1:] or logs  # the first log interval includes compilation
    return {
        "name": name, "info": info, "evals": evals, "logs": logs, "gains": gains,
        "final_step": evals[-1]["step"] if evals else 0,
        "val": evals[-1]["val_loss"] if evals else math.nan,
        "best": min(r["val_loss"] for r in evals) if evals else math.nan,
        "accuracy": evals[-1].get("recall_accuracy") if evals else None,
        "ms": statistics.median(r["ms_per_step"] for r in steady) if steady else math.nan,
        "tok_s": statistics.median(r["tokens_per_s"] for r in steady) if steady else math.nan,
        # peak memory of training alone: logged before the first (uncompiled, more hungry) evaluation
        "mem": max((r.get("peak_mem_gib", math.nan) for r in logs if not evals or r["step"] < evals[0]["step"]),
                   default=math.nan),
        "cache": cache_values_per_token(info["model_config"]),
        "linearity": read_json(os.path.join(run_dir, "linearity.json")),
    }


def cache_values_per_token(model_config: dict) -> int:
    """Numbers a token mixer caches per generated token and layer, counted from its own init_cache
    (on the meta device, so nothing is allocated): attention 2 C, TPA (R_K + R_V)(h + d), Hyena N C."""
    import torch
    cfg = train.GPTConfig(**model_config)
    with torch.device("meta"):
        mixer = train.MIXERS[train.ARCHS[cfg.arch][0]](cfg, 0)

    def numel(max_len):
        return sum(t.numel() for t in mixer.init_cache(1, max_len, "meta", torch.float32).values()
                   if isinstance(t, torch.Tensor))
    return numel(2) - numel(1)


# ----------------------------------------------------------------------------------------------------
# The report


def fmt(x, spec=".3f", missing="—"):
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def lin_means(s: dict | None) -> tuple[float, float] | None:
    """Mean LS and LS_wo over the pairs block i -> block i+1. The first pair, from the raw token embedding,
    is left out of the mean (it is in the per-pair table): it is the outlier in every run here."""
    if not s or not s.get("linearity") or len(s["linearity"]["profile"]) < 2:
        return None
    prof = s["linearity"]["profile"][1:]
    return statistics.mean(p["ls"] for p in prof), statistics.mean(p["ls_wo"] for p in prof)


# Loss differences smaller than this are called "within noise": identical commands differ by ~0.01 nats
# between runs here (bf16, compile autotuning, non-deterministic kernels), and these are single seeds.
NOISE = 0.02


def loss_verdict(d: float) -> str:
    return (f"yes (< -{NOISE})" if d < -NOISE else f"within noise (±{NOISE})" if abs(d) <= NOISE
            else f"no (> +{NOISE})")


# The papers' claims (the papers are cited in each technique file): key -> (paper, claim).
CLAIMS = {
    "hc_gain": ("HC / mHC", "HC's composite residual gain (Amax, forward) grows large: peaks ~3000 at 27B"),
    "mhc_gain": ("mHC", "mHC's composite gain stays near 1 (<= ~1.6 at 27B)"),
    "hc_loss": ("HC", "dynamic HC x4 lowers the loss (OLMo-1B: 2.781 vs 2.811)"),
    "mhc_loss": ("mHC", "mHC lowers the loss vs the baseline (27B: -0.021)"),
    "hyena_loss": ("Hyena", "matches attention's perplexity (at 125M and 5B+ tokens)"),
    "hyena_cross": ("Hyena", "faster than FlashAttention from 4K-8K tokens (order 2, fused FFT conv)"),
    "hyena_64k": ("Hyena", "~100x faster than FlashAttention at 64K"),
    "recall": ("Hyena / Zoology", "at short lengths attention solves associative recall; gated convolutions "
               "trail it"),
    "tpa": ("TPA", "KV cache 3.9-5.6x smaller than MHA's (paper configs) at equal or better loss"),
    "ls": ("Linearity", "consecutive hidden states are ~0.99 linear with the residual"),
    "ls_wo": ("Linearity", "much lower without the residual (middle layers ~0.35-0.65)"),
    "cos_ls": ("Linearity", "the cosine regulariser lowers the linearity without the residual"),
    "cos_loss": ("Linearity", "... and improves quality"),
    "prune": ("Linearity", "replacing the most linear blocks by linear maps (+ distillation) costs less than "
              "removing them"),
}


def claims(runs: dict, recall: dict, speed: dict | None) -> list[tuple[str, str, str, str]]:
    """(paper, claim, our run, verdict) rows. Each verdict is computed from the numbers by the rule
    stated in brackets beside it, so a rerun that comes out differently says so."""
    rows = []
    gpt = runs.get("gpt")

    def row(key, ours, verdict):
        rows.append((*CLAIMS[key], ours, verdict))

    def delta(name):  # final validation loss minus gpt's, at equal tokens
        return runs[name]["val"] - gpt["val"] if name in runs and gpt else None

    # HC / mHC
    if "hc" in runs and runs["hc"]["gains"]:
        g = max(r["gain_fwd"] for r in runs["hc"]["gains"])
        row("hc_gain", f"hc, {runs['hc']['info']['model_config']['n_layer']} layers: max {g:.2f} over training",
            "grows (> 1.5)" if g > 1.5 else "no (<= 1.5)")
    else:
        row("hc_gain", "not run (hc)", "—")
    for name in ("mhc", "mhc+tpa"):
        if name in runs and runs[name]["gains"]:
            g = max(max(r["gain_fwd"], r["gain_bwd"]) for r in runs[name]["gains"])
            row("mhc_gain", f"{name}: max {g:.3f} (forward or backward, over training)",
                "yes (<= 1.6)" if g <= 1.6 else "no (> 1.6)")
        elif name == "mhc":
            row("mhc_gain", "not run (mhc)", "—")
    for name in ("hc", "mhc"):
        d = delta(name)
        row(f"{name}_loss", f"{name} - gpt: {d:+.3f} nats" if d is not None else f"not run ({name}, gpt)",
            "—" if d is None else loss_verdict(d))
    # Hyena
    d = delta("hyena")
    if d is None:
        row("hyena_loss", "not run (hyena, gpt)", "—")
    else:
        row("hyena_loss", f"hyena - gpt: {d:+.3f} nats ({runs['hyena']['info']['params'] / 1e6:.0f}M "
            f"parameters, {tokens_str(runs['hyena'])} tokens)",
            f"yes (within ±{NOISE})" if abs(d) <= NOISE else f"better (< -{NOISE})" if d < 0 else f"no (> +{NOISE})")
    if speed:
        b1 = sorted((r for r in speed["rows"] if r["B"] == 1), key=lambda r: r["L"])
        def length(L):  # a crossover length as the table prints it
            return f"{L:,}" if L else "never"

        def within_paper(L):  # the paper's crossover is at 4K-8K tokens
            return "yes (<= 8192)" if L and L <= 8192 else "no (> 8192)"
        cross, cross_plain = faster_from(b1, "kernel"), faster_from(b1, "plain")
        text = (f"the order-2 mixing with our kernels faster than SDPA from {length(cross)} tokens (plain "
                f"PyTorch from {length(cross_plain)})")
        verdict = within_paper(cross)
        if all("hyena_op" in r["gpu_ms"] for r in b1):  # whole mixers: projections, short conv, filters
            op = faster_from(b1, "hyena_op", "attention_op")
            text += f"; whole operators (projections included) from {length(op)}"
            verdict = f"mixing {verdict}; whole operator {within_paper(op)}"
        row("hyena_cross", f"{text}; B=1, D=768, fwd+bwd GPU time, {speed['device']}", verdict)
        last = b1[-1]
        ratio = last["gpu_ms"]["attention"] / last["gpu_ms"]["kernel"]
        row("hyena_64k", f"{ratio:.2f}x at {last['L']:,} tokens", "yes (>= 50x)" if ratio >= 50 else "no (< 50x)")
    else:
        row("hyena_cross", "not run (speed: kernels.py --bench hyena needs a GPU)", "—")
    short = min(recall) if recall else None
    if short and {"gpt", "hyena"} <= set(recall[short]):
        acc = recall[short]
        row("recall", f"L={short}: gpt {100 * acc['gpt']:.1f}%, hyena {100 * acc['hyena']:.1f}% (chance 6.2%)",
            "yes (attention ahead)" if acc["gpt"] > acc["hyena"] else "no")
    else:
        row("recall", "not run (recall)", "—")
    # TPA, against the same model with attention (mhc+tpa against mhc)
    for name, base in (("tpa", "gpt"), ("tpa-kvonly", "gpt"), ("mhc+tpa", "mhc")):
        if name not in runs or base not in runs:
            if name == "tpa":
                row("tpa", "not run (tpa, gpt)", "—")
            continue
        d = runs[name]["val"] - runs[base]["val"]
        ratio = runs[base]["cache"] / runs[name]["cache"]
        size = ("yes (>= 3.9x)" if ratio >= 3.9 else f"smaller, {ratio:.1f}x, not 3.9x" if ratio > 1
                else "no (not smaller)")
        row("tpa", f"{name}: cache {runs[name]['cache']} vs {base}'s (MHA) {runs[base]['cache']} values per token "
            f"and layer; loss - {base} {d:+.3f}",
            f"{size}; loss {'equal or better' if d <= NOISE else 'worse'} (<= +{NOISE})")
    # Linearity
    lm, lc = lin_means(gpt), lin_means(runs.get("gpt-cosine"))
    if lm:
        row("ls", f"gpt: mean LS {lm[0]:.3f} over the pairs after the first (all pairs below)",
            "yes (>= 0.98)" if lm[0] >= 0.98 else "high, not 0.99 (0.9 to 0.98)" if lm[0] >= 0.9 else "no (< 0.9)")
        row("ls_wo", f"gpt: mean LS_wo {lm[1]:.3f}",
            "yes (>= 0.2 below LS)" if lm[0] - lm[1] >= 0.2 else "no (< 0.2 below LS)")
    else:
        row("ls", "not run (linearity of gpt)", "—")
    if lm and lc:
        d = delta("gpt-cosine")
        row("cos_ls", f"mean LS_wo {lm[1]:.3f} (gpt) -> {lc[1]:.3f} (gpt-cosine)",
            "yes (lower)" if lc[1] < lm[1] else "no (it rose)")
        row("cos_loss", f"gpt-cosine - gpt: {d:+.3f} nats", loss_verdict(d))
    else:
        row("cos_ls", "not run (linearity of gpt and gpt-cosine)", "—")
    prune = gpt and gpt.get("linearity") and gpt["linearity"].get("prune")
    if prune:
        ks = [r for r in prune if r["k"] > 0]
        row("prune", "gpt, perplexity removed / fit + distilled: " +
            ", ".join(f"k={r['k']} {r['removed']:.1f} / {r['distilled']:.1f}" for r in ks),
            "yes (at every k)" if all(r["distilled"] < r["removed"] for r in ks) else "no (not at every k)")
    return rows


def kernels_used(runs: dict) -> str:
    on = [s["info"]["kernels"] for s in runs.values()]
    return "on where an arch has them" if all(on) else "off" if not any(on) else "on for some runs"


def tokens_str(s: dict) -> str:
    n = s["final_step"] * s["info"]["tokens_per_step"]
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def load_recall(args) -> tuple[dict, dict | None]:
    """{length: {arch: final recall accuracy}} of the finished recall runs at --recall-lengths, and one
    run's run.json (for the caption: what they were trained with)."""
    table, info = {}, None
    for length in args.recall_lengths:
        for arch in RECALL_ARCHS:
            s = summarise(f"recall-{arch}-{length}", os.path.join(args.out, f"recall-{arch}-{length}"))
            if s and s["accuracy"] is not None:
                table.setdefault(length, {})[arch] = s["accuracy"]
                info = s["info"]
    return table, info


def faster_from(rows: list[dict], key: str, base: str = "attention") -> int | None:
    """The crossover: the shortest length L from which column `key` beats column `base` at every longer
    length of hyena_speed.json's rows (sorted by L), or None."""
    start = None
    for r in reversed(rows):
        if r["gpu_ms"][key] >= r["gpu_ms"][base]:
            break
        start = r["L"]
    return start


def report(run_names: list[str], args, target: str) -> str:
    """The results in markdown; target is the file it goes into (the plot is linked relative to it)."""
    runs = {n: s for n in run_names if (s := summarise(n, os.path.join(args.out, n)))}
    recall, recall_info = load_recall(args)
    speed = read_json(os.path.join(args.out, "hyena_speed.json"))
    lines = []
    missing = [n for n in run_names if n not in runs]
    if runs:
        first = next(iter(runs.values()))["info"]
        tc = first["train_config"]
        lines += [
            f"Every run: `python train.py --arch ARCH --max-iters {tc['max_iters']} --eval-interval "
            f"{tc['eval_interval']}` (seed {tc['seed']}, so the same data order), {first['tokens_per_step']:,} "
            f"tokens a step, {tokens_str(next(iter(runs.values())))} tokens per run; {first['device']}, "
            f"{first['dtype']}, torch.compile {'on' if first['compile'] else 'off'}, kernels "
            f"{kernels_used(runs)}, torch {first['torch']}, Triton {first['triton']}. Data: {first['train_tokens']:,} training "
            f"and {first['val_tokens']:,} validation tokens of TinyStories (GPT-2 BPE), so "
            f"{tc['max_iters'] * first['tokens_per_step'] / first['train_tokens']:.1f} epochs. One seed each.",
            ""]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)}.", ""]
    # the main table
    evals = sorted({r["step"] for s in runs.values() for r in s["evals"]})
    shown = evals if len(evals) <= 3 else [evals[len(evals) // 3 - 1], evals[2 * len(evals) // 3 - 1], evals[-1]]
    head = "| run | token mixer | residual stream | params (M) | " + " | ".join(f"val @{e}" for e in shown)
    head += " | best val | ms/step | tokens/s | peak mem, training (GiB) | cache values / token / layer |"
    lines += [head, "|---|---|---|---:|" + "---:|" * len(shown) + "---:|---:|---:|---:|---:|"]
    for n, s in runs.items():
        mixer, stream = train.ARCHS[s["info"]["arch"]]
        reg = s["info"]["train_config"].get("reg", "none")
        at = {r["step"]: r["val_loss"] for r in s["evals"]}
        lines.append(f"| {n} | {mixer} | {stream}{' + ' + reg + ' reg.' if reg != 'none' else ''} | "
                     f"{s['info']['params'] / 1e6:.2f} | " + " | ".join(fmt(at.get(e)) for e in shown) +
                     f" | {fmt(s['best'])} | {fmt(s['ms'], '.1f')} | {fmt(s['tok_s'], ',.0f')} | "
                     f"{fmt(s['mem'], '.1f')} | {s['cache']} |")
    if runs:
        p = [s["info"]["params"] / 1e6 for s in runs.values()]
        lines += ["", f"Parameters are matched to within {100 * (max(p) / min(p) - 1):.1f}% (TPA's heads by "
                  "`tpa.matched_heads`; HC/mHC and Hyena add their own small parameters). Cache: numbers kept "
                  "per generated token and layer by the mixer's `init_cache` (attention 2C, TPA (R_K + R_V)(h + d), "
                  "Hyena N C: the past gated inputs of its long convolutions)."]
    if args.plot and runs:
        rel = os.path.relpath(os.path.abspath(args.plot), os.path.dirname(os.path.abspath(target)))
        lines += ["", f"![validation loss vs tokens, every run]({rel})"]
    # claims
    lines += ["", "**The papers' claims and our runs** (verdicts are computed by `compare.claims` from the "
              "numbers, by the rule in brackets):", "", "| paper | claim | our run | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in claims(runs, recall, speed)]
    # linearity and pruning
    lin = {n: s["linearity"] for n, s in runs.items() if s.get("linearity")}
    if lin:
        pairs = len(next(iter(lin.values()))["profile"])
        names = ["e -> 1"] + [f"{i} -> {i + 1}" for i in range(1, pairs)]
        lines += ["", f"Linearity per layer pair, `python linearity.py RUN/ckpt.pt` "
                  f"({next(iter(lin.values()))['tokens']:,} validation tokens); LS with the residual / LS_wo "
                  "without:", "", "| run | " + " | ".join(names) + " |", "|---|" + "---:|" * pairs]
        for n, l in lin.items():
            lines.append(f"| {n} | " + " | ".join(f"{p['ls']:.3f} / {p['ls_wo']:.3f}" for p in l["profile"]) + " |")
        pr = {n: l["prune"] for n, l in lin.items() if l.get("prune")}
        if pr:
            lines += ["", "Pruning the k most linear blocks (`linearity.py RUN/ckpt.pt --prune K`; validation "
                      "perplexity):", "",
                      "| run | k | blocks | (a) removed | (b) linear fit | (c) fit + distilled |",
                      "|---|--:|---|---:|---:|---:|"]
            for n, rows in pr.items():
                lines += [f"| {n} | {r['k']} | {r['blocks']} | {r['removed']:.2f} | {r['linear']:.2f} | "
                          f"{r['distilled']:.2f} |" for r in rows]
    if recall:
        lengths = sorted(recall)
        mc, rc = recall_info["model_config"], recall_info["train_config"]
        lines += ["", f"Associative recall (`train.py --task recall`: {rc['recall_pairs']} pairs, vocabulary "
                  f"{rc['recall_vocab']}, {mc['n_layer']} layers, width {mc['n_embd']}, batch {rc['batch_size']}, "
                  f"lr {rc['lr']:g}, {rc['max_iters']} steps; accuracy on the queried values, chance "
                  f"1/{(rc['recall_vocab'] - 1) // 2}):", "",
                  "| arch | " + " | ".join(f"L = {L}" for L in lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for arch in RECALL_ARCHS:
            lines.append(f"| {arch} | " + " | ".join(fmt(100 * recall[L][arch], ".1f") + "%" if arch in recall[L]
                                                     else "—" for L in lengths) + " |")
    if speed:
        b1 = sorted((r for r in speed["rows"] if r["B"] == 1), key=lambda r: r["L"])
        lines += ["", f"Hyena order-2 mixing vs causal SDPA, B = 1, D = 768, forward + backward GPU ms "
                  f"(`python kernels.py --bench hyena`, {speed['device']}):", "",
                  "| L | " + " | ".join(f"{r['L']:,}" for r in b1) + " |", "|---|" + "---:|" * len(b1)]
        for key, label in (("attention", "attention"), ("plain", "Hyena, plain"), ("kernel", "Hyena, kernels")):
            lines.append(f"| {label} | " + " | ".join(f"{r['gpu_ms'][key]:.3f}" for r in b1) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(run_names: list[str], args) -> bool:
    plt = train.pyplot()
    if plt is None:
        log("(matplotlib is not installed: no plot of the loss and pruning curves)")
        return False
    runs = {n: s for n in run_names if (s := summarise(n, os.path.join(args.out, n)))}
    if not runs:
        return False
    pruned = {n: s["linearity"]["prune"] for n, s in runs.items() if s["linearity"] and s["linearity"]["prune"]}
    fig, axes = plt.subplots(1, 2 if pruned else 1, figsize=(12 if pruned else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    for n, s in runs.items():
        tps = s["info"]["tokens_per_step"] / 1e6
        ax.plot([r["step"] * tps for r in s["evals"]], [r["val_loss"] for r in s["evals"]], marker="o", ms=3,
                label=n)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"TinyStories, equal tokens ({next(iter(runs.values()))['info']['device']})")
    ax.legend(ncol=2, fontsize=8)
    if pruned:  # the pruning curves: perplexity vs blocks pruned, three ways
        ax = axes[0, 1]
        for i, (n, rows) in enumerate(pruned.items()):
            ks = [r["k"] for r in rows]
            for key, style in (("removed", ":"), ("linear", "--"), ("distilled", "-")):
                ax.plot(ks, [r[key] for r in rows], style, color=f"C{i}", marker="o", ms=3, label=f"{n}: {key}")
        ax.set_xlabel("blocks pruned (most linear first)")
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["k"] for rows in pruned.values() for r in rows}))
        ax.set_title("pruning: removed / linear fit / fit + distilled")
        ax.legend(fontsize=7)
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    fig.savefig(args.plot, dpi=120, bbox_inches="tight")
    log(f"plot: {args.plot}")
    return True


def check_markers(path: str) -> str:
    with open(path) as f:
        text = f.read()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"error: {path} needs one pair of marker lines, in this order:\n{BEGIN}\n{END}")
    return text


def replace_block(path: str, block: str) -> None:
    """Put block between the README's two markers; the rest of the file is left as it is."""
    text = check_markers(path)
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(head + BEGIN + "\n" + block + END + tail)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Arguments after `--` are passed to every train.py run.")
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                   help="TinyStories runs: arch names of train.py, or gpt-cosine (gpt + cosine regulariser)")
    p.add_argument("--stages", default="train,linearity,recall,speed,report",
                   help="which of train, linearity, recall, speed, report to do")
    p.add_argument("--max-iters", type=int, default=300,
                   help="steps per TinyStories run: 9.8M tokens, ~9 epochs of the 1M-token sample")
    p.add_argument("--eval-interval", type=int, default=50, help="steps between validation losses")
    p.add_argument("--linearity-tokens", type=int, default=200_000, help="linearity.py --tokens (validation)")
    p.add_argument("--distill-steps", type=int, default=200, help="linearity.py --prune's distillation steps")
    p.add_argument("--recall-lengths", default="128,512", help="sequence lengths of the recall runs")
    p.add_argument("--recall-steps", type=int, default=3000, help="steps per recall run")
    p.add_argument("--out", default="out/compare", help="where the runs and the report go")
    p.add_argument("--plot", default=None, help="where the plot of loss and pruning curves goes (None: OUT/loss_curves.png)")
    p.add_argument("--readme", default=None, metavar="README.md",
                   help="also replace the block between this file's compare.py markers with the report")
    args = p.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in args.runs if r not in train.ARCHS and r not in EXTRA_RUNS]
    if not args.runs:
        p.error("--runs is empty")
    if bad:
        p.error(f"unknown run(s) {', '.join(bad)}; choose from {', '.join([*train.ARCHS, *EXTRA_RUNS])}")
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    stages = {"train", "linearity", "recall", "speed", "report"}
    if not args.stages or set(args.stages) - stages:
        p.error(f"--stages takes a comma list of {', '.join(sorted(stages))}")
    try:
        args.recall_lengths = sorted({int(x) for x in args.recall_lengths.split(",")})
    except ValueError:
        p.error("--recall-lengths takes a comma list of integers, e.g. 128,512")
    if any(L < 32 for L in args.recall_lengths):
        p.error("--recall-lengths: 8 pairs and their 8 queries need at least 32 tokens")
    for name in ("max_iters", "eval_interval", "recall_steps", "distill_steps", "linearity_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.recall_steps < 4:
        p.error("--recall-steps must be at least 4 (it is evaluated 4 times)")
    if args.readme and not os.path.isfile(args.readme):
        p.error(f"--readme {args.readme}: no such file")
    if args.readme and "report" not in args.stages:
        p.error("--readme needs the report stage")
    if args.readme:
        check_markers(args.readme)  # before hours of training, not after
    args.out = os.path.abspath(args.out)  # the commands run in this file's folder
    args.plot = os.path.abspath(args.plot or os.path.join(args.out, "loss_curves.png"))
    return args, extra


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    t0 = time.time()
    failed = []
    if "train" in args.stages:
        failed += train_runs(args.runs, args, extra)
    if "linearity" in args.stages:
        failed += linearity_runs(args.runs, args)
    if "recall" in args.stages:
        failed += recall_runs(args, extra)
    if "speed" in args.stages:
        failed += speed_run(args)
    if "report" in args.stages:
        has_plot = plot_curves(args.runs, args)
        if not has_plot:
            args.plot = None
        path = os.path.join(args.out, "results.md")
        text = report(args.runs, args, path)
        os.makedirs(args.out, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        print("\n" + text)
        log(f"report: {path}")
        if args.readme:
            replace_block(args.readme, report(args.runs, args, args.readme))
            log(f"README block replaced: {args.readme}")
    log(f"compare.py: {time.time() - t0:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
