"""
train.py -- the tiny GPT and the trainer that every technique in this repository shares.

    python train.py --arch gpt                        # train on TinyStories (downloads a prefix once)
    python train.py --arch gpt --device cpu           # a tiny CPU configuration, well under a minute
    python train.py --sample "Once upon a time"       # sample from out/gpt/ckpt.pt
    torchrun --nproc_per_node 2 train.py --arch gpt   # the same run on two GPUs (same global batch)
    python bench.py gpt                               # tokens/s vs a plain nanoGPT-style model

Read it top to bottom: the arch registry, the model (with its two plug-in points), the trainer's
settings, checkpoints, the training run (_train: six named steps, then the loop), and the command line.
The data (TinyStories tokens, the recall tasks) lives in data.py; RoPE and the attention call in
attention.py, shared with tpa.py.

Notation (shape comments use these letters)
    B   batch size (sequences)             T   sequence length (tokens)
    C   model width, n_embd                H   attention heads,  D = C / H  head width
    L   number of blocks                   V   vocabulary size padded to a multiple of 64 (50304)

The model is a pre-norm GPT: token embedding (tied with the LM head), L blocks of
[token mixer, MLP], a final RMSNorm and the head. Each sub-layer reads the residual state, normalises
it, computes, and writes back. Two things vary between the architectures of this repository, and they
are the two plug-in points:
    1. the token mixer: what reads across positions (causal attention here; Hyena and TPA elsewhere);
    2. the residual stream: how a sub-layer reads from and writes to the residual state (the plain
       x + f(x) here; Hyper-Connections and mHC widen it to n streams).
An arch name picks one of each (ARCHS below), so combinations cost nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import hyena
import kernels
import linearity
import mhc
import tpa
from attention import Rotary, cached_attention, causal_attention
# The data pipeline lives in data.py; train.X names its parts too (train.prepare_tokens, train.UserError, ...).
from data import (EOT, HF_TRAIN_FILE, HF_VAL_FILE, RecallData, TokenData, UserError, download_tinystories,
                  find_text_files, get_tokenizer, iter_stories, prepare_tokens, recall_chance, recall_pairs,
                  resolve_text, tokenize_file)

# ----------------------------------------------------------------------------------------------------
# The arch registry: arch name -> (token mixer, residual-stream policy). Technique files add entries.

ARCHS = {
    "gpt": ("attention", "plain"),
    "hc": ("attention", "hc"),  # Hyper-Connections (mhc.py), --hc-rate streams, --hc-mode static/dynamic
    "mhc": ("attention", "mhc"),  # Manifold-Constrained Hyper-Connections (mhc.py)
    "tpa": ("tpa", "plain"),  # Tensor Product Attention (tpa.py), ranks --tpa-rank-q/k/v
    "tpa-kvonly": ("tpa-kvonly", "plain"),  # TPA for keys and values only (tpa.py)
    "hyena": ("hyena", "plain"),  # Hyena (hyena.py): implicit long convolutions and gates, --hyena-order
    # Combinations, beyond the papers: one technique per plug-in point.
    "mhc+tpa": ("tpa", "mhc"),  # mHC streams around a TPA mixer
    "mhc+hyena": ("hyena", "mhc"),  # mHC streams around a Hyena mixer
}


# ----------------------------------------------------------------------------------------------------
# Model


@dataclass
class GPTConfig:
    arch: str = field(default="gpt", metadata={"help": "architecture: a token mixer and a residual stream"})
    vocab_size: int = field(default=50257, metadata={"help": "tokenizer vocabulary (GPT-2 BPE)"})
    block_size: int = field(default=512, metadata={"help": "longest context the model supports"})
    n_layer: int = field(default=6, metadata={"help": "number of blocks"})
    n_head: int = field(default=6, metadata={"help": "attention heads (head width 64 at the default)"})
    n_embd: int = field(default=384, metadata={"help": "model width"})
    mlp_ratio: int = field(default=4, metadata={"help": "MLP hidden width / model width, as in GPT-2"})
    rope_base: float = field(default=10000.0, metadata={"help": "RoPE base; 1e4 as in RoFormer"})
    residual_dtype: str = field(default="float32", metadata={
        "help": "dtype the residual state is stored in between sub-layers (every stream for hc/mhc). float32: "
                "what autocast gives a plain residual; bfloat16 halves its memory traffic, as the mHC paper "
                "stores its streams (Eq. 11); the sub-layers' and connections' arithmetic stays fp32",
        "choices": ["float32", "bfloat16"]})
    # hc / mhc (mhc.py)
    hc_rate: int = field(default=4, metadata={"help": "hc/mhc: residual streams per token (both papers use 4)"})
    hc_mode: str = field(default="dynamic", metadata={"help": "hc: static or dynamic (token-dependent) "
                                                              "connections; dynamic was HC's best",
                                                      "choices": ["dynamic", "static"]})
    sinkhorn_iters: int = field(default=20, metadata={"help": "mhc: Sinkhorn-Knopp iterations (paper: 20)"})
    # tpa / tpa-kvonly (tpa.py)
    tpa_rank_q: int = field(default=6, metadata={"help": "tpa: rank of the query factorisation (paper: 6)"})
    tpa_rank_k: int = field(default=2, metadata={"help": "tpa: rank of the keys (paper: 2)"})
    tpa_rank_v: int = field(default=2, metadata={"help": "tpa: rank of the values (paper: 2)"})
    tpa_heads: int = field(default=0, metadata={"help": "tpa: heads; 0 = as many as give MHA's 4 C^2 "
                                                        "attention parameters (the paper's matching)"})
    tpa_head_dim: int = field(default=64, metadata={"help": "tpa: head width d_h (paper: 64)"})
    # hyena (hyena.py)
    hyena_order: int = field(default=2, metadata={"help": "hyena: long convolutions per operator, the paper's N"})
    hyena_filter_width: int = field(default=64, metadata={"help": "hyena: width of the implicit filter's FFN"})
    # Filter defaults: safari's recall config, as hyena.ImplicitFilter's (the sweep behind them: RESULTS.md).
    hyena_emb_dim: int = field(default=5, metadata={"help": "hyena: positional features (1 + 2 bands, odd; "
                                                            "Pile config: 33)"})
    hyena_w: float = field(default=10.0, metadata={"help": "hyena: initial frequency of the filter's Sin "
                                                           "(Pile config: 14)"})
    hyena_filter_init: str = field(default="normal", metadata={
        "help": "hyena: init of the filter FFN's linear layers. normal: N(0, 0.02) weights, zero biases (safari's "
                "training pipeline); kaiming: PyTorch's default (safari's standalone file; the filters start as "
                "white noise)", "choices": ["normal", "kaiming"]})
    hyena_bias: str = field(default="off", metadata={"help": "hyena: biases on the in and out projections "
                                                             "(safari: on)", "choices": ["off", "on"]})
    hyena_pos_trainable: str = field(default="off", metadata={
        "help": "hyena: the filters' positional features z(t) a trainable parameter (no weight decay) rather "
                "than fixed (safari's recall config: lr_pos_emb 0, fixed)", "choices": ["off", "on"]})

    @property
    def padded_vocab_size(self) -> int:
        # 50257 -> 50304: a multiple of 64 keeps the LM-head matmul on fast tensor-core tiles.
        return (self.vocab_size + 63) // 64 * 64


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight  (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics whatever the residual's storage dtype (--residual-dtype); a no-op for fp32 input
        return F.rms_norm(x.float(), (x.size(-1),), self.weight, self.eps)


class CausalSelfAttention(nn.Module):
    """Token mixer 'attention': multi-head causal self-attention with RoPE (attention.Rotary), through SDPA
    (attention.causal_attention; tpa.py attends with the same two).

    A token mixer maps (B, T, C) -> (B, T, C) causally. For generation it also has an incremental
    form: init_cache() makes its state, and forward(x, start_pos, cache) processes the tokens at
    positions start_pos.. and appends what later tokens need (here: the rotated keys and the values).
    A one-token step (T = 1) may get start_pos as a (1,) or 0-dim tensor and keeps every shape fixed
    (GPT.generate's CUDA graphs need that).
    """

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.rotary = Rotary(self.head_dim, cfg.block_size, cfg.rope_base)

    def init_weights(self):
        # Zero-init the output projection (modded-nanogpt, T6): every block starts as the identity.
        nn.init.zeros_(self.proj.weight)

    def init_cache(self, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, self.n_head, max_len, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype)}

    def flops_per_token(self, seq_len: int) -> int:
        # Attention scores and the weighted sum, forward + backward, not counted in 6N: 12 * C * T
        # per layer (PaLM appendix B; the causal mask's saving is not subtracted, by convention).
        return 12 * self.n_head * self.head_dim * seq_len

    def forward(self, x, start_pos: int = 0, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # 3 x (B, T, H, D)
        q, k = self.rotary(q, start_pos), self.rotary(k, start_pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # 3 x (B, H, T, D)
        if cache is not None and T == 1:  # a decode step: write at pos, attend over the whole cache
            pos = torch.as_tensor(start_pos, device=x.device).view(1)
            cache["k"].index_copy_(2, pos, k)
            cache["v"].index_copy_(2, pos, v)
            y = cached_attention(q, cache["k"], cache["v"], pos)  # (B, H, 1, D)
        else:
            if cache is not None:  # a prompt chunk: append its keys and values, attend over everything cached
                end = start_pos + T
                cache["k"][:, :, start_pos:end] = k
                cache["v"][:, :, start_pos:end] = v
                k, v = cache["k"][:, :, :end], cache["v"][:, :, :end]  # (B, H, end, D)
            y = causal_attention(q, k, v, start_pos)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    """x -> W2 gelu(W1 x), hidden width mlp_ratio * C (GPT-2)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=False)

    def init_weights(self):
        nn.init.zeros_(self.proj.weight)  # as in attention: the block starts as the identity

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class PlainStream(nn.Module):
    """Residual-stream policy 'plain': one residual vector per token.

    A residual-stream policy has three parts:
      expand(x)    (B, T, C) embedding -> the residual state h, once, before the first block
      collapse(h)  the residual state -> (B, T, C), once, before the final norm (and for hidden states)
      connection   one module per sub-layer; connection(h, f) reads f's input from h and writes f's
                   output back, returning the new h. f is the normalised sub-layer (norm then compute).
    Here h = x and the connection is the textbook pre-norm residual h + f(h).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()

    def expand(self, x):
        return x

    def collapse(self, h):
        return h

    class Connection(nn.Module):
        def __init__(self, cfg: GPTConfig, index: int):
            super().__init__()

        def forward(self, h, f):
            return (h + f(h)).to(h.dtype)  # kept in --residual-dtype (a no-op under autocast)


MIXERS = {"attention": CausalSelfAttention,  # name -> class(cfg, layer)
          "tpa": tpa.TPAttention, "tpa-kvonly": tpa.TPAKVOnly, "hyena": hyena.HyenaMixer}
STREAMS = {"plain": PlainStream,  # name -> class(cfg) with .expand, .collapse and .Connection(cfg, index)
           "hc": mhc.HCStream, "mhc": mhc.MHCStream}


class Block(nn.Module):
    """One block: token mixing, then the MLP, each wrapped by the residual-stream connection."""

    def __init__(self, cfg: GPTConfig, layer: int, mixer_cls, stream_cls):
        super().__init__()
        self.mix_norm = RMSNorm(cfg.n_embd)
        self.mixer = mixer_cls(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.n_embd)
        self.mlp = MLP(cfg)
        self.mix_connection = stream_cls.Connection(cfg, 2 * layer)  # sub-layer index 2l
        self.mlp_connection = stream_cls.Connection(cfg, 2 * layer + 1)  # sub-layer index 2l+1

    def forward(self, h, start_pos: int = 0, cache=None):
        h = self.mix_connection(h, lambda x: self.mixer(self.mix_norm(x), start_pos, cache))
        h = self.mlp_connection(h, lambda x: self.mlp(self.mlp_norm(x)))
        return h


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.arch not in ARCHS:
            raise UserError(f"unknown arch {cfg.arch!r}; choose from {', '.join(ARCHS)}")
        mixer_name, stream_name = ARCHS[cfg.arch]
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.stream = STREAMS[stream_name](cfg)
        self.blocks = nn.ModuleList(
            Block(cfg, layer, MIXERS[mixer_name], STREAMS[stream_name]) for layer in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix reads and writes tokens
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # Generic init first (GPT-2: N(0, 0.02) for every matrix), then every module that defines
        # init_weights() applies its own (zero output projections here; HC/mHC coefficients elsewhere).
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for m in self.modules():
            if m is not self and hasattr(m, "init_weights"):
                m.init_weights()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied matrix is counted once

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 N for the weights (forward 2N, backward 4N) plus the mixers' own.

        N counts the tied embedding once, as the LM head's matmul (the lookup itself is free)."""
        mixer_flops = sum(b.mixer.flops_per_token(seq_len) for b in self.blocks)
        return 6 * self.num_params() + mixer_flops

    def forward(self, idx, targets=None, start_pos: int = 0, caches=None, return_hidden: bool = False):
        """idx: (B, T) token ids. Returns (logits (B, T, V), loss or None), plus, with return_hidden,
        the list of L+1 hidden states (B, T, C): the embedding and the output of every block."""
        end = None if isinstance(start_pos, torch.Tensor) else start_pos + idx.size(1)  # a tensor: DecodeStep checks
        if caches is not None and end is not None and end > self.cfg.block_size:
            raise ValueError(f"cache overflow: positions up to {end} for caches of "
                             f"block_size {self.cfg.block_size}")
        x = self.wte(idx).to(getattr(torch, self.cfg.residual_dtype))  # (B, T, C)
        h = self.stream.expand(x)  # (B, T, C), or wider for multi-stream policies
        hidden = [self.stream.collapse(h)] if return_hidden else None
        for i, block in enumerate(self.blocks):
            h = block(h, start_pos, None if caches is None else caches[i])
            if return_hidden:
                hidden.append(self.stream.collapse(h))
        logits = self.lm_head(self.norm_f(self.stream.collapse(h)))  # (B, T, V)
        loss = None
        if targets is not None:
            # autocast runs cross_entropy in fp32; -1 marks positions that carry no target
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            # Training differentiates the loss only. Returned with a graph, the logits would make the
            # compiled backward fill a zero gradient as large as the logits every step, so they come back
            # detached. Call without targets to differentiate logits.
            logits = logits.detach()
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    def init_caches(self, batch_size: int, device, dtype):
        return [b.mixer.init_cache(batch_size, self.cfg.block_size, device, dtype) for b in self.blocks]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, stop_token: int | None = None, cuda_graph: bool = True,
                 compile_step: bool = False):
        """Append max_new_tokens sampled tokens to idx (B, T). temperature 0 means greedy.

        With the cache, the prompt is processed once (prefill) and each new token costs one step of
        DecodeStep: fixed shapes and, on a GPU (cuda_graph), one replay of a captured CUDA graph
        (compile_step: of the compiled step; worth its compile time for long generations only).
        Once the context reaches block_size, each step re-reads the last block_size tokens, exactly
        what cropping the context would do without a cache. stop_token ends generation early
        once every row has produced it."""
        was_training = self.training
        self.eval()
        step, cached_len = None, 0
        dtype = self.wte.weight.dtype
        if torch.is_autocast_enabled(idx.device.type):
            dtype = torch.get_autocast_dtype(idx.device.type)
        for _ in range(max_new_tokens):
            if step is not None and cached_len < self.cfg.block_size:
                logits = step(idx[:, -1:], cached_len)  # (B, V): one new position
                cached_len += 1
            else:
                context = idx[:, -self.cfg.block_size:]  # (B, <= block_size)
                step = None  # its caches and graph go: past block_size every token re-reads the context
                caches = self.init_caches(idx.size(0), idx.device, dtype) if use_cache else None
                logits = self(context, caches=caches)[0][:, -1]  # (B, V)
                if use_cache and context.size(1) < self.cfg.block_size:
                    step = DecodeStep(self, caches, idx.size(0), cuda_graph and idx.is_cuda, compile_step)
                cached_len = context.size(1)
            logits = logits[:, :self.cfg.vocab_size].float()  # (B, vocab): padding never sampled
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
            if stop_token is not None and (idx[:, -1] == stop_token).all():
                break
        self.train(was_training)
        return idx


def next_logits(model: GPT, token, pos, caches):
    """The logits (B, V) after token (B, 1) at position pos (a tensor), through the caches."""
    return model(token, start_pos=pos, caches=caches)[0][:, -1]


class DecodeStep:
    """One token per sequence through the model and its caches, at a position that only lives in a tensor:
    step(token (B, 1), pos) -> logits (B, V) of the next token.

    Every mixer writes its cache at pos and reads the whole cache under a mask, so every call runs the same
    kernels on the same memory. That lets a CUDA graph capture the step once and replay it for every
    position: one launch instead of several hundred small ones, which is what paces a small model's
    decoding (Python and launches, not the GPU). torch.cuda.graphs directly rather than torch.compile
    (mode="reduce-overhead"): the first token comes without a compile, and the mechanism stays visible.
    The returned logits live in the graph's own memory: the next call overwrites them.
    compile: torch.compile the step before it is captured, so that a replay runs a few fused kernels
    instead of the ~45 small ones a block launches (norms, RoPE, casts, cache writes); it costs a
    compile of tens of seconds per batch size, so generate() leaves it off unless asked."""

    def __init__(self, model: GPT, caches: list, batch_size: int, cuda_graph: bool, compile: bool = False):
        self.model, self.caches, self.cuda_graph = model, caches, cuda_graph
        # compiled as a plain function of its inputs, so that later DecodeSteps of the same model and shapes
        # reuse the compiled code instead of compiling again for each new instance
        self.logits_fn = torch.compile(next_logits, dynamic=False) if compile else next_logits
        device = model.wte.weight.device
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1), the graph's input
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.graph, self.logits = None, None

    def step(self):
        return self.logits_fn(self.model, self.token, self.pos, self.caches)

    @torch.no_grad()
    def __call__(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        if token.shape != self.token.shape or token.device != self.token.device:
            raise ValueError(f"DecodeStep was made for tokens of shape {tuple(self.token.shape)} on "
                             f"{self.token.device}, got {tuple(token.shape)} on {token.device}")
        if not 0 <= pos < self.model.cfg.block_size:  # checked here: inside the step it is a tensor
            raise ValueError(f"cache overflow: position {pos} for caches of block_size {self.model.cfg.block_size}")
        self.token.copy_(token)
        self.pos.fill_(pos)
        if self.graph is not None:
            if self.autocast_state() != self.captured_under:  # the graph holds the casts it was captured with
                raise ValueError(f"DecodeStep's CUDA graph was captured with autocast (enabled, dtype) = "
                                 f"{self.captured_under}, now {self.autocast_state()}: make a new DecodeStep")
            self.graph.replay()
            return self.logits
        if not self.cuda_graph:
            return self.step()
        # The first call is a real step, run eagerly on a side stream (it also compiles Triton kernels and
        # lets cuBLAS pick its algorithms, which capture must not do); then the same step is recorded, which
        # executes nothing. autocast keeps no cache of cast weights inside a graph (their memory would be
        # freed under it).
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:
            logits = self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph, self.captured_under = torch.cuda.CUDAGraph(), self.autocast_state()
        with torch.cuda.graph(self.graph), autocast:
            self.logits = self.step()
        return logits

    @staticmethod
    def autocast_state():
        return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


# ----------------------------------------------------------------------------------------------------
# Trainer


@dataclass
class TrainConfig:
    # data
    task: str = field(default="tinystories", metadata={"help": "tinystories (language modelling), recall "
                                                               "(synthetic multi-query associative recall, MQAR) "
                                                               "or recall1 (the Hyena paper's single-query "
                                                               "recall: loss everywhere, accuracy on the query); "
                                                               "hyena.py",
                                                       "choices": ["tinystories", "recall", "recall1"]})
    recall_vocab: int = field(default=257, metadata={"help": "recall, recall1: vocabulary (filler or query marker "
                                                             "+ keys + values); it becomes the model's "
                                                             "--vocab-size"})
    recall_pairs: int = field(default=0, metadata={"help": "recall: key-value pairs per sequence "
                                                           "(0: seq_len / 8); recall1 fills the sequence"})
    data: str = field(default=None, metadata={"help": "TinyStories folder or file (.txt/.txt.xz); "
                                                      "default: $TINYSTORIES_DIR, out/data, or download"})
    download_mb: int = field(default=512, metadata={"help": "MiB of the train file to download (~130M tokens)"})
    lowercase: str = field(default="auto", metadata={"help": "lowercase the text: auto (val, when the train text "
                                                             "is all lowercase), on, off",
                                                     "choices": ["auto", "on", "off"]})
    cache_dir: str = field(default="out/tokens", metadata={"help": "where token caches are kept"})
    out_dir: str = field(default=None, metadata={"help": "checkpoints and metrics (default out/<arch>)"})
    # batch: global batch = batch_size sequences of seq_len tokens, split over grad_accum x GPUs
    seq_len: int = field(default=None, metadata={"help": "training sequence length (default block_size)"})
    batch_size: int = field(default=64, metadata={"help": "global batch in sequences: 32K tokens a step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per step (same global batch, less memory)"})
    # optimisation
    max_iters: int = field(default=3000, metadata={"help": "optimizer steps (~100M tokens at the defaults)"})
    lr: float = field(default=1.5e-3, metadata={"help": "peak learning rate; small models take a large one"})
    min_lr: float = field(default=1.5e-4, metadata={"help": "final learning rate, lr/10 (Chinchilla)"})
    warmup_iters: int = field(default=100, metadata={"help": "linear warmup steps, keeps early Adam steps sane"})
    lr_decay_iters: int = field(default=None, metadata={"help": "cosine ends here (default max_iters)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay on matrices only, as in GPT-3"})
    beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    beta2: float = field(default=0.95, metadata={"help": "Adam beta2; 0.95 is steadier than 0.999 for LMs"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm (0: off)"})
    reg: str = field(default="none", metadata={"help": "add a regulariser of consecutive hidden states "
                                                       "(linearity.py, paper Sec. 4)",
                                               "choices": ["none", "cosine", "mse"]})
    reg_weight: float = field(default=0.5, metadata={"help": "the regulariser's lambda (paper: 0.5)"})
    reg_pairs: str = field(default="blocks", metadata={"help": "the regulariser's consecutive pairs: blocks "
                                                               "(block i -> i+1) or all (also embedding -> "
                                                               "block 1); linearity.cosine_regulariser says why",
                                                       "choices": ["blocks", "all"]})
    seed: int = field(default=1337, metadata={"help": "seed for init and data order"})
    # evaluation and logging
    eval_interval: int = field(default=250, metadata={"help": "steps between val loss and checkpoint"})
    eval_batches: int = field(default=20, metadata={"help": "val batches (consecutive windows of the val set)"})
    log_interval: int = field(default=10, metadata={"help": "steps between log lines"})
    # system
    device: str = field(default="auto", metadata={"help": "cuda, cpu, or auto"})
    dtype: str = field(default="auto", metadata={"help": "bfloat16 autocast (auto on CUDA) or float32",
                                                 "choices": ["auto", "bfloat16", "float32"]})
    compile: str = field(default="auto", metadata={"help": "torch.compile the model (auto: on CUDA)",
                                                   "choices": ["auto", "on", "off"]})
    kernels: str = field(default="auto", metadata={"help": "Triton kernels of kernels.py instead of the plain "
                                                           "paths (auto: on CUDA)", "choices": ["auto", "on", "off"]})
    peak_tflops: float = field(default=None, metadata={"help": "device peak for MFU (default: looked up)"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/ckpt.pt"})
    overwrite: bool = field(default=False, metadata={"help": "train afresh into an --out-dir that holds a run "
                                                            "(refused without it); the old run's files stay "
                                                            "until the new run's first checkpoint replaces them"})
    # sampling
    sample: str = field(default=None, metadata={"help": "print samples for this prompt from out_dir/ckpt.pt"})
    num_samples: int = field(default=1, metadata={"help": "samples to print"})
    max_new_tokens: int = field(default=200, metadata={"help": "tokens per sample"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature (0: greedy)"})
    top_k: int = field(default=200, metadata={"help": "sample among the k likeliest tokens (0: all)"})

    @property
    def recall(self) -> bool:  # a synthetic recall task, not language modelling
        return self.task in ("recall", "recall1")


# A tiny configuration for --device cpu (for reading and debugging): seconds per run, not minutes.
# It applies to every setting not given on the command line.
CPU_TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=8, max_iters=60, lr=3e-3,
                min_lr=3e-4, warmup_iters=5, eval_interval=30, eval_batches=4, log_interval=10)

# Dense bf16 tensor-core peaks (TFLOP/s, datasheets) for MFU; --peak-tflops overrides.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
               ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.0),
               ("RTX 3090", 71.0)]


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then a cosine down to min_lr at lr_decay_iters, then flat."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_kernels(model: nn.Module, setting: str, device: torch.device, other_users: bool = False) -> bool:
    """Switch every module with a kernel path (attribute use_kernels) to it, or back to the plain path.
    other_users: the caller has a kernel path of its own (the cosine regulariser), so check Triton anyway."""
    on = setting == "on" or (setting == "auto" and device.type == "cuda")
    modules = [m for m in model.modules() if hasattr(m, "use_kernels")]
    needed = on and (modules or other_users)
    if needed and not kernels.HAVE_TRITON:
        raise UserError("--kernels on needs Triton (pip install triton), or use --kernels off")
    if needed and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("--kernels on needs a CUDA GPU (on a CPU, Triton's interpreter runs them when "
                        "TRITON_INTERPRET=1 is set: slow, for testing), or use --kernels off")
    for m in modules:
        m.use_kernels = on and m.kernel_supported
    if on:  # say which plain functions a reader's edit would not reach, and which modules stay plain
        replaced = sorted({name for m in modules if m.use_kernels for name in m.kernel_replaces})
        replaced += ["linearity.cosine_regulariser"] if other_users and all(m.use_kernels for m in modules) else []
        if replaced:
            print(f"kernels: kernels.py runs in place of {', '.join(replaced)} (to run edits of those: --kernels off)")
        plain = sorted({type(m).__name__ for m in modules if not m.use_kernels})
        if plain:
            print(f"note: kernels.py does not cover this configuration of {', '.join(plain)}: the plain path runs there")
    return on and all(m.use_kernels for m in modules)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    # Decay matrices only; norms' gains and any parameter marked no_weight_decay (e.g. Hyena's filter
    # parameters) are left alone, and any marked weight_decay (e.g. HC's dynamic vectors) is decayed.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            matrix = p.dim() >= 2 and not getattr(p, "no_weight_decay", False)
            (decay if matrix or getattr(p, "weight_decay", False) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def validate(mcfg: GPTConfig, cfg: TrainConfig, world_size: int):
    """Reject settings that cannot work, with a message that says which and why."""
    positive = {"n_layer": mcfg.n_layer, "n_head": mcfg.n_head, "n_embd": mcfg.n_embd,
                "block_size": mcfg.block_size, "mlp_ratio": mcfg.mlp_ratio, "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum, "seq_len": cfg.seq_len, "eval_interval": cfg.eval_interval,
                "eval_batches": cfg.eval_batches, "log_interval": cfg.log_interval,
                "max_new_tokens": cfg.max_new_tokens, "num_samples": cfg.num_samples,
                "download_mb": cfg.download_mb, "hc_rate": mcfg.hc_rate,
                "sinkhorn_iters": mcfg.sinkhorn_iters, "tpa_rank_q": mcfg.tpa_rank_q, "tpa_rank_k": mcfg.tpa_rank_k,
                "tpa_rank_v": mcfg.tpa_rank_v, "hyena_order": mcfg.hyena_order,
                "hyena_filter_width": mcfg.hyena_filter_width, "recall_vocab": cfg.recall_vocab}
    for name, value in positive.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    if ARCHS.get(mcfg.arch, ("", ""))[1] == "mhc" and mcfg.hc_rate < 2:
        raise UserError(f"--hc-rate {mcfg.hc_rate}: mhc needs at least 2 streams (its H_pre starts at 1/n = "
                        "sigmoid(b_pre), which for n = 1 needs b_pre = +inf); hc runs with 1")
    if mcfg.hyena_emb_dim < 3 or mcfg.hyena_emb_dim % 2 == 0:
        raise UserError(f"--hyena-emb-dim must be odd and at least 3 (1 + 2 bands; got {mcfg.hyena_emb_dim})")
    if not math.isfinite(mcfg.hyena_w):
        raise UserError(f"--hyena-w must be a finite number (got {mcfg.hyena_w})")
    for f in dataclasses.fields(GPTConfig):  # argparse checks the flags; this, configs built in code
        if "choices" in f.metadata and getattr(mcfg, f.name) not in f.metadata["choices"]:
            raise UserError(f"--{f.name.replace('_', '-')} must be one of {', '.join(f.metadata['choices'])} "
                            f"(got {getattr(mcfg, f.name)!r})")
    if mcfg.tpa_head_dim < 2 or mcfg.tpa_head_dim % 2:
        raise UserError(f"--tpa-head-dim must be even and at least 2 for RoPE (got {mcfg.tpa_head_dim})")
    non_negative = {"max_iters": cfg.max_iters, "warmup_iters": cfg.warmup_iters, "top_k": cfg.top_k,
                    "tpa_heads": mcfg.tpa_heads, "recall_pairs": cfg.recall_pairs}
    for name, value in non_negative.items():
        if value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more (got {value})")
    for name in ("lr", "min_lr", "weight_decay", "grad_clip", "temperature"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0 (got {value})")
    if cfg.lr == 0:
        raise UserError("--lr must be positive")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise UserError(f"--beta1 and --beta2 must be in [0, 1) (got {cfg.beta1}, {cfg.beta2})")
    if mcfg.n_embd % mcfg.n_head or (mcfg.n_embd // mcfg.n_head) % 2:
        raise UserError(f"--n-embd {mcfg.n_embd} must split into --n-head {mcfg.n_head} heads of even width")
    if cfg.seq_len is not None and cfg.seq_len > mcfg.block_size:
        raise UserError(f"--seq-len {cfg.seq_len} is longer than the model's --block-size {mcfg.block_size}")
    if cfg.task == "recall":
        seq_len = cfg.seq_len or mcfg.block_size
        pairs, keys = recall_pairs(cfg, seq_len), (cfg.recall_vocab - 1) // 2
        if pairs > keys or 4 * pairs > seq_len:
            raise UserError(f"recall: {pairs} pairs need at least {pairs} keys (--recall-vocab {cfg.recall_vocab} "
                            f"has {keys}) and --seq-len >= {4 * pairs} (got {seq_len})")
    if cfg.task == "recall1":
        seq_len = cfg.seq_len or mcfg.block_size
        if cfg.recall_pairs:
            raise UserError("--recall-pairs goes with --task recall; recall1 fills the sequence with pairs")
        if cfg.recall_vocab < 5 or seq_len < 4:
            raise UserError(f"recall1 needs --recall-vocab >= 5 (2 keys, 2 values, the query marker; got "
                            f"{cfg.recall_vocab}) and --seq-len >= 4 (a pair, the marker, the query; got {seq_len})")
    if cfg.batch_size % (cfg.grad_accum * world_size):
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by --grad-accum {cfg.grad_accum} "
                        f"x {world_size} process(es) = {cfg.grad_accum * world_size}")
    if cfg.reg != "none" and cfg.reg_pairs == "blocks" and mcfg.n_layer < 2:
        raise UserError(f"--reg {cfg.reg} --reg-pairs blocks needs at least 2 blocks (one block has no "
                        "block -> block pair); use --reg-pairs all")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in --out-dir and --overwrite replaces it: pass one of them")


def check_memory(mcfg: GPTConfig, micro_batch: int, seq_len: int, device: torch.device, dtype: str):
    """Refuse, before anything is allocated, a training step that cannot fit in the device's memory (on a
    CPU it would otherwise compute for minutes, then fail or be killed)."""
    # A lower bound, so that no run that fits is refused: weights, gradients and AdamW's two moments in
    # fp32 (16 bytes a parameter); the logits and their gradient (2 B T V values in the compute dtype);
    # and 16 values a token and channel per block kept for the backward (a plain block keeps ~18: norm
    # inputs, q k v, the MLP's 4C twice, ...). No T^2 term: SDPA keeps O(T) per head on GPUs and CPUs.
    with torch.device("meta"):  # counts the parameters without allocating them
        params = GPT(mcfg).num_params()
    size, tokens = (2 if dtype == "bfloat16" else 4), micro_batch * seq_len
    logits = 2 * size * tokens * mcfg.padded_vocab_size
    need = 16 * params + logits + 16 * size * tokens * mcfg.n_embd * mcfg.n_layer
    if device.type == "cuda":
        have, where = torch.cuda.mem_get_info(device)[1], torch.cuda.get_device_name(device)
    elif hasattr(os, "sysconf"):
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine"
    else:
        return
    if need > have:
        raise UserError(f"a training step needs at least {need / 2**30:,.0f} GiB (the logits of {micro_batch} x "
                        f"{seq_len} tokens alone {logits / 2**30:,.0f} GiB) but {where} has {have / 2**30:,.0f} "
                        "GiB: lower --batch-size (or raise --grad-accum), --seq-len or --block-size")


@torch.no_grad()
def evaluate(model, data, seq_len: int, micro_batch: int, n_batches: int, device, autocast,
             accuracy: str = ""):
    """Mean loss over consecutive, non-overlapping windows from the start of the validation set, so
    every evaluation of every run sees the same tokens. With accuracy "targets" (MQAR: every position
    whose target is not -1) or "last" (single-query recall: the final position only): (loss, fraction of
    those whose argmax prediction is right)."""
    model.eval()
    starts = range(0, len(data) - seq_len - 1, seq_len)[:n_batches * micro_batch]
    total, count, right, scored = 0.0, 0, 0, 0
    for i in range(0, len(starts), micro_batch):
        x, y = data.windows(starts[i:i + micro_batch], seq_len)
        x, y = x.to(device), y.to(device)
        with autocast:
            logits, loss = model(x, y)
        n = int((y != -1).sum())  # positions with a target (all of them for language modelling)
        total += loss.item() * n
        count += n
        if accuracy == "last":
            right += int((logits[:, -1].argmax(-1) == y[:, -1]).sum())
            scored += len(y)
        elif accuracy:
            right += int(((logits.argmax(-1) == y) & (y != -1)).sum())
            scored += n
    model.train()
    return (total / count, right / scored) if accuracy else total / count


def sample_text(model, enc, prompt: str, n: int, cfg: TrainConfig, device, autocast) -> list[str]:
    """Sample continuations of prompt. Stories start after EOT, as in training."""
    ids = [EOT] + enc.encode_ordinary(prompt)
    idx = torch.tensor([ids] * n, dtype=torch.long, device=device)
    with autocast:
        out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, stop_token=EOT)
    texts = []
    for row in out.tolist():
        new = row[len(ids):]
        new = new[:new.index(EOT)] if EOT in new else new
        texts.append(prompt + enc.decode(new))
    return texts


# ----------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, read with weights_only=True.

CKPT_FORMAT = 1


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_checkpoint(path: str, model, optimizer, mcfg: GPTConfig, cfg: TrainConfig, step: int, extra: dict):
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {"format": CKPT_FORMAT, "arch": mcfg.arch, "model_config": dataclasses.asdict(mcfg),
             "train_config": dataclasses.asdict(cfg), "step": step, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "rng": rng, **extra}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # readers see the old checkpoint or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, or None where matplotlib (an optional extra) is not
    installed; every plotting command of the repository asks here and says what it skips."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} (train first, or pass --out-dir)")
    try:
        with warnings.catch_warnings():  # torch's remarks on a foreign pickle: the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not torch's message: it advises weights_only=False, which runs the file's code
        raise UserError(f"{path} is unreadable: not a checkpoint of this project (train.py did not write "
                        "it, or it is cut short)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this trainer (format {CKPT_FORMAT})")
    return ckpt


# Settings added after checkpoints were first written: a saved config without them gets the behaviour
# its model was built with, whatever today's defaults are (so its parameters still fit).
LEGACY_MODEL_CONFIG = {"hyena_filter_init": "kaiming", "hyena_bias": "off", "hyena_pos_trainable": "off"}


def saved_model_config(model_config: dict) -> GPTConfig:
    return GPTConfig(**{**LEGACY_MODEL_CONFIG, **model_config})


def model_from_checkpoint(ckpt: dict, path: str) -> tuple[GPT, GPTConfig]:
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(ckpt["model_config"]) - names
    if unknown or ckpt["arch"] not in ARCHS:
        raise UserError(f"checkpoint {path} is for arch {ckpt['arch']!r} with settings this version does not "
                        f"know ({', '.join(sorted(unknown)) or 'unknown arch'})")
    mcfg = saved_model_config(ckpt["model_config"])
    model = GPT(mcfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit a {mcfg.arch} model of its own config: {e}")
    return model, mcfg


# ----------------------------------------------------------------------------------------------------
# Training: train() starts the processes, _train() is the run in six named steps; the pieces it uses
# follow it in the order it uses them.


def setup_distributed(cfg: TrainConfig):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single-process run."""
    if "RANK" not in os.environ:
        if cfg.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu"), 0, 1
        return torch.device(cfg.device), 0, 1
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return device, rank, world


@dataclass
class Proc:
    """This process of a run: its device, its rank among the `world` processes (torchrun starts one per
    GPU; a plain run is rank 0 of 1), and a log that prints on rank 0 only."""
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:  # rank 0 logs, tokenizes, and writes the run's files
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1

    def log(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)


def train(mcfg: GPTConfig, cfg: TrainConfig, explicit: set) -> int:
    proc = Proc(*setup_distributed(cfg))
    try:
        return _train(mcfg, cfg, explicit, proc)
    finally:
        if proc.ddp and dist.is_initialized():
            dist.destroy_process_group()


def _train(mcfg: GPTConfig, cfg: TrainConfig, explicit: set, proc: Proc) -> int:
    """One run, in six steps: the run folder (and the checkpoint on --resume), precision and batch, data,
    model and optimizer, the loop, the finish. explicit: the settings given on the command line."""
    log, device = proc.log, proc.device
    # 1. The run folder; on --resume the checkpoint, whose model config the run takes
    mcfg, ckpt, folder = open_run(mcfg, cfg, explicit, proc)
    if ckpt is not None and ckpt["step"] > cfg.max_iters:
        raise UserError(f"{folder.ckpt_path} is at step {ckpt['step']}, past --max-iters {cfg.max_iters}: pass a "
                        "larger --max-iters to continue it")
    if ckpt is not None and ckpt["step"] == cfg.max_iters:
        log(f"{folder.ckpt_path}: already finished at step {cfg.max_iters}; nothing to do (raise --max-iters to "
            "continue)")
        return 0

    # 2. Precision, and the global batch split over processes and micro-steps
    seq_len = cfg.seq_len or mcfg.block_size
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    micro_batch = cfg.batch_size // (cfg.grad_accum * proc.world)
    check_memory(mcfg, micro_batch, seq_len, device, dtype)

    # 3. The data
    train_data, val_data = load_data(cfg, seq_len, proc)

    # 4. The model and the optimizer (their state, and the RNG's, from the checkpoint on --resume)
    torch.manual_seed(cfg.seed)
    raw_model = GPT(mcfg).to(device)
    optimizer = make_optimizer(raw_model, cfg, device)
    start_step, best_val = 0, float("inf")
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, best_val = ckpt["step"], ckpt.get("best_val_loss", float("inf"))
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        folder.resume(start_step)
        log(f"resuming from {folder.ckpt_path} at step {start_step}")
        del ckpt
    use_kernels = set_kernels(raw_model, cfg.kernels, device, other_users=cfg.reg == "cosine")
    model = torch.compile(raw_model) if use_compile else raw_model
    if proc.ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    run = Run(mcfg=mcfg, cfg=cfg, proc=proc, folder=folder, seq_len=seq_len, micro_batch=micro_batch, dtype=dtype,
              autocast=autocast, use_compile=use_compile, use_kernels=use_kernels, train_data=train_data,
              val_data=val_data, model=model, raw_model=raw_model, optimizer=optimizer,
              regulariser=make_regulariser(cfg, use_kernels), best_val=best_val)
    folder.info = announce(run)  # run.json, written with the first checkpoint

    # 5. The loop; Ctrl-C stops it with a checkpoint
    if train_loop(run, start_step) == "stopped":
        return 130

    # 6. The finish: the best validation loss, and for TinyStories a sample story
    if proc.master:
        folder.close()
        if cfg.recall:
            log(f"best val loss {run.best_val:.4f}")
        else:
            story = sample_text(raw_model, get_tokenizer(), "", 1, cfg, device, autocast)[0]
            log(f"best val loss {run.best_val:.4f}. A sample story:\n{story.strip()}")
    return 0


class RunFolder:
    """The files of a run in --out-dir: ckpt.pt, metrics.jsonl, and run.json (what produced the run, for
    whoever reads its metrics later: compare.py's results table). Only rank 0 writes, and nothing before
    the first checkpoint: until then run.json and the metrics lines are held here, so a run that fails or
    is stopped before it leaves out_dir, and any run already there, as they were."""

    def __init__(self, out_dir: str, master: bool):
        self.out_dir, self.master = out_dir, master
        self.ckpt_path = os.path.join(out_dir, "ckpt.pt")
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.info = None  # run.json's contents
        self.pending, self.metrics = [], None  # metrics lines; the metrics file from the first checkpoint on
        self.last_good = None  # the step of the newest checkpoint (None: none was written)

    def held(self) -> list[str]:
        """The files (non-empty) of a run already in the folder."""
        return [p for p in (self.ckpt_path, self.metrics_path) if os.path.isfile(p) and os.path.getsize(p)]

    def resume(self, step: int):
        """Continue from the checkpoint at `step`: its metrics are kept, what was logged after it dropped."""
        if self.master and os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:
                self.pending = [line for line in f if json.loads(line)["step"] <= step]
        self.last_good = step

    def write_metrics(self, record: dict):
        if self.master and self.metrics is None:
            self.pending.append(json.dumps(record) + "\n")
        elif self.master:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def checkpoint(self, step: int, model, optimizer, mcfg: GPTConfig, cfg: TrainConfig, best_val: float):
        if self.master:
            os.makedirs(self.out_dir, exist_ok=True)
            save_checkpoint(self.ckpt_path, model, optimizer, mcfg, cfg, step, {"best_val_loss": best_val})
            if self.metrics is None:  # the first checkpoint: from here on the folder holds this run
                write_json_atomic(os.path.join(self.out_dir, "run.json"), self.info)
                self.metrics = open(self.metrics_path, "w")
                self.metrics.writelines(self.pending)
                self.metrics.flush()
        self.last_good = step

    def close(self):
        self.metrics.close()


def open_run(mcfg: GPTConfig, cfg: TrainConfig, explicit: set, proc: Proc):
    """(model config, checkpoint or None, RunFolder). The folder is --out-dir (default out/ARCH, or
    out/ARCH-TASK for recall); a run already there is continued (--resume) or replaced (--overwrite), never
    silently. A resumed run takes its checkpoint's model config; training settings may change (e.g.
    --max-iters). Then the settings are validated."""
    cfg.out_dir = cfg.out_dir or os.path.join("out", mcfg.arch + (f"-{cfg.task}" if cfg.recall else ""))
    if cfg.recall and not cfg.resume:
        mcfg.vocab_size = cfg.recall_vocab  # the task's tokens, not GPT-2's
    folder = RunFolder(cfg.out_dir, proc.master)
    held = folder.held()
    if held and not cfg.resume and not cfg.overwrite:
        raise UserError(f"{cfg.out_dir} holds a run ({', '.join(map(os.path.basename, held))}): continue it with "
                        "--resume, replace it with --overwrite, or pick another --out-dir")
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(folder.ckpt_path)
        saved = saved_model_config({k: v for k, v in ckpt["model_config"].items()
                                    if k in {f.name for f in dataclasses.fields(GPTConfig)}})
        clashes = [f"--{k.replace('_', '-')} {getattr(mcfg, k)} (checkpoint: {getattr(saved, k)})"
                   for k in explicit if hasattr(saved, k) and getattr(mcfg, k) != getattr(saved, k)]
        if clashes:
            raise UserError(f"checkpoint {folder.ckpt_path} was trained with another config: " + "; ".join(clashes))
        mcfg = saved  # the model is the checkpoint's; training settings may change (e.g. --max-iters)
        if "reg_pairs" not in explicit:  # but the regulariser's pairs stay (checkpoints without the key: all)
            cfg.reg_pairs = ckpt["train_config"].get("reg_pairs", "all")
    validate(mcfg, cfg, proc.world)
    return mcfg, ckpt, folder


def load_data(cfg: TrainConfig, seq_len: int, proc: Proc):
    """(train data, validation data): TinyStories tokens (data.py), or fresh synthetic recall sequences
    whose validation examples come from a disjoint seed range. Rank 0 tokenizes (once); the others wait
    for its cache, or its error."""
    paths, error = None, None
    if proc.master and not cfg.recall:
        try:
            train_text, val_text = resolve_text(cfg.data, os.path.join("out", "data"), cfg.download_mb, proc.log)
            proc.log(f"data: train {train_text}, validation {val_text or '(the held-out tail of the train file)'}")
            paths = prepare_tokens(train_text, val_text, cfg.cache_dir, cfg.lowercase, proc.log)
        except UserError as e:
            error = str(e)
    if proc.ddp:
        shared = [(paths, error)]
        dist.broadcast_object_list(shared, src=0)
        paths, error = shared[0]
    if error:
        raise UserError(error)
    if cfg.recall:
        train_data = RecallData(0, cfg.recall_vocab, recall_pairs(cfg, seq_len), cfg.task)
        val_data = RecallData(1 << 62, cfg.recall_vocab, recall_pairs(cfg, seq_len), cfg.task)
    else:
        train_data, val_data = TokenData(paths[0]), TokenData(paths[1])
    for split, d in (("train", train_data), ("validation", val_data)):
        if len(d) < seq_len + 1:
            raise UserError(f"the {split} set has {len(d)} tokens, fewer than --seq-len {seq_len} + 1")
    return train_data, val_data


def make_regulariser(cfg: TrainConfig, use_kernels: bool) -> Callable | None:
    """hidden states -> --reg's penalty (linearity.py), added to the LM loss with --reg-weight; None for none."""
    if cfg.reg == "cosine" and use_kernels:  # fused: one read of each pair of hidden states
        def regulariser(hidden):
            return kernels.cosine_regulariser(linearity.regularised_states(hidden, cfg.reg_pairs))
    elif cfg.reg != "none":
        def regulariser(hidden):
            return linearity.REGULARISERS[cfg.reg](hidden, cfg.reg_pairs)
    else:
        regulariser = None
    return regulariser


@dataclass
class Run:
    """What the loop works with, as _train's first steps assembled it."""
    mcfg: GPTConfig
    cfg: TrainConfig
    proc: Proc
    folder: RunFolder
    seq_len: int
    micro_batch: int  # sequences per micro-step of one process
    dtype: str
    autocast: contextlib.AbstractContextManager  # bf16 autocast, or a null context for fp32
    use_compile: bool
    use_kernels: bool
    train_data: TokenData | RecallData
    val_data: TokenData | RecallData
    model: nn.Module  # what the loop calls: raw_model, compiled and/or wrapped for DDP
    raw_model: GPT  # the model itself: checkpoints, evaluation and sampling use it
    optimizer: torch.optim.Optimizer
    regulariser: Callable | None
    best_val: float  # the best validation loss so far (checkpoints keep it)
    tokens_per_step: int = field(init=False)
    flops_per_step: float = field(init=False)  # training FLOPs of one step, all processes together
    peak: float | None = field(init=False)  # the GPU's peak TFLOP/s, for MFU (None: unknown)

    def __post_init__(self):
        self.tokens_per_step = self.cfg.batch_size * self.seq_len
        self.flops_per_step = self.raw_model.flops_per_token(self.seq_len) * self.tokens_per_step
        self.peak = peak_tflops(self.proc.device, self.cfg.peak_tflops)

    def checkpoint(self, step: int):
        self.folder.checkpoint(step, self.raw_model, self.optimizer, self.mcfg, self.cfg, self.best_val)


def announce(run: Run) -> dict:
    """Log the run's first two lines; return what run.json records about the run."""
    mcfg, cfg, device, world = run.mcfg, run.cfg, run.proc.device, run.proc.world
    log, raw_model, train_data, val_data = run.proc.log, run.raw_model, run.train_data, run.val_data
    log(f"arch {mcfg.arch}: {raw_model.num_params() / 1e6:.2f}M parameters, {mcfg.n_layer} layers, "
        f"width {mcfg.n_embd}, context {mcfg.block_size}")
    log(f"device {device}{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''} x {world}, "
        f"{run.dtype}, compile {'on' if run.use_compile else 'off'}, kernels {'on' if run.use_kernels else 'off'}; "
        f"batch {cfg.batch_size} x {run.seq_len} = "
        f"{run.tokens_per_step:,} tokens/step ({run.micro_batch} per micro-step, {cfg.grad_accum} micro-steps, "
        f"{world} process(es)); {cfg.max_iters} steps; "
        + (f"{cfg.task}: {train_data.n_pairs} pairs"
           f"{' (keys repeat), then one query' if cfg.task == 'recall1' else ''}, vocab {cfg.recall_vocab}, "
           f"chance {100 * recall_chance(cfg.recall_vocab):.1f}%" if cfg.recall
           else f"train {len(train_data):,} tokens, val {len(val_data):,}"))
    return {
        "arch": mcfg.arch, "params": raw_model.num_params(), "model_config": dataclasses.asdict(mcfg),
        "train_config": dataclasses.asdict(cfg), "tokens_per_step": run.tokens_per_step,
        "train_tokens": None if cfg.recall else len(train_data), "val_tokens": None if cfg.recall else len(val_data),
        "recall_chance": recall_chance(cfg.recall_vocab) if cfg.recall else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "world_size": world,
        "dtype": run.dtype, "compile": run.use_compile, "kernels": run.use_kernels, "torch": torch.__version__,
        "triton": getattr(kernels.triton, "__version__", None) if kernels.HAVE_TRITON else None}


def train_loop(run: Run, step: int) -> str:
    """Train from `step` to --max-iters: a log line every --log-interval steps, an evaluation and a
    checkpoint every --eval-interval. Ctrl-C stops it at the next step with a checkpoint ("stopped")."""
    cfg, proc, start_step = run.cfg, run.proc, step
    run.model.train()
    tally = Tally(proc.device)
    with StopRequest() as stop:
        while step < cfg.max_iters:
            lr = train_step(run, step, tally)
            step += 1
            log_now = step % cfg.log_interval == 0 or step == cfg.max_iters
            stop_now = stop.requested
            if proc.ddp and log_now:
                flag = torch.tensor(float(stop_now), device=proc.device)
                dist.all_reduce(flag)  # every rank stops at the same step, or none does
                stop_now = flag.item() > 0
            if log_now or stop_now:
                log_progress(run, step, lr, tally)
            if stop_now:
                run.checkpoint(step)
                proc.log(f"stopped at step {step}; checkpoint {run.folder.ckpt_path}; continue with the same command "
                         "and --resume" + (" in place of --overwrite" if cfg.overwrite else ""))
                return "stopped"
            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                tally.check_finite(run.folder)
                t_eval = time.time()
                evaluate_and_checkpoint(run, step)
                tally.since += time.time() - t_eval  # evaluation time is not training time
    if step == start_step:  # nothing to train (--max-iters 0): still evaluate and checkpoint the model
        evaluate_and_checkpoint(run, step)
    return "finished"


class StopRequest:
    """Ctrl-C sets a flag; the loop stops at the next step boundary and writes a checkpoint.
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to abort)",
              flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


class Tally:
    """What the loop adds up between two log lines, on the device (no step waits for the GPU): the LM loss
    alone and the regulariser, summed over the steps, and the first step whose loss was NaN or infinite
    (-1: none), checked at every log line and before any checkpoint, so a checkpoint never holds a
    diverged model."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)
        self.reg = torch.zeros((), device=device)
        self.steps, self.since = 0, time.time()  # steps since the last log line, and its time

    def check_finite(self, folder: RunFolder):
        bad = int(self.first_bad.item())
        if bad >= 0:
            where = f"step {folder.last_good}" if folder.last_good is not None else "none was written"
            raise UserError(f"the loss became NaN or infinite at step {bad}: stopping. The last good checkpoint "
                            f"is kept ({where}; {folder.ckpt_path}). Try a lower --lr or stronger --grad-clip")


def train_step(run: Run, step: int, tally: Tally) -> float:
    """One optimizer step on this process's share of the global batch of `step`, in --grad-accum
    micro-steps; returns the step's learning rate."""
    cfg, model, device = run.cfg, run.model, run.proc.device
    lr = lr_at(step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    starts = run.train_data.train_starts(cfg.seed, step, cfg.batch_size, run.seq_len)
    for micro in range(cfg.grad_accum):
        first = (run.proc.rank * cfg.grad_accum + micro) * run.micro_batch
        x, y = run.train_data.windows(starts[first:first + run.micro_batch].tolist(), run.seq_len)
        if device.type == "cuda":  # pinned host memory lets the copy overlap the previous step
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        sync = not run.proc.ddp or micro == cfg.grad_accum - 1  # DDP all-reduces on the last micro-step
        with (contextlib.nullcontext() if sync else model.no_sync()), run.autocast:
            if run.regulariser is None:
                _, lm_loss = model(x, y)
                loss = lm_loss
            else:  # loss = LM loss + lambda * regulariser(hidden states)
                _, lm_loss, hidden = model(x, y, return_hidden=True)
                reg = run.regulariser(hidden)
                loss = lm_loss + cfg.reg_weight * reg
                tally.reg += reg.detach() / cfg.grad_accum
            loss = loss / cfg.grad_accum
        loss.backward()
        tally.loss += lm_loss.detach() / cfg.grad_accum
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    tally.first_bad.copy_(torch.where((tally.first_bad < 0) & ~torch.isfinite(tally.loss), step + 1, tally.first_bad))
    tally.steps += 1
    return lr


def log_progress(run: Run, step: int, lr: float, tally: Tally):
    """The log line and metrics record of the steps since the last one (losses averaged over processes)."""
    cfg, proc = run.cfg, run.proc
    if proc.ddp:
        dist.all_reduce(tally.loss, op=dist.ReduceOp.AVG)
        dist.all_reduce(tally.reg, op=dist.ReduceOp.AVG)
    loss_value = tally.loss.item() / tally.steps  # .item() waits for the GPU: timing is honest
    tally.check_finite(run.folder)
    dt = (time.time() - tally.since) / tally.steps
    tflops = run.flops_per_step / dt / proc.world / 1e12
    record = {"step": step, "loss": loss_value, "lr": lr, "ms_per_step": 1000 * dt,
              "tokens_per_s": run.tokens_per_step / dt, "tflops_per_gpu": tflops}
    line = (f"step {step:5d} | loss {loss_value:.4f} | lr {lr:.2e} | {1000 * dt:7.1f} ms/step | "
            f"{run.tokens_per_step / dt:10,.0f} tok/s | {tflops:6.2f} TFLOP/s")
    if run.peak:
        record["mfu"] = tflops / run.peak
        line += f" | MFU {100 * tflops / run.peak:4.1f}%"
    if proc.device.type == "cuda":
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(proc.device) / 2**30
        line += f" | mem {record['peak_mem_gib']:.1f} GiB"
    if run.regulariser is not None:
        record["reg"] = tally.reg.item() / tally.steps
        line += f" | {cfg.reg} reg {record['reg']:.4f}"
        tally.reg.zero_()
    proc.log(line)
    run.folder.write_metrics(record)
    tally.loss.zero_()
    tally.since, tally.steps = time.time(), 0


def evaluate_and_checkpoint(run: Run, step: int):
    """The validation loss (recall: and accuracy), hc/mhc's residual gains, then a checkpoint."""
    cfg, raw_model, device, log = run.cfg, run.raw_model, run.proc.device, run.proc.log
    val_loss = evaluate(raw_model, run.val_data, run.seq_len, run.micro_batch, cfg.eval_batches, device, run.autocast,
                        accuracy={"recall": "targets", "recall1": "last"}.get(cfg.task, ""))
    if cfg.recall:
        val_loss, accuracy = val_loss
        log(f"step {step}: val loss {val_loss:.4f}, recall accuracy {100 * accuracy:.1f}%")
        run.folder.write_metrics({"step": step, "val_loss": val_loss, "recall_accuracy": accuracy})
    else:
        log(f"step {step}: val loss {val_loss:.4f}")
        run.folder.write_metrics({"step": step, "val_loss": val_loss})
    run.best_val = min(run.best_val, val_loss)
    if hasattr(raw_model.stream, "diagnostics"):  # hc/mhc: how much the residual mixing amplifies
        x, _ = run.val_data.windows(range(0, 8 * run.seq_len, run.seq_len), run.seq_len)  # 8 validation sequences
        with run.autocast:
            d = raw_model.stream.diagnostics(raw_model, x.to(device))
        log(f"step {step}: residual gain (Amax) of the composite of {len(d['layer_gain_fwd'])} sub-layers: "
            f"forward {d['gain_fwd']:.3f}, backward {d['gain_bwd']:.3f}; largest single sub-layer: forward "
            f"{max(d['layer_gain_fwd']):.3f}, backward {max(d['layer_gain_bwd']):.3f}; column sums in "
            f"[{d['col_sum_min']:.3f}, {d['col_sum_max']:.3f}]")
        run.folder.write_metrics({"step": step, **d})
    run.checkpoint(step)


def sample_main(mcfg: GPTConfig, cfg: TrainConfig) -> int:
    validate(mcfg, cfg, 1)
    out_dir = cfg.out_dir or os.path.join("out", mcfg.arch)
    path = os.path.join(out_dir, "ckpt.pt")
    model, mcfg = model_from_checkpoint(load_checkpoint(path), path)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    model.to(device)
    set_kernels(model, cfg.kernels, device)  # TPA decodes from its factor cache with kernels.tpa_decode
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    torch.manual_seed(cfg.seed)
    enc = get_tokenizer()
    for i, text in enumerate(sample_text(model, enc, cfg.sample, cfg.num_samples, cfg, device, autocast)):
        print(f"--- sample {i + 1} ({mcfg.arch}, {path})\n{text.strip()}")
    return 0


# ----------------------------------------------------------------------------------------------------
# Command line: every field of GPTConfig and TrainConfig is a flag (--n-layer, --lr, ...).


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train or sample the tiny GPT of this repository on TinyStories (benchmark: bench.py gpt).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        allow_abbrev=False)  # a typo such as --max-iter is an error, not a prefix of --max-iters
    for title, cls in (("model", GPTConfig), ("training", TrainConfig)):
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kwargs = {"help": f.metadata["help"]}
            if not suppress_defaults:
                kwargs["default"] = f.default
            if f.name == "arch":
                kwargs["choices"] = list(ARCHS)
            elif "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            if f.type in (bool, "bool"):
                kwargs["action"] = "store_true"
            else:
                kwargs["type"] = {"int": int, "float": float, "str": str}[str(f.type).split()[0]]
                if "choices" not in kwargs:  # with choices, argparse's {a,b,c} says what to type
                    kwargs["metavar"] = f.name.upper()
            group.add_argument(flag, dest=f.name, **kwargs)
    return parser


def parse_args(argv=None, tiny: dict = CPU_TINY):
    """(model config, training config, the names given on the command line). On a CPU, `tiny`'s settings
    for what was not given (bench.py gpt passes the model's and the batch's only)."""
    args = vars(build_parser().parse_args(argv))
    explicit = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    model_names = {f.name for f in dataclasses.fields(GPTConfig)}
    mcfg = GPTConfig(**{k: v for k, v in args.items() if k in model_names})
    cfg = TrainConfig(**{k: v for k, v in args.items() if k not in model_names})
    wants_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if wants_cpu and not cfg.sample:
        tiny = {k: v for k, v in tiny.items() if k not in explicit}
        for k, v in tiny.items():
            setattr(mcfg if k in model_names else cfg, k, v)
        if tiny:
            print(f"CPU: using the tiny configuration for what was not given ({', '.join(f'{k}={v}' for k, v in tiny.items())})")
    return mcfg, cfg, explicit


def check_device(name: str):
    """--device names a device torch has here (before any run, sample or benchmark builds on it)."""
    if name in ("auto", "cpu"):
        return
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (cuda, cpu or auto)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu or auto")


# The benchmark's flags moved to bench.py (python bench.py gpt): each old flag -> its name there.
MOVED_TO_BENCH = {"--bench": "", "--bench-steps": "--steps", "--bench-no-reference": "--no-reference",
                  "--profile": "--profile"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.partition("=")[0] in MOVED_TO_BENCH for a in argv):
        new = [MOVED_TO_BENCH.get(a, a) for a in argv if a != "--bench"]
        print(f"error: train.py --bench moved to bench.py: python bench.py gpt {' '.join(new)}", file=sys.stderr)
        return 2
    mcfg, cfg, explicit = parse_args(argv)

    def run():
        check_device(cfg.device)
        return sample_main(mcfg, cfg) if cfg.sample is not None else train(mcfg, cfg, explicit)
    return run_command(run)


def run_command(run: Callable[[], int | None]) -> int:
    """The tail of a command line (train.py's, bench.py's): a UserError or Ctrl-C ends in one line."""
    try:
        return run() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
