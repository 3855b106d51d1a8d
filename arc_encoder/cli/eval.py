"""`arc-encoder eval info`: how much of a text survives compression, with no downstream task.

Scores a checkpoint + frozen decoder on (context, continuation) windows of any corpus at one
or several pooling factors (a rate-distortion curve), chunk lengths, and entropy-adaptive
plans; writes JSON (the planner's quality curve, `arc-encoder plan --quality`) and a plot.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
from pathlib import Path
from typing import get_args

from ..cache.names import CorpusFormat
from .common import (
    add_adaptive_args,
    add_allow_other_decoder_arg,
    add_device_arg,
    adaptive_policies,
    checkpoint_inputs,
    int_list,
    output_file,
    positive_int,
    pyplot,
    resolve_device,
)


def cmd_info(args: argparse.Namespace) -> int:
    if args.plot:
        pyplot()  # fails before any work when matplotlib is missing
    import torch
    from tqdm.auto import tqdm

    from ..adaptive import chunk_scorer, plan_pooling
    from ..cache.build import DocumentStream
    from ..info import InfoEvaluator, chunk_len_override, eval_batches
    from ..model import ARCModel, compute_dtype
    from ..checkpoint import read_config
    from ..storage import atomic_write_json

    inputs = {"--data corpus": args.data, **checkpoint_inputs(args.checkpoint, args.decoder, args.decoder_path)}
    if args.output is not None:
        output_file(args.output, "--output", inputs)
    if args.plot is not None:
        output_file(args.plot, "--plot", {**inputs, "--output file": args.output})
    policies = adaptive_policies(args, read_config(args.checkpoint).encoder)  # bad flags fail before any load
    stream = DocumentStream.from_corpus(args.data, args.format)
    device = resolve_device(args.device)
    model = ARCModel.from_pretrained(args.checkpoint, decoders=[args.decoder], device=device).eval()
    decoder, dec_tok, dec_path = model.load_decoder(args.decoder, args.decoder_path, device, compute_dtype(device),
                                                    allow_other_decoder=args.allow_other_decoder)
    batches = eval_batches(stream.texts, model, args.decoder, dec_tok, args.context_tokens,
                           args.target_tokens, args.max_samples, args.batch_size)
    if not batches:
        raise ValueError(f"{args.data}: no document has {args.context_tokens}+{args.target_tokens} decoder tokens")
    ev = InfoEvaluator(model, decoder, batches, em_k=args.em_k,
                       autocast_dtype=torch.bfloat16 if device.startswith("cuda") else None)
    enc = model.encoder.config
    trained = enc.trained_pooling_factors
    pfs = args.pooling_factors or list(trained)
    chunk_lens = args.chunk_lens or [enc.chunk_len]
    jobs: list[tuple[str, object, int]] = [(f"pf{pf}", pf, c) for c in chunk_lens for pf in pfs]
    jobs += [(f"adaptive-{p.density}", p, c) for c in chunk_lens for p in policies]
    points = []
    with torch.no_grad():
        for label, what, chunk in tqdm(jobs, desc="eval info", unit="point", disable=args.no_progress):
            if isinstance(what, int):
                plan = what
            else:
                scorer = chunk_scorer(what, decoder, dec_tok)
                with chunk_len_override(model, chunk):
                    plan = plan_pooling(model, ev.all_encoder_ids(), what, scorer)
            point = ev.point(plan, chunk_len=chunk, label=label).to_dict()
            point["trained_factor"] = not enc.untrained_factors([what]) if isinstance(what, int) else True
            points.append(point)
    result = {
        "benchmark": "info",
        "command": "arc-encoder eval info " + " ".join(shlex.quote(a) for a in args.argv),
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "decoder": args.decoder,
        "decoder_path": dec_path,
        "data": str(Path(args.data).resolve()),
        "context_tokens": args.context_tokens,
        "target_tokens": args.target_tokens,
        "trained_pooling_factors": list(trained),
        "points": points,
    }
    print(format_table(points))
    if args.output:
        atomic_write_json(args.output, result)
        print(f"wrote {args.output}")
    if args.plot:
        print(plot_info(result, Path(args.plot)))
    return 0


def format_table(points: list[dict]) -> str:
    head = (f"{'point':<22}{'chunk':>6}{'vec/tok':>8}{'bits/tok':>9}{'recov':>7}{'bits/vec':>9}"
            f"{'kept%':>7}{'loss':>7}{'gap%':>6}{'EM@k':>6}")
    rows = [head]
    for p in points:
        flag = "" if p.get("trained_factor", True) else " (untrained)"
        rows.append(f"{p['label'] + flag:<22}{p['chunk_len']:>6}{p['rate_vectors_per_token']:>8.3f}"
                    f"{p['bits_none_per_token']:>9.2f}{p['bits_recovered_per_token']:>7.2f}"
                    f"{p['bits_per_vector']:>9.2f}{100 * p['info_retained']:>7.1f}{p['loss_compressed']:>7.3f}"
                    f"{100 * p['gap_closed']:>6.0f}{p['em_at_k']:>6.2f}")
    if points:
        p = points[0]
        rows.append(f"closed book loss {p['loss_none']:.3f}, open book {p['loss_full']:.3f} (nats/token); "
                    f"bits/tok = H(text) per token with no context; recov = bits recovered per token")
    negative = [p["label"] for p in points if p["bits_recovered_per_token"] < 0]
    if negative:
        rows.append(f"negative recov ({', '.join(negative)}): reading the text back from the vectors, the decoder "
                    "predicts it worse than with no context at all: the vectors carry less than nothing it can use "
                    "(an untrained or mismatched projector, or a decoder that does not read its context)")
    return "\n".join(rows)


def plot_info(result: dict, path: Path) -> str:
    """Rate-distortion (continuation loss vs vectors per token) and bits recovered vs rate."""
    plt = pyplot()
    pts = result["points"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for chunk in sorted({p["chunk_len"] for p in pts}):
        fixed = sorted((p for p in pts if not p["adaptive"] and p["chunk_len"] == chunk),
                       key=lambda p: p["rate_vectors_per_token"])
        xs = [p["rate_vectors_per_token"] for p in fixed]
        a.plot(xs, [p["loss_compressed"] for p in fixed], "o-", label=f"fixed pooling, chunk {chunk}")
        b.plot(xs, [p["bits_recovered_per_token"] for p in fixed], "o-", label=f"fixed, chunk {chunk}")
        for p in fixed:
            a.annotate(f"x{p['pooling_factor']}", (p["rate_vectors_per_token"], p["loss_compressed"]), fontsize=7)
    for p in (p for p in pts if p["adaptive"]):
        a.plot([p["rate_vectors_per_token"]], [p["loss_compressed"]], "*", ms=11, label=p["label"])
        b.plot([p["rate_vectors_per_token"]], [p["bits_recovered_per_token"]], "*", ms=11, label=p["label"])
    if pts:
        a.axhline(pts[0]["loss_none"], color="tab:red", ls="--", label="no context")
        a.axhline(pts[0]["loss_full"], color="tab:green", ls="--", label="full text")
        b.axhline(pts[0]["bits_none_per_token"], color="tab:gray", ls=":", label="H(text) per token")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rate: compressed vectors per original token")
        ax.legend(fontsize=7)
    a.set_ylabel("distortion: continuation loss (nats/token)")
    b.set_ylabel("bits recovered per original token")
    fig.suptitle(f"{Path(result['checkpoint']).name} -> {result['decoder']} ({result['device']}, {result['date']})")
    fig.tight_layout()
    from ..storage import atomic_save_figure

    atomic_save_figure(fig, path, dpi=120)
    return f"wrote {path}"


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Register `eval` and its subcommands on the `arc-encoder` parser."""
    p = sub.add_parser("eval", help="task-agnostic evaluation: information kept by compression",
                       description=__doc__.split("\n\n")[1])
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    i = eval_sub.add_parser(
        "info", help="bits of the text recoverable per vector, rate-distortion over pooling factors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="For each (context, continuation) window: H(text) = the decoder's NLL of the "
        "context with no context, H(text|vectors) = its NLL reading the compressed context back "
        "(reconstruction marker). Bits recovered = their difference, per original token and per "
        "vector; plus continuation loss with no / compressed / full-text context (distortion) at "
        "each rate (vectors per original token). No labels or downstream task needed.",
        epilog="example:\n  arc-encoder eval info checkpoints/tiny --decoder tiny --data corpus.jsonl.gz \\\n"
        "      --pooling-factors 2,4,8 --output info.json --plot info.png")
    i.add_argument("checkpoint", help="arc-encoder checkpoint directory")
    i.add_argument("--decoder", required=True, help="projector name (see `arc-encoder info`)")
    i.add_argument("--decoder-path", help="local HF decoder (default: the path recorded in the checkpoint)")
    i.add_argument("--data", required=True, help="corpus: JSONL/JSON(.gz), parquet or .txt (field 'text')")
    i.add_argument("--format", choices=get_args(CorpusFormat), default="auto", help="corpus format (default: from the suffix)")
    i.add_argument("--pooling-factors", type=int_list, default=None,
                   help="rate-distortion points (default: the factors the encoder was trained with)")
    i.add_argument("--chunk-lens", type=int_list, default=None,
                   help="also vary the chunk length (default: the checkpoint's)")
    i.add_argument("--context-tokens", type=positive_int, default=128, help="decoder tokens per context window")
    i.add_argument("--target-tokens", type=positive_int, default=32, help="continuation tokens scored after it")
    i.add_argument("--max-samples", type=positive_int, default=256, help="(context, continuation) windows scored at most (default 256)")
    i.add_argument("--batch-size", type=positive_int, default=16, help="windows per forward pass (default 16)")
    i.add_argument("--em-k", type=positive_int, default=4, help="EM@k: the first k continuation tokens exactly")
    add_device_arg(i)
    add_allow_other_decoder_arg(i)
    add_adaptive_args(i, several=True)
    i.add_argument("--output", help="JSON file (also the planner's --quality curve)")
    i.add_argument("--plot", help="PNG: rate-distortion and bits recovered vs rate")
    i.add_argument("--no-progress", action="store_true", help="no progress bar")
    i.set_defaults(func=cmd_info)
