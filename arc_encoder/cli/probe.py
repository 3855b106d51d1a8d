"""`arc-encoder probe`: does a frozen decoder read its context? (relative gates)

ARC's reconstruction objective needs a decoder that copies text it has just seen, as real LLMs
do; a stand-in decoder that cannot will not learn from any encoder. The probe measures it on
held-out text (``arc_encoder.probe``): random-token induction, copying a held-out passage, and
the open-book gain of a continuation, each as a ratio of the same tokens' loss with and without
something to read. Exit code 0 when every gate passes, 1 when one is missed (one line names each
miss), 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import shlex
import sys
import time
from pathlib import Path
from typing import get_args

from ..corpus import CorpusFormat
from ..arguments import add_device_arg, output_file, positive_int, resolve_device


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far (MiB; Linux/macOS), None where unknown."""
    try:
        import resource
    except ImportError:
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / (2**20 if sys.platform == "darwin" else 2**10), 1)


def cmd_probe(args: argparse.Namespace) -> int:
    from ..corpus import read_corpus
    from ..decoders import compute_dtype, load_frozen_decoder
    from ..probe import ProbeConfig, probe_texts
    from ..storage import atomic_write_json, check_model_dir

    config = ProbeConfig(batch_size=args.batch_size, seed=args.seed, passages=args.passages,
                         induction_rows=args.induction_rows, induction_tokens=args.induction_tokens,
                         induction_ratio_max=args.induction_ratio_max, copy_ratio_max=args.copy_ratio_max,
                         gain_ratio_min=args.gain_ratio_min)
    check_model_dir(args.decoder, "decoder")
    if args.json:
        output_file(args.json, "--json", {"--data file": args.data, "decoder": args.decoder})
    _, texts = read_corpus(args.data, args.format)
    device = resolve_device(args.device)
    t0 = time.time()
    model, tokenizer = load_frozen_decoder(args.decoder, device, compute_dtype(device))
    t_load = time.time() - t0
    try:
        result = probe_texts(model, tokenizer, texts, config)
    except ValueError as err:
        raise ValueError(f"--data {args.data}: {err}") from None
    print(f"{args.decoder}: {result.summary()}")
    print(f"passages {result.passages} (held-out windows of {config.window_len} tokens), induction rows "
          f"{result.induction_rows} ({result.induction_tokens} distinct ids), row prefix {result.prefix_ids}; "
          f"gates: induction ratio <= {config.induction_ratio_max}, copy ratio <= {config.copy_ratio_max}, "
          f"open-book gain >= {config.gain_ratio_min} of the closed-book loss; load {t_load:.1f} s, probe "
          f"{time.time() - t0 - t_load:.1f} s")
    if args.json:
        record = {"benchmark": "probe", "command": "arc-encoder probe " + " ".join(shlex.quote(a) for a in args.argv),
                  "date": dt.date.today().isoformat(), "decoder": str(Path(args.decoder).resolve()),
                  "data": str(Path(args.data).resolve()), "device": device,
                  "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(time.time() - t0, 2),
                  "load_seconds": round(t_load, 2), "peak_rss_mib": peak_rss_mib(),
                  **result.to_dict(), "config": dataclasses.asdict(config)}
        atomic_write_json(args.json, record)
        print(f"wrote {args.json}")
    if not result.passed:
        print(f"arc-encoder probe: gate missed: {args.decoder}: " + "; ".join(result.failures()), file=sys.stderr)
        return 1
    return 0


def add_probe_command(sub) -> None:
    from ..config import InductionTokens, ProbeConfig

    d = ProbeConfig()
    p = sub.add_parser(
        "probe", help="does a decoder read its context? induction, copy and open-book gates on held-out text",
        description=f"Measure a frozen causal LM on held-out text, each as a ratio of the same tokens' loss with and "
        f"without something to read (each row starts with the decoder's BOS where its tokenizer adds one). "
        f"(1) induction: {d.induction_len} random tokens (drawn from the ids the tokenizer produces on the held-out "
        f"text) repeated once; gate: second-copy loss / first-copy loss <= {d.induction_ratio_max}. Only copying "
        f"predicts the second copy: a decoder that cannot read 64 tokens back scores ~1.0, real LLMs "
        f"(SmolLM2-135M, Gemma 3 270M) 0.04-0.09. (2) copy: a {d.copy_len}-token held-out passage repeated; gate: "
        f"second/first-copy loss <= {d.copy_ratio_max}. (3) open-book gain: a {d.continuation_len}-token "
        f"continuation without context vs after its preceding {d.context_len} tokens; gate: the context removes "
        f">= {d.gain_ratio_min} of the closed-book loss. Numbers come with standard errors over rows. Defaults: "
        f"{d.passages} passages, {d.induction_rows} induction rows (on 2 CPU cores: SmolLM2-135M ~30 s, Gemma 3 "
        f"270M ~90 s). Exit 0 when every gate passes, 1 when one is missed, 2 on bad input.")
    p.add_argument("decoder", metavar="DECODER_DIR", help="local Hugging Face causal LM directory (with its tokenizer)")
    p.add_argument("--data", required=True, help="held-out text the decoder never trained on: JSONL/JSON (field "
                   "'text'), parquet or .txt (one text per line), optionally .gz; texts need "
                   f"{d.window_len} decoder tokens")
    p.add_argument("--format", choices=get_args(CorpusFormat), default="auto", help="--data's format (default: from "
                   "the suffix)")
    p.add_argument("--passages", type=positive_int, default=d.passages, help="held-out passages, one per long enough "
                   f"text (default {d.passages}; more rows, smaller standard errors, longer run)")
    p.add_argument("--induction-rows", type=positive_int, default=d.induction_rows,
                   help=f"random induction sequences (default {d.induction_rows})")
    p.add_argument("--induction-tokens", choices=get_args(InductionTokens), default=d.induction_tokens,
                   help="draw random induction tokens from the held-out text's distinct ids (default) or from the "
                   "whole vocabulary but special tokens (the earlier measure)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="rows per forward pass")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random sequences and passage offsets")
    p.add_argument("--induction-ratio-max", type=float, default=d.induction_ratio_max,
                   help=f"gate: random sequence's second-copy loss / first-copy loss (default {d.induction_ratio_max})")
    p.add_argument("--copy-ratio-max", type=float, default=d.copy_ratio_max,
                   help=f"gate: held-out passage's second-copy loss / first-copy loss (default {d.copy_ratio_max})")
    p.add_argument("--gain-ratio-min", type=float, default=d.gain_ratio_min,
                   help=f"gate: (closed-book - open-book loss) / closed-book loss (default {d.gain_ratio_min})")
    p.add_argument("--json", help="write the measurements, gates and settings to this JSON file")
    add_device_arg(p)
    p.set_defaults(func=cmd_probe)
