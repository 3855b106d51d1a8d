"""Question answering whose answers are only in the context: the data, the prompts, the scores.

Held-out QA says whether a compressed context still carries the facts a reader needs, which
loss numbers alone do not. Every question here is made mechanically from real text, so it can
be made for any corpus (``make_qa_rows``), and its answer is in the passage and nowhere else:

* ``needle`` (RULER-style): one sentence "The <key> code is <value>." is planted at a random
  sentence boundary of a real passage; the question asks "What is the <key> code?". The key
  (two words of ``KEY_WORDS``) and the value (a 5-7 digit number) are drawn from the seed and
  never occur in the passage, so nothing but the planted sentence gives the answer.
* ``span``: a sentence of the passage whose last words (or a clause's) are a short, distinctive
  span (an identifier, a number or a capitalised name, 1-4 decoder tokens, found once in the
  passage, no word of it in the question) is quoted up to that span: "Complete this sentence
  from the text: <start>"; the answer is the span.

Every question starts with a blank line (in the open-book prompt it parts the question from
the passage, where the compressed prompt has its <Cont> marker) and, by default, one fixed
worked example (``EXAMPLE``) that shows the answer format: a few words on the next line.
SmolLM2-135M-Instruct reading the passage completed 6 of 8 span questions with it, 0 of 8
without; see README "QA on held-out text" for what was tried.

A row is ``{"id", "kind", "context", "question", "answer", "source_id"}``: exactly what
``arc-encoder-train finetune`` trains on (``samples.qa_sample``: the question, then "\n", then
" " + the answer), so training QA (made from the TRAIN split) and evaluation QA (from TEST, with
``exclude_sources`` proving them disjoint) share one format.

``QAEvaluator`` answers every row greedily in three ways, the text after the context always
tokenized as fine-tuning tokenizes it:

* closed-book ``[prefix][question]``: what the decoder guesses without the text;
* open-book ``[prefix][context tokens][question]``: the decoder reading the text itself;
* compressed ``[prefix][compressed context][<Cont>][question]`` per pooling factor;

where the prefix is what the projector's BOS policy puts before fine-tuning rows
(``decoders.decoder_prefix``). ``QAMode.report`` scores exact match after ``normalize_answer`` and
the looser "answer contained in the generation", with 95% Wilson intervals, per kind and
overall, and the decoder prefill positions each mode used.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from .decoders import decoder_prefix
from .storage import PathLike, atomic_write_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .model import ARCModel

QAKind = Literal["needle", "span"]
QA_KINDS: tuple[QAKind, ...] = ("needle", "span")
QA_FIELDS = ("id", "kind", "context", "question", "answer", "source_id")

# Needle keys: two of these words ("The amber falcon code is 4829173."). Plain, concrete words
# that documentation rarely uses together; a key found in the passage is drawn again.
KEY_WORDS = (
    "amber", "anchor", "apple", "arrow", "autumn", "badger", "bamboo", "beacon", "birch", "bison",
    "bronze", "canyon", "cedar", "cobalt", "comet", "copper", "coral", "crimson", "dolphin", "ember",
    "falcon", "fern", "garnet", "glacier", "granite", "harbor", "hazel", "heron", "indigo", "ivory",
    "jade", "juniper", "kestrel", "lagoon", "lantern", "lemon", "lilac", "maple", "marble", "meadow",
    "mango", "nectar", "nickel", "oak", "olive", "onyx", "orchid", "otter", "pebble", "pepper",
    "pine", "plum", "quartz", "raven", "ruby", "saffron", "salmon", "sapphire", "silver", "sparrow",
    "spruce", "tiger", "topaz", "tulip", "velvet", "violet", "walnut", "willow", "zebra", "zinc",
)
# Capitalised words a reader guesses from the question alone (in Python documentation, a
# sentence about a C function "returns ... NULL"): never a span answer.
GUESSABLE_NAMES = frozenset({
    "python", "none", "true", "false", "null", "unicode", "ascii", "utf", "api", "i", "c", "windows",
    "unix", "linux", "posix", "macos", "the", "a", "an", "it", "this", "that", "these", "see", "also",
    "note", "new", "changed", "deprecated", "version",
})
# The worked example before every question (``shots`` = 1): one completion whose short answer
# follows on the next line after a space, as fine-tuning's target does. SmolLM2-135M-Instruct,
# reading the passage, completed 6 of 8 span questions with it and 0 of 8 without (README).
EXAMPLE = "Complete this sentence from the text: The default encoding of source files is\n UTF-8\n"
SPAN_MAX_WORDS = 3
SPAN_MAX_TOKENS = 4
SPAN_MIN_PREFIX_WORDS = 4  # the quoted start must single out its sentence
NEEDLE_DRAWS = 100

# A sentence ends at . ! or ? followed by spaces and a capital letter, or at a line break
# (a paragraph of the corpus). The whitespace between two units is kept, so passages are
# exact substrings of their document.
_BOUNDARY = re.compile(r"(?<=[.!?])[ \t]+(?=[A-Z])|[ \t]*\n\s*")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*(\(\))?$")
_NUMBER = re.compile(r"^\d+(?:[.,]\d+)*$")
_NAME = re.compile(r"^[A-Z][A-Za-z0-9]+$")


# ---------------------------------------------------------------------------- passages
@dataclass(frozen=True)
class Document:
    """A document as units (sentences or lines), the whitespace after each, and each unit's
    decoder-token count (with its whitespace)."""

    source_id: str
    units: tuple[str, ...]
    separators: tuple[str, ...]
    counts: tuple[int, ...]

    def text(self, lo: int, hi: int) -> str:
        """Units [lo, hi) joined as the document has them (no whitespace after the last)."""
        return "".join(u + s for u, s in zip(self.units[lo:hi], self.separators[lo : hi - 1] + ("",)))


@dataclass(frozen=True)
class Passage:
    """Consecutive whole units [lo, hi) of one document, at most ``context_tokens`` decoder tokens."""

    doc: Document
    lo: int
    hi: int

    @property
    def source_id(self) -> str:
        return self.doc.source_id

    @property
    def units(self) -> tuple[str, ...]:
        return self.doc.units[self.lo : self.hi]

    @property
    def text(self) -> str:
        return self.doc.text(self.lo, self.hi)


def split_units(text: str) -> tuple[list[str], list[str]]:
    """A document's sentences and lines, and the whitespace after each ("" after the last)."""
    text = text.strip()
    units, seps, start = [], [], 0
    for m in _BOUNDARY.finditer(text):
        if m.start() > start:
            units.append(text[start : m.start()])
            seps.append(m.group())
        start = m.end()
    if start < len(text):
        units.append(text[start:])
        seps.append("")
    if seps:
        seps[-1] = ""
    return units, seps


def read_document(source_id: str, text: str, tokenizer: PreTrainedTokenizerBase) -> Document:
    units, seps = split_units(text)
    counts = tokenizer([u + s for u, s in zip(units, seps)], add_special_tokens=False)["input_ids"] if units else []
    return Document(source_id, tuple(units), tuple(seps), tuple(len(c) for c in counts))


def _fits(doc: Document, lo: int, hi: int, tokenizer: PreTrainedTokenizerBase, context_tokens: int) -> bool:
    return len(tokenizer(doc.text(lo, hi), add_special_tokens=False)["input_ids"]) <= context_tokens


def cut_passages(doc: Document, tokenizer: PreTrainedTokenizerBase, context_tokens: int,
                 min_tokens: int | None = None) -> list[Passage]:
    """Cut a document into consecutive passages of whole units, each at most ``context_tokens``
    decoder tokens and at least ``min_tokens`` (default: half of it; a short tail is dropped).

    Unit counts add up to about a passage's count; the passage's own tokenization decides (its
    last units are dropped until it fits). A unit longer than ``context_tokens`` is skipped.
    """
    min_tokens = context_tokens // 2 if min_tokens is None else min_tokens
    out: list[Passage] = []

    def flush(lo: int, hi: int) -> None:
        while hi > lo and not _fits(doc, lo, hi, tokenizer, context_tokens):
            hi -= 1
        if hi > lo and sum(doc.counts[lo:hi]) >= min_tokens:
            out.append(Passage(doc, lo, hi))

    lo, total = 0, 0
    for i, n in enumerate(doc.counts):
        if n > context_tokens:
            flush(lo, i)
            lo, total = i + 1, 0
            continue
        if total + n > context_tokens:
            flush(lo, i)
            lo, total = i, 0
        total += n
    flush(lo, len(doc.counts))
    return out


def window_around(doc: Document, unit: int, rng: random.Random, tokenizer: PreTrainedTokenizerBase,
                  context_tokens: int, used: Sequence[tuple[int, int]] = (),
                  min_tokens: int | None = None) -> Passage | None:
    """A passage of whole units around unit ``unit``, grown one unit at a time on a random side
    (so the unit lands anywhere in it) up to ``context_tokens`` decoder tokens, never into the
    unit ranges ``used``; None when it stays under ``min_tokens`` (default: half)."""
    min_tokens = context_tokens // 2 if min_tokens is None else min_tokens
    if doc.counts[unit] > context_tokens or any(a <= unit < b for a, b in used):
        return None
    lo, hi, total = unit, unit + 1, doc.counts[unit]
    blocked = {i for a, b in used for i in range(a, b)}
    sides = ["left", "right"]
    while sides:
        side = rng.choice(sides)
        nxt = lo - 1 if side == "left" else hi
        if nxt < 0 or nxt >= len(doc.counts) or nxt in blocked or total + doc.counts[nxt] > context_tokens:
            sides.remove(side)
            continue
        lo, hi = (nxt, hi) if side == "left" else (lo, nxt + 1)
        total += doc.counts[nxt]
    while not _fits(doc, lo, hi, tokenizer, context_tokens):  # drop the unit farthest from ``unit``
        if hi - 1 - unit >= unit - lo and hi - 1 > unit:
            hi -= 1
        elif lo < unit:
            lo += 1
        else:
            return None
    return Passage(doc, lo, hi) if sum(doc.counts[lo:hi]) >= min_tokens else None


# ---------------------------------------------------------------------------- questions
def with_example(question: str, shots: int) -> str:
    """The question as a row stores it: a blank line first (in the open-book prompt it parts the
    question from the passage, as the <Cont> marker does in the compressed one), then with
    ``shots`` = 1 the fixed worked example ``EXAMPLE``. Fine-tuning trains the same text."""
    return "\n\n" + (EXAMPLE if shots else "") + question


def needle_row(p: Passage, rng: random.Random, shots: int = 1) -> dict | None:
    """Plant "The <key> code is <value>." at a random unit boundary of ``p`` (None when no key and
    value absent from the passage were drawn)."""
    text = p.text
    low = text.casefold()
    for _ in range(NEEDLE_DRAWS):
        key = " ".join(rng.sample(KEY_WORDS, 2))
        digits = rng.randint(5, 7)
        value = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if value not in text and not any(re.search(rf"\b{w}\b", low) for w in key.split()):
            break
    else:
        return None
    units, seps = list(p.units), list(p.doc.separators[p.lo : p.hi - 1]) + [""]
    at = rng.randint(0, len(units))  # before unit ``at`` (len(units): after the last)
    units.insert(at, f"The {key} code is {value}.")
    seps.insert(at, " ")
    if at == len(units) - 1:  # after the last unit: a space before the needle, nothing after it
        seps[-2], seps[-1] = " ", ""
    context = "".join(u + s for u, s in zip(units, seps))
    return {"context": context, "question": with_example(f"What is the {key} code?", shots), "answer": value}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9_]+", text.casefold()))


def _distinctive(word: str) -> bool:
    if word.casefold() in GUESSABLE_NAMES:
        return False
    if _NUMBER.match(word) or _NAME.match(word):
        return True
    return bool(_IDENTIFIER.match(word)) and (any(c in word for c in "_.(") or any(c.isdigit() for c in word)
                                               or any(c.isupper() for c in word[1:]))


def sentence_spans(sentence: str, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, str]]:
    """(start, span) pairs of one sentence: ``span`` ends the sentence or one of its clauses
    (followed by its final . ! ? or by , ; :), is 1-``SPAN_MAX_WORDS`` distinctive words
    (identifiers, numbers, capitalised names, none of ``GUESSABLE_NAMES``) and 1-``SPAN_MAX_TOKENS``
    decoder tokens as the answer is tokenized (after a space), and shares no word with ``start``,
    the sentence up to it (``SPAN_MIN_PREFIX_WORDS`` words or more, not ending in a list comma)."""
    if len(sentence) < 2 or sentence[-1] not in ".!?":
        return []
    words = sentence[:-1].split(" ")
    out = []
    for j in range(SPAN_MIN_PREFIX_WORDS, len(words)):
        last = words[j]
        core = last[:-1] if j < len(words) - 1 and last[-1:] in ",;:" else last if j == len(words) - 1 else ""
        if not core or not _distinctive(core):
            continue
        k = 1  # extend back over distinctive words with no punctuation between
        while k < SPAN_MAX_WORDS and j - k >= SPAN_MIN_PREFIX_WORDS and _distinctive(words[j - k]):
            k += 1
        span = " ".join(words[j - k + 1 : j] + [core])
        start = " ".join(words[: j - k + 1])
        if start[-1:] in ",;:(" or _words(span) & _words(start):
            continue
        if 1 <= len(tokenizer(" " + span, add_special_tokens=False)["input_ids"]) <= SPAN_MAX_TOKENS:
            out.append((start, span))
    return out


def span_row(p: Passage, start: str, span: str, shots: int = 1) -> dict | None:
    """The row asking for ``span`` after ``start``, or None unless both occur once in ``p``
    (case-insensitive): the question then singles out one sentence, and its answer one place."""
    low = p.text.casefold()
    if low.count(span.casefold()) != 1 or low.count(start.casefold()) != 1:
        return None
    question = with_example(f"Complete this sentence from the text: {start}", shots)
    return {"context": p.text, "question": question, "answer": span}


def make_qa_rows(
    ids: Sequence, texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, kinds: Sequence[QAKind] = QA_KINDS,
    per_kind: int = 50, context_tokens: int = 256, seed: int = 0, exclude_sources: Iterable[str] = (),
    shots: int = 1, where: str = "corpus",
) -> list[dict]:
    """``per_kind`` QA rows of each kind from documents (``ids``, ``texts``), deterministic in ``seed``.

    needle: the documents are cut into consecutive passages (``cut_passages``), taken in a seeded
    order, one row each. span: every (sentence, span) candidate of every document
    (``sentence_spans``) in a seeded order; each gets a passage around its sentence
    (``window_around``) that overlaps no earlier span row's passage; only when that gives too few
    rows do later candidates get passages that overlap earlier ones (several questions on one text,
    as in SQuAD), never on a sentence already asked about. A row's own draws are seeded by (seed, kind, document, place): the same inputs give
    the same bytes. Rows are interleaved kind by kind, so any prefix of the file (``--max-rows``)
    is balanced. Documents whose id is in ``exclude_sources`` are skipped; too little text is an
    error naming what was found.
    """
    if per_kind < 1:
        raise ValueError(f"per_kind must be >= 1, got {per_kind}")
    if context_tokens < 16:
        raise ValueError(f"context_tokens must be >= 16, got {context_tokens}")
    if shots not in (0, 1):
        raise ValueError(f"shots must be 0 or 1, got {shots}")
    for kind in kinds:
        if kind not in QA_KINDS:
            raise ValueError(f"QA kind {kind!r} is not one of {', '.join(QA_KINDS)}")
    if len(set(kinds)) != len(kinds) or not kinds:
        raise ValueError(f"QA kinds must be distinct and at least one, got {list(kinds)}")
    excluded = {str(s) for s in exclude_sources}
    docs, skipped = [], 0
    for doc_id, text in zip(ids, texts):
        if str(doc_id) in excluded:
            skipped += 1
        elif isinstance(text, str) and text.strip():
            docs.append(read_document(str(doc_id), text, tokenizer))
    per: dict[str, list[dict]] = {}
    for kind in kinds:
        rows: list[dict] = []
        if kind == "needle":
            pool = [p for d in docs for p in cut_passages(d, tokenizer, context_tokens)]
            random.Random(f"arc-qa-{seed}-needle-order").shuffle(pool)
            for p in pool:
                row = needle_row(p, random.Random(f"arc-qa-{seed}-needle-{p.source_id}-{p.lo}"), shots)
                if row is not None:
                    rows.append({"id": f"needle-{len(rows):05d}", "kind": kind, **row, "source_id": p.source_id})
                    if len(rows) == per_kind:
                        break
            found = f"{len(pool)} passages"
        else:
            cands = [(d, i, start, span) for d in docs for i, u in enumerate(d.units)
                     for start, span in sentence_spans(u, tokenizer)]
            random.Random(f"arc-qa-{seed}-span-order").shuffle(cands)
            used: dict[str, list[tuple[int, int]]] = {}
            asked: set[tuple[str, int]] = set()
            for overlap in (False, True):  # disjoint passages first; overlapping ones only when short
                for d, i, start, span in cands:
                    if len(rows) == per_kind or (d.source_id, i) in asked:
                        continue
                    taken = used.setdefault(d.source_id, [])
                    rng = random.Random(f"arc-qa-{seed}-span-{d.source_id}-{i}-{len(start)}-{overlap}")
                    p = window_around(d, i, rng, tokenizer, context_tokens, () if overlap else taken)
                    row = None if p is None else span_row(p, start, span, shots)
                    if row is not None:
                        taken.append((p.lo, p.hi))
                        asked.add((d.source_id, i))
                        rows.append({"id": f"span-{len(rows):05d}", "kind": kind, **row, "source_id": p.source_id})
            found = f"{len(cands)} candidate sentences"
        if len(rows) < per_kind:
            extra = f"; {skipped} documents excluded" if skipped else ""
            raise ValueError(f"{where}: only {len(rows)} {kind} rows of {context_tokens // 2}-{context_tokens} "
                             f"tokens ({found}{extra}), {per_kind} asked: give more text or lower --per-kind")
        per[kind] = rows
    return [per[k][i] for i in range(per_kind) for k in kinds]


def qa_jsonl(rows: Sequence[dict]) -> str:
    """One JSON object per line, fields in ``QA_FIELDS`` order (UTF-8, the same bytes every time)."""
    return "".join(json.dumps({k: r[k] for k in QA_FIELDS}, ensure_ascii=False) + "\n" for r in rows)


def write_qa_rows(path: PathLike, rows: Sequence[dict]) -> None:
    atomic_write_text(path, qa_jsonl(rows))


def read_qa_rows(path: PathLike, need: Sequence[str] = ("context", "question", "answer")) -> list[dict]:
    """QA rows of a JSONL file; every row must have the ``need`` fields as non-empty strings
    (errors name the file and line). Rows without ``id`` / ``kind`` get the line number / "qa"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file {path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as err:
            raise ValueError(f"QA file {path}: not UTF-8 text ({err})") from err
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"QA file {path}, line {n}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"QA file {path}, line {n}: a JSON object is needed, got {type(row).__name__}")
        for key in need:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"QA file {path}, line {n}: field {key!r} must be a non-empty string")
        row.setdefault("id", str(n))
        row.setdefault("kind", "qa")
        rows.append(row)
    if not rows:
        raise ValueError(f"QA file {path}: no rows")
    return rows


# ---------------------------------------------------------------------------- scoring
_EDGE_QUOTES = "\"'`“”‘’"
_TRAILING = ".,;:!?" + _EDGE_QUOTES


def normalize_answer(text: str) -> str:
    """What exact match compares: surrounding whitespace and quotes dropped, trailing
    punctuation (. , ; : ! ?) and quotes dropped, runs of whitespace made one space, case folded.
    So "Structures." and "structures" match, while "repr()" keeps its parentheses and "3.8"
    its inner dot."""
    text = " ".join(text.split())
    text = text.strip(_EDGE_QUOTES + " ")
    text = text.rstrip(_TRAILING + " ").lstrip(_EDGE_QUOTES + " ")
    return text.casefold()


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def answer_contained(prediction: str, answer: str) -> bool:
    """The normalised answer occurs in the normalised prediction as whole words ("4829173" is
    not found in "48291730"); looser than exact match, for readers that answer in a sentence."""
    ans = normalize_answer(answer)
    if not ans:
        return False
    return re.search(rf"(?<![\w]){re.escape(ans)}(?![\w])", normalize_answer(prediction)) is not None


def first_line(generated: str) -> str:
    """The answer in a generation: leading whitespace dropped, then cut at the first newline
    (greedy decoding stops at EOS; a newline ends the answer line, as fine-tuning's answers do)."""
    return generated.lstrip().split("\n", 1)[0].strip()


WILSON_Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = WILSON_Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default): honest at 0 / n and n / n,
    where the normal approximation collapses to a point. (0.0, 1.0) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} not in [0, {n}]")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 / n and n / n the bounds are exactly 0 and 1 (the formula gives them up to rounding).
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def score_rows(rows: Sequence[dict], answers: Sequence[str], positions: Sequence[int]) -> dict:
    """EM and containment with Wilson intervals, and mean prefill positions, over ``rows``."""
    n = len(rows)
    em = sum(exact_match(a, r["answer"]) for r, a in zip(rows, answers))
    hit = sum(answer_contained(a, r["answer"]) for r, a in zip(rows, answers))
    return {
        "count": n,
        "exact_match": em / n if n else float("nan"),
        "exact_match_ci95": list(wilson_interval(em, n)),
        "contains": hit / n if n else float("nan"),
        "contains_ci95": list(wilson_interval(hit, n)),
        "prefill_positions_mean": sum(positions) / n if n else float("nan"),
    }


# ---------------------------------------------------------------------------- answering
@dataclass
class QAMode:
    """One way of giving the decoder the context: its answers and prefill positions per row."""

    name: str  # "closed_book", "open_book", "compressed_x4", ...
    context: Literal["none", "text", "compressed"]
    pooling_factor: int | None
    answers: list[str]
    generations: list[str]
    positions: list[int]

    def report(self, rows: Sequence[dict]) -> dict:
        kinds = sorted({r["kind"] for r in rows})
        by_kind = {}
        for kind in kinds:
            pick = [i for i, r in enumerate(rows) if r["kind"] == kind]
            by_kind[kind] = score_rows([rows[i] for i in pick], [self.answers[i] for i in pick],
                                       [self.positions[i] for i in pick])
        return {"mode": self.name, "context": self.context, "pooling_factor": self.pooling_factor,
                "overall": score_rows(rows, self.answers, self.positions), "by_kind": by_kind}


def qa_prompt(question: str) -> str:
    """The text after the context: the question and a newline, as ``samples.qa_sample`` trains it."""
    return question.rstrip() + "\n"


class QAEvaluator:
    """Greedy answers of one frozen decoder to QA rows, closed-book, open-book and compressed.

    ``autocast_dtype``: run under autocast (bf16 on a GPU, as ``eval info`` does); None: as loaded.
    """

    def __init__(self, model: ARCModel, decoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 decoder_name: str, max_new_tokens: int = 16, batch_size: int = 16,
                 autocast_dtype: torch.dtype | None = None) -> None:
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        self.model, self.decoder, self.tokenizer, self.name = model, decoder, tokenizer, decoder_name
        self.max_new_tokens, self.batch_size, self.autocast_dtype = max_new_tokens, batch_size, autocast_dtype
        model.check_decoder(decoder_name, decoder)
        policy = model.projector(decoder_name).config.bos
        self.prefix = decoder_prefix(policy, tokenizer.bos_token_id, "qa")
        pad = tokenizer.pad_token_id
        self.pad = tokenizer.eos_token_id if pad is None else pad

    def _autocast(self):
        device = next(self.decoder.parameters()).device
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    def prompt_ids(self, rows: Sequence[dict]) -> list[list[int]]:
        return self.tokenizer([qa_prompt(r["question"]) for r in rows], add_special_tokens=False)["input_ids"]

    def text_inputs(self, rows: Sequence[dict], with_context: bool) -> tuple[list[list[int]], list[list[int]]]:
        """(prefix ids, prompt ids) per row for the text modes: the context's decoder tokens go
        after the BOS prefix, tokenized on their own as fine-tuning's ``context_ids`` are."""
        prompts = self.prompt_ids(rows)
        if not with_context:
            return [list(self.prefix) for _ in rows], prompts
        ctx = self.tokenizer([r["context"] for r in rows], add_special_tokens=False)["input_ids"]
        return [list(self.prefix) + c for c in ctx], prompts

    def _generate_text(self, prefixes: list[list[int]], prompts: list[list[int]]) -> list[str]:
        from .decoders import stop_token_ids
        from .layout import CompressedContext

        weight = self.decoder.get_input_embeddings().weight
        empty = CompressedContext(weight.new_zeros(len(prompts), 0, weight.shape[1]),
                                  torch.zeros(len(prompts), dtype=torch.long), self.name)
        inputs = self.model.build_decoder_inputs(self.decoder.get_input_embeddings(), empty, prompts, None, None,
                                                 prefixes, "left")
        out = self.decoder.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                    max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.pad,
                                    eos_token_id=stop_token_ids(self.tokenizer))
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    @torch.no_grad()
    def run_mode(self, rows: Sequence[dict], context: Literal["none", "text", "compressed"],
                 pooling_factor: int | None = None, on_batch: Callable[[], object] | None = None) -> QAMode:
        """Greedy answers to ``rows`` with no context ("none"), the text ("text") or the compressed
        context at ``pooling_factor`` ("compressed"), ``batch_size`` rows per generate call
        (``on_batch`` is called after each: progress)."""
        name = {"none": "closed_book", "text": "open_book"}.get(context, f"compressed_x{pooling_factor}")
        generations, positions = [], []
        marker = int("continuation" in self.model.projector(self.name).config.special_tokens)
        for lo in range(0, len(rows), self.batch_size):
            part = rows[lo : lo + self.batch_size]
            with self._autocast():
                if context == "compressed":
                    ctx = self.model.compress([r["context"] for r in part], self.name, pooling_factor)
                    prompts = [qa_prompt(r["question"]) for r in part]
                    generations += self.model.generate(self.decoder, self.tokenizer, self.name, ctx, prompts,
                                                       max_new_tokens=self.max_new_tokens, do_sample=False)
                    positions += [len(self.prefix) + n + marker + len(q)
                                  for n, q in zip(ctx.lengths.tolist(), self.prompt_ids(part))]
                else:
                    prefixes, prompts = self.text_inputs(part, context == "text")
                    generations += self._generate_text(prefixes, prompts)
                    positions += [len(p) + len(q) for p, q in zip(prefixes, prompts)]
            if on_batch is not None:
                on_batch()
        return QAMode(name, context, pooling_factor, [first_line(g) for g in generations], generations, positions)

    def evaluate(self, rows: Sequence[dict], pooling_factors: Sequence[int],
                 on_batch: Callable[[], object] | None = None) -> list[QAMode]:
        """Closed-book, open-book, then compressed at each of ``pooling_factors``."""
        modes = [self.run_mode(rows, "none", on_batch=on_batch), self.run_mode(rows, "text", on_batch=on_batch)]
        return modes + [self.run_mode(rows, "compressed", pf, on_batch) for pf in pooling_factors]


def format_qa_table(reports: Sequence[dict]) -> str:
    """One line per mode and kind: EM with its 95% interval, containment, prefill positions."""
    head = f"{'mode':<16}{'kind':<9}{'n':>5}{'EM':>7}{'95% CI':>15}{'contains':>10}{'positions':>11}"
    lines = [head]
    for rep in reports:
        parts = [("all", rep["overall"])] + sorted(rep["by_kind"].items()) if len(rep["by_kind"]) > 1 else \
            [(next(iter(rep["by_kind"])), rep["overall"])]
        for kind, s in parts:
            lo, hi = s["exact_match_ci95"]
            lines.append(f"{rep['mode']:<16}{kind:<9}{s['count']:>5}{s['exact_match']:>7.3f}"
                         f"{f'[{lo:.2f}, {hi:.2f}]':>15}{s['contains']:>10.3f}{s['prefill_positions_mean']:>11.1f}")
    return "\n".join(lines)
