"""LightningDataModule over `datasets`: raw text -> per-decoder reconstruction/continuation batches.

Sources: local text / JSON(L)(.gz) / parquet files, or a dataset saved with ``save_to_disk``, read
by the library's one corpus reader (``arc_encoder.corpus``: streamed, never loaded whole). The default is the bundled pydoc_small
corpus (Python 3.11 docs, PSF license; see arc_encoder/resources/README.md).

Global batch ``i`` of the training stream targets decoder ``decoders[i % n]`` and reconstructs
when ``is_reconstruction(i // n, ratio)``, so the task mix is exact. With several processes,
global batch ``i`` holds ``batch_size * world_size`` consecutive samples of that decoder's
stream and rank ``r`` trains on slice ``[r * batch_size, (r + 1) * batch_size)``: the ranks'
samples are disjoint and together are the single-process stream at that global batch. A
resumed run continues at its saved `DataPosition` (the same sample of every decoder's stream).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from arc_encoder.corpus import stream_records, stream_texts
from arc_encoder.samples import Batch, Sample, Task, collate, is_reconstruction, qa_sample, split_windows, text_sample
from arc_encoder.decoders import decoder_prefix

from .config import DataConfig


def iter_records(spec: DataConfig, split: str, epoch: int = 0, shuffle: bool = False) -> Iterator[dict]:
    """Stream records of one split (the library's corpus reader); shuffled with a bounded buffer."""
    files = [] if spec.dataset_dir else spec.files(split)
    return stream_records(files, spec.dataset_dir, split, spec.seed + epoch if shuffle else None, spec.shuffle_buffer)


def iter_texts(spec: DataConfig, split: str, epoch: int = 0, shuffle: bool = False) -> Iterator[str]:
    """The non-empty texts (field ``spec.text_field``) of one split."""
    return stream_texts(iter_records(spec, split, epoch, shuffle), spec.text_field, f"{split} ")


class TokenCache:
    """Token ids of documents already seen, so epochs after the first skip tokenization.

    Tokenizing is the slowest part of the input pipeline (a GPU step of a small model is
    faster than tokenizing its batch), and small corpora are read for many epochs. Bounded
    by ``max_tokens``; past that, documents are tokenized each time they come.
    """

    def __init__(self, max_tokens: int = 200_000_000) -> None:
        self.max_tokens = max_tokens
        # Per tokenizer (weak keys: an entry goes with its tokenizer, and a tokenizer created later
        # at the same address never gets another one's ids): {text: ids} and the tokens held.
        self._stores: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, tokenizer, text: str) -> list[int]:
        store = self._stores.setdefault(tokenizer, ({}, [0]))
        ids = store[0].get(text)
        if ids is None:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if store[1][0] + len(ids) <= self.max_tokens:
                store[0][text] = ids
                store[1][0] += len(ids)
        return ids

    def held(self, tokenizer) -> int:
        """Tokens held for ``tokenizer``."""
        store = self._stores.get(tokenizer)
        return store[1][0] if store is not None else 0


_CACHE = TokenCache()  # per process (the loader worker keeps its own across epochs)


@dataclass
class DecoderTokenizers:
    """What the data side needs to know about one decoder."""

    name: str
    tokenizer: object
    same_as_encoder: bool = False
    bos: str = "reference"  # the projector's recorded BOS policy (``arc_encoder.config.DecoderBos``)


# A sample not built yet: a process finds every sample's place in the stream but builds
# (encoder-tokenizes) only the samples it trains on.
LazySample = Callable[[], Sample]
SampleFn = Callable[[DataConfig, DecoderTokenizers, object, str, int, bool], Iterator[LazySample]]


def pretrain_samples(spec: DataConfig, dec: DecoderTokenizers, enc_tok, split: str, epoch: int, shuffle: bool) -> Iterator[LazySample]:
    for text in iter_texts(spec, split, epoch, shuffle):
        ids = _CACHE(dec.tokenizer, text)
        for ctx, cont in split_windows(text, dec.tokenizer, spec.context_tokens, spec.target_tokens, ids=ids):
            yield partial(text_sample, ctx, cont, enc_tok, dec.tokenizer, dec.same_as_encoder)


def qa_samples(spec: DataConfig, dec: DecoderTokenizers, enc_tok, split: str, epoch: int, shuffle: bool) -> Iterator[LazySample]:
    """Finetune records: {"context", "question", "answer"} (see arc_encoder_train/README.md)."""
    for i, rec in enumerate(iter_records(spec, split, epoch, shuffle)):
        missing = [k for k in ("context", "question", "answer") if k not in rec]
        if missing:
            raise ValueError(f"{split} QA record {i} lacks fields {missing}; it has {sorted(rec)}")
        yield partial(qa_sample, rec["context"], rec["question"], rec["answer"], enc_tok, dec.tokenizer,
                      spec.max_context_tokens)


@dataclass(frozen=True)
class DataRank:
    """This process's place among ``world_size`` data-parallel processes (global rank)."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")

    def part(self, items: Sequence, per_rank: int) -> Sequence:
        """This rank's slice of one global batch of ``per_rank * world_size`` items."""
        return items[self.rank * per_rank : (self.rank + 1) * per_rank]


def worker_builds(index: int, start: int) -> bool:
    """Whether this loader process builds batch ``index`` of a stream that starts at ``start``.

    torch's DataLoader takes items from its W workers in turn (0, 1, ..., W-1, 0, ...), so
    worker w building batches start + w, start + w + W, ... yields the stream in its order.
    """
    info = torch.utils.data.get_worker_info()
    return info is None or (index - start) % info.num_workers == info.id


@dataclass
class DataPosition:
    """Where the training stream stands: the next global batch and the samples each decoder used.

    Saved in checkpoints. It does not depend on the number of processes, so a run resumed on
    another number of devices still continues at the same sample of every decoder's stream.
    ``samples`` None (checkpoints from before it was recorded): every earlier global batch
    had the current global batch size.
    """

    batch: int = 0
    samples: dict[str, int] | None = field(default_factory=dict)

    def advance(self, batch: Batch) -> None:
        """Account for one trained batch (``batch.meta['global_size']``: its global batch's samples)."""
        self.batch = batch.index + 1
        if self.samples is not None:
            size = batch.meta.get("global_size", len(batch))
            self.samples[batch.decoder] = self.samples.get(batch.decoder, 0) + size

    def samples_used(self, decoders: list[str], global_batch: int) -> dict[str, int]:
        if self.samples is not None:
            return {d: self.samples.get(d, 0) for d in decoders}
        n = len(decoders)  # batch i went to decoders[i % n]: decoder k had ceil((batch - k) / n) batches
        return {d: max(0, (self.batch - k + n - 1) // n) * global_batch for k, d in enumerate(decoders)}

    def to_dict(self) -> dict:
        return {"batch": self.batch, "samples": None if self.samples is None else dict(self.samples)}

    @classmethod
    def from_dict(cls, data: dict) -> DataPosition:
        samples = data.get("samples")
        return cls(int(data["batch"]), None if samples is None else {str(k): int(v) for k, v in samples.items()})


def row_prefix(dec: DecoderTokenizers, qa: bool) -> list[int]:
    """The tokens before a row's compressed context, by the decoder's BOS policy (`decoders.decoder_prefix`):
    BOS before fine-tuning rows (reference: the prompt's first part is encoded with BOS), before
    pretraining windows only for decoders whose policy is "always" (e.g. Gemma 3)."""
    return decoder_prefix(dec.bos, dec.tokenizer.bos_token_id, "qa" if qa else "continuation")


class BatchStream(IterableDataset):
    """Endless stream of this rank's `Batch`es, round-robin over decoders, tasks on a fixed schedule.

    Global batch i is the next ``batch_size * world_size`` samples of decoder ``i % n``'s
    stream; this rank collates its slice of it (``batch.meta``: ``offset`` in the global batch,
    ``global_size``). Every loader process reads the whole stream (decoder tokenization finds
    the windows; cached after the first epoch) but builds only its own samples.
    """

    def __init__(self, spec: DataConfig, decoders: list[DecoderTokenizers], enc_tok, sample_fn: SampleFn,
                 qa: bool = False, start: DataPosition | int = 0, rank: DataRank = DataRank()) -> None:
        self.spec, self.decoders, self.enc_tok, self.sample_fn = spec, decoders, enc_tok, sample_fn
        self.qa, self.rank = qa, rank
        # A copy: the module advances its own position while this stream runs.
        if isinstance(start, DataPosition):
            self.start = DataPosition.from_dict(start.to_dict())
        else:  # a batch index (positions from before samples were counted)
            self.start = DataPosition(start, None)

    @property
    def global_batch(self) -> int:
        return self.spec.batch_size * self.rank.world_size

    def _samples(self, dec: DecoderTokenizers) -> Iterator[LazySample]:
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
        size, bs, first = self.global_batch, self.spec.batch_size, self.start.batch
        used = self.start.samples_used([d.name for d in self.decoders], size)
        streams = {}
        for d in self.decoders:  # resuming: skip the samples earlier steps trained on
            streams[d.name] = self._samples(d)
            next(itertools.islice(streams[d.name], used[d.name], used[d.name]), None)
        for index in itertools.count(first):
            dec = self.decoders[index % len(self.decoders)]
            lazy = list(itertools.islice(streams[dec.name], size))
            if not worker_builds(index, first):
                continue
            batch = collate([make() for make in self.rank.part(lazy, bs)], dec.name, self.task_of(index),
                            row_prefix(dec, self.qa), index)
            batch.meta.update(offset=self.rank.rank * bs, global_size=size)
            yield batch


def validation_batches(spec: DataConfig, decoders: list[DecoderTokenizers], enc_tok, sample_fn: SampleFn,
                       qa: bool = False, rank: DataRank = DataRank()) -> list[Batch]:
    """A fixed validation set: per decoder the first ``val_batches * world_size`` batches in file
    order, dealt to the ranks in turn (every rank gets as many of each decoder's batches)."""
    out = []
    world, bs = rank.world_size, spec.batch_size
    for dec in decoders:
        samples = sample_fn(spec, dec, enc_tok, "validation", 0, False)
        lazy = list(itertools.islice(samples, spec.val_batches * bs * world))
        if not lazy:
            raise ValueError(f"the validation data gave no samples for decoder {dec.name!r}")
        groups = [lazy[i : i + bs] for i in range(0, len(lazy), bs)]
        if len(groups) < world:
            raise ValueError(f"the validation data gave {len(groups)} batches for decoder {dec.name!r}, "
                             f"fewer than the {world} processes")
        for k in range(rank.rank, len(groups) // world * world, world):
            out.append(collate([make() for make in groups[k]], dec.name, "qa" if qa else "continuation",
                               row_prefix(dec, qa), len(out)))
    return out


def _identity(x):
    return x


class ARCDataModule(L.LightningDataModule):
    """Train: endless `BatchStream`; validation: a fixed list of batches."""

    def __init__(self, spec: DataConfig, decoders: list[DecoderTokenizers], encoder_tokenizer,
                 task: str = "pretrain") -> None:
        super().__init__()
        if task not in ("pretrain", "qa"):
            raise ValueError(f"task must be 'pretrain' or 'qa', got {task!r}")
        spec.check()
        self.spec, self.decoders, self.enc_tok = spec, decoders, encoder_tokenizer
        self.qa = task == "qa"
        self.sample_fn: SampleFn = qa_samples if self.qa else pretrain_samples
        self._val: list[Batch] | None = None

    def probe(self) -> None:
        """Build the first training and validation sample of every decoder, here and now.

        A training run reads its data in loader workers once it has started; empty, unreadable,
        field-less or too-short data would then fail in a worker (with its traceback) after the
        run directory exists. Errors name the split and its files, on one line.
        """
        for split in ("train", "validation"):
            where = self.spec.dataset_dir or ", ".join(self.spec.files(split))
            for dec in self.decoders:
                try:
                    first = next(iter(self.sample_fn(self.spec, dec, self.enc_tok, split, 0, False)), None)
                    if first is None:
                        minimum = "context, question and answer" if self.qa else (
                            f"at least {self.spec.context_tokens} + {self.spec.target_tokens} decoder tokens")
                        raise ValueError(f"gives no samples for decoder {dec.name!r} (empty, or no text with {minimum})")
                    first()
                except Exception as err:  # noqa: BLE001 - readers raise many types for unreadable files
                    detail = " ".join(str(err).split()) or type(err).__name__
                    if not isinstance(err, ValueError):
                        detail = f"cannot read it ({type(err).__name__}: {detail})"
                    raise ValueError(f"{split} data {where}: {detail}") from err

    def _rank(self) -> DataRank:
        return DataRank(self.trainer.global_rank, self.trainer.world_size) if self.trainer else DataRank()

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        """A `Batch` holds only token-id lists; the model moves the tensors it builds.

        Lightning's default walks every nested list looking for tensors: 120 ms per
        128-sample batch (measured on CPU), which dominated GPU steps at small model sizes.
        (Here, on the data module that makes the batches, Lightning uses it without a warning.)
        """
        return batch

    def train_dataloader(self) -> DataLoader:
        # The module saves its DataPosition in checkpoints; a resumed stream starts there.
        module = self.trainer.lightning_module if self.trainer else None
        start = getattr(module, "data_position", None) or DataPosition()
        stream = BatchStream(self.spec, self.decoders, self.enc_tok, self.sample_fn, self.qa, start, self._rank())
        return DataLoader(stream, batch_size=None, collate_fn=_identity, num_workers=self.spec.num_workers)

    def val_dataloader(self) -> DataLoader:
        if self._val is None:
            self._val = validation_batches(self.spec, self.decoders, self.enc_tok, self.sample_fn, self.qa,
                                           self._rank())
        return DataLoader(self._val, batch_size=None, collate_fn=_identity, shuffle=False)
