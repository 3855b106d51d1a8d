"""Does the decoder's BOS help a real decoder? The measurement behind each projector's ``bos`` policy.

For each frozen decoder: held-out windows of real text (context + continuation decoder tokens),
the continuation's NLL (nats/token) with no context and with the full context, each with and
without the decoder's BOS at the start of the input. A compressed context sits where the text
context sits, so the no-context rows say what BOS does before the vectors.

    python benchmarks/bos_real.py --decoder smollm2=/work/models/smollm2 --decoder gemma3=/work/models/gemma3 \
        --data arc_encoder/resources/pydoc_small/test.jsonl.gz --out benchmarks/results/bos_real_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from arc_encoder.corpus import read_corpus
from arc_encoder.decoders import load_frozen_decoder
from arc_encoder.samples import split_windows
from arc_encoder.decoders import tokenizer_adds_bos


def continuation_nll(decoder, rows: list[list[int]], first_target: int, batch: int) -> list[float]:
    """Per-row mean NLL of the tokens from ``first_target`` on (all rows have one length)."""
    out = []
    for i in range(0, len(rows), batch):
        ids = torch.tensor(rows[i : i + batch])
        with torch.no_grad():
            logits = decoder(input_ids=ids, use_cache=False).logits[:, first_target - 1 : -1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, first_target:], reduction="none")
        out += nll.mean(-1).tolist()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoder", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--data", required=True)
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--context-tokens", type=int, default=128)
    p.add_argument("--target-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    _, texts = read_corpus(args.data)
    report = {"data": args.data, "windows": args.windows, "context_tokens": args.context_tokens,
              "target_tokens": args.target_tokens, "command": "python benchmarks/bos_real.py " + " ".join(
                  f"--decoder {d}" for d in args.decoder) + f" --data {args.data}", "decoders": {}}
    for spec in args.decoder:
        name, _, path = spec.partition("=")
        t0 = time.time()
        decoder, tok = load_frozen_decoder(path, dtype=torch.float32)
        windows = []
        for text in texts:
            windows += split_windows(text, tok, args.context_tokens, args.target_tokens)
            if len(windows) >= args.windows:
                break
        windows = [(c, t) for c, t in windows if len(c) == args.context_tokens and len(t) == args.target_tokens]
        windows = windows[: args.windows]
        bos = tok.bos_token_id
        row = {"path": path, "bos_token": tok.bos_token, "tokenizer_adds_bos": tokenizer_adds_bos(tok),
               "windows": len(windows)}
        for ctx_mode in ("none", "full"):
            for with_bos in (False, True):
                head = [bos] if with_bos else []
                context = (lambda c: c) if ctx_mode == "full" else (lambda c: [])
                rows = [head + context(c) + t for c, t in windows]
                # Score the same target tokens in both arms: with no BOS and no context the first target
                # has no predecessor, so the no-context rows skip it with and without BOS.
                first = len(head) + (args.context_tokens if ctx_mode == "full" else 1)
                nll = continuation_nll(decoder, rows, first, args.batch)
                mean = sum(nll) / len(nll)
                se = math.sqrt(sum((x - mean) ** 2 for x in nll) / max(1, len(nll) - 1) / len(nll))
                row[f"{ctx_mode}_{'bos' if with_bos else 'no_bos'}"] = {"nll": round(mean, 4), "se": round(se, 4)}
        row["seconds"] = round(time.time() - t0, 1)
        report["decoders"][name] = row
        print(name, {k: v for k, v in row.items() if isinstance(v, dict)}, flush=True)
        del decoder
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
