#!/usr/bin/env python3
"""Stand-in decoders that read their context: tokenizers, a lean training loop, probe, grid.

The quality benchmark needs frozen decoders that copy text they have just seen, as real
LLMs do (ARC's reconstruction objective relies on it). This script trains them on the
corpus of ``decoder_corpus.py`` with a plain PyTorch loop (bf16 autocast, ``torch.compile``,
fused AdamW, batches sampled on the device: at these sizes a framework's per-step overhead
would dominate) and measures them with ``arc_encoder.probe`` while they train.

Steps (``--help`` on each)::

    tokenizer  train split -> byte-level BPE tokenizer (tokenizers library)
    tokenize   corpus splits -> uint16 token arrays ([BOS] doc [EOS] per file)
    train      one decoder (preset A: Llama, B: GPT-NeoX; --set key=value overrides),
               probe + validation loss logged to JSON every probe_every steps;
               --save DIR writes save_pretrained (bf16) + tokenizer
    probe      gates of a saved decoder on held-out text; exit 1 when one is missed
    grid       several `train` runs at once (separate processes on one GPU)
    plot       probe curves of train logs -> PNG

Recipe, grid and results: benchmarks/README.md, "Stand-in decoders that read their context".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the repository, when not installed

from arc_encoder.probe import ProbeConfig, heldout_windows, probe_decoder  # noqa: E402
from arc_encoder.storage import atomic_write_json  # noqa: E402
from arc_encoder.tiny import tiny_causal_lm, tiny_config, train_tokenizer  # noqa: E402
from decoder_corpus import SPLITS, read_split  # noqa: E402

Family = Literal["llama", "gpt_neox", "qwen3"]
DataMix = Literal["all", "doc", "code", "synthetic"]
Planted = Literal["none", "text", "random", "both"]
KIND_IDS = {"doc": 0, "code": 1}


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_sample(corpus: str | Path, max_chars: int) -> list[str]:
    """Train-split texts in a fixed hash order of their ids, up to ``max_chars`` characters."""
    recs = sorted(read_split(corpus, "train"), key=lambda r: hashlib.sha256(r["id"].encode()).digest())
    out, total = [], 0
    for r in recs:
        if total >= max_chars:
            break
        out.append(r["text"])
        total += len(r["text"])
    return out


def cmd_tokenizer(args) -> int:
    t0 = time.time()
    texts = tokenizer_sample(args.corpus, args.max_chars)
    tok = train_tokenizer(texts, vocab_size=args.vocab_size)
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(tmp), out)
    sha = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    print(f"tokenizer: vocab {len(tok)} from {len(texts)} train files ({sum(map(len, texts)):,} chars) "
          f"in {time.time() - t0:.0f} s -> {out} (tokenizer.json sha256 {sha})")
    return 0


# ----------------------------------------------------------------------------- tokenize
_TOK = None


def _init_worker(path: str) -> None:
    global _TOK
    from tokenizers import Tokenizer

    _TOK = Tokenizer.from_file(path)


def _encode(text: str) -> np.ndarray:
    return np.asarray(_TOK.encode(text, add_special_tokens=False).ids, dtype=np.uint16)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def cmd_tokenize(args) -> int:
    import multiprocessing as mp

    tok = load_tokenizer(args.tokenizer)
    if len(tok) > 65535:
        raise SystemExit("error: vocabularies over 65535 ids do not fit uint16 token arrays")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {"tokenizer": str(args.tokenizer), "vocab_size": len(tok),
                   "tokenizer_sha256": hashlib.sha256((Path(args.tokenizer) / "tokenizer.json").read_bytes()).hexdigest()}
    t0 = time.time()
    with mp.get_context("fork").Pool(args.workers, _init_worker, (str(Path(args.tokenizer) / "tokenizer.json"),)) as pool:
        for split in args.splits:
            recs = list(read_split(args.corpus, split))
            ids = pool.map(_encode, [r["text"] for r in recs], chunksize=8)
            lengths = np.array([len(x) + 2 for x in ids], dtype=np.int64)  # + BOS + EOS
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            tokens = np.empty(int(offsets[-1]), dtype=np.uint16)
            for i, x in enumerate(ids):
                a = offsets[i]
                tokens[a] = tok.bos_token_id
                tokens[a + 1 : a + 1 + len(x)] = x
                tokens[a + 1 + len(x)] = tok.eos_token_id
            kinds = np.array([KIND_IDS[r["kind"]] for r in recs], dtype=np.uint8)
            np.save(out / f"{split}.tokens.npy", tokens)
            np.save(out / f"{split}.offsets.npy", offsets)
            np.save(out / f"{split}.kinds.npy", kinds)
            chars = sum(len(r["text"]) for r in recs)
            stats[split] = {"files": len(recs), "tokens": int(offsets[-1]), "chars": chars,
                            "chars_per_token": round(chars / max(1, int(offsets[-1])), 3),
                            **{f"{k}_tokens": int(lengths[kinds == v].sum()) for k, v in KIND_IDS.items()}}
            print(f"{split}: {len(recs)} files, {int(offsets[-1]):,} tokens ({stats[split]['chars_per_token']} chars/token)",
                  flush=True)
    stats["total_tokens"] = sum(stats[s]["tokens"] for s in args.splits)
    stats["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "stats.json", stats)
    print(f"total {stats['total_tokens']:,} tokens in {stats['seconds']} s -> {out}")
    return 0


class TokenSplit:
    """One tokenized split: a flat uint16 stream, file offsets and file kinds."""

    def __init__(self, directory: str | Path, split: str) -> None:
        d = Path(directory)
        self.tokens = np.load(d / f"{split}.tokens.npy", mmap_mode="r")
        self.offsets = np.load(d / f"{split}.offsets.npy")
        self.kinds = np.load(d / f"{split}.kinds.npy")

    def docs(self, kind: str = "all") -> list[np.ndarray]:
        keep = range(len(self.kinds)) if kind == "all" else np.nonzero(self.kinds == KIND_IDS[kind])[0]
        return [self.tokens[self.offsets[i] : self.offsets[i + 1]] for i in keep]

    def stream(self, kind: str = "all") -> np.ndarray:
        if kind == "all":
            return np.asarray(self.tokens)
        return np.concatenate(self.docs(kind))


# ----------------------------------------------------------------------------- training
@dataclass
class TrainSpec:
    """A decoder's shape, data and schedule. Presets A and B are the shipped decoders."""

    family: Family = "llama"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 688
    seq_len: int = 512  # the copy probe's rows are 513 tokens: RoPE models do not extrapolate past training length
    batch_size: int = 16
    steps: int = 6000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    decay_frac: float = 0.2  # linear decay over the last share of steps (warmup-stable-decay)
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    data: DataMix = "all"
    planted: Planted = "none"
    planted_fraction: float = 0.0  # of training rows that hold a planted repeat
    planted_min: int = 16  # span lengths of planted repeats (tokens)
    planted_max: int = 128
    rotary_fraction: float = 0.0  # gpt_neox only: share of each head's dims that rotate (0: the family default, 0.25)
    time_budget: float = 0.0  # seconds of training; > 0: the schedule ends at whichever of steps / time comes first
    probe_every: int = 250
    probe_passages: int = 64
    val_rows: int = 64
    compile: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name, kind in (("family", Family), ("data", DataMix), ("planted", Planted)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"train.{name}={getattr(self, name)!r} is not one of {list(get_args(kind))}")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "seq_len",
                     "batch_size", "steps", "probe_every", "planted_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("train.hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if not 0.0 <= self.rotary_fraction <= 1.0 or (self.rotary_fraction and self.family != "gpt_neox"):
            raise ValueError(f"train.rotary_fraction must be in [0, 1] and is for gpt_neox only, got {self.rotary_fraction}")
        if not 0.0 <= self.planted_fraction <= 1.0:
            raise ValueError(f"train.planted_fraction must be in [0, 1], got {self.planted_fraction}")
        if self.planted != "none" and not self.planted_min <= self.planted_max <= (self.seq_len + 1) // 2:
            raise ValueError("train.planted_min <= planted_max <= (seq_len + 1) // 2 is required")

    def progress(self, step: int, seconds: float) -> float:
        """Share of the run done: steps, or training time when a time budget binds first."""
        done = step / self.steps
        return max(done, seconds / self.time_budget) if self.time_budget > 0 else done

    def lr_at(self, step: int, progress: float | None = None) -> float:
        """Linear warm-up (steps), constant, then linear decay to min_lr_ratio over the last decay_frac."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        p = step / self.steps if progress is None else progress
        if self.decay_frac <= 0 or p < 1 - self.decay_frac:
            return self.lr
        t = min(1.0, (p - (1 - self.decay_frac)) / self.decay_frac)
        return self.lr * (1 - (1 - self.min_lr_ratio) * t)


# The shipped decoders (benchmarks/README.md, "Stand-in decoders", has the curves). The grid
# (GRID) showed copying emerging within 1-2k steps on this code-heavy corpus but staying fuzzy: a
# repeated held-out passage at 0.8-1.3 nats/token and random-token induction at 6-9 nats after
# 6k steps. Longer rows (1024) and more tokens per step sharpened text copying; planted repeats of
# random tokens were the only lever that taught random-token induction. So: rows of 1024 tokens,
# 32 per step, a share of rows holding a planted repeat (text or random tokens, 32-256 long),
# warm-up, constant lr, a linear decay over the last quarter; at most 270 s of training.
_FINAL = dict(seq_len=1024, batch_size=32, steps=8000, time_budget=270.0, lr=2e-3, warmup=200, decay_frac=0.25,
              planted="both", planted_fraction=0.3, planted_min=32, planted_max=256, probe_every=500)
PRESETS: dict[str, dict] = {
    # Decoder A (Llama family): 6 x 384, 16.9M parameters, 8192-token BPE.
    "A": _FINAL | dict(family="llama", hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=6,
                       intermediate_size=1024),
    # Decoder B (GPT-NeoX family: fused QKV, parallel residual, LayerNorm, GELU; rotary on every head
    # dim): 6 x 256, 11.0M parameters, 12288-token BPE. With the family's default partial rotary
    # (0.25) and 30% planted rows, B's random-token induction ended at 2.3 nats; this recipe (half the
    # rows planted, full rotary, up to 12k steps) ended at 0.98 (the partial-rotary twin at 1.37).
    "B": _FINAL | dict(family="gpt_neox", hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=4,
                       intermediate_size=1024, planted_fraction=0.5, steps=12000, rotary_fraction=1.0),
    # The grid's base point (see GRID): 4 x 256 Llama, constant lr after warm-up (curves comparable at any step).
    "base": dict(decay_frac=0.0),
}


def parse_sets(items: list[str]) -> dict:
    """``key=value`` overrides, typed by TrainSpec's fields."""
    types = {f.name: f.type for f in dataclasses.fields(TrainSpec)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise SystemExit(f"error: --set {item!r}: expected key=value with key one of {sorted(types)}")
        default = getattr(TrainSpec(), key)
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def build_model(spec: TrainSpec, tok):
    extra = {"head_dim": spec.hidden_size // spec.num_heads} if spec.family == "qwen3" else {}
    if spec.rotary_fraction:
        extra["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                    "partial_rotary_factor": spec.rotary_fraction}
    cfg = tiny_config(spec.family, vocab_size=len(tok), hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                      num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                      intermediate_size=spec.intermediate_size, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **extra)
    return tiny_causal_lm(cfg, seed=spec.seed)


class Batcher:
    """Random training windows sampled on the device, with optional planted repeats.

    A planted repeat copies a span of a row (``text``), or a span of uniformly random tokens
    (``random``), to a later place in the same row, so the rest of the row is unchanged text;
    ``both`` draws text or random with equal odds per row.
    ``data="synthetic"`` rows are uniformly random tokens (the CPU check of the setup).
    """

    def __init__(self, spec: TrainSpec, stream: np.ndarray | None, vocab_size: int, first_id: int,
                 device: torch.device) -> None:
        self.spec, self.vocab, self.first_id, self.device = spec, vocab_size, first_id, device
        self.stream = None if stream is None else torch.from_numpy(stream.astype(np.int32)).to(device)
        self.gen = torch.Generator(device=device).manual_seed(spec.seed + 1)
        self.pos = torch.arange(spec.seq_len + 1, device=device)

    def _randint(self, low, high, shape):
        return torch.randint(low, high, shape, generator=self.gen, device=self.device)

    def __call__(self) -> torch.Tensor:
        s = self.spec
        b, n = s.batch_size, s.seq_len + 1
        if self.stream is None:
            rows = self._randint(self.first_id, self.vocab, (b, n))
        else:
            starts = self._randint(0, len(self.stream) - n, (b, 1))
            rows = self.stream[starts + self.pos].long()
        if s.planted == "none" or s.planted_fraction == 0:
            return rows
        u = torch.rand(b, generator=self.gen, device=self.device)
        chosen = (u < s.planted_fraction)[:, None]
        k = self._randint(s.planted_min, s.planted_max + 1, (b, 1))
        # source [a, a + k), destination [d, d + k) with a + k <= d and d + k <= n
        a = (torch.rand(b, 1, generator=self.gen, device=self.device) * (n - 2 * k + 1)).long()
        d = a + k + (torch.rand(b, 1, generator=self.gen, device=self.device) * (n - a - 2 * k + 1)).long()
        pos = self.pos[None]
        if s.planted in ("random", "both"):
            random_src = chosen if s.planted == "random" else chosen & (torch.rand(b, 1, generator=self.gen,
                                                                                   device=self.device) < 0.5)
            in_src = random_src & (pos >= a) & (pos < a + k)
            rows = torch.where(in_src, self._randint(self.first_id, self.vocab, rows.shape), rows)
        in_dst = chosen & (pos >= d) & (pos < d + k)
        return rows.gather(1, torch.where(in_dst, pos - d + a, pos))


def lm_loss(model, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of rows[:, 1:] (no padding, no mask: SDPA's causal path)."""
    logits = model(input_ids=rows[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def probe_windows(tokens_dir: str | Path, split: str, count: int, config: ProbeConfig) -> torch.Tensor:
    """Held-out windows for the probe, from every file of ``split`` that is long enough."""
    return heldout_windows(TokenSplit(tokens_dir, split).docs(), config.window_len, count, seed=config.seed)


def run_probe(model, tok, windows: torch.Tensor, config: ProbeConfig, device: torch.device):
    with _autocast(device):
        # These decoders were trained on documents that start with their BOS (``TokenSplit``), although
        # their tokenizer adds none by default: so their rows start with it too.
        return probe_decoder(model, windows, [tok.bos_token_id], len(tok), tok.all_special_ids, config)


@torch.no_grad()
def heldout_loss(model, rows: torch.Tensor, device: torch.device, batch: int = 32) -> float:
    model.eval()
    total = 0.0
    with _autocast(device):
        for i in range(0, len(rows), batch):
            total += float(lm_loss(model, rows[i : i + batch].to(device))) * len(rows[i : i + batch])
    model.train()
    return total / len(rows)


def train(spec: TrainSpec, tokens_dir: str | None, tokenizer_dir: str, log_path: str | None = None,
          save_dir: str | None = None, time_limit: float | None = None, probe_split: str = "validation",
          name: str = "", device: str | None = None, quiet: bool = False) -> dict:
    """Train one decoder; log and return the probe curve. ``tokens_dir`` None: synthetic rows only."""
    t_start = time.time()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(spec.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    tok = load_tokenizer(tokenizer_dir)
    model = build_model(spec, tok).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    probe_cfg = ProbeConfig()
    first_id = max(tok.all_special_ids) + 1
    if spec.data == "synthetic" or tokens_dir is None:
        stream = None
        windows = torch.randint(first_id, len(tok), (spec.probe_passages, probe_cfg.window_len),
                                generator=torch.Generator().manual_seed(7))
        val_rows = torch.randint(first_id, len(tok), (spec.val_rows, spec.seq_len + 1),
                                 generator=torch.Generator().manual_seed(8))
    else:
        stream = TokenSplit(tokens_dir, "train").stream(spec.data)
        windows = probe_windows(tokens_dir, probe_split, spec.probe_passages, probe_cfg)
        val_rows = heldout_windows(TokenSplit(tokens_dir, "validation").docs(), spec.seq_len + 1, spec.val_rows, seed=3)
    batcher = Batcher(spec, stream, len(tok), first_id, dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, spec.beta2), fused=dev.type == "cuda")
    loss_fn = torch.compile(lm_loss) if spec.compile else lm_loss
    log = {"name": name, "spec": dataclasses.asdict(spec), "parameters": n_params, "device": _device_name(dev),
           "torch": torch.__version__, "tokens_per_step": spec.batch_size * spec.seq_len, "probe_split": probe_split,
           "probe_config": dataclasses.asdict(probe_cfg), "points": [], "first_pass": {}, "status": "running",
           "date": dt.date.today().isoformat()}

    def write_log():
        if log_path:
            atomic_write_json(log_path, log)

    model.train()
    losses: list[torch.Tensor] = []
    t_train = time.time()
    probe_seconds = 0.0  # excluded from the training wall time
    step = 0
    stop = over_limit = False
    while True:
        if step % spec.probe_every == 0 or step == spec.steps or stop:
            t_probe = time.time()
            wall = t_probe - t_train - probe_seconds
            res = run_probe(model, tok, windows, probe_cfg, dev)
            train_loss = float(torch.stack(losses).mean()) if losses else None
            point = {"step": step, "tokens": step * spec.batch_size * spec.seq_len, "wall_s": round(wall, 1),
                     "lr": opt.param_groups[0]["lr"], "train_loss": train_loss,
                     "val_loss": heldout_loss(model, val_rows, dev), **{k: v for k, v in res.to_dict().items()
                                                                         if k not in ("config",)}}
            losses = []
            log["points"].append(point)
            for gate, ok in res.gates().items():
                if ok and gate not in log["first_pass"]:
                    log["first_pass"][gate] = step
            if res.passed and "all" not in log["first_pass"]:
                log["first_pass"]["all"] = step
            write_log()
            if not quiet:
                tl = f"{train_loss:.3f}" if train_loss is not None else "-"
                print(f"[{name}] step {step} ({wall:.0f} s) train {tl} val {point['val_loss']:.3f} | {res.summary()}",
                      flush=True)
            probe_seconds += time.time() - t_probe
        if step >= spec.steps or stop:
            break
        progress = spec.progress(step, time.time() - t_train - probe_seconds)
        if progress >= 1.0:  # the time budget is spent: end here (the schedule has decayed)
            stop = True
            continue
        lr = spec.lr_at(step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        rows = batcher()
        try:
            with _autocast(dev):
                loss = loss_fn(model, rows)
        except Exception as err:  # a compiler failure costs speed, not the run
            if loss_fn is lm_loss:
                raise
            log["compile_error"] = f"{type(err).__name__}: {err}"[:500]
            print(f"[{name}] torch.compile failed, running eager: {log['compile_error']}", flush=True)
            loss_fn = lm_loss
            opt.zero_grad(set_to_none=True)
            with _autocast(dev):
                loss = loss_fn(model, rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        step += 1
        if time_limit and time.time() - t_start > time_limit and step % spec.probe_every != 0:
            stop = over_limit = True
    log["train_seconds"] = round(time.time() - t_train - probe_seconds, 1)
    log["probe_seconds"] = round(probe_seconds, 1)
    log["total_seconds"] = round(time.time() - t_start, 1)
    log["steps_done"] = step
    log["status"] = "done" if step >= spec.steps else ("time_budget" if spec.time_budget > 0 and not over_limit
                                                       else "time_limit")
    if save_dir:
        log["saved"] = save_decoder(model, tok, save_dir, log)
    write_log()
    return log


def save_decoder(model, tok, out_dir: str | Path, summary: dict) -> dict:
    """save_pretrained in bf16 (small enough to carry) + tokenizer; temp dir, then rename."""
    out = Path(out_dir)
    if out.exists():
        raise SystemExit(f"error: {out} exists; choose another --save directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model = model.to(torch.bfloat16)
        model.save_pretrained(tmp, max_shard_size="15MB")
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "decoder_summary.json", {k: v for k, v in summary.items() if k != "points"}
                          | {"last_point": summary["points"][-1] if summary["points"] else None})
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in out.iterdir())
    return {"dir": str(out), "files": files, "bytes": sum((out / f).stat().st_size for f in files)}


def cmd_train(args) -> int:
    spec = TrainSpec(**(PRESETS[args.preset] | parse_sets(args.set)))
    log = train(spec, args.tokens, args.tokenizer, args.log, args.save, args.time_limit, args.probe_split,
                args.name or args.preset, args.device)
    last = log["points"][-1]
    print(f"[{log['name']}] done: {log['steps_done']} steps in {log['train_seconds']} s "
          f"({log['parameters']:,} params); first pass {log['first_pass']}; passed={last['passed']}")
    return 0


# ----------------------------------------------------------------------------- probe command
def cmd_probe(args) -> int:
    from arc_encoder.decoders import load_frozen_decoder

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.time()
    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"{args.model} is not a saved decoder (no config.json)")
    model, tok = load_frozen_decoder(args.model, dev)
    cfg = ProbeConfig()
    windows = probe_windows(args.tokens, args.split, args.passages, cfg)
    res = run_probe(model, tok, windows, cfg, dev)
    out = {"model": str(args.model), "split": args.split, "tokens": str(args.tokens), "device": _device_name(dev),
           "dtype": str(next(model.parameters()).dtype), "seconds": round(time.time() - t0, 1),
           "parameters": sum(p.numel() for p in model.parameters()), **res.to_dict()}
    out["config"] = dataclasses.asdict(cfg)
    if args.out:
        atomic_write_json(args.out, out)
    print(f"{args.model}: {res.summary()}")
    if not res.passed:
        print(f"error: {args.model} misses the decoder gates: " + "; ".join(res.failures()), file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- grid
# Each entry: overrides of the base TrainSpec (4 x 256 Llama, 4 heads, seq 512, batch 16, lr 3e-3).
GRID: dict[str, dict] = {
    "base": {},
    "lr1e-3": {"lr": 1e-3},
    "lr1e-2": {"lr": 1e-2},
    "batch64": {"batch_size": 64},
    "layers2": {"num_layers": 2},
    "layers8": {"num_layers": 8},
    "heads8": {"num_heads": 8, "num_kv_heads": 8},
    "seq256": {"seq_len": 256},
    "seq1024": {"seq_len": 1024},
    "doc_only": {"data": "doc"},
    "code_only": {"data": "code"},
    "plant_text10": {"planted": "text", "planted_fraction": 0.1},
    "plant_rand10": {"planted": "random", "planted_fraction": 0.1},
    "neox": {"family": "gpt_neox", "intermediate_size": 1024},
}


def cmd_grid(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(GRID)
    procs = []
    for name in names:
        overrides = GRID[name] | parse_sets(args.set)
        sets = [f"{k}={v}" for k, v in overrides.items()]
        cmd = [sys.executable, str(Path(__file__).resolve()), "train", "--preset", "base", "--tokens", args.tokens,
               "--tokenizer", args.tokenizer, "--name", name, "--log", str(out / f"{name}.json"),
               "--time-limit", str(args.time_limit)] + sum((["--set", s] for s in sets), [])
        procs.append((name, subprocess.Popen(cmd, stdout=open(out / f"{name}.log", "w"), stderr=subprocess.STDOUT)))
        time.sleep(args.stagger)
    failed = [name for name, p in procs if p.wait() != 0]
    summary = {}
    for name in names:
        path = out / f"{name}.json"
        if path.is_file():
            log = json.loads(path.read_text())
            last = log["points"][-1] if log["points"] else {}
            summary[name] = {"overrides": GRID[name], "steps": log.get("steps_done"), "first_pass": log["first_pass"],
                             "train_seconds": log.get("train_seconds"), "parameters": log["parameters"],
                             **{k: last.get(k) for k in ("val_loss", "induction_second", "copy_second", "open_book_gain")}}
    atomic_write_json(out / "grid_summary.json", {"runs": summary, "failed": failed, "command": _command()})
    for name, s in summary.items():
        vals = " ".join(f"{k} {s[k]:.3f}" for k in ("val_loss", "induction_second", "copy_second", "open_book_gain")
                        if s[k] is not None)
        print(f"{name:14s} steps {s['steps']} {vals} first {s['first_pass']}")
    return 1 if failed else 0


def _command() -> str:
    return "python benchmarks/decoders.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# ----------------------------------------------------------------------------- plot
def cmd_plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from arc_encoder.storage import atomic_save_figure

    logs = [json.loads(Path(p).read_text()) for p in args.logs]
    keys = [("induction_second", "induction: random 2nd copy (nats)", 1.0),
            ("copy_second", "copy: passage 2nd copy (nats)", 0.5),
            ("open_book_gain", "open-book gain (nats)", 0.3), ("val_loss", "validation loss (nats)", None)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.4))
    colors = plt.get_cmap("tab20").colors
    for ax, (key, title, gate) in zip(axes, keys):
        for i, log in enumerate(logs):
            pts = [p for p in log["points"] if p.get(key) is not None]
            ax.plot([p[args.x] for p in pts], [p[key] for p in pts], label=log["name"], lw=1.3,
                    color=colors[i % len(colors)], ls="-" if i < len(colors) else "--")
        if gate is not None:
            ax.axhline(gate, color="k", ls="--", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(args.x)
        if key != "open_book_gain":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    atomic_save_figure(fig, args.out)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on the train split")
    p.add_argument("--corpus", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--max-chars", type=int, default=60_000_000, help="train-split characters it is trained on")
    p.add_argument("--out", required=True, help="directory (tokenizer.json + config)")
    p = sub.add_parser("tokenize", help="corpus splits -> token arrays")
    p.add_argument("--corpus", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p = sub.add_parser("train", help="train one decoder")
    p.add_argument("--preset", choices=sorted(PRESETS), default="A")
    p.add_argument("--set", action="append", default=[], help="key=value override of the preset (repeatable)")
    p.add_argument("--tokens", default=None, help="token arrays (tokenize); omit for --set data=synthetic")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--log", default=None, help="JSON curve, rewritten at every probe")
    p.add_argument("--save", default=None, help="save_pretrained directory (must not exist)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stops early (status time_limit)")
    p.add_argument("--probe-split", default="validation", choices=["validation", "test"])
    p.add_argument("--name", default="")
    p.add_argument("--device", default=None)
    p = sub.add_parser("probe", help="gate a saved decoder on held-out text (exit 1 when a gate is missed)")
    p.add_argument("model")
    p.add_argument("--tokens", required=True, help="token arrays made with this decoder's tokenizer")
    p.add_argument("--split", default="test", choices=["validation", "test"])
    p.add_argument("--passages", type=int, default=64)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default=None)
    p = sub.add_parser("grid", help="several train runs at once, one process each")
    p.add_argument("--tokens", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--only", nargs="*", default=None, choices=sorted(GRID))
    p.add_argument("--set", action="append", default=[], help="key=value for every run")
    p.add_argument("--time-limit", type=float, default=360)
    p.add_argument("--stagger", type=float, default=2.0, help="seconds between process starts")
    p = sub.add_parser("plot", help="probe curves of train logs -> PNG")
    p.add_argument("logs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--x", default="step", choices=["step", "tokens", "wall_s"])
    p.add_argument("--title", default="")
    args = ap.parse_args(argv)
    try:
        return {"tokenizer": cmd_tokenizer, "tokenize": cmd_tokenize, "train": cmd_train, "probe": cmd_probe,
                "grid": cmd_grid, "plot": cmd_plot}[args.cmd](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
