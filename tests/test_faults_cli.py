"""Bad command-line input is one `error:` line and exit code 2, never a traceback.

Devices that do not exist, empty inputs, output paths that cannot be written, a full disk, and
pooling factors that cannot apply, through the real `arc-encoder` entry point in-process.
"""

import errno
import os

import pytest
import torch

from arc_encoder.cli.main import main
from conftest import make_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from arc_encoder.tiny import train_tokenizer
    from conftest import TEXT

    tok = train_tokenizer([TEXT], vocab_size=300)
    model, _ = make_model(tokenizer=tok, vocab_size=len(tok), chunk_len=16)
    return model.save_pretrained(tmp_path_factory.mktemp("cli") / "ck")


def run(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    return lines[0]


def compress(ckpt, tmp_path, *extra):
    return ["compress", str(ckpt), "--decoder", "dec", "--text", "A list is mutable.", "--output",
            str(tmp_path / "out.safetensors"), *extra]


@pytest.mark.parametrize("device, message", [
    ("bogus", "--device 'bogus' is not a device name"),
    ("cuda", "CUDA is not available"),
    ("cuda:7", "CUDA"),
    ("meta", "unsupported device type 'meta'"),
])
def test_devices_that_cannot_run_are_clear_errors(ckpt, tmp_path, capsys, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert message in run(compress(ckpt, tmp_path, "--device", device), capsys)


def test_empty_input_file_and_empty_context(ckpt, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    args = ["compress", str(ckpt), "--decoder", "dec", "--input", str(tmp_path / "empty.txt"), "--output",
            str(tmp_path / "o.safetensors"), "--device", "cpu"]
    assert "no text to compress" in run(args, capsys)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    args[5] = str(tmp_path / "latin1.txt")
    line = run(args, capsys)
    assert "latin1.txt" in line and "UTF-8" in line
    assert "context is empty" in run(["generate", str(ckpt), "--decoder", "dec", "--context", "  ", "--prompt", "x",
                                      "--device", "cpu"], capsys)


def test_output_paths_that_cannot_be_written(ckpt, tmp_path, capsys):
    def to(output):
        return ["compress", str(ckpt), "--decoder", "dec", "--text", "A list.", "--output", output, "--device", "cpu"]

    (tmp_path / "adir").mkdir()
    assert "is a directory" in run(to(str(tmp_path / "adir")), capsys)
    assert "empty path" in run(to(""), capsys)
    (tmp_path / "afile").write_text("x")
    assert "afile" in run(to(str(tmp_path / "afile" / "out.safetensors")), capsys)  # the OS error, on one line
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_a_full_disk_is_one_error_line_and_leaves_no_partial_file(ckpt, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert "No space left on device" in run(compress(ckpt, tmp_path, "--device", "cpu"), capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_pooling_factor_larger_than_the_chunk_is_an_error(ckpt, tmp_path, capsys):
    line = run(compress(ckpt, tmp_path, "--device", "cpu", "--pooling-factor", "17"), capsys)
    assert "pooling factor 17" in line and "chunk_len=16" in line
    from arc_encoder import ARCModel

    with pytest.raises(ValueError, match="pooling factor 0"):
        ARCModel.from_pretrained(ckpt).compress([[5] * 20], "dec", pooling_factors=[[4, 0]])
