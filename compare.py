"""
compare.py -- every arch of this repository on TinyStories at equal tokens, over several seeds, and the
four papers' claims next to what our runs show.

    python compare.py                          # all of it, 3 seeds; results in out/compare/
    python compare.py --parallel 8             # 8 runs side by side (tiny models leave a GPU mostly idle)
    python compare.py --runs gpt,mhc+tpa       # some runs only
    python compare.py --stages report          # rebuild the report from the runs already there
    python compare.py --readme README.md --results RESULTS.md
                                               # ... the summary into the README, all of it into RESULTS.md
    python compare.py --stages sweep           # the Hyena filter sweep behind hyena.py's defaults
    python compare.py --stages recall1-sweep   # the single-query task's optimiser settings
    python compare.py -- --device cpu          # anything after `--` goes to every train.py run

What it runs, each a plain command you could type yourself (its log is out/compare/RUN/seedS/train.log):
    train       train.py --arch ARCH --max-iters 300 --eval-interval 50 --seed S for every arch and seed
                (same seed, same data order across archs, 32K tokens a step, so equal tokens), and gpt with
                the cosine regulariser over two ranges of layer pairs;
    linearity   linearity.py on every checkpoint (+ --prune 3 for gpt and the gpt + cosine runs);
    recall      train.py --task recall (MQAR, Zoology) and --task recall1 (the Hyena paper's single-query
                task) for gpt and hyena at several sequence lengths;
    speed       bench.py hyena (GPU only, alone on the GPU): Hyena vs attention, 256 to 64K tokens;
    report      results.md, results.json (every seed's numbers) and loss_curves.png from what the others wrote;
    sweep       (not in the default stages) Hyena's filter settings on TinyStories and both recall tasks;
    recall1-sweep  (not in the default stages) optimiser settings of the single-query task, gpt and hyena.
A run that already finished is skipped (delete its folder to redo it), so a stopped comparison continues,
one seed at a time. The report reads only small files (metrics.jsonl, run.json, linearity.json,
hyena_speed.json), never a checkpoint, and says which runs are missing.

Verdicts: a loss (or score) difference between two archs is paired by seed (the same seed gives the same
data order), and its 95% confidence interval (Student's t over the seeds) decides: below 0, above 0, or
"within noise" when it spans 0. A threshold claim must hold in every seed. With one seed there is no
spread, so no verdict. Runs side by side (--parallel > 1) share the GPU, so their ms/step is not shown:
step times come from a run that had the GPU alone, or from `bench.py gpt`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import train

HERE = os.path.dirname(os.path.abspath(__file__))

# Runs on TinyStories: every arch of train.ARCHS but mhc+hyena (one combination is enough to show the
# plug-in points compose), and the plain GPT with the linearity paper's cosine regulariser, summed over
# the block -> block pairs only and over every pair (embedding -> block 1 included): the paper leaves the
# range open and the two disagree on LS_wo.
DEFAULT_RUNS = ["gpt", "hc", "mhc", "tpa", "tpa-kvonly", "hyena", "mhc+tpa", "gpt-cosine", "gpt-cosine-all"]
EXTRA_RUNS = {"gpt-cosine": ["--arch", "gpt", "--reg", "cosine", "--reg-pairs", "blocks"],
              "gpt-cosine-all": ["--arch", "gpt", "--reg", "cosine", "--reg-pairs", "all"]}
PRUNED = ("gpt", "gpt-cosine", "gpt-cosine-all")  # linearity.py --prune 3 (the paper prunes plain models)
SEED0 = 1337  # train.py's default seed; seed i of --seeds N is SEED0 + i

# Associative recall. MQAR (Zoology, arXiv 2312.04927): 8 key-value pairs over 16 keys and 16 values, then
# the 8 keys queried again; a 2-layer, width-128 model of each mixer.
RECALL_ARCHS = ("gpt", "hyena")
RECALL_ARGS = ["--task", "recall", "--recall-vocab", "33", "--recall-pairs", "8", "--n-layer", "2",
               "--n-embd", "128", "--n-head", "2", "--batch-size", "64", "--lr", "1e-3", "--min-lr", "1e-4"]
# The Hyena paper's single-query task (Sec. 4.1): vocabulary 30, 2 layers, width 64, one head of 64.
RECALL1_ARGS = ["--task", "recall1", "--recall-vocab", "30", "--n-layer", "2", "--n-embd", "64", "--n-head", "1",
                "--batch-size", "64", "--lr", "1e-3", "--min-lr", "1e-4"]
RECALL_TASKS = {"recall": RECALL_ARGS, "recall1": RECALL1_ARGS}
# The single-query sweep (--stages recall1-sweep): a 2-layer model sits on a plateau (it predicts the values
# it has seen, ~21%) until the lookup circuit forms. When that happens depends on the optimiser, and Hyena
# left it quickly only where its channels could hold every key-value combination (RESULTS.md: 14 x 14 at
# vocabulary 30). So: each setting for gpt and hyena at the shortest single-query length, to find where
# attention gets there in every seed and whether Hyena does. Name -> flags after RECALL1_ARGS.
RECALL1_SWEEP = {
    "lr3e-3": ["--lr", "3e-3", "--min-lr", "3e-4"],
    "lr3e-3-wd0": ["--lr", "3e-3", "--min-lr", "3e-4", "--weight-decay", "0"],
    "warmup1000": ["--warmup-iters", "1000"],  # safari's recall runs warm up for 10% of training
    "width256": ["--n-embd", "256"],  # 196 combinations fit in the channels; the paper's width is 64
}

# The Hyena filter sweep (--stages sweep): each setting on TinyStories and on both recall tasks, at the
# comparison's budget. Name -> train.py flags; everything else at train.py's defaults.
HYENA_SWEEP = {
    "w14-e33-kaiming": ["--hyena-w", "14", "--hyena-emb-dim", "33", "--hyena-filter-init", "kaiming"],
    "w14-e33": ["--hyena-w", "14", "--hyena-emb-dim", "33", "--hyena-filter-init", "normal"],
    "w1-e33": ["--hyena-w", "1", "--hyena-emb-dim", "33", "--hyena-filter-init", "normal"],
    "w10-e5": ["--hyena-w", "10", "--hyena-emb-dim", "5", "--hyena-filter-init", "normal"],
    "w10-e5-bias": ["--hyena-w", "10", "--hyena-emb-dim", "5", "--hyena-filter-init", "normal", "--hyena-bias", "on"],
    "w10-e5-pos": ["--hyena-w", "10", "--hyena-emb-dim", "5", "--hyena-filter-init", "normal",
                   "--hyena-pos-trainable", "on"],
}

BEGIN = "<!-- compare.py results: begin (generated; edit compare.py, not this block) -->"
END = "<!-- compare.py results: end -->"
LOG_LOCK = threading.Lock()


def log(msg: str) -> None:
    with LOG_LOCK:
        print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------
# Running the commands, several at once


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


class Job:
    """One command with its log file; `label` prefixes the progress lines it echoes."""

    def __init__(self, label: str, cmd: list[str], log_path: str, show=("val loss", "error", "recall accuracy"),
                 before=None, then=None):
        self.label, self.cmd, self.log_path, self.show, self.before = label, cmd, log_path, show, before
        self.then = then  # called after a success: more jobs to run next (e.g. this run's linearity)
        self.proc, self.rc = None, None


SHARED_MARK = "shared_gpu"  # a file in a run's folder: it ran beside others, so its ms/step is not its own


def run_jobs(jobs: list[Job], parallel: int) -> list[str]:
    """Run jobs, at most `parallel` at once, each with its output in its log; echo progress lines.
    Ctrl-C: every running child gets SIGINT (train.py checkpoints and says so), then we stop."""
    failed, running, pending, total = [], [], list(jobs), len(jobs)

    def pump(job):
        with open(job.log_path, "a") as f:
            for line in job.proc.stdout:
                f.write(line)
                f.flush()
                if any(s in line for s in job.show):
                    log(f"    [{job.label}] {line.rstrip()}")

    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                run_dir = os.path.dirname(job.log_path)
                os.makedirs(run_dir, exist_ok=True)
                if job.before:
                    job.before()
                mark = os.path.join(run_dir, SHARED_MARK)
                if parallel > 1:
                    open(mark, "w").close()
                elif os.path.exists(mark):
                    os.remove(mark)
                with open(job.log_path, "w") as f:
                    f.write("$ " + " ".join(job.cmd) + "\n")
                log(f"[{total - len(pending)}/{total}] {job.label}: {' '.join(job.cmd[1:])}")
                job.t0 = time.time()
                # a new process group: Ctrl-C in this terminal reaches us, and we pass it on once
                job.proc = subprocess.Popen(job.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            cwd=HERE, start_new_session=True)
                job.thread = threading.Thread(target=pump, args=(job,), daemon=True)
                job.thread.start()
                running.append(job)
            time.sleep(0.2)
            for job in [j for j in running if j.proc.poll() is not None]:
                job.thread.join()
                running.remove(job)
                rc = job.proc.returncode
                log(f"    [{job.label}] {'done' if rc == 0 else f'FAILED (exit {rc}; see {job.log_path})'} "
                    f"in {time.time() - job.t0:.0f} s")
                if rc != 0:
                    failed.append(job.label)
                elif job.then:
                    new_jobs = job.then()
                    pending[:0] = new_jobs
                    total += len(new_jobs)
    except KeyboardInterrupt:
        log(f"\ninterrupted: stopping {len(running)} running command(s) (they checkpoint where they can)")
        for job in running:
            job.proc.send_signal(signal.SIGINT)
        for job in running:
            try:
                job.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                job.proc.kill()
        raise
    return failed


def continue_or_start(run_dir: str) -> list[str]:
    """A run that was stopped (Ctrl-C, a time limit) left a checkpoint: continue it; anything else in its
    folder (a run that failed before its first checkpoint) is replaced."""
    return ["--resume"] if os.path.isfile(os.path.join(run_dir, "ckpt.pt")) else ["--overwrite"]


# What compare.py sets for every run itself: not to be passed after `--`
OWN_FLAGS = ("--resume", "--overwrite", "--max-iters", "--eval-interval", "--seed", "--out-dir")


def seeds_of(args) -> list[int]:
    return [SEED0 + i for i in range(args.seeds)]


def train_jobs(runs: list[str], args, extra: list[str], linearity: bool = False) -> list[Job]:
    """Every run and seed not finished yet; with linearity, each run's scores follow it at once (its
    checkpoint is there, and a stopped comparison keeps what it finished)."""
    jobs = []
    for name in runs:
        for seed in seeds_of(args):
            run_dir = os.path.join(args.out, name, f"seed{seed}")
            if finished(run_dir, args.max_iters):
                log(f"[train] {name} seed {seed}: finished earlier ({run_dir})")
                continue
            stale = os.path.join(run_dir, "linearity.json")  # scores of an earlier checkpoint

            def before(stale=stale):
                if os.path.isfile(stale):
                    os.remove(stale)
            cmd = [sys.executable, "train.py", *EXTRA_RUNS.get(name, ["--arch", name]),
                   "--max-iters", str(args.max_iters), "--eval-interval", str(args.eval_interval),
                   "--seed", str(seed), "--out-dir", run_dir, *continue_or_start(run_dir), *extra]
            then = (lambda name=name, seed=seed: linearity_jobs([name], args, [seed])) if linearity else None
            jobs.append(Job(f"{name} seed {seed}", cmd, os.path.join(run_dir, "train.log"), before=before, then=then))
    return jobs


def linearity_jobs(runs: list[str], args, seeds=None) -> list[Job]:
    jobs = []
    for name in runs:
        for seed in seeds or seeds_of(args):
            run_dir = os.path.join(args.out, name, f"seed{seed}")
            out = os.path.join(run_dir, "linearity.json")
            if not finished(run_dir, args.max_iters) or not os.path.isfile(os.path.join(run_dir, "ckpt.pt")):
                log(f"[linearity] {name} seed {seed}: no finished run with a checkpoint; skipped")
                continue
            done = read_json(out)
            if done and (done.get("prune") or name not in PRUNED):  # a stopped pruning left scores only
                log(f"[linearity] {name} seed {seed}: done earlier ({out})")
                continue
            cmd = [sys.executable, "linearity.py", os.path.join(run_dir, "ckpt.pt"), "--json", out,
                   "--tokens", str(args.linearity_tokens)]
            if name in PRUNED:
                n_layer = read_json(os.path.join(run_dir, "run.json"))["model_config"]["n_layer"]
                cmd += ["--prune", str(min(3, n_layer)), "--distill-steps", str(args.distill_steps)]
            jobs.append(Job(f"linearity {name} seed {seed}", cmd, os.path.join(run_dir, "linearity.log"),
                            show=("error",)))
    return jobs


def recall_dir(out: str, task: str, arch: str, length: int, seed: int, setting: str = "") -> str:
    return os.path.join(out, f"{task}-{arch}{setting}-{length}", f"seed{seed}")


def recall_steps(args, task: str) -> int:
    return args.recall1_steps if task == "recall1" else args.recall_steps


def recall_lengths(args, shortest: bool = False, tasks=("recall", "recall1")) -> list[tuple[str, list[int]]]:
    """(task, lengths) of the recall tasks; shortest: only each task's shortest length (the sweeps)."""
    lengths = (("recall", args.recall_lengths), ("recall1", args.recall1_lengths))
    return [(task, ls[:1] if shortest else ls) for task, ls in lengths if task in tasks]


def recall_jobs(args, extra: list[str], out: str | None = None, archs=None, settings=None, seeds=None,
                shortest: bool = False, tasks=("recall", "recall1")) -> list[Job]:
    """The recall tasks for each arch, length and seed; settings: {name: extra train.py flags} (the sweeps)."""
    jobs = []
    for task, lengths in recall_lengths(args, shortest, tasks):
        steps = recall_steps(args, task)
        for length in lengths:
            for arch in archs or args.recall_archs:
                for setting, flags in (settings or {"": []}).items():
                    for seed in seeds or seeds_of(args):
                        run_dir = recall_dir(out or args.out, task, arch, length, seed,
                                             f"-{setting}" if setting else "")
                        label = f"{task} {arch}{' ' + setting if setting else ''} L={length} seed {seed}"
                        if finished(run_dir, steps):
                            log(f"[recall] {label}: finished earlier")
                            continue
                        # extra first: the task's own settings below win over anything passed after `--`
                        cmd = [sys.executable, "train.py", *extra, "--arch", arch, *RECALL_TASKS[task], *flags,
                               "--block-size", str(length), "--max-iters", str(steps),
                               "--eval-interval", str(steps // 4), "--log-interval", "100",
                               "--seed", str(seed), "--out-dir", run_dir, *continue_or_start(run_dir)]
                        jobs.append(Job(label, cmd, os.path.join(run_dir, "train.log")))
    return jobs


def sweep_seeds(args) -> list[int]:
    return seeds_of(args)[:max(2, min(args.seeds, 3))]  # 2 or 3, whatever --seeds says


def sweep_jobs(args, extra: list[str]) -> list[Job]:
    """The Hyena filter sweep: every HYENA_SWEEP setting on TinyStories and both recall tasks, 2+ seeds."""
    jobs, seeds = [], sweep_seeds(args)
    for setting, flags in HYENA_SWEEP.items():
        for seed in seeds:
            run_dir = os.path.join(args.out, "sweep", f"hyena-{setting}", f"seed{seed}")
            if finished(run_dir, args.max_iters):
                log(f"[sweep] {setting} seed {seed}: finished earlier")
                continue
            cmd = [sys.executable, "train.py", "--arch", "hyena", *flags, "--max-iters", str(args.max_iters),
                   "--eval-interval", str(args.eval_interval), "--seed", str(seed), "--out-dir", run_dir,
                   *continue_or_start(run_dir), *extra]
            jobs.append(Job(f"sweep {setting} seed {seed}", cmd, os.path.join(run_dir, "train.log")))
    return jobs + recall_jobs(args, extra, os.path.join(args.out, "sweep"), archs=("hyena",), settings=HYENA_SWEEP,
                              seeds=seeds, shortest=True)


def recall1_sweep_jobs(args, extra: list[str]) -> list[Job]:
    """The single-query sweep: every RECALL1_SWEEP setting for each recall arch at the shortest length."""
    return recall_jobs(args, extra, os.path.join(args.out, "sweep-recall1"), settings=RECALL1_SWEEP, shortest=True,
                       tasks=("recall1",))


def speed_run(args) -> list[str]:
    out = os.path.join(args.out, "hyena_speed.json")
    if os.path.isfile(out):
        log(f"[speed] done earlier ({out})")
        return []
    import torch
    if not torch.cuda.is_available():
        log("[speed] needs a CUDA GPU; skipped")
        return []
    cmd = [sys.executable, "bench.py", "hyena", "--json", out,
           "--plot", os.path.join(args.out, "hyena_speed.png")]
    return run_jobs([Job("speed", cmd, os.path.join(args.out, "hyena_speed.log"), show=("| 1 |", "error"))], 1)


# ----------------------------------------------------------------------------------------------------
# Reading the runs


def one_based(lin: dict | None) -> dict | None:
    """linearity.json numbers blocks from 1 (key first_block); files written before it counted from 0."""
    if lin and "first_block" not in lin:
        for r in lin.get("prune") or []:
            r["blocks"] = [b + 1 for b in r["blocks"]]
        lin["first_block"] = 1
    return lin


def summarise(name: str, run_dir: str) -> dict | None:
    """One run's numbers: final and best validation loss, the loss curve, steady-state speed, memory."""
    info, records = read_json(os.path.join(run_dir, "run.json")), read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    if info is None or not records:
        return None
    evals = [r for r in records if "val_loss" in r]
    logs = [r for r in records if "ms_per_step" in r]
    gains = [r for r in records if "gain_fwd" in r]
    steady = logs[1:] or logs  # the first log interval includes compilation
    alone = not os.path.exists(os.path.join(run_dir, SHARED_MARK))
    return {
        "name": name, "info": info, "evals": evals, "logs": logs, "gains": gains,
        "seed": info["train_config"]["seed"],
        "final_step": evals[-1]["step"] if evals else 0,
        "val": evals[-1]["val_loss"] if evals else math.nan,
        "best": min(r["val_loss"] for r in evals) if evals else math.nan,
        "accuracy": evals[-1].get("recall_accuracy") if evals else None,
        "ms": statistics.median(r["ms_per_step"] for r in steady) if steady and alone else math.nan,
        "tok_s": statistics.median(r["tokens_per_s"] for r in steady) if steady and alone else math.nan,
        # peak memory of training alone: logged before the first (uncompiled, more hungry) evaluation; not
        # the run's own when it split its steps into micro-batches
        "mem": max((r.get("peak_mem_gib", math.nan) for r in logs if not evals or r["step"] < evals[0]["step"]),
                   default=math.nan) if info["train_config"].get("grad_accum", 1) == 1 else math.nan,
        "cache": cache_values_per_token(info["model_config"]),
        "linearity": one_based(read_json(os.path.join(run_dir, "linearity.json"))),
    }


def load_seeds(folder: str, name: str, seeds: list[int], max_iters: int) -> dict[int, dict]:
    """{seed: summary} of the runs of one name that finished (max_iters steps; an unfinished seed is left out)."""
    out = {}
    for seed in seeds:
        s = summarise(name, os.path.join(folder, f"seed{seed}"))
        if s and s["evals"] and s["final_step"] == max_iters:
            out[seed] = s
    return out


def cache_values_per_token(model_config: dict) -> int:
    """Numbers a token mixer caches per generated token and layer, counted from its own init_cache
    (its tensors on the meta device; the mixer itself is real, for Hyena's filters): attention 2 C,
    TPA (R_K + R_V)(h + d), Hyena N C. It is what one sequence's cache grows by per token, so what
    every sequence shares (Hyena's filters) is not counted."""
    import torch
    cfg = train.GPTConfig(**model_config)
    mixer = train.MIXERS[train.ARCHS[cfg.arch][0]](cfg, 0)

    def numel(batch, max_len):
        return sum(t.numel() for t in mixer.init_cache(batch, max_len, "meta", torch.float32).values()
                   if isinstance(t, torch.Tensor))

    def per_sequence(max_len):
        return numel(2, max_len) - numel(1, max_len)
    return per_sequence(2) - per_sequence(1)


# ----------------------------------------------------------------------------------------------------
# Statistics over seeds


# Student's t, two-sided 95%, by degrees of freedom (n - 1 for n seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t95(df: int) -> float:
    return T95.get(df, 2.086 if df <= 20 else 2.042 if df <= 30 else 1.96)


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan


def pm(xs: list[float], spec=".3f") -> str:
    """mean ± std over seeds (just the value for one seed)."""
    m, s = mean_std(xs)
    return "—" if math.isnan(m) else format(m, spec) if math.isnan(s) else f"{format(m, spec)} ± {format(s, spec)}"


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """a - b paired by seed: mean difference, its 95% CI half-width (t over the seeds), n."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    m = statistics.mean(d)
    hw = t95(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return {"mean": m, "hw": hw, "n": len(d), "diffs": d}


def diff_text(p: dict, spec=".3f", unit=" nats") -> str:
    if p["n"] < 2:
        return f"{p['mean']:+{spec}}{unit} (1 seed)"
    return f"{p['mean']:+{spec}} ± {p['hw']:{spec}}{unit} (95% CI, {p['n']} seeds)"


def direction(p: dict | None) -> str | None:
    """'lower' / 'higher' when the 95% CI of the paired difference excludes 0, 'noise' when it spans 0,
    None with fewer than 2 seeds (no spread, no verdict)."""
    if p is None or p["n"] < 2:
        return None
    if p["mean"] + p["hw"] < 0:
        return "lower"
    if p["mean"] - p["hw"] > 0:
        return "higher"
    return "noise"


NO_SPREAD = "— (one seed: no spread; --seeds 3)"


def loss_verdict(p: dict | None) -> str:
    """For 'X lowers the loss': yes when the CI is below 0."""
    return {None: NO_SPREAD, "lower": "yes (CI below 0)", "higher": "no: worse (CI above 0)",
            "noise": "within noise (CI spans 0)"}[direction(p)]


def every(values: list[bool]) -> str:
    return f"{sum(values)}/{len(values)} seeds"


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


def per_seed(seeds: dict[int, dict], f) -> dict[int, float]:
    """{seed: f(summary)} where f gives a number (None: left out)."""
    out = {}
    for seed, s in seeds.items():
        v = f(s)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            out[seed] = v
    return out


# The papers' claims (the papers are cited in each technique file): key -> (paper, claim).
CLAIMS = {
    "hc_gain": ("HC / mHC", "HC's composite residual gain (Amax, forward) grows large: peaks ~3000 at 27B"),
    "mhc_gain": ("mHC", "mHC's composite gain stays near 1 (<= ~1.6 at 27B)"),
    "hc_loss": ("HC", "dynamic HC x4 lowers the loss (OLMo-1B: 2.781 vs 2.811)"),
    "mhc_loss": ("mHC", "mHC lowers the loss vs the baseline (27B: -0.021)"),
    "hyena_loss": ("Hyena", "matches attention's perplexity (at 125M and 5B+ tokens)"),
    "hyena_cross": ("Hyena", "faster than FlashAttention from 4K-8K tokens (order 2, fused FFT conv)"),
    "hyena_64k": ("Hyena", "~100x faster than FlashAttention at 64K"),
    "recall1": ("Hyena", "solves single-query associative recall (vocab 30: 100% at 30K-64K tokens), which "
                "attention also solves at short lengths"),
    "recall": ("Zoology", "on multi-query recall (MQAR) gated convolutions trail attention"),
    "tpa": ("TPA", "KV cache 3.9-5.6x smaller than MHA's (paper configs) at equal or better loss"),
    "ls": ("Linearity", "consecutive hidden states are ~0.99 linear with the residual"),
    "ls_wo": ("Linearity", "much lower without the residual (middle layers ~0.35-0.65)"),
    "cos_ls": ("Linearity", "the cosine regulariser lowers the linearity without the residual"),
    "cos_loss": ("Linearity", "... and improves quality"),
    "prune": ("Linearity", "replacing the most linear blocks by linear maps (+ distillation) costs less than "
              "removing them"),
}
COSINE_RUNS = {"gpt-cosine": "block pairs", "gpt-cosine-all": "all pairs"}


def claims(runs: dict, recall: dict, speed: dict | None) -> list[tuple[str, str, str, str]]:
    """(paper, claim, our run, verdict) rows. runs: {name: {seed: summary}}; recall: {task: {length: {arch:
    {seed: accuracy}}}}. Each verdict is computed from the numbers by the rule stated in brackets beside it,
    so a rerun that comes out differently says so."""
    rows = []
    gpt = runs.get("gpt", {})

    def row(key, ours, verdict):
        rows.append((*CLAIMS[key], ours, verdict))

    def delta(name, base="gpt"):  # final validation loss minus base's, paired by seed
        if not runs.get(name) or not runs.get(base):
            return None
        return paired(per_seed(runs[name], lambda s: s["val"]), per_seed(runs[base], lambda s: s["val"]))

    # HC / mHC
    if runs.get("hc") and all(s["gains"] for s in runs["hc"].values()):
        g = per_seed(runs["hc"], lambda s: max(r["gain_fwd"] for r in s["gains"]))
        n_layer = next(iter(runs["hc"].values()))["info"]["model_config"]["n_layer"]
        ok = [v > 1.5 for v in g.values()]
        row("hc_gain", f"hc, {n_layer} layers: max {pm(list(g.values()), '.2f')} over training",
            f"grows (> 1.5 in {every(ok)})" if all(ok) else f"no (> 1.5 in {every(ok)})")
    else:
        row("hc_gain", "not run (hc)", "—")
    for name in ("mhc", "mhc+tpa"):
        if runs.get(name) and all(s["gains"] for s in runs[name].values()):
            g = per_seed(runs[name], lambda s: max(max(r["gain_fwd"], r["gain_bwd"]) for r in s["gains"]))
            ok = [v <= 1.6 for v in g.values()]
            row("mhc_gain", f"{name}: max {pm(list(g.values()))} (forward or backward, over training)",
                f"yes (<= 1.6 in {every(ok)})" if all(ok) else f"no (<= 1.6 in {every(ok)})")
        elif name == "mhc":
            row("mhc_gain", "not run (mhc)", "—")
    for name in ("hc", "mhc"):
        p = delta(name)
        row(f"{name}_loss", f"{name} - gpt: {diff_text(p)}" if p else f"not run ({name}, gpt)",
            "—" if p is None else loss_verdict(p))
    # Hyena
    p = delta("hyena")
    if p is None:
        row("hyena_loss", "not run (hyena, gpt)", "—")
    else:
        h = next(iter(runs["hyena"].values()))
        row("hyena_loss", f"hyena - gpt: {diff_text(p)} ({h['info']['params'] / 1e6:.0f}M parameters, "
            f"{tokens_str(h)} tokens)",
            {None: NO_SPREAD, "noise": "yes (CI spans 0)", "lower": "better (CI below 0)",
             "higher": "no: worse (CI above 0)"}[direction(p)])
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
        row("hyena_cross", "not run (speed: `python bench.py hyena`, on a GPU alone)", "—")
    # recall: single-query (Hyena) and multi-query (Zoology)
    one = {L: acc for L, acc in recall.get("recall1", {}).items() if {"gpt", "hyena"} <= set(acc)}
    if one:
        def at90(accs):  # the accuracy, and in how many seeds it reached 90%
            return f"{pm([100 * v for v in accs.values()], '.1f')}% (>= 90% in {every([v >= 0.9 for v in accs.values()])})"
        text = "; ".join(f"L={L}: gpt {at90(acc['gpt'])}, hyena {at90(acc['hyena'])}" for L, acc in sorted(one.items()))
        solved = [L for L, acc in one.items() if all(v >= 0.9 for v in acc["gpt"].values())]
        ok = [v >= 0.9 for L in solved for v in one[L]["hyena"].values()]
        verdict = ("— (attention reached 90% in every seed at no length)" if not solved else
                   f"yes (hyena >= 90% wherever gpt is: {every(ok)})" if all(ok) else
                   f"no (hyena >= 90% wherever gpt is: {every(ok)})")
        row("recall1", text, verdict)
    else:
        row("recall1", "not run (recall1)", "—")
    multi = {L: acc for L, acc in recall.get("recall", {}).items() if {"gpt", "hyena"} <= set(acc)}
    if multi:
        texts, verdicts = [], []
        for L in sorted(multi):
            p = paired(multi[L]["gpt"], multi[L]["hyena"])
            points = {**p, "mean": 100 * p["mean"], "hw": 100 * p["hw"]}  # accuracy in percentage points
            texts.append(f"L={L}: gpt - hyena accuracy {diff_text(points, '.1f', ' points')}")
            verdicts.append(f"L={L}: " + {None: NO_SPREAD, "higher": "yes (attention ahead, CI above 0)",
                                          "noise": "no (within noise)",
                                          "lower": "no (hyena ahead, CI below 0)"}[direction(p)])
        row("recall", "; ".join(texts), "; ".join(verdicts))
    else:
        row("recall", "not run (recall)", "—")
    # TPA, against the same model with attention (mhc+tpa against mhc)
    for name, base in (("tpa", "gpt"), ("tpa-kvonly", "gpt"), ("mhc+tpa", "mhc")):
        p = delta(name, base)
        if p is None:
            if name == "tpa":
                row("tpa", "not run (tpa, gpt)", "—")
            continue
        c, cb = next(iter(runs[name].values()))["cache"], next(iter(runs[base].values()))["cache"]
        ratio = cb / c
        size = ("yes (>= 3.9x)" if ratio >= 3.9 else f"smaller, {ratio:.1f}x, not 3.9x" if ratio > 1
                else "no (not smaller)")
        loss = {None: "loss: no spread", "lower": "loss better (CI below 0)", "noise": "loss equal (CI spans 0)",
                "higher": "loss worse (CI above 0)"}[direction(p)]
        row("tpa", f"{name}: cache {c} vs {base}'s (MHA) {cb} values per token and layer; loss - {base} "
            f"{diff_text(p)}", f"{size}; {loss}")
    # Linearity
    lm = per_seed(gpt, lin_means)
    if lm:
        ls, wo = {k: v[0] for k, v in lm.items()}, {k: v[1] for k, v in lm.items()}
        hi, mid = [v >= 0.98 for v in ls.values()], [v >= 0.9 for v in ls.values()]
        row("ls", f"gpt: mean LS {pm(list(ls.values()))} over the pairs after the first (all pairs below)",
            f"yes (>= 0.98 in {every(hi)})" if all(hi) else f"high, not 0.99 (>= 0.9 in {every(mid)})" if all(mid)
            else f"no (>= 0.9 in {every(mid)})")
        gap = [ls[k] - wo[k] >= 0.2 for k in ls]
        row("ls_wo", f"gpt: mean LS_wo {pm(list(wo.values()))}",
            f"yes (>= 0.2 below LS in {every(gap)})" if all(gap) else f"no (>= 0.2 below LS in {every(gap)})")
        for name, pairs in COSINE_RUNS.items():
            lc = per_seed(runs.get(name, {}), lin_means)
            if not lc:
                continue
            p = paired({k: v[1] for k, v in lc.items()}, wo)
            row("cos_ls", f"{name} (regulariser over {pairs}) - gpt: mean LS_wo {diff_text(p, unit='')}",
                {None: NO_SPREAD, "lower": "yes (lower, CI below 0)", "noise": "within noise (CI spans 0)",
                 "higher": "no: it rose (CI above 0)"}[direction(p)])
            p = delta(name)
            row("cos_loss", f"{name} - gpt: {diff_text(p)}", loss_verdict(p))
    else:
        row("ls", "not run (linearity of gpt)", "—")
    prunes = per_seed(gpt, lambda s: (s.get("linearity") or {}).get("prune"))
    if prunes:
        ks = sorted({r["k"] for rows_ in prunes.values() for r in rows_ if r["k"] > 0})
        ok = [r["distilled"] < r["removed"] for rows_ in prunes.values() for r in rows_ if r["k"] > 0]

        def at(k, key):
            return pm([r[key] for rows_ in prunes.values() for r in rows_ if r["k"] == k], ".1f")
        row("prune", "gpt, perplexity removed / fit / fit + distilled: " +
            ", ".join(f"k={k} {at(k, 'removed')} / {at(k, 'linear')} / {at(k, 'distilled')}" for k in ks),
            f"yes (at every k, in {len(prunes)} seeds)" if all(ok) else
            f"no (distilled < removed in {sum(ok)}/{len(ok)} (k, seed) pairs)")
    return rows


def kernels_used(runs: dict) -> str:
    on = [s["info"]["kernels"] for seeds in runs.values() for s in seeds.values()]
    return "on where an arch has them" if all(on) else "off" if not any(on) else "on for some runs"


def machines_used(runs: dict) -> str:
    """The device and library versions the runs ran on; a resumed comparison can span two machines."""
    count = {}
    for seeds in runs.values():
        for s in seeds.values():
            i = s["info"]
            key = f"{i['device']}, torch {i['torch']}, Triton {i['triton']}"
            count[key] = count.get(key, 0) + 1
    if len(count) == 1:
        return next(iter(count))
    return "; ".join(f"{key} ({n} runs)" for key, n in sorted(count.items(), key=lambda kv: -kv[1]))


def micro_batches(runs: dict) -> str:
    """Runs side by side may split each step into micro-batches (-- --grad-accum N): the same batches and
    the same evaluation windows, less memory; the peak-memory column then leaves them out."""
    accum = sorted({s["info"]["train_config"].get("grad_accum", 1) for seeds in runs.values() for s in seeds.values()})
    if accum == [1]:
        return ""
    return (f" Steps split into {' or '.join(map(str, accum))} micro-batches (`-- --grad-accum N --eval-batches "
            "20N`: the same tokens per step and the same validation windows, less memory each), so their peak "
            "memory is not shown.")


def tokens_str(s: dict) -> str:
    n = s["final_step"] * s["info"]["tokens_per_step"]
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def finished_recall(arch: str, run_dir: str, steps: int) -> dict | None:
    """summarise() of a recall run that reached its last step with an accuracy, else None."""
    s = summarise(arch, run_dir)
    return s if s and s["accuracy"] is not None and s["final_step"] == steps else None


def load_recall(args, out: str | None = None, setting: str = "", archs=RECALL_ARCHS,
                seeds=None) -> tuple[dict, dict]:
    """{task: {length: {arch: {seed: final accuracy}}}} of the finished recall runs, and {task: one run's
    run.json} (for the captions: what they were trained with)."""
    table, info = {}, {}
    for task, lengths in recall_lengths(args):
        for length in lengths:
            for arch in archs:
                for seed in seeds or seeds_of(args):
                    s = finished_recall(arch, recall_dir(out or args.out, task, arch, length, seed, setting),
                                        recall_steps(args, task))
                    if s:
                        table.setdefault(task, {}).setdefault(length, {}).setdefault(arch, {})[seed] = s["accuracy"]
                        info[task] = s["info"]
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


def load_runs(run_names: list[str], args) -> dict:
    runs = {n: load_seeds(os.path.join(args.out, n), n, seeds_of(args), args.max_iters) for n in run_names}
    return {n: seeds for n, seeds in runs.items() if seeds}


def recall_caption(task: str, info: dict) -> str:
    mc, rc = info["model_config"], info["train_config"]
    what = (f"MQAR, `train.py --task recall`: {rc['recall_pairs']} pairs, then each key queried again"
            if task == "recall" else "single query, `train.py --task recall1`: pairs with repeated keys, a "
            "fresh map per example, loss on every position, accuracy on the final query")
    chance = train.recall_chance(rc["recall_vocab"])
    return (f"{what}; vocabulary {rc['recall_vocab']}, {mc['n_layer']} layers, width {mc['n_embd']}, batch "
            f"{rc['batch_size']}, lr {rc['lr']:g}, {rc['max_iters']} steps; chance {100 * chance:.1f}%")


def recall_table(recall: dict, archs) -> list[str]:
    lengths = sorted(recall)
    lines = ["| arch | " + " | ".join(f"L = {L}" for L in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for arch in archs:
        lines.append(f"| {arch} | " + " | ".join(pm([100 * v for v in recall[L][arch].values()], ".1f") + "%"
                                                 if arch in recall[L] else "—" for L in lengths) + " |")
    return lines


def report(run_names: list[str], args, target: str, summary: bool = False) -> tuple[str, dict]:
    """The results in markdown, and every seed's numbers as a dict (results.json); target is the file the
    markdown goes into (the plot is linked relative to it). summary: the runs' table and the claims only
    (the README's block; linearity, pruning, recall and speed tables go to RESULTS.md)."""
    runs = load_runs(run_names, args)
    recall, recall_info = load_recall(args)
    speed = read_json(os.path.join(args.out, "hyena_speed.json"))
    lines = []
    missing = [f"{n} seed {seed}" for n in run_names for seed in seeds_of(args) if seed not in runs.get(n, {})]
    if "recall" in args.stages or recall:  # the recall runs asked for that did not finish
        missing += [f"{task} {arch} L={L} seed {seed}" for task, lengths in recall_lengths(args) for L in lengths
                    for arch in args.recall_archs for seed in seeds_of(args)
                    if seed not in recall.get(task, {}).get(L, {}).get(arch, {})]
    if runs:
        first = next(iter(next(iter(runs.values())).values()))
        info, tc = first["info"], first["info"]["train_config"]
        n_seeds = sorted({len(seeds) for seeds in runs.values()})
        shared = all(math.isnan(s["ms"]) for seeds in runs.values() for s in seeds.values())
        lines += [
            f"Every run: `python train.py --arch ARCH --max-iters {tc['max_iters']} --eval-interval "
            f"{tc['eval_interval']} --seed S`, {'/'.join(map(str, n_seeds))} seeds from {SEED0} (one seed gives "
            f"every arch the same data order), {info['tokens_per_step']:,} tokens a step, {tokens_str(first)} "
            f"tokens per run; {info['dtype']}, torch.compile {'on' if info['compile'] else 'off'}, "
            f"kernels {kernels_used(runs)}; {machines_used(runs)}. Data: "
            f"{info['train_tokens']:,} training and {info['val_tokens']:,} validation tokens of TinyStories "
            f"(GPT-2 BPE), so {tc['max_iters'] * info['tokens_per_step'] / info['train_tokens']:.1f} epochs. "
            "Losses are mean ± standard deviation over the seeds." + micro_batches(runs)
            + (" The runs shared the GPU (`--parallel`), so no step times here: see `bench.py gpt`."
               if shared else ""), ""]
    if missing:
        lines += [f"Not run, or not finished: {', '.join(missing)}.", ""]
    # the main table
    evals = sorted({r["step"] for seeds in runs.values() for s in seeds.values() for r in s["evals"]})
    shown = evals if len(evals) <= 3 else [evals[len(evals) // 3 - 1], evals[2 * len(evals) // 3 - 1]]
    head = "| run | token mixer | residual stream | params (M) | " + "".join(f"val @{e} | " for e in shown)
    head += "final val | ms/step | tokens/s | peak mem, training (GiB) | cache values / token / layer |"
    lines += [head, "|---|---|---|---:|" + "---:|" * len(shown) + "---:|---:|---:|---:|---:|"]
    for n, seeds in runs.items():
        s0 = next(iter(seeds.values()))
        mixer, stream = train.ARCHS[s0["info"]["arch"]]
        tc = s0["info"]["train_config"]
        reg = tc.get("reg", "none")
        pairs = {"blocks": "block", "all": "all"}[tc.get("reg_pairs", "all")]
        reg = f" + {reg} reg. ({pairs} pairs)" if reg != "none" else ""
        at = lambda e: [r["val_loss"] for s in seeds.values() for r in s["evals"] if r["step"] == e]  # noqa: E731
        lines.append(f"| {n} | {mixer} | {stream}{reg} | {s0['info']['params'] / 1e6:.2f} | " +
                     "".join(f"{fmt(statistics.mean(at(e)) if at(e) else None)} | " for e in shown) +
                     f"{pm([s['val'] for s in seeds.values()])} | "
                     f"{fmt(mean_std([s['ms'] for s in seeds.values()])[0], '.1f')} | "
                     f"{fmt(mean_std([s['tok_s'] for s in seeds.values()])[0], ',.0f')} | "
                     f"{fmt(max((s['mem'] for s in seeds.values() if not math.isnan(s['mem'])), default=math.nan), '.1f')} | "
                     f"{s0['cache']} |")
    if runs:
        p = [next(iter(seeds.values()))["info"]["params"] / 1e6 for seeds in runs.values()]
        lines += ["", f"Parameters are matched to within {100 * (max(p) / min(p) - 1):.1f}% (TPA's heads by "
                  "`tpa.matched_heads`; HC/mHC and Hyena add their own small parameters). Cache: numbers kept "
                  "per generated token and layer by the mixer's `init_cache` (attention 2C, TPA (R_K + R_V)(h + d), "
                  "Hyena N C: the past gated inputs of its long convolutions)."]
    if args.plot and runs:
        rel = os.path.relpath(os.path.abspath(args.plot), os.path.dirname(os.path.abspath(target)))
        lines += ["", f"![validation loss vs tokens, every run]({rel})"]
    # claims
    rows = claims(runs, recall, speed)
    lines += ["", "**The papers' claims and our runs** (verdicts are computed by `compare.claims` from the "
              "numbers, by the rule in brackets; differences are paired by seed, with the 95% confidence "
              "interval of Student's t):", "", "| paper | claim | our run | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    if summary:
        return "\n".join(lines) + "\n", {}
    # linearity and pruning
    lin = {n: per_seed(seeds, lambda s: s.get("linearity")) for n, seeds in runs.items()}
    lin = {n: v for n, v in lin.items() if v}
    if lin:
        any_lin = next(iter(next(iter(lin.values())).values()))
        pairs = len(any_lin["profile"])
        names = ["e -> 1"] + [f"{i} -> {i + 1}" for i in range(1, pairs)]
        lines += ["", f"Linearity per layer pair, `python linearity.py RUN/ckpt.pt` ({any_lin['tokens']:,} "
                  "validation tokens); LS with the residual / LS_wo without, mean over seeds:", "",
                  "| run | " + " | ".join(names) + " |", "|---|" + "---:|" * pairs]
        for n, by_seed in lin.items():
            cells = []
            for i in range(pairs):
                ls = statistics.mean(l["profile"][i]["ls"] for l in by_seed.values())
                wo = statistics.mean(l["profile"][i]["ls_wo"] for l in by_seed.values())
                cells.append(f"{ls:.3f} / {wo:.3f}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        pr = {n: {seed: l["prune"] for seed, l in by_seed.items() if l.get("prune")} for n, by_seed in lin.items()}
        pr = {n: v for n, v in pr.items() if v}
        if pr:
            lines += ["", "Pruning the k most linear blocks (`linearity.py RUN/ckpt.pt --prune K`; validation "
                      "perplexity, mean ± std over seeds; distillation's objective, the student's layer-wise MSE "
                      "to the teacher, before -> after):", "",
                      "| run | k | blocks (per seed) | (a) removed | (b) linear fit | (c) fit + distilled | "
                      "distillation MSE |", "|---|--:|---|---:|---:|---:|---:|"]
            for n, by_seed in pr.items():
                for k in sorted({r["k"] for rows_ in by_seed.values() for r in rows_}):
                    at_k = [r for rows_ in by_seed.values() for r in rows_ if r["k"] == k]
                    blocks = " ".join(str(r["blocks"]).replace(" ", "") for r in at_k)
                    mse = [(r.get("distill_mse_before"), r.get("distill_mse_after")) for r in at_k]
                    mse = [m for m in mse if None not in m]
                    mse_txt = (f"{pm([m[0] for m in mse], '.2e')} -> {pm([m[1] for m in mse], '.2e')}"
                               if mse and k > 0 else "—")
                    ppl = [pm([r[key] for r in at_k], ".2f") for key in ("removed", "linear", "distilled")]
                    lines.append(f"| {n} | {k} | {blocks} | {' | '.join(ppl)} | {mse_txt} |")
    for task in ("recall1", "recall"):
        if recall.get(task):
            lines += ["", f"Associative recall ({recall_caption(task, recall_info[task])}); final accuracy, mean ± "
                      "std over seeds:", ""] + recall_table(recall[task], RECALL_ARCHS)
    if speed:
        b1 = sorted((r for r in speed["rows"] if r["B"] == 1), key=lambda r: r["L"])
        lines += ["", f"Hyena order-2 mixing vs causal SDPA, B = 1, D = 768, forward + backward GPU ms "
                  f"(`python bench.py hyena`, {speed['device']}):", "",
                  "| L | " + " | ".join(f"{r['L']:,}" for r in b1) + " |", "|---|" + "---:|" * len(b1)]
        for key, label in (("attention", "attention"), ("plain", "Hyena, plain"), ("kernel", "Hyena, kernels")):
            lines.append(f"| {label} | " + " | ".join(f"{r['gpu_ms'][key]:.3f}" for r in b1) + " |")
    data = {"seeds": seeds_of(args),
            "runs": {n: {seed: {"val": s["val"], "best": s["best"], "ms": s["ms"], "mem": s["mem"],
                                "linearity": s["linearity"], "evals": s["evals"]}
                         for seed, s in seeds.items()} for n, seeds in runs.items()},
            "recall": recall, "claims": [dict(zip(("paper", "claim", "ours", "verdict"), r)) for r in rows]}
    return "\n".join(lines) + "\n", data


def is_default(flags: list[str]) -> bool:
    """Whether a sweep setting's flags are train.py's defaults (then the comparison's own hyena runs are it)."""
    parser = train.build_parser()
    return vars(parser.parse_args(flags)) == vars(parser.parse_args([]))


def sweep_report(args) -> str:
    """The Hyena filter sweep as a markdown table: TinyStories loss and both recall tasks per setting. The
    setting that matches train.py's defaults takes the comparison's hyena runs where the sweep has none."""
    folder = os.path.join(args.out, "sweep")
    seeds = sweep_seeds(args)
    gpt = load_seeds(os.path.join(args.out, "gpt"), "gpt", seeds, args.max_iters)
    lines = [f"Hyena filter settings (`python compare.py --stages sweep`; TinyStories: {args.max_iters} steps as "
             f"the comparison; recall: {args.recall_steps} (MQAR) and {args.recall1_steps} (single query) steps at "
             f"the shortest length of each task; mean ± std over the seeds that finished, of "
             f"{', '.join(map(str, seeds))}; (n) where fewer than {len(seeds)}):", "",
             "| setting | flags | TinyStories val loss | - gpt (paired) | MQAR accuracy | single-query accuracy |",
             "|---|---|---:|---:|---:|---:|"]

    def cell(xs, spec=".3f", unit=""):
        return "—" if not xs else pm(xs, spec) + unit + (f" ({len(xs)})" if len(xs) < len(seeds) else "")
    for setting, flags in HYENA_SWEEP.items():
        default = is_default(flags)
        runs = load_seeds(os.path.join(folder, f"hyena-{setting}"), setting, seeds, args.max_iters)
        if not runs and default:
            runs = load_seeds(os.path.join(args.out, "hyena"), "hyena", seeds, args.max_iters)
        rec, _ = load_recall(args, folder, f"-{setting}", archs=("hyena",), seeds=seeds)
        main_rec = load_recall(args, archs=("hyena",), seeds=seeds)[0] if default else {}
        p = paired(per_seed(runs, lambda s: s["val"]), per_seed(gpt, lambda s: s["val"])) if runs and gpt else None

        def acc(task):
            t = rec.get(task) or main_rec.get(task, {})
            return cell([100 * v for v in t[min(t)]["hyena"].values()], ".1f", "%") if t else "—"
        lines.append(f"| {setting}{' (default)' if default else ''} | `{' '.join(flags)}` | "
                     f"{cell([s['val'] for s in runs.values()])} | {diff_text(p, unit='') if p else '—'} | "
                     f"{acc('recall')} | {acc('recall1')} |")
    return "\n".join(lines) + "\n"


def recall1_sweep_report(args) -> str:
    """The single-query sweep as a markdown table: per setting and arch, the final accuracy over the seeds,
    how many seeds reached 90%, and the evaluation at which each of those first did. The default row is
    the comparison's own recall1 runs."""
    (L,), steps, seeds = args.recall1_lengths[:1], args.recall1_steps, seeds_of(args)
    lines = [f"Single-query recall at L = {L} (`python compare.py --stages recall1-sweep`): {steps} steps, flags "
             f"after `{' '.join(RECALL1_ARGS)}`; accuracy on the query, mean ± std over the seeds that finished "
             f"(of {', '.join(map(str, seeds))}); >= 90%: in how many seeds, and the step of each one's first "
             f"evaluation there (every {steps // 4} steps).", "",
             "| setting | flags | " + " | ".join(f"{a} accuracy | {a} >= 90%" for a in args.recall_archs) + " |",
             "|---|---|" + "---:|---:|" * len(args.recall_archs)]
    for setting, flags in {"default": [], **RECALL1_SWEEP}.items():
        cells = []
        for arch in args.recall_archs:
            runs = [finished_recall(arch, recall_dir(args.out, "recall1", arch, L, seed) if setting == "default" else
                                    recall_dir(os.path.join(args.out, "sweep-recall1"), "recall1", arch, L, seed,
                                               f"-{setting}"), steps) for seed in seeds]
            runs = [r for r in runs if r]
            first = [min(e["step"] for e in r["evals"] if e.get("recall_accuracy", 0) >= 0.9) for r in runs
                     if any(e.get("recall_accuracy", 0) >= 0.9 for e in r["evals"])]
            cells += ["—", "—"] if not runs else [
                pm([100 * r["accuracy"] for r in runs], ".1f") + "%" + (f" ({len(runs)})" if len(runs) < len(seeds)
                                                                        else ""),
                f"{len(first)}/{len(runs)}" + (f" (step {', '.join(map(str, sorted(first)))})" if first else "")]
        lines.append(f"| {setting} | `{' '.join(flags) or '(none)'}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(run_names: list[str], args) -> bool:
    plt = train.pyplot()
    if plt is None:
        log("(matplotlib is not installed: no plot of the loss and pruning curves)")
        return False
    runs = load_runs(run_names, args)
    if not runs:
        return False
    pruned = {n: [s["linearity"]["prune"] for s in seeds.values() if s["linearity"] and s["linearity"].get("prune")]
              for n, seeds in runs.items()}
    pruned = {n: v for n, v in pruned.items() if v}
    fig, axes = plt.subplots(1, 2 if pruned else 1, figsize=(12 if pruned else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    for i, (n, seeds) in enumerate(runs.items()):  # mean over seeds, the band from the lowest to the highest
        s0 = next(iter(seeds.values()))
        tps = s0["info"]["tokens_per_step"] / 1e6
        steps = sorted({r["step"] for s in seeds.values() for r in s["evals"]})
        vals = [[r["val_loss"] for s in seeds.values() for r in s["evals"] if r["step"] == st] for st in steps]
        x = [st * tps for st in steps]
        ax.plot(x, [statistics.mean(v) for v in vals], marker="o", ms=3, color=f"C{i}", label=n)
        ax.fill_between(x, [min(v) for v in vals], [max(v) for v in vals], color=f"C{i}", alpha=0.2)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"TinyStories, equal tokens, {args.seeds} seeds ({s0['info']['device']})")
    ax.legend(ncol=2, fontsize=8)
    if pruned:  # the pruning curves: perplexity vs blocks pruned, three ways, mean over seeds
        ax = axes[0, 1]
        for i, (n, tables) in enumerate(pruned.items()):
            ks = sorted({r["k"] for rows in tables for r in rows})
            for key, style in (("removed", ":"), ("linear", "--"), ("distilled", "-")):
                ax.plot(ks, [statistics.mean(r[key] for rows in tables for r in rows if r["k"] == k) for k in ks],
                        style, color=f"C{i}", marker="o", ms=3, label=f"{n}: {key}")
        ax.set_xlabel("blocks pruned (most linear first)")
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["k"] for tables in pruned.values() for rows in tables for r in rows}))
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
    write_atomic(path, head + BEGIN + "\n" + block + END + tail)


def write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------
# The command line


def int_list(p, flag: str, text: str, least: int) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        p.error(f"{flag} takes a comma list of integers, e.g. 128,512")
    if any(v < least for v in values):
        p.error(f"{flag}: every length must be at least {least}")
    return values


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
                                epilog="Arguments after `--` are passed to every train.py run.")
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                   help="TinyStories runs: arch names of train.py, or gpt-cosine / gpt-cosine-all (gpt + the "
                        "cosine regulariser over block pairs / all pairs)")
    p.add_argument("--stages", default="train,linearity,recall,speed,report",
                   help="which of train, linearity, recall, speed, report, sweep, recall1-sweep to do")
    p.add_argument("--seeds", type=int, default=3, help=f"seeds per run: {SEED0}, {SEED0 + 1}, ...")
    p.add_argument("--parallel", type=int, default=1,
                   help="training runs side by side (their step times are then not reported); a d=384 run "
                        "takes up to ~19 GiB at its first evaluation, so keep N x 19 GiB under the GPU's memory")
    p.add_argument("--max-iters", type=int, default=300,
                   help="steps per TinyStories run: 9.8M tokens, ~9 epochs of the 1M-token sample")
    p.add_argument("--eval-interval", type=int, default=50, help="steps between validation losses")
    p.add_argument("--linearity-tokens", type=int, default=200_000, help="linearity.py --tokens (validation)")
    # Each distillation step is a forward and backward over ~200K tokens of the later blocks, and the objective
    # barely moves after a few dozen steps (RESULTS.md), so 30.
    p.add_argument("--distill-steps", type=int, default=30, help="linearity.py --prune's distillation steps")
    p.add_argument("--recall-lengths", default="128,512", help="sequence lengths of the MQAR runs")
    p.add_argument("--recall1-lengths", default="256,1024,2048", help="sequence lengths of the single-query runs")
    p.add_argument("--recall-steps", type=int, default=3000, help="steps per MQAR run")
    # safari's recall runs show ~1.6M examples (400 epochs of 4,000); 20,000 steps of 64 show 1.3M.
    p.add_argument("--recall1-steps", type=int, default=20000,
                   help="steps per single-query run (a model sits on a plateau until the lookup forms)")
    p.add_argument("--recall-archs", default=",".join(RECALL_ARCHS), help="archs of the recall runs")
    p.add_argument("--out", default="out/compare", help="where the runs and the report go")
    p.add_argument("--plot", default=None, help="where the plot of loss and pruning curves goes (None: OUT/loss_curves.png)")
    p.add_argument("--results", default=None, metavar="RESULTS.md",
                   help="also replace the block between this file's compare.py markers with the whole report")
    p.add_argument("--readme", default=None, metavar="README.md",
                   help="also replace the block between this file's compare.py markers with the summary (the "
                        "runs' table and the claims)")
    args = p.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in args.runs if r not in train.ARCHS and r not in EXTRA_RUNS]
    if not args.runs:
        p.error("--runs is empty")
    if bad:
        p.error(f"unknown run(s) {', '.join(bad)}; choose from {', '.join([*train.ARCHS, *EXTRA_RUNS])}")
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    stages = {"train", "linearity", "recall", "speed", "report", "sweep", "recall1-sweep"}
    if not args.stages or set(args.stages) - stages:
        p.error(f"--stages takes a comma list of {', '.join(sorted(stages))}")
    args.recall_lengths = int_list(p, "--recall-lengths", args.recall_lengths, 32)  # 8 pairs + 8 queries
    args.recall1_lengths = int_list(p, "--recall1-lengths", args.recall1_lengths, 8)
    if "recall1-sweep" in args.stages and not args.recall1_lengths:
        p.error("--stages recall1-sweep runs at the shortest of --recall1-lengths: give at least one length")
    args.recall_archs = [a.strip() for a in args.recall_archs.split(",") if a.strip()]
    if set(args.recall_archs) - set(train.ARCHS):
        p.error(f"--recall-archs: choose from {', '.join(train.ARCHS)}")
    for name in ("seeds", "parallel", "max_iters", "eval_interval", "recall_steps", "recall1_steps", "distill_steps",
                 "linearity_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.recall_steps, args.recall1_steps) < 4:
        p.error("--recall-steps and --recall1-steps must be at least 4 (a run is evaluated 4 times)")
    for flag in ("readme", "results"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            p.error(f"--{flag} {path}: no such file")
        if path and "report" not in args.stages:
            p.error(f"--{flag} needs the report stage")
        if path:
            check_markers(path)  # before hours of training, not after
    own = [a.split("=")[0] for a in extra if a.split("=")[0] in OWN_FLAGS]
    if own:
        p.error(f"{', '.join(own)} after `--`: compare.py sets those for each run itself")
    args.out = os.path.abspath(args.out)  # the commands run in this file's folder
    args.plot = os.path.abspath(args.plot or os.path.join(args.out, "loss_curves.png"))
    return args, extra


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    # Ctrl-C raises KeyboardInterrupt even where the shell started us with SIGINT ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.time()
    failed = []
    try:
        jobs = []  # training and recall are independent: one pool, so side-by-side runs fill the GPU
        if "train" in args.stages:
            jobs += train_jobs(args.runs, args, extra, linearity="linearity" in args.stages)
        if "sweep" in args.stages:
            jobs += sweep_jobs(args, extra)
        if "recall" in args.stages:
            jobs += recall_jobs(args, extra)
        if "recall1-sweep" in args.stages:
            jobs += recall1_sweep_jobs(args, extra)
        failed += run_jobs(jobs, args.parallel)
        if "linearity" in args.stages:
            failed += run_jobs(linearity_jobs(args.runs, args), args.parallel)
        if "speed" in args.stages:  # alone on the GPU: it times kernels
            failed += speed_run(args)
    except KeyboardInterrupt:
        log("compare.py: interrupted; rerun the same command to continue (finished runs are skipped)")
        return 130
    if "sweep" in args.stages:
        text = sweep_report(args)
        write_atomic(os.path.join(args.out, "sweep.md"), text)
        print("\n" + text)
        log(f"sweep table: {os.path.join(args.out, 'sweep.md')}")
    if "recall1-sweep" in args.stages:
        text = recall1_sweep_report(args)
        write_atomic(os.path.join(args.out, "sweep-recall1.md"), text)
        print("\n" + text)
        log(f"single-query sweep table: {os.path.join(args.out, 'sweep-recall1.md')}")
    if "report" in args.stages:
        has_plot = plot_curves(args.runs, args)
        if not has_plot:
            args.plot = None
        path = os.path.join(args.out, "results.md")
        text, data = report(args.runs, args, path)
        write_atomic(path, text)
        write_atomic(os.path.join(args.out, "results.json"), json.dumps(data, indent=1, default=str))
        print("\n" + text)
        log(f"report: {path} (every seed's numbers: results.json)")
        if args.readme:
            replace_block(args.readme, report(args.runs, args, args.readme, summary=True)[0])
            log(f"summary block replaced: {args.readme}")
        if args.results:
            replace_block(args.results, report(args.runs, args, args.results)[0])
            log(f"whole report replaced: {args.results}")
    log(f"compare.py: {time.time() - t0:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
