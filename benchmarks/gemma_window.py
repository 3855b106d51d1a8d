"""Gemma 3 as encoder: which attention should its sliding-window layers get? The measurement
behind ``EncoderConfig.sliding_window_layers``.

Gemma 3 alternates sliding-window layers (window 512, local RoPE table) with full-attention
layers. With the causal mask removed, a sliding layer can either keep a band, as Hugging Face's
bidirectional Gemma 3 does (``use_bidirectional_attention``, EmbeddingGemma: token i sees j when
|i - j| < 512 // 2 + 1, i.e. 256 tokens each side), or attend over the whole chunk ("full").
At the paper's 1,024-token chunks the two differ for every token.

Both arms use the real models at their real configs: encoder = Gemma 3 270M minus its last 2
layers, pooling x4, 1,024-token windows of real text (the bundled Python-docs corpus: windows
from ``train`` to fit, from ``validation`` + ``test`` to score); decoder = frozen SmolLM2-135M.
The encoder is frozen: its states are computed once per arm (``--states-dir`` keeps them).
Each arm's states are divided by one scalar, their RMS over the training windows (Gemma's
residual stream is large: RMS ~ 800 after 16 layers, no final norm).

1. Linear probes (closed-form ridge, the projector's own function class: the reference projector
   is two linear layers without activation). Local: from each pooled vector, the mean SmolLM2
   input embedding of the decoder tokens its 4 encoder tokens cover (what reconstruction needs).
   Global: from each pooled vector, the mean embedding of its whole window (what it knows of
   the rest of the chunk). Held-out R^2 (local: per window; global: over all held-out vectors)
   and cosine.
2. ``--steps`` steps of training a fresh reference projector (640 -> 2048 -> 576, no bias, + its
   special tokens; per ``--seeds`` seed, the same init and batches in both arms) through the frozen
   decoder, alternating reconstruction and continuation batches: held-out NLL of the first
   ``--reconstruction-tokens`` decoder tokens of the context and of the next
   ``--continuation-tokens``.
Held-out scores are per window, so the arms are compared pairwise. The decoder alone gives the
scale: no context (closed book) and, for continuation, the full text (open book).

    PYTHONPATH=. python benchmarks/gemma_window.py --output benchmarks/results/gemma3_sliding_window_cpu.json
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import gzip
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CORPUS = REPO / "arc_encoder" / "resources" / "pydoc_small"
ARMS = ("band", "full")


def corpus_text(splits: list[str]) -> str:
    docs = []
    for split in splits:
        with gzip.open(CORPUS / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for line in f]
    return "\n\n".join(docs)


def windows(enc_tok, dec_tok, text: str, count: int, context: int, recon: int, cont: int, pf: int) -> list[dict]:
    """``count`` evenly spaced windows: ``context`` encoder tokens; the decoder tokens of that text
    (the first ``recon`` are the reconstruction target), each with the pooling group (``pf``
    encoder tokens) its first character falls in; the first ``cont`` decoder tokens of what follows."""
    enc = enc_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    span = context + 4 * cont  # enough encoder tokens for ``cont`` decoder tokens
    if len(ids) < span * count:
        raise ValueError(f"the text holds {len(ids)} tokens: too few for {count} windows of {span}")
    if context % pf:
        raise ValueError(f"--context-tokens must be a multiple of the pooling factor {pf} (equal groups)")
    out = []
    for s in torch.linspace(0, len(ids) - span, count).long().tolist():
        c0, c1 = offsets[s][0], offsets[s + context - 1][1]
        group_starts = [offsets[s + g * pf][0] - c0 for g in range(context // pf)]
        dec = dec_tok(text[c0:c1], add_special_tokens=False, return_offsets_mapping=True)
        follow = dec_tok(text[c1 : offsets[s + span - 1][1]], add_special_tokens=False)["input_ids"]
        out.append({
            "encoder_ids": ids[s : s + context],
            "context_ids": dec["input_ids"],
            "group_of": [max(0, bisect.bisect_right(group_starts, a) - 1) for a, _ in dec["offset_mapping"]],
            "reconstruction": dec["input_ids"][:recon],
            "continuation": follow[:cont],
        })
    return out


def target_nll(decoder, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean NLL over the labelled tokens; logits only where a label is (the vocabulary is 49k)."""
    from arc_encoder.objectives import IGNORE_INDEX

    hidden = decoder.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    on = targets != IGNORE_INDEX
    logits = decoder.lm_head(hidden[:, :-1][on]).float()
    nll = F.cross_entropy(logits, targets[on], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[on]
    sums = torch.zeros(labels.shape[0], device=nll.device).index_add(0, rows, nll)
    return sums / on.sum(-1)


def decoder_only_nll(decoder, prefixes: list[list[int]], targets: list[list[int]]) -> list[float]:
    """The frozen decoder alone: mean NLL of each target after its prefix."""
    from arc_encoder.objectives import IGNORE_INDEX

    out = []
    for prefix, target in zip(prefixes, targets):
        ids = torch.tensor([prefix + target])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[0, len(prefix):] = torch.tensor(target)
        emb = decoder.get_input_embeddings()(ids)
        out.append(target_nll(decoder, emb, torch.ones_like(ids), labels).item())
    return out


def summary(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": round(mean, 4), "stderr": round(sd / math.sqrt(n), 4), "n": n}


PF = 4  # pooling factor of both arms


def encode(arm: str, args, rows: list[dict]):
    """The ARC model of one arm and its frozen encoder's states [windows, m, hidden] (float32),
    cached in ``--states-dir`` under a key of everything they depend on."""
    from arc_encoder import ARCModel, EncoderConfig

    cfg = EncoderConfig(base_model=args.encoder, layers_removed=2, pooling_factor=PF, chunk_len=args.context_tokens,
                        attn_implementation="sdpa", sliding_window_layers=arm)
    model = ARCModel.from_base_model(cfg, torch_dtype=getattr(torch, args.dtype)).eval()
    key = hashlib.sha256(json.dumps([arm, args.dtype, args.encoder, [r["encoder_ids"] for r in rows]]).encode())
    path = Path(args.states_dir) / f"gemma_window_{arm}_{key.hexdigest()[:16]}.pt" if args.states_dir else None
    if path is not None and path.is_file():
        cached = torch.load(path)
        return model, cached["states"], cached["seconds"]
    t0 = time.perf_counter()
    states = []
    with torch.no_grad():
        for i in range(0, len(rows), args.encode_batch):
            ids = torch.tensor([r["encoder_ids"] for r in rows[i : i + args.encode_batch]])
            states.append(model.encoder(ids).hidden_states.float())
    states, seconds = torch.cat(states), round(time.perf_counter() - t0, 1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"states": states, "seconds": seconds}, path)
    return model, states, seconds


def probe_targets(rows: list[dict], emb: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pooled vector: the mean decoder embedding of the tokens of its group (local), whether the group
    has any, and the mean embedding of its whole window (global). [windows, m, dim] / [windows, m]."""
    local = torch.zeros(len(rows), groups, emb.shape[1])
    count = torch.zeros(len(rows), groups)
    for w, r in enumerate(rows):
        g = torch.tensor(r["group_of"])
        local[w].index_add_(0, g, emb[torch.tensor(r["context_ids"])])
        count[w].index_add_(0, g, torch.ones(len(g)))
    glob = torch.stack([emb[torch.tensor(r["context_ids"])].mean(0) for r in rows])[:, None].expand_as(local)
    return local / count.clamp(min=1)[..., None], count > 0, glob


def ridge(x: torch.Tensor, y: torch.Tensor, dev_x: torch.Tensor, dev_y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least squares x @ w ~ y with an L2 penalty chosen on (dev_x, dev_y), then refit on both; no bias
    (the reference projector has none)."""
    x, y, dev_x, dev_y = (t.double() for t in (x, y, dev_x, dev_y))
    best = None
    for lam in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        gram = x.T @ x
        w = torch.linalg.solve(gram + lam * gram.trace() / gram.shape[0] * torch.eye(gram.shape[0], dtype=x.dtype), x.T @ y)
        err = (dev_x @ w - dev_y).pow(2).sum().item()
        best = min(best or (err, lam), (err, lam))
    lam = best[1]
    ax, ay = torch.cat([x, dev_x]), torch.cat([y, dev_y])
    gram = ax.T @ ax
    w = torch.linalg.solve(gram + lam * gram.trace() / gram.shape[0] * torch.eye(gram.shape[0], dtype=x.dtype), ax.T @ ay)
    return w.float(), lam


def r2_per_window(pred: torch.Tensor, y: torch.Tensor, on: torch.Tensor) -> list[float]:
    """1 - SSE / SST per window, SST around the mean target of all the windows given."""
    mean = y[on].mean(0)
    sse = ((pred - y).pow(2).sum(-1) * on).sum(-1)
    sst = ((y - mean).pow(2).sum(-1) * on).sum(-1)
    return (1 - sse / sst).tolist()


def run_arm(arm: str, args, decoder, train: list[dict], held: list[dict]) -> tuple[dict, torch.Tensor]:
    from arc_encoder.layout import CompressedContext

    model, states, encode_s = encode(arm, args, train + held)
    encoder = model.encoder
    layers = [encoder.adapter.layer_kind(b) for b in encoder.blocks]
    window = encoder._window("sliding_attention")
    train_states, held_states = states[: len(train)], states[len(train):]
    scale = train_states.pow(2).mean().sqrt().item()
    train_x, held_x = train_states / scale, held_states / scale
    emb = decoder.get_input_embeddings()
    table = emb.weight.detach().float()
    groups = states.shape[1]

    # 1. linear probes (fit on the training windows, the last quarter choosing the penalty)
    probes = {}
    dev = len(train) * 3 // 4
    t_local, t_on, t_glob = probe_targets(train, table, groups)
    h_local, h_on, h_glob = probe_targets(held, table, groups)
    for name, ty, hy, ton, hon in (("local", t_local, h_local, t_on, h_on),
                                   ("global", t_glob, h_glob, torch.ones_like(t_on), torch.ones_like(h_on))):
        fit, dev_fit = ton[:dev], ton[dev:]
        w, lam = ridge(train_x[:dev][fit], ty[:dev][fit], train_x[dev:][dev_fit], ty[dev:][dev_fit])
        pred = held_x @ w
        cos = F.cosine_similarity(pred, hy, dim=-1)
        sst = (hy[hon] - hy[hon].mean(0)).pow(2).sum()
        probes[name] = {"r2_all_vectors": round(1 - ((pred - hy)[hon].pow(2).sum() / sst).item(), 4),
                        "cosine": summary([(c[o]).mean().item() for c, o in zip(cos, hon)]), "penalty": lam}
        if name == "local":  # the windows' target means differ little: per-window R^2 only for local targets
            probes[name]["per_window_r2"] = [round(v, 4) for v in r2_per_window(pred, hy, hon)]

    # 2. a fresh projector trained through the frozen decoder
    def nll_from(ctx: torch.Tensor, rows: list[dict], task: str, name: str) -> torch.Tensor:
        context = CompressedContext(ctx, torch.full((len(rows),), ctx.shape[1], dtype=torch.long), name)
        inp = model.build_decoder_inputs(emb, context, [[] for _ in rows], [r[task] for r in rows], task,
                                         [[] for _ in rows])
        return target_nll(decoder, inp.inputs_embeds, inp.attention_mask, inp.labels)

    warmup = max(1, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scores: dict[str, list[float]] = {}
    losses: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for seed in (int(x) for x in args.seeds.split(",")) if args.steps else ():
        torch.manual_seed(seed)  # the projector's init; ``gen`` below: the batches
        name = f"smollm2_seed{seed}"
        model.add_decoder(name, decoder, decoder_path=args.decoder)
        projector = model.projector(name).float()
        opt = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        losses[f"seed{seed}"] = []
        for step in range(args.steps):
            task = "reconstruction" if step % 2 == 0 else "continuation"
            idx = torch.randint(len(train), (args.batch,), generator=gen).tolist()
            for group in opt.param_groups:
                group["lr"] = args.lr * lr_at(step)
            loss = nll_from(projector(train_x[idx]), [train[i] for i in idx], task, name).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[f"seed{seed}"].append(round(loss.item(), 4))
            print(f"[{arm} seed {seed}] step {step + 1}/{args.steps} {task} loss {loss.item():.3f}", flush=True)
        with torch.no_grad():
            for task in ("reconstruction", "continuation"):
                key = f"{task}_seed{seed}"
                scores[key] = []
                for i in range(0, len(held), args.encode_batch):
                    rows = held[i : i + args.encode_batch]
                    scores[key] += nll_from(projector(held_x[i : i + args.encode_batch]), rows, task, name).tolist()
    train_s = time.perf_counter() - t0
    seeds = sorted({k.rsplit("_seed", 1)[1] for k in scores})
    for task in ("reconstruction", "continuation") if len(seeds) > 1 else ():
        per_seed = [scores[f"{task}_seed{seed}"] for seed in seeds]
        scores[f"{task}_mean_over_seeds"] = [sum(v) / len(v) for v in zip(*per_seed)]
    result = {
        "sliding_window_layers": arm,
        "band_tokens_each_side": window - 1 if window else None,
        "layer_types": layers,
        "state_rms": round(scale, 2),
        "encode_seconds": encode_s,
        "train_seconds": round(train_s, 1),
        "probes": {k: {a: b for a, b in v.items() if a != "per_window_r2"} for k, v in probes.items()},
        "train_losses": losses,
        "heldout_nll": {task: summary(v) for task, v in scores.items()},
        "per_window": {**{task: [round(x, 4) for x in v] for task, v in scores.items()},
                       "local_probe_r2": probes["local"]["per_window_r2"]},
    }
    return result, held_states


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arc_encoder.storage import atomic_write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", default="/work/models/gemma3", help="Gemma 3 HF directory")
    p.add_argument("--decoder", default="/work/models/smollm2", help="decoder HF directory (SmolLM2-135M)")
    p.add_argument("--context-tokens", type=int, default=1024, help="encoder tokens per window (paper chunk: 1024)")
    p.add_argument("--reconstruction-tokens", type=int, default=128, help="decoder tokens of the context scored")
    p.add_argument("--continuation-tokens", type=int, default=64, help="decoder tokens after the context scored")
    p.add_argument("--train-windows", type=int, default=32)
    p.add_argument("--heldout-windows", type=int, default=16)
    p.add_argument("--steps", type=int, default=150, help="projector steps (alternating reconstruction, continuation)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated: one projector run per seed (init and batches)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--encode-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--states-dir", default=".data/gemma_window", help="encoder states cache ('' for none)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of: band, full")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    enc_tok = AutoTokenizer.from_pretrained(args.encoder)
    dec_tok = AutoTokenizer.from_pretrained(args.decoder)
    w = dict(context=args.context_tokens, recon=args.reconstruction_tokens, cont=args.continuation_tokens, pf=PF)
    train = windows(enc_tok, dec_tok, corpus_text(["train"]), args.train_windows, **w)
    held = windows(enc_tok, dec_tok, corpus_text(["validation", "test"]), args.heldout_windows, **w)
    decoder = AutoModelForCausalLM.from_pretrained(args.decoder, dtype=getattr(torch, args.dtype),
                                                   attn_implementation="sdpa").eval()
    decoder.requires_grad_(False)

    sep = dec_tok("\n\n", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        baselines = {
            "reconstruction_no_context": summary(decoder_only_nll(decoder, [sep] * len(held),
                                                                  [x["reconstruction"] for x in held])),
            "continuation_no_context": summary(decoder_only_nll(decoder, [sep] * len(held),
                                                                [x["continuation"] for x in held])),
            "continuation_full_text": summary(decoder_only_nll(decoder, [x["context_ids"] for x in held],
                                                               [x["continuation"] for x in held])),
        }
    print("decoder alone:", baselines, flush=True)

    arms, states = {}, {}
    for arm in args.arms.split(","):
        arms[arm], states[arm] = run_arm(arm, args, decoder, train, held)
        print(arm, arms[arm]["probes"], arms[arm]["heldout_nll"], flush=True)

    comparison = {}
    if set(arms) >= {"band", "full"}:
        for key in arms["band"]["per_window"]:
            a, b = arms["band"]["per_window"][key], arms["full"]["per_window"][key]
            better = sum((x > y) if key.endswith("_r2") else (x < y) for x, y in zip(a, b))
            comparison[key] = {"band_minus_full": summary([x - y for x, y in zip(a, b)]), "windows_band_better": better}
        cos = F.cosine_similarity(states["band"], states["full"], dim=-1)  # [held, m]
        comparison["state_cosine_band_vs_full"] = {"mean": round(cos.mean().item(), 4),
                                                   "min": round(cos.min().item(), 4)}
    result = {
        "what": "Gemma 3 270M encoder (layers_removed=2, x4, frozen), sliding-window layers: band (HF bidirectional "
                "Gemma 3) vs full attention; linear probes of the pooled states, projector-only training into the "
                "frozen SmolLM2-135M; held-out NLL in nats/token",
        "command": "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in ["benchmarks/gemma_window.py",
                                                                               *(argv or sys.argv[1:])]),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "device": f"cpu, {args.threads} threads, {args.dtype}",
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "corpus": "arc_encoder/resources/pydoc_small (python3.11-doc, PSF-2.0): train split to fit, "
                  "validation + test to score",
        "decoder_alone": baselines,
        "arms": arms,
        "comparison": comparison,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(Path(args.output), result)
    print(json.dumps({"decoder_alone": baselines, "comparison": comparison}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
