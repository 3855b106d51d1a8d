"""Outputs never clobber inputs (no "data lost, exit 0").

An output path equal to, or inside, any input of the command (corpus, checkpoint, decoder,
curve) is refused before anything is written, with one error line naming both paths; outputs
go into directories that exist (none is created silently) and never into an empty path.
"""

import json
from pathlib import Path

import pytest

from arc_encoder.cli.main import main
from conftest import saved_generate_model


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """root/ck (projector 'q' for root/dec) and a two-document corpus root/c.jsonl."""
    from arc_encoder.tiny import train_tokenizer
    from conftest import TEXT

    root = tmp_path_factory.mktemp("outputs")
    ckpt, _ = saved_generate_model(root, train_tokenizer([TEXT], vocab_size=300))
    (root / "c.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n"
                                          for i, t in enumerate(["A list is mutable.", "Exceptions signal errors."])))
    return root


def refused(argv, capsys, root: Path, *fragments: str) -> str:
    before = tree(root)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert tree(root) == before  # nothing written, nothing replaced
    return lines[0]


# ---------------------------------------------------------------------------- data lost (4 of 7 probes)
@pytest.mark.parametrize("output, what", [
    ("c.jsonl", "--input corpus"),                        # the corpus replaced by a safetensors file
    ("ck/encoder/model.safetensors", "checkpoint"),       # the checkpoint's weights replaced
    ("ck", "checkpoint"),                                 # a directory (as before)
    ("dec/model.safetensors", "decoder recorded in the checkpoint"),
])
def test_compress_refuses_an_output_that_is_or_lies_inside_an_input(project, capsys, output, what):
    argv = ["compress", str(project / "ck"), "--decoder", "q", "--input", str(project / "c.jsonl"),
            "--output", str(project / output), "--device", "cpu"]
    line = refused(argv, capsys, project)
    assert output == "ck" or (what in line and str(project / output) in line)


def test_eval_info_refuses_to_write_into_the_checkpoint_it_reads(project, capsys):
    base = ["eval", "info", str(project / "ck"), "--decoder", "q", "--data", str(project / "c.jsonl"),
            "--device", "cpu", "--no-progress"]
    refused([*base, "--output", str(project / "ck" / "arc_config.json")], capsys, project, "checkpoint", "arc_config")
    refused([*base, "--plot", str(project / "c.jsonl")], capsys, project, "--data")
    refused([*base, "--output", str(project / "x.json"), "--plot", str(project / "x.json")], capsys, project,
            "--output")


def test_plan_refuses_to_overwrite_its_own_curve(project, capsys):
    from arc_encoder.cli.plan import default_curve

    quality = project / "q.json"
    quality.write_bytes(default_curve("quality").read_bytes())
    argv = ["plan", "--budget", "150ms", "--context-tokens", "8192", "--quality", str(quality)]
    refused([*argv, "--json", str(quality)], capsys, project, "--json", "quality curve")
    refused([*argv, "--plot", str(quality)], capsys, project, "--plot")
    assert main([*argv, "--json", str(project / "plan.json")]) in (0, 1)  # another path works
    capsys.readouterr()
    assert json.loads((project / "plan.json").read_text())["budget"]
    (project / "plan.json").unlink()


def test_plan_checks_its_outputs_before_printing_a_plan(project, capsys):
    """`plan --plot DIR` printed the plan, then named a temporary file."""
    (project / "plots").mkdir()
    try:
        line = refused(["plan", "--budget", "150ms", "--context-tokens", "8192", "--plot", str(project / "plots")],
                       capsys, project, "is a directory")
        assert ".tmp" not in line
    finally:
        (project / "plots").rmdir()


def test_probe_refuses_a_json_output_that_is_its_data(project, capsys):
    refused(["probe", str(project / "dec"), "--data", str(project / "c.jsonl"), "--json", str(project / "c.jsonl"),
             "--device", "cpu"], capsys, project, "--data file")


def test_cache_build_refuses_an_output_inside_its_checkpoint_or_empty(project, capsys, monkeypatch):
    base = ["cache", "build", str(project / "ck"), "--decoder", "q", "--corpus", str(project / "c.jsonl"),
            "--device", "cpu"]
    refused([*base, "--output", str(project / "ck" / "cache")], capsys, project, "inside the checkpoint")
    monkeypatch.chdir(project)  # `--output ""` wrote into the current directory
    refused([*base, "--output", ""], capsys, project, "empty path")
    refused([*base, "--output", str(project / "no" / "such" / "cache")], capsys, project, "does not exist")


def test_init_and_convert_refuse_an_output_over_their_inputs(project, capsys):
    refused(["init", str(project / "dec" / "sub"), "--base-model", str(project / "dec")], capsys, project,
            "inside the base model")
    refused(["init", str(project), "--base-model", str(project / "dec"), "--overwrite"], capsys, project,
            "holds the base model")
    refused(["convert-reference", str(project / "ck"), str(project / "ck"), "--overwrite"], capsys, project,
            "is the reference checkpoint")


# ---------------------------------------------------------------------------- no directory created silently
def test_compress_does_not_create_missing_directories(project, capsys, tmp_path):
    line = refused(["compress", str(project / "ck"), "--decoder", "q", "--text", "hi", "--output",
                    str(tmp_path / "nonexistent" / "dir" / "a.st"), "--device", "cpu"], capsys, project,
                   "does not exist")
    assert str(tmp_path / "nonexistent" / "dir") in line and not (tmp_path / "nonexistent").exists()
