"""Write the small example files README's commands use, from the bundled pydoc_small corpus.

    python benchmarks/make_examples.py            # -> arc_encoder/resources/examples/

Standard library only and deterministic (the same bytes on every run):

* ``docs.jsonl``: a RAG corpus for ``arc-encoder cache build``: passages of at most
  ``--passage-chars`` characters, cut at paragraph boundaries, of the held-out documents of a
  few sources (Python tutorial on errors, exceptions, shutil, ...); fields ``id``, ``text``.
* ``corpus.jsonl.gz``: held-out text for ``arc-encoder eval info``: the first
  ``--corpus-docs`` documents of the test split, whole; fields ``id``, ``text``.
* ``qa_train.jsonl`` / ``qa_validation.jsonl``: fine-tuning records ``{context, question,
  answer}`` made mechanically (cloze): the context is a passage of the train (validation)
  split, the question quotes the first part of one of its sentences and the answer is the
  rest of that sentence. The answer is always in the context, so a model that reads the
  compressed context can answer; no question was written by hand.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "arc_encoder" / "resources" / "pydoc_small"
OUT = ROOT / "arc_encoder" / "resources" / "examples"
# Held-out sources (validation / test splits) on topics a user may ask about.
DOC_SOURCES = ("tutorial/errors.rst.txt", "library/exceptions.rst.txt", "tutorial/stdlib.rst.txt",
               "library/shutil.rst.txt", "library/shelve.rst.txt", "library/intro.rst.txt",
               "library/zipimport.rst.txt", "library/signal.rst.txt")
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def read_split(split: str) -> list[dict]:
    with gzip.open(CORPUS / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def passages(text: str, max_chars: int) -> list[str]:
    """Consecutive paragraphs grouped up to ``max_chars`` (a longer paragraph stands alone)."""
    out, cur = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if cur and len(cur) + 2 + len(para) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


def short_id(doc_id: str) -> str:
    """'tutorial/errors.rst.txt#0' -> 'tutorial/errors#0'."""
    return doc_id.replace(".rst.txt", "")


def cloze(context: str, key: str) -> dict | None:
    """A question quoting the first part of one sentence of ``context``; the answer is its rest.

    The sentence is chosen by a hash of ``key`` among those of 10-30 words (None if none)."""
    sentences = [s.strip() for s in SENTENCE.split(context.replace("\n\n", " "))]
    good = [s for s in sentences if 10 <= len(s.split()) <= 30 and s.endswith(".") and '"' not in s]
    if not good:
        return None
    sentence = good[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(good)]
    words = sentence.split()
    cut = max(4, round(len(words) * 0.6))
    return {"context": context,
            "question": f'Complete the sentence from the text: "{" ".join(words[:cut])} ..."',
            "answer": " ".join(words[cut:])}


def qa_records(split: str, max_records: int, max_chars: int) -> list[dict]:
    records = []
    for doc in sorted(read_split(split), key=lambda d: d["id"]):
        for k, text in enumerate(passages(doc["text"], max_chars)):
            rec = cloze(text, f"{doc['id']}.{k}")
            if rec is not None and len(text) >= 200:
                records.append(rec)
                break  # one record per document: many sources
        if len(records) == max_records:
            break
    return records


def write_jsonl(path: Path, rows: list[dict], compress: bool = False) -> int:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if compress:
        data = gzip.compress(data, mtime=0)  # mtime 0: the same bytes on every run
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--passage-chars", type=int, default=700)
    p.add_argument("--corpus-docs", type=int, default=6)
    p.add_argument("--qa-train", type=int, default=48)
    p.add_argument("--qa-validation", type=int, default=12)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    held_out = read_split("validation") + read_split("test")
    docs = [{"id": f"{short_id(d['id'])}.{k}", "text": text}
            for d in sorted(held_out, key=lambda d: d["id"]) if d["source"] in DOC_SOURCES
            for k, text in enumerate(passages(d["text"], args.passage_chars))]
    test = sorted(read_split("test"), key=lambda d: d["id"])[: args.corpus_docs]
    files = {
        "docs.jsonl": (docs, False),
        "corpus.jsonl.gz": ([{"id": short_id(d["id"]), "text": d["text"]} for d in test], True),
        "qa_train.jsonl": (qa_records("train", args.qa_train, args.passage_chars), False),
        "qa_validation.jsonl": (qa_records("validation", args.qa_validation, args.passage_chars), False),
    }
    for name, (rows, compress) in files.items():
        size = write_jsonl(args.out / name, rows, compress)
        print(f"wrote {args.out / name}: {len(rows)} records, {size:,} bytes")


if __name__ == "__main__":
    main()
