"""`arc-encoder-train`: pretrain / adapt / finetune / lm, configured by YAML + command line.

    arc-encoder-train pretrain                       # tiny default on the bundled corpus, CPU
    arc-encoder-train pretrain --config arc_encoder_train/configs/single_gpu.yaml --trainer.max_steps 2000
    arc-encoder-train pretrain --config ... --run.resume true   # continue runs/<name>/last.ckpt

Every job checks its inputs (decoder paths, tokenizers, data files, unknown keys) before
training starts, writes runs/<name>/ (Lightning checkpoints, CSV logs, resolved config) and
exports checkpoints/<name>/ in the `ARCModel.from_pretrained` format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import shutil
import sys
import time
import typing
import warnings
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from arc_encoder.config import ARCConfig, ArcEncoderWarning, DtypeName, EncoderConfig, ProjectorOptions, torch_dtype
from arc_encoder.storage import atomic_write_text, check_apart, check_model_dir

from .config import DataSpec, LMSpec, OptimSpec
from .ranks import launched_as_rank_zero, rank_prefix

# torch, Lightning, transformers and the modules that use them are imported inside the functions
# that need them: building the parser (`arc-encoder-train JOB --help`) imports none of them. (No
# `if TYPE_CHECKING:` imports either: jsonargparse executes those blocks to resolve annotations.)

# Moved to .runs (Lightning classes); still importable from here.
_MOVED = {"AtomicCheckpointIO": "runs", "TrimResumedLogs": "runs", "trim_log": "runs"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

BUILTIN_TINY = "builtin:tiny-lm"
KNOWN_PREFIX = "known:"  # known:smollm2-135m: a registry model, converted once (arc_encoder.gguf)
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
    """the projector's name (what --decoder NAME selects in `arc-encoder` commands)"""
    path: str = BUILTIN_TINY
    """local HF causal-LM directory, builtin:tiny-lm (the tiny decoder shipped in the package), or known:NAME (a registry model converted once, e.g. known:smollm2-135m)"""
    tokenizer: str = ""
    """its tokenizer's directory (default: path)"""
    dtype: DtypeName = "float32"
    """dtype the frozen decoder is held in"""
    projector: ProjectorOptions = field(default_factory=ProjectorOptions)
    """the projector's options (the library's ProjectorOptions: hidden_dim (paper 2048), activation, bias,
    special_token_space, special_tokens); its widths come from the models"""
    allow_padded_vocab: bool = False
    """accept an embedding table larger than the tokenizer (models that round their vocabulary up)"""
    allow_other_decoder: bool = False
    """finetune: accept a decoder other than the one the checkpoint's projector was trained for
    (its identity is then re-recorded in the export)"""


def tiny_encoder() -> EncoderConfig:
    """The default encoder: initialised from the tiny decoder LM, minus its last layer (of 4).

    ``encoder`` in a job's YAML IS the library's EncoderConfig (every field settable); its
    base_model may be builtin:tiny-lm. Mixed-pooling training: set ``pooling_factors``.
    """
    return EncoderConfig(base_model=BUILTIN_TINY, layers_removed=1)


@dataclass
class EncoderBuild:
    """Training-only settings of the encoder (beside encoder)."""

    tokenizer: str = ""
    """the encoder tokenizer's directory (default: encoder.base_model)"""
    allow_padded_vocab: bool = False
    """the embedding table may have more rows than the tokenizer has tokens"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (less memory, ~30% more compute)"""
    compile_blocks: bool = False
    """torch.compile the encoder's blocks (GPU: ~1.3x faster forward)"""


@dataclass
class TrainerSpec:
    """Lightning Trainer settings (a subset)."""

    max_steps: int = 300
    """optimizer steps to train"""
    accelerator: str = "auto"
    """cpu, gpu or auto (a GPU when there is one)"""
    devices: int | str = "auto"
    """devices per node (processes; with several, data.batch_size is per device)"""
    num_nodes: int = 1
    """nodes (runs_dir and checkpoints_dir must be on a filesystem they all share)"""
    strategy: str = "auto"
    """auto, ddp (replicated) or fsdp (sharded encoder and projectors)"""
    precision: str = "auto"
    """Lightning precision (auto: bf16-mixed on a GPU, else 32-true)"""
    gradient_clip_val: float = 1.0
    """clip the gradient norm to this (0: no clipping)"""
    accumulate_grad_batches: int = 1
    """batches per optimizer step (the global batch grows by this factor)"""
    val_check_interval: int = 100
    """validate (and export checkpoints/<name>/) every this many steps"""
    log_every_n_steps: int = 10
    """CSV metrics (runs/<name>/logs/) every this many steps"""
    checkpoint_every_n_steps: int = 100
    """write runs/<name>/checkpoints/last.ckpt (for --run.resume) every this many steps"""
    progress_bar: bool = True
    """show progress: a bar on a terminal, else a status line every status_every_s seconds"""
    status_every_s: float = 30.0
    """seconds between status lines when the output is not a terminal (log files, pipes, batch jobs)"""

    def __post_init__(self) -> None:
        for name in ("max_steps", "num_nodes", "accumulate_grad_batches", "val_check_interval", "log_every_n_steps",
                     "checkpoint_every_n_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"trainer.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.gradient_clip_val, bool) or not self.gradient_clip_val >= 0:
            raise ValueError(f"trainer.gradient_clip_val must be >= 0, got {self.gradient_clip_val!r}")


# A run name is one directory name: never empty, never a path (an empty name made the export
# replace the whole checkpoints directory).
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

@dataclass
class RunSpec:
    """Where the run writes, resuming, seed."""

    name: str = "tiny"
    """the run's name: it writes runs_dir/<name>/ and exports checkpoints_dir/<name>/ (adapt: auto is
    <from_checkpoint's directory name>-<decoder.name>)"""
    runs_dir: str = "runs"
    """directory of run directories (configs, Lightning checkpoints, CSV logs, summary)"""
    checkpoints_dir: str = "checkpoints"
    """directory of exported checkpoints (the from_pretrained format, what `arc-encoder` reads)"""
    resume: bool = False
    """continue runs/<name>/checkpoints/last.ckpt (same step, optimizer and data position)"""
    allow_config_changes: bool = False
    """with resume: accept settings that differ from the run's (recorded in launches.json); otherwise
    a resume refuses them (max_steps, devices, workers and logging may always change)"""
    seed: int = 0
    """seed of the weights' initialisation and of everything random in training"""
    tiny_lm: LMSpec = field(default_factory=LMSpec)
    """the tiny decoder LM trained for builtin:tiny-lm paths when a setting differs from the shipped one's"""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _RUN_NAME.fullmatch(self.name):
            raise ValueError(f"run.name {self.name!r} must be one directory name: letters, digits, '.', '_' or '-', "
                             "not starting with '.' or '-'")
        for name in ("runs_dir", "checkpoints_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"run.{name} must be a directory path, got {getattr(self, name)!r}")


def tiny_optim(lr: float = 1.0e-3, projector_lr_ratio: float = 5.0) -> OptimSpec:
    """The CPU defaults: the reference's optimiser and schedule at a CPU-scale learning rate and
    warm-up (the paper's 1e-5 with 1000 warm-up steps would not move a tiny model in 1000 steps)."""
    return OptimSpec(lr=lr, projector_lr_ratio=projector_lr_ratio, warmup_steps=20)


@dataclass
class PretrainConfig:
    """The pretrain job: encoder + one projector per decoder on raw text."""

    encoder: EncoderConfig = field(default_factory=tiny_encoder)
    encoder_build: EncoderBuild = field(default_factory=EncoderBuild)
    decoders: list[DecoderSpec] = field(default_factory=lambda: [DecoderSpec()])
    """frozen decoders, one projector each (a YAML list; its keys: --decoders.help DecoderSpec)"""
    from_checkpoint: str = ""
    """continue pretraining this checkpoint (its encoder, and its projectors for the decoders it has; a decoder
    it lacks gets a new projector) instead of cutting a new encoder from encoder.base_model"""
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=tiny_optim)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    run: RunSpec = field(default_factory=RunSpec)


@dataclass
class AdaptConfig:
    """The adapt job: a projector for a new decoder; the encoder stays frozen."""

    from_checkpoint: str = "checkpoints/tiny"
    """the trained checkpoint to add a projector to (it stays untouched; the export is a copy)"""
    decoder: DecoderSpec = field(default_factory=DecoderSpec)
    data: DataSpec = field(default_factory=DataSpec)
    # The projector and its special tokens at one rate (paper, OLMo adaptation: 1e-4 for both).
    optim: OptimSpec = field(default_factory=lambda: tiny_optim(1e-3, projector_lr_ratio=1.0))
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    run: RunSpec = field(default_factory=lambda: RunSpec(name="auto"))


@dataclass
class FinetuneConfig:
    """The finetune job: context + question -> answer, loss on the answer only."""

    from_checkpoint: str = "checkpoints/tiny"
    """the trained checkpoint to fine-tune"""
    decoders: list[DecoderSpec] = field(default_factory=lambda: [DecoderSpec()])
    """the decoders to fine-tune for (each must have a projector in from_checkpoint)"""
    freeze_encoder: bool = False
    """train the projectors only"""
    pooling_factor: int = 0
    """0: the checkpoint's pooling factor; else fine-tune and export at this factor (the paper's ARC4 is
    pretrained at x8 and fine-tuned at x4: configs/paper_finetune_arc4.yaml)"""
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=lambda: tiny_optim(1e-4))
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    run: RunSpec = field(default_factory=lambda: RunSpec(name="finetune"))


@dataclass
class LMConfig:
    """The lm job: a small plain causal LM to serve as a frozen decoder."""

    lm: LMSpec = field(default_factory=LMSpec)
    data: DataSpec = field(default_factory=DataSpec)


# ---------------------------------------------------------------------------- building blocks

def resolve_path(path: str, run: RunSpec, progress: bool = True) -> str:
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
    from .lm import is_decoder_dir, train_lm

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
    from transformers import AutoConfig, AutoTokenizer

    from arc_encoder.samples import check_tokenizer_pair

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


def load_decoders(specs: list[DecoderSpec], run: RunSpec) -> tuple[dict, dict, dict]:
    """Check every decoder first, then load them. Returns (models, tokenizers, paths)."""
    from transformers import AutoModelForCausalLM

    from arc_encoder.loading import load_pretrained

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


def encoder_tokenizer(build: EncoderBuild, base: str):
    from transformers import AutoTokenizer

    tok_path = build.tokenizer or base
    try:
        return AutoTokenizer.from_pretrained(tok_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"encoder tokenizer missing: cannot load it from {tok_path!r} ({err})") from err


def build_model(cfg: PretrainConfig, decoders: dict, paths: dict, toks: dict) -> ARCModel:
    import torch

    from arc_encoder.encoder import ARCEncoder
    from arc_encoder.model import ARCModel
    from arc_encoder.samples import check_tokenizer_pair

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
    from .data import DecoderTokenizers

    return DecoderTokenizers(name, tokenizer, _same_tokenizer(tokenizer, model.tokenizer),
                             model.projector(name).config.bos)


# Settings a resumed run may change: how long and where it runs, how it logs, and how its global
# batch is split (data.batch_size per device x devices x nodes x accumulate_grad_batches: the
# global batch itself must stay, `_global_batch_change`). Anything else (model, data, optimiser)
# would make the export claim settings it was not trained with.
RESUMABLE_KEYS = frozenset({
    "run.resume", "run.allow_config_changes", "trainer.max_steps", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.accelerator", "trainer.progress_bar", "trainer.log_every_n_steps",
    "trainer.checkpoint_every_n_steps", "trainer.val_check_interval", "data.num_workers",
    "data.batch_size", "trainer.accumulate_grad_batches",
})


def _flat(data: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "d": [{"n": 2}]} -> {"a.b": 1, "d.#": 1, "d.0.n": 2} (lists of values stay whole)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out[f"{prefix}{key}.#"] = len(value)
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _latest_config(run_dir: Path) -> Path | None:
    """The config the run's last launch recorded: config.yaml or the newest config.resume-<time>.yaml."""
    resumes = sorted(run_dir.glob("config.resume-*.yaml"), key=lambda p: int(p.stem.split("-")[-1] or 0))
    if resumes:
        return resumes[-1]
    return run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else None


def resume_changes(run_dir: Path, job: str, cfg) -> dict[str, list]:
    """{key: [recorded, now]} for every setting a resume changes beyond `RESUMABLE_KEYS` (keys the
    recorded config does not have are new options: their defaults apply)."""
    path = _latest_config(run_dir)
    if path is None:
        return {}
    try:
        recorded = _flat(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, AttributeError) as err:
        raise ValueError(f"{path}: cannot read the run's recorded config ({err})") from err
    now = _flat(config_dict(job, cfg))
    changes = {k: [recorded[k], v] for k, v in now.items()
               if k in recorded and k not in RESUMABLE_KEYS and recorded[k] != v}
    # With optim.total_steps 0 the one-cycle schedule spans trainer.max_steps: a resume with another
    # max_steps would leave the restored schedule's cycle (torch refuses to step past its end).
    key = "trainer.max_steps"
    if recorded.get("optim.total_steps", 1) == 0 and key in recorded and recorded[key] != now.get(key):
        changes[f"{key} (the one-cycle length while optim.total_steps is 0; to extend a run later, "
                "start it with optim.total_steps set)"] = [recorded[key], now.get(key)]
    return changes


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def run_dirs(run: RunSpec, job: str = "", cfg=None) -> tuple[Path, Path]:
    """runs/<name> and checkpoints/<name>, checked by global rank 0 only (the other ranks start
    after rank 0 created them), under the run's lock (`runs.lock_run`: another launch training
    this run is refused; rank 0 keeps the lock until the run ends, `fit`). A new run's
    directories must not exist (neither the run nor an export of that name is ever replaced); a
    resumed run keeps its recorded settings (`resume_changes`, unless run.allow_config_changes).
    A resumed run's last.ckpt must exist (checked by every rank: all of them read it)."""
    from .runs import LOG_NAME, is_held, lock_run, only_the_lock, release_run

    run_dir, export_dir = Path(run.runs_dir) / run.name, Path(run.checkpoints_dir) / run.name
    if _overlap(run_dir, export_dir):
        raise ValueError(f"the run directory {run_dir} and the export {export_dir} are the same directory or one "
                         "holds the other; use different run.runs_dir and run.checkpoints_dir")
    if run.resume and not (run_dir / "checkpoints" / "last.ckpt").exists():
        where = "" if launched_as_rank_zero() else " (the run directory must be on a filesystem every node shares)"
        hint = (f" (the run stopped before its first checkpoint; its logs are kept in {run_dir / LOG_NAME}): to "
                f"train again, remove {run_dir} or choose another --run.name") if (run_dir / LOG_NAME).is_file() else ""
        raise FileNotFoundError(f"--run.resume: {run_dir}/checkpoints/last.ckpt does not exist{where}{hint}")
    if not launched_as_rank_zero():
        return run_dir, export_dir
    held_before = is_held(run_dir)
    existed = run_dir.exists() or run_dir.is_symlink()
    lock_run(run_dir)  # another launch of this run holds it: refused, naming its pid
    try:
        if run.resume:
            changes = resume_changes(run_dir, job, cfg) if cfg is not None and not run.allow_config_changes else {}
            if changes:
                shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items()))
                raise ValueError(f"--run.resume: settings differ from the run's ({shown}); resume with the run's "
                                 "settings, or pass --run.allow_config_changes true to change them (recorded in "
                                 "launches.json)")
        else:
            if existed and not (held_before and only_the_lock(run_dir)):
                raise FileExistsError(_existing_run(run_dir, LOG_NAME))
            if export_dir.exists() or export_dir.is_symlink():
                raise FileExistsError(f"export {export_dir} exists; pass --run.resume true to continue that run "
                                      "or choose another --run.name")
    except BaseException:
        release_run(run_dir)
        raise
    return run_dir, export_dir


def _existing_run(run_dir: Path, log_name: str) -> str:
    """Why a new run cannot use ``run_dir``, and what to do instead."""
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        return (f"run directory {run_dir} exists; pass --run.resume true to continue that run or choose another "
                "--run.name")
    log = run_dir / log_name
    logs = f"; its logs are kept in {log}" if log.is_file() else ""
    return (f"run directory {run_dir} exists and has no checkpoint to resume from (an earlier launch stopped before "
            f"saving one{logs}): to train again, remove {run_dir} or choose another --run.name")


@contextlib.contextmanager
def _released_on_error(run_dir: Path):
    """A failure while a run is prepared releases its lock (and a run directory nothing was written to)."""
    try:
        yield
    except BaseException:
        if launched_as_rank_zero():
            from .runs import release_run

            release_run(run_dir)
        raise


def make_trainer(t: TrainerSpec, run_dir: Path, callbacks: list, resume: bool = False,
                 unused_parameters: bool = False, log=None) -> L.Trainer:
    """The Lightning trainer of a job; ``log``: the run's log (`runs.RunLog`) that the progress lines
    also go to. Status and validation lines are printed with the bar off too (progress_bar: false)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from .distributed import trainer_strategy
    from .progress import TrainProgress, quiet_lightning
    from .runs import AtomicCheckpointIO, TrimResumedLogs

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


def _global_batch_change(run_dir: Path, cfg, trainer: L.Trainer) -> dict[str, list]:
    """A resume on another number of processes keeps the per-device batch, so the global batch
    (and the run's data order) would change: refused unless run.allow_config_changes."""
    path = run_dir / "launches.json"
    if not cfg.run.resume or not path.is_file():
        return {}
    launches = json.loads(path.read_text()).get("launches") or [{}]
    before = launches[-1].get("global_batch")
    now = cfg.data.batch_size * trainer.num_devices * trainer.num_nodes * cfg.trainer.accumulate_grad_batches
    if before is None or before == now:
        return {}
    if not cfg.run.allow_config_changes:
        raise ValueError(f"--run.resume: the global batch would change from {before} to {now} (data.batch_size x "
                         "devices x nodes x accumulate_grad_batches); keep it, or pass --run.allow_config_changes true")
    return {"global_batch": [before, now]}


def _after_failure(run_dir: Path, export_dir: Path, resume: bool, step: int) -> str:
    """After a run failed or was stopped (rank 0): what stays, as a sentence for the user ('' if nothing).

    With a checkpoint the run is kept for --run.resume. A new run that trained no step measured
    nothing: both directories go (they did not exist when it started, `run_dirs`), so a retry
    starts clean. One that trained keeps its run directory with its logs and metrics (only an
    empty checkpoints/ folder goes) and any export its validations wrote.
    """
    from .runs import LOG_NAME

    if (run_dir / "checkpoints" / "last.ckpt").exists():
        return f"{run_dir} kept: it has a checkpoint; continue the run with --run.resume true"
    if resume:
        return ""
    if step == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(export_dir, ignore_errors=True)
        return ""
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    export = export_dir.exists()
    return (f"{run_dir} kept with its logs ({LOG_NAME}, logs/)" + (f" and {export_dir} with the export of its last "
            "validation" if export else "") + "; it cannot be resumed (no checkpoint yet): to train again, remove "
            + (f"{run_dir} and {export_dir}" if export else str(run_dir)) + " or choose another --run.name")


def _save_config(run_dir: Path, job: str, cfg) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "config.yaml" if not (run_dir / "config.yaml").exists() else f"config.resume-{int(time.time())}.yaml"
    header = (f"# arc-encoder-train {job}: the resolved configuration (every key). To train it again:\n"
              f"#   arc-encoder-train {job} --config {run_dir / name} --run.name NEW_NAME\n")
    atomic_write_text(run_dir / name, header + yaml.safe_dump(config_dict(job, cfg), sort_keys=False))


def config_dict(job: str, cfg) -> dict:
    """The job's config as plain data without the keys it does not read (JOB_SKIPS): a file
    that `--config` takes back. Tuples (EncoderConfig.pooling_factors) become lists."""
    plain = json.loads(json.dumps(asdict(cfg)))
    for key in JOB_SKIPS.get(job, ()):
        group, _, name = key.rpartition(".")
        node = plain
        for part in filter(None, group.split(".")):
            node = node[part]
        node.pop(name, None)
    return plain


def _val_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def summary_line(job: str, module: ARCTrainingModule, trainer: L.Trainer, seconds: float, export: Path) -> str:
    from .progress import format_validation

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
    SIGINT: `runs.RunStopped`) decides what stays (`_after_failure`) and says it in its error.
    """
    from .runs import LOG_NAME, RunLog, release_run

    rank0 = launched_as_rank_zero()
    log = RunLog(run_dir / LOG_NAME) if rank0 else None
    try:
        return _fit(job, cfg, module, datamodule, export_fn, run_dir, export_dir, log)
    finally:
        if rank0:
            release_run(run_dir)


def _fit(job: str, cfg, module, datamodule, export_fn, run_dir: Path, export_dir: Path, log) -> tuple:
    from .distributed import RankAgreement, config_fingerprint, record_launch, stop_launched_ranks
    from .module import ExportCallback
    from .runs import RunStopped, received_signal

    start = time.time()
    fingerprint = config_fingerprint(job, cfg)
    agree = RankAgreement(lambda trainer, m: {"config": fingerprint, "step": trainer.global_step,
                                              "data": m.data_position.to_dict()})
    trainer = make_trainer(cfg.trainer, run_dir, [ExportCallback(export_fn), agree], cfg.run.resume,
                           unused_parameters=len(module.decoders) > 1, log=log)
    ckpt = run_dir / "checkpoints" / "last.ckpt" if cfg.run.resume else None
    if log is not None:  # ranks that a launcher started later never write the run directory
        changes = resume_changes(run_dir, job, cfg) if cfg.run.resume else {}
        changes.update(_global_batch_change(run_dir, cfg, trainer))
        _save_config(run_dir, job, cfg)
        record_launch(run_dir, job, cfg, trainer, changes, log=log)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except BaseException as err:
        stop_launched_ranks(trainer)
        signum = received_signal()
        where = f"at step {trainer.global_step}/{trainer.max_steps}"
        if log is not None:
            log.write(f"stopped by {_signal_name(signum)} {where}" if signum else f"error {where}: {_one_line(err)}")
        note = _after_failure(run_dir, export_dir, cfg.run.resume, trainer.global_step) if log is not None else ""
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
    import signal

    return signal.Signals(signum).name


# ---------------------------------------------------------------------------- jobs
def prepare_pretrain(cfg: PretrainConfig) -> tuple[ARCTrainingModule, ARCDataModule, Path, Path]:
    """Everything up to (not including) training; raises on any bad input."""
    import lightning as L

    from .data import DecoderTokenizers
    from .module import ARCTrainingModule

    if cfg.from_checkpoint:
        _check_source(cfg.from_checkpoint)
    _outputs_apart(cfg.run, _inputs(cfg))
    run_dir, export_dir = run_dirs(cfg.run, "pretrain", cfg)
    with _released_on_error(run_dir):
        cfg.data.check()
        L.seed_everything(cfg.run.seed, verbose=False)
        decoders, toks, paths = load_decoders(cfg.decoders, cfg.run)
        if cfg.from_checkpoint:  # continue: the checkpoint's encoder (a delta stays a delta) and projectors
            model = _load_checkpoint(cfg.from_checkpoint)
            for spec in cfg.decoders:
                if spec.name in model.projectors:
                    model.check_decoder(spec.name, decoders[spec.name], spec.allow_other_decoder)
                else:
                    model.add_decoder(spec.name, decoders[spec.name], spec.projector, decoder_path=paths[spec.name],
                                      tokenizer=toks[spec.name])
            model.projectors = torch_module_dict({n: model.projectors[n] for n in decoders})
            model.config.projectors = {n: model.config.projectors[n] for n in decoders}
        else:
            model = build_model(cfg, decoders, paths, toks)
        dec_toks = [_decoder_tokenizers(model, n, toks[n]) for n in toks]
        module = ARCTrainingModule(model, decoders, cfg.optim, cfg.trainer.max_steps)
        return module, _checked_data(cfg.data, dec_toks, model.tokenizer, "pretrain"), run_dir, export_dir


def _checked_data(spec: DataSpec, dec_toks: list[DecoderTokenizers], tokenizer, task: str) -> ARCDataModule:
    """The data module, after its first samples were built here: bad data fails before a run exists."""
    from .data import ARCDataModule

    dm = ARCDataModule(spec, dec_toks, tokenizer, task)
    dm.probe()
    return dm


def _export_full(export_dir: Path):
    def export(model: ARCModel) -> None:
        model.save_pretrained(export_dir, overwrite=True)
    return export


def pretrain(cfg: PretrainConfig) -> str:
    module, dm, run_dir, export_dir = prepare_pretrain(cfg)
    _, line = fit("pretrain", cfg, module, dm, _export_full(export_dir), run_dir, export_dir)
    return line


def torch_module_dict(modules: dict):
    from torch import nn

    return nn.ModuleDict(modules)


def _check_source(path: str) -> None:
    """from_checkpoint exists: said before anything about the run's own directories."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"from_checkpoint {path!r} does not exist (run pretrain first)")


def auto_run_name(from_checkpoint: str, decoder: str) -> str:
    """adapt's default run name: <from_checkpoint's directory name>-<decoder name>, as a directory name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(from_checkpoint).resolve().name}-{decoder}").lstrip("._-")
    return name or "adapt"


def _inputs(cfg) -> dict[str, str]:
    """Every local path a job reads ({what: path}): no output of the run may be or hold one."""
    inputs = {"from_checkpoint": getattr(cfg, "from_checkpoint", "")}
    decoders = cfg.decoders if hasattr(cfg, "decoders") else [cfg.decoder]
    for spec in decoders:
        inputs[f"decoder {spec.name!r}"] = "" if spec.path == BUILTIN_TINY or spec.path.startswith(KNOWN_PREFIX) else spec.path
        inputs[f"decoder {spec.name!r} tokenizer"] = spec.tokenizer
    if hasattr(cfg, "encoder"):
        base = cfg.encoder.base_model
        inputs["encoder.base_model"] = "" if base == BUILTIN_TINY or base.startswith(KNOWN_PREFIX) else base
        inputs["encoder_build.tokenizer"] = cfg.encoder_build.tokenizer
    for split in ("train_files", "validation_files"):
        for i, path in enumerate(getattr(cfg.data, split) or []):
            inputs[f"data.{split}[{i}]"] = path
    inputs["data.dataset_dir"] = cfg.data.dataset_dir
    return {k: v for k, v in inputs.items() if v}


def _outputs_apart(run: RunSpec, inputs: dict[str, str]) -> None:
    """runs/<name> and checkpoints/<name> neither are, hold nor lie inside an input of the job."""
    check_apart(Path(run.runs_dir) / run.name, "the run directory", inputs, both_ways=True)
    check_apart(Path(run.checkpoints_dir) / run.name, "the export", inputs, both_ways=True)


def _load_checkpoint(path: str) -> ARCModel:
    import torch

    from arc_encoder.model import ARCModel

    if not Path(path).is_dir():
        raise FileNotFoundError(f"from_checkpoint {path!r} does not exist (run pretrain first)")
    return ARCModel.from_pretrained(path, dtype=torch.float32)


def prepare_adapt(cfg: AdaptConfig) -> tuple[ARCTrainingModule, ARCDataModule, Path, Path]:
    import lightning as L

    from .data import DecoderTokenizers
    from .module import ARCTrainingModule

    _check_source(cfg.from_checkpoint)
    if cfg.run.name == "auto":  # a name per (checkpoint, decoder): a second adaptation never collides with the first
        cfg.run = dataclasses.replace(cfg.run, name=auto_run_name(cfg.from_checkpoint, cfg.decoder.name))
    _outputs_apart(cfg.run, _inputs(cfg))
    run_dir, export_dir = run_dirs(cfg.run, "adapt", cfg)
    with _released_on_error(run_dir):
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
    import lightning as L

    from .data import DecoderTokenizers
    from .module import ARCTrainingModule

    _check_source(cfg.from_checkpoint)
    _outputs_apart(cfg.run, _inputs(cfg))
    run_dir, export_dir = run_dirs(cfg.run, "finetune", cfg)
    with _released_on_error(run_dir):
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
                model.record_decoder(spec.name, decoders[spec.name], paths[spec.name])
        module = ARCTrainingModule(model, decoders, cfg.optim, cfg.trainer.max_steps,
                                   train_encoder=not cfg.freeze_encoder, train_projectors=list(decoders))
        dec_toks = [_decoder_tokenizers(model, n, toks[n]) for n in toks]
        return module, _checked_data(cfg.data, dec_toks, model.tokenizer, "qa"), run_dir, export_dir


def finetune(cfg: FinetuneConfig) -> str:
    module, dm, run_dir, export_dir = prepare_finetune(cfg)
    _, line = fit("finetune", cfg, module, dm, _export_full(export_dir), run_dir, export_dir)
    return line


def lm(cfg: LMConfig) -> str:
    from .lm import train_lm

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


# Keys a job never reads: left out of its parser, so that its --help lists only what it uses
# and setting one is an unknown-key error rather than a silent no-op.
JOB_SKIPS: dict[str, set[str]] = {
    "pretrain": {"data.max_context_tokens"},
    "adapt": {"data.max_context_tokens"},
    "finetune": {"data.context_tokens", "data.target_tokens", "data.reconstruction_ratio", "data.text_field"},
    "lm": {"data.validation_files", "data.context_tokens", "data.target_tokens", "data.max_context_tokens",
           "data.batch_size", "data.val_batches", "data.reconstruction_ratio"},
}


def _tiny_default(argv: list[str]) -> bool:
    """`pretrain` without --config runs the packaged tiny.yaml."""
    return bool(argv) and argv[0] == "pretrain" and not any(a == "--config" or a.startswith("--config=")
                                                            for a in argv[1:])


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


@functools.lru_cache(maxsize=2)  # parsing the field docstrings takes ~0.5 s; a parser serves many parses
def build_parser(tiny_default: bool = False):
    """The `arc-encoder-train` parser; ``tiny_default``: pretrain's defaults are tiny.yaml's (what
    it runs without --config), so its --help shows them."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings -> --help
    formatter = _help_formatter()  # jsonargparse gives every subcommand its parent's formatter
    parser = ArgumentParser(
        prog="arc-encoder-train", exit_on_error=False, formatter_class=formatter,
        description="Train ARC encoders and projectors (Lightning), configured by YAML (--config) and "
        "--key value overrides. `arc-encoder-train JOB --help` lists every key of JOB with its meaning and "
        "default. `arc-encoder-train cache-build --help`: the cache build through Lightning, several GPUs.")
    sub = parser.add_subcommands(dest="job")
    for name, (cls, _, help_text) in JOBS.items():
        defaults = [default_config()] if name == "pretrain" and tiny_default else []
        p = ArgumentParser(prog=f"arc-encoder-train {name}", description=help_text, exit_on_error=False,
                           default_config_files=defaults, formatter_class=formatter,
                           usage=f"arc-encoder-train {name} [-h] [--config YAML] [--KEY VALUE ...]")
        p.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the keys below"
                       + (" (instead of the tiny CPU default, arc_encoder_train/configs/tiny.yaml)"
                          if name == "pretrain" else ""))
        add_job_arguments(p, cls, JOB_SKIPS.get(name, set()))
        sub.add_subcommand(name, p, help=help_text)
    return parser


def parse(argv: list[str]) -> tuple[str, object]:
    """argv -> (job, typed config); unknown keys and bad values raise. `pretrain` without
    --config starts from the packaged tiny.yaml. A default warm-up longer than the run is scaled
    down (`fit_warmup`); one the user set is kept (and refused later, naming both values)."""
    keys = user_keys(argv)  # also checks every --config file: one error line naming it
    parser = build_parser(_tiny_default(argv))
    ns = parser.parse_args(argv)
    job = ns.job
    _check_sections(JOBS[job][0], ns[job], "")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    init = instantiate(ns)
    values = init[job].as_dict() if hasattr(init[job], "as_dict") else dict(init[job])
    for key in ("config", "__path__", "__default_config__"):
        values.pop(key, None)
    cfg = JOBS[job][0](**values)
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


def _one_line(err: BaseException) -> str:
    """An error as one line: library messages can span lines (tracebacks of loader workers)."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:  # a path, never a bare errno
        return f"{err.filename}: {err.strerror}"
    text = str(err).strip() or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:  # re-raised from a worker: its last line is the error
        return lines[-1]
    return " ".join(lines)


def _stop_of(err: BaseException):
    """The `runs.RunStopped` behind ``err``: itself, or the signal received while it was raised (a
    DataLoader worker killed by the same SIGTERM fails the run before the signal is handled)."""
    runs = sys.modules.get(f"{__package__}.runs")
    if runs is None:
        return None
    if isinstance(err, runs.RunStopped):
        return err
    signum = runs.received_signal()
    return runs.RunStopped(signum) if signum is not None else None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings as one `warning:` line; any other warning as Python prints it."""
    if issubclass(category, ArcEncoderWarning):
        print(f"arc-encoder-train: warning: {message}", file=sys.stderr)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOWWARNING = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "cache-build":  # Lightning cache build: its own argparse CLI
        from .cache_predict import main as cache_build

        return cache_build(argv[1:], prog="arc-encoder-train cache-build")
    argv = argv or ["pretrain"]  # no arguments: the tiny CPU default
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            job, cfg = parse(argv)
            from .runs import stop_on_signals

            with stop_on_signals():  # SIGTERM / SIGINT: one line naming the signal, exit code 128 + signal
                line = JOBS[job][1](cfg)
    except SystemExit as err:  # Lightning ends a run it saw SIGTERM in with SystemExit (exit code 0)
        stopped = _stop_of(err)
        if stopped is None:
            raise
        print(f"arc-encoder-train {argv[0]}: error: {rank_prefix()}{stopped}", file=sys.stderr)
        return stopped.exit_code
    except Exception as err:  # noqa: BLE001 - every failure becomes one clear line
        stopped = _stop_of(err)
        print(f"arc-encoder-train {argv[0]}: error: {rank_prefix()}{stopped or _one_line(err)}", file=sys.stderr)
        return stopped.exit_code if stopped is not None else 2
    if line:  # only global rank 0 reports
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
