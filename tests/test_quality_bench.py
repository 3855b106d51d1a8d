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
        width = m["loss_none"] - m["loss_full"]  # under 0.2 nats of open-book gain: no ratio (null)
        assert m["open_book_gain"] == pytest.approx(width)
        if width >= 0.2:
            assert m["gap_closed"] == pytest.approx((m["loss_none"] - m["loss_compressed"]) / width)
        else:
            assert m["gap_closed"] is None
        assert m["test_samples"] > 0
    adapt = res["variants"][1]
    assert adapt["decoder"] == "B" and adapt["trainable_parameters"] == adapt["projector_parameters"]
    assert res["decoders"]["A"]["steps"] == 3 and "command" in res
    # 3-step decoders copy nothing: the tiny preset reports the gates and runs anyway (smoke test)
    gates = res["gates"]
    assert gates["enforced"] is False and gates["passed"] is False and set(gates["missed"]) == {"A", "B"}
    for name in ("A", "B"):
        probe = res["decoders"][name]["probe"]
        assert probe["passed"] is False and probe["config"]["copy_len"] == 64
    assert "smoke test" in proc.stdout


def test_gpu_preset_refuses_decoders_that_miss_a_gate():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from quality import PRESETS, check_gates

    probes = {"A": {"passed": True, "failures": []},
              "B": {"passed": False, "failures": ["copy: second-copy loss 0.900 > 0.5 nats/token"]}}
    record, error = check_gates(probes, enforce=PRESETS["gpu"]["enforce_gates"], allow_failed=False, label="gpu")
    assert "B: copy: second-copy loss 0.900" in error and "--allow-failed-gates" in error
    assert record["enforced"] and not record["passed"] and record["missed"] == {"B": probes["B"]["failures"]}
    record, error = check_gates(probes, enforce=PRESETS["gpu"]["enforce_gates"], allow_failed=True, label="gpu")
    assert error == "" and record["allow_failed_gates"] is True and not record["passed"]
    assert check_gates(probes, enforce=PRESETS["tiny"]["enforce_gates"], allow_failed=False, label="tiny")[1] == ""
