"""benchmarks/carry.py: files reach the GPU machine in pieces over several calls, checked on arrival."""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import carry  # noqa: E402


def test_pieces_arrive_one_call_at_a_time_and_files_assemble_when_complete(tmp_path):
    files = []
    for name, size in (("a.bin", 300), ("b.bin", 1000), ("c.bin", 77)):
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes((i * 7 + len(name)) % 251 for i in range(size)))
        files.append(path)
    manifest = carry.split(files, tmp_path / "all", piece_mib=256 / 2**20)
    assert [p["bytes"] for p in manifest["pieces"]] == [256] * 5 + [1377 - 5 * 256]
    store = tmp_path / "store"
    ready_after = []
    for piece in manifest["pieces"]:  # each call carries the manifest and one piece
        call = tmp_path / "call"
        shutil.rmtree(call, ignore_errors=True)
        call.mkdir()
        shutil.copy(tmp_path / "all" / carry.MANIFEST, call)
        shutil.copy(tmp_path / "all" / piece["name"], call)
        ready_after.append(sorted(carry.receive(call, store)))
    assert ready_after[0] == [] and ready_after[1] == ["a.bin"]  # a.bin is bytes 0..299
    assert ready_after[-1] == ["a.bin", "b.bin", "c.bin"]
    for f in files:
        assert (store / f.name).read_bytes() == f.read_bytes()
    assert not (store / ".pieces").exists()  # pieces removed once everything is assembled


def test_a_corrupt_piece_is_refused(tmp_path):
    src = tmp_path / "x.bin"
    src.write_bytes(b"0123456789" * 50)
    carry.split([src], tmp_path / "c", piece_mib=100 / 2**20)
    piece = tmp_path / "c" / "piece01"
    piece.write_bytes(b"X" + piece.read_bytes()[1:])
    with pytest.raises(SystemExit, match="piece01.*corrupt"):
        carry.receive(tmp_path / "c", tmp_path / "store")
    assert json.loads((tmp_path / "c" / carry.MANIFEST).read_text())["bytes"] == 500
