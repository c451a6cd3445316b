"""
data.py -- the data of train.py: TinyStories (Eldan & Li 2023) as GPT-2 tokens, and the synthetic recall tasks.

    TokenData(path)     a memmapped uint16 token file (one per split) and the batches drawn from it
    RecallData(...)     associative recall sequences (hyena.py) behind the same interface
    prepare_tokens(...) tokenize a train and a validation text once, cached by their content

Where the text comes from, in this order (resolve_text):
  1. --data PATH: a folder with a train and a validation file, or a single file (its last ~1% of
     stories is then held out for validation); .txt or .txt.xz;
  2. the folder in the environment variable TINYSTORIES_DIR;
  3. out/data, where earlier downloads were kept;
  4. a download from the Hugging Face dataset: the whole validation file and a story-aligned prefix
     of the 2.2 GB train file (--download-mb).
Text is tokenized once; the tokens are cached under --cache-dir, keyed by the text's content. A token
file is EOT story EOT story ...: every story starts after an EOT.

Notation (shape comments use these letters)
    N   sequences (windows) in a batch     T   sequence length (tokens)
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import time
import urllib.error
import urllib.request

import numpy as np
import torch

import hyena


class UserError(Exception):
    """A problem with the user's input or data: printed as one clear message, exit code 1."""


HF_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
HF_TRAIN_FILE = "TinyStoriesV2-GPT4-train.txt"
HF_VAL_FILE = "TinyStoriesV2-GPT4-valid.txt"
EOT_TEXT = "<|endoftext|>"
EOT = 50256  # GPT-2's <|endoftext|>; we put it before every story, so it also marks "a story starts"
TOKEN_FORMAT = 1  # bump when the tokenization below changes, so old caches are not reused
READ_CHUNK = 1 << 24  # characters of text read at a time while streaming stories
DETECT_CHARS = 1 << 20  # characters read to tell how stories are separated


def get_tokenizer():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline and no cached BPE files
        raise UserError(
            f"could not load tiktoken's GPT-2 encoding ({type(e).__name__}: {e}). Without internet, set "
            "TIKTOKEN_CACHE_DIR to a folder holding the GPT-2 BPE files (e.g. ../shared/tiktoken_cache)")


def open_text(path: str):
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def story_separator(sample: str) -> str | None:
    """How stories are delimited in a file, judged from its first chunk of text.

    'eot'   : a line <|endoftext|> between stories (the official files)
    'line'  : one story per line, "\\n\\n" between paragraphs (the lowercased train sample in shared/)
    None    : unknown (e.g. "\\n\\n" between both paragraphs and stories): the file is one text
    A single newline separates stories only if there are many of them compared with paragraph breaks.
    """
    if EOT_TEXT in sample:
        return "eot"
    single = len(re.findall(r"(?<!\n)\n(?!\n)", sample.rstrip("\n")))
    double = sample.count("\n\n")
    if single > 0 and single >= 0.1 * double:
        return "line"
    return None


def iter_stories(path: str, chunk_chars: int = READ_CHUNK):
    """Yield (separator, story) for each story of a text file, streaming it chunk by chunk."""
    with open_text(path) as f:
        sep = story_separator(f.read(DETECT_CHARS))
    with open_text(path) as f:
        if sep is None:  # boundaries unknown: the whole file is one document (kept whole, not split)
            text = f.read().strip()
            if text:
                yield sep, text
            return
        buf = f.read(chunk_chars)
        pattern = re.escape(EOT_TEXT) if sep == "eot" else r"(?<!\n)\n(?!\n)"
        while True:
            more = f.read(chunk_chars)
            # A story may continue in the next chunk, and trailing newlines may be half of a "\n\n":
            # split only the part up to the last non-newline character, and carry the last piece.
            cut = len(buf) if not more else len(buf.rstrip("\n"))
            pieces = re.split(pattern, buf[:cut])
            carry = pieces.pop() + buf[cut:]
            for story in pieces:
                story = story.strip()
                if story:
                    yield sep, story
            if not more:
                if carry.strip():
                    yield sep, carry.strip()
                return
            buf = carry + more


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tokenize_file(path: str, out_path: str, lowercase: bool, enc, log=print) -> dict:
    """Tokenize the stories of one text file into uint16 tokens: EOT story EOT story ..."""
    n_tokens, n_stories, n_chars, has_upper, sep_seen = 0, 0, 0, False, None
    t0, last_report = time.time(), time.time()
    threads = max(1, min(8, os.cpu_count() or 1))

    def flush(batch, f):
        nonlocal n_tokens
        for ids in enc.encode_ordinary_batch(batch, num_threads=threads):
            arr = np.array([EOT] + ids, dtype=np.uint16)
            arr.tofile(f)
            n_tokens += arr.size

    with open(out_path, "wb") as f:
        batch = []
        for sep, story in iter_stories(path):
            sep_seen = sep
            has_upper = has_upper or story != story.lower()
            batch.append(story.lower() if lowercase else story)
            n_stories += 1
            n_chars += len(story)
            if len(batch) >= 2048:
                flush(batch, f)
                batch = []
                if time.time() - last_report > 5:
                    last_report = time.time()
                    log(f"  tokenizing {os.path.basename(path)}: {n_chars / 1e6:.0f}M characters, "
                        f"{n_tokens / 1e6:.1f}M tokens, {time.time() - t0:.0f}s")
        if batch:
            flush(batch, f)
    if n_stories == 0:
        raise UserError(f"no text found in {path}: the file is empty")
    return {"tokens": n_tokens, "stories": n_stories, "separator": sep_seen, "has_upper": has_upper}


def find_text_files(folder: str) -> tuple[str, str]:
    names = sorted(n for n in os.listdir(folder) if n.endswith((".txt", ".txt.xz")))

    def pick(kind, words):
        found = [n for n in names if any(w in n.lower() for w in words)]
        if len(found) != 1:
            what = "no" if not found else f"{len(found)} ({', '.join(found)})"
            raise UserError(
                f"found {what} {kind} text files in {folder} (looked for .txt/.txt.xz names containing "
                f"{' or '.join(repr(w) for w in words)}; the folder holds: {', '.join(names) or 'nothing'}). "
                "Pass a single file with --data, or a folder with exactly one train and one validation file")
        return os.path.join(folder, found[0])

    return pick("train", ["train"]), pick("validation", ["valid", "val"])


def download(url: str, dest: str, max_bytes: int | None = None, log=print):
    """Download url (its first max_bytes bytes) to dest. Bytes arrive in dest + '.part'; an interrupted
    download resumes from there on the next run (HTTP Range), or restarts if the server cannot resume.
    Only a complete download is renamed to dest, so a partial file is never taken for a complete one."""
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if max_bytes is not None and have > max_bytes:
        have = 0
    request = urllib.request.Request(url, headers={"User-Agent": "tinygpt-educational/1.0"})
    if have or max_bytes is not None:
        end = "" if max_bytes is None else str(max_bytes - 1)
        request.add_header("Range", f"bytes={have}-{end}")
    with urllib.request.urlopen(request, timeout=60) as response:
        resumed = response.status == 206 and have > 0
        if not resumed:
            have = 0  # the server sent the file from its start
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        if max_bytes is not None and total is not None:
            total = min(total, max_bytes)
        log(f"downloading {url} -> {dest}" + (f" ({total / 2**20:.0f} MiB" if total else " (")
            + (f", resuming at {have / 2**20:.0f} MiB)" if resumed else ")"))
        t0, last = time.time(), 0.0
        with open(part, "ab" if resumed else "wb") as f:
            while max_bytes is None or have < max_bytes:
                want = 1 << 20 if max_bytes is None else min(1 << 20, max_bytes - have)
                block = response.read(want)
                if not block:
                    break
                f.write(block)
                have += len(block)
                if time.time() - last > 2:
                    last = time.time()
                    rate = have / 2**20 / max(time.time() - t0, 1e-9)
                    log(f"  {have / 2**20:.0f}" + (f"/{total / 2**20:.0f}" if total else "")
                        + f" MiB, {rate:.1f} MiB/s")
    if total is not None and have < total:
        raise UserError(f"download of {url} stopped at {have} of {total} bytes; rerun to resume")
    os.replace(part, dest)


def download_tinystories(data_dir: str, train_mb: int, base_url: str, log=print) -> tuple[str, str]:
    """The validation file, and the first train_mb MiB of the train file cut at a story boundary."""
    os.makedirs(data_dir, exist_ok=True)
    val = os.path.join(data_dir, HF_VAL_FILE)
    train = os.path.join(data_dir, f"TinyStoriesV2-GPT4-train-{train_mb}MB.txt")
    try:
        if not os.path.exists(val):
            download(base_url + HF_VAL_FILE, val, log=log)
        if not os.path.exists(train):
            raw = train + ".raw"
            if not os.path.exists(raw):
                download(base_url + HF_TRAIN_FILE, raw, max_bytes=train_mb * 2**20, log=log)
            with open(raw, "rb") as f:
                data = f.read()
            end = data.rfind(EOT_TEXT.encode())  # keep whole stories only
            if end <= 0:
                raise UserError(f"{raw} holds no complete story; delete it and rerun")
            with open(train + ".tmp", "wb") as f:
                f.write(data[:end] + EOT_TEXT.encode() + b"\n")
            os.replace(train + ".tmp", train)
            os.remove(raw)
    except urllib.error.HTTPError as e:  # the server answered, but not with the file
        raise UserError(f"downloading TinyStories failed: {e}") from e
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:  # no network, no server
        raise UserError(
            f"no TinyStories text found and the download failed ({e}). Either connect to the internet "
            f"and rerun (it downloads to {data_dir}), or point --data or TINYSTORIES_DIR at a folder "
            "holding TinyStories train and validation files (.txt or .txt.xz), e.g. ../shared/tinystories"
        ) from e
    return train, val


def resolve_text(data: str | None, data_dir: str, download_mb: int, log=print) -> tuple[str, str | None]:
    """(train file, validation file or None for 'hold out the tail of the train file')."""
    if data:
        if not os.path.exists(data):
            raise UserError(f"--data {data}: no such file or folder")
        if os.path.isdir(data):
            return find_text_files(data)
        return data, None
    env = os.environ.get("TINYSTORIES_DIR")
    if env:
        if not os.path.isdir(env):
            raise UserError(f"TINYSTORIES_DIR={env} is not a folder")
        return find_text_files(env)
    train = os.path.join(data_dir, f"TinyStoriesV2-GPT4-train-{download_mb}MB.txt")
    val = os.path.join(data_dir, HF_VAL_FILE)
    if os.path.exists(train) and os.path.exists(val):
        return train, val
    base_url = os.environ.get("TINYSTORIES_URL", HF_URL)  # a mirror, or a local server in the tests
    return download_tinystories(data_dir, download_mb, base_url, log=log)


def check_token_file(path: str, meta: dict):
    if not os.path.exists(path):
        raise UserError(f"token cache {os.path.dirname(path)} is missing {os.path.basename(path)}")
    size, want = os.path.getsize(path), 2 * meta["tokens"]
    if size != want:
        raise UserError(f"token cache file {path} is truncated or corrupt ({size} bytes, expected {want}); "
                        f"delete {os.path.dirname(path)} to rebuild it")
    if file_digest(path) != meta["sha256"]:
        raise UserError(f"token cache file {path} is corrupt (checksum mismatch); "
                        f"delete {os.path.dirname(path)} to rebuild it")


def prepare_tokens(train_text: str, val_text: str | None, cache_dir: str, lowercase: str = "auto",
                   log=print) -> tuple[str, str]:
    """Tokenize once and cache; returns the paths of train.bin and val.bin.

    lowercase: 'on', 'off' or 'auto' (lowercase the validation text when the training text has no
    uppercase letter, as for shared/'s lowercased train sample, so train and validation match)."""
    key_src = [TOKEN_FORMAT, "gpt2", lowercase, file_digest(train_text),
               file_digest(val_text) if val_text else "holdout"]
    key = hashlib.sha256(json.dumps(key_src).encode()).hexdigest()[:16]
    name = re.sub(r"\.txt(\.xz)?$", "", os.path.basename(train_text))
    folder = os.path.join(cache_dir, f"{name}-{key}")
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            splits = meta["splits"]
        except (ValueError, KeyError) as e:
            raise UserError(f"token cache {folder} is corrupt ({meta_path}: {e}); delete it to rebuild it")
        for split in ("train", "val"):
            check_token_file(os.path.join(folder, f"{split}.bin"), splits[split])
        log(f"tokens: cached in {folder} (train {splits['train']['tokens']:,}, val {splits['val']['tokens']:,})")
        return os.path.join(folder, "train.bin"), os.path.join(folder, "val.bin")
    if os.path.exists(folder):
        raise UserError(f"token cache {folder} has no meta.json (an interrupted build?); delete it to rebuild it")

    enc = get_tokenizer()
    tmp = f"{folder}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    try:
        log(f"tokenizing {train_text} (once; cached in {folder})")
        lower_train = lowercase == "on"
        train_meta = tokenize_file(train_text, os.path.join(tmp, "train.bin"), lower_train, enc, log)
        if val_text is None:
            train_meta, val_meta = hold_out_tail(os.path.join(tmp, "train.bin"), os.path.join(tmp, "val.bin"))
            log(f"  no validation file: held out the last {val_meta['tokens']:,} tokens of the train file")
        else:
            lower_val = lowercase == "on" or (lowercase == "auto" and not train_meta["has_upper"])
            if lower_val and lowercase == "auto":
                log("  the training text has no uppercase letters: lowercasing the validation text to match")
            val_meta = tokenize_file(val_text, os.path.join(tmp, "val.bin"), lower_val, enc, log)
            if val_meta["separator"] is None:
                log(f"  {os.path.basename(val_text)}: story boundaries unknown, tokenized as one text")
        for split, meta in (("train", train_meta), ("val", val_meta)):
            meta["sha256"] = file_digest(os.path.join(tmp, f"{split}.bin"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"source": {"train": train_text, "val": val_text}, "key": key_src,
                       "splits": {"train": train_meta, "val": val_meta}}, f, indent=1)
        try:
            os.rename(tmp, folder)  # the cache appears complete or not at all
        except OSError:
            if not os.path.exists(meta_path):
                raise
            log(f"tokens: another process built {folder} first; using it")  # runs started side by side
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"tokens: train {train_meta['tokens']:,}, val {val_meta['tokens']:,}")
    return os.path.join(folder, "train.bin"), os.path.join(folder, "val.bin")


def hold_out_tail(train_path: str, val_path: str, fraction: float = 0.01) -> tuple[dict, dict]:
    """Split one token file at the first story start (EOT) after the last `fraction` of its tokens."""
    tokens = np.fromfile(train_path, dtype=np.uint16)
    at = int(len(tokens) * (1 - fraction))
    eots = np.flatnonzero(tokens[at:] == EOT)
    split = at + int(eots[0]) if len(eots) else at  # no later story start: cut mid-text
    if split <= 0 or split >= len(tokens):
        raise UserError(f"{train_path}: too little text to hold out a validation tail")
    tokens[split:].tofile(val_path)
    tokens[:split].tofile(train_path)
    return {"tokens": split}, {"tokens": len(tokens) - split}


class TokenData:
    """A memmapped uint16 token file and the batches drawn from it."""

    def __init__(self, path: str):
        self.path = path
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")

    def __len__(self):
        return len(self.tokens)

    def windows(self, starts, seq_len: int):
        """Inputs x and next-token targets y, each (len(starts), seq_len) int64."""
        xy = np.stack([self.tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)  # (N, T+1)
        xy = torch.from_numpy(xy)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()

    def train_starts(self, seed: int, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
        # The global batch of a step is a function of (seed, step) alone: a resumed run draws the same
        # data as an uninterrupted one, and any number of GPUs splits the same global batch.
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return torch.randint(len(self) - seq_len - 1, (batch_size,), generator=g)


class RecallData:
    """Synthetic associative recall behind TokenData's interface: task "recall" (MQAR,
    hyena.recall_example, n_pairs pairs) or "recall1" (single query, hyena.recall_single_query_example;
    n_pairs unused). Example number i of a split is always the same sequence, so runs and evaluations are
    reproducible."""

    def __init__(self, split_seed: int, vocab_size: int, n_pairs: int, task: str = "recall"):
        self.split_seed, self.vocab_size, self.n_pairs, self.task = split_seed, vocab_size, n_pairs, task

    def __len__(self):
        return 1 << 40  # examples are generated on demand

    def windows(self, starts, seq_len: int):
        gens = (torch.Generator().manual_seed(self.split_seed + int(i)) for i in starts)
        if self.task == "recall1":
            pairs = [hyena.recall_single_query_example(seq_len, self.vocab_size, g) for g in gens]
        else:
            pairs = [hyena.recall_example(seq_len, self.vocab_size, self.n_pairs, g) for g in gens]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])  # (N, T) each

    def train_starts(self, seed: int, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
        return (seed * 1_000_003 + step) * batch_size + torch.arange(batch_size)


def recall_pairs(cfg, seq_len: int) -> int:
    """Key-value pairs per sequence: --recall-pairs (or seq_len / 8) for MQAR; recall1 fills the sequence
    up to the marker and the query."""
    if cfg.task == "recall1":
        return (seq_len - 2) // 2
    return cfg.recall_pairs or max(1, seq_len // 8)


def recall_chance(vocab_size: int) -> float:
    """Accuracy of guessing a value uniformly: both recall tasks have (vocab_size - 1) // 2 values."""
    return 1 / max(1, (vocab_size - 1) // 2)
