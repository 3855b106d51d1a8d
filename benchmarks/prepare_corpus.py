#!/usr/bin/env python3
"""Turn the Python documentation sources into a small, real-English text corpus.

Why this exists
---------------
``arc-encoder`` needs *real* prose (not synthetic or random tokens) to train
and evaluate context compression, but the CPU quickstart, the tests and the
offline GPU machine cannot download datasets from the internet.  The Debian
package ``python3.11-doc`` ships the reStructuredText sources of the Python
documentation (``html/_sources/**/*.rst.txt``, ~500 files, ~11 MB, PSF
license), which is a freely redistributable, reasonably large body of
technical English.  This script (standard library only) converts those
sources into plain-prose documents:

* reStructuredText markup is removed: directives such as ``.. index::``,
  ``.. toctree::`` and ``.. code-block::`` are dropped together with their
  bodies; literal blocks (``::``), doctest blocks, tables, section titles,
  comments, link targets and paragraphs that are mostly markup or code are
  dropped; admonitions and API description directives (``.. note::``,
  ``.. function::`` ...) keep their prose body; inline roles such as
  ``:func:`len``` and ``:ref:`text <target>``` are unwrapped to their text.
* Consecutive paragraphs of one source file are joined (blank-line
  separated) into documents of roughly ``--min-chars`` .. ``--max-chars``
  characters.
* Source *files* are assigned to train / validation / test by a hash of their
  relative path, so held-out text never shares a file with training text.

Output (``--out``): ``train.jsonl.gz``, ``validation.jsonl.gz``,
``test.jsonl.gz`` (one JSON object per line with fields ``id``, ``text``,
``source``) and ``PROVENANCE.json``.  Gzip files are written with a zero
mtime and no embedded file name, so re-running the same command yields
byte-identical output.

Example::

    cd /tmp && apt-get download python3.11-doc
    dpkg -x python3.11-doc_*.deb /tmp/pydoc
    python3 benchmarks/prepare_corpus.py \\
        --src /tmp/pydoc/usr/share/doc/python3.11/html/_sources \\
        --deb /tmp/python3.11-doc_*.deb --out .data/pydoc_full
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

SPLITS = ("train", "validation", "test")

# Directives whose body is prose worth keeping (the directive line itself is
# dropped or turned into a short prose prefix).
KEEP_BODY_DIRECTIVES = {
    # admonitions
    "note", "warning", "tip", "important", "attention", "caution", "danger",
    "error", "hint", "admonition", "seealso", "impl-detail", "topic",
    "sidebar", "versionadded", "versionchanged", "deprecated",
    "deprecated-removed", "only", "ifconfig", "container", "glossary",
    # API descriptions: the body describes the object in prose
    "function", "method", "class", "attribute", "data", "exception",
    "describe", "decorator", "decoratormethod", "classmethod", "staticmethod",
    "abstractmethod", "coroutinefunction", "coroutinemethod", "property",
    "module", "currentmodule", "c:function", "c:macro", "c:type", "c:member",
    "c:var", "c:struct", "c:enum", "c:enumerator", "c:union", "cmdoption",
    "option", "envvar", "opcode", "pdbcommand", "2to3fixer", "program",
    "index-entry", "term", "awaitablefunction", "awaitablemethod",
    "availability",
}
ADMONITIONS = {"note", "warning", "tip", "important", "attention", "caution", "danger",
               "error", "hint", "seealso", "impl-detail", "only", "ifconfig", "container",
               "topic", "sidebar", "admonition", "glossary", "availability"}
VERSION_PREFIX = {
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
    "deprecated-removed": "Deprecated since version {}:",
}

_DIRECTIVE_RE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::\s?(.*)$")
_EXPLICIT_RE = re.compile(r"^(\s*)\.\.(\s|$)")
_OPTION_RE = re.compile(r"^\s*:[\w -]+:(\s|$)")
_FIELD_RE = re.compile(r"^\s*:[^:`\s][^:`]*:(\s+|$)")
_ADORN_RE = re.compile(r"""^([=\-~*^"'`#+:.<>_])\1{2,}\s*$""")
_SIMPLE_TABLE_RE = re.compile(r"^\s*=+(\s+=+)+\s*$")
_GRID_TABLE_RE = re.compile(r"^\s*\+[-=]+\+")
_BULLET_RE = re.compile(r"^(\s*)([-*+\u2022]|#\.|\d+\.|\(?[a-zA-Z0-9]\)|[a-z]\.)\s+")

_ROLE_TARGET_RE = re.compile(r"^(.*?)\s*<[^<>]+>$", re.S)
_LITERAL_RE = re.compile(r"``(.+?)``")
_LINK_RE = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")
_REF_RE = re.compile(r"`([^`]+)`__?")
_FOOTREF_RE = re.compile(r"\s*\[(#\w*|\*|\d+)\]_")
_STRONG_RE = re.compile(r"\*\*([^\s*](?:[^*]*?[^\s*])?)\*\*")
_EMPH_RE = re.compile(r"(?<![\w*])\*([^\s*](?:[^*]*?[^\s*])?)\*(?![\w*])")
_NAMEREF_RE = re.compile(r"(?<=[A-Za-z0-9])_(?![\w])")
_SUBST_RE = re.compile(r"\|(\w[\w -]*)\|_?")


# label -> section title, filled by collect_labels() so that
# :ref:`label` renders as the title like Sphinx does.
REF_TITLES: dict[str, str] = {}
_LABEL_RE = re.compile(r"^\.\. _([^:`]+):\s*$")
_ROLE_NAME_RE = re.compile(r":([\w:.+-]+):`([^`]+)`")
_CALLABLE_ROLES = {"func", "meth", "py:func", "py:meth", "c:func"}
_PREFIX_ROLES = {"pep": "PEP ", "rfc": "RFC ", "issue": "bpo-", "gh": "gh-"}


def collect_labels(text: str) -> None:
    """Record ``.. _label:`` targets that directly precede a section title."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _LABEL_RE.match(line)
        if not m:
            continue
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _LABEL_RE.match(lines[j])):
            j += 1
        if j < len(lines) and _ADORN_RE.match(lines[j].strip()):
            j += 1  # overline
        if j + 1 < len(lines) and lines[j].strip() and _ADORN_RE.match(lines[j + 1].strip()):
            REF_TITLES[m.group(1).strip().lower()] = lines[j].strip()


def _role_text(m: re.Match) -> str:
    role, text = m.group(1).lower(), m.group(2)
    tm = _ROLE_TARGET_RE.match(text)
    explicit = bool(tm and tm.group(1))
    if explicit:
        text = tm.group(1)
    elif role == "ref" and text.lower() in REF_TITLES:
        text = REF_TITLES[text.lower()]
        text = _ROLE_NAME_RE.sub(_role_text, text)
    text = text.lstrip("!")
    if text.startswith("~"):
        text = text[1:].split(".")[-1]
    if role in _PREFIX_ROLES and not explicit:
        text = _PREFIX_ROLES[role] + text
    if role in _CALLABLE_ROLES and not explicit and not text.endswith(")"):
        text += "()"
    return text


def clean_inline(text: str) -> str:
    """Unwrap inline reStructuredText markup and collapse whitespace."""
    text = _ROLE_NAME_RE.sub(_role_text, text)
    text = _LITERAL_RE.sub(r"\1", text)
    text = _LINK_RE.sub(r"\1", text)
    text = _REF_RE.sub(r"\1", text)
    text = _FOOTREF_RE.sub("", text)
    text = _NAMEREF_RE.sub("", text)
    text = _STRONG_RE.sub(r"\1", text)
    text = _EMPH_RE.sub(r"\1", text)
    text = _SUBST_RE.sub(r"\1", text)
    text = text.replace("\\ ", "").replace("\\", "")
    return re.sub(r"\s+", " ", text).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_end(lines: list[str], start: int, base: int) -> int:
    """Index of the first line after ``start`` that is non-blank and indented <= base."""
    j = start
    while j < len(lines):
        if lines[j].strip() and _indent(lines[j]) <= base:
            break
        j += 1
    return j


def rst_to_paragraphs(src: str) -> list[str]:
    """Convert one reStructuredText document into a list of raw paragraphs.

    Paragraph text still carries inline markup; structure-level markup is
    removed here.  Returned paragraphs are cleaned by :func:`clean_inline`.
    """
    lines = src.expandtabs(8).splitlines()
    out: list[str] = []
    cur: list[str] = []
    cur_ind = 0           # indentation of the current paragraph's first line
    cur_item = False      # current paragraph is a list item / field
    literal_base = None   # indent of a paragraph that ended with "::"

    def flush() -> None:
        nonlocal cur, literal_base
        if not cur:
            return
        para = " ".join(s.strip() for s in cur)
        cur = []
        if para.endswith("::"):
            literal_base = cur_ind
            if para == "::":
                para = ""
            elif para.endswith(" ::"):
                para = para[:-3].rstrip()   # "text ::" renders as "text"
            else:
                para = para[:-1]            # "text::" renders as "text:"
        if para:
            out.append(para)

    def start(line: str, ind: int, item: bool) -> None:
        nonlocal cur_ind, cur_item
        cur.append(line)
        cur_ind, cur_item = ind, item

    i = 0
    n = len(lines)
    while i < n:
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            flush()
            i += 1
            continue
        ind = _indent(line)

        if not cur and literal_base is not None:
            base, literal_base = literal_base, None
            if ind > base:  # literal block after "::": drop it
                i = _block_end(lines, i, base)
                continue

        if not cur:
            # Explicit markup: directives, comments, targets, footnotes, substitutions.
            if _EXPLICIT_RE.match(line):
                end = _block_end(lines, i + 1, ind)
                dm = _DIRECTIVE_RE.match(line)
                name = dm.group(2).lower() if dm else ""
                if name in KEEP_BODY_DIRECTIVES:
                    out.extend(_directive_body(name, dm.group(3).strip(), lines[i + 1:end]))
                # everything else (index, code-block, toctree, comments, targets,
                # footnotes, tables, images, ...) is dropped with its body
                i = end
                continue
            # Tables.
            if _SIMPLE_TABLE_RE.match(line):
                j = i + 1
                while j < n:
                    if _SIMPLE_TABLE_RE.match(lines[j]) and (j + 1 >= n or not lines[j + 1].strip()):
                        j += 1
                        break
                    j += 1
                i = j
                continue
            if _GRID_TABLE_RE.match(line):
                while i < n and lines[i].strip():
                    i += 1
                continue
            # Doctest blocks run until the next blank line.
            if stripped.startswith(">>>"):
                while i < n and lines[i].strip():
                    i += 1
                continue
            # Section titles: "Title" + underline (an overline is skipped below).
            if i + 1 < n and _ADORN_RE.match(lines[i + 1].strip()) and \
                    len(lines[i + 1].strip()) >= max(3, len(stripped) - 2) and \
                    not _ADORN_RE.match(stripped):
                i += 2
                continue
        if _ADORN_RE.match(stripped):
            # overline / stray adornment; a one-line paragraph above it was a title
            if len(cur) == 1:
                cur.clear()
            flush()
            i += 1
            continue

        # Bullet / enumerated list items and field-list fields start a new paragraph.
        bm = _BULLET_RE.match(line) or _FIELD_RE.match(line)
        if bm and (not cur or (cur_item and ind <= cur_ind)):
            flush()
            rest = line[bm.end():]
            if rest.strip():
                start(" " * ind + rest, ind, True)
            else:
                cur_ind, cur_item = ind, True
            i += 1
            continue

        if cur:
            # Continuation lines of a list item are indented more than the
            # bullet; otherwise a change of indentation starts a new paragraph
            # (definition lists, field bodies, block quotes).
            same = ind > cur_ind if cur_item else ind == cur_ind
            if not same:
                flush()
                continue
            cur.append(line)
        else:
            start(line, ind, False)
        i += 1
    flush()
    return out


def _directive_body(name: str, arg: str, body: list[str]) -> list[str]:
    """Paragraphs of a kept directive's body (options / signature lines dropped)."""
    k = 0
    if name not in VERSION_PREFIX and name not in ADMONITIONS:
        # API directives: continuation signature lines and options come first,
        # the description starts after the first blank line.
        while k < len(body) and body[k].strip():
            k += 1
    while k < len(body) and (not body[k].strip() or _OPTION_RE.match(body[k])):
        k += 1
    paras = rst_to_paragraphs(textwrap.dedent("\n".join(body[k:])))
    prefix = ""
    if name in VERSION_PREFIX and arg:
        parts = arg.split(None, 1)
        prefix = VERSION_PREFIX[name].format(parts[0])
        if len(parts) > 1:
            prefix += " " + parts[1]
    elif name in ADMONITIONS and arg:
        prefix = arg  # ".. note:: text on the directive line"
    if prefix:
        if paras and name in VERSION_PREFIX:
            paras[0] = prefix + " " + paras[0]
        else:
            paras.insert(0, prefix)
    return paras


_WORD_RE = re.compile(r"[A-Za-z]{2,}")


def is_prose(para: str, min_len: int = 40) -> bool:
    """Heuristic filter: keep paragraphs that read like English prose."""
    if len(para) < min_len:
        return False
    letters = sum(c.isalpha() or c == " " for c in para)
    if letters / len(para) < 0.75:
        return False
    words = _WORD_RE.findall(para)
    if len(words) < 6:
        return False
    code_chars = sum(para.count(c) for c in "{}[]=;<>|$\\")
    if code_chars / len(para) > 0.03:
        return False
    if para.lstrip().startswith((">>>", "$ ", "...", "+--", "..")):
        return False
    return True


def file_paragraphs(path: Path) -> list[str]:
    src = path.read_text(encoding="utf-8", errors="replace")
    paras = [clean_inline(p) for p in rst_to_paragraphs(src)]
    return [p for p in paras if is_prose(p)]


_SENT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def _split_long(para: str, max_chars: int) -> list[str]:
    if len(para) <= max_chars:
        return [para]
    pieces, cur = [], ""
    for sent in _SENT_RE.split(para):
        if cur and len(cur) + 1 + len(sent) > max_chars:
            pieces.append(cur)
            cur = sent
        else:
            cur = f"{cur} {sent}" if cur else sent
    if cur:
        pieces.append(cur)
    # A single "sentence" longer than max_chars is hard-cut at a space.
    out = []
    for p in pieces:
        while len(p) > max_chars:
            cut = p.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(p[:cut])
            p = p[cut:].lstrip()
        out.append(p)
    return out


def make_documents(paras: list[str], min_chars: int, max_chars: int,
                   min_doc_chars: int) -> list[str]:
    """Greedily join consecutive paragraphs into documents of min..max chars."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for para in paras:
        for piece in _split_long(para, max_chars):
            add = len(piece) + (2 if cur else 0)
            if cur and size >= min_chars and size + add > max_chars:
                docs.append("\n\n".join(cur))
                cur, size, add = [], 0, len(piece)
            cur.append(piece)
            size += add
            if size >= max_chars:
                docs.append("\n\n".join(cur))
                cur, size = [], 0
    if cur:
        tail = "\n\n".join(cur)
        if len(tail) < min_chars and docs and len(docs[-1]) + 2 + len(tail) <= max_chars:
            docs[-1] = docs[-1] + "\n\n" + tail
        elif len(tail) >= min_doc_chars:
            docs.append(tail)
    return docs


def split_of(rel: str, fractions: tuple[float, float], salt: str) -> str:
    h = hashlib.sha256((salt + rel).encode("utf-8")).digest()
    u = int.from_bytes(h[:8], "big") / 2 ** 64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def _parse_limits(spec: str | None) -> dict[str, int | None]:
    limits: dict[str, int | None] = {s: None for s in SPLITS}
    if not spec:
        return limits
    if "=" not in spec:
        return {s: int(spec) for s in SPLITS}
    for item in spec.split(","):
        key, val = item.split("=")
        if key not in limits:
            raise SystemExit(f"unknown split in --max-chars-per-split: {key!r}")
        limits[key] = int(val)
    return limits


def _select(records: list[dict], limit: int | None, salt: str) -> list[dict]:
    """Deterministic subset of <= limit characters, spread over many files."""
    if limit is None:
        return records
    order = sorted(range(len(records)),
                   key=lambda k: hashlib.sha256((salt + records[k]["id"]).encode()).digest())
    chosen, total = set(), 0
    for k in order:
        n = len(records[k]["text"])
        if total + n > limit:
            continue
        chosen.add(k)
        total += n
    return [r for k, r in enumerate(records) if k in chosen]


def _write_jsonl_gz(path: Path, records: list[dict]) -> None:
    buf = io.BytesIO()
    for r in records:
        buf.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                  compresslevel=9, mtime=0) as gz:
        gz.write(buf.getvalue())


def _deb_info(deb: str | None) -> dict:
    info: dict = {}
    if not deb:
        return info
    info["deb_file"] = os.path.basename(deb)
    info["deb_sha256"] = hashlib.sha256(Path(deb).read_bytes()).hexdigest()
    if shutil.which("dpkg-deb"):
        for field in ("Package", "Version", "Source", "Homepage"):
            r = subprocess.run(["dpkg-deb", "-f", deb, field], capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                info[field.lower()] = r.stdout.strip()
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Writes {train,validation,test}.jsonl.gz "
        "(fields id, text, source) and PROVENANCE.json; split by source file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--src", required=True,
                    help="extracted _sources dir, e.g. /tmp/pydoc/usr/share/doc/python3.11/html/_sources")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--deb", default=None,
                    help="the python3.11-doc .deb the sources came from (for PROVENANCE.json)")
    ap.add_argument("--package", default="python3.11-doc", help="package name if --deb is not given")
    ap.add_argument("--package-version", default=None, help="package version if --deb is not given")
    ap.add_argument("--license", default="PSF-2.0 (Python Software Foundation License)",
                    help="license recorded in PROVENANCE.json")
    ap.add_argument("--min-chars", type=int, default=1000, help="target minimum document length")
    ap.add_argument("--max-chars", type=int, default=4000, help="maximum document length")
    ap.add_argument("--min-doc-chars", type=int, default=300,
                    help="drop leftover documents shorter than this")
    ap.add_argument("--fractions", default="0.90,0.05,0.05",
                    help="train,validation,test fractions of source files")
    ap.add_argument("--salt", default="arc-encoder-pydoc-v1", help="salt of the split hash")
    ap.add_argument("--max-chars-per-split", default=None,
                    help="cap on text characters per split: one integer for all splits, or "
                    "'train=N,validation=N,test=N' (subset chosen deterministically by hash of doc id)")
    args = ap.parse_args(argv)

    src = Path(args.src)
    files = sorted(p for p in src.rglob("*.rst.txt") if p.is_file())
    if not files:
        raise SystemExit(f"no *.rst.txt files under {src}")
    fr = tuple(float(x) for x in args.fractions.split(","))
    if len(fr) != 3 or abs(sum(fr) - 1) > 1e-6:
        raise SystemExit("--fractions must be three numbers summing to 1")

    for path in files:
        collect_labels(path.read_text(encoding="utf-8", errors="replace"))

    per_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    files_per_split = {s: 0 for s in SPLITS}
    for path in files:
        rel = path.relative_to(src).as_posix()
        docs = make_documents(file_paragraphs(path), args.min_chars, args.max_chars,
                              args.min_doc_chars)
        if not docs:
            continue
        split = split_of(rel, fr[:2], args.salt)
        files_per_split[split] += 1
        for k, text in enumerate(docs):
            per_split[split].append({"id": f"{rel}#{k}", "text": text, "source": rel})

    limits = _parse_limits(args.max_chars_per_split)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split in SPLITS:
        recs = _select(per_split[split], limits[split], args.salt)
        _write_jsonl_gz(out / f"{split}.jsonl.gz", recs)
        lens = sorted(len(r["text"]) for r in recs)
        stats[split] = {
            "docs": len(recs),
            "chars": sum(lens),
            "source_files": len({r["source"] for r in recs}),
            "source_files_available": files_per_split[split],
            "doc_chars_min": lens[0] if lens else 0,
            "doc_chars_median": lens[len(lens) // 2] if lens else 0,
            "doc_chars_max": lens[-1] if lens else 0,
            "gzip_bytes": (out / f"{split}.jsonl.gz").stat().st_size,
        }

    deb = _deb_info(args.deb)
    prov = {
        "package": deb.get("package", args.package),
        "version": deb.get("version", args.package_version),
        "source_package": deb.get("source"),
        "homepage": deb.get("homepage"),
        "distribution": "Debian 12 (bookworm)",
        "deb_file": deb.get("deb_file"),
        "deb_sha256": deb.get("deb_sha256"),
        "license": args.license,
        "license_file": "/usr/share/doc/python3.11-doc/copyright inside the package; "
                        "the documentation's own terms are in _sources/license.rst.txt "
                        "('Python software and documentation are licensed under the PSF "
                        "License Agreement')",
        "content": "reStructuredText sources of the Python 3.11 documentation "
                   "(html/_sources/**/*.rst.txt), converted to plain prose",
        "source_files_total": len(files),
        "split_by": f"sha256(salt + relative source path), salt={args.salt!r}, "
                    f"fractions train/validation/test={args.fractions}",
        "fields": {"id": "relative source path + '#' + document index within the file",
                   "text": "plain prose, paragraphs separated by blank lines",
                   "source": "relative source path"},
        "max_chars_per_split": args.max_chars_per_split,
        "doc_chars": {"min_target": args.min_chars, "max": args.max_chars},
        "splits": stats,
        "command": "python3 benchmarks/prepare_corpus.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
    }
    (out / "PROVENANCE.json").write_text(json.dumps(prov, indent=2) + "\n", encoding="utf-8")
    for split in SPLITS:
        s = stats[split]
        print(f"{split:10s} docs={s['docs']:6d} chars={s['chars']:9d} files={s['source_files']:4d} "
              f"gz={s['gzip_bytes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
