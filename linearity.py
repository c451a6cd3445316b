"""
linearity.py -- "Your Transformer is Secretly Linear": how linear is each block of a trained model?

    python linearity.py                          # CPU self-demo (seconds)
    python linearity.py out/gpt/ckpt.pt          # per-layer profile of a trained model, held-out text
    python linearity.py out/gpt/ckpt.pt --prune 3   # + pruning: remove / replace / replace and distil
    python train.py --arch gpt --reg cosine      # train with the paper's cosine regulariser (lambda 0.5)

Paper: Razzhigaev, Mikhalchuk, Goncharova, Gerasimenko, Oseledets, Dimitrov, Kuznetsov,
"Your Transformer is Secretly Linear", ACL 2024, arXiv 2405.12250 (score: Sec. 3.1; regularisers: Sec. 4;
pruning: Sec. 5).

The idea. Collect the hidden states of two consecutive layers over many tokens, X and Y (N x d, the
same tokens in the same order). If some single d x d matrix maps X onto Y almost exactly, the block
between them acts linearly on the data it sees. The paper centres both, scales them to unit Frobenius
norm, and measures the least-squares residual:

    LS(X, Y) = 1 - min_A || X~ A - Y~ ||_F^2        X~ = (X - mean) / ||X - mean||_F, same for Y~

A residual block computes Y = X + f(X), and X alone already explains most of Y, so the paper also
scores the block's own contribution, "without the residual" (the official code): LS(X, Y - X).
Reported: ~0.99 with the residual, much lower without (U-shaped over depth).

The closed form (no need to keep all tokens). With centred Xc, Yc, C_xx = Xc^T Xc, C_xy = Xc^T Yc and
t_yy = ||Yc||_F^2, the least-squares residual is SSE = t_yy - tr(C_xy^T C_xx^+ C_xy), so

    LS    = 1 - SSE / t_yy                       (the normalisation of X cancels inside A)
    LS_wo = 1 - SSE / ||Yc - Xc||^2,  ||Yc - Xc||^2 = t_yy - 2 tr(C_xy) + tr(C_xx)

(mapping X onto Y - X leaves the same residual: A' = A - I). Both are pooled R^2 values. The
accumulators (n, means, C_xx, C_xy, t_yy) are merged batch by batch with Chan's parallel update in
float64, so any number of tokens streams through in fixed memory.

Pruning (--prune K): remove the k most linear blocks, or replace each by its least-squares map
h -> h W + b, or replace and distil: train only the maps to lower the layer-wise objective, the mean over
the hidden states from the first replaced block on of the MSE to the full model's (distill_objective),
printed before -> after on the training text it trains on.

Notation: N tokens, d hidden size, L blocks; hidden states h_0 (embedding) .. h_L. Blocks are numbered
1..L wherever they are printed (tables, JSON): block l maps h_{l-1} to h_l and is scored on the pair
(h_{l-1}, h_l); in code it is model.blocks[l - 1].
"""
import argparse
import copy
import math
import os
import signal
import sys
import time

import torch

import kernels

# ----------------------------------------------------------------------------------------------------
# The score: exact (all tokens in memory) and streaming (fixed memory)


def linearity_score_exact(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(LS, LS_wo) by the definition: centre, Frobenius-normalise, least squares over all d x d maps.
    x, y: (N, d). float64 on the CPU; for checking the streaming version on small N."""
    x, y = x.double().cpu(), y.double().cpu()
    xc, yc = x - x.mean(0), y - y.mean(0)
    scores = []
    for target in (yc, yc - xc):
        xn, tn = xc / xc.norm(), target / target.norm()
        a = torch.linalg.lstsq(xn, tn, driver="gelsd").solution  # (d, d): min_A ||xn A - tn||_F
        scores.append(1 - ((xn @ a - tn) ** 2).sum().item())
    return scores[0], scores[1]


class PairStats:
    """Streaming sufficient statistics of one layer pair (X, Y), in float64.

    n, mean_x (d,), mean_y (d,), cxx = sum (x - mean_x)^T (x - mean_x) (d, d), cxy likewise (d, d),
    tyy = sum ||y - mean_y||^2. A batch is centred on its own means, then merged (Chan et al. 1979):
        delta = mean_b - mean_a,  n = n_a + n_b
        c_xy  = c_xy_a + c_xy_b + delta_x^T delta_y * n_a n_b / n,   mean = mean_a + delta * n_b / n
    which stays exact where one uncentred Gram sum loses everything to a large common offset."""

    def __init__(self, d: int, device="cpu", use_kernel: bool = False):
        z = dict(dtype=torch.float64, device=device)
        self.use_kernel = use_kernel  # per-batch statistics from kernels.centred_cross_gram (fp32, GPU)
        self.n = 0
        self.mean_x, self.mean_y = torch.zeros(d, **z), torch.zeros(d, **z)
        self.cxx, self.cxy = torch.zeros(d, d, **z), torch.zeros(d, d, **z)
        self.tyy = torch.zeros((), **z)

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor):
        """Add a batch of token rows x, y (N_b, d), any float dtype, on any device."""
        x, y = x.reshape(-1, x.size(-1)), y.reshape(-1, y.size(-1))
        nb = x.size(0)
        if self.use_kernel:  # fused, fp32: statistics of (X, Y - X), turned into those of (X, Y) in float64
            mx, my, cxx, cxd, tdd = (t.double() for t in kernels.centred_cross_gram(x, y))
            # Yc = Xc + Dc:  C_xy = C_xd + C_xx,  ||Yc||^2 = ||Dc||^2 + 2 tr(C_xd) + tr(C_xx)
            cxy, tyy = cxd + cxx, tdd + 2 * torch.trace(cxd) + torch.trace(cxx)
        else:
            x, y = x.double(), y.double()
            mx, my = x.mean(0), y.mean(0)
            xc, yc = x - mx, y - my
            cxx, cxy, tyy = xc.T @ xc, xc.T @ yc, (yc * yc).sum()
        if self.n == 0:
            self.n, self.mean_x, self.mean_y, self.cxx, self.cxy, self.tyy = nb, mx, my, cxx, cxy, tyy
            return
        n = self.n + nb
        dx, dy = mx - self.mean_x, my - self.mean_y
        w = self.n * nb / n
        self.cxx += cxx + w * torch.outer(dx, dx)
        self.cxy += cxy + w * torch.outer(dx, dy)
        self.tyy += tyy + w * (dy * dy).sum()
        self.mean_x += dx * nb / n
        self.mean_y += dy * nb / n
        self.n = n

    def scores(self, rcond: float = 1e-10) -> tuple[float, float]:
        """(LS, LS_wo) from the closed form. C_xx^+ through eigh, dropping eigenvalues below
        rcond * the largest (directions the data never visits)."""
        d = self.cxx.size(0)
        if self.n <= d:
            raise ValueError(f"{self.n} tokens for hidden size {d}: with N <= d any X maps onto any Y exactly "
                             "and the score is meaningless; use many more tokens than d")
        evals, evecs = torch.linalg.eigh(self.cxx)
        keep = evals > rcond * evals.max()
        proj = evecs[:, keep].T @ self.cxy  # (k, d): C_xy in the eigenbasis of C_xx
        explained = ((proj * proj) / evals[keep, None]).sum()  # tr(C_xy^T C_xx^+ C_xy)
        sse = (self.tyy - explained).clamp_min(0)
        t_delta = self.tyy - 2 * torch.trace(self.cxy) + torch.trace(self.cxx)  # ||Yc - Xc||^2
        if t_delta <= 1e-12 * self.tyy:  # the block adds nothing (Y = X): its contribution is linear
            return 1 - (sse / self.tyy).item(), 1.0
        return 1 - (sse / self.tyy).item(), 1 - (sse / t_delta).item()

    def linear_map(self, rcond: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
        """The unnormalised least-squares fit y ~ x W + b: W = C_xx^+ C_xy (d, d), b = mean_y - mean_x W.
        (The score's A maps normalised X to normalised Y; only W, b can replace the block itself.)"""
        w = torch.linalg.pinv(self.cxx, rtol=rcond, hermitian=True) @ self.cxy
        return w, self.mean_y - self.mean_x @ w


def linearity_score(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(LS, LS_wo) of hidden states x, y (N, d) (or (..., d), flattened to token rows)."""
    stats = PairStats(x.size(-1), x.device)
    stats.update(x, y)
    return stats.scores()


# ----------------------------------------------------------------------------------------------------
# Regularisers (paper Sec. 4), added to the LM loss by train.py --reg cosine|mse --reg-weight --reg-pairs


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))  # bf16 -> fp32; fp64 stays (gradcheck)


REG_PAIRS = ("blocks", "all")


def regularised_states(hidden: list[torch.Tensor], pairs: str = "blocks") -> list[torch.Tensor]:
    """The hidden states whose consecutive pairs a regulariser sums over: "blocks" = h_1 .. h_L (the pairs
    block i -> block i+1), "all" = h_0 .. h_L (adds the pair embedding -> block 1)."""
    if pairs not in REG_PAIRS:
        raise ValueError(f"pairs must be one of {REG_PAIRS} (got {pairs!r})")
    return hidden[1:] if pairs == "blocks" else hidden


def cosine_regulariser(hidden: list[torch.Tensor], pairs: str = "blocks") -> torch.Tensor:
    """sum over consecutive pairs (h_{i-1}, h_i) of the mean over tokens of 1 - cos(h_{i-1}, h_i).
    The paper writes a sum over i and does not say how tokens are combined; we average tokens so that the
    weight does not depend on the batch size. Nor does it say where the sum starts. Default "blocks"
    (i = 2..L): the embedding pair compares a context-free token lookup with a transformed state, its
    1 - cos is far the largest term, so with it the penalty acts mostly on block 1 and little on the
    block-to-block steps the linearity scores; "all" (i = 1..L, h_0 the embedding) keeps it."""
    hidden = regularised_states(hidden, pairs)
    return sum((1 - torch.nn.functional.cosine_similarity(_upcast(a), _upcast(b), dim=-1, eps=1e-8)).mean()
               for a, b in zip(hidden[:-1], hidden[1:]))


def mse_regulariser(hidden: list[torch.Tensor], pairs: str = "blocks") -> torch.Tensor:
    """sum over consecutive pairs of the mean over tokens of ||h_i - h_{i-1}||^2 (pairs: as the cosine's)."""
    hidden = regularised_states(hidden, pairs)
    return sum(((_upcast(b) - _upcast(a)) ** 2).sum(-1).mean() for a, b in zip(hidden[:-1], hidden[1:]))


REGULARISERS = {"cosine": cosine_regulariser, "mse": mse_regulariser}


# ----------------------------------------------------------------------------------------------------
# Per-layer profile of a model


def report_progress(progress, done: int, total: int, what: str):
    """Call progress(message) about ten times over `total` units of work, and at the last one; nothing
    when progress is None (the functions here are quiet unless the command line asks)."""
    if progress is not None and (done == total or done % max(1, total // 10) == 0):
        progress(f"{what} {done}/{total}")


@torch.no_grad()
def layer_profile(model, batches, device, use_kernel: bool = False, progress=None) -> list[tuple[float, float]]:
    """(LS, LS_wo) for every consecutive pair of hidden states (embedding, block 1, ..., block L), pooled
    over the token batches (a list, each (B, T) token ids). Any model whose forward takes return_hidden.
    progress: None, or a function given a line now and then (report_progress)."""
    stats = None
    model.eval()
    for i, idx in enumerate(batches, 1):
        _, _, hidden = model(idx.to(device), return_hidden=True)
        if stats is None:
            stats = [PairStats(hidden[0].size(-1), device, use_kernel) for _ in range(len(hidden) - 1)]
        for s, x, y in zip(stats, hidden[:-1], hidden[1:]):
            s.update(x, y)
        if progress is not None:
            report_progress(progress, i, len(batches), "scoring: batch")
    return [s.scores() for s in stats]


# ----------------------------------------------------------------------------------------------------
# Pruning by linear replacement (paper Sec. 5)
#
# Choices the paper leaves open (ours): layers are ranked once, by LS_wo (the block's own contribution;
# with the residual every block scores ~0.99 and the ranking says little), most linear first, without
# re-scoring after each removal; the replacement starts from the least-squares fit W, b on training
# text (not the score's A: that maps normalised X to normalised Y and is no drop-in replacement); the
# distillation ("layer-wise", as the paper names it) trains only the replacements, to match the full
# model's hidden state at every layer from the first replaced block on (distill_objective), on the
# same training text as the fit.


class SkipBlock(torch.nn.Module):
    """A removed block: h -> h."""

    def forward(self, h, start_pos=0, cache=None):
        return h


class LinearBlock(torch.nn.Module):
    """A block replaced by a linear map: h -> h W + b."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(w.float().clone())
        self.bias = torch.nn.Parameter(b.float().clone())

    def forward(self, h, start_pos=0, cache=None):
        return h @ self.weight + self.bias


@torch.no_grad()
def perplexity(model, batches, device) -> float:
    model.eval()
    losses = [model(x.to(device), y.to(device))[1].item() for x, y in batches]
    return math.exp(sum(losses) / len(losses))


def distill_objective(hidden: list[torch.Tensor], target: list[torch.Tensor], first: int) -> torch.Tensor:
    """The layer-wise distillation loss: the mean over the hidden states after the first replaced block
    (h_{first+1} .. h_L) of the mean squared error (over tokens and features) between the pruned model's
    state and the full model's. Every later layer counts, not only the replaced blocks' outputs: the
    least-squares fit already minimises a lone replaced block's own error on the full model's inputs."""
    later = list(zip(hidden[first + 1:], target[first + 1:]))
    return sum(torch.nn.functional.mse_loss(h.float(), t.float()) for h, t in later) / len(later)


@torch.no_grad()
def distill_loss(student, teacher, first: int, batches, device) -> float:
    """distill_objective averaged over the token batches ((x, y) pairs)."""
    total = 0.0
    for x, _ in batches:
        target = teacher(x.to(device), return_hidden=True)[2]
        total += distill_objective(student(x.to(device), return_hidden=True)[2], target, first).item()
    return total / len(batches)


def distill(student, teacher, replaced: list[int], batches, steps: int, device,
            damping: float = 1e-4, progress=None) -> tuple[float, float]:
    """Train only the replacements (the student's LinearBlocks `replaced`) to lower distill_objective over
    all of `batches` (full batch: one step sums the gradient over every batch). Returns the objective
    before and after, on the same batches it trains on (and the least-squares fit was made on): after <
    before is what the training achieved, not generalisation (the validation perplexity says that). A
    step is kept only if it lowers the objective, so after <= before always; after == before when no step
    does (e.g. when the only replaced block is the last: the fit is then the exact minimum already).
    progress: as layer_profile's."""
    first, d = min(replaced), student.blocks[replaced[0]].weight.size(0)
    maps = [student.blocks[l] for l in replaced]
    params = [p for m in maps for p in (m.weight, m.bias)]
    for p in student.parameters():
        p.requires_grad_(any(p is q for q in params))
    student.eval()  # no dropout in these models; eval only says nothing else changes
    with torch.no_grad():  # the teacher's h_first .. h_L; the blocks before `first` are the same in both
        states = [teacher(x.to(device), return_hidden=True)[2][first:] for x, _ in batches]

    def student_states(s):  # the student's h_first .. h_L: distill_loss without the shared part and logits
        hidden = [s[0]]
        for block in student.blocks[first:]:
            hidden.append(block(hidden[-1]))
        return hidden

    @torch.no_grad()
    def objective():
        return sum(distill_objective(student_states(s), s, 0).item() for s in states) / len(states)

    # Why this method: the hidden states are large and badly scaled, so a plain (or Adam) step small
    # enough not to raise the objective barely moves it. Each map's gradient G (for [W; b], (d+1) x d) is
    # preconditioned by its input's damped second moment C = mean [h;1][h;1]^T over the tokens the map sees
    # in the student (computed once, at the start: any fixed positive-definite preconditioner keeps the
    # step a descent direction), scaled so that step 1 is the exact least-squares (Gauss-Newton) step for a
    # map whose own output is the only term; a backtracking line search (Armijo) keeps only steps that
    # lower the full objective, halving the step until one does and doubling it after each success.
    C = [torch.zeros(d + 1, d + 1, dtype=torch.float64, device=device) for _ in maps]
    with torch.no_grad():
        for s in states:
            hidden = student_states(s)
            for c, l in zip(C, replaced):
                h = hidden[l - first].reshape(-1, d).double()
                h = torch.cat([h, torch.ones_like(h[:, :1])], 1)
                c += h.T @ h / (len(states) * len(h))
    eye = torch.eye(d + 1, dtype=torch.float64, device=device)
    chol = [torch.linalg.cholesky(c + damping * c.diagonal().mean() * eye) for c in C]
    scale = d * (len(student.blocks) - first) / 2  # 1 / (Gauss-Newton curvature of one term's MSE)
    best = before = objective()
    t = 1.0
    for step in range(1, steps + 1):
        for p in params:
            p.grad = None
        for s in states:
            (distill_objective(student_states(s), s, 0) / len(states)).backward()
        with torch.no_grad():
            start = [torch.cat([m.weight, m.bias[None]]) for m in maps]
            grads = [torch.cat([m.weight.grad, m.bias.grad[None]]).double() for m in maps]
            deltas = [-scale * torch.cholesky_solve(g, r) for g, r in zip(grads, chol)]
            slope = sum((g * s).sum() for g, s in zip(grads, deltas)).item()  # < 0: a descent direction
            while t > 1e-10:
                for m, w0, s in zip(maps, start, deltas):
                    w = w0 + t * s.float()
                    m.weight.copy_(w[:-1])
                    m.bias.copy_(w[-1])
                f = objective()
                if f < best + 1e-4 * t * slope:  # Armijo's sufficient decrease
                    best, t = f, 2 * t
                    break
                t /= 2
            else:  # the step underflowed: no lower point along this direction; keep the last accepted
                for m, w0 in zip(maps, start):
                    m.weight.copy_(w0[:-1])
                    m.bias.copy_(w0[-1])
                if progress is not None:
                    progress(f"distillation: no step lowers the objective ({best:.4g}) at step {step}; stopped")
                break
        report_progress(progress, step, steps, f"distillation (objective {best:.4g}): step")
    return before, best


def prune_table(model, fit_batches, val_batches, k_max: int, distill_steps: int, device,
                progress=None) -> list[dict]:
    """Validation perplexity after removing the k most linear blocks, k = 0..k_max, three ways:
    (a) removal, (b) linear replacement (least squares), (c) linear replacement + distillation; each
    row also holds the distillation objective over fit_batches before and after (distill_mse_*).
    A row's "blocks" are indices into model.blocks (0-based, as Python's). progress: as layer_profile's."""
    L = len(model.blocks)
    if not 1 <= k_max <= L:
        raise ValueError(f"--prune {k_max}: the model has {L} blocks (choose 1..{L})")
    stats = [PairStats(model.cfg.n_embd, device) for _ in range(L)]
    model.eval()
    with torch.no_grad():
        for i, (x, _) in enumerate(fit_batches, 1):
            _, _, hidden = model(x.to(device), return_hidden=True)
            for l in range(L):
                stats[l].update(hidden[l], hidden[l + 1])
            report_progress(progress, i, len(fit_batches), "pruning, ranking the blocks on training text: batch")
    order = sorted(range(L), key=lambda l: -stats[l].scores()[1])  # most linear (LS_wo) first
    rows = [{"k": 0, "blocks": [], "removed": perplexity(model, val_batches, device)}]
    rows[0]["linear"] = rows[0]["distilled"] = rows[0]["removed"]
    rows[0]["distill_mse_before"] = rows[0]["distill_mse_after"] = 0.0
    for k in range(1, k_max + 1):
        if progress is not None:
            progress(f"pruning {k} of up to {k_max} blocks: removal and linear fit")
        chosen = sorted(order[:k])
        removed, linear = copy.deepcopy(model), copy.deepcopy(model)
        for l in chosen:
            removed.blocks[l] = SkipBlock()
            linear.blocks[l] = LinearBlock(*stats[l].linear_map()).to(device)
        row = {"k": k, "blocks": chosen, "removed": perplexity(removed, val_batches, device),
               "linear": perplexity(linear, val_batches, device)}
        row["distill_mse_before"], row["distill_mse_after"] = distill(
            linear, model, chosen, fit_batches, distill_steps, device,
            progress=None if progress is None else lambda msg, k=k: progress(f"pruning {k}: {msg}"))
        row["distilled"] = perplexity(linear, val_batches, device)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# The windows a checkpoint is scored on, and the official recipe the streaming score is checked against
# (test_all.py) and timed against (python bench.py linearity-score CHECKPOINT)


def window_starts(data, T: int, tokens: int) -> list[int]:
    """Starts of the consecutive T-token windows from the beginning of data that hold `tokens` tokens
    (fewer where data is shorter): the windows every score and pruning table here is computed on."""
    return list(range(0, len(data) - T - 1, T))[:math.ceil(tokens / T)]


def official_svd_score(x: torch.Tensor, y: torch.Tensor) -> float:
    """The official recipe (AIRI-Institute/LLM-Microscope), to check and time the streaming score against:
    all N tokens in memory, fp32 on the CPU; centre, Frobenius-normalise, A = X~^+ Y~ through a thin SVD of
    X~, LS = 1 - ||X~ A - Y~||^2."""
    x, y = x - x.mean(0), y - y.mean(0)
    x, y = x / x.norm(), y / y.norm()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)  # x = U diag(s) V^T, U (N, d)
    a = vh.T @ ((u.T @ y) / s[:, None])  # (d, d) = V diag(1/s) U^T Y~
    return 1 - ((x @ a - y) ** 2).sum().item()


# ----------------------------------------------------------------------------------------------------
# Command line (python linearity.py CHECKPOINT): the model and the text come from train.py. train.py
# imports this file (for the regularisers), so nothing here imports train: the script entry point at the
# bottom passes the module in as `train` (and bench.py and exercises.py pass it the same way).


def token_files(train, ckpt: dict, data: str | None = None, cache_dir: str = "out/tokens",
                log=print) -> tuple[str, str]:
    """(train, validation) token files of the text a train.py checkpoint was trained on, or of `data`."""
    tcfg = ckpt["train_config"]
    texts = train.resolve_text(data or tcfg.get("data"), "out/data", tcfg.get("download_mb", 512), log=log)
    return train.prepare_tokens(*texts, cache_dir, tcfg.get("lowercase", "auto"), log=log)


def read_checkpoint(train, path: str) -> dict:
    """train.load_checkpoint, with this command's hint for a missing file (train.py's names --out-dir)."""
    if not os.path.isfile(path):
        raise train.UserError(f"no checkpoint at {path}: give the ckpt.pt of a train.py run "
                              "(python train.py writes out/ARCH/ckpt.pt)")
    return train.load_checkpoint(path)


def stderr_progress():
    """A progress function for the long passes (report_progress): one flushed line on stderr, with the
    seconds since the command started, so that stdout holds only the tables."""
    t0 = time.perf_counter()
    return lambda msg: print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def main(train, argv=None) -> int:
    """The command line; train: the train module (see above)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--bench" in argv:
        args = " ".join(a for a in argv if a != "--bench")
        print(f"error: linearity.py --bench moved to bench.py: python bench.py linearity-score {args}",
              file=sys.stderr)
        return 2
    # Ctrl-C raises KeyboardInterrupt even where the shell started us with SIGINT ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run(train, argv)
    except KeyboardInterrupt:  # Ctrl-C: nothing is half-written (each JSON is written atomically)
        print("interrupted", file=sys.stderr)
        return 130


def add_checkpoint_arguments(parser: argparse.ArgumentParser, tokens: int, tokens_help: str):
    """The options of every command that reads a checkpoint and its text (this file's, bench.py linearity-score)."""
    parser.add_argument("checkpoint", help="a ckpt.pt written by train.py")
    parser.add_argument("--tokens", type=int, default=tokens, help=tokens_help)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--data", default=None, help="TinyStories folder or file; None: the one train.py finds")
    parser.add_argument("--cache-dir", default="out/tokens", help="token caches, as in train.py")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs (cuda where a GPU is present)")


def run(train, argv) -> int:
    parser = argparse.ArgumentParser(description="Per-layer linearity profile of a checkpoint of train.py, on "
                                                 "the validation text it was trained with (or --data). Blocks "
                                                 "are numbered 1..L: block l maps h_{l-1} to h_l.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    add_checkpoint_arguments(parser, 200_000, "validation tokens to pool (>> hidden size)")
    parser.add_argument("--plot", default=None, help="write the profile as a PNG here (needs matplotlib)")
    parser.add_argument("--prune", type=int, default=0, metavar="K",
                        help="also print the perplexity table for removing / replacing the 1..K most linear blocks; "
                             "0: no pruning")
    parser.add_argument("--distill-steps", type=int, default=200,
                        help="full-batch steps of layer-wise distillation per k (pruning): the replacements learn to "
                             "lower the mean MSE to the full model's hidden states from the first replaced "
                             "block on, on the training windows; 0: the plain fit")
    parser.add_argument("--kernels", choices=["on", "off"], default="off",
                        help="per-batch statistics from the Triton cross-Gram kernel (fp32) instead of float64 "
                             "torch: as fast where float64 runs at full rate, faster on GPUs with slow float64")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the profile (and the pruning table) to this JSON file")
    args = parser.parse_args(argv)
    plt = train.pyplot() if args.plot else None
    if args.plot and plt is None:
        print("error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 1
    try:
        ckpt = read_checkpoint(train, args.checkpoint)
        model, mcfg = train.model_from_checkpoint(ckpt, args.checkpoint)
        if args.tokens <= mcfg.n_embd:
            raise train.UserError(f"--tokens {args.tokens} is not more than the hidden size {mcfg.n_embd}: "
                                  "the score would be meaningless (any X maps onto any Y)")
        if args.prune and not 1 <= args.prune <= mcfg.n_layer:
            raise train.UserError(f"--prune {args.prune}: the model has {mcfg.n_layer} blocks (choose 1..{mcfg.n_layer})")
        if args.prune and train.ARCHS[mcfg.arch][1] != "plain":
            raise train.UserError(f"--prune replaces blocks on a single residual stream; {mcfg.arch}'s blocks "
                                  "act on n streams")
        train_path, val_path = token_files(train, ckpt, args.data, args.cache_dir)
    except train.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    use_kernel = args.kernels == "on"
    if use_kernel and not kernels.HAVE_TRITON:
        print("error: --kernels on needs Triton (pip install triton), or use --kernels off", file=sys.stderr)
        return 1
    if use_kernel and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        print("error: --kernels on needs a CUDA GPU (or TRITON_INTERPRET=1 on a CPU), or use --kernels off",
              file=sys.stderr)
        return 1
    model.to(device)
    T = mcfg.block_size
    val = train.TokenData(val_path)
    starts = window_starts(val, T, args.tokens)
    if len(starts) * T <= mcfg.n_embd:
        print(f"error: the validation set has too few tokens ({len(val)}) for hidden size {mcfg.n_embd}",
              file=sys.stderr)
        return 1
    val_batches = [val.windows(starts[i:i + args.batch_size], T) for i in range(0, len(starts), args.batch_size)]
    progress = stderr_progress()
    progress(f"scoring {len(starts) * T:,} validation tokens in {len(val_batches)} batches on {device}")
    profile = layer_profile(model, [x for x, _ in val_batches], device, use_kernel, progress)
    print(f"linearity of {args.checkpoint} ({mcfg.arch}, {mcfg.n_layer} blocks, d={mcfg.n_embd}), "
          f"{len(starts) * T:,} validation tokens; block l maps h_(l-1) to h_l")
    print("| block | pair                 | LS (with residual) | LS_wo (without) |")
    print("|------:|----------------------|-------------------:|----------------:|")
    for l, (ls, ls_wo) in enumerate(profile, 1):
        name = f"{'embedding' if l == 1 else f'block {l - 1}'} -> block {l}"
        print(f"| {l:5d} | {name:20s} | {ls:18.4f} | {ls_wo:15.4f} |")
    if args.plot:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(profile) + 1), [p[0] for p in profile], "o-", label="with residual")
        ax.plot(range(1, len(profile) + 1), [p[1] for p in profile], "s-", label="without residual")
        ax.set_xlabel("block")
        ax.set_ylabel("linearity score")
        ax.set_title(f"{mcfg.arch}: {args.checkpoint}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    def write_json(rows):  # after the profile, and again with the pruning: a stopped run keeps its scores
        if args.json:
            train.write_json_atomic(args.json, {
                "checkpoint": args.checkpoint, "arch": mcfg.arch, "tokens": len(starts) * T, "first_block": 1,
                "reg": ckpt["train_config"].get("reg", "none"),
                "profile": [{"ls": ls, "ls_wo": ls_wo} for ls, ls_wo in profile], "prune": rows})
    write_json(None)
    if args.prune:
        # fit and distil on training text, measure on the validation windows used above
        fit = train.TokenData(train_path)
        fit_starts = window_starts(fit, T, len(starts) * T)  # as many windows as the validation's
        fit_batches = [fit.windows(fit_starts[i:i + args.batch_size], T)
                       for i in range(0, len(fit_starts), args.batch_size)]
        rows = prune_table(model, fit_batches, val_batches, args.prune, args.distill_steps, device, progress)
        for r in rows:  # numbered as the profile's blocks: model.blocks[l] is block l + 1
            r["blocks"] = [l + 1 for l in r["blocks"]]
        print("\nvalidation perplexity after pruning the k most linear blocks (ranked by LS_wo on training text)")
        print("| k | blocks          | (a) removed | (b) linear fit | (c) fit + distilled | distillation MSE, before -> after |")
        print("|--:|-----------------|------------:|---------------:|--------------------:|----------------------------------:|")
        for r in rows:
            print(f"| {r['k']} | {str(r['blocks']):15s} | {r['removed']:11.2f} | {r['linear']:14.2f} | "
                  f"{r['distilled']:19.2f} | {r['distill_mse_before']:.4g} -> {r['distill_mse_after']:.4g} |")
        print("(distillation MSE: the layer-wise objective, mean over the layers from the first replaced block on, "
              "on the training windows it trains on)")
        write_json(rows)
    if args.json:
        print(f"json: {args.json}")
    return 0


# ----------------------------------------------------------------------------------------------------
# Self-demo (CPU, seconds)

if __name__ == "__main__" and len(sys.argv) > 1:
    # The command line needs train.py, which imports this file as `linearity`: registered under that name
    # first, this script stays one module (not a second copy, with classes of its own).
    sys.modules["linearity"] = sys.modules[__name__]
    import train
    sys.exit(main(train))

if __name__ == "__main__":
    torch.manual_seed(0)
    N, d = 4000, 32
    x = torch.randn(N, d) + 100.0  # a large common offset, as real hidden states have
    w = torch.randn(d, d) / math.sqrt(d)
    print("1. A linear map scores 1; a residual block with a small nonlinear part scores ~1 with the")
    print("   residual and much less without it:")
    ls_linear = linearity_score(x, x @ w + 3)[0]
    print(f"   y = x W + b:              LS {ls_linear:.6f}")
    y = x + 0.3 * torch.tanh(2 * (x - 100) @ w)
    ls, ls_wo = linearity_score(x, y)
    print(f"   y = x + 0.3 tanh(2 x W):  LS {ls:.6f}, LS_wo {ls_wo:.6f}")
    assert abs(ls_linear - 1) < 1e-6 and ls > 0.99 and ls_wo < ls - 0.1

    print("2. The streaming score (10 batches, float64 Chan merge) equals the exact least-squares one:")
    stats = PairStats(d)
    for xb, yb in zip(x.chunk(10), y.chunk(10)):
        stats.update(xb, yb)
    exact = linearity_score_exact(x, y)
    print(f"   streaming {stats.scores()[0]:.9f} {stats.scores()[1]:.9f}   exact {exact[0]:.9f} {exact[1]:.9f}")
    assert all(abs(a - b) < 1e-9 for a, b in zip(stats.scores(), exact))

    print("3. The identity 1 - LS_wo = (1 - LS) ||Yc||^2 / ||Yc - Xc||^2:")
    xc, yc = x - x.mean(0), y - y.mean(0)
    rhs = (1 - ls) * (yc.norm() ** 2 / (yc - xc).norm() ** 2).item()
    print(f"   1 - LS_wo = {1 - ls_wo:.6f}, right-hand side = {rhs:.6f}")
    assert abs((1 - ls_wo) - rhs) < 1e-6
