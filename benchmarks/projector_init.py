"""Does the projector's init scale matter on a real LLM? The measurement behind ``ProjectorOptions.init``.

A real LM's final hidden states are far larger than its input embeddings (SmolLM2-135M: median
norm ~85x), so a projector at torch's default init puts compressed vectors far off the scale the
decoder reads, and compressed context starts worse than no context. For each init: the frozen
decoder's continuation loss (nats/token) on held-out windows with no / full / compressed context at
step 0, then after a few steps training projector + encoder (LoRA) with the package's own loss.

    python benchmarks/projector_init.py --base /work/models/smollm2 --decoder /work/models/smollm2 \
        --data arc_encoder/resources/pydoc_small --out benchmarks/results/projector_init_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from arc_encoder import ARCModel, EncoderConfig
from arc_encoder.corpus import read_corpus
from arc_encoder.config import ProjectorOptions
from arc_encoder.info import eval_batches
from arc_encoder.decoders import load_frozen_decoder
from arc_encoder.objectives import decoder_loss
from arc_encoder.metrics import continuation_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--decoder", required=True)
    p.add_argument("--data", required=True, help="folder with train/test .jsonl.gz")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    decoder, tok = load_frozen_decoder(args.decoder, dtype=torch.float32)
    _, train_texts = read_corpus(f"{args.data}/train.jsonl.gz")
    _, test_texts = read_corpus(f"{args.data}/test.jsonl.gz")
    report = {"command": "python benchmarks/projector_init.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "inits": {}}
    for init in ("reference", "match_decoder"):
        t0 = time.time()
        torch.manual_seed(0)
        cfg = EncoderConfig(base_model=args.base, layers_removed=2, pooling_factor=4, chunk_len=256, tuning="lora")
        model = ARCModel.from_base_model(cfg, torch_dtype=torch.float32)
        model.add_decoder("dec", decoder, ProjectorOptions(init=init), decoder_path=args.decoder, tokenizer=tok)
        scale = model.projector("dec").net[-1].weight.norm().item()
        test = eval_batches(test_texts, model, "dec", tok, args.tokens, args.tokens, args.eval_samples, args.batch)
        train = eval_batches(train_texts, model, "dec", tok, args.tokens, args.tokens, args.steps * args.batch, args.batch)

        def evaluate() -> dict:
            model.eval()
            out = {mode: sum(continuation_loss(model, decoder, b, mode) for b in test) / len(test)
                   for mode in ("none", "full", "compressed")}
            model.train()
            return {k: round(v, 4) for k, v in out.items()}

        row = {"step0": evaluate(), "output_layer_norm": round(scale, 3)}
        model.encoder.set_trainable(True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
        losses = []
        for batch in train[: args.steps]:
            loss = decoder_loss(decoder, model.decoder_inputs(decoder, batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(round(loss.item(), 4))
        row[f"step{args.steps}"] = evaluate()
        row["train_losses"] = losses
        row["seconds"] = round(time.time() - t0, 1)
        report["inits"][init] = row
        print(init, row["step0"], row[f"step{args.steps}"], flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
