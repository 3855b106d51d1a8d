"""The quality benchmark end to end at smoke scale (seconds): pipeline and JSON, not quality."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quality_benchmark_tiny_smoke(tmp_path):
    out = tmp_path / "q.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--preset", "tiny", "--work-dir", str(tmp_path / "w"),
           "--steps", "3", "--lm-steps", "3", "--test-batches", "4", "--pooling-factors", "4,8", "--no-progress",
           "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [v["name"] for v in res["variants"]] == ["A-pf4", "adapt-B-pf4", "A-pf8"]
    for v in res["variants"]:
        m = v["metrics"]
        for key in ("loss_none", "loss_full", "loss_compressed", "recon_acc", "recon_exact"):
            assert math.isfinite(m[key]), (v["name"], key)
        assert 0.0 <= m["recon_acc"] <= 1.0
        width = m["loss_none"] - m["loss_full"]  # no gap to close: NaN (3-step decoders may have none)
        if width > 0:
            assert m["gap_closed"] == pytest.approx((m["loss_none"] - m["loss_compressed"]) / width)
        else:
            assert math.isnan(m["gap_closed"])
        assert m["test_samples"] > 0
    adapt = res["variants"][1]
    assert adapt["decoder"] == "B" and adapt["trainable_parameters"] == adapt["projector_parameters"]
    assert res["decoders"]["A"]["steps"] == 3 and "command" in res
