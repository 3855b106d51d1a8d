"""Entropy-adaptive caches: per-chunk factors recorded, budget kept, deterministic, both builders."""

import json

import pytest
import torch

from arc_encoder.adaptive import AdaptivePooling
from arc_encoder.cache.build import build_cache
from arc_encoder.cache.report import cache_report
from arc_encoder.cache.reader import CompressedCache
from arc_encoder.cli.main import main
from arc_encoder_train.cache_predict import build_cache_lightning
from conftest import TEXT, make_model

WORDS = TEXT.split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from arc_encoder.tiny import train_tokenizer

    tmp = tmp_path_factory.mktemp("cache_adaptive")
    tok = train_tokenizer([TEXT], vocab_size=300)
    model, decoder = make_model(tokenizer=tok, vocab_size=len(tok), dec_vocab=len(tok), chunk_len=16,
                                pooling_factors=(2, 4, 8))
    decoder.save_pretrained(tmp / "decoder")
    tok.save_pretrained(tmp / "decoder")
    model.projector("dec").config.decoder = str(tmp / "decoder")
    ckpt = model.save_pretrained(tmp / "ckpt")
    # Real sentences and boring repetition, so zlib scores differ a lot.
    docs = [{"id": f"d{i}", "text": " ".join(WORDS[i : 10 + 7 * i])} for i in range(6)]
    docs += [{"id": f"r{i}", "text": " ".join(["the"] * (20 + 9 * i))} for i in range(4)]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return tmp, model.eval(), ckpt, corpus, docs


def files_of(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("density", ["zlib", "decoder_nll"])
def test_adaptive_cache_records_plans_within_budget(setup, tmp_path, density):
    _, model, ckpt, corpus, docs = setup
    policy = AdaptivePooling((2, 4, 8), 4.0, density, 2.0)
    kw = dict(docs_per_shard=5, batch_size=3, model=model, progress=False, dtype="float32")
    fixed = build_cache(ckpt, "dec", corpus, tmp_path / "fixed", **kw)
    res = build_cache(ckpt, "dec", corpus, tmp_path / "ad", adaptive=policy, **kw)
    m = res.manifest
    assert m["pooling"] == "adaptive" and m["adaptive_density"] == density
    assert m["vectors"] <= fixed.manifest["vectors"]
    cache = CompressedCache(tmp_path / "ad", checkpoint=ckpt, decoder="dec")
    used = {}
    for d in docs:
        entry = cache.index[d["id"]]
        ids = model.tokenize([d["text"]])[0]
        chunks = model.chunk(ids)
        assert len(entry["pooling_factors"]) == len(chunks)
        assert entry["length"] == sum(-(-len(c) // f) for c, f in zip(chunks, entry["pooling_factors"]))
        with torch.no_grad():
            ref = model.compress([ids], "dec", pooling_factors=[entry["pooling_factors"]]).unpad()[0]
        torch.testing.assert_close(cache.get(d["id"]), ref, atol=1e-5, rtol=1e-5)
        used[d["id"]] = entry["pooling_factors"]
    assert sum(m["chunks_per_pooling_factor"].values()) == sum(len(v) for v in used.values())
    if density == "zlib":  # repetition is the most compressible text: it gets the coarsest factor
        assert all(8 in used[f"r{i}"] for i in range(4))
    r = cache_report(tmp_path / "ad")
    assert r["pooling"] == "adaptive" and r["vectors_per_token"] == pytest.approx(m["vectors"] / m["tokens"])


def test_adaptive_lightning_build_is_byte_identical(setup, tmp_path):
    _, model, ckpt, corpus, _ = setup
    policy = AdaptivePooling((2, 4, 8), 4.0, "zlib", 2.0)
    kw = dict(docs_per_shard=4, batch_size=2, dtype="float16", adaptive=policy)
    build_cache(ckpt, "dec", corpus, tmp_path / "ref", model=model, progress=False, **kw)
    build_cache_lightning(ckpt, "dec", corpus, tmp_path / "pl", **kw,
                          trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
    assert files_of(tmp_path / "pl") == files_of(tmp_path / "ref")
    with pytest.raises(ValueError, match="build settings differ"):  # resume with another policy is refused
        build_cache(ckpt, "dec", corpus, tmp_path / "ref", model=model, progress=False, resume=True,
                    **{**kw, "adaptive": AdaptivePooling((2, 4, 8), 4.0, "zlib", 1.0)})


def test_adaptive_cli_and_untrained_factors(setup, tmp_path, capsys):
    tmp, _, ckpt, corpus, _ = setup
    out = tmp_path / "c"
    assert main(["cache", "build", str(ckpt), "--decoder", "dec", "--corpus", str(corpus), "--output", str(out),
                 "--adaptive", "zlib", "--adaptive-strength", "2"]) == 0
    assert "adaptive pooling (zlib)" in capsys.readouterr().out
    assert main(["cache", "info", str(out)]) == 0
    assert "chunks per factor" in capsys.readouterr().out
    assert main(["cache", "build", str(ckpt), "--decoder", "dec", "--corpus", str(corpus), "--output",
                 str(tmp_path / "d"), "--adaptive", "zlib", "--adaptive-factors", "2,16"]) == 2
    assert "never trained" in capsys.readouterr().err
