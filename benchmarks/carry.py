#!/usr/bin/env python3
"""Large files onto the bare GPU machine, in pieces, over consecutive calls of the device tool.

A device call carries at most 64 MiB (working tree included), and the GPU machine starts bare.
A file written OUTSIDE the working tree by one call is still there for the next call made while
the machine is warm (30 s after a call), so a model of a few hundred MB arrives as a bundle split
into pieces, one piece per call (benchmarks/README.md, "Weights onto the GPU"):

    # here: the files become one byte stream cut into pieces + a manifest (what, where, sha256)
    python benchmarks/carry.py split --out .carry --piece-mib 52 FILE [FILE ...]
    # on the GPU machine, every call (carrying .carry/MANIFEST.json and the next piece):
    python benchmarks/carry.py receive .carry --store /root/arc/store
    # -> "piece 2/6 stored"; once every piece is there: each file is cut out of the stream,
    #    its sha256 checked, written to STORE/NAME, and the pieces removed: "FILE ready (sha256 ok)"

Every piece is checked against its own sha256 on arrival (a corrupt piece is refused, naming it)
and every file against its sha256 after joining. `status` lists what is missing. Pieces never
touch the working tree on the GPU side: the store is outside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def split(files: list[Path], out: Path, piece_mib: float) -> dict:
    """Cut the concatenation of ``files`` into pieces of ``piece_mib`` MiB in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    size = int(piece_mib * 2**20)
    entries, offset = [], 0
    for f in files:
        n = f.stat().st_size
        entries.append({"name": f.name, "offset": offset, "bytes": n, "sha256": _sha256(f)})
        offset += n
    total, pieces = offset, []
    stream = _Stream(files)
    for index in range(-(-total // size)):
        data = stream.read(size)
        name = f"piece{index:02d}"
        (out / name).write_bytes(data)
        pieces.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"files": entries, "pieces": pieces, "bytes": total}
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


class _Stream:
    """The files' bytes, one after the other."""

    def __init__(self, files: list[Path]) -> None:
        self.files, self.handle = list(files), None

    def read(self, n: int) -> bytes:
        chunks = []
        while n > 0:
            if self.handle is None:
                if not self.files:
                    break
                self.handle = self.files.pop(0).open("rb")
            data = self.handle.read(n)
            if not data:
                self.handle.close()
                self.handle = None
                continue
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)


def receive(carried: Path, store: Path) -> list[str]:
    """Store the pieces in ``carried``; assemble every file whose bytes are all there. Returns the ready files."""
    manifest = json.loads((carried / MANIFEST).read_text())
    parts = store / ".pieces"
    parts.mkdir(parents=True, exist_ok=True)
    for piece in manifest["pieces"]:
        src = carried / piece["name"]
        if src.is_file() and not (parts / piece["name"]).is_file():
            if _sha256(src) != piece["sha256"]:
                raise SystemExit(f"carry: {src}: sha256 does not match the manifest (corrupt piece)")
            shutil.copyfile(src, parts / f".{piece['name']}.tmp")
            os.replace(parts / f".{piece['name']}.tmp", parts / piece["name"])
            print(f"carry: {piece['name']} stored ({piece['bytes'] / 2**20:.1f} MiB)", flush=True)
    have = {p["name"] for p in manifest["pieces"] if (parts / p["name"]).is_file()}
    ready = []
    starts, pos = [], 0
    for p in manifest["pieces"]:
        starts.append(pos)
        pos += p["bytes"]
    for entry in manifest["files"]:
        target = store / entry["name"]
        if target.is_file() and target.stat().st_size == entry["bytes"]:
            ready.append(entry["name"])
            continue
        lo, hi = entry["offset"], entry["offset"] + entry["bytes"]
        needed = [p for p, s in zip(manifest["pieces"], starts) if s < hi and s + p["bytes"] > lo]
        if not all(p["name"] in have for p in needed):
            continue
        tmp = store / f".{entry['name']}.tmp"
        h = hashlib.sha256()
        with tmp.open("wb") as out:
            for p, s in zip(manifest["pieces"], starts):
                if p not in needed:
                    continue
                data = (parts / p["name"]).read_bytes()[max(lo - s, 0): min(hi - s, p["bytes"])]
                h.update(data)
                out.write(data)
        if h.hexdigest() != entry["sha256"]:
            tmp.unlink()
            raise SystemExit(f"carry: {entry['name']}: sha256 of the joined pieces does not match the manifest")
        os.replace(tmp, target)
        ready.append(entry["name"])
        print(f"carry: {entry['name']} ready ({entry['bytes'] / 2**20:.1f} MiB, sha256 ok)", flush=True)
    if len(ready) == len(manifest["files"]):
        shutil.rmtree(parts, ignore_errors=True)
    else:
        missing = [p["name"] for p in manifest["pieces"] if p["name"] not in have]
        print(f"carry: waiting for {', '.join(missing)}", flush=True)
    return ready


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="cut files into pieces + manifest")
    s.add_argument("files", nargs="+", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--piece-mib", type=float, default=52)
    r = sub.add_parser("receive", help="store carried pieces; assemble complete files")
    r.add_argument("carried", type=Path)
    r.add_argument("--store", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "split":
        m = split(args.files, args.out, args.piece_mib)
        print(f"carry: {len(m['pieces'])} pieces of <= {args.piece_mib} MiB for {len(m['files'])} files "
              f"({m['bytes'] / 2**20:.1f} MiB) in {args.out}")
    else:
        receive(args.carried, args.store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
