#!/usr/bin/env python3
"""Real-text corpus: Debian documentation + PyPI source code (the real-LLM run's training and test text).

Why this exists
---------------
Training and evaluating against real pretrained decoders needs real text that nobody here wrote,
with the natural repetition (identifiers, call patterns) that a reader of context exploits, and a
test split no model saw. No dataset hub is reachable here, so the corpus is built from software
packages this project did not write (``benchmarks/real_run.sh`` builds it on the GPU machine;
it first served the stand-in decoders of earlier quality runs):

* Debian 12 packages, fetched with ``apt-get download NAME`` (no install needed):
  ``python3.11-doc`` (reStructuredText sources), ``perl-doc`` (POD), ``postgresql-doc-15``
  (HTML, tags stripped), ``libpython3.11-minimal``, ``libpython3.11-stdlib`` and
  ``libpython3.11-testsuite`` (the CPython 3.11 standard library and its tests, ``.py``).
* PyPI distributions: the ``.py`` files of installed distributions (or of wheel files from
  ``pip download``), each file checked against the sha256 in the distribution's ``RECORD``,
  so every byte is the one PyPI published under the recorded name and version.

Two steps, so that only the small Debian part has to travel to a GPU machine:

``debian``: ``.deb`` files -> one ``debian_text.jsonl.xz`` (one record per source file) plus
``debian_text.provenance.json`` (package, version, sha256 of the .deb, licence).

``build``: that file + PyPI distributions -> ``{train,validation,test}.jsonl.gz`` (fields
``id``, ``text``, ``source``, ``kind``: "doc" or "code") and ``PROVENANCE.json``. Files that
look generated (very large, long lines, mostly non-ASCII) are dropped; exact duplicate
files are kept once; each file goes to one split by a salted sha256 of its id. The output
does not depend on the order packages are found in, so the same inputs give the same corpus
digest (a sha256 over every record's id and text hash) on any machine.

Example (benchmarks/real_run.sh runs the ``build`` step with the PyPI distributions it names)::

    mkdir -p .data/debs && (cd .data/debs && apt-get download python3.11-doc perl-doc \\
        postgresql-doc-15 libpython3.11-minimal libpython3.11-stdlib libpython3.11-testsuite)
    python benchmarks/decoder_corpus.py debian --deb .data/debs/*.deb --out .data/debian
    python benchmarks/decoder_corpus.py build --debian .data/debian/debian_text.jsonl.xz \\
        --pypi default --out .data/decoder_corpus
"""

from __future__ import annotations

import argparse
import base64
import csv
import gzip
import hashlib
import html.parser
import io
import json
import lzma
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, when not installed
from prepare_corpus import SPLITS, split_of  # noqa: E402  (one split rule for every corpus)

from arc_encoder.storage import atomic_write_bytes  # noqa: E402

# Large PyPI distributions of real, hand-written Python, all installed on the GPU machines'
# image (KINDS.md); a missing one is an error unless --allow-missing.
DEFAULT_PYPI = (
    "transformers torch sympy pandas scipy scikit-learn statsmodels numpy matplotlib networkx "
    "jax flax optax chex equinox numpyro botorch gpytorch linear-operator torch-geometric "
    "torchmetrics lightning pytorch-lightning accelerate peft timm sentence-transformers "
    "huggingface-hub torchvision onnx onnxscript xarray seaborn scikit-image hypothesis pygments "
    "rich jinja2 requests werkzeug aiohttp click fsspec pyparsing pytest setuptools pip mpmath "
    "numba pyarrow patsy joblib sacrebleu"
).split()


# ----------------------------------------------------------------------------- Debian part
class _HTMLText(html.parser.HTMLParser):
    """Text of an HTML page: script/style dropped, block elements end lines."""

    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def html_to_text(src: str) -> str:
    p = _HTMLText()
    p.feed(src)
    p.close()
    lines = [ln.rstrip() for ln in "".join(p.out).splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _raw(src: str) -> str:
    return src


@dataclass(frozen=True)
class DebRule:
    """Which files of a package are text, how to read them, and what kind of text they are."""

    pattern: str  # regex on the path inside the package (no leading "./")
    kind: str  # "doc" or "code"
    license: str  # as stated in the package's /usr/share/doc/<package>/copyright
    convert: Callable[[str], str] = _raw


_PSF = "PSF-2.0 (Python Software Foundation License; a few modules carry other permissive licences, listed in the copyright file)"
DEB_RULES: dict[str, DebRule] = {
    "python3.11-doc": DebRule(r"^usr/share/doc/python3\.11/html/_sources/.+\.rst\.txt$", "doc", _PSF),
    "perl-doc": DebRule(r"^usr/share/perl/[^/]+/pod/.+\.pod$", "doc", "GPL-1+ or Artistic (Perl's licence)"),
    "postgresql-doc-15": DebRule(r"^usr/share/doc/postgresql-doc-15/html/.+\.html$", "doc", "PostgreSQL License",
                                 html_to_text),
    "libpython3.11-minimal": DebRule(r"^usr/lib/python3\.11/.+\.py$", "code", _PSF),
    "libpython3.11-stdlib": DebRule(r"^usr/lib/python3\.11/.+\.py$", "code", _PSF),
    "libpython3.11-testsuite": DebRule(r"^usr/lib/python3\.11/.+\.py$", "code", _PSF),
}


def _deb_field(deb: Path, name: str) -> str:
    r = subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def debian_records(deb: Path) -> tuple[dict, list[dict]]:
    """(provenance entry, records) of one .deb, per DEB_RULES."""
    if shutil.which("dpkg-deb") is None:
        raise SystemExit("error: dpkg-deb is needed to read .deb files")
    package = _deb_field(deb, "Package")
    if package not in DEB_RULES:
        raise SystemExit(f"error: {deb}: no text rule for package {package!r} (known: {', '.join(DEB_RULES)})")
    rule = DEB_RULES[package]
    version = _deb_field(deb, "Version")
    records, copyright_sha = [], None
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        root = Path(tmp)
        copyright_file = root / "usr/share/doc" / package / "copyright"
        if copyright_file.is_file():
            copyright_sha = sha256_bytes(copyright_file.read_bytes())
        pat = re.compile(rule.pattern)
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            rel = path.relative_to(root).as_posix()
            if not pat.match(rel):
                continue
            text = rule.convert(path.read_bytes().decode("utf-8", errors="replace"))
            records.append({"id": f"deb:{package}/{rel}", "source": package, "kind": rule.kind, "text": text})
    prov = {
        "package": package, "version": version, "source_package": _deb_field(deb, "Source") or package,
        "homepage": _deb_field(deb, "Homepage"), "deb_file": deb.name,
        "deb_sha256": sha256_bytes(deb.read_bytes()), "license": rule.license,
        "license_file": f"/usr/share/doc/{package}/copyright (in the package)", "license_file_sha256": copyright_sha,
        "selected": rule.pattern, "kind": rule.kind, "files": len(records),
        "converted": "HTML tags stripped (html.parser)" if rule.convert is html_to_text else "verbatim",
    }
    return prov, records


def cmd_debian(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    provs, records = [], []
    for deb in sorted(Path(d) for d in args.deb):
        prov, recs = debian_records(deb)
        provs.append(prov)
        records += recs
        print(f"{prov['package']} {prov['version']}: {len(recs)} files, {sum(len(r['text']) for r in recs):,} chars")
    records.sort(key=lambda r: r["id"])
    buf = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    blob = lzma.compress(buf, preset=9 | lzma.PRESET_EXTREME)
    atomic_write_bytes(out / "debian_text.jsonl.xz", blob)
    meta = {"packages": provs, "records": len(records), "chars": sum(len(r["text"]) for r in records),
            "jsonl_xz_sha256": sha256_bytes(blob), "jsonl_xz_bytes": len(blob), "jsonl_bytes": len(buf),
            "distribution": "Debian 12 (bookworm)", "command": _command(args)}
    atomic_write_bytes(out / "debian_text.provenance.json", (json.dumps(meta, indent=2) + "\n").encode())
    print(f"wrote {out / 'debian_text.jsonl.xz'}: {len(records)} files, {len(buf):,} bytes -> {len(blob):,} xz")
    return 0


# ----------------------------------------------------------------------------- PyPI part
def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Dist:
    """One PyPI distribution: metadata and a reader of the files its RECORD lists."""

    name: str
    version: str
    license: str
    origin: str
    record: list[tuple[str, str]]  # (path, "sha256=<urlsafe b64>") for every hashed .py file
    read: Callable[[str], bytes] = field(repr=False)


def _license_of(meta) -> str:
    for key in ("License-Expression", "License"):
        value = (meta.get(key) or "").strip()
        if value and value.upper() != "UNKNOWN" and len(value) < 200:
            return value
    classifiers = [c.split("::")[-1].strip() for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
    if classifiers:
        return "; ".join(classifiers)
    value = (meta.get("License") or "").strip()
    return (value.splitlines()[0][:120] + " (first line of the License field)") if value else "not stated in METADATA"


def _py_record(rows: Iterable[list[str]]) -> list[tuple[str, str]]:
    out = []
    for row in rows:
        if len(row) >= 2 and row[0].endswith(".py") and row[1].startswith("sha256="):
            path = row[0]
            if ".dist-info/" in path or path.startswith(("../", "/")):
                continue
            out.append((path, row[1]))
    return sorted(out)


def installed_dists(site_packages: list[str] | None) -> dict[str, Dist]:
    """Installed distributions (this interpreter's, or those under ``site_packages``)."""
    from importlib import metadata

    found: dict[str, Dist] = {}
    dists = metadata.distributions(path=site_packages) if site_packages else metadata.distributions()
    for d in dists:
        name = d.metadata.get("Name")
        if not name or _normalize(name) in found:
            continue  # the first on the path wins, as for imports
        text = d.read_text("RECORD")
        if text is None:
            continue
        base = Path(d.locate_file(""))
        found[_normalize(name)] = Dist(
            name=name, version=d.version, license=_license_of(d.metadata),
            origin=f"installed distribution ({base})", record=_py_record(csv.reader(io.StringIO(text))),
            read=lambda rel, base=base: (base / rel).read_bytes())
    return found


def wheel_dists(paths: list[Path]) -> dict[str, Dist]:
    """Distributions from wheel files (``pip download --no-deps NAME==VERSION``)."""
    from email.parser import BytesParser

    found: dict[str, Dist] = {}
    for whl in sorted(paths):
        zf = zipfile.ZipFile(whl)
        info = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        if len(info) != 1:
            raise SystemExit(f"error: {whl}: not a wheel (no single .dist-info/METADATA)")
        meta = BytesParser().parsebytes(zf.read(info[0]))
        record = zf.read(info[0][: -len("METADATA")] + "RECORD").decode()
        found[_normalize(meta["Name"])] = Dist(
            name=meta["Name"], version=meta["Version"], license=_license_of(meta),
            origin=f"wheel {whl.name} sha256 {sha256_bytes(whl.read_bytes())}",
            record=_py_record(csv.reader(io.StringIO(record))), read=lambda rel, zf=zf: zf.read(rel))
    return found


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def pypi_records(dist: Dist) -> tuple[list[dict], dict[str, int]]:
    """Records of a distribution's .py files whose bytes match RECORD (others are counted)."""
    records, counts = [], {"listed": len(dist.record), "hash_mismatch": 0, "unreadable": 0}
    for rel, expected in dist.record:
        try:
            data = dist.read(rel)
        except (OSError, KeyError):
            counts["unreadable"] += 1
            continue
        if _record_hash(data) != expected:
            counts["hash_mismatch"] += 1  # changed after install: not PyPI's bytes
            continue
        records.append({"id": f"pypi:{_normalize(dist.name)}/{rel}", "source": dist.name, "kind": "code",
                        "text": data.decode("utf-8", errors="replace")})
    return records, counts


# ----------------------------------------------------------------------------- filter + split
@dataclass(frozen=True)
class TextFilter:
    """Drop files that are data or generated output rather than written text."""

    min_chars: int = 200
    max_chars: int = 300_000
    long_line: int = 300  # a line longer than this counts as long
    max_long_line_share: float = 0.05  # of the file's characters
    max_non_ascii_share: float = 0.3

    def reason(self, text: str) -> str | None:
        n = len(text)
        if n < self.min_chars:
            return "short"
        if n > self.max_chars:
            return "large"
        long_chars = sum(len(ln) for ln in text.splitlines() if len(ln) > self.long_line)
        if long_chars > self.max_long_line_share * n:
            return "long_lines"
        if sum(ord(c) > 127 for c in text) > self.max_non_ascii_share * n:
            return "non_ascii"
        return None


def select_records(records: Iterable[dict], flt: TextFilter) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """Filter, then keep one record per distinct text (the smallest id): order-independent."""
    by_hash: dict[str, dict] = {}
    dropped: dict[str, dict[str, int]] = {}
    for r in records:
        why = flt.reason(r["text"])
        if why:
            dropped.setdefault(r["source"], {}).setdefault(why, 0)
            dropped[r["source"]][why] += 1
            continue
        h = sha256_bytes(r["text"].encode("utf-8"))
        kept = by_hash.get(h)
        if kept is None or r["id"] < kept["id"]:
            if kept is not None:
                dropped.setdefault(kept["source"], {}).setdefault("duplicate", 0)
                dropped[kept["source"]]["duplicate"] += 1
            by_hash[h] = r
        else:
            dropped.setdefault(r["source"], {}).setdefault("duplicate", 0)
            dropped[r["source"]]["duplicate"] += 1
    return sorted(by_hash.values(), key=lambda r: r["id"]), dropped


def corpus_digest(records: Iterable[dict]) -> str:
    """sha256 over (split, id, sha256(text)) lines, in id order: equal digests = equal corpora."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r["id"]):
        h.update(f"{r['split']}\t{r['id']}\t{sha256_bytes(r['text'].encode('utf-8'))}\n".encode())
    return h.hexdigest()


def read_jsonl_xz(path: Path) -> Iterator[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def read_split(directory: str | Path, split: str) -> Iterator[dict]:
    """Records of one split of a built corpus, in file order."""
    with gzip.open(Path(directory) / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _write_jsonl_gz(path: Path, records: list[dict], level: int) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=level, mtime=0) as gz:
        for r in records:
            gz.write((json.dumps({k: r[k] for k in ("id", "text", "source", "kind")}, ensure_ascii=False)
                      + "\n").encode("utf-8"))
    atomic_write_bytes(path, buf.getvalue())


def _command(args) -> str:
    return "python benchmarks/decoder_corpus.py " + " ".join(shlex.quote(a) for a in args.argv)


def cmd_build(args) -> int:
    out = Path(args.out)
    fractions = tuple(float(x) for x in args.fractions.split(","))
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise SystemExit("error: --fractions must be three non-negative numbers summing to 1")
    records: list[dict] = []
    sources: list[dict] = []
    if args.debian:
        deb_path = Path(args.debian)
        meta_path = deb_path.with_name(deb_path.name.replace(".jsonl.xz", ".provenance.json"))
        if not deb_path.is_file() or not meta_path.is_file():
            raise SystemExit(f"error: {deb_path} or its {meta_path.name} is missing (run the debian step)")
        meta = json.loads(meta_path.read_text())
        digest = sha256_bytes(deb_path.read_bytes())
        if digest != meta["jsonl_xz_sha256"]:
            raise SystemExit(f"error: {deb_path}: sha256 {digest} differs from its provenance file")
        deb_recs = list(read_jsonl_xz(deb_path))
        records += deb_recs
        for p in meta["packages"]:
            sources.append({"origin": "debian", **p})
    names = DEFAULT_PYPI if args.pypi == ["default"] else [n for n in args.pypi if n != "default"]
    available = wheel_dists([Path(w) for w in args.wheel]) if args.wheel else {}
    if not args.no_installed:
        for key, dist in installed_dists(args.site_packages).items():
            available.setdefault(key, dist)  # a given wheel wins over the installed copy
    missing = []
    for name in names:
        dist = available.get(_normalize(name))
        if dist is None:
            missing.append(name)
            continue
        recs, counts = pypi_records(dist)
        records += recs
        sources.append({"origin": "pypi", "package": dist.name, "version": dist.version, "license": dist.license,
                        "read_from": dist.origin, "files": len(recs), **counts})
        print(f"{dist.name} {dist.version}: {len(recs)} .py files ({counts['hash_mismatch']} not matching RECORD)")
    if missing and not args.allow_missing:
        raise SystemExit(f"error: PyPI distributions not found: {', '.join(missing)} (install them, pass "
                         f"--wheel files, or --allow-missing)")
    if not records:
        raise SystemExit("error: no text selected")
    kept, dropped = select_records(records, TextFilter(max_chars=args.max_file_chars))
    for r in kept:
        r["split"] = split_of(r["id"], fractions[:2], args.salt)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split in SPLITS:
        part = [r for r in kept if r["split"] == split]
        _write_jsonl_gz(out / f"{split}.jsonl.gz", part, args.gzip_level)
        stats[split] = {"files": len(part), "chars": sum(len(r["text"]) for r in part),
                        **{f"{k}_chars": sum(len(r["text"]) for r in part if r["kind"] == k) for k in ("doc", "code")}}
    per_source: dict[str, dict[str, int]] = {}
    for r in kept:
        s = per_source.setdefault(r["source"], {"files": 0, "chars": 0})
        s["files"] += 1
        s["chars"] += len(r["text"])
    for s in sources:
        name = s["package"]
        s["kept"] = per_source.get(name, {"files": 0, "chars": 0})
        s["dropped"] = dropped.get(name, {})
    prov = {
        "format": "jsonl.gz, one source file per line: id, text, source (package), kind (doc|code)",
        "split_by": f"sha256(salt + id), salt={args.salt!r}, train/validation/test fractions {args.fractions}",
        "filter": TextFilter(max_chars=args.max_file_chars).__dict__ | {"exact_duplicates": "kept once (smallest id)"},
        "missing_pypi": missing, "sources": sources, "splits": stats,
        "corpus_digest": corpus_digest(kept), "python": sys.version.split()[0], "command": _command(args),
    }
    atomic_write_bytes(out / "PROVENANCE.json", (json.dumps(prov, indent=2) + "\n").encode())
    for split in SPLITS:
        s = stats[split]
        print(f"{split:10s} files={s['files']:6d} chars={s['chars']:12,d} (doc {s['doc_chars']:,}, code {s['code_chars']:,})")
    print(f"corpus digest {prov['corpus_digest']}")
    if args.expect_digest and args.expect_digest != prov["corpus_digest"]:
        raise SystemExit(f"error: corpus digest {prov['corpus_digest']} differs from --expect-digest {args.expect_digest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("debian", help="Debian .deb files -> debian_text.jsonl.xz + provenance")
    d.add_argument("--deb", nargs="+", required=True, help="files from `apt-get download NAME`")
    d.add_argument("--out", required=True, help="output directory")
    b = sub.add_parser("build", help="Debian text + PyPI sources -> {train,validation,test}.jsonl.gz + PROVENANCE.json")
    b.add_argument("--debian", default=None, help="debian_text.jsonl.xz from the debian step")
    b.add_argument("--pypi", nargs="*", default=["default"],
                   help="PyPI distribution names ('default': the list in this file)")
    b.add_argument("--wheel", nargs="*", default=[], help="wheel files to read instead of installed copies")
    b.add_argument("--site-packages", nargs="*", default=None, help="where to look for installed distributions "
                   "(default: this interpreter's path)")
    b.add_argument("--no-installed", action="store_true", help="read PyPI sources from --wheel files only")
    b.add_argument("--allow-missing", action="store_true", help="skip (and record) PyPI names not found")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--fractions", default="0.98,0.01,0.01", help="train,validation,test shares of files")
    b.add_argument("--salt", default="arc-encoder-decoder-corpus-v1", help="salt of the split hash")
    b.add_argument("--max-file-chars", type=int, default=300_000, help="larger files are dropped as data")
    b.add_argument("--gzip-level", type=int, default=6, help="1 is fast (GPU machine), 9 small")
    b.add_argument("--expect-digest", default=None, help="fail unless the corpus digest equals this")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return cmd_debian(args) if args.cmd == "debian" else cmd_build(args)


if __name__ == "__main__":
    sys.exit(main())
