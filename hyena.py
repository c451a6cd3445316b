"""
hyena.py -- the Hyena operator: attention-free token mixing by implicit long convolutions and gates.

    python hyena.py                     # CPU self-demo: causality, FFT == direct conv, decode == forward
    python train.py --arch hyena        # a GPT whose attention is replaced by Hyena (order 2)
    python train.py --arch hyena --task recall   # the associative-recall task of the paper, Sec. 4.1

Paper: Poli, Massaroli, Nguyen, Fu, Dao, Baccus, Bengio, Ermon, Re, "Hyena Hierarchy: Towards Larger
Convolutional Language Models", arXiv 2302.10866 (operator: Definition 3.1; implicit filters: Sec. 3.3;
associative recall: Sec. 4.1).

The idea. Attention mixes tokens with an L x L matrix computed from the data. Hyena builds a
data-controlled L x L operator out of two cheap parts that alternate: long causal convolutions (each
output sees every earlier input, with a filter as long as the sequence) and element-wise gates (a
token's own projections scale what the convolution delivers to it). A convolution is a Toeplitz
matrix; a gate is a diagonal one; their product D_x^N S_h^N ... D_x^1 S_h^1 is data-dependent like
attention, yet costs O(L log L) with the FFT instead of O(L^2).

The filters are implicit: a small network of the position t produces h(t), so the parameter count
does not grow with the sequence length, and an exponential window makes distant taps fade:

    h^n(t) = Window(t) * FFN(PositionalEncoding(t))                       (Sec. 3.3, Eq. 7)

Definition 3.1 (order N), for an input u (B, L, C):
    (v, x^1, ..., x^N) = ShortConv(InProj(u))          N+1 streams (B, C, L), a 3-tap causal conv each
    z^1 = v
    z^{n+1} = x^n * (h^n conv z^n + D^n z^n)           n = 1..N; conv is causal and as long as L
    y = OutProj(z^{N+1})                                (B, L, C)

The reference code differs (safari issue 9): its `order=2` makes 3 projections but runs ONE long
convolution and gates before convolving, y = x^0 * (h conv (x^1 * v) + D (x^1 * v)). We implement the
paper's recursion with a configurable --hyena-order; `--arch hyena` uses order 2 (two long
convolutions, three projections), the paper's own order for language modelling.

Filter and projection settings (train.py flags; the Pile values are not a safe default for a small model):
    --hyena-w, --hyena-emb-dim     the Sin's initial frequency and the positional features (Pile: 14, 33;
                                   safari's recall config: 10, 5)
    --hyena-filter-init normal     the FFN at N(0, 0.02) with zero biases, as safari's training pipeline
                                   re-initialises it; kaiming (PyTorch's default, safari's standalone file)
                                   makes the filters start as white noise
    --hyena-bias off               biases on the in/out projections (safari: on, starting at zero)
    --hyena-pos-trainable off      positions z(t) fixed (safari's recall config) or learned

Notation (shape comments): B batch, L (or T) time, C model width, N order, F filter FFN width.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


# ----------------------------------------------------------------------------------------------------
# The causal long convolution: y_t = sum_{s <= t} h_{t-s} u_s + D u_t


def direct_causal_conv(u: torch.Tensor, h: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """The O(L^2) definition, for checking: u (B, C, L), h (C, L), skip (C,) -> (B, C, L)."""
    L = u.size(-1)
    lag = torch.arange(L, device=u.device)[:, None] - torch.arange(L, device=u.device)[None, :]  # (L, L): t - s
    toeplitz = torch.where(lag >= 0, h[:, lag.clamp(min=0)], 0.0)  # (C, L, L): T[c, t, s] = h[c, t - s]
    y = torch.einsum("cts,bcs->bct", toeplitz.to(u.dtype), u)
    return y if skip is None else y + skip[:, None] * u


def fft_causal_conv(u: torch.Tensor, h: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """The same in O(L log L): u (B, C, L), h (C, L), skip (C,) -> (B, C, L) in fp32 (fp64 for fp64).

    A product of DFTs is a *circular* convolution; zero-padding both signals to 2L makes the wrap-around
    land in the discarded second half, so the first L outputs are the causal (linear) convolution.
    The FFT runs in fp32 whatever the input dtype: autocast does not upcast it, and bf16 FFTs are not
    reliable."""
    L = u.size(-1)
    n = 2 * L
    dtype = torch.promote_types(u.dtype, torch.float32)
    u = u.to(dtype)
    u_f = torch.fft.rfft(u, n=n)  # (B, C, L + 1) complex
    h_f = torch.fft.rfft(h.to(dtype), n=n)  # (C, L + 1)
    y = torch.fft.irfft(u_f * h_f, n=n)[..., :L]  # (B, C, L)
    return y if skip is None else y + skip.to(dtype)[:, None] * u


# ----------------------------------------------------------------------------------------------------
# The implicit filter: h(t) = Window(t) * FFN(PositionalEncoding(t))


class Sin(nn.Module):
    """sin(freq * x) with a learnable frequency per feature, initialised to w (Sec. 3.3: high frequency
    content lets a small FFN draw filters with sharp detail)."""

    def __init__(self, dim: int, w: float):
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), float(w)))

    def forward(self, x):
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """N filters of C channels each, defined on l_max positions: forward(L) -> h (N, C, L), skips (N, C).

    Positional encoding (emb_dim = 1 + 2 bands, paper Appendix D.3):
        z(t) = [t_norm, cos(2 pi f_k t / l_max), sin(2 pi f_k t / l_max)],  t = 0..l_max-1, f_k = 0..bands-1
        fixed (pos_trainable False) or a trainable parameter without weight decay (True)
    FFN: Linear(emb, F) -> Sin -> Linear(F, F) -> Sin -> Linear(F, F) -> Sin -> Linear(F, N C)
        init "normal": N(0, 0.02) weights, zero biases; "kaiming": PyTorch's default
    Window: exp(-t_norm |delta_{n,c}|), N C rates spread so the fastest decays to `target` at fast_decay_pct
        of l_max and the slowest at slow_decay_pct (safari's ExponentialModulation), dealt out to the N
        filters in turn: filter n, channel c gets rate n + N c of the spread.
    """

    # Defaults: safari's recall config (w 10, emb_dim 5) and training-pipeline init, not the paper's Pile
    # config (w 14, emb_dim 33), chosen by the sweep in RESULTS.md (compare.py --stages sweep).
    def __init__(self, n_embd: int, order: int, l_max: int, emb_dim: int = 5, width: int = 64,
                 w: float = 10.0, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                 target: float = 1e-2, init: str = "normal", pos_trainable: bool = False):
        super().__init__()
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"filter emb_dim must be odd and >= 3 (1 + 2 bands), got {emb_dim}")
        if init not in ("normal", "kaiming"):
            raise ValueError(f"filter init must be 'normal' or 'kaiming', got {init!r}")
        self.order, self.n_embd, self.l_max, self.init = order, n_embd, l_max, init
        bands = (emb_dim - 1) // 2
        t_norm = torch.linspace(0, 1, l_max)  # (l_max,)
        # Frequencies start at 1e-4, not 0, as in safari, so no band is a constant.
        freqs = torch.linspace(1e-4, bands - 1, bands)  # (bands,)
        angle = 2 * math.pi * freqs[None, :] * torch.arange(l_max)[:, None] / l_max  # (l_max, bands)
        pos = torch.cat([t_norm[:, None], angle.cos(), angle.sin()], dim=-1)  # (l_max, emb_dim)
        # Fixed by default, as safari's recall config (lr_pos_emb 0); trainable, it learns at the model's
        # learning rate (safari gives it its own, lr_pos_emb).
        if pos_trainable:
            self.pos = nn.Parameter(pos)
        else:
            self.register_buffer("pos", pos, persistent=False)
        self.register_buffer("t_norm", t_norm, persistent=False)
        # One Sin (one set of frequencies) shared by the three activations, as in safari.
        self.act = Sin(width, w)
        self.ffn = nn.ModuleList([nn.Linear(emb_dim, width), nn.Linear(width, width),
                                  nn.Linear(width, width), nn.Linear(width, order * n_embd, bias=False)])
        slowest = math.log(1 / target) / slow_decay_pct  # decays to target at t_norm = slow_decay_pct
        fastest = math.log(1 / target) / fast_decay_pct
        # One spread over all N C filter channels, dealt out in turn as safari's training module does
        # (src/models/sequence/hyena.py, '(v o)'): every filter spans the whole range, at rates of its own.
        # (safari's standalone file hands out contiguous slices instead, which would give filter 1 only
        # the slow windows.) Order 1 is the plain spread over C.
        spread = torch.linspace(slowest, fastest, order * n_embd)  # (N C,)
        self.register_buffer("deltas", spread.view(n_embd, order).t().contiguous(), persistent=False)  # (N, C)
        # The skip term D of each long convolution (safari: randn init, a choice we keep).
        self.skip = nn.Parameter(torch.randn(order, n_embd))
        for p in self.parameters():
            p.no_weight_decay = True  # the paper: no weight decay on the filter parameters
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # "normal": N(0, 0.02) and zero biases, as safari's training pipeline (_init_weights) re-initialises
        # every linear layer; "kaiming": PyTorch's default, which survives only in safari's standalone file
        # and makes the filters start as white noise (sin(w x) of wide pre-activations).
        for lin in self.ffn:
            if self.init == "kaiming":
                lin.reset_parameters()
            else:
                nn.init.normal_(lin.weight, std=0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def forward(self, L: int) -> torch.Tensor:
        if L > self.l_max:
            raise ValueError(f"sequence of {L} tokens is longer than the filters' l_max = {self.l_max} "
                             f"(the model's --block-size)")
        # Precision: sin(w p) with w ~ 10 (14 in the Pile config) multiplies p's rounding error by w, three
        # layers deep: hidden layers in bf16 or tf32 put h far off its exact value (RESULTS.md, "The
        # filter's precision"); so they run in float64 (L x F x F multiply-adds, next to nothing) and the last layer,
        # whose rounding is not amplified, in fp32 (tf32 where torch allows it), whatever autocast says.
        with torch.autocast(self.pos.device.type, enabled=False):
            z = self.pos[:L].double()  # (L, emb_dim); positions never depend on L, so a prefix is causal
            for lin in self.ffn[:-1]:
                z = self.act(F.linear(z, lin.weight.double(), lin.bias.double()))  # (L, F)
            w_last = self.ffn[-1].weight
            # the last layer computed transposed, W z^T: time comes out last and contiguous, as the long
            # convolutions want it (no transposed copies forward or backward)
            h = (w_last @ z.to(w_last.dtype).transpose(0, 1)).view(self.order, self.n_embd, L)  # (N, C, L)
            window = torch.exp(-self.deltas[:, :, None] * self.t_norm[:L])  # (N, C, L)
            return h * window  # (N, C, L), fp32


# ----------------------------------------------------------------------------------------------------
# The Hyena operator as the GPT's token mixer


def short_conv(p: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, state=None) -> torch.Tensor:
    """3-tap causal depthwise conv: p (B, L, K) -> (B, K, L), y_t = w_0 p_{t-2} + w_1 p_{t-1} + w_2 p_t + b.
    weight (K, 3), bias (K,); state (B, K, 2): the two inputs before p (decoding), zeros if None.
    (The transpose puts time last, where the long convolutions want it.)"""
    K = p.size(-1)
    x = p.transpose(1, 2)  # (B, K, L)
    x = F.pad(x, (2, 0)) if state is None else torch.cat([state.to(x.dtype), x], dim=-1)  # (B, K, L + 2)
    w, b = weight[:, None, :].to(p.dtype), bias.to(p.dtype)  # as autocast would: bf16 in, bf16 math
    return F.conv1d(x, w, b, groups=K)


def long_conv_gate(z, x, h, skip):
    """x * (h conv z + skip * z), the plain path: z, x (B, C, L), h (C, L), skip (C,) -> (B, C, L)."""
    y = fft_causal_conv(z, h, skip)  # fp32 (fp64 for fp64 inputs)
    return (x.to(y.dtype) * y).to(z.dtype)


def _switch(name: str, value) -> bool:
    """An on/off setting: "on"/"off" (train.py's flags) or a bool."""
    if value in ("on", True) or value in ("off", False):
        return value in ("on", True)
    raise ValueError(f"{name} must be 'on' or 'off', got {value!r}")


class HyenaMixer(nn.Module):
    """Token mixer 'hyena': Definition 3.1 with order N (cfg.hyena_order), causal, O(L log L).

    Parameters: InProj C -> (N+1) C and OutProj C -> C (4 C^2 at order 2, attention's count), the short
    conv, and the implicit filters (a few tens of thousands, independent of L)."""

    def __init__(self, cfg, layer: int):
        super().__init__()
        if cfg.hyena_order < 1:
            raise ValueError(f"hyena order must be at least 1 (got {cfg.hyena_order})")
        C, N = cfg.n_embd, cfg.hyena_order
        self.order, self.n_embd = N, C
        # Biases on the projections: safari has them (nn.Linear's default), off by default here, as the
        # GPT's other linear layers; when on they start at zero, as safari's training pipeline sets them.
        bias = _switch("hyena_bias", getattr(cfg, "hyena_bias", "off"))
        pos_trainable = _switch("hyena_pos_trainable", getattr(cfg, "hyena_pos_trainable", "off"))
        self.in_proj = nn.Linear(C, (N + 1) * C, bias=bias)
        # Short conv: depthwise, 3 taps, with bias (safari's nn.Conv1d). PyTorch's default init (uniform,
        # bound 1/sqrt(3)), which our generic init leaves alone.
        conv = nn.Conv1d((N + 1) * C, (N + 1) * C, 3, groups=(N + 1) * C)
        self.conv_weight = nn.Parameter(conv.weight.detach().view(-1, 3).clone())  # ((N+1) C, 3)
        self.conv_bias = nn.Parameter(conv.bias.detach().clone())  # ((N+1) C,)
        self.filter = ImplicitFilter(C, N, cfg.block_size, emb_dim=cfg.hyena_emb_dim,
                                     width=cfg.hyena_filter_width, w=cfg.hyena_w,
                                     init=getattr(cfg, "hyena_filter_init", "normal"), pos_trainable=pos_trainable)
        self.proj = nn.Linear(C, C, bias=bias)
        # The kernel paths (train.py --kernels): kernels.hyena_short_conv, kernels.hyena_filter (the implicit
        # filters in two kernels forward), kernels.hyena_long_conv (Toeplitz matmuls for training shapes,
        # FFTs for long sequences). An edit of the plain functions they replace runs only with --kernels off.
        self.use_kernels = False
        self.kernel_supported = kernels.hyena_filter_supports(cfg.hyena_filter_width)
        self.filter_kernel = kernels.hyena_filter_supports(cfg.hyena_filter_width, pos_trainable)
        self.kernel_replaces = ("hyena.short_conv", "hyena.long_conv_gate",
                                *(("hyena.ImplicitFilter.forward",) if self.filter_kernel else ()))

    def init_weights(self):
        nn.init.zeros_(self.proj.weight)  # as every mixer here: the block starts as the identity
        for lin in (self.in_proj, self.proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def flops_per_token(self, seq_len: int) -> int:
        # FFT convolutions are not tensor-core matmuls; MFU counts the projections (6N) only.
        return 0

    def streams(self, u, conv_state=None):
        """u (B, T, C) -> N+1 streams (B, C, T) after the short conv. conv_state (B, (N+1)C, 2): the two
        inputs before this chunk (decoding); None means zeros (the sequence starts here)."""
        p = self.in_proj(u)  # (B, T, (N+1) C)
        if conv_state is None and self.use_kernels:  # the streams' gradients stay apart in the backward
            return kernels.hyena_short_conv(p, self.conv_weight, self.conv_bias, streams=self.order + 1)
        s = short_conv(p, self.conv_weight, self.conv_bias, conv_state)  # (B, (N+1) C, T)
        if conv_state is not None:  # keep the last two inputs for the next chunk
            conv_state.copy_(torch.cat([conv_state, p.transpose(1, 2).to(conv_state.dtype)], dim=-1)[..., -2:])
        return s.chunk(self.order + 1, dim=1)  # N+1 x (B, C, T): v, x^1, ..., x^N

    def forward(self, u, start_pos: int = 0, cache=None):
        B, T, C = u.shape
        if cache is not None:
            return self.decode(u, start_pos, cache)
        # N filters (C, T) fp32; unbound, not indexed: h[n]'s backward would write a zero-filled (N, C, T) per n
        h = (kernels.hyena_filter(self.filter, T) if self.use_kernels and self.filter_kernel
             else self.filter(T).unbind(0))
        skips = self.filter.skip.unbind(0)  # N x (C,); unbound for the reason above
        v, *gates = self.streams(u)
        z = v  # z^1 = v
        conv_gate = kernels.hyena_long_conv if self.use_kernels else long_conv_gate
        for n, x in enumerate(gates):  # z^{n+1} = x^n * (h^n conv z^n + D^n z^n)
            z = conv_gate(z, x, h[n], skips[n])
        return self.proj(z.transpose(1, 2))  # (B, C, T) -> (B, T, C)

    # -- generation: exact cached decoding ----------------------------------------------------------
    # The state of a Hyena layer is the short conv's last two inputs and, for each long convolution,
    # every input z^n so far: y_t = sum_{s<=t} h_{t-s} z_s + D z_t costs O(t C) per new token, like a
    # KV cache. (Distilling the filters into a small recurrence -- Laughing Hyena -- is out of scope.)

    @torch.no_grad()
    def init_cache(self, batch_size: int, max_len: int, device, dtype):
        N, C = self.order, self.n_embd
        filters = self.filter(max_len).to(device)  # (N, C, L) fp32, computed once per generation
        # The filters reversed and followed by L zeros: the window at offset L-1-t holds h_t, ..., h_0 at
        # positions 0..t and zeros after, the weights a decode step at t puts on z_0, ..., z_{L-1}.
        reversed_padded = torch.cat([filters.flip(-1), torch.zeros_like(filters)], dim=-1)  # (N, C, 2L)
        return {"conv_state": torch.zeros(batch_size, (N + 1) * C, 2, device=device, dtype=dtype),
                "z": torch.zeros(batch_size, N, C, max_len, device=device, dtype=torch.float32),
                "filters": filters, "filters_reversed": reversed_padded}

    def decode(self, u, start_pos, cache):
        """A prompt chunk at start_pos (int), or one step (T = 1; start_pos may be a tensor: fixed shapes)."""
        B, T, C = u.shape
        L = cache["z"].size(-1)
        v, *gates = self.streams(u, cache["conv_state"])
        z = v
        if T == 1:
            pos = torch.as_tensor(start_pos, device=u.device).view(1)
            window = torch.arange(L, device=u.device) + (L - 1 - pos)  # (L,): where h_{t-s} sits, s = 0..L-1
        for n, x in enumerate(gates):
            if T == 1:  # y_t = sum_s h_{t-s} z_s + D z_t: a dot product over the whole (masked) past
                cache["z"][:, n].index_copy_(-1, pos, z.float())
                h_rev = cache["filters_reversed"][n].index_select(-1, window)  # (C, L): h_{t-s}, 0 for s > t
                # one matmul per channel, no (B, C, L) temporary; fp32 like the cache (autocast would run bf16)
                with torch.autocast(u.device.type, enabled=False):
                    y = torch.einsum("bcl,cl->bc", cache["z"][:, n], h_rev)[..., None]  # (B, C, 1)
                y = y + self.filter.skip[n].float()[:, None] * z.float()
            else:  # a prompt chunk: the FFT convolution over everything so far, keep this chunk's outputs
                end = start_pos + T
                cache["z"][:, n, :, start_pos:end] = z.float()
                past = cache["z"][:, n, :, :end]  # (B, C, end): every input of this convolution so far
                y = fft_causal_conv(past, cache["filters"][n, :, :end], self.filter.skip[n])[..., start_pos:end]
            z = (x.float() * y).to(u.dtype)
        return self.proj(z.transpose(1, 2))


# ----------------------------------------------------------------------------------------------------
# Multi-query associative recall (Hyena Sec. 4.1; Zoology, arXiv 2312.04927): a synthetic task that
# tests in-context recall. A sequence lists key-value pairs, then asks for keys again; after each
# queried key the model must produce its value. Only those positions carry a target.
#
#     k1 v1 k2 v2 ... kP vP  .  .  k2 [v2]  .  k1 [v1]  .  ...
#
# Token 0 is the filler '.', keys are 1..K, values K+1..2K (vocab_size = 2K + 1).


def recall_example(seq_len: int, vocab_size: int, n_pairs: int, generator: torch.Generator):
    """One (input, target) pair of (seq_len,) tensors; target is -1 where there is nothing to predict."""
    n_keys = (vocab_size - 1) // 2
    if n_pairs > n_keys or 4 * n_pairs > seq_len:
        raise ValueError(f"recall: {n_pairs} pairs need >= {n_pairs} keys (vocab {vocab_size} has {n_keys}) "
                         f"and seq_len >= {4 * n_pairs} (got {seq_len})")
    keys = torch.randperm(n_keys, generator=generator)[:n_pairs] + 1  # distinct keys
    values = torch.randint(n_keys, (n_pairs,), generator=generator) + n_keys + 1
    x = torch.zeros(seq_len + 1, dtype=torch.long)  # one extra: targets are inputs shifted by one
    x[0:2 * n_pairs:2], x[1:2 * n_pairs:2] = keys, values
    # the queries: each key once, in random order, in random 2-token slots after the pairs
    n_slots = (seq_len + 1 - 2 * n_pairs) // 2
    slots = torch.randperm(n_slots, generator=generator)[:n_pairs] * 2 + 2 * n_pairs  # (P,) query positions
    order = torch.randperm(n_pairs, generator=generator)
    x[slots], x[slots + 1] = keys[order], values[order]
    y = torch.full((seq_len,), -1, dtype=torch.long)
    y[slots] = values[order]  # at a query key, predict its value
    return x[:-1], y


def recall_single_query_example(seq_len: int, vocab_size: int, generator: torch.Generator):
    """The Hyena paper's associative recall (Sec. 4.1, after safari's synthetic "assoc_recall" data): key-value
    pairs with keys drawn WITH repetition and a fresh key -> value map per example (a repeated key repeats its
    value), then a query marker and one key whose value must come next:

        k3 v3 k1 v1 k3 v3 k2 v2 ... kP vP  =>  k1 [v1]        (=> is token 0; keys 1..K, values K+1..2K)

    Returns (input, target), (seq_len,) each, target = input shifted by one, so a target at EVERY position
    (the paper trains with the plain next-token loss: keys are unpredictable, a value is predictable once its
    key has appeared before). The query is always the last input position: recall accuracy is scored on
    target[-1] alone. How it differs from MQAR (recall_example above; Zoology, arXiv 2312.04927): one query
    instead of one per pair, keys repeat instead of being distinct, no filler tokens, and loss everywhere
    instead of only at the queries."""
    n_keys = (vocab_size - 1) // 2
    if n_keys < 2 or seq_len < 4:
        raise ValueError(f"recall1: needs vocab_size >= 5 (2 keys, 2 values, the marker; got {vocab_size}) "
                         f"and seq_len >= 4 (one pair, the marker, the query; got {seq_len})")
    # K = (V - 1) // 2 keys and as many values: with V = 30 that is 14 + 14 and token 29 unused, as safari
    # splits its 28 non-special tokens in halves (its 2 special tokens: the marker, and a "no answer" dot
    # that never appears in the paper's setting, see the query below).
    # seq_len is the model's input length: safari's input_seq_len (the pairs) + 2 (marker, query key).
    n_pairs = (seq_len - 2) // 2
    keys = torch.randint(n_keys, (n_pairs,), generator=generator) + 1
    # The map draws each key's value independently (as safari does), so two keys may share a value.
    kv = torch.randint(n_keys, (n_keys + 1,), generator=generator) + n_keys + 1  # kv[k]: key k's value
    # The query key is one that appeared (safari's allow_dot=False, the paper's setting): otherwise the answer
    # would be "no answer" and accuracy capped below 100%. Uniform over the distinct keys present.
    present = keys.unique()
    query = present[torch.randint(len(present), (1,), generator=generator)]
    x = torch.zeros(seq_len + 1, dtype=torch.long)  # one extra: targets are inputs shifted by one
    pad = seq_len % 2  # an odd length starts with one marker token, so the query still ends the sequence
    x[pad:pad + 2 * n_pairs:2], x[pad + 1:pad + 2 * n_pairs:2] = keys, kv[keys]
    x[-2:] = torch.cat([query, kv[query]])  # x[-3] stays 0: the query marker
    return x[:-1], x[1:]


# ----------------------------------------------------------------------------------------------------
# Self-demo (CPU, seconds): python hyena.py


def _demo():
    from types import SimpleNamespace
    torch.manual_seed(0)
    cfg = SimpleNamespace(n_embd=32, block_size=64, hyena_order=2, hyena_emb_dim=33, hyena_filter_width=64,
                          hyena_w=14.0)
    mixer = HyenaMixer(cfg, 0)
    nn.init.normal_(mixer.proj.weight, std=0.02)  # non-zero, so the output depends on the input
    B, L = 2, 48

    print("1. The FFT convolution equals the O(L^2) definition")
    u, h, skip = torch.randn(B, 32, L, dtype=torch.float64), torch.randn(32, L, dtype=torch.float64), torch.randn(32)
    err = (fft_causal_conv(u, h, skip).double() - direct_causal_conv(u, h, skip.double())).abs().max().item()
    print(f"   max |fft - direct| = {err:.1e}")

    print("2. Causality: d y_t / d u_s = 0 for every s > t (float64: the FFT's rounding leaks ~1e-17)")
    x = torch.randn(1, L, 32, dtype=torch.float64, requires_grad=True)
    t = 20
    mixer.double()(x)[0, t].sum().backward()
    mixer.float()
    leak, past = x.grad[0, t + 1:].abs().max().item(), x.grad[0, :t + 1].abs().max().item()
    x = x.detach().float()
    print(f"   output {t}: max |grad| from the future {leak:.1e}, from the past {past:.1e}")
    other = HyenaMixer(SimpleNamespace(**vars(cfg), hyena_filter_init="kaiming", hyena_bias="on",
                                       hyena_pos_trainable="on"), 0).double()
    for p in (other.proj.weight, other.in_proj.bias, other.proj.bias):
        nn.init.normal_(p, std=0.02)  # the biases start at zero (init_weights); make them count
    xo = x.double().requires_grad_()
    other(xo)[0, t].sum().backward()
    leak_other = xo.grad[0, t + 1:].abs().max().item()
    print(f"   with Kaiming filter init, projection biases and trainable positions: {leak_other:.1e}")

    print("3. Cached decoding, one token at a time, equals the full forward")
    with torch.no_grad():
        full = mixer(x)
        cache = mixer.init_cache(1, cfg.block_size, "cpu", torch.float32)
        prefix = mixer(x[:, :10], 0, cache)
        steps = [mixer(x[:, i:i + 1], i, cache) for i in range(10, L)]
        dec = torch.cat([prefix] + steps, dim=1)
    print(f"   max |decode - forward| = {(dec - full).abs().max():.1e}")

    print("4. The implicit filters: parameters independent of length, windows decaying")
    h = mixer.filter(cfg.block_size)  # (N, C, L)
    n_filter = sum(p.numel() for p in mixer.filter.parameters())
    print(f"   {n_filter} filter parameters for {h.numel()} filter taps; |h| first 8 / last 8 taps of the "
          f"fastest channel: {h[-1, -1, :8].abs().mean():.3f} / {h[-1, -1, -8:].abs().mean():.4f}")

    print("5. An associative-recall example (vocab 9: keys 1-4, values 5-8; 2 pairs, 12 tokens)")
    xr, yr = recall_example(12, 9, 2, torch.Generator().manual_seed(1))
    print(f"   input  {xr.tolist()}\n   target {yr.tolist()}")
    assert err < 1e-9 and leak < 1e-12 and leak_other < 1e-12 and (dec - full).abs().max() < 1e-4
    assert h[-1, -1, -8:].abs().mean() < 0.01 * h[-1, -1, :8].abs().mean()  # the window: 1% by 30% of l_max


if __name__ == "__main__":
    _demo()
