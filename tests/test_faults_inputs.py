"""Bad inputs of `arc-encoder` commands: tracebacks, a hang, misleading OKs, silent
questionable results and unclear errors, each reproduced, each now one clear line.

Every JSON field is type-checked at load (one error line naming the file and the field);
generation lengths are bounded by the decoder's positions; `verify` says whether the
checkpoint loads; retrieval that matches nothing says so; corpus errors name the line.
"""

import errno
import json
import os
import shutil

import pytest

from arc_encoder.cli.main import main
from conftest import rehash
from test_faults_outputs import project  # noqa: F401 - the module fixture: root/ck, root/dec, root/c.jsonl


def one_error(argv, capsys, code=2) -> str:
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse: its usage, then one error line
        got = exit_.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert got == code and len(lines) == 1 and "error:" in lines[0] and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.fixture
def ck(project, tmp_path):  # noqa: F811
    """A copy of the project's checkpoint, free to damage."""
    return shutil.copytree(project / "ck", tmp_path / "ck")


def edit_config(ck, edit) -> None:
    data = json.loads((ck / "arc_config.json").read_text())
    edit(data)
    (ck / "arc_config.json").write_text(json.dumps(data))
    rehash(ck, "arc_config.json")


# ---------------------------------------------------------------------------- tracebacks: wrongly typed JSON
@pytest.mark.parametrize("key, value, field", [
    ("encoder", None, "encoder must be a mapping"),
    ("encoder", [], "encoder must be a mapping"),
    ("encoder", "x", "encoder must be a mapping"),
    ("encoder", {}, "missing keys ['base_model']"),
    ("projectors", None, "projectors must be a mapping"),
    ("projectors", ["q"], "projectors must be a mapping"),
    ("projectors.q", None, "projectors.q must be a mapping"),
    ("projectors.q", "x", "projectors.q must be a mapping"),
    ("projectors.q", {}, "missing keys"),
    ("projectors.q.special_tokens", [[1]], "special token"),
])
def test_wrongly_typed_config_values_are_one_line_in_info_compress_and_verify(ck, capsys, key, value, field):
    def edit(data):
        *parents, last = key.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[last] = value

    edit_config(ck, edit)
    for argv in (["info", str(ck)], ["compress", str(ck), "--decoder", "q", "--text", "x", "--output",
                                      str(ck.parent / "o.st"), "--device", "cpu"]):
        line = one_error(argv, capsys)
        assert "arc_config.json" in line and field in line, line
    assert main(["verify", str(ck)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL") and "does not load" in out and field in out and "OK" not in out


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    yield prefix.rstrip(".")


def test_every_field_of_arc_config_is_type_checked_at_load(ck):
    """Each field set to each wrong JSON type: a ValueError naming the file, or a config that loads."""
    from arc_encoder import ARCModel

    good = json.loads((ck / "arc_config.json").read_text())
    tried = 0
    for key in [k for k in _leaves(good) if k]:
        for value in (None, [], {}, "x", 1.5, -2, True, [[1]]):
            data = json.loads(json.dumps(good))
            *parents, last = key.split(".")
            node = data
            for p in parents:
                node = node[p]
            node[last] = value
            (ck / "arc_config.json").write_text(json.dumps(data))
            rehash(ck, "arc_config.json")
            tried += 1
            try:
                ARCModel.from_pretrained(ck)
            except ValueError as err:
                assert "arc_config.json" in str(err) or "safetensors" in str(err), (key, value, err)
    assert tried > 150


# ---------------------------------------------------------------------------- misleading OK: verify loads
@pytest.mark.parametrize("case", ["no format_version", "format_version 99", "pooling_factor 0", "pooling_factor -2",
                                  "pooling_factor '4'", "unknown key", "encoder null", "hidden_dim", "vocab"])
def test_verify_fails_a_checkpoint_whose_files_match_but_that_does_not_load(ck, capsys, case):
    edits = {
        "no format_version": lambda d: d.pop("format_version"),
        "format_version 99": lambda d: d.update(format_version=99),
        "pooling_factor 0": lambda d: d["encoder"].update(pooling_factor=0),
        "pooling_factor -2": lambda d: d["encoder"].update(pooling_factor=-2),
        "pooling_factor '4'": lambda d: d["encoder"].update(pooling_factor="4"),
        "unknown key": lambda d: d["encoder"].update(pooling="fast"),
        "encoder null": lambda d: d.update(encoder=None),
        "hidden_dim": lambda d: d["projectors"]["q"].update(hidden_dim=17),  # the tensors are 16 wide
    }
    assert main(["verify", str(ck)]) == 0
    assert "checkpoint loads" in capsys.readouterr().out
    if case == "vocab":  # an encoder config of another vocabulary than its weights
        cfg = json.loads((ck / "encoder" / "config.json").read_text())
        cfg["vocab_size"] += 3
        (ck / "encoder" / "config.json").write_text(json.dumps(cfg))
        rehash(ck, "encoder/config.json")
    else:
        edit_config(ck, edits[case])
    assert main(["verify", str(ck)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("FAIL") and "every file matches the manifest, but the checkpoint " \
        "does not load" in out[0], out


# ---------------------------------------------------------------------------- a hang: generation lengths
def test_generation_is_bounded_by_the_decoders_positions(project, capsys):  # noqa: F811
    gen = ["generate", str(project / "ck"), "--decoder", "q", "--context", "A list.", "--prompt", "Lists",
           "--device", "cpu", "--max-new-tokens"]
    line = one_error([*gen, "1000000000000"], capsys)
    assert "max_position_embeddings" in line and "at most" in line and "--max-new-tokens" in line
    assert "expected an integer >= 1" in one_error([*gen, "0"], capsys)
    assert "expected an integer >= 1" in one_error([*gen, "-3"], capsys)
    from arc_encoder.cache.build import build_cache

    build_cache(project / "ck", "q", project / "c.jsonl", project.parent / "bounded_cache", progress=False)
    line = one_error(["cache", "query", str(project.parent / "bounded_cache"), "What is a list?", "--device", "cpu",
                      "--max-new-tokens", "1000000000000"], capsys)
    assert "max_position_embeddings" in line


# ---------------------------------------------------------------------------- unclear errors: corpus files
@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", "the file is empty"),
    ("blank.jsonl", b"\n\n", "only blank lines"),
    ("truncated.jsonl", b'{"id": "a", "text": "abc"}\n{"id": "b", "text": "de', "line 2, column"),
    ("truncated.jsonl.gz", "gzip", "gzip file is truncated"),
    ("latin1.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', "line 2: not UTF-8"),
    ("int.jsonl", b'{"id": "a", "text": 123}\n', "row 1"),
])
def test_corpus_errors_name_the_file_and_the_line(project, tmp_path, capsys, name, content, message):  # noqa: F811
    import gzip

    if content == "gzip":
        content = gzip.compress((project / "c.jsonl").read_bytes())[:30]
    path = tmp_path / name
    path.write_bytes(content)
    for argv in (["compress", str(project / "ck"), "--decoder", "q", "--input", str(path), "--output",
                  str(tmp_path / "o.st"), "--device", "cpu"],
                 ["cache", "build", str(project / "ck"), "--decoder", "q", "--corpus", str(path), "--output",
                  str(tmp_path / "cache"), "--device", "cpu"]):
        line = one_error(argv, capsys)
        assert name in line and message in line and "StopIteration" not in line and "DatasetGeneration" not in line
    if "int" in name:  # the same words in both commands
        assert "text is int, not str" in line


def test_context_file_errors_say_what_is_wrong(project, tmp_path, capsys):  # noqa: F811
    import gzip

    gen = ["generate", str(project / "ck"), "--decoder", "q", "--prompt", "x", "--device", "cpu", "--context-file"]
    assert "is a directory" in one_error([*gen, str(tmp_path)], capsys)
    (tmp_path / "ctx.txt.gz").write_bytes(gzip.compress(b"A list is mutable. " * 20)[:25])
    line = one_error([*gen, str(tmp_path / "ctx.txt.gz")], capsys)
    assert "ctx.txt.gz" in line and "truncated" in line


# ---------------------------------------------------------------------------- unclear errors: flags and disks
def test_a_negative_budget_reaches_its_own_check(capsys):
    assert "--budget '-5ms': must be > 0" in one_error(["plan", "--budget", "-5ms", "--context-tokens", "100"], capsys)
    assert "> 0, got -5" in one_error(["plan", "--budget-ms", "-5", "--context-tokens", "100"], capsys)


def test_convert_reference_names_the_flag_not_the_keyword(project, tmp_path, capsys):  # noqa: F811
    (tmp_path / "dst").mkdir()
    line = one_error(["convert-reference", str(project / "ck"), str(tmp_path / "dst")], capsys)
    assert "pass --overwrite" in line and "overwrite=True" not in line


def test_a_full_disk_names_the_file_and_ends_the_bar_line(project, tmp_path, capsys, monkeypatch):  # noqa: F811
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    line = one_error(["compress", str(project / "ck"), "--decoder", "q", "--text", "x", "--output",
                      str(tmp_path / "o.st"), "--device", "cpu"], capsys)
    assert line.endswith(f"error: {tmp_path / 'o.st'}: No space left on device"), line
    assert "Errno" not in line
    code = main(["cache", "build", str(project / "ck"), "--decoder", "q", "--corpus", str(project / "c.jsonl"),
                 "--output", str(tmp_path / "cache"), "--device", "cpu"])
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("arc-encoder cache build: error: "), err
    assert str(tmp_path / "cache") in errors[0] and "No space left on device" in errors[0]


# ---------------------------------------------------------------------------- silent questionable results
@pytest.fixture(scope="module")
def cache(project):  # noqa: F811
    from arc_encoder.cache.build import build_cache

    return build_cache(project / "ck", "q", project / "c.jsonl", project.parent / "cache", progress=False).directory


@pytest.mark.parametrize("question", ["", "   ", "zebra quokka"])
def test_retrieval_that_matches_nothing_says_so_and_refuses_unless_asked(cache, capsys, question):
    query = ["cache", "query", str(cache), question, "--max-new-tokens", "2", "--device", "cpu"]
    line = one_error(query, capsys)
    assert "no document matches the question" in line and "--allow-no-match" in line
    assert main([*query, "--allow-no-match"]) == 0
    out = capsys.readouterr().out
    assert out.count("no match") == 2 and "answer" in out


def test_retrieval_leaves_out_documents_that_do_not_match(cache, capsys):
    assert main(["cache", "query", str(cache), "What is a list?", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("retrieved") == 1 and "only 1 of the top 3 documents" in out


def test_cache_info_refuses_a_decoder_of_another_width_and_a_truncated_shard(cache, tmp_path, capsys):
    from arc_encoder.tiny import tiny_config

    tiny_config("llama", vocab_size=99, hidden_size=32).save_pretrained(tmp_path / "wide")
    line = one_error(["cache", "info", str(cache), "--decoder-path", str(tmp_path / "wide")], capsys)
    assert "width 32" in line and "width 24" in line
    assert main(["cache", "info", str(cache)]) == 0
    assert "vs KV cache" in capsys.readouterr().out
    damaged = shutil.copytree(cache, tmp_path / "damaged")
    shard = damaged / "shards" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    line = one_error(["cache", "info", str(damaged)], capsys)
    assert "shard-00000.safetensors" in line and "cache verify" in line


def test_eval_info_needs_at_least_one_sample_and_explains_negative_bits(project, capsys):  # noqa: F811
    from arc_encoder.cli.eval import format_table

    line = one_error(["eval", "info", str(project / "ck"), "--decoder", "q", "--data", str(project / "c.jsonl"),
                      "--max-samples", "0"], capsys)
    assert "--max-samples" in line and ">= 1" in line
    point = {"label": "pf4", "chunk_len": 16, "rate_vectors_per_token": 0.25, "bits_none_per_token": 5.0,
             "bits_recovered_per_token": -0.3, "bits_per_vector": -1.2, "info_retained": -0.06,
             "loss_compressed": 3.1, "gap_closed": -0.2, "em_at_k": 0.0, "recon_acc": 0.1, "loss_none": 3.0,
             "loss_full": 2.5}
    table = format_table([point])
    assert "negative recov (pf4)" in table and "worse than with no context" in table
    assert "negative" not in format_table([{**point, "bits_recovered_per_token": 0.3}])


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:1]):
            yield from _paths(v, (*prefix, i))
    if prefix:
        yield prefix


@pytest.mark.parametrize("rel", ["cache_manifest.json", "build_config.json", "index.json", "shards/shard-00000.json"])
def test_every_field_of_the_cache_files_is_type_checked(cache, project, tmp_path, rel):  # noqa: F811
    """Each field of each cache JSON file set to wrong types: opening, reporting, verifying and
    resuming raise a ValueError (one error line) or work; never another exception."""
    from arc_encoder import ARCModel
    from arc_encoder.cache.build import build_cache
    from arc_encoder.cache.report import cache_report
    from arc_encoder.cache.format import verify_cache
    from arc_encoder.cache.reader import CompressedCache
    from arc_encoder.storage import sha256_file

    model = ARCModel.from_pretrained(project / "ck")
    work = shutil.copytree(cache, tmp_path / "cache")
    original = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    good = json.loads((work / rel).read_text())
    tried = 0
    for key in _paths(good):
        for value in (None, "x", -2):
            for p, data in original.items():  # the resume may have rewritten files
                p.write_bytes(data)
            data = json.loads(json.dumps(good))
            node = data
            for part in key[:-1]:
                node = node[part]
            node[key[-1]] = value
            (work / rel).write_text(json.dumps(data))
            if rel != "cache_manifest.json":  # the manifest agrees: only the types are wrong
                manifest = json.loads((work / "cache_manifest.json").read_text())
                manifest["files"][rel] = {"sha256": sha256_file(work / rel), "bytes": (work / rel).stat().st_size}
                (work / "cache_manifest.json").write_text(json.dumps(manifest))
            calls = [lambda: CompressedCache(work).texts(), lambda: cache_report(work), lambda: verify_cache(work)]
            if rel in ("build_config.json", "shards/shard-00000.json"):
                calls.append(lambda: build_cache(project / "ck", "q", project / "c.jsonl", work, model=model,
                                                 progress=False, resume=True))
            for call in calls:
                tried += 1
                try:
                    call()
                except ValueError:
                    pass
    assert tried > 20


def test_an_adaptive_build_that_changes_nothing_says_so(tmp_path, capsys):
    from arc_encoder.tiny import train_tokenizer
    from conftest import TEXT, make_model

    tok = train_tokenizer([TEXT], vocab_size=300)
    model, _ = make_model(tokenizer=tok, vocab_size=len(tok), chunk_len=16, pooling_factors=(2, 4, 8))
    ckpt = model.save_pretrained(tmp_path / "ck")
    words = TEXT.split()
    # One chunk of 8, 12 or 16 tokens per text: with strength 0 every chunk gets the target, x4.
    texts = [" ".join(words[i:i + n]) for i in range(60) for n in range(1, 8)
             if len(model.tokenize([" ".join(words[i:i + n])])[0]) in (8, 12, 16)][:4]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n"
                                              for i, t in enumerate(texts)))
    build = ["cache", "build", str(ckpt), "--decoder", "dec", "--corpus", str(tmp_path / "c.jsonl"), "--device", "cpu",
             "--adaptive", "zlib"]
    assert main([*build, "--output", str(tmp_path / "uniform"), "--adaptive-strength", "0"]) == 0
    out = capsys.readouterr().out
    assert "chunks per factor {'4':" in out and "note: adaptive pooling changed nothing: every chunk got x4" in out
    assert main([*build, "--output", str(tmp_path / "adaptive"), "--adaptive-strength", "4"]) == 0
    out = capsys.readouterr().out
    assert "adaptive pooling (zlib)" in out and "changed nothing" not in out
