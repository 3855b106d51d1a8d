"""`arc-encoder cache build|info|verify|query`: the compressed RAG cache from the command line.

Multi-GPU builds: `arc-encoder-train cache-build` (Lightning, the same arguments and files).
"""

from __future__ import annotations

import argparse
import json

from ..arguments import (
    add_allow_other_decoder_arg,
    add_cache_build_arguments,
    add_device_arg,
    cache_build_settings,
    positive_int,
    report_problems,
    resolve_device,
)


def cmd_build(args: argparse.Namespace) -> None:
    from ..cache.build import build_cache

    settings = cache_build_settings(args)  # bad arguments fail before anything loads
    result = build_cache(**settings, device=resolve_device(args.device))
    m = result.manifest
    docs_done = sum(min(m["docs_per_shard"], m["num_docs"] - k * m["docs_per_shard"]) for k in result.shards_written)
    rate = docs_done / result.seconds if result.seconds > 0 else float("nan")
    print(f"wrote {result.directory}: {m['num_docs']} docs, {m['tokens']} tokens -> {m['vectors']} vectors "
          f"({m['dtype']}) in {m['num_shards']} shards; {len(result.shards_written)} shards built "
          f"({rate:.1f} docs/s), {result.shards_reused} reused")
    if m.get("pooling") == "adaptive":
        print(f"adaptive pooling ({m['adaptive_density']}): chunks per factor {m.get('chunks_per_pooling_factor')}, "
              f"{m['vectors'] / m['tokens']:.4f} vectors/token (fixed x{m['adaptive_target']:g}: "
              f"{1 / m['adaptive_target']:.4f})")
        used = m.get("chunks_per_pooling_factor") or {}
        if len(used) == 1 and float(next(iter(used))) == float(m["adaptive_target"]):
            print(f"note: adaptive pooling changed nothing: every chunk got x{next(iter(used))}, as fixed pooling at "
                  f"x{m['adaptive_target']:g} would (the chunks' scores did not differ enough to move any; raise "
                  "--adaptive-strength, or score with another --adaptive density)")
    if m["skipped_empty"]:
        print(f"skipped {m['skipped_empty']} empty documents")
    if m["dropped_duplicates"]:
        print(f"dropped {m['dropped_duplicates']} documents with a duplicate id (kept the first)")


def cmd_info(args: argparse.Namespace) -> None:
    from ..cache.report import cache_report

    r = cache_report(args.cache, args.decoder_path, args.context_tokens)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"cache        {args.cache}")
    pooling = (f"adaptive pooling, chunks per factor {r['chunks_per_pooling_factor']}" if r["pooling"] == "adaptive"
               else f"pooling x{r['pooling_factor']}")
    print(f"decoder      {r['decoder']}, {pooling}, stored as {r['dtype']}")
    print(f"documents    {r['docs']} in {r['shards']} shards ({r['skipped_empty']} empty skipped, "
          f"{r['dropped_duplicates']} duplicates dropped)")
    print(f"tokens       {r['tokens']} -> {r['vectors']} vectors")
    print(f"on disk      {r['bytes_on_disk']:,} bytes ({r['shard_bytes']:,} in vector shards)")
    print(f"per token    {r['vector_bytes_per_token']:.2f} bytes of vectors; raw UTF-8 text "
          f"{r['text_bytes_per_token']:.2f} bytes")
    if "kv_cache_bytes_per_token_bf16" in r:
        layers = r["kv_layers"]
        windowed = (f"; {layers['sliding_layers']} of {layers['sliding_layers'] + layers['full_layers']} layers keep "
                    f"only a {layers['sliding_window']}-token window ({r['kv_cache_bytes_per_token_bf16_unwindowed']:,} "
                    "bytes/token while the context fits it)" if layers["sliding_layers"] else "")
        print(f"vs KV cache  decoder KV cache {r['kv_cache_bytes_per_token_bf16']:,.0f} bytes/token (bf16) at "
              f"{r['kv_context_tokens']:,}-token contexts ({r['kv_cache_bytes_bf16']:,} bytes){windowed}: "
              f"cache is {r['kv_cache_over_cache']:.1f}x smaller")
    elif "kv_cache_error" in r:
        print(f"vs KV cache  unknown ({r['kv_cache_error']}); pass --decoder-path")


def cmd_verify(args: argparse.Namespace) -> int:
    from ..cache.format import verify_cache

    return report_problems(verify_cache(args.cache, args.checkpoint),
                           f"{args.cache}: every shard and index file matches the manifest")


def cmd_query(args: argparse.Namespace) -> None:
    from ..cache.format import read_cache_manifest
    from ..cache.reader import CompressedCache
    from ..cache.retrieve import BM25Retriever, bm25_tokens
    from ..model import ARCModel

    manifest = read_cache_manifest(args.cache)
    checkpoint = args.checkpoint or manifest["checkpoint"]
    cache = CompressedCache(args.cache, checkpoint=checkpoint)
    if args.doc_id:
        doc_ids = list(args.doc_id)
        missing = [d for d in doc_ids if d not in cache.index]
        if missing:
            raise ValueError(f"document ids not in the cache: {missing}")
    else:
        retriever = BM25Retriever.from_cache(cache)
        hits = retriever.search(args.question, args.top_k)
        matching = retriever.matching(args.question)
        matched = [(d, score) for d, score in hits if d in matching]
        if not matched and not args.allow_no_match:
            words = "has no word to search for" if not bm25_tokens(args.question) else "shares no word with any document"
            raise ValueError(f"no document matches the question: it {words} of the {len(cache)} in the cache; "
                             "rephrase it, name documents with --doc-id, or pass --allow-no-match to answer from "
                             f"{min(args.top_k, len(cache))} unrelated documents")
        if not args.allow_no_match:
            hits = matched
        doc_ids = [d for d, _ in hits]
        for d, score in hits:
            print(f"retrieved    {d} (BM25 {score:.2f}{'' if d in matching else ', no match'})")
        if len(matched) < min(args.top_k, len(cache)) and not args.allow_no_match:
            print(f"note         only {len(matched)} of the top {args.top_k} documents share a word with the question; "
                  "the others are left out (--allow-no-match keeps them)")
    device = resolve_device(args.device)
    model = ARCModel.from_pretrained(checkpoint, decoders=[cache.decoder], device=device).eval()
    decoder, tokenizer, _ = model.load_decoder(cache.decoder, args.decoder_path, device,
                                               allow_other_decoder=args.allow_other_decoder)
    question = args.question
    if args.qa:  # the prompt a checkpoint fine-tuned on `eval make-qa` rows was trained on
        from ..qa import qa_prompt, with_example

        question = qa_prompt(with_example(question.strip(), shots=1))
    context = cache.context([doc_ids], decoder.get_input_embeddings().weight.dtype)
    answer = model.generate(decoder, tokenizer, cache.decoder, context, [question],
                            max_new_tokens=args.max_new_tokens, do_sample=False)
    print(format_answer(answer[0]))


def format_answer(text: str) -> str:
    """One labelled line, so whitespace-only generations are visible as such."""
    return "answer       " + (" ".join(text.split()) or "(empty: the decoder generated only whitespace)")


def add_cache_commands(sub: argparse._SubParsersAction) -> None:
    """Register `cache` and its subcommands on the `arc-encoder` parser."""
    p = sub.add_parser("cache", help="compressed RAG cache: build, info, verify, query",
                       description="Compress a corpus once into sharded safetensors, then answer "
                       "questions from retrieved cached documents. Format: arc_encoder/CACHE_FORMAT.md.")
    cache_sub = p.add_subparsers(dest="cache_command", required=True, metavar="CACHE_COMMAND")

    b = cache_sub.add_parser("build", help="compress a corpus into a cache (resumable)",
                             description="Documents are read in corpus order; empty ones are skipped and "
                             "counted; shard k holds documents [k*S, (k+1)*S). An interrupted build "
                             "continues with --resume, redoing only incomplete shards. Multi-GPU: "
                             "arc-encoder-train cache-build (the same arguments and files).")
    add_cache_build_arguments(b)
    add_device_arg(b)
    b.set_defaults(func=cmd_build)

    i = cache_sub.add_parser("info", help="sizes: bytes per token vs the decoder's KV cache and raw text")
    i.add_argument("cache", help="cache directory (built by `cache build`)")
    i.add_argument("--decoder-path", help="decoder config for the KV-cache comparison (default: recorded path)")
    i.add_argument("--context-tokens", type=positive_int, help="context length the decoder's KV cache is taken at (default: "
                   "the cache's mean document length); matters for decoders with sliding-window layers (Gemma 3), "
                   "whose cache per token shrinks as the context outgrows the window")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=cmd_info)

    v = cache_sub.add_parser("verify", help="check every shard against the manifest checksums")
    v.add_argument("cache", help="cache directory (built by `cache build`)")
    v.add_argument("--checkpoint", help="also check the cache was built with this checkpoint")
    v.set_defaults(func=cmd_verify)

    q = cache_sub.add_parser("query", help="retrieve cached documents (BM25) and answer with the decoder",
                             description="Decoder input: [BOS][doc1 vectors][marker]...[docK vectors][marker][question] "
                             "(the continuation marker after every document, as the reference).")
    q.add_argument("cache", help="cache directory (built by `cache build`)")
    q.add_argument("question", help="the question: BM25 retrieves with it, and the decoder reads it after the documents")
    q.add_argument("--top-k", type=positive_int, default=3, help="documents retrieved with BM25 (default 3)")
    q.add_argument("--qa", action="store_true", help="give the decoder the question as `eval make-qa` rows and "
                   "`finetune` train it (a blank line, one worked example, the question, a newline): what a checkpoint "
                   "fine-tuned on such rows, like checkpoints/smollm2-arc, expects")
    q.add_argument("--doc-id", action="append", help="use these documents instead of retrieval (repeatable)")
    q.add_argument("--checkpoint", help="checkpoint directory (default: the one recorded in the cache)")
    q.add_argument("--decoder-path", help="local HF decoder (default: the path recorded in the checkpoint)")
    q.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="tokens to generate at most (greedy; default 64; must fit the decoder's positions)")
    q.add_argument("--allow-no-match", action="store_true",
                   help="answer even from documents that share no word with the question (BM25 0); without it such "
                   "documents are left out, and a question that matches none is an error")
    add_device_arg(q)
    add_allow_other_decoder_arg(q)
    q.set_defaults(func=cmd_query)
