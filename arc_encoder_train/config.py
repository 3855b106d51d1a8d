"""The training jobs' configs: one dataclass per job, its sections, and the named presets.

Every default lives here, once. A job's dataclass defaults ARE what it runs with no arguments
(``PretrainConfig()`` is the tiny CPU default that ``arc-encoder-train pretrain`` runs); a named
preset (``PretrainConfig.from_name("paper_fsdp")``, as litgpt's ``Config.from_name``) is a set of
values over those defaults, each cited where it comes from. The YAML files in ``configs/`` are
generated from the presets (``python -m arc_encoder_train.config`` writes them; a test checks
that they are current), so ``--config arc_encoder_train/configs/NAME.yaml`` runs the preset.

Torch-free: building the parser (`arc-encoder-train JOB --help`) imports neither torch nor
Lightning. No ``if TYPE_CHECKING:`` imports here: jsonargparse executes those blocks to resolve
annotations. Section classes share one suffix, ``Config``; ``encoder`` sections ARE the library's
``EncoderConfig`` and a decoder's ``projector`` IS its ``ProjectorOptions``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from arc_encoder.config import DtypeName, EncoderConfig, ProjectorOptions, check_int

BUILTIN_TINY = "builtin:tiny-lm"
KNOWN_PREFIX = "known:"  # known:smollm2-135m: a registry model, converted once (arc_encoder.gguf)


@dataclass
class OptimConfig:
    """AdamW and torch's one-cycle schedule, as the reference trains (``train.py``; paper Table 10).

    Two parameter groups: the encoder with its special tokens (the reference keeps
    ``rec_tok``/``cont_tok`` in the encoder, so they train at ``lr``) and the projector MLPs at
    ``projector_lr`` (default ``lr * projector_lr_ratio``; the paper: 1e-5 and 5e-5). Weight
    decay applies to every trained parameter, as the reference's one AdamW ``weight_decay``.
    The schedule is ``torch.optim.lr_scheduler.OneCycleLR`` with the reference's arguments:
    ``pct_start = warmup_steps / total``, ``div_factor = lr / initial_lr``, ``final_div_factor
    = lr / final_lr``, cosine annealing, and torch's default momentum cycling (AdamW's beta1
    goes 0.95 -> 0.85 -> 0.95 over the cycle, replacing ``beta1``). Under torch's semantics
    each group starts at its max lr / div_factor and ends at that / final_div_factor (with the
    paper's values: 1e-20, then about 1e-25: zero in practice).
    """

    lr: float = 1.0e-5
    """encoder + special tokens learning rate (max of the cycle; paper 1e-5)"""
    projector_lr: float | None = None
    """projector MLPs' learning rate; None: lr x projector_lr_ratio"""
    projector_lr_ratio: float = 5.0
    """projector lr / encoder lr when projector_lr is None (paper: 5)"""
    weight_decay: float = 0.1
    """AdamW weight decay on every trained parameter (paper 0.1)"""
    beta1: float = 0.9
    """AdamW beta1, used only with cycle_momentum false"""
    beta2: float = 0.95
    """AdamW beta2"""
    eps: float = 1.0e-8
    """AdamW eps"""
    warmup_steps: int = 1000
    """steps of the one-cycle warm-up (paper 1000)"""
    initial_lr: float = 1.0e-20
    """the cycle's starting lr (reference initial_lr: div_factor = lr / initial_lr)"""
    final_lr: float = 1.0e-10
    """the cycle's final lr (reference final_lr: final_div_factor = lr / final_lr)"""
    anneal: Literal["cos", "linear"] = "cos"
    """annealing shape of the cycle"""
    cycle_momentum: bool = True
    """torch's OneCycleLR default (kept by the reference): beta1 cycles 0.95 -> 0.85 -> 0.95"""
    total_steps: int = 0
    """length of the cycle (0: trainer.max_steps); set it to stop early and resume on the same curve"""

    def __post_init__(self) -> None:
        for name in ("lr", "projector_lr_ratio", "initial_lr", "final_lr", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        if self.projector_lr is not None and not self.projector_lr > 0:
            raise ValueError(f"optim.projector_lr must be > 0 (or null: lr * projector_lr_ratio), got {self.projector_lr}")
        if self.initial_lr > self.lr:
            raise ValueError(f"optim.initial_lr ({self.initial_lr}) must be <= optim.lr ({self.lr})")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise ValueError(f"optim.warmup_steps and optim.total_steps must be >= 0, got "
                             f"{self.warmup_steps}, {self.total_steps}")
        if self.warmup_steps == 1:  # OneCycleLR's warm-up phase ends at step warmup - 1 and divides by it
            raise ValueError("optim.warmup_steps must be 0 or >= 2 (torch's OneCycleLR cannot warm up over one step)")
        if self.anneal not in ("cos", "linear"):
            raise ValueError(f"optim.anneal must be 'cos' or 'linear', got {self.anneal!r}")

    @property
    def max_projector_lr(self) -> float:
        return self.projector_lr if self.projector_lr is not None else self.lr * self.projector_lr_ratio

    def cycle_length(self, max_steps: int) -> int:
        """Steps of the one-cycle schedule: ``total_steps``, else the trainer's ``max_steps``.

        Refused when training would step past the cycle (torch's OneCycleLR raises then) or
        when warm-up would not end inside it.
        """
        total = self.total_steps or max_steps
        if max_steps > total:
            raise ValueError(f"optim.total_steps={total} is shorter than trainer.max_steps={max_steps}: the "
                             "one-cycle schedule ends at total_steps (0 = trainer.max_steps)")
        if self.warmup_steps >= total:
            length = "optim.total_steps" if self.total_steps else "trainer.max_steps"
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be < the schedule's {total} steps "
                             f"({length}); set --optim.warmup_steps lower (0, or 2 to {total - 1})")
        return total

    def scheduler(self, optimizer: torch.optim.Optimizer, max_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
        """The reference's ``OneCycleLR`` over ``optimizer``'s groups (max lr = each group's "lr")."""
        import torch

        total = self.cycle_length(max_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
            pct_start=self.warmup_steps / total, anneal_strategy=self.anneal, cycle_momentum=self.cycle_momentum,
            div_factor=self.lr / self.initial_lr, final_div_factor=self.lr / self.final_lr,
        )


def bundled_corpus(split: str) -> str:
    """Path of the bundled pydoc_small split (train / validation / test)."""
    path = resources.files("arc_encoder.resources") / "pydoc_small" / f"{split}.jsonl.gz"
    return str(path)


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into samples."""

    train_files: list[str] | str = field(default_factory=list)
    """training text: one file or a list of .txt / .json / .jsonl / .parquet files, optionally .gz (empty: the bundled Python docs)"""
    validation_files: list[str] | str = field(default_factory=list)
    """validation text: one file or a list, same formats (empty: the bundled Python docs' validation split)"""
    dataset_dir: str = ""
    """a `datasets.save_to_disk` directory with train/validation splits (instead of the files)"""
    text_field: str = "text"
    """the field of JSON/parquet records that holds the text"""
    context_tokens: int = 64
    """decoder tokens compressed per sample"""
    target_tokens: int = 32
    """decoder tokens to continue after the compressed context"""
    max_context_tokens: int = 512
    """finetune: QA contexts are cut to this many tokens"""
    batch_size: int = 8
    """samples per batch and device"""
    val_batches: int = 4
    """validation batches per decoder and device"""
    reconstruction_ratio: float = 0.3
    """share of reconstruction batches, the rest continue (paper: 0.2-0.5 works best)"""
    shuffle_buffer: int = 1000
    """documents in the streaming shuffle buffer"""
    seed: int = 0
    """seed of the data order"""
    # Worker w of W builds every W-th batch, so the stream order (and exact resume) is the
    # same for any number. Each reads the whole stream to find its samples' windows.
    num_workers: int = 1
    """loader processes per rank, overlapping the training step (0: in the training process)"""

    def __post_init__(self) -> None:
        for name in ("train_files", "validation_files"):  # one file given as a string
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        for name in ("context_tokens", "target_tokens", "batch_size", "val_batches", "max_context_tokens"):
            check_int(f"data.{name}", getattr(self, name), 1)
        check_int("data.num_workers", self.num_workers, 0)
        if not 0.0 <= self.reconstruction_ratio <= 1.0:
            raise ValueError(f"data.reconstruction_ratio must be in [0, 1], got {self.reconstruction_ratio}")

    def files(self, split: str) -> list[str]:
        files = self.train_files if split == "train" else self.validation_files
        if not files and not self.dataset_dir:
            files = [bundled_corpus(split)]
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"data file {f!r} ({split}) does not exist")
            if Path(f).stat().st_size == 0:
                raise ValueError(f"{split} data {f}: the file is empty")
        return list(files)

    def check(self) -> None:
        """Fail before training when a source is missing."""
        if self.dataset_dir:
            if not Path(self.dataset_dir).is_dir():
                raise FileNotFoundError(f"data.dataset_dir {self.dataset_dir!r} does not exist")
        else:
            self.files("train")
            self.files("validation")


@dataclass
class TinyLMConfig:
    """Shape and schedule of the small decoder LM (defaults: ~0.6M params, ~20 s on 2 cores)."""

    out_dir: str = "runs/tiny-decoder"
    """directory the LM and its tokenizer are saved to (must not exist)"""
    family: str = "llama"
    """architecture (llama, mistral, qwen2, ...)"""
    vocab_size: int = 1024
    """BPE vocabulary trained on the data"""
    hidden_size: int = 96
    """model width"""
    num_layers: int = 4
    """transformer blocks"""
    num_heads: int = 4
    """attention heads"""
    num_kv_heads: int = 2
    """key/value heads (grouped-query attention)"""
    intermediate_size: int = 256
    """MLP width"""
    seq_len: int = 128
    """tokens per training sequence"""
    batch_size: int = 16
    """sequences per batch and device"""
    max_steps: int = 300
    """optimizer steps"""
    lr: float = 3e-3
    """peak learning rate (warm-up, then cosine)"""
    tokenizer_docs: int = 2000
    """documents the tokenizer is trained on"""
    seed: int = 0
    """seed of the weights and the data order"""
    devices: int | str = 1
    """devices per node; with several, batch_size is per device"""
    num_nodes: int = 1
    """nodes"""
    strategy: str = "auto"
    """auto, or ddp for several devices"""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "seq_len", "batch_size", "max_steps", "num_nodes"):
            check_int(f"lm.{name}", getattr(self, name), 1)
        if self.strategy == "fsdp":
            raise ValueError("lm.strategy fsdp is not supported (the LM is small); use ddp")


# ---------------------------------------------------------------------------- job sections
@dataclass
class DecoderConfig:
    """A frozen decoder: a local HF causal-LM directory (or builtin:tiny-lm), and its projector.

    ``projector`` IS the library's ``ProjectorOptions`` (every option a user chooses: hidden
    width, activation, bias, special tokens and their space); the widths and the vocabulary
    come from the encoder and this decoder.
    """

    name: str = "tiny"
    """the projector's name (what --decoder NAME selects in `arc-encoder` commands)"""
    path: str = BUILTIN_TINY
    """local HF causal-LM directory, builtin:tiny-lm (the tiny decoder shipped in the package), or known:NAME (a
    registry model converted once, e.g. known:smollm2-135m)"""
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


@dataclass
class EncoderBuildConfig:
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
class TrainerConfig:
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
            check_int(f"trainer.{name}", getattr(self, name), 1)
        if isinstance(self.gradient_clip_val, bool) or not self.gradient_clip_val >= 0:
            raise ValueError(f"trainer.gradient_clip_val must be >= 0, got {self.gradient_clip_val!r}")


# A run name is one directory name: never empty, never a path (an empty name made the export
# replace the whole checkpoints directory).
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class RunConfig:
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
    tiny_lm: TinyLMConfig = field(default_factory=TinyLMConfig)
    """the tiny decoder LM trained for builtin:tiny-lm paths when a setting differs from the shipped one's"""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _RUN_NAME.fullmatch(self.name):
            raise ValueError(f"run.name {self.name!r} must be one directory name: letters, digits, '.', '_' or '-', "
                             "not starting with '.' or '-'")
        for name in ("runs_dir", "checkpoints_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"run.{name} must be a directory path, got {getattr(self, name)!r}")


# ---------------------------------------------------------------------------- the jobs
class JobConfig:
    """What every job's config can do: be built from a named preset."""

    @classmethod
    def from_name(cls, name: str, **values: Any) -> JobConfig:
        """The preset ``name`` (`PRESETS`) as this job's config; ``values`` override sections of it
        (e.g. ``trainer={"max_steps": 50}``), merged as a YAML file over the defaults would be."""
        if name not in PRESETS:
            raise ValueError(f"no preset named {name!r}; presets: {sorted(PRESETS)}")
        preset = PRESETS[name]
        if preset.job_config is not cls:
            raise ValueError(f"preset {name!r} configures the {preset.job} job ({preset.job_config.__name__}), "
                             f"not {cls.__name__}")
        return config_from_dict(cls, _merged(preset.values, values))


@dataclass
class PretrainConfig(JobConfig):
    """The pretrain job: encoder + one projector per decoder on raw text. The defaults are the tiny
    CPU run (`arc-encoder-train pretrain` with no arguments, preset "tiny")."""

    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(base_model=BUILTIN_TINY, layers_removed=1))
    """the library's EncoderConfig; the tiny default starts from the tiny decoder LM minus its last layer (of 4)"""
    encoder_build: EncoderBuildConfig = field(default_factory=EncoderBuildConfig)
    decoders: list[DecoderConfig] = field(
        default_factory=lambda: [DecoderConfig(projector=ProjectorOptions(hidden_dim=256))])
    """frozen decoders, one projector each (a YAML list; its keys: --decoders.help DecoderConfig)"""
    from_checkpoint: str = ""
    """continue pretraining this checkpoint (its encoder, and its projectors for the decoders it has; a decoder
    it lacks gets a new projector) instead of cutting a new encoder from encoder.base_model"""
    data: DataConfig = field(default_factory=DataConfig)
    # The reference's optimiser (AdamW, projector 5x, weight decay 0.1, one-cycle) at a CPU-scale
    # learning rate and warm-up (the paper's 1e-5 with 1000 warm-up steps would not move a tiny
    # model in 1000 steps: val continuation loss 2.78 instead of 2.73; preset "paper_fsdp" has them).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.0e-3, warmup_steps=20))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=1000, val_check_interval=250))
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class AdaptConfig(JobConfig):
    """The adapt job: a projector for a new decoder; the encoder stays frozen."""

    from_checkpoint: str = "checkpoints/tiny"
    """the trained checkpoint to add a projector to (it stays untouched; the export is a copy)"""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # The projector and its special tokens at one rate (paper, OLMo adaptation: 1e-4 for both).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.0e-3, projector_lr_ratio=1.0,
                                                                   warmup_steps=20))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="auto"))


@dataclass
class FinetuneConfig(JobConfig):
    """The finetune job: context + question -> answer, loss on the answer only."""

    from_checkpoint: str = "checkpoints/tiny"
    """the trained checkpoint to fine-tune"""
    decoders: list[DecoderConfig] = field(default_factory=lambda: [DecoderConfig()])
    """the decoders to fine-tune for (each must have a projector in from_checkpoint)"""
    freeze_encoder: bool = False
    """train the projectors only"""
    pooling_factor: int = 0
    """0: the checkpoint's pooling factor; else fine-tune and export at this factor (the paper's ARC4 is
    pretrained at x8 and fine-tuned at x4: preset paper_finetune_arc4)"""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.0e-4, warmup_steps=20))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="finetune"))


@dataclass
class LMConfig(JobConfig):
    """The lm job: a small plain causal LM to serve as a frozen decoder."""

    lm: TinyLMConfig = field(default_factory=TinyLMConfig)
    data: DataConfig = field(default_factory=DataConfig)


JOB_CONFIGS: dict[str, type] = {"pretrain": PretrainConfig, "adapt": AdaptConfig, "finetune": FinetuneConfig,
                                "lm": LMConfig}

# Keys a job never reads: left out of its parser, so that its --help lists only what it uses
# and setting one is an unknown-key error rather than a silent no-op.
JOB_SKIPS: dict[str, set[str]] = {
    "pretrain": {"data.max_context_tokens"},
    "adapt": {"data.max_context_tokens"},
    "finetune": {"data.context_tokens", "data.target_tokens", "data.reconstruction_ratio", "data.text_field"},
    "lm": {"data.validation_files", "data.context_tokens", "data.target_tokens", "data.max_context_tokens",
           "data.batch_size", "data.val_batches", "data.reconstruction_ratio"},
}


def config_from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """``cls`` from plain data (a YAML file's, a preset's) over ``cls()``'s defaults, section by section:
    a section's keys replace the default section's, a list of sections (``decoders``) replaces the
    default list. Unknown keys are a ValueError naming them."""
    default = cls() if all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                           for f in dataclasses.fields(cls) if f.init) else None
    return _build(cls, data, default, where)


def _build(cls: type, data: dict[str, Any], default: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown keys {unknown}; allowed: {sorted(names)}")
    values = {}
    for name in names:
        here = f"{where}{name}"
        current = getattr(default, name) if default is not None else dataclasses.MISSING
        if name not in data:
            if current is not dataclasses.MISSING:
                values[name] = current
            continue
        kind, value = hints[name], data[name]
        item = _list_item(kind)
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            base = current if current is not dataclasses.MISSING else None
            values[name] = _build(kind, value, base, here + ".")
        elif item is not None and isinstance(value, list):
            values[name] = [_build(item, v, item(), f"{here}.{i}.") for i, v in enumerate(value)]
        else:
            values[name] = tuple(value) if isinstance(value, list) and isinstance(current, tuple) else value
    return cls(**values)


def _list_item(kind: Any) -> type | None:
    """The dataclass of a ``list[Section]`` annotation (None for anything else)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is list and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra``'s keys merged in, mappings key by key (anything else replaced)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ---------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """A named job config: ``values`` over the job's defaults, ``notes`` citing where values come from
    ({dotted key: comment}, written beside them in the generated YAML), ``about`` its header."""

    job: str
    about: str
    values: dict[str, Any]
    notes: dict[str, str] = field(default_factory=dict)
    shown: tuple[str, ...] = ()  # default keys the YAML lists anyway (the tiny preset lists its main keys)

    @property
    def job_config(self) -> type:
        return JOB_CONFIGS[self.job]


_PAPER = ('Sources, cited per value: "T10" = the paper\'s Table 10 (pretraining hyperparameters),\n"C.1" = its '
          'Appendix C.1, "repo" = the reference\'s configs/pretraining_ARC8_Encoder_llama.yaml\n(and '
          "released_pt_configs/ARC8_Encoder_multi.yaml for the two decoders).")

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "pretrain",
        "Tiny CPU default (what `arc-encoder-train pretrain` runs with no arguments: PretrainConfig()).\n"
        "Decoder: the ~0.6M-param Llama LM shipped in arc_encoder/resources/tiny_lm/ (trained by this\n"
        "project on the Python docs; command in its lm_summary.json); encoder initialised from that\n"
        "LM's weights (the paper initialises the encoder from a pretrained LM), last layer removed.",
        {},
        {"optim.lr": "CPU scale (paper 1e-5, preset paper_fsdp): val continuation loss after 1000 steps "
                     "(none 2.79, full 2.63) compressed 2.73 at 1e-3, 2.78 at 1e-5",
         "optim.projector_lr_ratio": "2.74 with ratio 1"},
        shown=("encoder.base_model", "encoder.layers_removed", "encoder.pooling_factor", "decoders.0.name",
               "decoders.0.path", "decoders.0.projector.hidden_dim",
               "data.context_tokens", "data.target_tokens", "data.batch_size", "data.val_batches",
               "data.reconstruction_ratio", "optim.lr", "optim.projector_lr_ratio", "optim.warmup_steps",
               "trainer.max_steps", "trainer.val_check_interval", "run.name"),
    ),
    "single_gpu": Preset(
        "pretrain",
        "One H100: the quality-benchmark scale (tens of millions of parameters).\n"
        "builtin:tiny-lm = the decoder LM described by run.tiny_lm, trained once into\n"
        "runs/gpu-decoder/ on the bundled corpus and reused (or point both paths at your own LM).",
        {"encoder": {"base_model": BUILTIN_TINY, "layers_removed": 2, "pooling_factor": 4, "chunk_len": 256},
         "decoders": [{"name": "gpu", "path": BUILTIN_TINY, "dtype": "bfloat16", "projector": {"hidden_dim": 2048}}],
         "data": {"train_files": [".data/pydoc_full/train.jsonl.gz"],
                  "validation_files": [".data/pydoc_full/validation.jsonl.gz"],
                  "context_tokens": 256, "target_tokens": 128, "batch_size": 32, "val_batches": 8,
                  "reconstruction_ratio": 0.3},
         "optim": {"lr": 3.0e-4, "warmup_steps": 200},
         "trainer": {"max_steps": 5000, "accelerator": "gpu", "devices": 1, "precision": "bf16-mixed",
                     "val_check_interval": 500, "checkpoint_every_n_steps": 500},
         "run": {"name": "single-gpu",
                 "tiny_lm": {"out_dir": "runs/gpu-decoder", "vocab_size": 8192, "hidden_size": 512, "num_layers": 8,
                             "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1408, "seq_len": 512,
                             "batch_size": 32, "max_steps": 3000, "lr": 1.0e-3}}},
        {"encoder.base_model": "encoder initialised from the trained decoder LM"},
    ),
    "paper_fsdp": Preset(
        "pretrain",
        "The paper's pretraining recipe (ARC-Encoder, arXiv 2510.20535): stage 1 of ARC4 / ARC8.\n"
        + _PAPER + "\n\n"
        "Llama-3.2-3B encoder (last 2 layers removed), frozen Llama-3.1-8B and Mistral-7B decoders, one\n"
        "projector each. Paths are LOCAL Hugging Face model directories: replace the placeholders.\n"
        "8 GPUs, bf16-mixed, FSDP2: each GPU holds 1/8 of the encoder and projectors (weights, gradients,\n"
        "AdamW state) and a full frozen copy of both decoders. data.batch_size is per GPU (global 128).\n"
        "Launch commands: arc_encoder_train/README.md.\n\n"
        'ARC4 = this run at x8, then fine-tuned at x4 (C.1 / section 4.1: "ARC4-Encoder using the same\n'
        'pretrained encoder as ARC8-Encoder, only with its fine-tuning performed at a pooling factor of 4"):\n'
        "  arc-encoder-train pretrain --config arc_encoder_train/configs/paper_fsdp.yaml\n"
        "  arc-encoder-train finetune --config arc_encoder_train/configs/paper_finetune_arc4.yaml\n"
        "(ARC8: the same fine-tuning with --pooling_factor 0, i.e. the checkpoint's x8.)\n\n"
        'Not reproduced here: the "interleaved" continuation of T10 ("prefix text tokens <= 256": up to\n'
        "256 plain text tokens before the compressed sequence; C.1 finds it gives no gain for a specific\n"
        "decoder), and the pretraining data (Common Crawl filtered with dactory, ~2.6B tokens: bring your\n"
        'own JSONL with a "text" field).',
        {"encoder": {"base_model": "/models/Llama-3.2-3B", "layers_removed": 2, "pooling_factor": 8,
                     "chunk_len": 1024, "max_chunks": 32},
         "encoder_build": {"gradient_checkpointing": True},
         "decoders": [{"name": "llama3_8b", "path": "/models/Llama-3.1-8B", "dtype": "bfloat16",
                       "projector": {"hidden_dim": 2048, "bos": "reference"}},
                      {"name": "mistral_7b", "path": "/models/Mistral-7B-v0.3", "dtype": "bfloat16",
                       "projector": {"hidden_dim": 2048, "bos": "reference"}}],
         "data": {"train_files": ["/data/pretrain/train.jsonl"], "validation_files": ["/data/pretrain/validation.jsonl"],
                  "context_tokens": 256, "target_tokens": 256, "batch_size": 16, "reconstruction_ratio": 0.2},
         "optim": {"lr": 1.0e-5, "projector_lr_ratio": 5.0, "weight_decay": 0.1, "warmup_steps": 1000,
                   "initial_lr": 1.0e-20, "final_lr": 1.0e-10, "anneal": "cos"},
         "trainer": {"max_steps": 80000, "gradient_clip_val": 1.0, "accumulate_grad_batches": 1, "accelerator": "gpu",
                     "devices": 8, "strategy": "fsdp", "precision": "bf16-mixed", "val_check_interval": 2000,
                     "checkpoint_every_n_steps": 2000},
         "run": {"name": "paper-fsdp"}},
        {"encoder.base_model": "C.1: Llama3.2 3B, every layer trained, no causal mask",
         "encoder.layers_removed": "C.1; repo n_truncated_layers: 2",
         "encoder.pooling_factor": "C.1: pooling factor 8; repo compress_rates: [-8]",
         "encoder.chunk_len": "long contexts only (T10: at most 256 tokens compressed at once)",
         "encoder_build.gradient_checkpointing": "repo train.py: checkpoint: true",
         "decoders.0.name": "llm_number 0 of the released ARC8_Encoder_multi",
         "decoders.0.projector.hidden_dim": "C.1 / repo bridge_module: 3072 -> 2048 -> 4096, no bias, no activation",
         "decoders.0.projector.bos": "repo: [compressed][special][text] for pretraining windows, BOS before prompts",
         "decoders.1.name": "llm_number 1",
         "data.train_files": 'raw text, field "text"',
         "data.context_tokens": "T10: max tokens compressed at once 256; repo seq_len: 256",
         "data.target_tokens": "C.1: 256 tokens to continue or reconstruct",
         "data.batch_size": "T10: batch size 16, 8 GPUs; repo batch_size: 16",
         "data.reconstruction_ratio": "C.1: 20% reconstruction; repo continuation: 0.8",
         "optim.lr": "T10: max lr encoder and special tokens; repo max_lr",
         "optim.projector_lr_ratio": "T10: max lr MLP 5e-5; repo max_lr_projector: 5.0e-05",
         "optim.weight_decay": "T10; repo",
         "optim.warmup_steps": "T10; repo warm_up_steps",
         "optim.initial_lr": "T10 init lr; repo initial_lr",
         "optim.final_lr": "T10 final lr; repo final_lr",
         "optim.anneal": 'T10: 1 cycle policy; repo optim type "cycle" -> OneCycleLR cos',
         "trainer.max_steps": "T10: 80k for ARC-Encoder and multi-decoder (repo config: 100000)",
         "trainer.gradient_clip_val": "T10: max norm 1.0",
         "trainer.accumulate_grad_batches": "T10: no gradient accumulation",
         "trainer.devices": "T10: 8 GPUs",
         "trainer.strategy": "C: PyTorch FSDP",
         "trainer.precision": "T10: mixed precision"},
    ),
    "paper_finetune_arc4": Preset(
        "finetune",
        "Stage 2 of the paper's ARC4 (ARC-Encoder, arXiv 2510.20535): the encoder pretrained at x8 by\n"
        'paper_fsdp, fine-tuned at x4. Sources: "T11" = the paper\'s Table 11 (fine-tuning\n'
        "hyperparameters, context-compression column; values it does not list are Table 10's),\n"
        '"repo" = the reference\'s configs/finetuning_ARC4_Encoder_multi.yaml.\n\n'
        "  arc-encoder-train finetune --config arc_encoder_train/configs/paper_finetune_arc4.yaml\n\n"
        'The fine-tuning data is JSONL with "context", "question" and "answer" fields (the paper mixes\n'
        "synthetic translations with supervised QA, summarisation and reading comprehension; the\n"
        "reference's kyutai/ARC_finetuning dataset has them). Loss on the answer only. Not reproduced:\n"
        "the interleaved few-shot examples of T11 (compressed documents between full-text questions\n"
        "and answers).\n\n"
        "T11 gives the multi-decoder special tokens 3e-5; the reference code keeps them in the\n"
        "encoder's parameter group (2e-6), as here.",
        {"from_checkpoint": "checkpoints/paper-fsdp", "pooling_factor": 4, "freeze_encoder": False,
         "decoders": [{"name": "llama3_8b", "path": "/models/Llama-3.1-8B", "dtype": "bfloat16"},
                      {"name": "mistral_7b", "path": "/models/Mistral-7B-v0.3", "dtype": "bfloat16"}],
         "data": {"train_files": ["/data/finetune/train.jsonl"], "validation_files": ["/data/finetune/validation.jsonl"],
                  "max_context_tokens": 2048, "batch_size": 8},
         "optim": {"lr": 2.0e-6, "projector_lr": 3.0e-5, "weight_decay": 0.05, "warmup_steps": 50,
                   "initial_lr": 1.0e-20, "final_lr": 1.0e-8, "anneal": "cos"},
         "trainer": {"max_steps": 8000, "gradient_clip_val": 1.0, "accelerator": "gpu", "devices": 8, "strategy": "fsdp",
                     "precision": "bf16-mixed", "val_check_interval": 500, "checkpoint_every_n_steps": 500},
         "run": {"name": "paper-arc4"}},
        {"from_checkpoint": "the pretrain export",
         "pooling_factor": "C.1: ARC4 = the x8 pretrained encoder fine-tuned at x4; repo compress_rates: [-4]",
         "data.max_context_tokens": "T11: max tokens compressed at once 2048",
         "data.batch_size": "T11; repo batch_size: 8",
         "optim.lr": "T11: max lr encoder; repo max_lr",
         "optim.projector_lr": "T11: max lr MLP; repo max_lr_projector",
         "optim.weight_decay": "T11; repo",
         "optim.warmup_steps": "T11; repo warm_up_steps",
         "optim.initial_lr": "repo initial_lr (T10)",
         "optim.final_lr": "T11; repo final_lr",
         "trainer.max_steps": "T11: 4k (8k for multi-decoder); repo max_steps: 8000"},
    ),
    "smollm2_h200": Preset(
        "pretrain",
        'Real pretrained LLMs on one H200 (benchmarks/README.md, "Real LLMs"): encoder = SmolLM2-135M-Instruct minus\n'
        "its last 2 layers, tuned with LoRA (+ the pooled block in full) so the checkpoint is a small delta on the\n"
        "converted base; frozen decoder = SmolLM2-135M-Instruct; x4 and x8 from one run (mixed pooling).\n"
        "Paths are relative to the directory the job runs in: models/ from `arc-encoder convert-gguf`,\n"
        "corpus/ from benchmarks/decoder_corpus.py (Debian docs + PyPI sources, split by file).",
        {"encoder": {"base_model": "models/smollm2-135m", "layers_removed": 2, "pooling_factor": 4,
                     "pooling_factors": [4, 8], "chunk_len": 512, "tuning": "lora", "lora_rank": 16,
                     "lora_alpha": 32.0, "full_blocks": 1},
         "decoders": [{"name": "smollm2", "path": "models/smollm2-135m", "dtype": "bfloat16",
                       "projector": {"hidden_dim": 2048}}],
         "data": {"train_files": ["corpus/train.jsonl.gz"], "validation_files": ["corpus/validation.jsonl.gz"],
                  "context_tokens": 256, "target_tokens": 256, "batch_size": 64, "val_batches": 4,
                  "reconstruction_ratio": 0.4, "num_workers": 6},
         "optim": {"lr": 5.0e-4, "projector_lr_ratio": 2.0, "warmup_steps": 100},
         "trainer": {"max_steps": 2000, "accelerator": "gpu", "devices": 1, "precision": "bf16-mixed",
                     "val_check_interval": 250, "checkpoint_every_n_steps": 250, "status_every_s": 30},
         "run": {"name": "smollm2-x4x8"}},
    ),
    "gemma3_adapt_h200": Preset(
        "adapt",
        "Adapt the SmolLM2-based encoder of smollm2_h200 to a decoder family it was not trained with:\n"
        "Gemma 3 270M (projector + its special tokens only; the encoder stays frozen). BOS: Gemma's tokenizer\n"
        'adds it to every text, so the projector\'s bos policy resolves to "always" (measured: without BOS\n'
        "Gemma 3 loses ~2 nats/token, benchmarks/results/bos_real_cpu.json).",
        {"from_checkpoint": "checkpoints/smollm2-x4x8",
         "decoder": {"name": "gemma3", "path": "models/gemma3-270m", "allow_padded_vocab": True, "dtype": "bfloat16",
                     "projector": {"hidden_dim": 2048}},
         "data": {"train_files": ["corpus/train.jsonl.gz"], "validation_files": ["corpus/validation.jsonl.gz"],
                  "context_tokens": 256, "target_tokens": 256, "batch_size": 32, "val_batches": 4,
                  "reconstruction_ratio": 0.4, "num_workers": 6},
         "optim": {"lr": 1.0e-3, "projector_lr_ratio": 1.0, "warmup_steps": 50},
         "trainer": {"max_steps": 600, "accelerator": "gpu", "devices": 1, "precision": "bf16-mixed",
                     "val_check_interval": 200, "checkpoint_every_n_steps": 200, "status_every_s": 30},
         "run": {"name": "smollm2-x4x8-gemma3"}},
        {"decoder.allow_padded_vocab": "Gemma 3 pads its 262,143-token vocabulary to 262,144 rows"},
    ),
    "qa_finetune_h200": Preset(
        "finetune",
        "The paper's second stage on one H200: context + question -> answer, loss on the answer only, for both\n"
        "decoders of the adapted checkpoint (gemma3_adapt_h200). QA rows come from the corpus's TRAIN split\n"
        "(`arc-encoder eval make-qa`: planted key/value needles and sentence-completion spans); the evaluation\n"
        "questions are made from the TEST split's files, never seen in training.",
        {"from_checkpoint": "checkpoints/smollm2-x4x8-gemma3",
         "decoders": [{"name": "smollm2", "path": "models/smollm2-135m", "dtype": "bfloat16"},
                      {"name": "gemma3", "path": "models/gemma3-270m", "allow_padded_vocab": True,
                       "dtype": "bfloat16"}],
         "data": {"train_files": ["qa/train.jsonl.gz"], "validation_files": ["qa/validation.jsonl"],
                  "max_context_tokens": 512, "batch_size": 32, "val_batches": 4, "num_workers": 4},
         "optim": {"lr": 2.0e-4, "projector_lr_ratio": 2.0, "warmup_steps": 30},
         "trainer": {"max_steps": 400, "accelerator": "gpu", "devices": 1, "precision": "bf16-mixed",
                     "val_check_interval": 200, "checkpoint_every_n_steps": 200, "status_every_s": 30},
         "run": {"name": "smollm2-x4x8-qa"}},
    ),
}


def preset_path(name: str) -> Path:
    """The packaged YAML file of preset ``name``."""
    return Path(str(resources.files("arc_encoder_train") / "configs" / f"{name}.yaml"))


def preset_yaml(name: str) -> str:
    """Preset ``name`` as the YAML file ``--config`` takes: its header, its values, each note beside its key."""
    preset = PRESETS[name]
    values = dict(preset.values)
    if preset.shown:  # default keys listed anyway, with the default job config's values
        plain = _plain(dataclasses.asdict(preset.job_config()))
        for key in preset.shown:
            node, target = plain, values
            parts = [int(p) if p.isdigit() else p for p in key.split(".")]
            for part, after in zip(parts, parts[1:]):
                node = node[part]
                empty = [] if isinstance(after, int) else {}
                if isinstance(part, int):
                    target.extend({} for _ in range(part + 1 - len(target)))
                    target = target[part]
                else:
                    target = target.setdefault(part, empty)
            target[parts[-1]] = node[parts[-1]]
    header = [f"# {line}".rstrip() for line in preset.about.splitlines()]
    header += ["#", f'# Generated from arc_encoder_train.config.PRESETS["{name}"] (edit it there, then run',
               "# `python -m arc_encoder_train.config` to write this file again)."]
    return "\n".join(header + _yaml_lines(values, preset.notes, "", 0)) + "\n"


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (what a YAML file holds)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _scalar(value: Any) -> str:
    import yaml

    flow = yaml.safe_dump([_plain(value)], default_flow_style=True, width=1000).strip()
    return flow[1:-1]  # the value inside "[...]"


def _yaml_lines(data: dict[str, Any], notes: dict[str, str], prefix: str, indent: int) -> list[str]:
    def note(line: str, key: str) -> str:
        return f"{line:<38} # {notes[key]}" if key in notes else line

    lines = []
    pad = "  " * indent
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            lines.append(note(f"{pad}{key}:", dotted))
            lines += _yaml_lines(value, notes, f"{dotted}.", indent + 1)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(note(f"{pad}{key}:", dotted))
            for i, item in enumerate(value):
                item_lines = _yaml_lines(item, notes, f"{dotted}.{i}.", indent + 2)
                item_lines[0] = f"{pad}  - {item_lines[0].lstrip()}"
                lines += item_lines
        else:
            lines.append(note(f"{pad}{key}: {_scalar(value)}", dotted))
    return lines


def write_presets() -> list[Path]:
    """Write every preset's YAML file (``configs/NAME.yaml``); returns the paths written."""
    written = []
    for name in PRESETS:
        path = preset_path(name)
        path.write_text(preset_yaml(name))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_presets():
        print(f"wrote {path}")
