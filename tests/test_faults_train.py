"""Fault and bad-input tests of the training run directory.

Each test reproduces a failure found by fault testing: data loss through a bad run name or a
name that matches an export, resumes that silently accept changed settings, failed runs that
block every retry, non-atomic last.ckpt, and configs that were accepted but meaningless.
"""

import csv
import errno
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from arc_encoder import ARCModel, ProjectorOptions
from arc_encoder_train import cli, jobs, runs
from arc_encoder_train.config import DecoderConfig, FinetuneConfig, RunConfig, TrainerConfig
from test_train import pretrain_cfg, setup  # noqa: F401 - setup is the module fixture (tiny LMs + corpus)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (what must survive a failed command)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def write_config(cfg, path: Path) -> str:
    path.write_text(json.dumps(runs.config_dict("pretrain", cfg)))  # JSON is YAML; only the keys pretrain reads
    return str(path)


def run_main(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


# ---------------------------------------------------------------------------- items 1 and 2: data loss
@pytest.mark.parametrize("name", [".", "..", "a/b", "../escape", " ", "x\n", "-x", ".hidden"])
def test_run_name_must_be_one_plain_directory_name(name):
    with pytest.raises(ValueError, match="run.name .* must be one directory name"):
        RunConfig(name=name)
    RunConfig(name="tiny-2.b_c")


def test_an_empty_run_name_is_refused_before_anything(setup, tmp_path, capsys):
    cfg = pretrain_cfg(setup, tmp_path)
    ckpts = tmp_path / "ckpt"
    (ckpts / "other").mkdir(parents=True)
    (ckpts / "other" / "weights.bin").write_bytes(b"keep me")
    (ckpts / "notes.txt").write_text("unrelated")
    config = write_config(cfg, tmp_path / "c.yaml")
    before = tree(tmp_path)
    code, err = run_main(["pretrain", "--config", config, "--run.name", ""], capsys)
    assert code == 2 and "error:" in err and "run.name" in err and "Traceback" not in err
    assert tree(tmp_path) == before  # nothing created, nothing deleted


def test_export_never_replaces_a_directory_that_is_not_a_checkpoint(tmp_path, tokenizer):
    from conftest import make_model

    model, _ = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer))
    target = tmp_path / "checkpoints"
    (target / "mine").mkdir(parents=True)
    (target / "mine" / "data.txt").write_text("precious")
    before = tree(target)
    with pytest.raises(FileExistsError, match="not an arc-encoder checkpoint"):
        model.save_pretrained(target, overwrite=True)
    assert tree(target) == before
    model.save_pretrained(tmp_path / "ck")
    model.save_pretrained(tmp_path / "ck", overwrite=True)  # a checkpoint is replaced as before
    assert ARCModel.from_pretrained(tmp_path / "ck").config == model.config


def test_new_run_whose_name_matches_an_existing_export_is_refused(setup, tmp_path):
    cfg = pretrain_cfg(setup, tmp_path, steps=1)
    jobs.pretrain(cfg)
    export = tmp_path / "ckpt" / "t"
    before = tree(export)
    other_runs = replace(cfg, run=replace(cfg.run, runs_dir=str(tmp_path / "runs2")))
    with pytest.raises(FileExistsError, match=r"ckpt/t.*exists"):
        jobs.pretrain(other_runs)
    assert tree(export) == before and not (tmp_path / "runs2" / "t").exists()


def test_run_and_export_directories_must_not_overlap(setup, tmp_path):
    cfg = pretrain_cfg(setup, tmp_path)
    same = replace(cfg, run=replace(cfg.run, checkpoints_dir=cfg.run.runs_dir))
    with pytest.raises(ValueError, match="same directory"):
        jobs.prepare_pretrain(same)


# ---------------------------------------------------------------------------- resume with changed settings
def test_resume_refuses_changed_settings_unless_the_change_is_allowed_and_recorded(setup, tmp_path):
    cfg = pretrain_cfg(setup, tmp_path, steps=2, name="r")
    cfg = replace(cfg, optim=replace(cfg.optim, total_steps=3))  # a cycle of 3 steps, stopped after 2
    jobs.pretrain(cfg)
    resume = replace(cfg, trainer=replace(cfg.trainer, max_steps=3), run=replace(cfg.run, resume=True))
    # Without optim.total_steps the cycle is max_steps long: a longer resume would leave it.
    whole = pretrain_cfg(setup, tmp_path, steps=2, name="w")
    jobs.pretrain(whole)
    with pytest.raises(ValueError, match=r"trainer\.max_steps \(the one-cycle length"):
        jobs.prepare_pretrain(replace(whole, trainer=replace(whole.trainer, max_steps=3),
                                     run=replace(whole.run, resume=True)))
    for changed, key in ((replace(resume, encoder=replace(resume.encoder, pooling_factor=3)), "encoder.pooling_factor"),
                         (replace(resume, optim=replace(resume.optim, lr=1e-2)), "optim.lr"),
                         (replace(resume, data=replace(resume.data, shuffle_buffer=9)), "data.shuffle_buffer"),
                         (replace(resume, decoders=[*resume.decoders, replace(resume.decoders[0], name="b")]),
                          "decoders.#: 1 -> 2")):
        with pytest.raises(ValueError, match=rf"--run\.resume.*{key}"):
            jobs.prepare_pretrain(changed)
    # The per-device batch may change with the number of devices, the global batch may not.
    with pytest.raises(ValueError, match="--run.resume: the global batch would change from 3 to 4"):
        jobs.pretrain(replace(resume, data=replace(resume.data, batch_size=4)))
    export = ARCModel.from_pretrained(tmp_path / "ckpt" / "r")
    assert export.encoder.config.pooling_factor == 2
    # max_steps (and devices, workers, logging) may change: continuing a run is what resume is for.
    assert runs.resume_changes(tmp_path / "runs" / "r", "pretrain", resume) == {}
    # An explicit override is accepted and recorded in launches.json.
    lr = replace(resume, optim=replace(resume.optim, lr=1e-2), run=replace(resume.run, allow_config_changes=True))
    assert jobs.pretrain(lr).startswith("pretrain done: 3 steps")
    launches = json.loads((tmp_path / "runs" / "r" / "launches.json").read_text())["launches"]
    assert "config_changes" not in launches[0] and launches[1]["config_changes"] == {"optim.lr": [cfg.optim.lr, 1e-2]}


# ---------------------------------------------------------------------------- failures inside fit
def _data_file(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


@pytest.mark.parametrize("case, through_main", [("empty", False), ("junk", True), ("no_field", False),
                                                ("too_short", False), ("empty_validation", True)])
def test_bad_data_fails_before_the_run_directory_exists_and_a_retry_works(setup, tmp_path, case, through_main, capsys):
    cfg = pretrain_cfg(setup, tmp_path, steps=1)
    good = cfg.data.train_files[0]
    bad = {"empty": ("train", ""), "junk": ("train", "this is { not json\n\x00\x01"),
           "no_field": ("train", '{"body": "a long text without the text field"}\n' * 5),
           "too_short": ("train", '{"text": "hi"}\n' * 5),
           "empty_validation": ("validation", "")}[case]
    path = _data_file(tmp_path, f"bad_{case}.jsonl", bad[1])
    data = replace(cfg.data, train_files=[path]) if bad[0] == "train" else replace(cfg.data, validation_files=[path])
    data = replace(data, num_workers=1)  # errors must not surface as a DataLoader-worker traceback
    if through_main:  # the command line: one error line, no loader-worker traceback
        argv = ["pretrain", "--config", write_config(replace(cfg, data=data), tmp_path / "c.yaml")]
        code, err = run_main(argv, capsys)
        assert code == 2 and "Traceback" not in err and "DataLoader worker" not in err, err
        assert len([line for line in err.splitlines() if "error" in line.lower()]) == 1, err
    else:
        with pytest.raises(ValueError) as info:
            jobs.prepare_pretrain(replace(cfg, data=data))
        err = str(info.value)
    assert bad[0] in err and Path(path).name in err, err
    assert not (tmp_path / "runs" / "t").exists() and not (tmp_path / "ckpt" / "t").exists()
    assert "run directory" not in err
    jobs.prepare_pretrain(replace(cfg, data=replace(data, train_files=[good], validation_files=[good])))


def test_a_run_that_fails_before_its_first_checkpoint_can_be_retried(setup, tmp_path, monkeypatch):
    from arc_encoder_train.module import ARCTrainingModule

    cfg = pretrain_cfg(setup, tmp_path, steps=2)
    step = ARCTrainingModule.training_step

    def failing(self, batch, idx):
        raise RuntimeError("simulated failure at the first step")

    monkeypatch.setattr(ARCTrainingModule, "training_step", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        jobs.pretrain(cfg)
    assert not (tmp_path / "runs" / "t").exists() and not (tmp_path / "ckpt" / "t").exists()
    monkeypatch.setattr(ARCTrainingModule, "training_step", step)
    assert jobs.pretrain(cfg).startswith("pretrain done: 2 steps")


def test_a_run_that_fails_after_a_checkpoint_is_kept_for_resume(setup, tmp_path, monkeypatch):
    from arc_encoder_train.module import ARCTrainingModule

    cfg = pretrain_cfg(setup, tmp_path, steps=4)
    cfg.trainer.checkpoint_every_n_steps = 2
    step = ARCTrainingModule.training_step

    def failing(self, batch, idx):
        if batch.index == 3:
            raise RuntimeError("simulated failure at step 4 (steps 0-2 logged, checkpoint after step 1)")
        return step(self, batch, idx)

    monkeypatch.setattr(ARCTrainingModule, "training_step", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        jobs.pretrain(cfg)
    assert (tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt").is_file()
    monkeypatch.setattr(ARCTrainingModule, "training_step", step)
    assert jobs.pretrain(replace(cfg, run=replace(cfg.run, resume=True))).startswith("pretrain done: 4 steps")
    # The resumed log continues the first one: no step is logged twice.
    steps = []
    for path in sorted((tmp_path / "runs" / "t" / "logs").rglob("metrics.csv")):
        with path.open() as f:
            steps += [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert sorted(steps) == [0, 1, 2, 3], steps


# ---------------------------------------------------------------------------- smaller
@pytest.mark.parametrize("key", ["max_steps", "checkpoint_every_n_steps", "val_check_interval", "log_every_n_steps",
                                 "accumulate_grad_batches", "num_nodes"])
def test_meaningless_trainer_settings_are_refused(key):
    with pytest.raises(ValueError, match=rf"trainer.{key} must be an integer >= 1"):
        TrainerConfig(**{key: 0})


def test_max_steps_0_is_refused_on_the_command_line(setup, tmp_path, capsys):
    cfg = pretrain_cfg(setup, tmp_path)
    code, err = run_main(["pretrain", "--config", write_config(cfg, tmp_path / "c.yaml"), "--trainer.max_steps", "0"],
                         capsys)
    assert code == 2 and "trainer.max_steps" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_section_that_is_not_a_mapping_is_refused(setup, tmp_path, capsys):
    cfg = pretrain_cfg(setup, tmp_path)
    (tmp_path / "bad.yaml").write_text("trainer: [1, 2]\n")
    code, err = run_main(["pretrain", "--config", write_config(cfg, tmp_path / "c.yaml"),
                          "--config", str(tmp_path / "bad.yaml")], capsys)
    assert code == 2 and "trainer" in err and "mapping" in err and "functools" not in err


def test_encoder_tokenizer_smaller_than_its_embedding_table_is_refused(setup, tmp_path):
    from arc_encoder.tiny import tiny_causal_lm, tiny_config

    root, enc, decs, tok = setup
    padded = tmp_path / "padded_enc"
    tiny_causal_lm(tiny_config("llama", vocab_size=len(tok) + 5, hidden_size=32, num_layers=3,
                               intermediate_size=37), seed=1).save_pretrained(padded)
    tok.save_pretrained(padded)
    cfg = pretrain_cfg(setup, tmp_path)
    cfg = replace(cfg, encoder=replace(cfg.encoder, base_model=str(padded)))
    with pytest.raises(ValueError, match="encoder.*tokenizer has .* tokens.*embedding table"):
        jobs.prepare_pretrain(cfg)
    module, *_ = jobs.prepare_pretrain(replace(cfg, encoder_build=replace(cfg.encoder_build, allow_padded_vocab=True)))
    assert module.model.encoder.backbone.get_input_embeddings().weight.shape[0] == len(tok) + 5


def test_last_ckpt_is_written_atomically(tmp_path, monkeypatch):
    """A full disk while saving leaves the previous last.ckpt whole (and no temporary file)."""
    from arc_encoder_train.jobs import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(5)}, path)
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"step": 2, "w": torch.arange(500)}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    trainer = jobs.make_trainer(TrainerConfig(accelerator="cpu", devices=1, progress_bar=False), tmp_path, [])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_finetune_refuses_another_decoder_unless_allowed_and_then_records_it(setup, tmp_path):
    from test_train import save_decoder

    root, _, decs, tok = setup
    cfg = pretrain_cfg(setup, tmp_path, steps=1)
    jobs.pretrain(cfg)
    other = save_decoder(tmp_path / "other", tok, seed=9)  # decoder a's shape, other weights
    qa = replace(cfg.data, train_files=[str(root / "qa.jsonl")], validation_files=[str(root / "qa.jsonl")])
    ft = FinetuneConfig(from_checkpoint=str(tmp_path / "ckpt" / "t"), data=qa, trainer=cfg.trainer, optim=cfg.optim,
                            decoders=[DecoderConfig(name="a", path=other, projector=ProjectorOptions(hidden_dim=16))],
                            run=replace(cfg.run, name="ft"))
    with pytest.raises(ValueError, match="is not the decoder its projector was trained for"):
        jobs.prepare_finetune(ft)
    ft.decoders[0].allow_other_decoder = True
    module, *_ = jobs.prepare_finetune(ft)
    from arc_encoder.decoders import decoder_identity

    assert module.model.projector("a").config.decoder_sha256 == decoder_identity(module.decoders["a"])
    assert module.model.projector("a").config.decoder == other
