"""The Lightning cache build writes exactly the single-process build's files (CPU, devices=1)."""

import json

import pytest

from arc_encoder.cache.build import build_cache
from arc_encoder.cache.format import shard_name
from arc_encoder.cache.reader import CompressedCache
from arc_encoder_train.cache_predict import build_cache_lightning
from arc_encoder_train.cli import main as train_main
from conftest import TEXT, make_model

WORDS = TEXT.split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from arc_encoder.tiny import train_tokenizer

    tmp = tmp_path_factory.mktemp("cp")
    tok = train_tokenizer([TEXT], vocab_size=300)
    model, _ = make_model(tokenizer=tok, vocab_size=len(tok), dec_vocab=len(tok), chunk_len=16)
    ckpt = model.save_pretrained(tmp / "ckpt")
    docs = [{"id": f"d{i}", "text": " ".join(WORDS[i : 4 + 6 * i])} for i in range(9)]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return model.eval(), ckpt, corpus


def files_of(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False}


def test_lightning_build_matches_single_process(setup, tmp_path):
    model, ckpt, corpus = setup
    kw = dict(dtype="bfloat16", docs_per_shard=2, batch_size=3)
    ref = build_cache(ckpt, "dec", corpus, tmp_path / "ref", model=model, progress=False, **kw)
    writer = build_cache_lightning(ckpt, "dec", corpus, tmp_path / "pl", trainer_kwargs=TRAINER, **kw)
    assert writer.written == [0, 1, 2, 3, 4]
    assert writer.manifest == ref.manifest
    got, want = files_of(tmp_path / "pl"), files_of(tmp_path / "ref")
    assert sorted(got) == sorted(want) and len(got) == 3 + 3 * 5
    assert got == want  # byte-identical shards, texts, index and manifest
    assert len(CompressedCache(tmp_path / "pl", checkpoint=ckpt)) == 9


def test_lightning_resume_after_lost_shard(setup, tmp_path, capsys):
    model, ckpt, corpus = setup
    kw = dict(dtype="float16", docs_per_shard=4, batch_size=2)
    build_cache(ckpt, "dec", corpus, tmp_path / "ref", model=model, progress=False, **kw)
    build_cache_lightning(ckpt, "dec", corpus, tmp_path / "pl", trainer_kwargs=TRAINER, **kw)
    (tmp_path / "pl" / shard_name(1)).unlink()  # lost in a crash
    (tmp_path / "pl" / "cache_manifest.json").unlink()
    writer = build_cache_lightning(ckpt, "dec", corpus, tmp_path / "pl", resume=True, trainer_kwargs=TRAINER, **kw)
    assert writer.written == [1]
    assert files_of(tmp_path / "pl") == files_of(tmp_path / "ref")
    argv = ["cache-build", str(ckpt), "--decoder", "dec", "--corpus", str(corpus), "--output", str(tmp_path / "pl")]
    assert train_main(argv) == 2
    assert capsys.readouterr().err.startswith("arc-encoder-train cache-build: error: ")


def test_train_cli_exposes_cache_build(capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["cache-build", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "arc-encoder-train cache-build" in out and "--docs-per-shard" in out
