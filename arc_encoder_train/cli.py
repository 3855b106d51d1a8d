"""`arc-encoder-train`: pretrain / adapt / finetune / lm, configured by YAML + command line.

    arc-encoder-train pretrain                       # tiny default on the bundled corpus, CPU
    arc-encoder-train pretrain --config arc_encoder_train/configs/single_gpu.yaml --trainer.max_steps 2000
    arc-encoder-train pretrain --config ... --run.resume true   # continue runs/<name>/last.ckpt

Every job checks its inputs (decoder paths, tokenizers, data files, unknown keys) before
training starts, writes runs/<name>/ (Lightning checkpoints, CSV logs, resolved config) and
exports checkpoints/<name>/ in the `ARCModel.from_pretrained` format.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import lightning as L
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from arc_encoder.config import ARCConfig, DtypeName, EncoderConfig, ProjectorOptions, torch_dtype
from arc_encoder.encoder import ARCEncoder
from arc_encoder.model import ARCModel
from arc_encoder.samples import check_tokenizer_pair
from arc_encoder.storage import atomic_write_text

from .data import ARCDataModule, DataSpec, DecoderTokenizers
from .distributed import (
    RankAgreement, config_fingerprint, launched_as_rank_zero, rank_prefix, record_launch, stop_launched_ranks,
    trainer_strategy,
)
from .lm import LMSpec, is_decoder_dir, train_lm
from .module import ARCTrainingModule, ExportCallback, OptimSpec

BUILTIN_TINY = "builtin:tiny-lm"
# A tiny decoder trained by this project and shipped in the package, so the quickstart
# needs no LM training; used when run.tiny_lm is left at its defaults.
BUNDLED_TINY_LM = Path(str(resources.files("arc_encoder.resources") / "tiny_lm"))


# ---------------------------------------------------------------------------- config dataclasses
@dataclass
class DecoderSpec:
    """A frozen decoder: a local HF causal-LM directory (or builtin:tiny-lm), and its projector.

    ``projector`` IS the library's ``ProjectorOptions`` (every option a user chooses: hidden
    width, activation, bias, special tokens and their space); the widths and the vocabulary
    come from the encoder and this decoder.
    """

    name: str = "tiny"
    path: str = BUILTIN_TINY
    tokenizer: str = ""  # default: the decoder's own directory
    dtype: DtypeName = "float32"
    projector: ProjectorOptions = field(default_factory=ProjectorOptions)  # paper: hidden_dim 2048
    allow_padded_vocab: bool = False


def tiny_encoder() -> EncoderConfig:
    """The default encoder: initialised from the tiny decoder LM, minus its last layer (of 4).

    ``encoder`` in a job's YAML IS the library's EncoderConfig (every field settable); its
    base_model may be builtin:tiny-lm. Mixed-pooling training: set ``pooling_factors``.
    """
    return EncoderConfig(base_model=BUILTIN_TINY, layers_removed=1)


@dataclass
class EncoderBuild:
    """Training-only settings of the encoder, beside the embedded ``EncoderConfig``."""

    tokenizer: str = ""  # default: base_model's directory
    gradient_checkpointing: bool = False
    compile_blocks: bool = False  # torch.compile the encoder's blocks (GPU: ~1.3x faster forward)


@dataclass
class TrainerSpec:
    """Subset of `lightning.Trainer` arguments (precision auto: bf16-mixed on GPU, else 32)."""

    max_steps: int = 300
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # "ddp", "fsdp", ...
    precision: str = "auto"
    gradient_clip_val: float = 1.0
    accumulate_grad_batches: int = 1
    val_check_interval: int = 100  # steps
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100
    progress_bar: bool = True


@dataclass
class RunSpec:
    name: str = "tiny"
    runs_dir: str = "runs"
    checkpoints_dir: str = "checkpoints"
    resume: bool = False  # continue runs/<name>/checkpoints/last.ckpt
    seed: int = 0
    tiny_lm: LMSpec = field(default_factory=LMSpec)  # used when a path is builtin:tiny-lm


def tiny_optim(lr: float = 1.0e-3, projector_lr_ratio: float = 5.0) -> OptimSpec:
    """The CPU defaults: the reference's optimiser and schedule at a CPU-scale learning rate and
    warm-up (the paper's 1e-5 with 1000 warm-up steps would not move a tiny model in 1000 steps)."""
    return OptimSpec(lr=lr, projector_lr_ratio=projector_lr_ratio, warmup_steps=20)


@dataclass
class PretrainConfig:
    encoder: EncoderConfig = field(default_factory=tiny_encoder)
    encoder_build: EncoderBuild = field(default_factory=EncoderBuild)
    decoders: list[DecoderSpec] = field(default_factory=lambda: [DecoderSpec()])
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=tiny_optim)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    run: RunSpec = field(default_factory=RunSpec)


@dataclass
class AdaptConfig:
    from_checkpoint: str = "checkpoints/tiny"
    decoder: DecoderSpec = field(default_factory=DecoderSpec)
    data: DataSpec = field(default_factory=DataSpec)
    # The projector and its special tokens at one rate (paper, OLMo adaptation: 1e-4 for both).
    optim: OptimSpec = field(default_factory=lambda: tiny_optim(1e-3, projector_lr_ratio=1.0))
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    run: RunSpec = field(default_factory=lambda: RunSpec(name="adapt"))


@dataclass
class FinetuneConfig:
    from_checkpoint: str = "checkpoints/tiny"
    decoders: list[DecoderSpec] = field(default_factory=lambda: [DecoderSpec()])
    freeze_encoder: bool = False
    # 0: the checkpoint's pooling factor. Else fine-tune (and export) at this factor: the
    # paper's ARC4 is pretrained at x8 and fine-tuned at x4 (configs/paper_finetune_arc4.yaml).
    pooling_factor: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=lambda: tiny_optim(1e-4))
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    run: RunSpec = field(default_factory=lambda: RunSpec(name="finetune"))


@dataclass
class LMConfig:
    lm: LMSpec = field(default_factory=LMSpec)
    data: DataSpec = field(default_factory=DataSpec)


# ---------------------------------------------------------------------------- building blocks

def resolve_path(path: str, run: RunSpec, progress: bool = True) -> str:
    """builtin:tiny-lm -> a trained tiny decoder dir (trained once, then reused)."""
    if path != BUILTIN_TINY:
        return path
    out = Path(run.tiny_lm.out_dir)
    if not is_decoder_dir(out) and run.tiny_lm == LMSpec() and is_decoder_dir(BUNDLED_TINY_LM):
        return str(BUNDLED_TINY_LM)  # the shipped tiny decoder (see arc_encoder/data/README.md)
    if not is_decoder_dir(out) and not launched_as_rank_zero():
        raise FileNotFoundError(f"the tiny decoder LM {out} does not exist; only rank 0 trains it (before "
                                "Lightning's launcher starts the other ranks): with torchrun or SLURM run "
                                "`arc-encoder-train lm` first")
    if not is_decoder_dir(out):
        if out.exists():
            raise ValueError(f"{out} exists but is not a complete decoder (config, tokenizer, weights); remove it")
        print(f"training the tiny decoder LM into {out} (once; reused afterwards)", file=sys.stderr)
        summary = train_lm(run.tiny_lm, DataSpec(), progress=progress)
        print(f"lm done: {summary['steps']} steps in {summary['seconds']} s, loss "
              f"{summary['loss_first']:.2f} -> {summary['loss_last']:.2f}", file=sys.stderr)
    return str(out)


def check_decoder_spec(spec: DecoderSpec, run: RunSpec) -> tuple[str, object, int]:
    """Before any weights load: the path exists and the tokenizer matches the vocabulary."""
    path = resolve_path(spec.path, run)
    if not Path(path).is_dir() or not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"decoder {spec.name!r}: {path!r} is not a local model directory (no config.json)")
    tok_path = spec.tokenizer or path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"decoder {spec.name!r}: cannot load its tokenizer from {tok_path!r} ({err})") from err
    vocab = AutoConfig.from_pretrained(path).vocab_size
    check_tokenizer_pair(spec.name, vocab, tokenizer, spec.allow_padded_vocab)
    return path, tokenizer, vocab


def load_decoders(specs: list[DecoderSpec], run: RunSpec) -> tuple[dict, dict, dict]:
    """Check every decoder first, then load them. Returns (models, tokenizers, paths)."""
    names = [s.name for s in specs]
    if not specs or len(set(names)) != len(names):
        raise ValueError(f"decoders need distinct names, got {names}")
    checked = {s.name: check_decoder_spec(s, run) for s in specs}
    models, toks, paths = {}, {}, {}
    for s in specs:
        path, tok, _ = checked[s.name]
        models[s.name] = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(s.dtype))
        toks[s.name], paths[s.name] = tok, path
    return models, toks, paths


def encoder_tokenizer(build: EncoderBuild, base: str):
    tok_path = build.tokenizer or base
    try:
        return AutoTokenizer.from_pretrained(tok_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"encoder tokenizer missing: cannot load it from {tok_path!r} ({err})") from err


def build_model(cfg: PretrainConfig, decoders: dict, paths: dict) -> ARCModel:
    b = cfg.encoder_build
    base = resolve_path(cfg.encoder.base_model, cfg.run)
    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"encoder base_model {base!r} is not a local model directory (no config.json)")
    tok = encoder_tokenizer(b, base)
    enc_cfg = dataclasses.replace(cfg.encoder, base_model=base)  # validates every field again
    encoder = ARCEncoder.from_base_model(enc_cfg, torch.float32)
    if b.gradient_checkpointing:
        encoder.gradient_checkpointing_enable()
    if b.compile_blocks:
        encoder.compile_blocks()
    if len(tok) > encoder.backbone.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"encoder tokenizer has {len(tok)} tokens but the encoder's embedding table "
                         f"has {encoder.backbone.get_input_embeddings().weight.shape[0]} rows: mismatched tokenizer")
    model = ARCModel(ARCConfig(encoder=enc_cfg), encoder, tok)
    for spec in cfg.decoders:
        model.add_decoder(spec.name, decoders[spec.name], spec.projector, decoder_path=paths[spec.name])
    return model


def _same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def run_dirs(run: RunSpec) -> tuple[Path, Path]:
    """runs/<name> and checkpoints/<name>, checked: a new run's directory must not exist (checked
    by global rank 0 only: the other ranks start after rank 0 created it), a resumed run's
    last.ckpt must exist (checked by every rank: all of them read it)."""
    run_dir, export_dir = Path(run.runs_dir) / run.name, Path(run.checkpoints_dir) / run.name
    if run.resume:
        if not (run_dir / "checkpoints" / "last.ckpt").exists():
            where = "" if launched_as_rank_zero() else " (the run directory must be on a filesystem every node shares)"
            raise FileNotFoundError(f"--run.resume: {run_dir}/checkpoints/last.ckpt does not exist{where}")
    elif run_dir.exists() and launched_as_rank_zero():
        raise FileExistsError(f"run directory {run_dir} exists; pass --run.resume true to continue it "
                              "or choose another --run.name")
    return run_dir, export_dir


def make_trainer(t: TrainerSpec, run_dir: Path, callbacks: list, resume: bool = False,
                 unused_parameters: bool = False) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

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
        # A resumed run logs to logs/resume-<time>/ so the first part of the curve is kept.
        logger=CSVLogger(run_dir, name="logs", version=f"resume-{int(time.time())}" if resume else ""), callbacks=[ckpt, *callbacks],
        enable_progress_bar=t.progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=run_dir,
    )


def _save_config(run_dir: Path, job: str, cfg) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "config.yaml" if not (run_dir / "config.yaml").exists() else f"config.resume-{int(time.time())}.yaml"
    plain = json.loads(json.dumps(asdict(cfg)))  # tuples (EncoderConfig.pooling_factors) -> YAML lists
    atomic_write_text(run_dir / name, yaml.safe_dump({"job": job, **plain}, sort_keys=False))


def _val_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def summary_line(job: str, module: ARCTrainingModule, trainer: L.Trainer, seconds: float, export: Path) -> str:
    losses = module.train_losses
    k = max(1, min(10, len(losses) // 10))
    first = sum(losses[:k]) / k if losses else float("nan")
    last = sum(losses[-k:]) / k if losses else float("nan")
    m = _val_metrics(trainer)
    val = ""
    if "loss_compressed" in m:
        val = (f", val continuation loss: none {m['loss_none']:.2f} / compressed {m['loss_compressed']:.2f}"
               f" / full {m['loss_full']:.2f}")
    if "recon_acc" in m:
        val += f", recon acc {m['recon_acc']:.2f}"
    return (f"{job} done: {trainer.global_step} steps in {seconds:.0f} s, train loss {first:.2f} -> {last:.2f}"
            f"{val}; checkpoint: {export}/")


def fit(job: str, cfg, module: ARCTrainingModule, datamodule: ARCDataModule, export_fn, run_dir: Path,
        export_dir: Path) -> tuple[L.Trainer, str]:
    """Shared tail of every job: trainer, resume, fit, export, summary ('' on ranks other than 0)."""
    start = time.time()
    fingerprint = config_fingerprint(job, cfg)
    agree = RankAgreement(lambda trainer, m: {"config": fingerprint, "step": trainer.global_step,
                                              "data": m.data_position.to_dict()})
    trainer = make_trainer(cfg.trainer, run_dir, [ExportCallback(export_fn), agree], cfg.run.resume,
                           unused_parameters=len(module.decoders) > 1)
    ckpt = run_dir / "checkpoints" / "last.ckpt" if cfg.run.resume else None
    if launched_as_rank_zero():  # ranks that a launcher started later never write the run directory
        _save_config(run_dir, job, cfg)
        record_launch(run_dir, job, cfg, trainer)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except BaseException:
        stop_launched_ranks(trainer)
        raise
    if not trainer.is_global_zero:
        return trainer, ""
    line = summary_line(job, module, trainer, time.time() - start, export_dir)
    atomic_write_text(run_dir / "summary.txt", line + "\n")
    return trainer, line


# ---------------------------------------------------------------------------- jobs
def prepare_pretrain(cfg: PretrainConfig) -> tuple[ARCTrainingModule, ARCDataModule, Path, Path]:
    """Everything up to (not including) training; raises on any bad input."""
    run_dir, export_dir = run_dirs(cfg.run)
    cfg.data.check()
    L.seed_everything(cfg.run.seed, verbose=False)
    decoders, toks, paths = load_decoders(cfg.decoders, cfg.run)
    model = build_model(cfg, decoders, paths)
    dec_toks = [DecoderTokenizers(n, toks[n], _same_tokenizer(toks[n], model.tokenizer)) for n in toks]
    module = ARCTrainingModule(model, decoders, cfg.optim, cfg.trainer.max_steps)
    return module, ARCDataModule(cfg.data, dec_toks, model.tokenizer, "pretrain"), run_dir, export_dir


def _export_full(export_dir: Path):
    def export(model: ARCModel) -> None:
        model.save_pretrained(export_dir, overwrite=True)
    return export


def pretrain(cfg: PretrainConfig) -> str:
    module, dm, run_dir, export_dir = prepare_pretrain(cfg)
    _, line = fit("pretrain", cfg, module, dm, _export_full(export_dir), run_dir, export_dir)
    return line


def _load_checkpoint(path: str) -> ARCModel:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"from_checkpoint {path!r} does not exist (run pretrain first)")
    return ARCModel.from_pretrained(path, dtype=torch.float32)


def prepare_adapt(cfg: AdaptConfig) -> tuple[ARCTrainingModule, ARCDataModule, Path, Path]:
    run_dir, export_dir = run_dirs(cfg.run)
    cfg.data.check()
    L.seed_everything(cfg.run.seed, verbose=False)
    decoders, toks, paths = load_decoders([cfg.decoder], cfg.run)
    model = _load_checkpoint(cfg.from_checkpoint)
    if model.tokenizer is None:
        raise ValueError(f"{cfg.from_checkpoint}: encoder tokenizer missing from the checkpoint")
    name = cfg.decoder.name
    model.add_decoder(name, decoders[name], cfg.decoder.projector, decoder_path=paths[name])
    module = ARCTrainingModule(model, decoders, cfg.optim, cfg.trainer.max_steps, train_encoder=False,
                               train_projectors=[name])
    dec_toks = [DecoderTokenizers(name, toks[name], _same_tokenizer(toks[name], model.tokenizer))]
    return module, ARCDataModule(cfg.data, dec_toks, model.tokenizer, "pretrain"), run_dir, export_dir


def adapt(cfg: AdaptConfig) -> str:
    module, dm, run_dir, export_dir = prepare_adapt(cfg)
    n = module.num_trainable_parameters()
    if launched_as_rank_zero():
        print(f"adapt: {n:,} trainable parameters (projector {cfg.decoder.name!r} + its special tokens); "
              "encoder frozen", file=sys.stderr)

    def export(model: ARCModel) -> None:
        # A copy of the source checkpoint plus the new projector file (the source stays untouched).
        if not export_dir.exists():
            tmp = export_dir.with_name(f".{export_dir.name}.copy")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(cfg.from_checkpoint, tmp)
            tmp.rename(export_dir)
        model.save_projector(cfg.decoder.name, export_dir)

    _, line = fit("adapt", cfg, module, dm, export, run_dir, export_dir)
    return line + f" (trainable parameters: {n:,})" if line else ""


def prepare_finetune(cfg: FinetuneConfig) -> tuple[ARCTrainingModule, ARCDataModule, Path, Path]:
    run_dir, export_dir = run_dirs(cfg.run)
    if not cfg.data.train_files and not cfg.data.dataset_dir:
        raise ValueError("finetune needs QA data: set data.train_files / data.validation_files (JSONL with "
                         "context, question, answer)")
    cfg.data.check()
    L.seed_everything(cfg.run.seed, verbose=False)
    decoders, toks, paths = load_decoders(cfg.decoders, cfg.run)
    model = _load_checkpoint(cfg.from_checkpoint)
    if cfg.pooling_factor:
        model.set_pooling_factor(cfg.pooling_factor)
    for name, d in decoders.items():
        model.check_decoder(name, d)
    module = ARCTrainingModule(model, decoders, cfg.optim, cfg.trainer.max_steps,
                               train_encoder=not cfg.freeze_encoder, train_projectors=list(decoders))
    dec_toks = [DecoderTokenizers(n, toks[n], _same_tokenizer(toks[n], model.tokenizer)) for n in toks]
    return module, ARCDataModule(cfg.data, dec_toks, model.tokenizer, "qa"), run_dir, export_dir


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


JOBS = {
    "pretrain": (PretrainConfig, pretrain, "Pretrain encoder + projectors on raw text (reconstruction + continuation) "
                 "against frozen decoders. With no arguments: the tiny CPU default on the bundled corpus."),
    "adapt": (AdaptConfig, adapt, "Add a projector for a new frozen decoder to a trained checkpoint; the encoder "
              "stays frozen and only the projector + its special tokens train."),
    "finetune": (FinetuneConfig, finetune, "Fine-tune on context + question -> answer (JSONL fields context, "
                 "question, answer); loss on the answer only."),
    "lm": (LMConfig, lm, "Train a small plain causal LM + BPE tokenizer to use as a frozen decoder."),
}


def default_config() -> str:
    """The packaged tiny.yaml: what `pretrain` runs when no --config is given."""
    from importlib import resources

    return str(resources.files("arc_encoder_train") / "configs" / "tiny.yaml")


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="arc-encoder-train", description=__doc__.split("\n")[0],
                            exit_on_error=False)
    sub = parser.add_subcommands(dest="job")
    for name, (cls, _, help_text) in JOBS.items():
        p = ArgumentParser(description=help_text, exit_on_error=False)
        p.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the keys below")
        p.add_class_arguments(cls, nested_key=None, fail_untyped=True)
        sub.add_subcommand(name, p, help=help_text)
    return parser


def parse(argv: list[str]) -> tuple[str, object]:
    """argv -> (job, typed config); unknown keys and bad values raise."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    job = ns.job
    init = parser.instantiate_classes(ns)
    values = init[job].as_dict() if hasattr(init[job], "as_dict") else dict(init[job])
    values.pop("config", None)
    values.pop("__path__", None)
    cfg = JOBS[job][0](**values)
    return job, cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "cache-build":  # Lightning cache build: its own argparse CLI
        from .cache_predict import main as cache_build

        return cache_build(argv[1:], prog="arc-encoder-train cache-build")
    if not argv:
        argv = ["pretrain", "--config", default_config()]
    elif argv[0] == "pretrain" and not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["pretrain", "--config", default_config(), *argv[1:]]
    try:
        job, cfg = parse(argv)
        line = JOBS[job][1](cfg)
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - every failure becomes one clear line
        print(f"arc-encoder-train {argv[0]}: error: {rank_prefix()}{err}", file=sys.stderr)
        return 2
    if line:  # only global rank 0 reports
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
