"""Compressed RAG cache benchmark: build throughput and query time-to-first-token.

    python benchmarks/cache_bench.py                 # tiny random models on CPU (< 1 min)
    python benchmarks/cache_bench.py --preset gpu    # Llama-3.2-3B-shaped encoder (minus 2 layers)
                                                     # + Llama-3.1-8B-shaped decoder, random bf16

Corpus: passages cut from the bundled Python docs (arc_encoder/resources/pydoc_small, real text),
cycled with fresh ids when more passages are asked for than the text holds. Measured:

* build: ``arc_encoder.cache.build.build_cache`` end to end (tokenize, encode, project, write
  sharded safetensors with checksums) -> original tokens/s and docs/s;
* query TTFT: a question + top-k BM25-retrieved passages; "cached" = fetch the passages'
  vectors from the memory-mapped cache + assemble [BOS][docs][marker][question] + prefill +
  1 token; "full text" = the same decoder on [BOS][doc tokens][question] + 1 token;
* sizes: cache bytes per original token vs the decoder's bf16 KV cache and raw UTF-8 text;
* int8 cost: relative L2 error of int8 vectors vs the stored float ones, and the change in
  the decoder's continuation loss (next passage given the cached passage).

Random weights are fine for speed and sizes, not for quality: the int8 loss delta shows the
quantization's effect on the decoder's outputs, not task accuracy.
Results: JSON in benchmarks/results/cache_<device>.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from arc_encoder import ARCConfig, ARCEncoder, ARCModel, EncoderConfig, freeze_decoder
from arc_encoder.cache.build import build_cache
from arc_encoder.cache.report import cache_report, kv_cache_bytes_per_token
from arc_encoder.cache.retrieve import BM25Retriever
from arc_encoder.cache.reader import CompressedCache
from arc_encoder.corpus import DocumentStream
from arc_encoder.objectives import decoder_loss
from arc_encoder.tiny import train_tokenizer

DECODER = "llama8b"
# Real shapes, built in code (no hub). Llama-3.2-3B: config.json of meta-llama/Llama-3.2-3B.
LLAMA32_3B = dict(
    vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
    num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
    bos_token_id=128000, eos_token_id=128001,
)
# Llama-3.1-8B: config.json of meta-llama/Llama-3.1-8B.
LLAMA31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0,
    bos_token_id=128000, eos_token_id=128001,
)
TINY_ENCODER = dict(
    vocab_size=401, hidden_size=48, intermediate_size=71, num_hidden_layers=4, num_attention_heads=6,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=4096, tie_word_embeddings=True,
)
TINY_DECODER = dict(
    vocab_size=401, hidden_size=40, intermediate_size=67, num_hidden_layers=3, num_attention_heads=5,
    num_key_value_heads=1, head_dim=8, max_position_embeddings=8192, tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Preset:
    name: str
    encoder: dict
    decoder: dict
    tokenizer_vocab: int
    projector_hidden: int
    chunk_len: int
    passage_tokens: int
    num_docs: int
    docs_per_shard: int
    batch_size: int
    top_k: tuple[int, ...]
    questions: int
    dtype: str


PRESETS = {
    "tiny": Preset("tiny", TINY_ENCODER, TINY_DECODER, 400, 64, 128, 96, 48, 16, 8, (2, 4), 3, "float32"),
    "gpu": Preset("gpu", LLAMA32_3B, LLAMA31_8B, 4000, 2048, 1024, 512, 1024, 128, 32, (3, 8, 16), 8, "bfloat16"),
}
QUESTIONS = [
    "How do I open a file for reading and writing?", "What does the with statement do?",
    "How are exceptions raised and caught?", "What is a generator expression?",
    "How do I sort a list of dictionaries by a key?", "What does the import system search?",
    "How are default argument values evaluated?", "What is the difference between a list and a tuple?",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall seconds (includes host work such as cache reads and input assembly)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_texts() -> list[str]:
    path = resources.files("arc_encoder.resources") / "pydoc_small" / "train.jsonl.gz"
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def make_passages(texts: list[str], tokenizer, passage_tokens: int, num_docs: int) -> tuple[list[str], list[str]]:
    """Cut documents into passages of ~passage_tokens tokens; cycle with new ids to reach num_docs."""
    base: list[str] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids) - passage_tokens // 2, passage_tokens):
            passage = tokenizer.decode(ids[s : s + passage_tokens]).strip()
            if passage:
                base.append(passage)
    ids_out, texts_out = [], []
    for i in range(num_docs):
        ids_out.append(f"p{i:06d}")
        texts_out.append(base[i % len(base)])
    return ids_out, texts_out


def build_models(preset: Preset, device: torch.device, dtype: torch.dtype, tokenizer):
    enc_cfg = EncoderConfig(base_model=f"random-{preset.name}-llama", layers_removed=2, pooling_factor=4,
                            chunk_len=preset.chunk_len, max_chunks=32, attn_implementation="sdpa")
    with torch.device(device):
        encoder = ARCEncoder.from_base_model(enc_cfg, torch_dtype=dtype,
                                             backbone_config=AutoConfig.for_model("llama", **preset.encoder))
        decoder = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **preset.decoder), dtype=dtype,
                                                   attn_implementation="sdpa")
    decoder = freeze_decoder(decoder)
    model = ARCModel(ARCConfig(encoder=enc_cfg), encoder, tokenizer)
    model.add_decoder(DECODER, decoder, hidden_dim=preset.projector_hidden)
    model.to(dtype)
    return model.eval(), decoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="auto", help="cpu, cuda ... (default: cuda if available)")
    parser.add_argument("--num-docs", type=int, help="passages to cache (default: preset)")
    parser.add_argument("--out", default="benchmarks/results", help="results directory")
    parser.add_argument("--workdir", help="where the checkpoint and caches go (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.num_docs:
        preset = Preset(**{**asdict(preset), "num_docs": args.num_docs})
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, preset.dtype)
    torch.manual_seed(0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cache_bench."))
    t_setup = time.perf_counter()
    texts = load_texts()
    tokenizer = train_tokenizer(texts, vocab_size=preset.tokenizer_vocab)
    doc_ids, passages = make_passages(texts, tokenizer, preset.passage_tokens, preset.num_docs)
    model, decoder = build_models(preset, device, dtype, tokenizer)
    ckpt = model.save_pretrained(work / "ckpt", overwrite=True)
    setup_s = time.perf_counter() - t_setup
    result: dict = {
        "preset": asdict(preset), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "setup_s": round(setup_s, 2),
        "corpus": "passages of arc_encoder/resources/pydoc_small/train (Python 3.11 docs, PSF), cycled to num_docs",
    }
    try:
        stream = DocumentStream.from_records(doc_ids, passages)
        store = "bfloat16" if dtype == torch.bfloat16 else "float16"
        caches = {}
        for store_dtype in (store, "int8"):
            out = work / f"cache_{store_dtype}"
            shutil.rmtree(out, ignore_errors=True)
            sync(device)
            r = build_cache(ckpt, DECODER, stream, out, dtype=store_dtype, docs_per_shard=preset.docs_per_shard,
                            batch_size=preset.batch_size, model=model, progress=False)
            tokens = r.manifest["tokens"]
            result[f"build_{store_dtype}"] = {
                "docs": r.manifest["num_docs"], "tokens": tokens, "vectors": r.manifest["vectors"],
                "seconds": round(r.seconds, 3), "tokens_per_s": round(tokens / r.seconds, 1),
                "docs_per_s": round(r.manifest["num_docs"] / r.seconds, 2),
            }
            report = cache_report(out)
            report["kv_cache_bytes_per_token_bf16"] = kv = kv_cache_bytes_per_token(decoder.config)
            report["kv_cache_over_cache"] = kv / report["vector_bytes_per_token"]
            result[f"sizes_{store_dtype}"] = report
            caches[store_dtype] = CompressedCache(out, checkpoint=ckpt, decoder=DECODER)

        # int8 quality cost on up to 64 passages.
        ref_c, q_c = caches[store], caches["int8"]
        sample = doc_ids[: min(64, len(doc_ids) - 1)]
        ref = torch.cat([ref_c.get(i) for i in sample])
        deq = torch.cat([q_c.get(i) for i in sample])
        losses = {}
        nxt = tokenizer([passages[i + 1] for i in range(len(sample))], add_special_tokens=False)["input_ids"]
        target = [t[:64] for t in nxt]
        bos = [[tokenizer.bos_token_id]] * len(sample)
        for name, c in (("stored", ref_c), ("int8", q_c)):
            vals = []
            for s in range(0, len(sample), 8):
                ctx = c.fetch(sample[s : s + 8], dtype=dtype)
                inputs = model.build_decoder_inputs(decoder.get_input_embeddings(), ctx, [[]] * len(ctx.lengths),
                                                    target[s : s + 8], prefix_ids=bos[s : s + 8])
                with torch.no_grad():
                    vals.append(decoder_loss(decoder, inputs).item())
            losses[name] = statistics.mean(vals)
        result["int8_quality"] = {
            "relative_l2_error": ((deq - ref).norm() / ref.norm()).item(),
            "continuation_loss_stored": losses["stored"], "continuation_loss_int8": losses["int8"],
            "continuation_loss_delta": losses["int8"] - losses["stored"],
            "passages": len(sample), "note": "random weights: shows quantization noise, not task quality",
        }

        # Query TTFT: retrieval + cached context vs full text, prefill + 1 token.
        cache = caches[store]
        t0 = time.perf_counter()
        retriever = BM25Retriever.from_cache(cache)
        bm25_index_s = time.perf_counter() - t0
        questions = QUESTIONS[: preset.questions]
        runs = []
        pad = tokenizer.pad_token_id
        for k in preset.top_k:
            per_q = []
            for question in questions:
                t0 = time.perf_counter()
                hits = [d for d, _ in retriever.search(question, k)]
                retrieve_s = time.perf_counter() - t0
                q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
                full_ids = [tokenizer.bos_token_id]
                for d in hits:
                    full_ids += tokenizer(cache.texts()[d], add_special_tokens=False)["input_ids"]
                full_ids += q_ids

                def cached_ttft():
                    context = cache.context([hits], decoder.get_input_embeddings().weight.dtype)
                    return model.generate(decoder, tokenizer, cache.decoder, context, [question], max_new_tokens=1,
                                          do_sample=False)

                def full_ttft():
                    ids = torch.tensor([full_ids], device=device)
                    return decoder.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                            do_sample=False, pad_token_id=pad)

                ctx_vectors = int(cache.context([hits]).lengths[0])
                per_q.append({
                    "retrieve_s": retrieve_s, "cached_s": timed(cached_ttft, device), "full_s": timed(full_ttft, device),
                    "full_tokens": len(full_ids), "cached_positions": 2 + ctx_vectors + len(q_ids),
                })
            cached = statistics.median(p["cached_s"] for p in per_q)
            full = statistics.median(p["full_s"] for p in per_q)
            runs.append({
                "top_k": k, "questions": len(per_q),
                "full_text_tokens_median": statistics.median(p["full_tokens"] for p in per_q),
                "cached_positions_median": statistics.median(p["cached_positions"] for p in per_q),
                "ttft_full_text_s": full, "ttft_cached_s": cached, "speedup": full / cached,
                "bm25_retrieve_s_median": statistics.median(p["retrieve_s"] for p in per_q),
            })
        result["query"] = {"bm25_index_s": bm25_index_s, "runs": runs,
                           "note": "TTFT = prefill + 1 greedy token; cached includes reading vectors from the "
                                   "memory-mapped cache and assembling the decoder input"}
        if device.type == "cuda":
            result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    name = re.sub(r"[^a-z0-9]+", "_", (result["device"] if device.type == "cuda" else "cpu").lower()).strip("_")
    out = Path(args.out) / f"cache_{name}{'' if args.preset != 'tiny' or device.type == 'cpu' else '_tiny'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from arc_encoder.storage import atomic_write_json

    atomic_write_json(out, result)
    b = result[f"build_{store}"]
    print(f"build   {b['tokens_per_s']:,.0f} tokens/s ({b['docs_per_s']} docs/s, {store})")
    s = result[f"sizes_{store}"]
    print(f"sizes   {s['vector_bytes_per_token']:.1f} B/token vs KV {s['kv_cache_bytes_per_token_bf16']} "
          f"({s['kv_cache_over_cache']:.1f}x) vs text {s['text_bytes_per_token']:.2f}; int8 "
          f"{result['sizes_int8']['vector_bytes_per_token']:.1f} B/token, rel L2 "
          f"{result['int8_quality']['relative_l2_error']:.4f}, loss delta "
          f"{result['int8_quality']['continuation_loss_delta']:+.5f}")
    for r in result["query"]["runs"]:
        print(f"query   top-{r['top_k']}: TTFT full {r['ttft_full_text_s'] * 1e3:.1f} ms "
              f"({r['full_text_tokens_median']} tokens) vs cached {r['ttft_cached_s'] * 1e3:.1f} ms: x{r['speedup']:.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
