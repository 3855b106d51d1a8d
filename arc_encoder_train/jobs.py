"""The training API: assemble a job's models and data, build its Lightning trainer, run it.

    from arc_encoder_train.config import PretrainConfig
    from arc_encoder_train.jobs import pretrain
    line = pretrain(PretrainConfig.from_name("tiny"))     # what `arc-encoder-train pretrain` runs

One function per job (``pretrain``, ``adapt``, ``finetune``, ``lm``, ``cache_build``), each taking its
config (`arc_encoder_train.config`) and returning the summary line it prints (empty on ranks other than
global rank 0). ``prepare_*`` does everything up to training, so that bad inputs (decoder paths,
tokenizers, data files) fail before a run directory exists; ``fit`` is the shared tail: trainer,
resume, fit, export, summary. The run directory's life (where, resume, lock, log, stops) is
``arc_encoder_train.runs``; the command line (`arc-encoder-train`) is ``arc_encoder_train.cli``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import re
import signal
import sys
import time
from importlib import resources
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from arc_encoder.arguments import cache_build_settings
from arc_encoder.config import ARCConfig, torch_dtype
from arc_encoder.decoders import record_decoder
from arc_encoder.encoder import ARCEncoder
from arc_encoder.loading import load_pretrained
from arc_encoder.model import ARCModel
from arc_encoder.samples import check_tokenizer_pair
from arc_encoder.storage import atomic_write_bytes, atomic_write_text, check_apart, check_model_dir

from .cache_predict import build_cache_lightning
from .config import (
    BUILTIN_TINY,
    KNOWN_PREFIX,
    AdaptConfig,
    DataConfig,
    DecoderConfig,
    EncoderBuildConfig,
    FinetuneConfig,
    LMConfig,
    PretrainConfig,
    RunConfig,
    TinyLMConfig,
    TrainerConfig,
)
from .data import ARCDataModule, DecoderTokenizers
from .distributed import RankAgreement, config_fingerprint, record_launch, stop_launched_ranks, trainer_strategy
from .lm import is_decoder_dir, train_lm
from .module import ARCTrainingModule, ExportCallback
from .progress import TrainProgress, format_validation, quiet_lightning
from .ranks import launched_as_rank_zero
from .runs import (
    LOG_NAME,
    RunLog,
    RunStopped,
    after_failure,
    global_batch_change,
    one_line,
    received_signal,
    release_run,
    released_on_error,
    resume_changes,
    run_dirs,
    save_config,
)


# ---------------------------------------------------------------------------- assembly
# A tiny decoder trained by this project and shipped in the package, so the quickstart
# needs no LM training; used when run.tiny_lm is left at its defaults.
BUNDLED_TINY_LM = Path(str(resources.files("arc_encoder.resources") / "tiny_lm"))


def resolve_path(path: str, run: RunConfig, progress: bool = True) -> str:
    """builtin:tiny-lm -> a trained tiny decoder dir (trained once, then reused); known:NAME -> a registry
    model's conversion (``arc_encoder.gguf.KNOWN_MODELS``, made once from its installed wheel)."""
    if path.startswith(KNOWN_PREFIX):
        from arc_encoder.gguf import KNOWN_MODELS, ensure_converted

        name = path[len(KNOWN_PREFIX):]
        if name not in KNOWN_MODELS:
            raise ValueError(f"{path!r}: not a known model; known: {', '.join(KNOWN_PREFIX + n for n in KNOWN_MODELS)}")
        return str(ensure_converted(KNOWN_MODELS[name]))
    if path != BUILTIN_TINY:
        return path
    out = Path(run.tiny_lm.out_dir)
    if not is_decoder_dir(out) and run.tiny_lm == TinyLMConfig() and is_decoder_dir(BUNDLED_TINY_LM):
        return str(BUNDLED_TINY_LM)  # the shipped tiny decoder (see arc_encoder/data/README.md)
    if not is_decoder_dir(out) and not launched_as_rank_zero():
        raise FileNotFoundError(f"the tiny decoder LM {out} does not exist; only rank 0 trains it (before "
                                "Lightning's launcher starts the other ranks): with torchrun or SLURM run "
                                "`arc-encoder-train lm` first")
    if not is_decoder_dir(out):
        if out.exists():
            raise ValueError(f"{out} exists but is not a complete decoder (config, tokenizer, weights); remove it")
        print(f"training the tiny decoder LM into {out} (once; reused afterwards)", file=sys.stderr)
        summary = train_lm(run.tiny_lm, DataConfig(), progress=progress)
        print(f"lm done: {summary['steps']} steps in {summary['seconds']} s, loss "
              f"{summary['loss_first']:.2f} -> {summary['loss_last']:.2f}", file=sys.stderr)
    return str(out)


def check_decoder_spec(spec: DecoderConfig, run: RunConfig) -> tuple[str, object, int]:
    """Before any weights load: the path exists and the tokenizer matches the vocabulary."""
    path = resolve_path(spec.path, run)
    check_model_dir(path, f"decoder {spec.name!r}")
    tok_path = spec.tokenizer or path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"decoder {spec.name!r}: cannot load its tokenizer from {tok_path!r} ({err})") from err
    vocab = AutoConfig.from_pretrained(path).vocab_size
    check_tokenizer_pair(spec.name, vocab, tokenizer, spec.allow_padded_vocab)
    return path, tokenizer, vocab


def load_decoders(specs: list[DecoderConfig], run: RunConfig) -> tuple[dict, dict, dict]:
    """Check every decoder first, then load them. Returns (models, tokenizers, paths)."""
    names = [s.name for s in specs]
    if not specs or len(set(names)) != len(names):
        raise ValueError(f"decoders need distinct names, got {names}")
    checked = {s.name: check_decoder_spec(s, run) for s in specs}
    models, toks, paths = {}, {}, {}
    for s in specs:
        path, tok, _ = checked[s.name]
        models[s.name] = load_pretrained(AutoModelForCausalLM, path, f"decoder {s.name!r}", dtype=torch_dtype(s.dtype))
        toks[s.name], paths[s.name] = tok, path
    return models, toks, paths


def encoder_tokenizer(build: EncoderBuildConfig, base: str):
    tok_path = build.tokenizer or base
    try:
        return AutoTokenizer.from_pretrained(tok_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"encoder tokenizer missing: cannot load it from {tok_path!r} ({err})") from err


def build_model(cfg: PretrainConfig, decoders: dict, paths: dict, toks: dict) -> ARCModel:
    b = cfg.encoder_build
    base = resolve_path(cfg.encoder.base_model, cfg.run)
    check_model_dir(base, "encoder base_model")
    tok = encoder_tokenizer(b, base)
    enc_cfg = dataclasses.replace(cfg.encoder, base_model=base)  # validates every field again
    encoder = ARCEncoder.from_base_model(enc_cfg, torch.float32)
    if b.gradient_checkpointing:
        encoder.gradient_checkpointing_enable()
    if b.compile_blocks:
        encoder.compile_blocks()
    check_tokenizer_pair(base, encoder.backbone.get_input_embeddings().weight.shape[0], tok, b.allow_padded_vocab,
                         what="encoder")
    model = ARCModel(ARCConfig(encoder=encoder.config), encoder, tok)  # encoder.config records the base's identity
    for spec in cfg.decoders:
        model.add_decoder(spec.name, decoders[spec.name], spec.projector, decoder_path=paths[spec.name],
                          tokenizer=toks[spec.name])
    return model


def _same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def _decoder_tokenizers(model: ARCModel, name: str, tokenizer) -> DecoderTokenizers:
    """What the data needs of decoder ``name``: its tokenizer and the projector's recorded BOS policy."""
    return DecoderTokenizers(name, tokenizer, _same_tokenizer(tokenizer, model.tokenizer),
                             model.projector(name).config.bos)


def _generated(path: str) -> bool:
    """A model path the package makes itself (the tiny LM, a registry model's conversion), not a user's input."""
    return path == BUILTIN_TINY or path.startswith(KNOWN_PREFIX)


def _inputs(cfg) -> dict[str, str]:
    """Every local path a job reads ({what: path}): no output of the run may be or hold one."""
    inputs = {"from_checkpoint": getattr(cfg, "from_checkpoint", "")}
    decoders = cfg.decoders if hasattr(cfg, "decoders") else [cfg.decoder]
    for spec in decoders:
        inputs[f"decoder {spec.name!r}"] = "" if _generated(spec.path) else spec.path
        inputs[f"decoder {spec.name!r} tokenizer"] = spec.tokenizer
    if hasattr(cfg, "encoder"):
        inputs["encoder.base_model"] = "" if _generated(cfg.encoder.base_model) else cfg.encoder.base_model
        inputs["encoder_build.tokenizer"] = cfg.encoder_build.tokenizer
    for split in ("train_files", "validation_files"):
        for i, path in enumerate(getattr(cfg.data, split) or []):
            inputs[f"data.{split}[{i}]"] = path
    inputs["data.dataset_dir"] = cfg.data.dataset_dir
    return {k: v for k, v in inputs.items() if v}


def _outputs_apart(run: RunConfig, inputs: dict[str, str]) -> None:
    """runs/<name> and checkpoints/<name> neither are, hold nor lie inside an input of the job."""
    check_apart(Path(run.runs_dir) / run.name, "the run directory", inputs, both_ways=True)
    check_apart(Path(run.checkpoints_dir) / run.name, "the export", inputs, both_ways=True)


def _check_source(path: str) -> None:
    """from_checkpoint exists: said before anything about the run's own directories."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"from_checkpoint {path!r} does not exist (run pretrain first)")


def _load_checkpoint(path: str) -> ARCModel:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"from_checkpoint {path!r} does not exist (run pretrain first)")
    return ARCModel.from_pretrained(path, dtype=torch.float32)


def _checked_data(spec: DataConfig, dec_toks: list[DecoderTokenizers], tokenizer, task: str) -> ARCDataModule:
    """The data module, after its first samples were built here: bad data fails before a run exists."""
    dm = ARCDataModule(spec, dec_toks, tokenizer, task)
    dm.probe()
    return dm


def _export_full(export_dir: Path):
    def export(model: ARCModel) -> None:
        model.save_pretrained(export_dir, overwrite=True)
    return export


def auto_run_name(from_checkpoint: str, decoder: str) -> str:
    """adapt's default run name: <from_checkpoint's directory name>-<decoder name>, as a directory name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(from_checkpoint).resolve().name}-{decoder}").lstrip("._-")
    return name or "adapt"


# ---------------------------------------------------------------------------- trainer
def make_trainer(t: TrainerConfig, run_dir: Path, callbacks: list, resume: bool = False,
                 unused_parameters: bool = False, log=None) -> L.Trainer:
    """The Lightning trainer of a job; ``log``: the run's log (`runs.RunLog`) that the progress lines
    also go to. Status and validation lines are printed with the bar off too (progress_bar: false)."""
    quiet_lightning()
    precision = t.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() and t.accelerator != "cpu" else "32-true"
    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                           every_n_train_steps=t.checkpoint_every_n_steps)
    return L.Trainer(
        max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=trainer_strategy(t.strategy, unused_parameters), precision=precision,
        gradient_clip_val=t.gradient_clip_val, use_distributed_sampler=False,  # the data shards itself by rank
        accumulate_grad_batches=t.accumulate_grad_batches, val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None, log_every_n_steps=t.log_every_n_steps,
        # A resumed run logs to logs/resume-<time>/; the earlier logs are kept up to the resumed step.
        logger=CSVLogger(run_dir, name="logs", version=f"resume-{int(time.time())}" if resume else ""),
        callbacks=[ckpt, *callbacks, *([TrimResumedLogs(run_dir / "logs")] if resume else []),
                   TrainProgress("train/loss", t.status_every_s, bar=t.progress_bar, log=log)],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=run_dir,
        # FSDP's sharded checkpoints are written by torch.distributed.checkpoint (a directory per save).
        plugins=[] if t.strategy == "fsdp" else [AtomicCheckpointIO()],
    )


def _val_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def summary_line(job: str, module: ARCTrainingModule, trainer: L.Trainer, seconds: float, export: Path) -> str:
    losses = module.train_losses
    k = max(1, min(10, len(losses) // 10))
    first = sum(losses[:k]) / k if losses else float("nan")
    last = sum(losses[-k:]) / k if losses else float("nan")
    val = format_validation(_val_metrics(trainer))
    val = f", val {val}" if val else ""
    over = "first and last step" if k == 1 else f"means of the first and last {k} steps"  # status lines: since the last
    return (f"{job} done: {trainer.global_step} steps in {seconds:.0f} s, train loss {first:.2f} -> {last:.2f} "
            f"({over}){val}; checkpoint: {export}/")


def fit(job: str, cfg, module: ARCTrainingModule, datamodule: ARCDataModule, export_fn, run_dir: Path,
        export_dir: Path) -> tuple[L.Trainer, str]:
    """Shared tail of every job: trainer, resume, fit, export, summary ('' on ranks other than 0).

    Rank 0 holds the run's lock (taken by `run_dirs`) until this returns or fails, and writes
    every line it prints to runs/<name>/log.txt as it happens. A failure or a stop (SIGTERM,
    SIGINT: `runs.RunStopped`) decides what stays (`after_failure`) and says it in its error.
    """
    rank0 = launched_as_rank_zero()
    log = RunLog(run_dir / LOG_NAME) if rank0 else None
    try:
        return _fit(job, cfg, module, datamodule, export_fn, run_dir, export_dir, log)
    finally:
        if rank0:
            release_run(run_dir)


def _fit(job: str, cfg, module, datamodule, export_fn, run_dir: Path, export_dir: Path, log) -> tuple:
    start = time.time()
    fingerprint = config_fingerprint(job, cfg)
    agree = RankAgreement(lambda trainer, m: {"config": fingerprint, "step": trainer.global_step,
                                              "data": m.data_position.to_dict()})
    trainer = make_trainer(cfg.trainer, run_dir, [ExportCallback(export_fn), agree], cfg.run.resume,
                           unused_parameters=len(module.decoders) > 1, log=log)
    ckpt = run_dir / "checkpoints" / "last.ckpt" if cfg.run.resume else None
    if log is not None:  # ranks that a launcher started later never write the run directory
        changes = resume_changes(run_dir, job, cfg) if cfg.run.resume else {}
        changes.update(global_batch_change(run_dir, cfg, trainer.num_devices * trainer.num_nodes))
        save_config(run_dir, job, cfg)
        record_launch(run_dir, job, cfg, trainer, changes, log=log)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except BaseException as err:
        stop_launched_ranks(trainer)
        signum = received_signal()
        where = f"at step {trainer.global_step}/{trainer.max_steps}"
        if log is not None:
            log.write(f"stopped by {_signal_name(signum)} {where}" if signum else f"error {where}: {one_line(err)}")
        note = after_failure(run_dir, export_dir, cfg.run.resume, trainer.global_step) if log is not None else ""
        if signum is not None:  # reported as the stop it is, not as what the signal broke first
            raise RunStopped(signum, where + (f"; {note}" if note else "")) from err
        if note:
            print(note, file=sys.stderr)
        raise
    if not trainer.is_global_zero:
        return trainer, ""
    line = summary_line(job, module, trainer, time.time() - start, export_dir)
    atomic_write_text(run_dir / "summary.txt", line + "\n")
    log.write(line)
    return trainer, line


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints (last.ckpt) written through temp file + fsync + rename.

    Lightning writes the file in place, so a full disk or a kill while saving left a truncated
    last.ckpt and no earlier one to resume from.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())


class TrimResumedLogs(L.Callback):
    """On a resumed run (rank 0), drop the rows of earlier CSV logs at or after the step training
    resumes from: the resumed run logs those steps again (they were trained after the checkpoint)."""

    def __init__(self, logs_dir: Path) -> None:
        self.logs_dir = logs_dir

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        if not trainer.is_global_zero or trainer.logger is None:
            return
        current = Path(trainer.logger.log_dir).resolve()
        for path in sorted(self.logs_dir.rglob("metrics.csv")):
            if path.parent.resolve() != current:
                trim_log(path, trainer.global_step)


def trim_log(path: Path, step: int) -> None:
    """Rewrite the CSV log ``path`` without its rows of steps >= ``step`` (atomically)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "step" not in rows[0]:
        return
    col = rows[0].index("step")
    kept = [rows[0]] + [r for r in rows[1:] if not (len(r) > col and r[col].isdigit() and int(r[col]) >= step)]
    if len(kept) != len(rows):
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(kept)
        atomic_write_text(path, out.getvalue())


# ---------------------------------------------------------------------------- jobs
def prepare_pretrain(cfg: PretrainConfig) -> tuple[ARCTrainingModule, ARCDataModule, Path, Path]:
    """Everything up to (not including) training; raises on any bad input."""
    if cfg.from_checkpoint:
        _check_source(cfg.from_checkpoint)
    _outputs_apart(cfg.run, _inputs(cfg))
    run_dir, export_dir = run_dirs(cfg.run, "pretrain", cfg)
    with released_on_error(run_dir):
        cfg.data.check()
        L.seed_everything(cfg.run.seed, verbose=False)
        decoders, toks, paths = load_decoders(cfg.decoders, cfg.run)
        if cfg.from_checkpoint:  # continue: the checkpoint's encoder (a delta stays a delta) and projectors
            model = _continued(cfg, decoders, paths, toks)
        else:
            model = build_model(cfg, decoders, paths, toks)
        dec_toks = [_decoder_tokenizers(model, n, toks[n]) for n in toks]
        module = ARCTrainingModule(model, decoders, cfg.optim, cfg.trainer.max_steps)
        return module, _checked_data(cfg.data, dec_toks, model.tokenizer, "pretrain"), run_dir, export_dir


def _continued(cfg: PretrainConfig, decoders: dict, paths: dict, toks: dict) -> ARCModel:
    """``cfg.from_checkpoint`` with a projector for each of ``cfg.decoders`` (kept where it has one, new where
    it lacks one) and none for any other decoder."""
    from torch import nn

    model = _load_checkpoint(cfg.from_checkpoint)
    for spec in cfg.decoders:
        if spec.name in model.projectors:
            model.check_decoder(spec.name, decoders[spec.name], spec.allow_other_decoder)
        else:
            model.add_decoder(spec.name, decoders[spec.name], spec.projector, decoder_path=paths[spec.name],
                              tokenizer=toks[spec.name])
    model.projectors = nn.ModuleDict({n: model.projectors[n] for n in decoders})
    model.config.projectors = {n: model.config.projectors[n] for n in decoders}
    return model


def pretrain(cfg: PretrainConfig) -> str:
    module, dm, run_dir, export_dir = prepare_pretrain(cfg)
    _, line = fit("pretrain", cfg, module, dm, _export_full(export_dir), run_dir, export_dir)
    return line


def prepare_adapt(cfg: AdaptConfig) -> tuple[ARCTrainingModule, ARCDataModule, Path, Path]:
    _check_source(cfg.from_checkpoint)
    if cfg.run.name == "auto":  # a name per (checkpoint, decoder): a second adaptation never collides with the first
        cfg.run = dataclasses.replace(cfg.run, name=auto_run_name(cfg.from_checkpoint, cfg.decoder.name))
    _outputs_apart(cfg.run, _inputs(cfg))
    run_dir, export_dir = run_dirs(cfg.run, "adapt", cfg)
    with released_on_error(run_dir):
        cfg.data.check()
        L.seed_everything(cfg.run.seed, verbose=False)
        decoders, toks, paths = load_decoders([cfg.decoder], cfg.run)
        model = _load_checkpoint(cfg.from_checkpoint)
        if model.tokenizer is None:
            raise ValueError(f"{cfg.from_checkpoint}: encoder tokenizer missing from the checkpoint")
        name = cfg.decoder.name
        model.add_decoder(name, decoders[name], cfg.decoder.projector, decoder_path=paths[name], tokenizer=toks[name])
        module = ARCTrainingModule(model, decoders, cfg.optim, cfg.trainer.max_steps, train_encoder=False,
                                   train_projectors=[name])
        dec_toks = [_decoder_tokenizers(model, name, toks[name])]
        return module, _checked_data(cfg.data, dec_toks, model.tokenizer, "pretrain"), run_dir, export_dir


def adapt(cfg: AdaptConfig) -> str:
    module, dm, run_dir, export_dir = prepare_adapt(cfg)
    n = module.num_trainable_parameters()
    if launched_as_rank_zero():
        print(f"adapt: {n:,} trainable parameters (projector {cfg.decoder.name!r} + its special tokens); "
              "encoder frozen", file=sys.stderr)

    def export(model: ARCModel) -> None:
        # A copy of the source checkpoint plus the new projector file (the source stays untouched).
        source = export_dir if export_dir.exists() else cfg.from_checkpoint
        model.save_projector(cfg.decoder.name, export_dir, source=source)

    _, line = fit("adapt", cfg, module, dm, export, run_dir, export_dir)
    return line + f" (trainable parameters: {n:,})" if line else ""


def prepare_finetune(cfg: FinetuneConfig) -> tuple[ARCTrainingModule, ARCDataModule, Path, Path]:
    _check_source(cfg.from_checkpoint)
    _outputs_apart(cfg.run, _inputs(cfg))
    run_dir, export_dir = run_dirs(cfg.run, "finetune", cfg)
    with released_on_error(run_dir):
        if not cfg.data.train_files and not cfg.data.dataset_dir:
            raise ValueError("finetune needs QA data: pass --data.train_files and --data.validation_files (JSONL with "
                             "context, question, answer)")
        cfg.data.check()
        L.seed_everything(cfg.run.seed, verbose=False)
        decoders, toks, paths = load_decoders(cfg.decoders, cfg.run)
        model = _load_checkpoint(cfg.from_checkpoint)
        if cfg.pooling_factor:
            model.set_pooling_factor(cfg.pooling_factor)
        for spec in cfg.decoders:
            model.check_decoder(spec.name, decoders[spec.name], spec.allow_other_decoder)
            if spec.allow_other_decoder:  # the export is trained for this decoder from now on
                record_decoder(model.projector(spec.name).config, decoders[spec.name], paths[spec.name])
        module = ARCTrainingModule(model, decoders, cfg.optim, cfg.trainer.max_steps,
                                   train_encoder=not cfg.freeze_encoder, train_projectors=list(decoders))
        dec_toks = [_decoder_tokenizers(model, n, toks[n]) for n in toks]
        return module, _checked_data(cfg.data, dec_toks, model.tokenizer, "qa"), run_dir, export_dir


def finetune(cfg: FinetuneConfig) -> str:
    module, dm, run_dir, export_dir = prepare_finetune(cfg)
    _, line = fit("finetune", cfg, module, dm, _export_full(export_dir), run_dir, export_dir)
    return line


def lm(cfg: LMConfig) -> str:
    s = train_lm(cfg.lm, cfg.data)
    if s is None:  # not global rank 0
        return ""
    return (f"lm done: {s['steps']} steps in {s['seconds']} s, {s['parameters']:,} parameters, loss "
            f"{s['loss_first']:.2f} -> {s['loss_last']:.2f}, global batch {s['global_batch']}; "
            f"saved: {cfg.lm.out_dir}/")


def cache_build(args: argparse.Namespace) -> str:
    """The cache build through Lightning ``Trainer.predict`` on several GPUs: the arguments of the library's
    cache-build group (``arc_encoder.arguments.cache_build_settings``, as `arc-encoder cache build` reads them)
    plus the trainer's; the same files as the single-process build."""
    start = time.perf_counter()
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    writer = build_cache_lightning(**cache_build_settings(args), model_dtype=args.model_dtype,
                                   trainer_kwargs={"accelerator": args.accelerator, "devices": devices,
                                                   "strategy": args.strategy})
    if writer.manifest is None:  # not global rank 0
        return ""
    m = writer.manifest
    return (f"wrote {args.output}: {m['num_docs']} docs, {m['tokens']} tokens -> {m['vectors']} vectors in "
            f"{m['num_shards']} shards ({time.perf_counter() - start:.1f} s)")
