"""The one corpus reader: JSON Lines / JSON, parquet and plain-text files (optionally .gz, .bz2, .xz).

Every command that reads text (``cache build``, ``compress``, ``probe``, ``eval``) and training
(``arc_encoder_train.data``, the ``lm`` job) read through here, so a file is understood the same
way everywhere: its format from its name (`file_format`: ``.jsonl``/``.json`` -> json,
``.parquet``, ``.txt`` -> one record per line), its text in a field (``text`` unless told), and an
unreadable file named with the line at fault (`corpus_problem`).

* ``read_corpus``: one whole file as (ids, texts), for commands;
* ``DocumentStream``: those documents checked (ids unique, empty ones skipped), in corpus order;
  a cache's shard k holds documents [k*S, (k+1)*S) of it;
* ``stream_records`` / ``stream_texts``: files (or a ``datasets.save_to_disk`` directory) streamed
  record by record with an optional bounded shuffle buffer, never loaded whole, for training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .loading import quiet_datasets
from .storage import PathLike

CorpusFormat = Literal["auto", "json", "parquet", "text"]
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def file_format(path: PathLike, corpus_format: CorpusFormat = "auto", what: str = "corpus", hint: str = "") -> str:
    """The ``datasets`` builder of ``path`` ("json", "parquet" or "text"): ``corpus_format`` unless "auto",
    else read off the name (a compression suffix .gz, .bz2 or .xz is looked through)."""
    if corpus_format != "auto":
        return corpus_format
    name = Path(path).name.lower().removesuffix(".gz").removesuffix(".bz2").removesuffix(".xz")
    suffix = Path(name).suffix
    if suffix not in _FORMATS:
        raise ValueError(f"{what} {path}: cannot tell the format from {suffix!r} (.jsonl, .json, .parquet or .txt, "
                         f"optionally .gz, .bz2 or .xz){hint}")
    return _FORMATS[suffix]


def _corpus_error(path: Path, fmt: str, err: BaseException) -> ValueError:
    """One clear error naming the corpus file (bad UTF-8 said as such, wherever it surfaced)."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return ValueError(f"corpus {path}: not UTF-8 text ({cause})")
    return ValueError(f"corpus {path}: cannot read it as {fmt} ({type(err).__name__}: {err})")


def read_corpus(path: PathLike, corpus_format: CorpusFormat = "auto") -> tuple[list, list]:
    """(ids, texts) of a JSONL/JSON, parquet or plain-text file, optionally .gz/.bz2/.xz (``datasets``).

    Fields ``id`` and ``text``. Plain text: one document per line, id = line number.
    JSON/parquet without an ``id`` column: id = row number. Every text input of the command
    line (``cache build``, ``compress``, ``probe``, ``eval``) reads through here.
    """
    from datasets import load_dataset

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {path}: no such file")
    fmt = file_format(path, corpus_format, hint="; name it with --format (corpus_format=): json, parquet or text")
    try:
        with quiet_datasets():
            ds = load_dataset(fmt, data_files=str(path), split="train")
        if "text" not in ds.column_names:
            raise ValueError(f"corpus {path}: no 'text' field (fields: {ds.column_names})")
        texts = list(ds["text"])  # Arrow decodes the strings here: bad UTF-8 surfaces now
        ids = list(ds["id"]) if "id" in ds.column_names else [str(i + 1) for i in range(len(texts))]
    except ValueError as err:
        if str(err).startswith(f"corpus {path}:"):
            raise
        raise _diagnosed(path, fmt, err) from err
    except Exception as err:  # datasets raises many types for unreadable files
        raise _diagnosed(path, fmt, err) from err
    return ids, texts


def _diagnosed(path: Path, fmt: str, err: BaseException) -> ValueError:
    """The error of an unreadable corpus, naming the line at fault where one can be found (read
    again line by line: only after ``datasets`` failed, so a good corpus is read once)."""
    problem = corpus_problem(path, fmt)
    return ValueError(f"corpus {path}: {problem}") if problem else _corpus_error(path, fmt, err)


def corpus_problem(path: PathLike, fmt: str) -> str | None:
    """What is wrong with a corpus file, with its line number: an empty file, a truncated or corrupt
    compressed file, bad UTF-8, a JSON Lines line that is not JSON. None if nothing is found."""
    import bz2
    import gzip
    import lzma
    import zlib

    path = Path(path)
    openers = {".gz": (gzip.open, "gzip"), ".bz2": (bz2.open, "bzip2"), ".xz": (lzma.open, "xz")}
    opener, kind = openers.get(path.suffix, (open, ""))
    line_no, records = 0, 0
    whole_json = None
    try:
        if fmt == "json":  # a .json file may be one JSON document (an array of records) rather than lines
            with opener(path, "rb") as f:
                try:
                    whole_json = json.loads(f.read().decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    whole_json = None
        if whole_json is not None:
            return None if whole_json else "the file holds no records"
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"line {line_no}: not UTF-8 text ({e.reason} at byte {e.start})"
                if not line.strip():
                    continue
                records += 1
                if fmt == "json":
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"line {line_no}, column {e.colno}: not valid JSON ({e.msg})"
    except EOFError:
        return f"the {kind} file is truncated (it ends inside line {line_no + 1})"
    except (OSError, lzma.LZMAError, zlib.error) as e:
        return f"not a readable {kind or fmt} file ({e})"
    if records == 0:
        return "the file is empty (no records)" if line_no == 0 else f"the file has only blank lines ({line_no})"
    return None


@dataclass
class DocumentStream:
    """Documents in corpus order, empty ones skipped; shard k is docs [k*S, (k+1)*S)."""

    ids: list[str]
    texts: Sequence[str]
    skipped_empty: int = 0
    dropped_duplicates: int = 0

    @classmethod
    def from_records(
        cls, ids: Sequence[Any], texts: Sequence[Any], dedupe: bool = False, where: str = "corpus"
    ) -> DocumentStream:
        """Check ids and texts: duplicate ids are an error naming both rows unless ``dedupe``."""
        if len(ids) != len(texts):
            raise ValueError(f"{where}: {len(ids)} ids for {len(texts)} texts")
        seen: dict[str, int] = {}
        keep_ids, keep_texts = [], []
        empty = dropped = 0
        for i, (doc_id, text) in enumerate(zip(ids, texts)):
            row = i + 1
            if doc_id is None or str(doc_id) == "":
                raise ValueError(f"{where}: row {row} has no id")
            doc_id = str(doc_id)
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{where}: row {row} (id {doc_id!r}): text is {type(text).__name__}, not str")
            if text is None or not text.strip():
                empty += 1  # skipped by design: an empty document has nothing to compress
                continue
            if doc_id in seen:
                if not dedupe:
                    raise ValueError(
                        f"{where}: duplicate document id {doc_id!r} at rows {seen[doc_id]} and {row}; "
                        "make ids unique, or keep the first with --dedupe (dedupe=True)"
                    )
                dropped += 1
                continue
            seen[doc_id] = row
            keep_ids.append(doc_id)
            keep_texts.append(text)
        if not keep_ids:
            raise ValueError(f"{where}: no non-empty documents ({empty} empty)")
        return cls(keep_ids, keep_texts, empty, dropped)

    @classmethod
    def from_corpus(cls, path: PathLike, corpus_format: CorpusFormat = "auto", dedupe: bool = False) -> DocumentStream:
        """Read a corpus (``read_corpus``) and check its ids (``from_records``)."""
        ids, texts = read_corpus(path, corpus_format)
        return cls.from_records(ids, texts, dedupe=dedupe, where=f"corpus {path}")

    def __len__(self) -> int:
        return len(self.ids)

    def num_shards(self, docs_per_shard: int) -> int:
        return math.ceil(len(self.ids) / docs_per_shard)

    def shard(self, k: int, docs_per_shard: int) -> tuple[list[str], list[str]]:
        """Shard k's document ids and texts."""
        span = slice(k * docs_per_shard, (k + 1) * docs_per_shard)
        return list(self.ids[span]), list(self.texts[span])


# ---------------------------------------------------------------------------- streaming (training)
def stream_records(files: Sequence[str] = (), dataset_dir: str = "", split: str = "train",
                   shuffle_seed: int | None = None, buffer_size: int = 1000) -> Iterator[dict]:
    """Stream the records of ``files`` (one format for all) or of split ``split`` of a ``save_to_disk``
    ``dataset_dir``; shuffled with a bounded buffer when ``shuffle_seed`` is given (never loads a corpus whole)."""
    import datasets

    if dataset_dir:
        ds = datasets.load_from_disk(dataset_dir)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{dataset_dir}: no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        ds = ds.to_iterable_dataset()
    else:
        builders = {file_format(f, what=f"{split} data") for f in files}
        if len(builders) != 1:
            raise ValueError(f"{split} files mix types {sorted(builders)}; use one type per split")
        ds = datasets.load_dataset(builders.pop(), data_files=list(files), split="train", streaming=True)
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed, buffer_size=buffer_size)
    # ``ds.iter`` rather than ``iter(ds)``: inside a DataLoader worker the latter hands each
    # worker only some of the files (and shifts its shuffle seed); every loader process of a
    # training run must read the same whole stream and pick its own samples from it.
    with quiet_datasets():  # a file it cannot parse is reported once, by the caller's error
        for rows in ds.iter(batch_size=256):
            columns = list(rows)
            for i in range(len(rows[columns[0]]) if columns else 0):
                yield {c: rows[c][i] for c in columns}


def stream_texts(records: Iterator[dict], text_field: str = "text", where: str = "") -> Iterator[str]:
    """The non-empty texts of ``records`` (field ``text_field``); a record without it is an error."""
    for i, rec in enumerate(records):
        if text_field not in rec:
            raise ValueError(f"{where}record {i} has no field {text_field!r}; fields: {sorted(rec)}")
        text = rec[text_field]
        if isinstance(text, str) and text.strip():
            yield text
