"""`arc-encoder probe`: does a frozen decoder read its context? (issue 12's gates)

ARC's reconstruction objective needs a decoder that copies text it has just seen, as real LLMs
do; a stand-in decoder that cannot will not learn from any encoder. The probe measures it on
held-out text (``arc_encoder.probe``): random-token induction, copying a held-out passage, and
the open-book gain of a continuation. Exit code 0 when every gate passes, 1 when one is missed
(one line names each miss), 2 on bad input.
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

from ..cache.names import CorpusFormat
from .common import add_device_arg, output_file, positive_int, resolve_device


def cmd_probe(args: argparse.Namespace) -> int:
    from ..cache.build import read_corpus
    from ..model import compute_dtype, load_frozen_decoder
    from ..probe import ProbeConfig, probe_texts
    from ..storage import atomic_write_json, check_model_dir

    config = ProbeConfig(batch_size=args.batch_size, seed=args.seed, induction_max=args.induction_max,
                         copy_max=args.copy_max, gain_min=args.gain_min)
    check_model_dir(args.decoder, "decoder")
    if args.json:
        output_file(args.json, "--json", {"--data file": args.data, "decoder": args.decoder})
    _, texts = read_corpus(args.data, args.format)
    device = resolve_device(args.device)
    t0 = time.time()
    model, tokenizer = load_frozen_decoder(args.decoder, device, compute_dtype(device))
    try:
        result = probe_texts(model, tokenizer, texts, config, count=args.passages)
    except ValueError as err:
        raise ValueError(f"--data {args.data}: {err}") from None
    print(f"{args.decoder}: {result.summary()}")
    print(f"passages {result.passages} (held-out windows of {config.window_len} tokens), induction rows "
          f"{result.induction_rows}; gates: induction <= {config.induction_max}, copy <= {config.copy_max}, "
          f"open-book gain >= {config.gain_min} nats/token")
    if args.json:
        record = {"benchmark": "probe", "command": "arc-encoder probe " + " ".join(shlex.quote(a) for a in args.argv),
                  "date": dt.date.today().isoformat(), "decoder": str(Path(args.decoder).resolve()),
                  "data": str(Path(args.data).resolve()), "device": device,
                  "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(time.time() - t0, 2),
                  **result.to_dict(), "config": dataclasses.asdict(config)}
        atomic_write_json(args.json, record)
        print(f"wrote {args.json}")
    if not result.passed:
        print(f"arc-encoder probe: gate missed: {args.decoder}: " + "; ".join(result.failures()), file=sys.stderr)
        return 1
    return 0


def add_probe_command(sub) -> None:
    from ..config import ProbeConfig

    d = ProbeConfig()
    p = sub.add_parser(
        "probe", help="does a decoder read its context? induction, copy and open-book gates on held-out text",
        description="Measure a frozen causal LM on held-out text: (1) induction: 64 random tokens repeated once, "
        "second-copy loss; (2) copy: a 256-token held-out passage repeated, second-copy loss; (3) open-book gain: "
        "loss of a 64-token continuation without context minus with its preceding 256 tokens. Exit 0 when every "
        "gate passes, 1 when one is missed, 2 on bad input.")
    p.add_argument("decoder", metavar="DECODER_DIR", help="local Hugging Face causal LM directory (with its tokenizer)")
    p.add_argument("--data", required=True, help="held-out text the decoder never trained on: JSONL/JSON (field "
                   "'text'), parquet or .txt (one text per line), optionally .gz; texts need "
                   f"{d.window_len} decoder tokens")
    p.add_argument("--format", choices=get_args(CorpusFormat), default="auto", help="--data's format (default: from "
                   "the suffix)")
    p.add_argument("--passages", type=positive_int, default=64, help="held-out passages, one per long enough text "
                   "(default 64)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="rows per forward pass")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random sequences and passage offsets")
    p.add_argument("--induction-max", type=float, default=d.induction_max,
                   help=f"gate: second-copy loss of the random sequence, nats/token (default {d.induction_max})")
    p.add_argument("--copy-max", type=float, default=d.copy_max,
                   help=f"gate: second-copy loss of the held-out passage (default {d.copy_max})")
    p.add_argument("--gain-min", type=float, default=d.gain_min,
                   help=f"gate: open-book gain, nats/token (default {d.gain_min})")
    p.add_argument("--json", help="write the measurements, gates and settings to this JSON file")
    add_device_arg(p)
    p.set_defaults(func=cmd_probe)
