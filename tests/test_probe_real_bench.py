"""benchmarks/probe_real.py: the local-attention controls really cut the attention (tiny models, CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arc_encoder.tiny import tiny_causal_lm, tiny_config, train_tokenizer
from conftest import TEXT

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_local_control_cuts_attention_and_fails_the_gates(tmp_path, family):
    from transformers import AutoConfig

    tok = train_tokenizer([TEXT], vocab_size=300)
    if family == "gemma3":
        cfg = AutoConfig.for_model("gemma3_text", vocab_size=len(tok), hidden_size=24, intermediate_size=37,
                                   num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=8,
                                   sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        cfg = tiny_config("llama", vocab_size=len(tok), hidden_size=24, num_heads=3, num_kv_heads=1, num_layers=2)
    tiny_causal_lm(cfg).save_pretrained(tmp_path / "dec")
    tok.save_pretrained(tmp_path / "dec")
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": " ".join([TEXT] * 4)}) + "\n" for _ in range(2)))
    out = tmp_path / "one.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/probe_real.py", "one", "--decoder", str(tmp_path / "dec"),
                           "--data", str(tmp_path / "held.jsonl"), "--local-window", "4", "--sink", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    control = res["control"]  # checked in the child: equal within the window, different beyond it
    assert control["window"] == 4 and control["sink"] is True
    assert control["max_logit_diff_within_window"] <= 1e-3 < control["max_logit_diff_beyond"]
    assert res["passed"] is False and res["induction_ratio"] > 0.9 and res["prefix_ids"] == []
