"""The stand-in decoder recipe at toy scale: corpus builder, planted repeats, train/save/probe."""

import base64
import hashlib
import json
import lzma
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import decoder_corpus as dc  # noqa: E402
import decoders as dec  # noqa: E402


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _code(i: int) -> str:
    body = "".join(f"    value_{i}_{k} = compute(value_{i}_{k - 1}, step={k})\n" for k in range(1, 60))
    return f'"""Module {i}."""\n\n\ndef function_{i}(value_{i}_0):\n{body}    return value_{i}_59\n'


def make_wheel(path: Path, files: dict[str, str], tampered: set[str] = frozenset()) -> Path:
    record = []
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            data = text.encode()
            zf.writestr(name, data)
            record.append(f"{name},{_record_hash(data + b'x' if name in tampered else data)},{len(data)}")
        zf.writestr("toypkg-1.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: toypkg\nVersion: 1.2\n"
                                                     "License-Expression: MIT\n")
        zf.writestr("toypkg-1.2.dist-info/RECORD", "\n".join(record) + "\ntoypkg-1.2.dist-info/RECORD,,\n")
    return path


def make_debian(directory: Path, texts: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    recs = [{"id": f"deb:toy-doc/usr/share/doc/{i}.txt", "source": "toy-doc", "kind": "doc", "text": t}
            for i, t in enumerate(texts)]
    blob = lzma.compress("".join(json.dumps(r) + "\n" for r in recs).encode())
    (directory / "debian_text.jsonl.xz").write_bytes(blob)
    meta = {"packages": [{"package": "toy-doc", "version": "1"}], "jsonl_xz_sha256": hashlib.sha256(blob).hexdigest()}
    (directory / "debian_text.provenance.json").write_text(json.dumps(meta))
    return directory / "debian_text.jsonl.xz"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    files = {f"toypkg/mod{i}.py": _code(i) for i in range(24)}
    files["toypkg/copy.py"] = files["toypkg/mod3.py"]  # exact duplicate: kept once
    files["toypkg/tiny.py"] = "x = 1\n"  # too short
    whl = make_wheel(tmp / "toypkg-1.2-py3-none-any.whl", files, tampered={"toypkg/mod5.py"})
    doc = "The quick brown fox reads the manual page about options and files.\n" * 40
    deb = make_debian(tmp / "deb", [doc + f"Section {i}." for i in range(6)])
    out = tmp / "out"
    args = ["build", "--debian", str(deb), "--wheel", str(whl), "--no-installed", "--pypi", "toypkg",
            "--out", str(out), "--fractions", "0.6,0.2,0.2"]
    assert dc.main(args) == 0
    return tmp, out, args


def test_corpus_build_checks_record_dedups_and_splits_by_file(corpus):
    tmp, out, args = corpus
    prov = json.loads((out / "PROVENANCE.json").read_text())
    recs = {s: list(dc.read_split(out, s)) for s in dc.SPLITS}
    ids = [r["id"] for s in dc.SPLITS for r in recs[s]]
    assert len(ids) == len(set(ids)) == 6 + 23  # 6 docs + 24 modules - tampered mod5 (copy.py = mod3: one kept)
    assert "pypi:toypkg/toypkg/mod5.py" not in ids  # bytes differ from RECORD
    assert ("pypi:toypkg/toypkg/copy.py" in ids) != ("pypi:toypkg/toypkg/mod3.py" in ids)
    for s in dc.SPLITS:
        for r in recs[s]:
            assert dc.split_of(r["id"], (0.6, 0.2), "arc-encoder-decoder-corpus-v1") == s
    toy = next(x for x in prov["sources"] if x["package"] == "toypkg")
    assert toy["version"] == "1.2" and toy["license"] == "MIT" and toy["hash_mismatch"] == 1
    assert toy["dropped"] == {"short": 1, "duplicate": 1}
    assert sum(prov["splits"][s]["files"] for s in dc.SPLITS) == len(ids)


def test_corpus_digest_is_reproducible_and_checked(corpus, tmp_path):
    _, out, args = corpus
    digest = json.loads((out / "PROVENANCE.json").read_text())["corpus_digest"]
    again = [a if a != str(out) else str(tmp_path / "again") for a in args] + ["--expect-digest", digest]
    assert dc.main(again) == 0
    with pytest.raises(SystemExit, match="differs from --expect-digest"):
        dc.main([a if a != str(out) else str(tmp_path / "third") for a in args] + ["--expect-digest", "0" * 64])
    with pytest.raises(SystemExit, match="not found"):
        dc.main(["build", "--no-installed", "--pypi", "nosuchpkg", "--out", str(tmp_path / "x")])


def test_text_filter_reasons():
    f = dc.TextFilter(min_chars=10, max_chars=1000)
    assert f.reason("short") == "short"
    assert f.reason("a" * 2000) == "large"
    assert f.reason("ok line\n" * 5 + "x" * 400) == "long_lines"
    assert f.reason("é" * 100) == "non_ascii"
    assert f.reason("def f():\n    return 1\n" * 3) is None


def test_planted_repeats_copy_a_span_and_leave_the_rest():
    spec = dec.TrainSpec(seq_len=63, batch_size=256, planted="text", planted_fraction=0.5, planted_min=5,
                         planted_max=20, compile=False)
    stream = np.arange(10_000, dtype=np.uint16) + 10  # every window is a strictly increasing run
    rows = dec.Batcher(spec, stream, 20_000, 4, torch.device("cpu"))()
    assert rows.shape == (256, 64)
    planted = 0
    for r in rows.tolist():
        breaks = [i for i in range(63) if r[i + 1] != r[i] + 1]
        if not breaks:
            continue
        planted += 1
        d = breaks[0] + 1  # the copy starts where the run breaks
        k = next(i for i in range(d, 64) if i == 63 or r[i + 1] != r[i] + 1) - d + 1
        a = r.index(r[d])
        assert a < d and r[a : a + k] == r[d : d + k] and 5 <= k <= 20 or k < 5  # tail of copy may continue the run
    assert 80 <= planted <= 176  # about half the rows
    spec_r = dec.TrainSpec(seq_len=63, batch_size=64, planted="random", planted_fraction=1.0, planted_min=8,
                           planted_max=8, compile=False)
    rows = dec.Batcher(spec_r, stream, 20_000, 4, torch.device("cpu"))()
    for r in rows.tolist():  # an 8-token span repeated later in the row
        assert any(r[i : i + 8] == r[j : j + 8] for i in range(56) for j in range(i + 8, 57))
    none = dec.TrainSpec(seq_len=63, batch_size=8, compile=False)
    rows = dec.Batcher(none, stream, 20_000, 4, torch.device("cpu"))()
    assert bool((rows[:, 1:] - rows[:, :-1] == 1).all())


def test_schedule_and_spec_validation():
    s = dec.TrainSpec(steps=100, warmup=10, lr=1.0, decay_frac=0.5, min_lr_ratio=0.1)
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(40) == 1.0 and s.lr_at(75) == pytest.approx(0.55) and s.lr_at(100) == pytest.approx(0.1)
    t = dec.TrainSpec(steps=100, time_budget=10.0)
    assert t.progress(10, 5.0) == 0.5 and t.progress(60, 5.0) == 0.6
    with pytest.raises(ValueError, match="train.family"):
        dec.TrainSpec(family="gpt2")
    with pytest.raises(ValueError, match="rotary_fraction"):
        dec.TrainSpec(family="llama", rotary_fraction=0.5)
    with pytest.raises(ValueError, match="planted_max"):
        dec.TrainSpec(seq_len=31, planted="text", planted_max=20)
    assert dec.parse_sets(["lr=0.5", "compile=false", "planted=both"]) == {"lr": 0.5, "compile": False,
                                                                           "planted": "both"}


@pytest.mark.slow
def test_tokenize_train_save_reload_and_probe(corpus, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, out, _ = corpus
    tok_dir, tokens = tmp_path / "tok", tmp_path / "tokens"
    assert dec.main(["tokenizer", "--corpus", str(out), "--vocab-size", "300", "--out", str(tok_dir)]) == 0
    assert dec.main(["tokenize", "--corpus", str(out), "--tokenizer", str(tok_dir), "--out", str(tokens),
                     "--workers", "1"]) == 0
    stats = json.loads((tokens / "stats.json").read_text())
    split = dec.TokenSplit(tokens, "train")
    assert stats["train"]["tokens"] == len(split.tokens) == split.offsets[-1]
    bos = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert int(split.tokens[0]) == dec.load_tokenizer(tok_dir).bos_token_id and bos
    sets = ["hidden_size=16", "num_heads=2", "num_kv_heads=2", "intermediate_size=24", "num_layers=2",
            "seq_len=64", "batch_size=2", "steps=2", "probe_every=1", "probe_passages=2", "val_rows=2",
            "compile=false", "warmup=1", "planted=both", "planted_fraction=0.5", "planted_min=4", "planted_max=8"]
    log, save = tmp_path / "log.json", tmp_path / "dec"
    argv = ["train", "--preset", "B", "--tokens", str(tokens), "--tokenizer", str(tok_dir), "--log", str(log),
            "--save", str(save)] + sum((["--set", s] for s in sets), [])
    assert dec.main(argv) == 0
    curve = json.loads(log.read_text())
    assert [p["step"] for p in curve["points"]] == [0, 1, 2] and curve["status"] == "done"
    assert curve["points"][-1]["train_loss"] > 0 and set(curve["points"][-1]["gates"]) == {
        "induction", "copy", "open_book_gain"}
    model = AutoModelForCausalLM.from_pretrained(save)
    assert model.config.model_type == "gpt_neox" and next(model.parameters()).dtype == torch.bfloat16
    # An untrained decoder misses the gates: the probe command refuses it (exit 1) and says why.
    assert dec.main(["probe", str(save), "--tokens", str(tokens), "--split", "test", "--passages", "2",
                     "--out", str(tmp_path / "p.json"), "--device", "cpu"]) == 1
    assert "misses the decoder gates" in capsys.readouterr().err
    assert json.loads((tmp_path / "p.json").read_text())["passed"] is False
    assert dec.main(["probe", str(tmp_path / "none"), "--tokens", str(tokens)]) == 2
