"""Fault and bad-input tests of compressed caches.

A resumed build redoes shards whose documents changed, concurrent builds into one directory
are refused, every structural inconsistency of a cache (offsets, dtypes, shard counts,
malformed manifests) is an error naming the file, and corpus problems are found before any
shard is written.
"""

import json
import shutil
import threading

import pytest
import torch

from arc_encoder.cache.build import CacheBuild, build_cache
from arc_encoder.cache.format import CACHE_MANIFEST, INDEX_NAME, cache_lock, shard_name, sidecar_name, verify_cache
from arc_encoder.cache.reader import CompressedCache
from arc_encoder.cli.main import main
from arc_encoder.storage import sha256_file
from test_cache import make_docs, setup, write_jsonl  # noqa: F401 - setup is the module fixture

KW = dict(docs_per_shard=4, batch_size=3, progress=False)


@pytest.fixture(scope="module")
def built(setup):
    """One finished cache (tests that damage it work on a copy)."""
    tmp, model, _, _, ckpt, corpus = setup
    return build_cache(ckpt, "dec", corpus, tmp / "built", model=model, **KW).directory


def record(cache, rel: str) -> None:
    """Re-record file ``rel`` in the cache manifest (a consistent-looking but wrong cache)."""
    path = cache / CACHE_MANIFEST
    manifest = json.loads(path.read_text())
    manifest["files"][rel] = {"sha256": sha256_file(cache / rel), "bytes": (cache / rel).stat().st_size}
    path.write_text(json.dumps(manifest))


def edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------- changed text, same id
def test_resume_redoes_a_shard_whose_document_text_changed(setup, tmp_path):
    _, model, _, _, ckpt, _ = setup
    docs = make_docs()
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    build_cache(ckpt, "dec", corpus, tmp_path / "c", model=model, **KW)
    docs[5]["text"] = "Completely different words now, still the same id."
    write_jsonl(corpus, docs)
    result = build_cache(ckpt, "dec", corpus, tmp_path / "c", model=model, resume=True, **KW)
    assert result.shards_written == [1] and result.shards_reused == 2
    cache = CompressedCache(tmp_path / "c")
    with torch.no_grad():
        fresh = model.compress([docs[5]["text"]], "dec").unpad()[0]
    torch.testing.assert_close(cache.get("doc-5"), fresh, atol=2e-3, rtol=2e-3)
    assert cache.texts()["doc-5"] == docs[5]["text"] and verify_cache(tmp_path / "c") == []


# ---------------------------------------------------------------------------- concurrent builds
def test_a_second_build_into_the_same_directory_is_refused_while_one_runs(setup, tmp_path):
    _, model, _, _, ckpt, corpus = setup
    out = tmp_path / "c"
    errors = []

    def second_build(k):
        if k == 0:  # while the first build is between shards, another one starts
            for resume in (False, True):
                try:
                    build_cache(ckpt, "dec", corpus, out, model=model, resume=resume, **KW)
                except Exception as err:  # noqa: BLE001
                    errors.append(err)

    build_cache(ckpt, "dec", corpus, out, model=model, on_shard=second_build, **KW)
    assert len(errors) == 2 and all("another build" in str(e) and "lock" in str(e) for e in errors), errors
    assert verify_cache(out, checkpoint=ckpt) == []
    with cache_lock(out):  # released: the next build may take it
        pass


def test_the_lock_is_held_across_threads_of_one_process_too(tmp_path):
    out = tmp_path / "c"
    got = []
    with cache_lock(out):
        t = threading.Thread(target=lambda: got.append(_try_lock(out)))
        t.start()
        t.join()
    assert got == [False] and _try_lock(out)
    assert not out.exists() or [p.name for p in out.iterdir()] == []  # nothing left in a directory the lock made


def _try_lock(path) -> bool:
    try:
        with cache_lock(path):
            return True
    except FileExistsError:
        return False


def test_finalize_refuses_a_shard_written_by_another_build(setup, tmp_path):
    _, model, _, _, ckpt, corpus = setup
    out = tmp_path / "c"
    build_cache(ckpt, "dec", corpus, out, model=model, **KW)
    build = CacheBuild.for_checkpoint(ckpt, "dec", corpus, out, docs_per_shard=4, batch_size=3)
    assert build.open(resume=True) == []
    edit_json(out / sidecar_name(1), lambda d: d.update(build_sha256="0" * 64))
    with pytest.raises(ValueError, match=r"shard-00001.json: written by another build"):
        build.finalize()


# ---------------------------------------------------------------------------- inconsistent caches
def test_an_index_offset_past_its_shard_is_an_error_not_zero_vectors(setup, tmp_path):
    _, model, _, _, ckpt, corpus = setup
    out = tmp_path / "c"
    build_cache(ckpt, "dec", corpus, out, model=model, **KW)
    edit_json(out / INDEX_NAME, lambda d: d["docs"]["doc-1"].update(offset=10_000))
    record(out, INDEX_NAME)
    cache = CompressedCache(out)
    with pytest.raises(ValueError, match=r"shard-00000.safetensors: document 'doc-1' .* rows 10000"):
        cache.get("doc-1")
    assert any("shard-00000.safetensors" in p for p in verify_cache(out))


def test_a_shard_of_another_dtype_is_refused(setup, tmp_path):
    _, model, _, _, ckpt, corpus = setup
    fp16, int8 = tmp_path / "fp16", tmp_path / "int8"
    build_cache(ckpt, "dec", corpus, fp16, model=model, dtype="float16", **KW)
    build_cache(ckpt, "dec", corpus, int8, model=model, dtype="int8", **KW)
    (fp16 / shard_name(0)).write_bytes((int8 / shard_name(0)).read_bytes())
    record(fp16, shard_name(0))
    problems = verify_cache(fp16)
    assert any("shard-00000.safetensors" in p and "int8" in p and "float16" in p for p in problems), problems
    with pytest.raises(ValueError, match=r"shard-00000.safetensors: .*int8.*float16"):
        CompressedCache(fp16).get("doc-0")


def test_a_manifest_with_fewer_shards_than_the_index_is_refused(setup, tmp_path):
    _, model, _, _, ckpt, corpus = setup
    out = tmp_path / "c"
    build_cache(ckpt, "dec", corpus, out, model=model, **KW)
    edit_json(out / CACHE_MANIFEST, lambda d: d.update(num_shards=1))
    with pytest.raises(ValueError, match=r"num_shards 1.*3"):
        CompressedCache(out)
    assert any("num_shards" in p for p in verify_cache(out))


@pytest.mark.parametrize("edit, message", [
    (lambda d: [1, 2], "expected a JSON object"),
    (lambda d: {k: v for k, v in d.items() if k != "files"}, "'files' must be a mapping"),
    (lambda d: {k: v for k, v in d.items() if k != "dtype"}, "dtype"),
    (lambda d: {**d, "files": {k: {"sha256": v["sha256"]} for k, v in d["files"].items()}}, "'bytes'"),
    (lambda d: {**d, "tokens": 0}, "tokens must be an integer >= 1"),
    (lambda d: {**d, "num_docs": "11"}, "num_docs must be an integer"),
])
def test_malformed_cache_manifests_are_one_error_line(built, tmp_path, capsys, edit, message):
    out = tmp_path / "c"
    shutil.copytree(built, out)
    data = json.loads((out / CACHE_MANIFEST).read_text())
    (out / CACHE_MANIFEST).write_text(json.dumps(edit(data)))
    for argv in (["cache", "info", str(out)], ["cache", "verify", str(out)],
                 ["cache", "query", str(out), "What is a list?", "--device", "cpu"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- corpus problems up front
def test_a_too_long_document_is_found_before_any_shard_is_written(setup, tmp_path):
    _, model, _, _, ckpt, _ = setup
    docs = make_docs()
    limit = model.encoder.config.chunk_len * model.encoder.config.max_chunks
    docs.append({"id": "huge", "text": " ".join(["word"] * (limit + 50))})
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    with pytest.raises(ValueError, match=r"document 'huge' has \d+ tokens, over the limit"):
        build_cache(ckpt, "dec", corpus, tmp_path / "c", model=model, **KW)
    assert not list((tmp_path / "c").rglob("*.safetensors"))


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.txt"])
def test_a_corpus_that_is_not_utf8_is_named(setup, tmp_path, capsys, name):
    _, _, _, _, ckpt, _ = setup
    corpus = tmp_path / name
    corpus.write_bytes(b'{"id": "a", "text": "caf\xe9 au lait"}\n' if name.endswith("jsonl") else b"caf\xe9\n")
    assert main(["cache", "build", str(ckpt), "--decoder", "dec", "--corpus", str(corpus), "--output",
                 str(tmp_path / "c"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(corpus) in err and "UTF-8" in err and "Traceback" not in err


def test_build_output_that_is_a_file_is_refused(setup, tmp_path, capsys):
    _, _, _, _, ckpt, corpus = setup
    (tmp_path / "taken").write_text("a file")
    assert main(["cache", "build", str(ckpt), "--decoder", "dec", "--corpus", str(corpus), "--output",
                 str(tmp_path / "taken"), "--device", "cpu"]) == 2
    assert "taken" in capsys.readouterr().err and (tmp_path / "taken").read_text() == "a file"
