"""Gemma 3 as encoder: which attention should its sliding-window layers get? The measurement
behind ``EncoderConfig.sliding_window_layers``.

Gemma 3 alternates sliding-window layers (window 512, local RoPE table) with full-attention
layers. With the causal mask removed, a sliding layer can either keep a band, as Hugging Face's
bidirectional Gemma 3 does (``use_bidirectional_attention``, EmbeddingGemma: token i sees j when
|i - j| < 512 // 2 + 1, i.e. 256 tokens each side), or attend over the whole chunk ("full").
At the paper's 1,024-token chunks the two differ for every token.

Both arms use the real models at their real configs: encoder = Gemma 3 270M minus its last 2
layers, pooling x4, 1,024-token context windows of held-out-split-free real text (the bundled
Python-docs corpus: windows from ``train`` to fit, from ``validation`` + ``test`` to score);
decoder = frozen SmolLM2-135M. The encoder is frozen (its states are computed once per arm),
only a fresh reference projector (640 -> 2048 -> 576, no bias, + its special tokens, same seed,
same batches in the same order in both arms) is trained, alternating reconstruction and
continuation batches. Scored on the same held-out windows: reconstruction NLL of the first
``--reconstruction-tokens`` decoder tokens of the context, continuation NLL of the next
``--continuation-tokens``; per window, so the arms are compared pairwise. The decoder alone gives
the scale: no context (closed book) and, for continuation, the full text (open book).

Gemma's states are large (RMS ~ 500 after 16 layers, no final norm): each arm's states are
divided by one scalar, their RMS over the training windows (a fixed rescale the projector could
learn itself; it only saves steps).

    PYTHONPATH=. python benchmarks/gemma_window.py --output benchmarks/results/gemma3_sliding_window_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
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


def windows(enc_tok, dec_tok, text: str, count: int, context: int, recon: int, cont: int) -> list[dict]:
    """``count`` evenly spaced windows: ``context`` encoder tokens, the decoder's first ``recon`` tokens
    of that text, and the decoder's first ``cont`` tokens of the text that follows it."""
    ids = enc_tok(text, add_special_tokens=False)["input_ids"]
    span = context + 4 * cont  # enough encoder tokens for ``cont`` decoder tokens
    starts = torch.linspace(0, len(ids) - span, count).long().tolist()
    if len(ids) < span * count:
        raise ValueError(f"the text holds {len(ids)} tokens: too few for {count} windows of {span}")
    out = []
    for s in starts:
        ctx = ids[s : s + context]
        ctx_text = enc_tok.decode(ctx)
        follow = enc_tok.decode(ids[s + context : s + span])
        out.append({
            "encoder_ids": ctx,
            "context_ids": dec_tok(ctx_text, add_special_tokens=False)["input_ids"],
            "reconstruction": dec_tok(ctx_text, add_special_tokens=False)["input_ids"][:recon],
            "continuation": dec_tok(follow, add_special_tokens=False)["input_ids"][:cont],
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


def run_arm(arm: str, args, dec_tok, decoder, train: list[dict], held: list[dict]) -> tuple[dict, torch.Tensor]:
    from arc_encoder import ARCModel, EncoderConfig
    from arc_encoder.model import CompressedContext

    dtype = getattr(torch, args.dtype)
    cfg = EncoderConfig(base_model=args.encoder, layers_removed=2, pooling_factor=4, chunk_len=args.context_tokens,
                        attn_implementation="sdpa", sliding_window_layers=arm)
    model = ARCModel.from_base_model(cfg, torch_dtype=dtype).eval()
    encoder = model.encoder
    layers = [encoder.adapter.layer_kind(b) for b in encoder.blocks]
    t0 = time.perf_counter()
    states = []
    with torch.no_grad():
        for i in range(0, len(train) + len(held), args.encode_batch):
            rows = (train + held)[i : i + args.encode_batch]
            ids = torch.tensor([w["encoder_ids"] for w in rows])
            states.append(encoder(ids).hidden_states.float())
    states = torch.cat(states)  # [windows, 256, 640]
    encode_s = time.perf_counter() - t0
    train_states, held_states = states[: len(train)], states[len(train):]
    scale = train_states.pow(2).mean().sqrt().item()

    torch.manual_seed(args.seed)
    model.add_decoder("smollm2", decoder, decoder_path=args.decoder)
    projector = model.projector("smollm2").float()
    emb = decoder.get_input_embeddings()
    opt = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def batch_nll(rows: list[dict], st: torch.Tensor, task: str) -> torch.Tensor:
        ctx = projector(st / scale)  # [b, 256, 576]
        context = CompressedContext(ctx, torch.full((len(rows),), ctx.shape[1], dtype=torch.long), "smollm2")
        inp = model.build_decoder_inputs(emb, context, [[] for _ in rows], [w[task] for w in rows], task,
                                         [[] for _ in rows])
        return target_nll(decoder, inp.inputs_embeds, inp.attention_mask, inp.labels)

    gen = torch.Generator().manual_seed(args.seed)
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        task = "reconstruction" if step % 2 == 0 else "continuation"
        idx = torch.randint(len(train), (args.batch,), generator=gen).tolist()
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_at(step)
        loss = batch_nll([train[i] for i in idx], train_states[idx], task).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 4))
        print(f"[{arm}] step {step + 1}/{args.steps} {task} loss {loss.item():.3f}", flush=True)
    train_s = time.perf_counter() - t0

    scores: dict[str, list[float]] = {}
    with torch.no_grad():
        for task in ("reconstruction", "continuation"):
            scores[task] = []
            for i in range(0, len(held), args.encode_batch):
                scores[task] += batch_nll(held[i : i + args.encode_batch], held_states[i : i + args.encode_batch],
                                          task).tolist()
    result = {
        "sliding_window_layers": arm,
        "band_tokens_each_side": (encoder._window("sliding_attention") - 1) if arm == "band" else None,
        "layer_types": layers,
        "state_rms": round(scale, 2),
        "encode_seconds": round(encode_s, 1),
        "train_seconds": round(train_s, 1),
        "train_loss_first_last": [losses[:2], losses[-2:]],
        "train_losses": losses,
        "heldout": {task: summary(v) for task, v in scores.items()},
        "per_window": {task: [round(x, 4) for x in v] for task, v in scores.items()},
    }
    del model
    return result, held_states


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arc_encoder.storage import atomic_write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", default="/work/models/gemma3", help="Gemma 3 HF directory (default /work/models/gemma3)")
    p.add_argument("--decoder", default="/work/models/smollm2", help="decoder HF directory (default SmolLM2-135M)")
    p.add_argument("--context-tokens", type=int, default=1024, help="encoder tokens per window (paper chunk: 1024)")
    p.add_argument("--reconstruction-tokens", type=int, default=128, help="decoder tokens of the context scored")
    p.add_argument("--continuation-tokens", type=int, default=64, help="decoder tokens after the context scored")
    p.add_argument("--train-windows", type=int, default=48)
    p.add_argument("--heldout-windows", type=int, default=24)
    p.add_argument("--steps", type=int, default=60, help="projector steps (alternating reconstruction, continuation)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--encode-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of: band, full")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    enc_tok = AutoTokenizer.from_pretrained(args.encoder)
    dec_tok = AutoTokenizer.from_pretrained(args.decoder)
    w = dict(context=args.context_tokens, recon=args.reconstruction_tokens, cont=args.continuation_tokens)
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
        arms[arm], states[arm] = run_arm(arm, args, dec_tok, decoder, train, held)
        print(arm, arms[arm]["heldout"], flush=True)

    comparison = {}
    if set(arms) >= {"band", "full"}:
        for task in ("reconstruction", "continuation"):
            a, b = arms["band"]["per_window"][task], arms["full"]["per_window"][task]
            comparison[f"{task}_band_minus_full"] = summary([x - y for x, y in zip(a, b)])
            comparison[f"{task}_windows_band_better"] = sum(x < y for x, y in zip(a, b))
        cos = F.cosine_similarity(states["band"], states["full"], dim=-1)  # [held, 256]
        comparison["state_cosine_band_vs_full"] = {"mean": round(cos.mean().item(), 4),
                                                   "min": round(cos.min().item(), 4)}
    result = {
        "what": "Gemma 3 270M encoder (layers_removed=2, x4), sliding-window layers: band (HF bidirectional) "
                "vs full attention; projector-only training into frozen SmolLM2-135M; held-out NLL (nats/token)",
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
    print(json.dumps({"decoder_alone": baselines, "heldout": {a: r["heldout"] for a, r in arms.items()},
                      "comparison": comparison}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
