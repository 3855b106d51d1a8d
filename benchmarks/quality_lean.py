#!/usr/bin/env python3
"""Does compression work with decoders that read their context? (issue 12, parts 2-4)

The GPU quality run with the stand-in decoders of benchmarks/decoders.py (A: Llama, B:
GPT-NeoX, other width and tokenizer; both pass issue 12's gates). An encoder cut from
decoder A's own weights is pretrained against A at several pooling factors with the library's
loss (``ARCModel.forward``), the library's data windows (``arc_encoder.samples``) and the
reference optimiser (``arc_encoder_train.module.param_groups`` / ``build_optimizer``), then
adapted to B (encoder frozen: B's projector and special tokens only). Everything is scored on
held-out TEST files that neither the decoders nor the encoder saw.

A lean loop rather than Lightning: at these model sizes Lightning's per-step overhead would
dominate, and the GPU machines lack ``datasets``; this script needs torch, transformers and
numpy only (plus lightning, for the optimiser functions it shares with the training package).

Steps (``--help`` on each)::

    data    corpus (decoder_corpus.py build) -> per decoder: (context, continuation) windows
            from ``split_windows`` + ``text_sample`` as arrays; validation and test subsets
    train   one variant: pretrain an encoder against A at one pooling factor, or adapt a
            pretrained one to B; evaluates every N steps on fixed validation windows (the
            curves), then scores the test windows; writes RUN/<name>/log.json
    run     one GPU call: data, decoder gates, phase 1 (variants at once, one process each, equal
            steps), phase 2 (adaptation to B from the best x4 by validation), report; deadlines
    report  run folder -> results JSON, summary and curve plots

Scores (test split): teacher-forced reconstruction token accuracy (``reconstruction_accuracy``),
greedy reconstruction exact match and BLEU-4 (``arc_encoder.bleu``), continuation loss with no /
compressed / full context (``continuation_loss``) and the gap closed, which is recorded only
where the open-book gain is >= 0.2 nats (``objectives.gap_closed``). Diagnostics: the decoder's
own reading-back ceiling (the text itself in context instead of vectors), its no-context floor,
and reconstruction accuracy by position within each pooled group and along the context.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))  # the repository, when not installed

from arc_encoder.metrics import MIN_GAIN_FOR_GAP, gap_closed  # noqa: E402
from arc_encoder.storage import atomic_write_json  # noqa: E402

SPLITS = ("train", "validation", "test")


# ----------------------------------------------------------------------------- data
_WORKER: dict = {}


def _init_worker(dec_dir: str, enc_dir: str, context: int, target: int) -> None:
    from transformers import AutoTokenizer

    dec = AutoTokenizer.from_pretrained(dec_dir)
    enc = dec if enc_dir == dec_dir else AutoTokenizer.from_pretrained(enc_dir)
    _WORKER.update(dec=dec, enc=enc, same=dec.get_vocab() == enc.get_vocab(), context=context, target=target)


def _text_windows(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One file -> its full windows: context [n, C], continuation [n, T], encoder ids (flat) and lengths.

    The library's windows (``split_windows``: no overlap, from the file's start) and samples
    (``text_sample``: the encoder re-tokenizes the decoded context when its tokenizer differs).
    Windows whose continuation is cut short by the end of the file are dropped (one length).
    """
    from arc_encoder.samples import split_windows, text_sample

    w = _WORKER
    ids = w["dec"](text, add_special_tokens=False)["input_ids"]
    ctx, cont, enc, lens = [], [], [], []
    for c, t in split_windows(text, w["dec"], w["context"], w["target"], ids=ids):
        if len(c) != w["context"] or len(t) != w["target"]:
            continue
        s = text_sample(c, t, w["enc"], w["dec"], w["same"])
        ctx.append(c)
        cont.append(t)
        enc += s.encoder_ids
        lens.append(len(s.encoder_ids))
    C, T = w["context"], w["target"]
    return (np.asarray(ctx, dtype=np.int32).reshape(-1, C), np.asarray(cont, dtype=np.int32).reshape(-1, T),
            np.asarray(enc, dtype=np.int32), np.asarray(lens, dtype=np.int32))


def split_texts(corpus: Path, split: str, max_chars: int = 0) -> list[str]:
    """Texts of one split of a `decoder_corpus.py build` folder; with ``max_chars``, the files in a
    fixed hash order of their ids up to that many characters (a reproducible slice of train)."""
    from decoder_corpus import read_split

    recs = list(read_split(corpus, split))
    if max_chars:
        recs.sort(key=lambda r: hashlib.sha256(r["id"].encode()).digest())
        kept, total = [], 0
        for r in recs:
            if total >= max_chars:
                break
            kept.append(r)
            total += len(r["text"])
        recs = kept
    return [r["text"] for r in recs]


def build_windows(texts: list[str], dec_dir: str, enc_dir: str, context: int, target: int, workers: int) -> dict:
    """Window arrays of ``texts`` (``_text_windows`` per file, in file order; ``workers`` processes)."""
    args = (dec_dir, enc_dir, context, target)
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers, _init_worker, args) as pool:
            parts = pool.map(_text_windows, texts, chunksize=4)
    else:
        _init_worker(*args)
        parts = [_text_windows(t) for t in texts]
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return {"ctx": np.zeros((0, context), np.int32), "cont": np.zeros((0, target), np.int32),
                "enc": np.zeros(0, np.int32), "enc_off": np.zeros(1, np.int64), "doc": np.zeros(0, np.int32)}
    lens = np.concatenate([p[3] for p in parts])
    return {"ctx": np.concatenate([p[0] for p in parts]), "cont": np.concatenate([p[1] for p in parts]),
            "enc": np.concatenate([p[2] for p in parts]), "enc_off": np.concatenate([[0], np.cumsum(lens)]),
            "doc": np.concatenate([np.full(len(p[0]), i, np.int32) for i, p in enumerate(parts)])}


def subset(windows: dict, count: int, seed: int) -> dict:
    """A fixed, seeded subset of ``count`` windows (all when there are fewer), in their order."""
    n = len(windows["ctx"])
    pick = np.sort(np.random.default_rng(seed).permutation(n)[:count]) if n > count else np.arange(n)
    lens = np.diff(windows["enc_off"])[pick]
    enc = [windows["enc"][windows["enc_off"][i] : windows["enc_off"][i + 1]] for i in pick]
    return {"ctx": windows["ctx"][pick], "cont": windows["cont"][pick],
            "enc": np.concatenate(enc) if enc else np.zeros(0, np.int32),
            "enc_off": np.concatenate([[0], np.cumsum(lens)]), "doc": windows["doc"][pick]}


def cmd_data(args) -> int:
    t0 = time.time()
    corpus, out = Path(args.corpus), Path(args.out)
    decoders = dict(d.split("=", 1) for d in args.decoder)
    encoder_dir = decoders[args.encoder_tokenizer]
    stats: dict = {"corpus": str(corpus), "context_tokens": args.context, "target_tokens": args.target,
                   "encoder_tokenizer": args.encoder_tokenizer, "decoders": {}}
    prov = corpus / "PROVENANCE.json"
    if prov.is_file():
        p = json.loads(prov.read_text())
        stats["corpus_digest"] = p.get("corpus_digest")
        stats["corpus_splits"] = p.get("splits")
    texts = {s: split_texts(corpus, s) for s in ("validation", "test")}
    for name, path in decoders.items():
        t1 = time.time()
        limit = args.train_chars if name == args.encoder_tokenizer else args.adapt_train_chars
        train_texts = split_texts(corpus, "train", limit)
        (out / name).mkdir(parents=True, exist_ok=True)
        dstats = {"path": path, "train_files": len(train_texts), "train_chars": sum(map(len, train_texts))}
        for split, split_texts_ in (("train", train_texts), ("validation", texts["validation"]), ("test", texts["test"])):
            w = build_windows(split_texts_, path, encoder_dir, args.context, args.target, args.workers)
            full = len(w["ctx"])
            if split != "train":
                w = subset(w, args.val_windows if split == "validation" else args.test_windows, seed=1 + SPLITS.index(split))
            np.savez(out / name / f"{split}.npz", **w)
            dstats[split] = {"windows": len(w["ctx"]), "windows_available": full,
                             "files": int(len(np.unique(w["doc"]))) if len(w["doc"]) else 0,
                             "encoder_tokens_per_window": round(float(np.diff(w["enc_off"]).mean()), 1) if full else None}
        dstats["seconds"] = round(time.time() - t1, 1)
        stats["decoders"][name] = dstats
        print(f"data {name}: " + ", ".join(f"{s} {dstats[s]['windows']} windows" for s in SPLITS)
              + f" ({dstats['seconds']} s)", flush=True)
    stats["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "stats.json", stats)
    return 0


class Windows:
    """One split's windows for one decoder, as library ``Sample``s and ``collate``d ``Batch``es."""

    def __init__(self, path: Path) -> None:
        z = np.load(path)
        self.ctx, self.cont, self.enc, self.enc_off = z["ctx"], z["cont"], z["enc"], z["enc_off"]
        if not len(self.ctx):
            raise ValueError(f"{path}: no windows")

    def __len__(self) -> int:
        return len(self.ctx)

    def sample(self, i: int):
        from arc_encoder.samples import Sample

        enc = self.enc[self.enc_off[i] : self.enc_off[i + 1]].tolist()
        return Sample(enc or [0], self.ctx[i].tolist(), [], self.cont[i].tolist())

    def batch(self, idx, decoder: str, task: str, index: int = 0):
        from arc_encoder.samples import collate

        # Pretraining windows have no BOS before the compressed context (reference layout).
        return collate([self.sample(int(i)) for i in idx], decoder, task, None, index)

    def batches(self, size: int, decoder: str, task: str = "continuation") -> list:
        return [self.batch(range(a, min(a + size, len(self))), decoder, task, k)
                for k, a in enumerate(range(0, len(self), size))]


class Stream:
    """Training batches: seeded permutation per epoch, ``batch_size`` windows at a time."""

    def __init__(self, windows: Windows, batch_size: int, seed: int) -> None:
        self.w, self.bs, self.seed = windows, batch_size, seed
        self.epoch, self.pos, self.order = 0, 0, self._order(0)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.w))

    def next(self) -> np.ndarray:
        if self.pos + self.bs > len(self.order):
            self.epoch += 1
            self.pos, self.order = 0, self._order(self.epoch)
        idx = self.order[self.pos : self.pos + self.bs]
        self.pos += self.bs
        return idx


# ----------------------------------------------------------------------------- one variant
@dataclass
class VariantSpec:
    """One training run: pretraining against decoder A, or adaptation to B (``adapt_from``)."""

    name: str
    decoder: str = "A"
    pooling_factor: int = 4
    layers_removed: int = 1
    chunk_len: int = 512
    lr: float = 1e-3
    projector_lr_ratio: float = 5.0
    warmup_steps: int = 200
    reconstruction_ratio: float = 0.5
    batch_size: int = 64
    max_steps: int = 1_000_000
    time_budget: float = 240.0  # seconds of training steps; the step count is fixed from the measured step time
    eval_every: int = 0  # 0: about 12 points over the run
    eval_batch: int = 128
    projector_hidden: int = 2048
    projector_activation: str = "none"
    adapt_from: str = ""  # variant name(s) "X|Y": adapt the one with the lowest validation compressed loss
    greedy_windows: int = 512
    seed: int = 0
    stop_at: float = 0.0  # wall-clock time (time.time()) after which no training step starts; 0: none
    group: str = ""  # variants of one phase with the same group train equal steps
    train_decoder: bool = False  # diagnostic only: the decoder trains too (ARC keeps it frozen)
    note: str = ""

    def __post_init__(self) -> None:
        for k in ("pooling_factor", "batch_size", "max_steps", "eval_every", "eval_batch", "projector_hidden"):
            if getattr(self, k) < (0 if k == "eval_every" else 1):
                raise ValueError(f"variant {self.name}: {k} must be >= 1")
        if not 0.0 <= self.reconstruction_ratio <= 1.0:
            raise ValueError(f"variant {self.name}: reconstruction_ratio must be in [0, 1]")


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def build_variant(spec: VariantSpec, decoders: dict[str, str], runs: Path, device: torch.device):
    """(model, frozen decoder, description) for ``spec``: an encoder cut from decoder A's weights with a
    fresh projector for A, or a pretrained checkpoint with a fresh projector for B (encoder frozen)."""
    from transformers import AutoTokenizer

    from arc_encoder import ARCModel, EncoderConfig
    from arc_encoder.config import ProjectorOptions
    from arc_encoder.decoders import compute_dtype, load_frozen_decoder

    options = ProjectorOptions(hidden_dim=spec.projector_hidden, activation=spec.projector_activation)
    dtype = torch.float32 if spec.train_decoder else compute_dtype(device)  # fp32 weights for AdamW
    decoder, _ = load_frozen_decoder(decoders[spec.decoder], device, dtype)
    if spec.train_decoder:
        decoder.requires_grad_(True)
    info: dict = {}
    if spec.adapt_from:
        source = spec.adapt_from
        info["adapted_from"] = source
        model = ARCModel.from_pretrained(runs / source / "checkpoint", dtype=torch.float32)
        model.encoder.requires_grad_(False)
        for p in model.projectors.values():
            p.requires_grad_(False)
        if spec.decoder in model.projectors:  # control: a fresh projector for the pretraining decoder itself
            info["replaced_pretrained_projector"] = spec.decoder
            del model.projectors[spec.decoder]
            del model.config.projectors[spec.decoder]
        model.add_decoder(spec.decoder, decoder, options, decoder_path=decoders[spec.decoder])
        model.encoder.eval()
    else:
        base = decoders["A"]
        cfg = EncoderConfig(base_model=base, layers_removed=spec.layers_removed, pooling_factor=spec.pooling_factor,
                            chunk_len=spec.chunk_len)
        model = ARCModel.from_base_model(cfg, tokenizer=AutoTokenizer.from_pretrained(base), torch_dtype=torch.float32)
        model.add_decoder(spec.decoder, decoder, options, decoder_path=decoders[spec.decoder])
        model.train()
    model.to(device)
    info.update(encoder_parameters=sum(p.numel() for p in model.encoder.parameters()),
                projector_parameters=model.projector(spec.decoder).num_parameters(),
                trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                layers_removed=model.encoder.config.layers_removed,
                encoder_blocks=len(model.encoder.blocks))
    return model, decoder, info


@torch.no_grad()
def eval_curve_point(model, decoder, batches: list, device: torch.device, baseline: dict | None) -> dict:
    """Validation point: compressed continuation loss and teacher-forced reconstruction accuracy,
    weighted by batch size; ``baseline`` (no / full context losses) is computed once and reused."""
    from arc_encoder.metrics import continuation_loss, reconstruction_accuracy

    model.eval()
    tot: dict[str, float] = {}
    n = 0
    with _autocast(device):
        for b in batches:
            vals = {"loss_compressed": continuation_loss(model, decoder, b, "compressed"),
                    "recon_acc": reconstruction_accuracy(model, decoder, b).token_accuracy}
            if baseline is None:
                vals["loss_none"] = continuation_loss(model, decoder, b, "none")
                vals["loss_full"] = continuation_loss(model, decoder, b, "full")
            for k, v in vals.items():
                tot[k] = tot.get(k, 0.0) + v * len(b)
            n += len(b)
    out = {k: v / n for k, v in tot.items()}
    if baseline is not None:
        out.update(baseline)
    out["gap_closed"] = gap_closed(out["loss_none"], out["loss_full"], out["loss_compressed"])
    return out


@torch.no_grad()
def _reading_scores(model, decoder, batch, context: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced hits [rows, C - 1] and NLL of reading the context back, tokens 2..C of each window
    (with no context nothing precedes the first; ``comparable``: no mode scores it): from the vectors
    ("compressed"), from the text itself ("full": the decoder's copying ceiling) or from nothing
    ("none": its language-model floor)."""
    from arc_encoder.objectives import IGNORE_INDEX, predict, token_nll

    inputs = model.decoder_inputs(decoder, batch, context, "reconstruction", comparable=True)
    logits, labels = predict(decoder, inputs)
    rows, n = len(batch), len(batch.context_ids[0]) - 1
    on = labels != IGNORE_INDEX  # n labelled positions per row (every window has n + 1 context tokens)
    hits = (logits.argmax(-1) == labels)[on].view(rows, n)
    return hits.float().cpu(), token_nll(logits, labels)[on].view(rows, n).cpu()


@torch.no_grad()
def greedy_reconstruction(model, decoder, decoder_tokenizer, batch, device: torch.device) -> list[list[int]]:
    """Free-running reconstruction: [vectors][<Rec>] -> as many tokens as the context has, greedy."""
    n = len(batch.context_ids[0])
    ctx = model.compress(batch.encoder_ids, batch.decoder)
    inputs = model.build_decoder_inputs(decoder.get_input_embeddings(), ctx, batch.prompt_ids, None, "reconstruction",
                                        batch.prefix_ids, "left")
    pad = decoder_tokenizer.pad_token_id if decoder_tokenizer.pad_token_id is not None else decoder_tokenizer.eos_token_id
    out = decoder.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
    return out[:, -n:].tolist()


@torch.no_grad()
def test_metrics(model, decoder, decoder_tokenizer, windows: Windows, spec: VariantSpec, device: torch.device) -> dict:
    """Every test number of one variant (see the module docstring)."""
    from arc_encoder.bleu import corpus_bleu
    from arc_encoder.metrics import evaluate_batch

    model.eval()
    name = spec.decoder
    batches = windows.batches(spec.eval_batch, name)
    tot: dict[str, float] = {}
    n = 0
    hits = {c: [] for c in ("compressed", "full", "none")}
    t0 = time.time()
    with _autocast(device):
        for b in batches:
            for k, v in evaluate_batch(model, decoder, b).items():
                tot[k] = tot.get(k, 0.0) + float(v) * len(b)
            n += len(b)
            for c in hits:
                hits[c].append(_reading_scores(model, decoder, b, c)[0])
        hyps, refs = [], []
        for b in windows.batches(max(spec.eval_batch, 256), name):
            if len(hyps) >= spec.greedy_windows:
                break
            hyps += greedy_reconstruction(model, decoder, decoder_tokenizer, b, device)
            refs += b.context_ids
        hyps, refs = hyps[: spec.greedy_windows], refs[: spec.greedy_windows]
    m = {k: v / n for k, v in tot.items()}
    m["open_book_gain"] = m["loss_none"] - m["loss_full"]
    m["compressed_gain"] = m["loss_none"] - m["loss_compressed"]
    m["gap_closed"] = gap_closed(m["loss_none"], m["loss_full"], m["loss_compressed"])
    m["test_windows"] = n
    acc = {c: torch.cat(h) for c, h in hits.items()}  # [rows, C - 1]: context tokens 1 .. C - 1
    m["read_back_text_acc"] = float(acc["full"].mean())  # the decoder copying the text itself: its ceiling
    m["no_context_acc"] = float(acc["none"].mean())  # the decoder predicting the text from nothing: its floor
    comp = acc["compressed"]
    C = comp.shape[1] + 1
    pos = torch.arange(1, C)
    m["recon_acc_by_context_eighth"] = [round(float(comp[:, (pos * 8) // C == k].mean()), 4) for k in range(8)]
    same = windows.enc.size == windows.ctx.size and np.array_equal(windows.enc, windows.ctx.ravel())  # one tokenizer
    pf = model.encoder.config.pooling_factor
    if same and C % pf == 0:  # balanced groups of exactly pf tokens: token i sits at in-group position i % pf
        m["recon_acc_by_group_position"] = [round(float(comp[:, pos % pf == k].mean()), 4) for k in range(pf)]
    bleu = corpus_bleu(hyps, refs)
    m["greedy_windows"] = len(hyps)
    m["greedy_exact_match"] = sum(h == r for h, r in zip(hyps, refs)) / len(hyps)
    m["greedy_bleu4"] = bleu.bleu
    m["greedy_bleu_precisions"] = list(bleu.precisions)
    m["greedy_token_match"] = float(np.mean([np.mean(np.asarray(h) == np.asarray(r)) for h, r in zip(hyps, refs)]))
    m["seconds"] = round(time.time() - t0, 1)
    return m


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _group_steps(spec: VariantSpec, own: int, group_dir: str, group_size: int, wait: float = 90.0) -> int:
    """Equal steps for a group of variants started together: each writes the steps it can afford in
    its budget, waits for the others, and all take the smallest (so x1/x2/x4/x8 compare at equal steps)."""
    if not group_dir or group_size <= 1:
        return own
    d = Path(group_dir)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / f"{spec.name}.json", {"steps": own})
    deadline = time.time() + wait
    while time.time() < deadline:
        found = list(d.glob("*.json"))
        if len(found) >= group_size:
            return min(json.loads(p.read_text())["steps"] for p in found)
        time.sleep(0.5)
    return min(json.loads(p.read_text())["steps"] for p in d.glob("*.json"))


def train_variant(spec: VariantSpec, data: Path, decoders: dict[str, str], runs: Path, device: str | None = None,
                  group_dir: str = "", group_size: int = 1) -> dict:
    """Train and score one variant; RUN/<name>/log.json is rewritten at every evaluation."""
    from transformers import AutoTokenizer

    from arc_encoder.samples import is_reconstruction
    from arc_encoder_train.module import OptimConfig, build_optimizer, param_groups

    t_start = time.time()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(spec.seed)
    out = runs / spec.name
    out.mkdir(parents=True, exist_ok=True)
    if spec.adapt_from and "|" in spec.adapt_from:  # the candidate with the lowest validation compressed loss
        cands = [c for c in spec.adapt_from.split("|") if (runs / c / "log.json").is_file()]
        if not cands:
            raise ValueError(f"variant {spec.name}: none of {spec.adapt_from} has finished")
        spec = dataclasses.replace(spec, adapt_from=min(cands, key=lambda c: json.loads(
            (runs / c / "log.json").read_text())["curve"][-1]["loss_compressed"]))
    model, decoder, info = build_variant(spec, decoders, runs, dev)
    if spec.adapt_from:
        src = json.loads((runs / spec.adapt_from / "log.json").read_text())["spec"]
        spec = dataclasses.replace(spec, pooling_factor=src["pooling_factor"], layers_removed=src["layers_removed"])
    dec_tok = AutoTokenizer.from_pretrained(decoders[spec.decoder])
    train = Windows(data / spec.decoder / "train.npz")
    val_batches = Windows(data / spec.decoder / "validation.npz").batches(spec.eval_batch, spec.decoder)
    test = Windows(data / spec.decoder / "test.npz")
    stream = Stream(train, spec.batch_size, spec.seed)
    log = {"name": spec.name, "spec": dataclasses.asdict(spec), **info, "device": _device_name(dev),
           "torch": torch.__version__, "train_windows": len(train), "curve": [], "status": "running",
           "date": dt.date.today().isoformat()}

    def write():
        atomic_write_json(out / "log.json", log)

    optim = OptimConfig(lr=spec.lr, projector_lr_ratio=spec.projector_lr_ratio, warmup_steps=2)
    groups = param_groups(model, optim)
    if spec.train_decoder:
        groups.append({"params": list(decoder.parameters()), "lr": spec.lr, "name": "decoder"})
    trainable = [p for g in groups for p in g["params"]]

    def step_loss(step: int):
        task = "reconstruction" if is_reconstruction(step, spec.reconstruction_ratio) else "continuation"
        batch = train.batch(stream.next(), spec.decoder, task, step)
        with _autocast(dev):
            return task, model(batch, decoder)

    # Step time, measured on real batches (forward + backward, no update), fixes the step count.
    times = []
    for i in range(min(10, spec.max_steps + 1)):
        _sync(dev)
        t = time.perf_counter()
        _, loss = step_loss(i)
        loss.backward()
        _sync(dev)
        times.append(time.perf_counter() - t)
    for p in trainable:
        p.grad = None
    stream = Stream(train, spec.batch_size, spec.seed)  # the calibration batches are seen again
    t_step = float(np.median(times[len(times) // 2 :])) * 1.1 + 0.002  # + optimizer step (early calls warm up)
    afford = max(10, int(spec.time_budget / t_step))
    total = min(spec.max_steps, _group_steps(spec, afford, group_dir, group_size))
    every = spec.eval_every or max(1, total // 12)
    warmup = min(spec.warmup_steps, total // 10)
    optim = dataclasses.replace(optim, warmup_steps=warmup if warmup >= 2 else 0)
    opt, sched = build_optimizer(groups, optim, total)
    log.update(steps_planned=total, steps_affordable=afford, eval_every=every, step_seconds_measured=round(t_step, 4),
               warmup_steps=optim.warmup_steps, optimizer={"lr": spec.lr, "projector_lr": optim.max_projector_lr,
                                                           "weight_decay": optim.weight_decay, "schedule": "OneCycleLR"})
    baseline = None
    losses: dict[str, list] = {"reconstruction": [], "continuation": []}
    hard_deadline = min(t_start + spec.time_budget * 1.6 + 60, spec.stop_at or math.inf)
    t_train, eval_seconds, step, evals = time.time(), 0.0, 0, 0
    # The step time measured above runs before the other variants of a phase compete for the GPU;
    # the step count is fixed again from the time of steps 10..`replan` of real training, group-wide.
    # Twice: new sequence shapes make the first steps slow (e.g. B's windows vary in encoder length).
    first = max(20, min(100, total // 10))
    replans, marks = ([first, 3 * first] if spec.stop_at else []), {}
    while True:
        if step == 10 or step in replans:  # training seconds so far, at the steps the re-plans measure from
            marks[step] = time.time() - t_train - eval_seconds
        if step in replans and step < total:
            since = 10 if step == replans[0] else replans[0]
            rate = (marks[step] - marks[since]) / (step - since)
            evals_left = max(0, (total - step) // every + 1) * eval_seconds / max(1, evals)
            fits = step + int((spec.stop_at - time.time() - evals_left) / (rate * 1.03))
            tag = f"{group_dir}-replan{replans.index(step)}" if group_dir else ""
            new = max(step + 1, min(spec.max_steps, _group_steps(spec, fits, tag, group_size)))
            entry = {"at_step": step, "from": total, "to": new, "step_seconds_concurrent": round(rate, 4)}
            if new != total:
                total = new
                every = spec.eval_every or max(1, total // 12)
                optim = dataclasses.replace(optim, warmup_steps=min(optim.warmup_steps, max(0, total // 10)))
                for g in opt.param_groups:  # the new schedule takes its peak from each group's "lr"
                    g["lr"] = g["max_lr"]
                sched = optim.scheduler(opt, total)  # the same one-cycle shape over the new length
                for _ in range(step):
                    sched.step()
            log.setdefault("steps_replanned", []).append({**entry, "peak_lr": [g["max_lr"] for g in opt.param_groups]})
            print(f"[{spec.name}] {rate:.3f} s/step with the others running: {total} steps", flush=True)
        if step % every == 0 or step == total:
            te = time.time()
            point = eval_curve_point(model, decoder, val_batches, dev, baseline)
            baseline = baseline or {"loss_none": point["loss_none"], "loss_full": point["loss_full"]}
            model.train()
            if spec.adapt_from:
                model.encoder.eval()
            point.update(step=step, wall_s=round(time.time() - t_train - eval_seconds, 1),
                         lr=opt.param_groups[0]["lr"],
                         **{f"train_loss_{k}": float(torch.stack(v).mean()) if v else None for k, v in losses.items()})
            losses = {k: [] for k in losses}
            log["curve"].append(point)
            write()
            gap = f"{100 * point['gap_closed']:.1f}%" if point["gap_closed"] is not None else "-"
            print(f"[{spec.name}] step {step}/{total} ({point['wall_s']:.0f} s) val recon acc {point['recon_acc']:.3f}, "
                  f"continuation none {point['loss_none']:.3f} / comp {point['loss_compressed']:.3f} / full "
                  f"{point['loss_full']:.3f}, gap closed {gap}", flush=True)
            eval_seconds += time.time() - te
            evals += 1
        if step >= total:
            break
        if time.time() > hard_deadline:
            log["stopped_early"] = f"hard deadline at step {step} of {total}"
            break
        task, loss = step_loss(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses[task].append(loss.detach())
        step += 1
    log.update(steps_done=step, train_seconds=round(time.time() - t_train - eval_seconds, 1),
               eval_seconds=round(eval_seconds, 1))
    write()
    log["test"] = test_metrics(model, decoder, dec_tok, test, spec, dev)
    if not spec.adapt_from:
        model.save_pretrained(out / "checkpoint", overwrite=True)
    log["status"] = "done"
    log["total_seconds"] = round(time.time() - t_start, 1)
    write()
    t = log["test"]
    gap = f"{100 * t['gap_closed']:.1f}%" if t["gap_closed"] is not None else "-"
    print(f"[{spec.name}] test: recon acc {t['recon_acc']:.3f} (read-back ceiling {t['read_back_text_acc']:.3f}, floor "
          f"{t['no_context_acc']:.3f}), greedy exact {t['greedy_exact_match']:.3f} BLEU {t['greedy_bleu4']:.3f}; "
          f"continuation none {t['loss_none']:.3f} / comp {t['loss_compressed']:.3f} / full {t['loss_full']:.3f}, "
          f"gap closed {gap}", flush=True)
    return log


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def _decoders(values: list[str]) -> dict[str, str]:
    out = dict(v.split("=", 1) for v in values)
    if "A" not in out:
        raise ValueError("--decoder A=DIR is required (the encoder is cut from decoder A)")
    return out


def cmd_train(args) -> int:
    spec = VariantSpec(**json.loads(args.spec))
    train_variant(spec, Path(args.data), _decoders(args.decoder), Path(args.runs), args.device, args.group_dir,
                  args.group_size)
    return 0


# ----------------------------------------------------------------------------- plans and the run
def _phase1(budget: float) -> list[VariantSpec]:
    return [VariantSpec(name="A-x4", pooling_factor=4, time_budget=budget),
            VariantSpec(name="A-x4-lr3e-4", pooling_factor=4, lr=3e-4, time_budget=budget),
            VariantSpec(name="A-x8", pooling_factor=8, time_budget=budget),
            VariantSpec(name="A-x2", pooling_factor=2, time_budget=budget),
            VariantSpec(name="A-x1", pooling_factor=1, time_budget=budget,
                        note="control: no pooling (the decoder reads one vector per token)")]


PLANS = {
    # One GPU call: five pretraining variants at once (equal steps), then B adapted from the better x4.
    "main": {"phase1": _phase1, "phase2": lambda b: [
        VariantSpec(name="B-adapt", decoder="B", adapt_from="A-x4|A-x4-lr3e-4", time_budget=b)]},
    # Second GPU call: why does x4 stop near 0.8? Data per step (batch 256 vs 64 at equal steps), the
    # objective mix (reconstruction only), projector capacity (GELU between its layers), x8 at batch 256;
    # then B adapted, next to A's own projector re-trained on the same frozen encoder (the control that
    # separates "another decoder" from "projector-only training").
    "decisive": {"phase1": lambda b: [
        VariantSpec(name="A-x4", pooling_factor=4, time_budget=b, group="b64"),
        VariantSpec(name="A-x4-rec-only", pooling_factor=4, reconstruction_ratio=1.0, time_budget=b, group="b64",
                    note="reconstruction steps only"),
        VariantSpec(name="A-x4-gelu", pooling_factor=4, projector_activation="gelu", time_budget=b, group="b64",
                    note="projector with GELU between its layers"),
        VariantSpec(name="A-x4-b256", pooling_factor=4, batch_size=256, time_budget=b, group="b256"),
        VariantSpec(name="A-x8-b256", pooling_factor=8, batch_size=256, time_budget=b, group="b256")],
        "phase2": lambda b: [
        VariantSpec(name="B-adapt", decoder="B", adapt_from="A-x4-b256|A-x4", time_budget=b, group="adapt"),
        VariantSpec(name="A-readapt", decoder="A", adapt_from="A-x4-b256|A-x4", time_budget=b, group="adapt",
                    note="control: A's projector re-trained from scratch on the frozen encoder")]},
    # Third GPU call: what limits x4? The frozen decoder's unpacking (decoder trained too), encoder depth
    # (all 6 layers), the objective mix (20% reconstruction), and B's own ability (B pretrained directly);
    # then B adapted next to A's re-adapted control, both with time enough to plateau.
    "limits": {"phase1": lambda b: [
        VariantSpec(name="A-x4", pooling_factor=4, time_budget=b),
        VariantSpec(name="A-x4-decoder-trained", pooling_factor=4, train_decoder=True, time_budget=b,
                    note="diagnostic: decoder A trains too"),
        VariantSpec(name="A-x4-6-layers", pooling_factor=4, layers_removed=0, time_budget=b,
                    note="encoder keeps all 6 layers of A"),
        VariantSpec(name="A-x4-rec0.2", pooling_factor=4, reconstruction_ratio=0.2, time_budget=b),
        VariantSpec(name="B-x4", decoder="B", pooling_factor=4, time_budget=b,
                    note="encoder from A's weights pretrained against B directly")],
        "phase2": lambda b: [
        VariantSpec(name="B-adapt", decoder="B", adapt_from="A-x4", time_budget=b),
        VariantSpec(name="A-readapt", decoder="A", adapt_from="A-x4", time_budget=b,
                    note="control: A's projector re-trained from scratch on the frozen encoder")]},
    # Fourth GPU call: the longest x4 and x8 pretraining one call affords (two processes), then B adapted:
    # where the curves saturate.
    "long": {"phase1": lambda b: [VariantSpec(name="A-x4", pooling_factor=4, time_budget=b),
                                  VariantSpec(name="A-x8", pooling_factor=8, time_budget=b)],
             "phase2": lambda b: [VariantSpec(name="B-adapt", decoder="B", adapt_from="A-x4", time_budget=b)]},
    # CPU pipeline check (tests): a few steps, tiny batches.
    "smoke": {"phase1": lambda b: [
        VariantSpec(name="A-x4", pooling_factor=4, max_steps=3, batch_size=2, eval_every=2, eval_batch=4,
                    projector_hidden=16, warmup_steps=0, time_budget=b, greedy_windows=3),
        VariantSpec(name="A-x1", pooling_factor=1, max_steps=3, batch_size=2, eval_every=2, eval_batch=4,
                    projector_hidden=16, warmup_steps=0, time_budget=b, greedy_windows=3)],
        "phase2": lambda b: [VariantSpec(name="B-adapt", decoder="B", adapt_from="A-x4|A-x1", max_steps=3, batch_size=2,
                                         eval_every=2, eval_batch=4, projector_hidden=16, warmup_steps=0, time_budget=b,
                                         greedy_windows=3)]},
}


def _tar_logs(runs: Path, extra: list[Path], dest: Path) -> None:
    """Every variant's log.json and stdout plus ``extra`` files, as one tar.gz (atomic)."""
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(runs.glob("*/log.json")) + sorted(runs.glob("*.log")) + [e for e in extra if e.is_file()]:
            tar.add(p, arcname=str(p.relative_to(runs.parent)) if p.is_relative_to(runs.parent) else p.name)
    os.replace(tmp, dest)


def run_phase(specs: list[VariantSpec], args, runs: Path, inline: bool) -> list[str]:
    """Train ``specs`` at once (one process each; ``inline``: one after the other here); failed names."""
    decoders = _decoders(args.decoder)
    group = runs / f".group-{specs[0].name}"
    if inline:
        failed = []
        for s in specs:
            try:
                train_variant(s, Path(args.data), decoders, runs, args.device)
            except Exception as err:  # noqa: BLE001 - one failed variant must not cost the others
                print(f"[{s.name}] FAILED: {type(err).__name__}: {err}", flush=True)
                failed.append(s.name)
        return failed
    procs = []
    for s in specs:
        members = [x for x in specs if x.group == s.group]
        cmd = [sys.executable, str(Path(__file__).resolve()), "train", "--spec", json.dumps(dataclasses.asdict(s)),
               "--data", args.data, "--runs", str(runs), "--group-dir", f"{group}{s.group}",
               "--group-size", str(len(members))]
        cmd += sum((["--decoder", d] for d in args.decoder), [])
        if args.device:
            cmd += ["--device", args.device]
        log = open(runs / f"{s.name}.log", "w")
        procs.append((s.name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                               env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"})))
    return [name for name, p in procs if p.wait() != 0]


def probe_decoders(decoders: dict[str, str], texts: list[str], device: str | None) -> dict:
    """Issue 12's gates for every decoder at their own lengths (quality.py's probe)."""
    from quality import probe_decoder_dir

    out = {}
    for name, path in decoders.items():
        out[name] = probe_decoder_dir(path, texts, device=device)
        print(f"decoder {name}: {out[name]['summary']}", flush=True)
    return out


def cmd_run(args) -> int:
    t0 = time.time()
    deadline = t0 + args.deadline
    runs, out = Path(args.work) / "runs", Path(args.out)
    if runs.is_dir() and any(runs.iterdir()):  # stale logs, checkpoints and step-agreement files would mix in
        raise ValueError(f"{runs} holds an earlier run: give a new --work folder")
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    decoders = _decoders(args.decoder)
    times: dict[str, float] = {}
    stop = threading.Event()

    def pack():
        while not stop.wait(20):
            try:
                _tar_logs(runs, [Path(args.data) / "stats.json", runs / "probe.json", Path(args.corpus) / "PROVENANCE.json"],
                          out / "logs.tar.gz")
            except OSError:
                pass

    packer = threading.Thread(target=pack, daemon=True)
    packer.start()
    if not (Path(args.data) / "stats.json").is_file():
        t = time.time()
        cmd_data(argparse.Namespace(corpus=args.corpus, decoder=args.decoder, encoder_tokenizer="A", out=args.data,
                                    context=args.context, target=args.target, train_chars=args.train_chars,
                                    adapt_train_chars=args.adapt_train_chars, val_windows=args.val_windows,
                                    test_windows=args.test_windows, workers=args.workers))
        times["data"] = time.time() - t
    t = time.time()
    probes = probe_decoders(decoders, split_texts(Path(args.corpus), "test"), args.device)
    atomic_write_json(runs / "probe.json", probes)
    times["probe"] = time.time() - t
    from quality import check_gates

    gates, error = check_gates(probes, enforce=True, allow_failed=args.allow_failed_gates)
    if error:
        print(f"quality_lean.py: error: {error}", file=sys.stderr)
        stop.set()
        return 1
    plan = PLANS[args.plan]
    inline = args.parallel == 0
    p2, score, start = args.phase2_seconds, args.score_seconds, args.startup_seconds
    # Phase 1 trains until the time left minus phase 2, each phase's start-up and scoring.
    stop1 = deadline - p2 - 2 * score - start
    b1 = max(5.0, stop1 - time.time() - start)
    t = time.time()
    failed = run_phase([dataclasses.replace(s, stop_at=stop1) for s in plan["phase1"](b1)], args, runs, inline)
    times["phase1"] = time.time() - t
    stop2 = deadline - score
    b2 = max(5.0, min(p2, stop2 - time.time() - start))
    t = time.time()
    failed += run_phase([dataclasses.replace(s, stop_at=stop2) for s in plan["phase2"](b2)], args, runs, inline)
    times["phase2"] = time.time() - t
    stop.set()
    times["total"] = time.time() - t0
    report = make_report(runs, Path(args.data), probes, gates, times, args)
    atomic_write_json(out / args.name, report)
    _tar_logs(runs, [Path(args.data) / "stats.json", runs / "probe.json", Path(args.corpus) / "PROVENANCE.json"],
                          out / "logs.tar.gz")
    print(plot_report(report, out / Path(args.name).with_suffix(".png").name), flush=True)
    print(format_report(report), flush=True)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- report
def make_report(runs: Path, data: Path, probes: dict, gates: dict, times: dict, args) -> dict:
    variants = []
    for p in sorted(runs.glob("*/log.json")):
        variants.append(json.loads(p.read_text()))
    by = {v["name"]: v for v in variants}
    a4 = next((v for v in variants if v.get("status") == "done" and v["spec"]["decoder"] == "A"
               and v["spec"]["pooling_factor"] == 4 and v["name"] == _adapt_source(by)), None)
    b = next((v for v in variants if v.get("status") == "done" and v["spec"]["decoder"] == "B"
              and v["spec"].get("adapt_from")), None)
    targets = {}
    if a4:
        t = a4["test"]
        targets["x4_recon_acc>=0.9"] = {"value": t["recon_acc"], "met": t["recon_acc"] >= 0.9, "variant": a4["name"]}
        targets["x4_gap_closed>=0.8"] = {"value": t["gap_closed"], "met": t["gap_closed"] is not None
                                         and t["gap_closed"] >= 0.8, "variant": a4["name"]}
        if b:
            tb = b["test"]
            d_recon = abs(tb["recon_acc"] - t["recon_acc"])
            d_gap = abs(tb["gap_closed"] - t["gap_closed"]) if None not in (tb["gap_closed"], t["gap_closed"]) else None
            targets["B_within_5_points_of_A"] = {"recon_acc_points": round(100 * d_recon, 2),
                                                 "gap_closed_points": None if d_gap is None else round(100 * d_gap, 2),
                                                 "met": d_recon <= 0.05 and d_gap is not None and d_gap <= 0.05}
    ra = next((v for v in variants if v.get("status") == "done" and v.get("replaced_pretrained_projector")), None)
    if b and ra:  # B against A's own projector trained the same way (adaptation only, same frozen encoder)
        tb, tr = b["test"], ra["test"]
        d_recon = abs(tb["recon_acc"] - tr["recon_acc"])
        d_gap = abs(tb["gap_closed"] - tr["gap_closed"]) if None not in (tb["gap_closed"], tr["gap_closed"]) else None
        targets["B_within_5_points_of_A_readapted"] = {
            "recon_acc_points": round(100 * d_recon, 2), "gap_closed_points": None if d_gap is None else round(100 * d_gap, 2),
            "met": d_recon <= 0.05 and d_gap is not None and d_gap <= 0.05, "control": ra["name"]}
    stats = json.loads((data / "stats.json").read_text()) if (data / "stats.json").is_file() else {}
    return {
        "benchmark": "quality_lean",
        "command": "python benchmarks/quality_lean.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "plan": args.plan,
        "data": stats,
        "decoders": probes,
        "gates": gates,
        "gap_closed_rule": f"(none - compressed) / (none - full), recorded only where none - full >= {MIN_GAIN_FOR_GAP} nats",
        "variants": variants,
        "targets": targets,
        "wall_seconds": {k: round(v, 1) for k, v in times.items()},
    }


def _adapt_source(by: dict) -> str | None:
    for v in by.values():
        if v["spec"].get("adapt_from") and v.get("adapted_from"):
            return v["adapted_from"]
    x4 = [v for v in by.values() if v["spec"]["decoder"] == "A" and v["spec"]["pooling_factor"] == 4 and v.get("curve")]
    return min(x4, key=lambda v: v["curve"][-1]["loss_compressed"])["name"] if x4 else None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_report(report: dict) -> str:
    rows = [f"{'variant':<14}{'pf':>3}{'steps':>7}{'none':>7}{'comp':>7}{'full':>7}{'gain':>6}{'gap':>7}{'recon':>7}"
            f"{'ceil':>6}{'EM':>6}{'BLEU':>6}"]
    for v in report["variants"]:
        t = v.get("test")
        if not t:
            rows.append(f"{v['name']:<14} (no test scores: {v.get('status')})")
            continue
        rows.append(f"{v['name']:<14}{v['spec']['pooling_factor']:>3}{v.get('steps_done', 0):>7}{t['loss_none']:>7.3f}"
                    f"{t['loss_compressed']:>7.3f}{t['loss_full']:>7.3f}{t['open_book_gain']:>6.2f}{_pct(t['gap_closed']):>7}"
                    f"{t['recon_acc']:>7.3f}{t['read_back_text_acc']:>6.2f}{t['greedy_exact_match']:>6.2f}"
                    f"{t['greedy_bleu4']:>6.2f}")
    rows.append("none/comp/full: continuation loss (nats/token, test); gain = none - full; gap = (none - comp) / gain; "
                "recon: teacher-forced reconstruction accuracy; ceil: the decoder reading the text itself back")
    for k, v in report["targets"].items():
        rows.append(f"target {k}: {v}")
    return "\n".join(rows)


def plot_report(report: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    from arc_encoder.storage import atomic_save_figure

    vs = [v for v in report["variants"] if v.get("curve")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for v in vs:
        steps = [p["step"] for p in v["curve"]]
        axes[0].plot(steps, [p["recon_acc"] for p in v["curve"]], "o-", ms=3, label=v["name"])
        axes[1].plot(steps, [p["gap_closed"] if p["gap_closed"] is not None else float("nan") for p in v["curve"]],
                     "o-", ms=3, label=v["name"])
        axes[2].plot(steps, [p["loss_compressed"] for p in v["curve"]], "o-", ms=3, label=v["name"])
    for v in vs[:1]:
        axes[2].axhline(v["curve"][0]["loss_none"], color="tab:red", ls="--", lw=1, label=f"{v['spec']['decoder']} no context")
        axes[2].axhline(v["curve"][0]["loss_full"], color="tab:green", ls="--", lw=1, label=f"{v['spec']['decoder']} full text")
    axes[0].axhline(0.9, color="k", ls=":", lw=1)
    axes[1].axhline(0.8, color="k", ls=":", lw=1)
    axes[0].set_title("validation reconstruction token accuracy")
    axes[1].set_title("validation gap closed (target 0.8)")
    axes[2].set_title("validation continuation loss (nats/token)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['device']}, {report['date']}: encoder from decoder A, adapted to B")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    return str(path)


def cmd_report(args) -> int:
    runs = Path(args.work) / "runs"
    probes = json.loads((runs / "probe.json").read_text()) if (runs / "probe.json").is_file() else {}
    report = make_report(runs, Path(args.data), probes, {}, {}, argparse.Namespace(plan=args.plan))
    atomic_write_json(args.output, report)
    print(plot_report(report, Path(args.output).with_suffix(".png")))
    print(format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def windows_args(q):
        q.add_argument("--context", type=int, default=256, help="decoder tokens compressed per window")
        q.add_argument("--target", type=int, default=64, help="continuation tokens per window")
        q.add_argument("--train-chars", type=int, default=120_000_000, help="train-split characters for decoder A")
        q.add_argument("--adapt-train-chars", type=int, default=40_000_000, help="train-split characters for decoder B")
        q.add_argument("--val-windows", type=int, default=256, help="fixed validation windows (the curves)")
        q.add_argument("--test-windows", type=int, default=1024, help="test windows (the scores)")
        q.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))

    d = sub.add_parser("data", help="corpus -> window arrays per decoder")
    d.add_argument("--corpus", required=True, help="folder of `decoder_corpus.py build` ({train,validation,test}.jsonl.gz)")
    d.add_argument("--decoder", action="append", required=True, metavar="NAME=DIR")
    d.add_argument("--encoder-tokenizer", default="A", help="the decoder whose tokenizer the encoder uses")
    d.add_argument("--out", required=True)
    windows_args(d)
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="one variant (JSON VariantSpec)")
    t.add_argument("--spec", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--decoder", action="append", required=True, metavar="NAME=DIR")
    t.add_argument("--runs", required=True)
    t.add_argument("--device", default=None)
    t.add_argument("--group-dir", default="")
    t.add_argument("--group-size", type=int, default=1)
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("run", help="data, gates, phase 1, phase 2, report (one GPU call)")
    r.add_argument("--corpus", required=True)
    r.add_argument("--decoder", action="append", required=True, metavar="NAME=DIR")
    r.add_argument("--data", required=True, help="window arrays (built here unless they exist)")
    r.add_argument("--work", required=True, help="runs/ (logs, checkpoints) go here")
    r.add_argument("--out", required=True, help="results folder (JSON, plot, logs.tar.gz)")
    r.add_argument("--name", default="quality_lean.json", help="results file name in --out")
    r.add_argument("--plan", choices=sorted(PLANS), default="main")
    r.add_argument("--deadline", type=float, default=540, help="seconds for the whole run")
    r.add_argument("--phase2-seconds", type=float, default=100, help="training seconds of phase 2 (adaptation)")
    r.add_argument("--score-seconds", type=float, default=40, help="seconds kept for scoring after each phase")
    r.add_argument("--startup-seconds", type=float, default=25, help="seconds a phase's processes take to start")
    r.add_argument("--parallel", type=int, default=1, help="0: variants one after the other in this process")
    r.add_argument("--allow-failed-gates", action="store_true", help="run with decoders that miss issue 12's gates")
    r.add_argument("--device", default=None)
    windows_args(r)
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("report", help="runs folder -> results JSON + plot")
    rp.add_argument("--work", required=True)
    rp.add_argument("--data", required=True)
    rp.add_argument("--plan", default="main")
    rp.add_argument("--output", required=True)
    rp.set_defaults(func=cmd_report)

    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"quality_lean.py {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
