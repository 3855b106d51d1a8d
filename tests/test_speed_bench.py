"""The speed benchmark's tiny preset runs on CPU and writes complete, consistent numbers.

Timings on CPU mean nothing, and on a loaded machine any of them can be arbitrarily slow, so
no test bounds a time, a throughput or anything derived from one (MFU, speedup, efficiency).
This checks the script end to end (every section, the JSON fields, times that are real
measurements, and every derived number as its exact formula of the recorded times and FLOP
counts) so the GPU run does not fail on a typo.
"""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# Imported by name from benchmarks/ (spawned DDP ranks re-import it from the same sys.path).
sys.path.insert(0, str(ROOT / "benchmarks"))
import speed  # noqa: E402


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _is_timing(t: dict, repeats: int | None = None) -> bool:
    """A measured time: min <= median <= max, all > 0 (no bound on how long)."""
    ok = _positive_finite(t["min_s"]) and t["min_s"] <= t["median_s"] <= t["max_s"] and math.isfinite(t["max_s"])
    return ok and (repeats is None or t["repeats"] == repeats)


def test_encoder_flops_formula_by_hand():
    cfg = speed.hf_config(speed.TINY_ENCODER)  # H 48, I 71, 6 heads x 8, 2 kv heads x 8
    h, i, dq, dkv = 48, 71, 48, 16
    n, pf, layers = 10, 4, 3
    m = 3
    full = 2 * n * (h * dq + 2 * h * dkv + dq * h + 3 * h * i) + 4 * n * n * dq
    # The reference's pooled block: queries from the m pooled inputs, keys/values from all n tokens.
    pooled = 2 * n * (2 * h * dkv) + 2 * m * (h * dq + dq * h + 3 * h * i) + 4 * m * n * dq
    assert speed.encoder_forward_flops(cfg, layers, n, pf, chunks=2) == 2 * (2 * full + pooled)


def test_tiny_preset_writes_complete_json(tmp_path, capsys):
    res = speed.main(["--preset", "tiny", "--out-dir", str(tmp_path), "--profile", "--tag", "t"])
    files = sorted(p.name for p in tmp_path.iterdir())
    stem = f"speed_{speed.device_slug(res['device_name'])}_{res['date']}_t"
    assert f"{stem}.json" in files and f"{stem}.md" in files and "encoder_profile.txt" in files
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    s = data["sections"]
    assert set(s) == {"matmul", "encoder", "prefill", "bytes", "train"}
    mm = s["matmul"]
    assert _is_timing(mm["time"])
    assert mm["tflops"] == pytest.approx(2.0 * mm["size"] ** 3 / mm["time"]["median_s"] / 1e12)
    peak = mm["tflops"]

    runs = s["encoder"]["runs"]
    assert {r["pooling_factor"] for r in runs} == {4, 8}
    cfg = speed.hf_config(speed.TINY_ENCODER)
    for r in runs:
        median = r["time"]["median_s"]
        assert _is_timing(r["time"])
        assert r["model_tflop"] * 1e12 == pytest.approx(
            speed.encoder_forward_flops(cfg, s["encoder"]["layers"], 32, r["pooling_factor"], 3))
        assert r["tokens_per_s"] == pytest.approx(3 * 32 / median)
        assert r["tflops"] == pytest.approx(r["model_tflop"] / median)
        assert r["mfu"] == pytest.approx(r["tflops"] / peak)
    assert "flash" in s["encoder"]["flash_attn"]

    ctxs = s["prefill"]["contexts"]
    assert [c["context_tokens"] for c in ctxs] == [32, 96]
    for c in ctxs:
        assert set(c["modes"]) >= {"full", "cached_x4", "cached_x8", "on_the_fly_x4", "on_the_fly_x8"}
        for k, v in c["speedup_vs_full"].items():
            full, mode = c["modes"]["full"]["time"]["median_s"], c["modes"][k]["time"]["median_s"]
            assert v == pytest.approx(full / mode)
        # Decoder input at inference (reference: the first prompt part carries BOS):
        # BOS + ceil(n / pf) vectors + one marker (one document) + prompt (5 tokens).
        assert c["modes"]["cached_x4"]["decoder_tokens"] == 1 + c["context_tokens"] // 4 + 1 + 5
        assert c["modes"]["full"]["decoder_tokens"] == 1 + c["context_tokens"] + 5
        assert all(_positive_finite(v) for k, v in c["ttft"].items() if k != "repeats")

    b = s["bytes"]
    # Tiny decoder: 3 layers x 1 kv head x 8 dims x (K and V) x 4 bytes (float32).
    assert b["kv_cache_bytes_per_token"] == b["kv_cache_bytes_per_token_formula"] == 3 * 8 * 2 * 4
    assert b["compressed"]["x4"]["bytes_per_token"] == pytest.approx(40 * 4 / 4)
    assert b["compressed"]["x8"]["ratio_to_kv"] == pytest.approx(b["compressed"]["x4"]["ratio_to_kv"] / 2)

    train = s["train"]
    for name in ("eager", "checkpointing"):
        v = train["variants"][name]
        median = v["time"]["median_s"]
        assert _is_timing(v["time"])
        assert v["encoder_tokens_per_s"] == pytest.approx(train["batch"] * train["context_tokens"] / median)
        assert v["tflops"] == pytest.approx(train["model_tflop_per_step"] / median)
        assert v["mfu"] == pytest.approx(v["tflops"] / peak)
        assert math.isfinite(v["loss"]) and v["loss"] > 0
    assert data["summary"] and "| measure |" in (tmp_path / f"{stem}.md").read_text()


def test_scaling_path_runs_with_two_cpu_ranks(tmp_path):
    """The DDP code path for --sections scaling (gloo on CPU; NCCL on a multi-GPU machine)."""
    res = speed.main(["--preset", "tiny", "--out-dir", str(tmp_path), "--sections", "scaling"])
    runs = res["sections"]["scaling"]["runs"]
    assert set(runs) == {"1", "2"}
    for key in ("cache", "train_encoder"):
        assert all(_positive_finite(runs[w][f"{key}_tokens_per_s"]) for w in ("1", "2"))
    # Efficiency = throughput(2) / (2 x throughput(1)), whatever the machine's load made them.
    assert runs["2"]["train_efficiency"] == pytest.approx(
        runs["2"]["train_encoder_tokens_per_s"] / (2 * runs["1"]["train_encoder_tokens_per_s"]))
    assert runs["2"]["cache_efficiency"] == pytest.approx(
        runs["2"]["cache_tokens_per_s"] / (2 * runs["1"]["cache_tokens_per_s"]))
