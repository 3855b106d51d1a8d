"""Does a BOS before the compressed context help? The measurement behind ``data.window_bos``.

The reference feeds pretraining windows as ``[compressed][special][text]`` with no BOS (a window
continues its document); this package used to put the decoder's BOS first. For held-out
(context, continuation) windows this scores, on the SAME tokens (every continuation token but
each window's first, which nothing precedes without context and without BOS):

* the frozen decoder alone: no context (closed book) and the full text (open book), each with
  and without a BOS first;
* every given checkpoint: compressed continuation and reconstruction, with and without BOS.

    python benchmarks/bos_layout.py --checkpoint no_bos=checkpoints/tiny --checkpoint bos=checkpoints/bos \
        --split test --output benchmarks/results/bos_cpu.json

(the checkpoints: ``arc-encoder-train pretrain`` with ``--data.window_bos false`` and ``true``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from arc_encoder import ARCModel
    from arc_encoder.decoders import load_frozen_decoder
    from arc_encoder.layout import CompressedContext
    from arc_encoder.objectives import IGNORE_INDEX, predict, token_nll
    from arc_encoder.storage import atomic_write_json
    from arc_encoder_train.jobs import BUNDLED_TINY_LM
    from arc_encoder_train.config import DataConfig, bundled_corpus
    from arc_encoder_train.data import DecoderTokenizers, pretrain_samples, validation_batches

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", action="append", required=True, metavar="LABEL=DIR")
    p.add_argument("--decoder", default="tiny", help="projector name (default tiny)")
    p.add_argument("--decoder-path", default=str(BUNDLED_TINY_LM), help="default: the bundled tiny decoder")
    p.add_argument("--split", default="test", choices=["validation", "test"], help="bundled pydoc_small split")
    p.add_argument("--context-tokens", type=int, default=64)
    p.add_argument("--target-tokens", type=int, default=32)
    p.add_argument("--batches", type=int, default=40, help="batches of 8 windows")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    ckpts = dict(x.split("=", 1) for x in args.checkpoint)

    decoder, tok = load_frozen_decoder(args.decoder_path)
    emb = decoder.get_input_embeddings()
    path = bundled_corpus(args.split)
    spec = DataConfig(train_files=[path], validation_files=[path], context_tokens=args.context_tokens,
                    target_tokens=args.target_tokens, batch_size=8, val_batches=args.batches)

    @torch.no_grad()
    def mean_nll(rows) -> tuple[float, int]:
        total, count = 0.0, 0
        for inputs in rows:
            logits, labels = predict(decoder, inputs)
            total += float(token_nll(logits, labels).sum())
            count += int((labels != IGNORE_INDEX).sum())
        return total / count, count

    def layouts(model, batches, bos: bool, context: str, targets: str):
        for b in batches:
            n = len(b)
            prefix = [[tok.bos_token_id] if bos else [] for _ in range(n)]
            skip = [True] * n  # the same tokens whatever the layout
            goal = b.continuation_ids if targets == "continuation" else b.context_ids
            if context == "compressed":
                ctx = model.compress(b.encoder_ids, args.decoder)
                yield model.build_decoder_inputs(emb, ctx, b.prompt_ids, goal, targets, prefix, skip_first_target=skip)
            else:
                empty = CompressedContext(emb.weight.new_zeros(n, 0, emb.weight.shape[1]),
                                          torch.zeros(n, dtype=torch.long), args.decoder)
                if context == "full":
                    prefix = [p + c for p, c in zip(prefix, b.context_ids)]
                yield model.build_decoder_inputs(emb, empty, b.prompt_ids, goal, None, prefix, skip_first_target=skip)

    results: dict = {"benchmark": "bos_layout", "command": "python " + shlex.join(sys.argv),
                     "date": dt.date.today().isoformat(), "split": args.split, "decoder_path": args.decoder_path,
                     "scored": "every continuation (or context) token but each window's first", "checkpoints": {}}
    for label, ck in ckpts.items():
        model = ARCModel.from_pretrained(ck, decoders=[args.decoder]).eval()
        batches = validation_batches(spec, [DecoderTokenizers(args.decoder, tok, False)], model.tokenizer,
                                     pretrain_samples)
        if "decoder_alone" not in results:
            results["windows"] = sum(len(b) for b in batches)
            results["decoder_alone"] = {
                f"{ctx}_{'bos' if bos else 'no_bos'}": mean_nll(layouts(model, batches, bos, ctx, "continuation"))[0]
                for ctx in ("none", "full") for bos in (False, True)}
        row = {}
        for bos in (False, True):
            key = "bos" if bos else "no_bos"
            row[f"continuation_{key}"], row["tokens"] = mean_nll(layouts(model, batches, bos, "compressed", "continuation"))
            row[f"reconstruction_{key}"] = mean_nll(layouts(model, batches, bos, "compressed", "reconstruction"))[0]
        results["checkpoints"][label] = {"path": ck, **row}
        print(label, json.dumps(row), flush=True)
    print(json.dumps(results["decoder_alone"]))
    atomic_write_json(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
