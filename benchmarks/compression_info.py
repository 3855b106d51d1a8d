"""Information kept by compression, and entropy-adaptive pooling, on the quality benchmark's data.

Two questions, on real held-out text (the Python 3.11 docs, TEST split):

1. Does the task-agnostic estimate predict downstream quality? Train an encoder with mixed
   pooling factors (2, 4, 8 per sample) and one with fixed pooling 4 against decoder A, in
   stages (checkpoints after each), then score every (checkpoint, pooling factor) with
   ``arc_encoder.info``: bits recovered per token / per vector, share of H(text) kept
   (reconstruction, no labels) vs continuation loss, gap closed and EM@k (downstream).
   Reports Pearson and Spearman correlations over all points, and a rate-distortion curve.
2. Entropy-adaptive vs fixed pooling at EQUAL average rate (same total vectors), on the
   final mixed checkpoint: fixed x4; adaptive plans scored by the decoder's NLL
   (strength 1, 2, 4) and by zlib (strength 2); two controls with the strength-2 plan's
   exact factor mix: shuffled across samples, and inverted (dense text gets the coarse
   factors); and an oracle that picks each sample's factor from its own test loss (an
   upper bound on what any chunk score could gain). Gains are paired per sample against
   fixed x4 (mean +- standard error); fixed x2 and x8 are listed as references at 2x and
   0.5x the vectors.

Same script on CPU (`--preset tiny`, minutes) and GPU (`--preset gpu`). Writes
benchmarks/results/info_<device>.json and a .png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Decoder A and the training scale of each preset: the settings of the quality benchmark these
# numbers were measured with (benchmarks/quality.py, since retired; results/info_*.json record them).
SCALES = {
    "tiny": dict(lm_a=dict(vocab_size=1024, hidden_size=96, num_layers=4, num_heads=4, num_kv_heads=2,
                           intermediate_size=256, seq_len=128, batch_size=16, max_steps=300, lr=3e-3),
                 layers_removed=1, context_tokens=64, target_tokens=32, batch_size=8, projector_hidden=256,
                 lr=1e-3, projector_lr_ratio=5.0, warmup=20),
    "gpu": dict(lm_a=dict(vocab_size=8192, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2,
                          intermediate_size=1024, seq_len=512, batch_size=256, max_steps=200, lr=2e-3),
                layers_removed=2, context_tokens=256, target_tokens=64, batch_size=128, projector_hidden=2048,
                lr=1e-3, projector_lr_ratio=5.0, warmup=50),
}
PRESETS = {
    "tiny": dict(base="tiny", stages=(150, 400, 1000), eval_samples=256, eval_batch=32, em_k=2),
    "gpu": dict(base="gpu", stages=(100, 300, 900), eval_samples=1024, eval_batch=128, em_k=2),
}


def data_config(args, scale: dict):
    """Training and validation text: the data directory's train and validation splits."""
    from arc_encoder_train.config import DataConfig

    d = Path(args.data_dir)
    return DataConfig(train_files=[str(d / "train.jsonl.gz")], validation_files=[str(d / "validation.jsonl.gz")],
                      context_tokens=scale["context_tokens"], target_tokens=scale["target_tokens"],
                      batch_size=scale["batch_size"], val_batches=2, reconstruction_ratio=0.3)


def train_decoder_a(args, scale: dict) -> str:
    """Decoder A: a small LM trained on the data (once per --work-dir) with the shipped `lm` job."""
    from arc_encoder_train.config import TinyLMConfig
    from arc_encoder_train.lm import is_decoder_dir, train_lm

    out = Path(args.work_dir) / "decoders" / "A"
    if not is_decoder_dir(out):
        train_lm(TinyLMConfig(out_dir=str(out), **scale["lm_a"]), data_config(args, scale),
                 progress=not args.no_progress)
    return str(out)
FACTORS = (2, 4, 8)
METRICS_X = ("bits_recovered_per_token", "info_retained", "bits_per_vector")
METRICS_Y = ("loss_compressed", "gap_closed", "em_at_k", "cont_acc")


def train_staged(args, preset: dict, name: str, dec_a: str, factors: tuple[int, ...], stages) -> list[tuple[int, str]]:
    """Pretrain in stages (resuming; one LR schedule over the last stage); copy the checkpoint after each."""
    from arc_encoder.config import EncoderConfig, ProjectorOptions
    from arc_encoder_train.config import DecoderConfig, OptimConfig, PretrainConfig, RunConfig, TrainerConfig
    from arc_encoder_train.jobs import pretrain

    q = SCALES[preset["base"]]
    ck_dir = Path(args.work_dir) / "checkpoints"
    out = []
    for i, steps in enumerate(stages):
        copy = ck_dir / f"{name}-step{steps}"
        if copy.is_dir():
            print(f"reusing {copy} (trained by an earlier call with this --work-dir)", flush=True)
        else:
            cfg = PretrainConfig(
                encoder=EncoderConfig(base_model=dec_a, layers_removed=q["layers_removed"], pooling_factor=4,
                                      pooling_factors=tuple(factors), chunk_len=q["context_tokens"] * 4),
                decoders=[DecoderConfig(name="A", path=dec_a, projector=ProjectorOptions(hidden_dim=q["projector_hidden"]),
                                      dtype="bfloat16" if torch.cuda.is_available() else "float32")],
                data=data_config(args, q),
                optim=OptimConfig(lr=q["lr"], projector_lr_ratio=q["projector_lr_ratio"], warmup_steps=q["warmup"],
                                total_steps=stages[-1]),
                trainer=TrainerConfig(max_steps=steps, val_check_interval=stages[-1] + 1,
                                    checkpoint_every_n_steps=math.gcd(*stages), progress_bar=not args.no_progress),
                run=RunConfig(name=name, runs_dir=str(Path(args.work_dir) / "runs"), checkpoints_dir=str(ck_dir),
                            resume=i > 0),
            )
            print(pretrain(cfg), flush=True)
            shutil.copytree(ck_dir / name, copy)
        out.append((steps, str(copy)))
    return out


def paired(base_rows, rows) -> dict:
    """Continuation loss gain of ``rows`` over ``base_rows`` (nats/token) with its standard error.

    Token-weighted like the losses themselves (sum of per-sample NLL differences over all
    scored tokens), so the gain equals the difference of the reported losses; the standard
    error is the ratio estimator's, treating samples as the independent units.
    """
    pairs = [(a - b, n) for a, b, n in zip(base_rows.nll, rows.nll, rows.tokens) if n > 0]
    total = sum(n for _, n in pairs)
    gain = sum(d for d, _ in pairs) / total
    k = len(pairs)
    resid = sum((d - gain * n) ** 2 for d, n in pairs)
    se = math.sqrt(resid * k / (k - 1)) / total if k > 1 else float("nan")
    return {"gain_nats_per_token": gain, "standard_error": se, "samples": k}


def oracle_plan(nll_by_pf: dict[int, list[float]], tokens: list[int], budget: int) -> list[int]:
    """Per-sample factors that minimise a given per-sample loss within the vector budget.

    Greedy on gain per extra vector from the coarsest factor up (a multiple-choice knapsack).
    Fed the first half of each sample's continuation loss and scored on the second half, it
    estimates what the best possible per-sample choice gains, without selecting on noise.
    """
    from arc_encoder.adaptive import vectors_for

    fs = sorted(nll_by_pf)
    choice = [fs[-1]] * len(tokens)
    used = sum(vectors_for(t, fs[-1]) for t in tokens)
    while True:
        best = None
        for i, t in enumerate(tokens):
            for f in fs:
                if f >= choice[i]:
                    continue
                extra = vectors_for(t, f) - vectors_for(t, choice[i])
                gain = nll_by_pf[choice[i]][i] - nll_by_pf[f][i]
                if gain > 0 and used + extra <= budget and (best is None or gain / extra > best[0]):
                    best = (gain / extra, i, f, extra)
        if best is None:
            return choice
        _, i, f, extra = best
        choice[i] = f
        used += extra


def adaptive_study(ev, model, decoder, dec_tok, target: float = 4.0) -> tuple[list[dict], list[dict]]:
    """Fixed x4 vs adaptive plans vs controls, all at the same total number of vectors.

    Also returns references at other rates (fixed x2 and x8), whose per-sample losses feed
    the oracle allocation.
    """
    from arc_encoder.adaptive import AdaptivePooling, decoder_scorer, plan_pooling, vectors_for, zlib_scorer

    ids = ev.all_encoder_ids()
    rows, references, nll_by_pf, full_by_pf = [], [], {}, {}
    for pf in FACTORS:
        if pf != int(target):
            point = ev.point(pf, label=f"fixed x{pf} (reference rate)").to_dict()
            nll_by_pf[pf] = ev.last_rows["cont"].nll_head
            full_by_pf[pf] = ev.last_rows["cont"].nll
            references.append(point)
    point = ev.point(int(target), label=f"fixed x{int(target)}").to_dict()
    base_rows = ev.last_rows["cont"]
    nll_by_pf[int(target)] = base_rows.nll_head
    rows.append({**point, "paired_vs_fixed": paired(base_rows, base_rows)})
    for r in references:
        r["paired_vs_fixed"] = paired(base_rows, type(base_rows)(full_by_pf[r["pooling_factor"]], base_rows.tokens,
                                                                  base_rows.correct, base_rows.prefix_exact))
    chunk_texts = model.tokenizer.batch_decode(ids)  # one chunk per sample at this chunk_len
    bits = decoder_scorer(decoder, dec_tok)(chunk_texts)  # scored once, reused by every strength
    known = dict(zip(chunk_texts, bits))

    def dnll(texts):
        return [known[t] for t in texts]

    density = [b / len(x) for b, x in zip(bits, ids)]
    plans = {}
    for label, scorer, strength in (("adaptive decoder-NLL s=1", dnll, 1.0), ("adaptive decoder-NLL s=2", dnll, 2.0),
                                    ("adaptive decoder-NLL s=4", dnll, 4.0), ("adaptive zlib s=2", zlib_scorer, 2.0)):
        plans[label] = plan_pooling(model, ids, AdaptivePooling(FACTORS, target, "zlib", strength), scorer)
    # Controls keep the s=2 plan's exact factor mix (same vectors) but not its assignment.
    mix = [p[0] for p in plans["adaptive decoder-NLL s=2"]]
    rng = random.Random(0)
    shuffled = mix[:]
    rng.shuffle(shuffled)
    plans["control: shuffled mix"] = [[f] for f in shuffled]
    order = sorted(range(len(ids)), key=lambda i: density[i])  # least dense first
    inverted = [0] * len(ids)
    for rank, i in enumerate(order):  # least dense gets the finest factor
        inverted[i] = sorted(mix)[rank]
    plans["control: inverted"] = [[f] for f in inverted]
    budget = sum(vectors_for(len(x), int(target)) for x in ids)
    oracle = "oracle (chosen on 1st half of each continuation)"
    plans[oracle] = [[f] for f in oracle_plan(nll_by_pf, [len(x) for x in ids], budget)]
    for label, plan in plans.items():
        point = ev.point(plan, label=label).to_dict()
        rows.append({**point, "paired_vs_fixed": paired(base_rows, ev.last_rows["cont"])})
        # Every plan is also compared on the 2nd half of the continuations: the oracle's honest score.
        rows[-1]["paired_vs_fixed_2nd_half"] = paired(base_rows.tail(), ev.last_rows["cont"].tail())
    rows[0]["paired_vs_fixed_2nd_half"] = paired(base_rows.tail(), base_rows.tail())
    return rows, references


def correlations(points: list[dict]) -> dict:
    from arc_encoder.info import pearson, spearman

    out = {}
    for x in METRICS_X:
        for y in METRICS_Y:
            xs, ys = [p[x] for p in points], [p[y] for p in points]
            out[f"{x} vs {y}"] = {"pearson": pearson(xs, ys), "spearman": spearman(xs, ys), "points": len(xs)}
    return out


def plot(res: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    pts = res["points"]
    for run in sorted({p["run"] for p in pts}):
        for step in sorted({p["step"] for p in pts if p["run"] == run}):
            sel = sorted((p for p in pts if p["run"] == run and p["step"] == step), key=lambda p: p["rate_vectors_per_token"])
            a.plot([p["rate_vectors_per_token"] for p in sel], [p["loss_compressed"] for p in sel],
                   "o-" if run == "mixed" else "s", label=f"{run} @ {step} steps")
    for r in res["adaptive"][1:5]:  # the oracle is left out: its full-data loss selected on its labels
        a.plot([r["rate_vectors_per_token"]], [r["loss_compressed"]], "*", ms=12, label=r["label"])
    a.axhline(pts[0]["loss_none"], color="tab:red", ls="--", label="no context")
    a.axhline(pts[0]["loss_full"], color="tab:green", ls="--", label="full text")
    a.set_xscale("log", base=2)
    a.set(xlabel="rate: vectors per original token", ylabel="continuation loss (nats/token)",
          title="rate-distortion (test split)")
    a.legend(fontsize=6, loc="best")
    for pf, marker in zip(FACTORS, "o^s"):
        sel = [p for p in pts if p["pooling_factor"] == pf]
        b.scatter([p["bits_recovered_per_token"] for p in sel], [p["loss_compressed"] for p in sel], marker=marker,
                  label=f"x{pf}")
    cr = res["correlations"]["bits_recovered_per_token vs loss_compressed"]
    b.set(xlabel="bits recovered per original token (no labels)", ylabel="continuation loss (downstream)",
          title=f"Pearson {cr['pearson']:.2f}, Spearman {cr['spearman']:.2f}, n={cr['points']}")
    b.legend(fontsize=7)
    rows = res["adaptive"][1:] + res["adaptive_references"]
    ys = range(len(rows))
    # The oracle chose on the 1st half of each continuation: show its gain on the 2nd half.
    gains = [r["paired_vs_fixed_2nd_half" if r["label"].startswith("oracle") else "paired_vs_fixed"] for r in rows]
    c.barh(list(ys), [g["gain_nats_per_token"] for g in gains], xerr=[g["standard_error"] for g in gains],
           color=["tab:orange" if r["label"].startswith("oracle") else "tab:blue" for r in rows])
    c.set_yticks(list(ys), [f"{r['label']} ({r['rate_vectors_per_token']:.3f} v/t)" for r in rows], fontsize=7)
    c.axvline(0, color="k", lw=0.8)
    c.set(xlabel="continuation loss gain vs fixed x4 (nats/token, +- SE)", title="vs fixed x4 at equal rate")
    fig.suptitle(f"compression info + adaptive pooling, {res['device']}, {res['date']}")
    fig.tight_layout()
    from arc_encoder.storage import atomic_save_figure

    atomic_save_figure(fig, path, dpi=120)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "tiny")
    p.add_argument("--data-dir", default=str(REPO / "arc_encoder" / "resources" / "pydoc_small"))
    p.add_argument("--work-dir", default="runs/info")
    p.add_argument("--decoder-a", default="", help="local LM as decoder A (default: train one with the lm job)")
    p.add_argument("--stages", default="", help="override the preset's training stages, e.g. 100,300,900")
    p.add_argument("--output", default="")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.stages:
        preset["stages"] = tuple(int(x) for x in args.stages.split(","))
    q = SCALES[preset["base"]]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'cpu'}, {os.cpu_count()} cores)"
    t_start = time.time()
    dec_a = args.decoder_a or train_decoder_a(args, q)
    runs = {"mixed": train_staged(args, preset, "mixed", dec_a, FACTORS, preset["stages"]),
            "fixed4": train_staged(args, preset, "fixed4", dec_a, (4,), preset["stages"])}
    t_train = time.time() - t_start

    from arc_encoder import ARCModel
    from arc_encoder.corpus import DocumentStream
    from arc_encoder.info import InfoEvaluator, eval_batches
    from arc_encoder.decoders import compute_dtype, load_frozen_decoder
    from arc_encoder.storage import atomic_write_json

    decoder, dec_tok = load_frozen_decoder(dec_a, device, compute_dtype(device))
    texts = DocumentStream.from_corpus(Path(args.data_dir) / "test.jsonl.gz").texts
    ev = None
    points = []
    t0 = time.time()
    for run, stages in runs.items():
        for step, ck in stages:
            model = ARCModel.from_pretrained(ck, decoders=["A"], device=device).eval()
            if ev is None:
                batches = eval_batches(texts, model, "A", dec_tok, q["context_tokens"], q["target_tokens"],
                                       preset["eval_samples"], preset["eval_batch"])
                ev = InfoEvaluator(model, decoder, batches, em_k=preset["em_k"],
                                   autocast_dtype=torch.bfloat16 if device == "cuda" else None)
            ev.model = model
            for pf in model.encoder.config.trained_pooling_factors:
                points.append({"run": run, "step": step, **ev.point(pf).to_dict()})
                print(f"{run} step {step} x{pf}: bits recovered/token {points[-1]['bits_recovered_per_token']:.3f}, "
                      f"loss {points[-1]['loss_compressed']:.3f}", flush=True)
    final = ARCModel.from_pretrained(runs["mixed"][-1][1], decoders=["A"], device=device).eval()
    ev.model = final
    adaptive, references = adaptive_study(ev, final, decoder, dec_tok)
    res = {
        "benchmark": "compression_info",
        "command": "python benchmarks/compression_info.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": dt.date.today().isoformat(), "device": device_name, "torch": torch.__version__,
        "preset": preset, "quality_preset": q,
        "data": {"dir": args.data_dir, "scored_on": "test split", "samples": sum(len(b) for b in ev.batches),
                 "context_tokens": q["context_tokens"], "target_tokens": q["target_tokens"]},
        "decoder_a": dec_a, "pooling_factors": FACTORS,
        "points": points, "correlations": correlations(points), "adaptive": adaptive,
        "adaptive_references": references,
        "wall_seconds": {"train": round(t_train, 1), "eval": round(time.time() - t0, 1),
                         "total": round(time.time() - t_start, 1)},
    }
    tag = "cpu" if device == "cpu" else torch.cuda.get_device_name().split()[-1].lower().replace("/", "-")
    out = Path(args.output or REPO / "benchmarks" / "results" / f"info_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, res)
    print(plot(res, out.with_suffix(".png")))
    print("\ncorrelation over", len(points), "points (checkpoints x pooling factors):")
    for k, v in res["correlations"].items():
        print(f"  {k:<46} pearson {v['pearson']:+.3f}  spearman {v['spearman']:+.3f}")
    print("\nequal-rate comparison on the final mixed checkpoint:")
    for r in adaptive + references:
        g, h = r["paired_vs_fixed"], r.get("paired_vs_fixed_2nd_half")
        half = f"  2nd-half gain {h['gain_nats_per_token']:+.4f} +- {h['standard_error']:.4f}" if h else ""
        print(f"  {r['label'][:34]:<35} vec/tok {r['rate_vectors_per_token']:.4f}  loss {r['loss_compressed']:.4f}  "
              f"gain {g['gain_nats_per_token']:+.4f} +- {g['standard_error']:.4f}{half}  mix {r['factor_counts']}")
    print(f"wrote {out} in {res['wall_seconds']['total']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
