"""`arc-encoder eval info|make-qa|qa`: what survives compression, with and without a task.

`info` scores a checkpoint + frozen decoder on (context, continuation) windows of any corpus at
one or several pooling factors (a rate-distortion curve), chunk lengths, and entropy-adaptive
plans; writes JSON (the planner's quality curve, `arc-encoder plan --quality`) and a plot.
`make-qa` makes QA rows whose answers are only in their passage (a planted needle, a span of the
text); `qa` answers them closed-book, open-book and from the compressed context (exact match).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import textwrap
from pathlib import Path
from typing import get_args

from ..corpus import CorpusFormat
from ..arguments import (
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


def _result_header(benchmark: str, args: argparse.Namespace, device: str, decoder_path: str) -> dict:
    """What every eval JSON starts with: which command, when, where, on which checkpoint, decoder and data."""
    import torch

    return {
        "benchmark": benchmark,
        "command": "arc-encoder " + " ".join(shlex.quote(a) for a in args.argv),
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "decoder": args.decoder,
        "decoder_path": decoder_path,
        "data": str(Path(args.data).resolve()),
    }


def cmd_info(args: argparse.Namespace) -> int:
    if args.plot:
        pyplot()  # fails before any work when matplotlib is missing
    import torch
    from tqdm.auto import tqdm

    from ..adaptive import chunk_scorer, plan_pooling
    from ..corpus import DocumentStream
    from ..info import InfoEvaluator, chunk_len_override, eval_batches
    from ..model import ARCModel
    from ..decoders import compute_dtype
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
    if args.recon_samples < 0:
        raise ValueError(f"--recon-samples must be >= 0, got {args.recon_samples}")
    pad = dec_tok.pad_token_id if dec_tok.pad_token_id is not None else dec_tok.eos_token_id
    points = []
    with torch.no_grad():
        for label, what, chunk in tqdm(jobs, desc="eval info", unit="point", disable=args.no_progress):
            if isinstance(what, int):
                plan = what
            else:
                scorer = chunk_scorer(what, decoder, dec_tok)
                with chunk_len_override(model, chunk):
                    plan = plan_pooling(model, ev.all_encoder_ids(), what, scorer)
            point = ev.point(plan, chunk_len=chunk, label=label, greedy_samples=args.recon_samples,
                             pad_token_id=pad).to_dict()
            point["trained_factor"] = not enc.untrained_factors([what]) if isinstance(what, int) else True
            points.append(point)
    result = {
        **_result_header("info", args, device, dec_path),
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
            f"{'kept%':>7}{'loss':>7}{'gap%':>6}{'EM@k':>6}{'recAcc':>7}{'recEM':>7}{'BLEU':>6}")
    rows = [head]
    greedy = any(p.get("greedy_recon_samples") for p in points)
    for p in points:
        flag = "" if p.get("trained_factor", True) else " (untrained)"
        g = p.get("greedy_recon_samples")
        rec = f"{p['greedy_recon_exact']:>7.2f}{p['greedy_recon_bleu4']:>6.2f}" if g else f"{'-':>7}{'-':>6}"
        rows.append(f"{p['label'] + flag:<22}{p['chunk_len']:>6}{p['rate_vectors_per_token']:>8.3f}"
                    f"{p['bits_none_per_token']:>9.2f}{p['bits_recovered_per_token']:>7.2f}"
                    f"{p['bits_per_vector']:>9.2f}{100 * p['info_retained']:>7.1f}{p['loss_compressed']:>7.3f}"
                    f"{100 * p['gap_closed']:>6.0f}{p['em_at_k']:>6.2f}{p.get('recon_acc', float('nan')):>7.3f}{rec}")
    if points:
        p = points[0]
        rows.append(f"closed book loss {p['loss_none']:.3f}, open book {p['loss_full']:.3f} (nats/token); "
                    f"bits/tok = H(text) per token with no context; recov = bits recovered per token")
        rows.append("recAcc = reconstruction token accuracy, teacher-forced"
                    + (f"; recEM / BLEU = greedy reconstruction of the first {p['greedy_recon_samples']} windows: "
                       "whole context reproduced / BLEU-4 over tokens" if greedy else ""))
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


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (an output must never replace one of the inputs)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def refuse_overwriting_inputs(output: str, inputs: dict[str, str | None]) -> None:
    for flag, path in inputs.items():
        if path and same_file(output, path):
            raise ValueError(f"the output {output} is the {flag} file; write the result elsewhere")


def load_tokenizer(path: str, flag: str = "--tokenizer"):
    """A decoder's tokenizer from its local directory (errors name the flag and the path)."""
    from transformers import AutoTokenizer

    from ..loading import quiet_transformers

    if not Path(path).is_dir():
        raise FileNotFoundError(f"{flag} {path}: no such directory")
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{flag} {path}: cannot load a tokenizer there ({type(err).__name__}: {err})") from err


def cmd_make_qa(args: argparse.Namespace) -> int:
    from ..corpus import read_corpus
    from ..qa import make_qa_rows, read_qa_rows, write_qa_rows

    output_file(args.output, "OUTPUT")
    refuse_overwriting_inputs(args.output, {"CORPUS": args.corpus, "--exclude": args.exclude})
    if args.per_kind < 1:
        raise ValueError(f"--per-kind must be >= 1, got {args.per_kind}")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    exclude: set[str] = set()
    if args.exclude:
        exclude = {str(row["source_id"]) for row in read_qa_rows(args.exclude, need=("source_id",))}
    tokenizer = load_tokenizer(args.tokenizer)
    ids, texts = read_corpus(args.corpus, args.format)
    rows = make_qa_rows(ids, texts, tokenizer, kinds, args.per_kind, args.context_tokens, args.seed, exclude,
                        shots=0 if args.zero_shot else 1, where=f"corpus {args.corpus}")
    write_qa_rows(args.output, rows)
    tokens = [len(x) for x in tokenizer([r["context"] for r in rows], add_special_tokens=False)["input_ids"]]
    sources = len({r["source_id"] for r in rows})
    counts = ", ".join(f"{k} {sum(r['kind'] == k for r in rows)}" for k in kinds)
    print(f"wrote {len(rows)} QA rows ({counts}) from {sources} documents of {args.corpus} to {args.output}; "
          f"context {min(tokens)}-{max(tokens)} decoder tokens (mean {sum(tokens) / len(tokens):.0f})"
          + (f"; {len(exclude)} source ids of {args.exclude} excluded" if args.exclude else ""))
    return 0


def cmd_qa(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import read_config
    from ..model import ARCModel
    from ..decoders import compute_dtype
    from ..qa import QAEvaluator, format_qa_table, read_qa_rows
    from ..storage import atomic_write_json, sha256_file

    if args.output:
        output_file(args.output, "--output")
        refuse_overwriting_inputs(args.output, {"--data": args.data})
        if Path(args.output).resolve().is_relative_to(Path(args.checkpoint).resolve()):
            raise ValueError(f"--output {args.output} is inside the checkpoint {args.checkpoint}; write it elsewhere")
    for flag, value in (("--max-rows", args.max_rows), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    rows = read_qa_rows(args.data)
    if args.max_rows is not None:
        rows = rows[: args.max_rows]
    enc = read_config(args.checkpoint).encoder
    pfs = args.pooling_factors or [enc.pooling_factor]
    device = resolve_device(args.device)
    model = ARCModel.from_pretrained(args.checkpoint, decoders=[args.decoder], device=device).eval()
    decoder, dec_tok, dec_path = model.load_decoder(args.decoder, args.decoder_path, device, compute_dtype(device),
                                                    allow_other_decoder=args.allow_other_decoder)
    ev = QAEvaluator(model, decoder, dec_tok, args.decoder, args.max_new_tokens, args.batch_size,
                     autocast_dtype=torch.bfloat16 if device.startswith("cuda") else None)
    from tqdm.auto import tqdm

    steps = (2 + len(pfs)) * -(-len(rows) // args.batch_size)
    with tqdm(total=steps, desc="eval qa", unit="batch", disable=args.no_progress) as bar:
        modes = ev.evaluate(rows, pfs, on_batch=bar.update)
    reports = [m.report(rows) for m in modes]
    for rep in reports:
        if rep["pooling_factor"] is not None:
            rep["trained_factor"] = not enc.untrained_factors([rep["pooling_factor"]])
    result = {
        **_result_header("qa", args, device, dec_path),
        "data_sha256": sha256_file(args.data),
        "rows": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "prefix_tokens": list(ev.prefix),
        "scoring": "exact match after normalize_answer (whitespace collapsed, surrounding quotes and trailing "
                   ". , ; : ! ? dropped, case folded) of the generation's first non-empty line (it ends at the decoder's EOS or any other special token); contains: the "
                   "normalised answer found in it as whole words; 95% Wilson intervals",
        "modes": reports,
        "predictions": [{"id": r["id"], "kind": r["kind"], "answer": r["answer"],
                         **{m.name: m.answers[i] for m in modes}} for i, r in enumerate(rows)],
    }
    print(format_qa_table(reports))
    if args.output:
        atomic_write_json(args.output, result)
        print(f"wrote {args.output}")
    return 0


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Register `eval` and its subcommands on the `arc-encoder` parser."""
    p = sub.add_parser("eval", help="evaluation: information kept by compression (info), QA made from a corpus (make-qa, qa)",
                       description=__doc__.split("\n\n")[1])
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    i = eval_sub.add_parser(
        "info", help="bits of the text recoverable per vector, rate-distortion over pooling factors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="For each (context, continuation) window: H(text) = the decoder's NLL of the "
        "context with no context, H(text|vectors) = its NLL reading the compressed context back "
        "(reconstruction marker). Bits recovered = their difference, per original token and per "
        "vector; plus continuation loss with no / compressed / full-text context (distortion) at "
        "each rate (vectors per original token), and reconstruction: teacher-forced token accuracy and, "
        "for the first --recon-samples windows, greedy exact match and BLEU-4. No labels or downstream "
        "task needed.",
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
    i.add_argument("--recon-samples", type=int, default=8,
                   help="greedy reconstruction (exact match, BLEU-4) of the first N windows per point (default 8; "
                   "0: off)")
    add_device_arg(i)
    add_allow_other_decoder_arg(i)
    add_adaptive_args(i, several=True)
    i.add_argument("--output", help="JSON file (also the planner's --quality curve)")
    i.add_argument("--plot", help="PNG: rate-distortion and bits recovered vs rate")
    i.add_argument("--no-progress", action="store_true", help="no progress bar")
    i.set_defaults(func=cmd_info)

    m = eval_sub.add_parser(
        "make-qa", help="QA rows whose answers are only in their passage (planted needle, span of the text)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(width=88, text="Cut a corpus into passages of about --context-tokens decoder tokens (whole sentences, "
        "never across documents) and write JSONL rows {id, kind, context, question, answer, source_id}, "
        "the format `arc-encoder-train finetune` trains on. needle: 'The <key> code is <value>.' planted at a "
        "random sentence boundary, asked as 'What is the <key> code?'. span: a sentence ending (or a clause "
        "ending) in an identifier, number or capitalised name found once in the passage, quoted up to it: "
        "'Complete this sentence from the text: ...'. Every question starts with a blank line and one fixed "
        "worked example (--zero-shot: none). Deterministic: the same inputs and --seed give the same bytes. "
        "Make fine-tuning rows from the TRAIN split and evaluation rows from the TEST split, and pass the "
        "other file as --exclude to prove that they share no document."),
        epilog="example:\n  arc-encoder eval make-qa arc_encoder/resources/pydoc_small/test.jsonl.gz qa_test.jsonl \\\n"
        "      --tokenizer /models/decoder --per-kind 50 --seed 0")
    m.add_argument("corpus", help="corpus: JSONL/JSON(.gz), parquet or .txt (fields id, text)")
    m.add_argument("output", help="JSONL file to write (replaced atomically)")
    m.add_argument("--tokenizer", required=True, help="the decoder's HF directory (its tokenizer counts the tokens)")
    m.add_argument("--format", choices=get_args(CorpusFormat), default="auto", help="corpus format (default: from the suffix)")
    m.add_argument("--kinds", default="needle,span", help="comma-separated: needle, span (default both)")
    m.add_argument("--per-kind", type=int, default=50, help="rows of each kind (default 50); too little text is an error")
    m.add_argument("--context-tokens", type=int, default=256,
                   help="passage length in decoder tokens, at most (default 256; a needle adds its sentence)")
    m.add_argument("--seed", type=int, default=0, help="draws passages, keys, values, spans (default 0)")
    m.add_argument("--exclude", help="a QA JSONL file: skip documents whose id is one of its rows' source_id")
    m.add_argument("--zero-shot", action="store_true", help="no worked example before the questions")
    m.set_defaults(func=cmd_make_qa)

    q = eval_sub.add_parser(
        "qa", help="QA exact match closed-book, open-book and from the compressed context",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(width=88, text="Greedy answers to every row of a QA JSONL file (context, question, answer; `eval make-qa`) "
        "in three ways: closed-book [BOS][question], open-book [BOS][context][question] and compressed "
        "[BOS][compressed context][<Cont>][question] at each pooling factor, BOS as the projector's policy puts "
        "it before fine-tuning rows, the question followed by a newline as fine-tuning trains it. The answer is "
        "the generation's first non-empty line (generation stops at EOS, any other special token of the decoder's tokenizer, or after --max-new-tokens). Reports "
        "exact match (normalised: case, surrounding quotes and trailing punctuation ignored) and 'contains' "
        "(the answer found in it), with 95% Wilson intervals, per kind and overall, and the decoder prefill "
        "positions per mode."),
        epilog="example:\n  arc-encoder eval qa checkpoints/tiny --decoder tiny --data qa_test.jsonl "
        "--pooling-factors 4,8 --output qa.json")
    q.add_argument("checkpoint", help="arc-encoder checkpoint directory")
    q.add_argument("--decoder", required=True, help="projector name (see `arc-encoder info`)")
    q.add_argument("--decoder-path", help="local HF decoder (default: the path recorded in the checkpoint)")
    q.add_argument("--data", required=True, help="QA JSONL: context, question, answer (+ id, kind)")
    q.add_argument("--pooling-factors", type=int_list, default=None,
                   help="compressed rows at these factors (default: the checkpoint's pooling factor)")
    q.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per answer at most (default 16)")
    q.add_argument("--batch-size", type=int, default=16, help="rows per generate call (default 16)")
    q.add_argument("--max-rows", type=int, default=None, help="the first N rows only (make-qa interleaves kinds)")
    add_device_arg(q)
    add_allow_other_decoder_arg(q)
    q.add_argument("--output", help="JSON file: per mode and kind EM, intervals, positions; every answer")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_qa)
