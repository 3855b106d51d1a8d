"""Fault and bad-input tests of checkpoints and decoders.

Every file that decides what a loaded model computes is checked at load; a symlinked
checkpoint is saved through its link; a projector refuses a decoder it was not trained for;
checkpoint bytes are reproducible and respect the umask; a reader racing an export re-reads;
a moved decoder is found relative to its checkpoint, and every missing path is named.
"""

import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch

from arc_encoder import ARCConfig, ARCModel
from arc_encoder.checkpoint import verify_checkpoint
from arc_encoder.cli.main import main
from arc_encoder.config import ArcEncoderWarning
from arc_encoder.decoders import decoder_identity, load_frozen_decoder
from arc_encoder.tiny import tiny_causal_lm, tiny_config
from conftest import make_encoder, make_model, rehash

TEXTS = ["Python is a programming language.", "Exceptions signal errors."]


@pytest.fixture
def saved(tmp_path, tokenizer):
    model, decoder = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer))
    return model.eval(), model.save_pretrained(tmp_path / "ckpt")


def save_decoder(path: Path, tokenizer, seed: int) -> str:
    dec = tiny_causal_lm(tiny_config("qwen2", vocab_size=len(tokenizer), hidden_size=24, num_heads=3,
                                     num_kv_heads=1, num_layers=2), seed=seed)
    dec.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def with_decoder(tmp_path, tokenizer):
    """project/ck (projector 'q') trained for project/dec_a; project/dec_b has the same shape."""
    project = tmp_path / "project"
    dec_a = save_decoder(project / "dec_a", tokenizer, seed=0)
    save_decoder(project / "dec_b", tokenizer, seed=5)
    enc = make_encoder("llama", vocab_size=len(tokenizer))
    model = ARCModel(ARCConfig(encoder=enc.config), enc, tokenizer).eval()
    decoder, _ = load_frozen_decoder(dec_a)
    model.add_decoder("q", decoder, hidden_dim=16, decoder_path=dec_a)
    return project, model, model.save_pretrained(project / "ck")


# ---------------------------------------------------------------------------- every file verified
@pytest.mark.parametrize("rel, edit", [
    ("arc_config.json", lambda d: d["encoder"].update(pooling_factor=8)),
    ("arc_config.json", lambda d: d["encoder"].update(pooled_query_positions="group_mean",
                                                      pooled_query_input="pooled_queries")),
    ("encoder/config.json", lambda d: d["rope_parameters"].update(rope_theta=500.0)),
    ("encoder/config.json", lambda d: d.update(rms_norm_eps=0.5)),
    ("encoder/tokenizer.json", lambda d: d["model"]["vocab"].update(
        {k: v for k, v in zip(list(d["model"]["vocab"])[40:42], list(d["model"]["vocab"].values())[41:39:-1])})),
])
def test_an_edited_file_that_decides_the_output_is_refused_at_load(saved, rel, edit):
    model, path = saved
    data = json.loads((path / rel).read_text())
    edit(data)
    (path / rel).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{rel}: .*(checksum mismatch|manifest says)"):
        ARCModel.from_pretrained(path)
    assert any(rel in p for p in verify_checkpoint(path))


def test_a_file_added_to_the_encoder_directory_is_refused(saved):
    _, path = saved
    (path / "encoder" / "added_tokens.json").write_text(json.dumps({"<extra>": 5}))
    with pytest.raises(ValueError, match="added_tokens.json: not listed in manifest.json"):
        ARCModel.from_pretrained(path)
    assert any("added_tokens.json" in p for p in verify_checkpoint(path))
    (path / "encoder" / "added_tokens.json").unlink()
    (path / "NOTES.md").write_text("a note beside the checkpoint decides nothing")
    ARCModel.from_pretrained(path)


@pytest.mark.parametrize("rel, key, value, message", [
    ("arc_config.json", "encoder.pooled_residual", "no", "pooled_residual must be true or false"),
    ("arc_config.json", "encoder.pooling_factor", "4", "pooling_factor must be an integer"),
    ("arc_config.json", "projectors.dec.bias", 0, "bias must be true or false"),
    ("encoder/config.json", "hidden_size", "32", "hidden_size must be an integer"),
    ("encoder/config.json", "rms_norm_eps", "1e-6", "rms_norm_eps must be a number"),
    ("encoder/config.json", "tie_word_embeddings", "no", "tie_word_embeddings must be true or false"),
])
def test_config_values_of_the_wrong_type_are_errors_even_with_a_matching_manifest(saved, rel, key, value, message):
    _, path = saved
    data = json.loads((path / rel).read_text())
    *parents, last = key.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[last] = value
    (path / rel).write_text(json.dumps(data))
    rehash(path, rel)
    with pytest.raises(ValueError, match=rf"{rel}: .*{message}"):
        ARCModel.from_pretrained(path)


def test_malformed_checkpoint_manifests_are_clear_errors(saved, capsys):
    _, path = saved
    good = json.loads((path / "manifest.json").read_text())
    for bad, message in (([1, 2], "expected a JSON object"),
                         ({**good, "files": [1]}, "'files' must be a mapping"),
                         ({**good, "dtype": "int4"}, "dtype 'int4'"),
                         ({**good, "files": {"arc_config.json": {"sha256": "x"}}}, "64 hex digits"),
                         ({**good, "files": {**good["files"], "arc_config.json": {"sha256": "0" * 64}}}, "'bytes'")):
        (path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            ARCModel.from_pretrained(path)
        for cmd in ("verify", "info"):
            assert main([cmd, str(path)]) == 2
            err = capsys.readouterr().err
            assert message.replace("\\", "") in err and "Traceback" not in err


def test_a_decoder_config_value_of_the_wrong_type_is_a_clear_error(with_decoder, capsys):
    project, model, ck = with_decoder
    cfg_path = project / "dec_b" / "config.json"
    data = json.loads(cfg_path.read_text())
    data["hidden_size"] = "24"
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"dec_b/config.json: hidden_size must be an integer"):
        load_frozen_decoder(str(project / "dec_b"))
    assert main(["generate", str(ck), "--decoder", "q", "--decoder-path", str(project / "dec_b"), "--context", "x",
                 "--prompt", "y", "--device", "cpu"]) == 2
    assert "hidden_size must be an integer" in capsys.readouterr().err


# ---------------------------------------------------------------------------- symlinked checkpoints
def test_saving_through_a_symlinked_checkpoint_directory(saved, tmp_path):
    model, path = saved
    link = tmp_path / "link"
    link.symlink_to(path)
    with torch.no_grad():
        for p in model.projector("dec").parameters():
            p.add_(1.0)
    model.save_pretrained(link, overwrite=True)
    assert link.is_symlink() and link.resolve() == path.resolve() and verify_checkpoint(link) == []
    torch.testing.assert_close(ARCModel.from_pretrained(link).projector("dec").net[0].weight,
                               model.projector("dec").net[0].weight)
    model.save_projector("dec", link)
    assert verify_checkpoint(link) == [] and link.is_symlink()
    leftovers = [p.name for d in (tmp_path, path.parent) for p in d.iterdir() if p.name.startswith(".")]
    assert leftovers == []


# ---------------------------------------------------------------------------- decoder identity
def test_identity_is_the_same_in_every_dtype_and_differs_between_decoders(with_decoder):
    project, model, _ = with_decoder
    a32, _ = load_frozen_decoder(str(project / "dec_a"))
    a16, _ = load_frozen_decoder(str(project / "dec_a"), dtype=torch.bfloat16)
    b32, _ = load_frozen_decoder(str(project / "dec_b"))
    assert decoder_identity(a32) == decoder_identity(a16) == model.projector("q").config.decoder_sha256
    assert decoder_identity(b32) != decoder_identity(a32)


def test_a_different_decoder_of_the_same_shape_is_refused_unless_allowed(with_decoder):
    project, model, ck = with_decoder
    loaded = ARCModel.from_pretrained(ck)
    with pytest.raises(ValueError, match=r"decoder 'q' .*dec_b.* is not the decoder its projector was trained for"):
        loaded.load_decoder("q", str(project / "dec_b"))
    with pytest.warns(ArcEncoderWarning, match="used anyway"):
        decoder, tok, _ = loaded.load_decoder("q", str(project / "dec_b"), allow_other_decoder=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.generate(decoder, tok, "q", ["A list is mutable."], ["Lists"], max_new_tokens=2)  # accepted once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.load_decoder("q")  # the recorded decoder: silent


def test_cli_commands_refuse_another_decoder_and_accept_the_override(with_decoder, capsys):
    project, _, ck = with_decoder
    args = ["generate", str(ck), "--decoder", "q", "--context", "A list is mutable.", "--prompt", "Lists",
            "--max-new-tokens", "2", "--device", "cpu", "--decoder-path", str(project / "dec_b")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: decoder 'q'" in err and "--allow-other-decoder" in err and "Traceback" not in err
    assert main(args + ["--allow-other-decoder"]) == 0
    assert "warning: decoder 'q'" in capsys.readouterr().err
    from arc_encoder.cache.build import build_cache

    (project / "docs.jsonl").write_text(json.dumps({"id": "a", "text": "A list is a mutable sequence."}) + "\n")
    build_cache(ck, "q", project / "docs.jsonl", project / "cache", progress=False)
    query = ["cache", "query", str(project / "cache"), "What is a list?", "--max-new-tokens", "2", "--device", "cpu",
             "--decoder-path", str(project / "dec_b")]
    assert main(query) == 2
    assert "is not the decoder its projector was trained for" in capsys.readouterr().err
    assert main(query + ["--allow-other-decoder"]) == 0


def test_a_checkpoint_without_a_decoder_identity_loads_with_a_warning(with_decoder):
    project, _, ck = with_decoder
    data = json.loads((ck / "arc_config.json").read_text())
    del data["projectors"]["q"]["decoder_sha256"]
    (ck / "arc_config.json").write_text(json.dumps(data))
    rehash(ck, "arc_config.json")
    loaded = ARCModel.from_pretrained(ck)
    with pytest.warns(ArcEncoderWarning, match="records no decoder identity"):
        loaded.load_decoder("q", str(project / "dec_b"))


# ---------------------------------------------------------------------------- reproducible bytes, umask
def test_saving_twice_gives_identical_bytes_and_the_cache_keeps_accepting_it(saved, tmp_path):
    from arc_encoder.cache.build import build_cache
    from arc_encoder.cache.reader import CompressedCache

    model, path = saved
    for i in range(3):
        again = model.save_pretrained(tmp_path / f"again{i}")
        assert {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()} == \
               {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "a", "text": TEXTS[0]}) + "\n")
    build_cache(path, "dec", tmp_path / "docs.jsonl", tmp_path / "cache", model=model, progress=False)
    model.save_pretrained(path, overwrite=True)  # a bit-identical re-export
    CompressedCache(tmp_path / "cache", checkpoint=path)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_checkpoint_files_and_directories_respect_the_umask(tmp_path, tokenizer, mask):
    model, _ = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer))
    old = os.umask(mask)
    try:
        path = model.save_pretrained(tmp_path / "ck")
        model.save_projector("dec", path)
    finally:
        os.umask(old)
    for p in [path, *path.rglob("*")]:
        expected = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == expected, (p, oct(p.stat().st_mode))


# ---------------------------------------------------------------------------- readers during a re-export
def test_a_reader_racing_a_re_export_reads_the_new_checkpoint(saved, monkeypatch):
    from arc_encoder import checkpoint

    model, path = saved
    with torch.no_grad():
        for p in model.projector("dec").parameters():
            p.mul_(2.0)
    load = checkpoint.load_checked_state
    calls = []

    def racing(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 1:  # the manifest was read; now another process re-exports
            model.save_pretrained(path, overwrite=True)
        return load(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_checked_state", racing)
    loaded = ARCModel.from_pretrained(path)
    torch.testing.assert_close(loaded.projector("dec").net[0].weight, model.projector("dec").net[0].weight)
    assert len(calls) > 2  # read again after the race


# ---------------------------------------------------------------------------- missing or moved models
def test_a_moved_project_finds_its_decoder_relative_to_the_checkpoint(with_decoder, tmp_path, capsys):
    project, model, ck = with_decoder
    expected = model.generate(*load_frozen_decoder(str(project / "dec_a")), "q", ["A list is mutable."], ["Lists"],
                              max_new_tokens=3, do_sample=False)[0]
    moved = tmp_path / "moved"
    shutil.move(project, moved)
    loaded = ARCModel.from_pretrained(moved / "ck")
    _, _, used = loaded.load_decoder("q")
    assert Path(used) == moved / "dec_a"
    assert main(["generate", str(moved / "ck"), "--decoder", "q", "--context", "A list is mutable.", "--prompt",
                 "Lists", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected
    shutil.rmtree(moved / "dec_a")
    with pytest.raises(FileNotFoundError, match=rf"{project / 'dec_a'} or {moved / 'dec_a'}.*--decoder-path"):
        loaded.load_decoder("q")
    assert main(["generate", str(moved / "ck"), "--decoder", "q", "--context", "x", "--prompt", "y",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(moved / "dec_a") in err and "Traceback" not in err


@pytest.mark.parametrize("argv_tail, message", [
    (["init", "{tmp}/out", "--base-model", "/nonexistent/model"], "/nonexistent/model does not exist"),
    (["init", "{tmp}/out", "--base-model", "org/model"], "org/model does not exist (HF_HUB_OFFLINE is set"),
    (["init", "{tmp}/out", "--base-model", "{dec_a}", "--decoder", "x=/nonexistent"], "/nonexistent does not exist"),
    (["generate", "{ck}", "--decoder", "q", "--decoder-path", "/nonexistent", "--context", "x", "--prompt", "y"],
     "/nonexistent does not exist"),
])
def test_a_missing_model_is_one_error_line_naming_the_path(with_decoder, tmp_path, capsys, monkeypatch,
                                                           argv_tail, message):
    project, _, ck = with_decoder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [a.format(tmp=tmp_path, ck=ck, dec_a=project / "dec_a") for a in argv_tail]
    assert main([*argv, "--device", "cpu"] if argv[0] == "generate" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Repo id" not in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert not (tmp_path / "out").exists()
