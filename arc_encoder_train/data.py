"""LightningDataModule over `datasets`: raw text -> per-decoder reconstruction/continuation batches.

Sources: local text / JSON(L)(.gz) / parquet files (streamed with ``datasets``, never loaded
whole), or a dataset saved with ``save_to_disk``. The default is the bundled pydoc_small
corpus (Python 3.11 docs, PSF license; see arc_encoder/resources/README.md).

Batch ``i`` of the training stream targets decoder ``decoders[i % n]`` and reconstructs when
``is_reconstruction(i // n, ratio)``, so the task mix is exact and a resumed run continues
the very same stream from its saved batch index.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from arc_encoder.samples import Batch, Sample, Task, collate, is_reconstruction, qa_sample, split_windows, text_sample


def bundled_corpus(split: str) -> str:
    """Path of the bundled pydoc_small split (train / validation / test)."""
    path = resources.files("arc_encoder.resources") / "pydoc_small" / f"{split}.jsonl.gz"
    return str(path)


@dataclass
class DataSpec:
    """Where the text comes from and how it is cut into samples."""

    # Files (.txt, .json, .jsonl, .jsonl.gz, .parquet). Empty = bundled pydoc_small.
    train_files: list[str] = field(default_factory=list)
    validation_files: list[str] = field(default_factory=list)
    # A `datasets.save_to_disk` directory (DatasetDict with train/validation splits); overrides files.
    dataset_dir: str = ""
    text_field: str = "text"
    context_tokens: int = 64  # decoder tokens compressed per sample (pretraining)
    target_tokens: int = 32  # decoder tokens to continue (pretraining)
    max_context_tokens: int = 512  # QA contexts are cut to this many tokens
    batch_size: int = 8
    val_batches: int = 4  # per decoder
    reconstruction_ratio: float = 0.3  # paper: 20-50% reconstruction works best
    shuffle_buffer: int = 1000
    seed: int = 0
    # Tokenization runs in this many loader processes, overlapping the accelerator's step
    # (0 = in the training process). One worker keeps the stream's order (and exact resume).
    num_workers: Literal[0, 1] = 1

    def __post_init__(self) -> None:
        for name in ("context_tokens", "target_tokens", "batch_size", "val_batches", "max_context_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers not in (0, 1):
            raise ValueError(f"data.num_workers must be 0 or 1 (one worker keeps the stream order), got {self.num_workers}")
        if not 0.0 <= self.reconstruction_ratio <= 1.0:
            raise ValueError(f"data.reconstruction_ratio must be in [0, 1], got {self.reconstruction_ratio}")

    def files(self, split: str) -> list[str]:
        files = self.train_files if split == "train" else self.validation_files
        if not files and not self.dataset_dir:
            files = [bundled_corpus(split)]
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"data file {f!r} ({split}) does not exist")
        return list(files)

    def check(self) -> None:
        """Fail before training when a source is missing."""
        if self.dataset_dir:
            if not Path(self.dataset_dir).is_dir():
                raise FileNotFoundError(f"data.dataset_dir {self.dataset_dir!r} does not exist")
        else:
            self.files("train")
            self.files("validation")


def _builder(path: str) -> str:
    name = path.lower().removesuffix(".gz").removesuffix(".bz2").removesuffix(".xz")
    if name.endswith((".json", ".jsonl")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "text"
    raise ValueError(f"{path}: unsupported data file type (use .txt, .json, .jsonl, .parquet, optionally .gz)")


def iter_records(spec: DataSpec, split: str, epoch: int = 0, shuffle: bool = False) -> Iterator[dict]:
    """Stream records of one split; shuffled with a bounded buffer (never loads a corpus whole)."""
    import datasets

    if spec.dataset_dir:
        ds = datasets.load_from_disk(spec.dataset_dir)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{spec.dataset_dir}: no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        ds = ds.to_iterable_dataset()
    else:
        files = spec.files(split)
        builders = {_builder(f) for f in files}
        if len(builders) != 1:
            raise ValueError(f"{split} files mix types {sorted(builders)}; use one type per split")
        ds = datasets.load_dataset(builders.pop(), data_files=files, split="train", streaming=True)
    if shuffle:
        ds = ds.shuffle(seed=spec.seed + epoch, buffer_size=spec.shuffle_buffer)
    yield from ds


def iter_texts(spec: DataSpec, split: str, epoch: int = 0, shuffle: bool = False) -> Iterator[str]:
    for i, rec in enumerate(iter_records(spec, split, epoch, shuffle)):
        if spec.text_field not in rec:
            raise ValueError(f"{split} record {i} has no field {spec.text_field!r}; fields: {sorted(rec)}")
        text = rec[spec.text_field]
        if isinstance(text, str) and text.strip():
            yield text


class TokenCache:
    """Token ids of documents already seen, so epochs after the first skip tokenization.

    Tokenizing is the slowest part of the input pipeline (a GPU step of a small model is
    faster than tokenizing its batch), and small corpora are read for many epochs. Bounded
    by ``max_tokens``; past that, documents are tokenized each time they come.
    """

    def __init__(self, max_tokens: int = 200_000_000) -> None:
        self.max_tokens = max_tokens

    def __call__(self, tokenizer, text: str) -> list[int]:
        # Stored on the tokenizer itself: a cache keyed by id(tokenizer) could hand one
        # tokenizer's ids to another created later at the same address.
        store = tokenizer.__dict__.setdefault("_arc_token_ids", {})
        ids = store.get(text)
        if ids is None:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            held = tokenizer.__dict__.get("_arc_token_count", 0)
            if held + len(ids) <= self.max_tokens:
                store[text] = ids
                tokenizer.__dict__["_arc_token_count"] = held + len(ids)
        return ids

    @staticmethod
    def held(tokenizer) -> int:
        return tokenizer.__dict__.get("_arc_token_count", 0)


_CACHE = TokenCache()  # per process (the loader worker keeps its own across epochs)


@dataclass
class DecoderTokenizers:
    """What the data side needs to know about one decoder."""

    name: str
    tokenizer: object
    same_as_encoder: bool = False


SampleFn = Callable[[DataSpec, DecoderTokenizers, object, str, int, bool], Iterator[Sample]]


def pretrain_samples(spec: DataSpec, dec: DecoderTokenizers, enc_tok, split: str, epoch: int, shuffle: bool) -> Iterator[Sample]:
    for text in iter_texts(spec, split, epoch, shuffle):
        ids = _CACHE(dec.tokenizer, text)
        for ctx, cont in split_windows(text, dec.tokenizer, spec.context_tokens, spec.target_tokens, ids=ids):
            yield text_sample(ctx, cont, enc_tok, dec.tokenizer, dec.same_as_encoder)


def qa_samples(spec: DataSpec, dec: DecoderTokenizers, enc_tok, split: str, epoch: int, shuffle: bool) -> Iterator[Sample]:
    """Finetune records: {"context", "question", "answer"} (see arc_encoder_train/README.md)."""
    for i, rec in enumerate(iter_records(spec, split, epoch, shuffle)):
        missing = [k for k in ("context", "question", "answer") if k not in rec]
        if missing:
            raise ValueError(f"{split} QA record {i} lacks fields {missing}; it has {sorted(rec)}")
        yield qa_sample(rec["context"], rec["question"], rec["answer"], enc_tok, dec.tokenizer, spec.max_context_tokens)


class BatchStream(IterableDataset):
    """Endless stream of `Batch`es, round-robin over decoders, tasks on a fixed schedule."""

    def __init__(self, spec: DataSpec, decoders: list[DecoderTokenizers], enc_tok, sample_fn: SampleFn,
                 qa: bool = False, start_batch: int = 0) -> None:
        self.spec, self.decoders, self.enc_tok, self.sample_fn = spec, decoders, enc_tok, sample_fn
        self.qa, self.start_batch = qa, start_batch

    def _samples(self, dec: DecoderTokenizers) -> Iterator[Sample]:
        for epoch in itertools.count():
            empty = True
            for s in self.sample_fn(self.spec, dec, self.enc_tok, "train", epoch, True):
                empty = False
                yield s
            if empty:
                raise ValueError(f"the training data gave no samples for decoder {dec.name!r} (texts too short?)")

    def task_of(self, index: int) -> Task:
        if self.qa:
            return "qa"
        n = len(self.decoders)
        return "reconstruction" if is_reconstruction(index // n, self.spec.reconstruction_ratio) else "continuation"

    def __iter__(self) -> Iterator[Batch]:
        streams = {d.name: self._samples(d) for d in self.decoders}
        bs = self.spec.batch_size
        for index in itertools.count():
            dec = self.decoders[index % len(self.decoders)]
            samples = list(itertools.islice(streams[dec.name], bs))
            if index < self.start_batch:  # resuming: replay the stream up to the saved position
                continue
            yield collate(samples, dec.name, self.task_of(index), dec.tokenizer.bos_token_id, index)


def validation_batches(spec: DataSpec, decoders: list[DecoderTokenizers], enc_tok, sample_fn: SampleFn,
                       qa: bool = False) -> list[Batch]:
    """A fixed validation set: the first ``val_batches`` batches per decoder, in file order."""
    out = []
    for dec in decoders:
        samples = list(itertools.islice(sample_fn(spec, dec, enc_tok, "validation", 0, False),
                                        spec.val_batches * spec.batch_size))
        if not samples:
            raise ValueError(f"the validation data gave no samples for decoder {dec.name!r}")
        for i in range(0, len(samples), spec.batch_size):
            out.append(collate(samples[i : i + spec.batch_size], dec.name, "qa" if qa else "continuation",
                               dec.tokenizer.bos_token_id, len(out)))
    return out


def _identity(x):
    return x


class ARCDataModule(L.LightningDataModule):
    """Train: endless `BatchStream`; validation: a fixed list of batches."""

    def __init__(self, spec: DataSpec, decoders: list[DecoderTokenizers], encoder_tokenizer,
                 task: str = "pretrain") -> None:
        super().__init__()
        if task not in ("pretrain", "qa"):
            raise ValueError(f"task must be 'pretrain' or 'qa', got {task!r}")
        spec.check()
        self.spec, self.decoders, self.enc_tok = spec, decoders, encoder_tokenizer
        self.qa = task == "qa"
        self.sample_fn: SampleFn = qa_samples if self.qa else pretrain_samples
        self._val: list[Batch] | None = None

    def train_dataloader(self) -> DataLoader:
        # The module saves the next batch index in its checkpoint; resuming replays to it.
        start = int(getattr(self.trainer.lightning_module, "next_batch_index", 0)) if self.trainer else 0
        stream = BatchStream(self.spec, self.decoders, self.enc_tok, self.sample_fn, self.qa, start)
        return DataLoader(stream, batch_size=None, collate_fn=_identity, num_workers=self.spec.num_workers)

    def val_dataloader(self) -> DataLoader:
        if self._val is None:
            self._val = validation_batches(self.spec, self.decoders, self.enc_tok, self.sample_fn, self.qa)
        return DataLoader(self._val, batch_size=None, collate_fn=_identity, shuffle=False)
