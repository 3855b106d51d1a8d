"""`arc-encoder-train`: pretrain / adapt / finetune / lm, configured by YAML + command line.

    arc-encoder-train pretrain                       # tiny default on the bundled corpus, CPU
    arc-encoder-train pretrain --config arc_encoder_train/configs/single_gpu.yaml --trainer.max_steps 2000
    arc-encoder-train pretrain --config ... --run.resume true   # continue runs/<name>/last.ckpt

The command line only: the `JOBS` table and the parser (each job's keys, help and defaults come
from its config dataclass, `arc_encoder_train.config`). What a job does is the training API,
`arc_encoder_train.jobs`: every job checks its inputs (decoder paths, tokenizers, data files) before
training starts, writes runs/<name>/ (Lightning checkpoints, CSV logs, resolved config) and exports
checkpoints/<name>/ in the `ARCModel.from_pretrained` format.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import yaml

from arc_encoder.arguments import DTYPE_CHOICES, add_cache_build_arguments
from arc_encoder.config import ArcEncoderWarning

from .config import JOB_SKIPS, AdaptConfig, FinetuneConfig, LMConfig, PretrainConfig
from .ranks import rank_prefix
from .runs import RunStopped, one_line, received_signal, stop_on_signals

# The job functions (`arc_encoder_train.jobs`: torch, Lightning, transformers) are imported once a
# job runs: building the parser (`arc-encoder-train JOB --help`) imports none of them. (No
# `if TYPE_CHECKING:` imports either: jsonargparse executes those blocks to resolve annotations.)


class Job(NamedTuple):
    """One `arc-encoder-train` subcommand; it runs ``arc_encoder_train.jobs.<name>`` (dashes as underscores)
    with what its parser returns: its ``config`` dataclass (every field a --key, from YAML and the command
    line), or, for a job that shares the library's argparse group (``arguments``), the parsed namespace."""

    help: str
    config: type | None = None
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


def cache_build_arguments(p: argparse.ArgumentParser) -> None:
    """cache-build: the library's cache-build group (as `arc-encoder cache build`'s) and the trainer's settings."""
    add_cache_build_arguments(p)
    g = p.add_argument_group("Lightning")
    g.add_argument("--model-dtype", choices=DTYPE_CHOICES, help="cast the model (e.g. bfloat16 on GPU)")
    g.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    g.add_argument("--devices", default="auto", help="number of devices or 'auto'")
    g.add_argument("--strategy", default="auto", help="'ddp' for several GPUs")


JOBS: dict[str, Job] = {
    "pretrain": Job("Pretrain encoder + projectors on raw text (reconstruction + continuation) against frozen "
                    "decoders. With no arguments: the tiny CPU default on the bundled corpus.", PretrainConfig),
    "adapt": Job("Add a projector for a new frozen decoder to a trained checkpoint; the encoder stays frozen and "
                 "only the projector + its special tokens train.", AdaptConfig),
    "finetune": Job("Fine-tune on context + question -> answer (JSONL fields context, question, answer); loss on "
                    "the answer only.", FinetuneConfig),
    "lm": Job("Train a small plain causal LM + BPE tokenizer to use as a frozen decoder.", LMConfig),
    "cache-build": Job("Build a compressed RAG cache with Lightning Trainer.predict (DDP across GPUs; rank r writes "
                       "shards k with k % world_size == r). Same files as `arc-encoder cache build`.",
                       arguments=cache_build_arguments),
}


def run_job(job: str, cfg) -> str:
    """Run ``job`` (`arc_encoder_train.jobs`) with its parsed config; its summary line ('' off rank 0)."""
    from . import jobs

    return getattr(jobs, job.replace("-", "_"))(cfg)


def argparse_parser(job: str) -> argparse.ArgumentParser:
    """The parser of a job that takes the library's argparse group (`Job.arguments`)."""
    parser = argparse.ArgumentParser(prog=f"arc-encoder-train {job}", description=JOBS[job].help)
    JOBS[job].arguments(parser)
    return parser


def add_job_arguments(parser, cls: type, skip: set[str]) -> None:
    """``cls``'s fields as --key / --group.key arguments, each dataclass field as its own group
    (its docstring the header, each field's docstring its help), leaving out the keys in ``skip``."""
    hints = typing.get_type_hints(cls)
    groups = [f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    top_skip = {k for k in skip if "." not in k}
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=True, skip=set(groups) | top_skip)
    factories = {f.name: f.default_factory for f in dataclasses.fields(cls)}
    for name in groups:
        inner = {k.split(".", 1)[1] for k in skip if k.startswith(name + ".")}
        parser.add_class_arguments(hints[name], nested_key=name, fail_untyped=True, skip=inner)
        if factories[name] is not dataclasses.MISSING:  # the job's default section (e.g. the tiny encoder),
            default = factories[name]()  # so a YAML that leaves a section out gets it, not "required" errors
            parser.set_defaults(_dotted(default, name, inner))


def _dotted(obj, prefix: str, skip: set[str]) -> dict:
    """A dataclass's values as {"prefix.field": value}, nested dataclasses flattened too."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_dotted(value, f"{prefix}.{f.name}", {k.split(".", 1)[1] for k in skip if k.startswith(f.name + ".")}))
        else:
            out[f"{prefix}.{f.name}"] = value
    return out


def _help_formatter():
    """jsonargparse's formatter, but a list of decoders shows its default as plain mappings
    (name, path, ...) instead of jsonargparse's internal Namespace objects."""
    from jsonargparse import DefaultHelpFormatter

    def plain(item):
        if dataclasses.is_dataclass(item):
            return dataclasses.asdict(item)
        init = getattr(item, "init_args", None)
        return init.as_dict() if init is not None else item

    class Formatter(DefaultHelpFormatter):
        def _get_help_string(self, action):  # action.default is the parser's real default here
            text = super()._get_help_string(action)
            if isinstance(action.default, list) and action.default and "%(default)s" in text:
                shown = str([plain(item) for item in action.default]).replace("%", "%%")
                text = text.replace("%(default)s", shown)
            return text

    return Formatter


@functools.lru_cache(maxsize=1)  # parsing the field docstrings takes ~0.5 s; a parser serves many parses
def build_parser():
    """The `arc-encoder-train` parser: one subcommand per job, its keys and defaults from the job's
    config dataclass (`arc_encoder_train.config`: the defaults are what the job runs with no arguments)."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings -> --help
    formatter = _help_formatter()  # jsonargparse gives every subcommand its parent's formatter
    parser = ArgumentParser(
        prog="arc-encoder-train", exit_on_error=False, formatter_class=formatter,
        description="Train ARC encoders and projectors (Lightning), configured by YAML (--config) and "
        "--key value overrides. `arc-encoder-train JOB --help` lists every key of JOB with its meaning and "
        "default.")
    sub = parser.add_subcommands(dest="job")
    for name, (help_text, cls, _) in JOBS.items():
        if cls is None:  # listed here; parsed by its own argparse parser (`argparse_parser`)
            sub.add_subcommand(name, ArgumentParser(prog=f"arc-encoder-train {name}", description=help_text),
                               help=help_text)
            continue
        p = ArgumentParser(prog=f"arc-encoder-train {name}", description=help_text, exit_on_error=False,
                           formatter_class=formatter,
                           usage=f"arc-encoder-train {name} [-h] [--config YAML] [--KEY VALUE ...]")
        p.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the keys below, over their "
                       "defaults (a preset: arc_encoder_train/configs/NAME.yaml)")
        add_job_arguments(p, cls, JOB_SKIPS.get(name, set()))
        sub.add_subcommand(name, p, help=help_text)
    return parser


def parse(argv: list[str]) -> tuple[str, object]:
    """argv -> (job, typed config); unknown keys and bad values raise. Without --config a job runs its
    config's defaults (`pretrain`: the tiny CPU run). A default warm-up longer than the run is scaled
    down (`fit_warmup`); one the user set is kept (and refused later, naming both values)."""
    if argv and argv[0] in JOBS and JOBS[argv[0]].config is None:
        return argv[0], argparse_parser(argv[0]).parse_args(argv[1:])
    keys = user_keys(argv)  # also checks every --config file: one error line naming it
    parser = build_parser()
    ns = parser.parse_args(argv)
    job = ns.job
    _check_sections(JOBS[job].config, ns[job], "")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    init = instantiate(ns)
    values = init[job].as_dict() if hasattr(init[job], "as_dict") else dict(init[job])
    for key in ("config", "__path__", "__default_config__"):
        values.pop(key, None)
    cfg = JOBS[job].config(**values)
    fit_warmup(cfg, keys)
    return job, cfg


def _config_files(argv: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def read_config_file(path: str) -> object:
    """A --config file's YAML; a directory, a binary file or bad YAML is an error naming the file (and line)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--config {path}: is a directory; give a YAML file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path}: not a UTF-8 text file (a YAML config is expected; byte {err.start} is "
                         f"{p.read_bytes()[err.start:err.start + 1]!r})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValueError(f"--config {path}: not valid YAML ({where}{getattr(err, 'problem', None) or err})") from None


def user_keys(argv: list[str]) -> set[str]:
    """The keys a user set ("optim.warmup_steps", "optim", ...): on the command line or in a --config
    file (a default config, such as pretrain's packaged tiny.yaml, sets none)."""
    keys = {a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--") and a.split("=", 1)[0] != "--config"}

    def add(data: object, prefix: str) -> None:
        if isinstance(data, dict):
            for k, v in data.items():
                keys.add(f"{prefix}{k}")
                add(v, f"{prefix}{k}.")

    for path in _config_files(argv):
        if Path(path).exists():  # else jsonargparse takes it as inline YAML, or says it is missing
            add(read_config_file(path), "")
    return keys


def fit_warmup(cfg, keys: set[str]) -> None:
    """A default warm-up (optim.warmup_steps not set by the user) that does not fit the one-cycle
    schedule is scaled down to a tenth of it (0, or at least 2: torch's OneCycleLR cannot warm up
    over one step), with one warning line naming the flag. One the user set is left as it is."""
    optim = getattr(cfg, "optim", None)
    if optim is None or "optim.warmup_steps" in keys:
        return
    total = optim.total_steps or cfg.trainer.max_steps
    if optim.warmup_steps < total:
        return
    warmup = total // 10
    if warmup < 2:
        warmup = 2 if total > 2 else 0
    warnings.warn(ArcEncoderWarning(f"the default warm-up of {optim.warmup_steps} steps does not fit a schedule of "
                                    f"{total} steps (trainer.max_steps): scaled down to {warmup}; set "
                                    "--optim.warmup_steps to choose (0, or 2 to steps - 1)"), stacklevel=2)
    cfg.optim = dataclasses.replace(optim, warmup_steps=warmup)


def _check_sections(cls, values, prefix: str) -> None:
    """Every nested config section (trainer, run, run.tiny_lm, ...) must be a mapping of keys:
    a YAML ``trainer: [1, 2]`` is an error naming the section, not a failure inside the parser."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name)
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            continue
        value = values.get(f.name) if hasattr(values, "get") else None
        if value is None:
            continue
        if isinstance(value, (list, tuple, str, int, float, bool)):
            raise ValueError(f"{prefix}{f.name} must be a mapping of keys (e.g. {prefix}{f.name}.<key>: value), got "
                             f"{type(value).__name__} {value!r}")
        _check_sections(kind, value, f"{prefix}{f.name}.")




def _stop_of(err: BaseException) -> RunStopped | None:
    """The `runs.RunStopped` behind ``err``: itself, or the signal received while it was raised (a
    DataLoader worker killed by the same SIGTERM fails the run before the signal is handled)."""
    if isinstance(err, RunStopped):
        return err
    signum = received_signal()
    return RunStopped(signum) if signum is not None else None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings as one `warning:` line; any other warning as Python prints it."""
    if issubclass(category, ArcEncoderWarning):
        print(f"arc-encoder-train: warning: {message}", file=sys.stderr)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOWWARNING = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = argv or ["pretrain"]  # no arguments: the tiny CPU default
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            job, cfg = parse(argv)
            with stop_on_signals():  # SIGTERM / SIGINT: one line naming the signal, exit code 128 + signal
                line = run_job(job, cfg)
    except SystemExit as err:  # Lightning ends a run it saw SIGTERM in with SystemExit (exit code 0)
        stopped = _stop_of(err)
        if stopped is None:
            raise
        print(f"arc-encoder-train {argv[0]}: error: {rank_prefix()}{stopped}", file=sys.stderr)
        return stopped.exit_code
    except Exception as err:  # noqa: BLE001 - every failure becomes one clear line
        stopped = _stop_of(err)
        print(f"arc-encoder-train {argv[0]}: error: {rank_prefix()}{stopped or one_line(err)}", file=sys.stderr)
        return stopped.exit_code if stopped is not None else 2
    if line:  # only global rank 0 reports
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
