"""What a new user meets on the command line: fast help, errors that name the subcommand and
the flags typed, no silent no-ops, every text input read the same way."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arc_encoder.cli.main import main
from conftest import make_model, saved_generate_model

TEXTS = ["A list is a mutable sequence.", "Dictionaries map hashable keys to values."]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A checkpoint trained at x4 only, and a mixed-pooling one (x2, x4, x8)."""
    from arc_encoder.tiny import train_tokenizer
    from conftest import TEXT

    tmp = tmp_path_factory.mktemp("ux")
    tok = train_tokenizer([TEXT], vocab_size=300)
    model, _ = make_model(tokenizer=tok, vocab_size=len(tok), chunk_len=16)
    mixed, _ = make_model(tokenizer=tok, vocab_size=len(tok), chunk_len=16, pooling_factors=(2, 4, 8))
    return model.eval(), model.save_pretrained(tmp / "x4"), mixed.save_pretrained(tmp / "mixed")


def test_help_imports_neither_torch_nor_transformers():
    """`arc-encoder --help` builds every subcommand's parser; heavy imports wait for a command."""
    code = ("import sys; from arc_encoder.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_info_and_verify_explain_their_argument(capsys):
    for cmd in ("info", "verify"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "checkpoint directory" in capsys.readouterr().out


def test_info_shows_the_trained_pooling_factors(single, capsys):
    _, x4, mixed = single
    assert main(["info", str(x4)]) == 0
    assert "pooling      trained at x4; default x4" in capsys.readouterr().out
    assert main(["info", str(mixed)]) == 0
    out = capsys.readouterr().out
    assert "pooling      trained at x2, x4, x8; default x4" in out and "--pooling-factor and --adaptive" in out


def test_errors_name_the_subcommand_and_the_flag(single, tmp_path, capsys):
    _, x4, _ = single
    assert main(["init", str(x4), "--base-model", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"arc-encoder init: error: {x4} exists; pass --overwrite to replace it\n"
    assert main(["eval", "info", str(x4), "--decoder", "dec", "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("arc-encoder eval info: error: corpus ")
    assert main(["cache", "verify", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith(f"arc-encoder cache verify: error: {tmp_path / 'nope'}")
    bad = tmp_path / "docs.csv"
    bad.write_text("id,text\n1,x\n")
    assert main(["compress", str(x4), "--decoder", "dec", "--input", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("arc-encoder compress: error: ") and "--format" in err and "corpus_format" in err


@pytest.mark.parametrize("command", ["compress", "cache build", "eval info"])
def test_adaptive_on_a_single_factor_encoder_is_an_error(single, tmp_path, capsys, command):
    """It used to run fixed x4 without a word: one trained factor leaves nothing to choose."""
    _, x4, _ = single
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    args = {
        "compress": ["compress", str(x4), "--decoder", "dec", "--input", str(corpus), "--output", str(tmp_path / "o")],
        "cache build": ["cache", "build", str(x4), "--decoder", "dec", "--corpus", str(corpus),
                        "--output", str(tmp_path / "c")],
        "eval info": ["eval", "info", str(x4), "--decoder", "dec", "--data", str(corpus)],
    }[command]
    assert main(args + ["--adaptive", "zlib", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"arc-encoder {command}: error: --adaptive needs a mixed-pooling encoder")
    assert "trained at x4 only" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("command", ["plan", "eval info"])
def test_plot_without_matplotlib_fails_before_the_work(single, tmp_path, capsys, monkeypatch, command):
    _, x4, _ = single
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    args = {"plan": ["plan", "--budget", "150ms", "--context-tokens", "8192", "--json", str(tmp_path / "p.json")],
            "eval info": ["eval", "info", str(x4), "--decoder", "dec", "--data", str(tmp_path / "nope.jsonl"),
                          "--output", str(tmp_path / "p.json")]}[command]
    assert main(args + ["--plot", str(tmp_path / "p.png")]) == 2
    assert capsys.readouterr().err == (f"arc-encoder {command}: error: --plot needs matplotlib, which is not "
                                       "installed here (pip install matplotlib)\n")
    assert not (tmp_path / "p.json").exists()


def test_compress_reads_gz_like_cache_build(single, tmp_path, capsys):
    model, x4, _ = single
    jsonl_gz = tmp_path / "texts.jsonl.gz"
    jsonl_gz.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in TEXTS + [""]).encode()))
    txt_gz = tmp_path / "texts.txt.gz"
    txt_gz.write_bytes(gzip.compress("\n".join(TEXTS).encode()))
    with torch.no_grad():
        ref = model.compress(TEXTS, "dec")
    for src in (jsonl_gz, txt_gz):
        out = tmp_path / f"{src.name}.safetensors"
        assert main(["compress", str(x4), "--decoder", "dec", "--input", str(src), "--output", str(out),
                     "--device", "cpu"]) == 0
        torch.testing.assert_close(load_file(out)["embeddings"], ref.embeddings)
    assert "(skipped 1 empty texts)" in capsys.readouterr().out.splitlines()[0]


def test_generate_reads_a_gz_context_file(tmp_path, tokenizer, capsys):
    ctx = tmp_path / "ctx.txt.gz"
    ctx.write_bytes(gzip.compress(b"A list is mutable."))
    ckpt, plain = saved_generate_model(tmp_path, tokenizer)
    common = ["generate", str(ckpt), "--decoder", "q", "--prompt", "Lists are", "--max-new-tokens", "6", "--device", "cpu"]
    assert main(common + ["--context-file", str(ctx)]) == 0
    assert capsys.readouterr().out.rstrip("\n") == plain
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(common + ["--context-file", str(empty)]) == 2
    assert capsys.readouterr().err == "arc-encoder generate: error: the context is empty (--context-file): give --context TEXT or a non-empty --context-file\n"


def test_plan_defaults_to_the_installed_curves(capsys):
    from arc_encoder.cli.plan import packaged_curves

    assert main(["plan", "--budget", "150ms", "--context-tokens", "8192", "--mode", "cached"]) == 0
    lines = capsys.readouterr().out.splitlines()
    speed = next(x for x in lines if x.startswith("speed ")).split()[1]
    quality = next(x for x in lines if x.startswith("quality ")).split()[1]
    assert Path(speed).parent == Path(quality).parent == packaged_curves()
    # The quality curve was measured in a GPU machine's temporary directory: named, not pointed at.
    recorded = json.loads((packaged_curves() / Path(quality).name).read_text())["checkpoint"]
    assert recorded.startswith("/tmp/w_info") and recorded not in "\n".join(lines)
    assert "checkpoint mixed-step900 (not on this machine)" in "\n".join(lines)


def test_cache_predict_help_prints_what_it_means(capsys):
    from arc_encoder_train.cli import main

    with pytest.raises(SystemExit):
        main(["cache-build", "--help"])
    out = capsys.readouterr().out
    assert "k % world_size == r" in out and "%%" not in out
