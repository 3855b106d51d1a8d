"""The lean GPU quality run end to end on CPU at toy scale (seconds): pipeline, JSON and rules, not quality."""

import gzip
import json
import sys
import tarfile
from pathlib import Path

import pytest

from arc_encoder.tiny import tiny_causal_lm, tiny_config, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

WORDS = ("the list tuple dict set frozenset index value key return yield lambda class import from as with try "
         "except finally raise while for in if elif else pass break continue def global nonlocal assert del").split()


def _text(seed: int, words: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lean")
    corpus = d / "corpus"
    corpus.mkdir()
    for split, n, words in (("train", 12, 200), ("validation", 3, 200), ("test", 3, 700)):
        with gzip.open(corpus / f"{split}.jsonl.gz", "wt") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"{split}/{i}", "text": _text(hash(split) % 1000 + i, words),
                                    "source": "toy", "kind": "code"}) + "\n")
    texts = [_text(i, 300) for i in range(20)]
    for name, family, vocab, width in (("A", "llama", 420, 24), ("B", "gpt_neox", 300, 20)):
        tok = train_tokenizer(texts, vocab_size=vocab)
        cfg = tiny_config(family, vocab_size=len(tok), hidden_size=width, num_layers=3, num_heads=4, num_kv_heads=2,
                          intermediate_size=37)
        if family == "gpt_neox":
            cfg.num_key_value_heads = 4
        model = tiny_causal_lm(cfg)
        model.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d


def _run(d: Path, *extra, work: str = "work") -> int:
    from quality_lean import main

    return main(["run", "--corpus", str(d / "corpus"), "--decoder", f"A={d / 'A'}", "--decoder", f"B={d / 'B'}",
                 "--data", str(d / "data"), "--work", str(d / work), "--out", str(d / "out"), "--plan", "smoke",
                 "--parallel", "0", "--context", "16", "--target", "8", "--val-windows", "4", "--test-windows", "6",
                 "--workers", "1", "--device", "cpu", "--deadline", "3600", *extra])


def test_refuses_decoders_that_miss_the_gates(setup, capsys):
    assert _run(setup) == 1  # random decoders copy nothing
    err = capsys.readouterr().err
    assert "do not read their context" in err and "--allow-failed-gates" in err
    assert not (setup / "work" / "runs" / "A-x4").exists()  # no encoder trained


def test_smoke_run_end_to_end(setup):
    assert _run(setup, "--allow-failed-gates") == 2  # the refused run's folder is not reused
    assert _run(setup, "--allow-failed-gates", work="work2") == 0
    rep = json.loads((setup / "out" / "quality_lean.json").read_text())
    assert rep["gates"]["allow_failed_gates"] is True and rep["gates"]["passed"] is False
    assert set(rep["decoders"]) == {"A", "B"} and "induction_second" in rep["decoders"]["A"]
    by = {v["name"]: v for v in rep["variants"]}
    assert set(by) == {"A-x4", "A-x1", "B-adapt"} and all(v["status"] == "done" for v in by.values())
    for v in by.values():
        assert [p["step"] for p in v["curve"]] == [0, 2, 3] and v["steps_done"] == 3
        t = v["test"]
        for key in ("loss_none", "loss_full", "loss_compressed", "recon_acc", "read_back_text_acc", "no_context_acc"):
            assert t[key] == t[key], key  # not NaN
        gain = t["loss_none"] - t["loss_full"]
        assert t["open_book_gain"] == pytest.approx(gain)
        assert (t["gap_closed"] is None) == (gain < 0.2)
        assert 0 <= t["greedy_bleu4"] <= 1 and 0 <= t["greedy_exact_match"] <= 1 and t["greedy_windows"] == 3
        assert len(t["recon_acc_by_context_eighth"]) == 8
    assert len(by["A-x4"]["test"]["recon_acc_by_group_position"]) == 4  # one tokenizer: in-group positions exist
    assert "recon_acc_by_group_position" not in by["B-adapt"]["test"]  # B's tokens are not the encoder's
    b = by["B-adapt"]
    assert b["adapted_from"] in ("A-x4", "A-x1") and b["trainable_parameters"] == b["projector_parameters"]
    assert b["spec"]["pooling_factor"] == by[b["adapted_from"]]["spec"]["pooling_factor"]
    assert (setup / "out" / "quality_lean.png").is_file()
    names = tarfile.open(setup / "out" / "logs.tar.gz").getnames()
    assert any(n.endswith("A-x4/log.json") for n in names) and any(n.endswith("probe.json") for n in names)
    assert rep["data"]["decoders"]["B"]["test"]["windows"] > 0


def test_group_steps_take_the_smallest(tmp_path):
    from quality_lean import VariantSpec, _group_steps

    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "other.json").write_text(json.dumps({"steps": 70}))
    assert _group_steps(VariantSpec(name="me"), 100, str(tmp_path / "g"), 2) == 70
    assert _group_steps(VariantSpec(name="solo"), 100, "", 1) == 100


def test_step_count_is_replanned_to_end_by_the_deadline_and_a_control_readapts_A(setup, tmp_path, monkeypatch):
    """The step count measured before the other variants start is re-fixed from real training steps,
    so a variant ends (schedule complete) by its phase's deadline instead of being cut mid-schedule;
    the re-adaptation control trains a fresh projector for A on the frozen encoder. The run reads a
    fake clock that advances 10 ms per reading, so the test does not depend on the machine's speed."""
    import time
    import types

    import quality_lean
    from quality_lean import VariantSpec, main, train_variant

    data = tmp_path / "data"
    assert main(["data", "--corpus", str(setup / "corpus"), "--decoder", f"A={setup / 'A'}", "--decoder",
                 f"B={setup / 'B'}", "--out", str(data), "--context", "16", "--target", "8", "--val-windows", "4",
                 "--test-windows", "4", "--workers", "1"]) == 0
    decoders = {"A": str(setup / "A"), "B": str(setup / "B")}
    kw = dict(batch_size=2, eval_batch=4, projector_hidden=16, greedy_windows=2, warmup_steps=0)
    clock = [time.time()]

    def now() -> float:
        clock[0] += 0.01
        return clock[0]

    monkeypatch.setattr(quality_lean, "time", types.SimpleNamespace(time=now, perf_counter=now, sleep=time.sleep))
    stop = clock[0] + 9  # fake seconds: a few hundred steps
    log = train_variant(VariantSpec(name="A-x4", time_budget=600, stop_at=stop, **kw), data, decoders, tmp_path, "cpu")
    r = log["steps_replanned"]
    assert r[0]["from"] > r[0]["to"] and r[-1]["to"] == log["steps_done"]  # 600 s of steps did not fit: fewer, all done
    assert "stopped_early" not in log and log["curve"][-1]["step"] == log["steps_done"]
    assert r[0]["peak_lr"] == pytest.approx([1e-3, 5e-3])  # the schedule's peak is kept
    monkeypatch.undo()
    log = train_variant(VariantSpec(name="A-readapt", decoder="A", adapt_from="A-x4", max_steps=3, time_budget=60, **kw),
                        data, decoders, tmp_path, "cpu")
    assert log["replaced_pretrained_projector"] == "A" and log["trainable_parameters"] == log["projector_parameters"]
