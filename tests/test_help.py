"""`--help` explains: every key and option has a description, section headers are readable,
each training job shows its real defaults and only the keys it reads."""

import argparse
import dataclasses
import functools
import typing

import pytest
import yaml

from arc_encoder_train import cli, runs
from arc_encoder_train.config import JOB_SKIPS


@functools.lru_cache
def _parser():
    return cli.build_parser()  # ~0.5 s: built once per test session


def _subparser(job: str):
    return _parser()._subcommands_action._name_parser_map[job]


def _keys(parser) -> dict[str, argparse.Action]:
    """--key -> action, for the keys a user sets (not -h, --config, --print_config, group files)."""
    out = {}
    for a in parser._actions:
        opt = next((o for o in a.option_strings if o.startswith("--")), None)
        if opt is None or opt in ("--help", "--config", "--print_config") or opt.endswith(".help"):
            continue
        if type(a).__name__ == "ActionConfigFile" or (a.help or "").startswith("Path to a configuration file"):
            continue
        out[opt[2:]] = a
    return out


CONFIG_JOBS = [name for name, job in cli.JOBS.items() if job.config is not None]


@pytest.mark.parametrize("job", CONFIG_JOBS)
def test_every_training_key_has_a_description(job, capsys):
    keys = _keys(_subparser(job))
    assert len(keys) > 10
    undocumented = sorted(k for k, a in keys.items() if not (a.help or "").strip())
    assert undocumented == []
    with pytest.raises(SystemExit):
        _parser().parse_args([job, "--help"])
    text = capsys.readouterr().out
    # Section headers are the dataclasses' docstrings, never a dataclass repr.
    assert "<factory>" not in text and "Config(" not in text and "Spec(" not in text
    assert text.startswith(f"usage: arc-encoder-train {job} [-h] [--config YAML] [--KEY VALUE ...]")


def _fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_cache_build_option_has_a_description(capsys):
    """cache-build takes the library's cache-build group (as `arc-encoder cache build`) plus Lightning's."""
    parser = cli.argparse_parser("cache-build")
    undocumented = [a.dest for a in parser._actions if not (a.help or "").strip()]
    assert undocumented == []
    with pytest.raises(SystemExit):
        cli.main(["cache-build", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: arc-encoder-train cache-build") and "--docs-per-shard" in text and "--devices" in text


@pytest.mark.parametrize("job", CONFIG_JOBS)
def test_each_job_lists_exactly_the_keys_it_reads(job):
    cls = cli.JOBS[job].config
    skipped = JOB_SKIPS.get(job, set())
    fields = set(_fields(cls))
    assert skipped <= fields  # every skip names a real key
    assert set(_keys(_subparser(job))) == fields - skipped
    if skipped:
        with pytest.raises(Exception, match="unrecognized arguments") as err:
            _parser().parse_args([job, *(x for key in sorted(skipped) for x in (f"--{key}", "1"))])
        assert all(f"--{key}" in str(err.value) for key in skipped)


def test_lm_help_leaves_out_the_arc_data_keys(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["lm", "--help"])
    text = capsys.readouterr().out
    for key in ("context_tokens", "target_tokens", "reconstruction_ratio", "val_batches", "validation_files"):
        assert f"--data.{key}" not in text
    assert "--data.train_files" in text and "--lm.max_steps" in text


def test_pretrain_help_shows_the_defaults_it_runs_with(capsys):
    """No --config means the job's defaults: PretrainConfig() is the tiny preset, what --help shows and
    what parse returns."""
    from arc_encoder_train.config import PretrainConfig, TrainerConfig, preset_path

    tiny = yaml.safe_load(open(preset_path("tiny")))
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"optimizer steps to train (type: int, default: {tiny['trainer']['max_steps']})" in text
    assert f"'hidden_dim': {tiny['decoders'][0]['projector']['hidden_dim']}" in text
    assert TrainerConfig().max_steps != tiny["trainer"]["max_steps"]  # so the check means something
    assert cli.parse(["pretrain"]) == ("pretrain", PretrainConfig()) == ("pretrain", PretrainConfig.from_name("tiny"))
    assert PretrainConfig().trainer.max_steps == tiny["trainer"]["max_steps"]
    assert PretrainConfig().decoders[0].projector.hidden_dim == tiny["decoders"][0]["projector"]["hidden_dim"]


@pytest.mark.parametrize("name", ["tiny", "single_gpu", "paper_fsdp", "paper_finetune_arc4", "smollm2_h200",
                                  "gemma3_adapt_h200", "qa_finetune_h200"])
def test_every_preset_is_its_yaml_file(name):
    """The presets are the one source of the shipped configs: each YAML file is generated from its
    preset (`python -m arc_encoder_train.config`), and `--config` on it gives `from_name`'s config."""
    from arc_encoder_train.config import PRESETS, preset_path, preset_yaml

    assert sorted(p.stem for p in preset_path(name).parent.glob("*.yaml")) == sorted(PRESETS)
    assert preset_path(name).read_text() == preset_yaml(name), "run `python -m arc_encoder_train.config`"
    preset = PRESETS[name]
    assert cli.parse([preset.job, "--config", str(preset_path(name))]) == (preset.job,
                                                                          preset.job_config.from_name(name))


def test_from_name_merges_values_over_the_preset():
    from arc_encoder_train.config import FinetuneConfig, PretrainConfig

    cfg = PretrainConfig.from_name("smollm2_h200", trainer={"max_steps": 7}, run={"name": "x"})
    assert (cfg.trainer.max_steps, cfg.trainer.val_check_interval, cfg.run.name) == (7, 250, "x")
    assert cfg.encoder.pooling_factors == (4, 8) and cfg.decoders[0].projector.hidden_dim == 2048
    with pytest.raises(ValueError, match="no preset named 'nope'"):
        PretrainConfig.from_name("nope")
    with pytest.raises(ValueError, match="configures the finetune job"):
        PretrainConfig.from_name("qa_finetune_h200")
    with pytest.raises(ValueError, match=r"unknown keys \['max_step'\]"):
        FinetuneConfig.from_name("qa_finetune_h200", trainer={"max_step": 7})


def test_every_arc_encoder_option_has_help():
    from arc_encoder.cli.main import build_parser

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not isinstance(a, argparse._HelpAction):
                yield path, a

    missing = [f"{path} {a.option_strings or a.dest}" for path, a in walk(build_parser(), "arc-encoder")
               if not (a.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("job", CONFIG_JOBS)
def test_a_saved_config_is_taken_back_by_config(job, tmp_path):
    """runs/<name>/config.yaml holds exactly the keys the job reads, so `--config` takes it back."""
    cfg = cli.JOBS[job].config()
    runs.save_config(tmp_path, job, cfg)
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith(f"# arc-encoder-train {job}: the resolved configuration")
    assert cli.parse([job, "--config", str(tmp_path / "config.yaml")]) == (job, cfg)
