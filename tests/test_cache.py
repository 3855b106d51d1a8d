"""Compressed RAG cache: build, resume, verify, refuse mismatches, serve (tiny models, CPU)."""

import gzip
import json

import pytest
import torch

from arc_encoder.cache.build import build_cache
from arc_encoder.cache.report import cache_report, kv_cache_bytes_per_token
from arc_encoder.cache.retrieve import BM25Retriever
from arc_encoder.cache.format import dequantize_int8, quantize_int8, shard_name, verify_cache
from arc_encoder.cache.reader import CompressedCache
from arc_encoder.corpus import DocumentStream
from arc_encoder.cli.main import main
from arc_encoder.objectives import decoder_loss
from arc_encoder.model import ARCModel
from conftest import TEXT, make_model

WORDS = TEXT.split()


def make_docs(n=11):
    # Varied lengths (odd, some > chunk_len=16 so they span several chunks).
    return [{"id": f"doc-{i}", "text": " ".join(WORDS[i : i + 3 + 5 * i])} for i in range(n)]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from arc_encoder.tiny import train_tokenizer

    tmp = tmp_path_factory.mktemp("cache")
    tok = train_tokenizer([TEXT], vocab_size=300)
    model, decoder = make_model(tokenizer=tok, vocab_size=len(tok), dec_vocab=len(tok), chunk_len=16)
    decoder.save_pretrained(tmp / "decoder")
    tok.save_pretrained(tmp / "decoder")
    model.projector("dec").config.decoder = str(tmp / "decoder")
    ckpt = model.save_pretrained(tmp / "ckpt")
    corpus = write_jsonl(tmp / "corpus.jsonl", make_docs())
    return tmp, model.eval(), decoder.eval(), tok, ckpt, corpus


def files_of(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("float16", 2e-3)])
def test_cached_vectors_equal_fresh_compress(setup, tmp_path, dtype, atol):
    _, model, _, _, ckpt, corpus = setup
    docs = make_docs()
    result = build_cache(ckpt, "dec", corpus, tmp_path / "c", dtype=dtype, docs_per_shard=4, batch_size=3,
                         model=model, progress=False)
    assert result.manifest["num_docs"] == 11 and result.manifest["num_shards"] == 3
    cache = CompressedCache(tmp_path / "c", checkpoint=ckpt, decoder="dec")
    with torch.no_grad():
        fresh = model.compress([d["text"] for d in docs], "dec").unpad()
    tokens = [len(t) for t in model.tokenize([d["text"] for d in docs])]
    assert max(tokens) > 16  # some documents are chunked
    for d, ref, n in zip(docs, fresh, tokens):
        got = cache.get(d["id"])
        assert got.shape == ref.shape == (sum(-(-min(16, n - s) // 4) for s in range(0, n, 16)), 24)
        torch.testing.assert_close(got, ref, atol=atol, rtol=atol)
        assert cache.index[d["id"]]["tokens"] == n
    ctx = cache.context([["doc-3", "doc-0"]])
    torch.testing.assert_close(ctx.embeddings[0], torch.cat([cache.get("doc-3"), cache.get("doc-0")]))
    assert result.manifest["tokens"] == sum(tokens)
    assert result.manifest["vectors"] == sum(r.shape[0] for r in fresh)


def test_interrupted_build_resumes_to_identical_cache(setup, tmp_path):
    _, model, _, _, ckpt, corpus = setup
    kw = dict(dtype="float16", docs_per_shard=3, batch_size=2, model=model, progress=False)
    full = build_cache(ckpt, "dec", corpus, tmp_path / "full", **kw)

    def crash(k):
        if k == 1:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        build_cache(ckpt, "dec", corpus, tmp_path / "part", on_shard=crash, **kw)
    part = tmp_path / "part"
    with pytest.raises(FileNotFoundError, match="did not finish: resume it"):
        CompressedCache(part)
    with pytest.raises(FileExistsError, match="continue it with --resume"):
        build_cache(ckpt, "dec", corpus, part, **kw)
    # A kill inside shard 2's write: half-written temp file, vector file without its sidecar.
    (part / "shards" / ".shard-00002.safetensors.abc.tmp").write_bytes(b"half")
    (part / shard_name(2)).write_bytes(b"partial")
    # And shard 1's vectors corrupted after its sidecar was written: must be redone too.
    (part / shard_name(1)).write_bytes(b"x" + (part / shard_name(1)).read_bytes()[1:])
    resumed = build_cache(ckpt, "dec", corpus, part, resume=True, **kw)
    assert resumed.shards_written == [1, 2, 3] and resumed.shards_reused == 1
    assert files_of(part) == files_of(tmp_path / "full")
    assert full.manifest["num_shards"] == 4
    again = build_cache(ckpt, "dec", corpus, part, resume=True, **kw)
    assert again.shards_written == [] and again.shards_reused == 4
    with pytest.raises(ValueError, match="build settings differ"):
        build_cache(ckpt, "dec", corpus, part, resume=True, **{**kw, "docs_per_shard": 5})


def test_tampered_shard_is_named(setup, tmp_path):
    _, model, _, _, ckpt, corpus = setup
    build_cache(ckpt, "dec", corpus, tmp_path / "c", docs_per_shard=4, model=model, progress=False)
    assert verify_cache(tmp_path / "c", checkpoint=ckpt) == []
    shard = tmp_path / "c" / shard_name(1)
    blob = bytearray(shard.read_bytes())
    blob[-3] ^= 0xFF
    shard.write_bytes(bytes(blob))
    problems = verify_cache(tmp_path / "c")
    assert len(problems) == 1 and "shard-00001.safetensors: checksum mismatch" in problems[0]
    cache = CompressedCache(tmp_path / "c")
    cache.get("doc-0")  # shard 0 is fine
    with pytest.raises(ValueError, match="shard-00001.safetensors: checksum mismatch"):
        cache.get("doc-5")
    shard.write_bytes(bytes(blob[:-10]))
    assert "shard-00001.safetensors: " in verify_cache(tmp_path / "c")[0]
    with pytest.raises(ValueError, match="shard-00001.safetensors: .* bytes, manifest says .*truncated"):
        CompressedCache(tmp_path / "c", verify="size").get("doc-5")


def test_other_checkpoint_or_decoder_refused(setup, tmp_path):
    tmp, model, _, tok, ckpt, corpus = setup
    build_cache(ckpt, "dec", corpus, tmp_path / "c", docs_per_shard=4, model=model, progress=False)
    other, _ = make_model(tokenizer=tok, vocab_size=len(tok), dec_vocab=len(tok), chunk_len=16)
    torch.nn.init.zeros_(other.projector("dec").net[0].weight)  # the default projector has no bias
    other_ckpt = other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"built with checkpoint .*ckpt \(sha256 .*\), not .*other \(sha256"):
        CompressedCache(tmp_path / "c", checkpoint=other_ckpt)
    with pytest.raises(ValueError, match="holds vectors for decoder 'dec', not 'llama8b'"):
        CompressedCache(tmp_path / "c", checkpoint=ckpt, decoder="llama8b")
    assert "built with checkpoint sha256" in verify_cache(tmp_path / "c", checkpoint=other_ckpt)[0]
    with pytest.raises(ValueError, match="no projector for decoder 'nope'"):
        build_cache(ckpt, "nope", corpus, tmp_path / "d", model=model, progress=False)


def test_empty_documents_and_duplicate_ids(setup, tmp_path):
    _, model, _, _, ckpt, _ = setup
    docs = make_docs(5)
    docs.insert(2, {"id": "blank", "text": "   \n"})
    docs.append({"id": "doc-1", "text": "A second doc-1."})
    corpus = write_jsonl(tmp_path / "dup.jsonl", docs)
    with pytest.raises(ValueError, match=r"duplicate document id 'doc-1' at rows 2 and 7"):
        build_cache(ckpt, "dec", corpus, tmp_path / "c", model=model, progress=False)
    r = build_cache(ckpt, "dec", corpus, tmp_path / "c2", dedupe=True, model=model, progress=False)
    assert (r.manifest["num_docs"], r.manifest["skipped_empty"], r.manifest["dropped_duplicates"]) == (5, 1, 1)
    cache = CompressedCache(tmp_path / "c2")
    assert "blank" not in cache.index and cache.texts()["doc-1"] == docs[1]["text"]
    with pytest.raises(KeyError, match="'blank' is not in cache"):
        cache.get("blank")
    with pytest.raises(ValueError, match="no non-empty documents"):
        DocumentStream.from_records(["a", "b"], ["", " "])
    with pytest.raises(ValueError, match="no 'text' field"):
        DocumentStream.from_corpus(write_jsonl(tmp_path / "bad.jsonl", [{"id": 1, "body": "x"}]))


def test_int8_quality_cost_is_small(setup, tmp_path):
    _, model, decoder, tok, ckpt, corpus = setup
    x = torch.randn(37, 24) * torch.linspace(0.1, 5, 37)[:, None]
    q, s = quantize_int8(x)
    assert q.dtype == torch.int8 and s.shape == (37,)
    assert (dequantize_int8(q, s) - x).abs().max() <= s.max() / 2 + 1e-6
    build_cache(ckpt, "dec", corpus, tmp_path / "f", dtype="float32", docs_per_shard=4, model=model, progress=False)
    build_cache(ckpt, "dec", corpus, tmp_path / "q", dtype="int8", docs_per_shard=4, model=model, progress=False)
    full, quant = CompressedCache(tmp_path / "f"), CompressedCache(tmp_path / "q")
    ids = full.doc_ids
    ref = torch.cat([full.get(i) for i in ids])
    deq = torch.cat([quant.get(i) for i in ids])
    rel_l2 = ((deq - ref).norm() / ref.norm()).item()
    assert rel_l2 < 0.01
    # Continuation loss of the decoder given each cached context: int8 vs float32.
    target = tok([d["text"] for d in make_docs()[:4]], add_special_tokens=False)["input_ids"]
    losses = []
    for cache in (full, quant):
        ctx = cache.fetch(ids[:4])
        inputs = model.build_decoder_inputs(decoder.get_input_embeddings(), ctx, [[]] * 4, target,
                                            prefix_ids=[[1]] * 4)
        with torch.no_grad():
            losses.append(decoder_loss(decoder, inputs).item())
    assert abs(losses[1] - losses[0]) / losses[0] < 1e-3
    assert (tmp_path / "q" / shard_name(0)).stat().st_size < 0.4 * (tmp_path / "f" / shard_name(0)).stat().st_size


def test_report_and_kv_bytes(setup, tmp_path):
    _, model, decoder, _, ckpt, corpus = setup
    build_cache(ckpt, "dec", corpus, tmp_path / "c", dtype="bfloat16", model=model, progress=False)
    r = cache_report(tmp_path / "c")
    # Tiny decoder: 2 layers, 1 kv head of dim 8 -> 2 * 2 * 1 * 8 * 2 bytes.
    assert kv_cache_bytes_per_token(decoder.config) == 64 == r["kv_cache_bytes_per_token_bf16"]
    assert r["vector_bytes_per_token"] == pytest.approx(r["vectors"] * 24 * 2 / r["tokens"])
    text_bytes = sum(len(d["text"].encode()) for d in make_docs())
    assert r["text_bytes_per_token"] == pytest.approx(text_bytes / r["tokens"])
    assert r["kv_context_tokens"] == round(r["tokens"] / r["docs"]) and r["kv_layers"]["sliding_layers"] == 0


def test_report_kv_bytes_of_a_sliding_window_decoder(setup, tmp_path, capsys):
    """A Gemma 3-style decoder config (2 of 3 layers keep a 4-token window): KV bytes at the stated length."""
    from transformers import AutoConfig

    _, model, _, _, ckpt, corpus = setup
    build_cache(ckpt, "dec", corpus, tmp_path / "c", dtype="bfloat16", model=model, progress=False)
    AutoConfig.for_model("gemma3_text", vocab_size=99, hidden_size=24, intermediate_size=37, num_hidden_layers=3,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=12, sliding_window=4,
                         layer_types=["sliding_attention", "sliding_attention", "full_attention"]
                         ).save_pretrained(tmp_path / "gemma")
    r = cache_report(tmp_path / "c", str(tmp_path / "gemma"), context_tokens=10)
    per = 2 * 12 * 2  # one layer, one position: K and V of 1 head of 12, bf16
    assert r["kv_cache_bytes_bf16"] == (10 + 2 * 4) * per and r["kv_cache_bytes_per_token_bf16"] == pytest.approx(18 * per / 10)
    assert r["kv_cache_bytes_per_token_bf16_unwindowed"] == 3 * per
    assert r["kv_layers"] == {"full_layers": 1, "sliding_layers": 2, "sliding_window": 4}
    assert r["kv_cache_over_cache"] == pytest.approx(r["kv_cache_bytes_per_token_bf16"] / r["vector_bytes_per_token"])
    assert main(["cache", "info", str(tmp_path / "c"), "--decoder-path", str(tmp_path / "gemma"),
                 "--context-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert "86 bytes/token (bf16) at 10-token contexts (864 bytes); 2 of 3 layers keep only a 4-token window" in out
    with pytest.raises(SystemExit):
        main(["cache", "info", str(tmp_path / "c"), "--context-tokens", "0"])


def test_bm25_retrieves_the_matching_doc():
    ids = ["a", "b", "c"]
    texts = ["lists are mutable sequences", "dictionaries map keys to values", "exceptions signal errors"]
    hits = BM25Retriever(ids, texts).search("which map has keys?", top_k=2)
    assert hits[0][0] == "b" and hits[0][1] > hits[1][1]


def test_cli_build_info_verify_query(setup, tmp_path, capsys):
    tmp, model, decoder, tok, ckpt, _ = setup
    sentences = [x.strip() + "." for x in TEXT.split(".")[:5]] + [" ".join(WORDS[:20 + i]) for i in range(6)]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"doc-{i}", "text": t} for i, t in enumerate(sentences)])
    out = tmp_path / "c"
    assert main(["cache", "build", str(ckpt), "--decoder", "dec", "--corpus", str(corpus), "--output", str(out),
                 "--docs-per-shard", "5", "--device", "cpu"]) == 0
    assert "11 docs" in capsys.readouterr().out
    assert main(["cache", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "decoder KV cache 64 bytes/token" in text and "raw UTF-8 text" in text
    assert main(["cache", "verify", str(out), "--checkpoint", str(ckpt)]) == 0
    assert "OK" in capsys.readouterr().out
    question = "What do dictionaries map?"
    assert main(["cache", "query", str(out), question, "--top-k", "2", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Only doc-3 shares a word with the question: the second of the top 2 is left out, and a note says so.
    assert lines[0].startswith("retrieved    doc-3 (BM25 ") and len(lines) == 3
    assert lines[1].startswith("note         only 1 of the top 2 documents share a word with the question")
    # The CLI answer is the decoder's greedy output on [BOS][doc vectors][marker][question].
    cache = CompressedCache(out)
    expect = model.generate(decoder, tok, cache.decoder, cache.context([["doc-3"]]), [question], max_new_tokens=5,
                            do_sample=False)
    from arc_encoder.cli.cache import format_answer

    assert lines[2] == format_answer(expect[0]) and lines[2].startswith("answer       ")
    assert main(["cache", "query", str(out), "q", "--doc-id", "missing"]) == 2
    assert "not in the cache: ['missing']" in capsys.readouterr().err
    assert main(["cache", "build", str(ckpt), "--decoder", "dec", "--corpus", str(corpus), "--output", str(out)]) == 2
    # The error line names the subcommand and the flag a user types.
    assert capsys.readouterr().err.startswith(f"arc-encoder cache build: error: {out} already holds a cache "
                                              "(or a partial build); continue it with --resume")
    with pytest.raises(SystemExit) as e:
        main(["cache", "build", "--help"])
    assert e.value.code == 0 and "--docs-per-shard" in capsys.readouterr().out


def test_texts_are_stored_gzip_jsonl(setup, tmp_path):
    _, model, _, _, ckpt, corpus = setup
    build_cache(ckpt, "dec", corpus, tmp_path / "c", docs_per_shard=4, model=model, progress=False)
    rows = [json.loads(x) for x in gzip.decompress((tmp_path / "c/shards/shard-00001.texts.jsonl.gz").read_bytes()).splitlines()]
    assert [r["id"] for r in rows] == ["doc-4", "doc-5", "doc-6", "doc-7"]
