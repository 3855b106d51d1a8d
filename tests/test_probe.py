"""The decoder probe: numbers checked against direct computations on hand-built models."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from arc_encoder.probe import (
    ProbeConfig,
    heldout_windows,
    mean_and_se,
    probe_decoder,
    random_rows,
    ratio_and_se,
    span_nll,
    token_nll,
    token_pool,
)
from arc_encoder.tiny import tiny_causal_lm, tiny_config

VOCAB = 37
BOS = 1


class CopyOracle(nn.Module):
    """Predicts the token that followed the last earlier occurrence of the current token
    (logit ``confidence`` on it, 0 elsewhere); with no earlier occurrence, uniform."""

    def __init__(self, vocab: int = VOCAB, confidence: float = 6.0) -> None:
        super().__init__()
        self.vocab, self.confidence = vocab, confidence
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, use_cache=False, **kwargs):
        self.calls += 1
        b, n = input_ids.shape
        logits = torch.zeros(b, n, self.vocab)
        for r in range(b):
            row = input_ids[r].tolist()
            for i in range(n):
                prev = [j for j in range(i) if row[j] == row[i]]
                if prev and prev[-1] + 1 < n:
                    logits[r, i, row[prev[-1] + 1]] = self.confidence
        return SimpleNamespace(logits=logits + 0 * self.dummy)


def direct_nll(row: list[int], vocab: int, confidence: float) -> list[float]:
    """CopyOracle's NLL of row[i + 1], for i = 0 .. n - 2, computed by hand."""
    hit = -math.log(math.exp(confidence) / (math.exp(confidence) + vocab - 1))
    miss_but_predicted = -math.log(1 / (math.exp(confidence) + vocab - 1))
    out = []
    for i in range(len(row) - 1):
        prev = [j for j in range(i) if row[j] == row[i]]
        if not prev:
            out.append(math.log(vocab))
        else:
            out.append(hit if row[prev[-1] + 1] == row[i + 1] else miss_but_predicted)
    return out


def mean(xs):
    return sum(xs) / len(xs)


def test_token_nll_matches_hf_shifted_loss_and_restores_train_mode():
    model = tiny_causal_lm(tiny_config("llama", vocab_size=VOCAB, hidden_size=24, num_heads=3, num_kv_heads=1,
                                       num_layers=2))
    model.train()
    ids = torch.randint(4, VOCAB, (5, 11), generator=torch.Generator().manual_seed(0))
    nll = token_nll(model, ids, batch_size=2)
    assert nll.shape == (5, 10) and model.training
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss  # HF shifts labels itself
    assert float(nll.mean()) == pytest.approx(float(ref), rel=1e-5)


def test_span_nll_head_path_equals_full_forward_and_restores_train_mode():
    model = tiny_causal_lm(tiny_config("gpt_neox", vocab_size=VOCAB, hidden_size=24, num_heads=3, num_layers=2))
    model.train()
    rows = torch.randint(4, VOCAB, (5, 12), generator=torch.Generator().manual_seed(3))
    spans = {"a": (1, 5), "b": (7, 12)}
    fast = span_nll(model, rows, spans, batch_size=2)
    full = span_nll(model, rows, spans, batch_size=3, head=False)
    assert model.training and fast["a"].shape == (5,)
    for k in spans:
        torch.testing.assert_close(fast[k], full[k], rtol=1e-5, atol=1e-5)
    every = token_nll(model, rows)  # [:, j - 1] scores token j
    torch.testing.assert_close(fast["b"], every[:, 6:11].mean(1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="spans must lie"):
        span_nll(model, rows, {"x": (0, 3)})


def expected(res_cfg, passages, rand, prefix, oracle):
    """Every probe number by hand from CopyOracle's per-token NLL, for rows built as the probe's docstring says."""
    L, n, c, t, w = (res_cfg.induction_len, res_cfg.copy_len, res_cfg.context_len, res_cfg.continuation_len,
                     res_cfg.window_len)
    p, skip = len(prefix), (0 if prefix else 1)
    out = {k: [] for k in ("ind1", "ind2", "cp1", "cp2", "closed", "open")}
    for s in rand.tolist():
        nll = direct_nll(prefix + s + s, VOCAB, oracle.confidence)  # nll[j - 1] scores token j
        out["ind1"].append(mean(nll[p : p + L - 1]))  # tokens p+1 .. p+L-1: copy 1 minus its first token
        out["ind2"].append(mean(nll[p + L : p + 2 * L - 1]))
    for row in passages.tolist():
        win = row[:w]
        nll = direct_nll(prefix + win + win[:n], VOCAB, oracle.confidence)
        out["cp1"].append(mean(nll[p : p + n - 1]))
        out["cp2"].append(mean(nll[p + w : p + w + n - 1]))
        out["open"].append(mean(nll[p + c - 1 + skip : p + c + t - 1]))
        nll = direct_nll(prefix + row[c : c + t], VOCAB, oracle.confidence)
        out["closed"].append(mean(nll[p - 1 + skip : p + t - 1]))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


@pytest.mark.parametrize("prefix", [[BOS], []])
def test_probe_numbers_equal_a_direct_computation(prefix):
    cfg = ProbeConfig(induction_len=9, induction_rows=5, copy_len=12, context_len=10, continuation_len=6, batch_size=3,
                      seed=4)
    oracle = CopyOracle()
    passages = torch.randint(4, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    res = probe_decoder(oracle, passages, prefix, VOCAB, exclude_ids=[0, 1, 2, 3], config=cfg)
    pool = token_pool(cfg, passages, VOCAB, [0, 1, 2, 3])
    assert torch.equal(pool, torch.unique(passages))  # "text": the passages' own distinct ids
    rand = random_rows(pool, 9, 5, seed=4)
    assert set(rand.flatten().tolist()) <= set(passages.flatten().tolist())
    e = expected(cfg, passages, rand, prefix, oracle)
    assert (res.induction_first, res.induction_second) == pytest.approx((float(e["ind1"].mean()), float(e["ind2"].mean())), rel=1e-5)
    assert (res.copy_first, res.copy_second) == pytest.approx((float(e["cp1"].mean()), float(e["cp2"].mean())), rel=1e-5)
    assert res.closed_book == pytest.approx(float(e["closed"].mean()), rel=1e-5)
    assert res.open_book == pytest.approx(float(e["open"].mean()), rel=1e-5)
    gain = e["closed"] - e["open"]
    assert res.open_book_gain == pytest.approx(float(gain.mean()), rel=1e-5, abs=1e-9)
    # ratios of means, standard errors by the delta method over rows
    for name, num, den in (("induction_ratio", e["ind2"], e["ind1"]), ("copy_ratio", e["cp2"], e["cp1"]),
                           ("gain_ratio", gain, e["closed"])):
        r = float(num.mean() / den.mean())
        se = float((num - r * den).std() / (math.sqrt(len(num)) * abs(den.mean())))
        assert getattr(res, name) == pytest.approx(r, rel=1e-5, abs=1e-9) and res.se[name] == pytest.approx(se, rel=1e-4,
                                                                                                       abs=1e-9)
    assert res.se["copy_first"] == pytest.approx(float(e["cp1"].std() / 2), rel=1e-4)
    # A perfect copier: the second copy costs only the oracle's own uncertainty.
    hit = -math.log(math.exp(6) / (math.exp(6) + VOCAB - 1))
    assert res.induction_second < res.induction_first and res.induction_second >= hit - 1e-6
    assert res.passages == 4 and res.induction_rows == 5 and res.prefix_ids == prefix and res.induction_tokens == len(pool)


def test_ratio_and_mean_standard_errors():
    num, den = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2.0, 2.0, 6.0])
    r, se = ratio_and_se(num, den)
    assert r == pytest.approx(7 / 10)
    resid = num - 0.7 * den  # [-0.4, 0.6, -0.2]
    assert se == pytest.approx(float(resid.std()) / (math.sqrt(3) * 10 / 3))
    assert mean_and_se(torch.tensor([1.0, 3.0])) == pytest.approx((2.0, math.sqrt(2) / math.sqrt(2)))
    assert ratio_and_se(torch.tensor([1.0]), torch.tensor([2.0])) == (0.5, None)
    assert mean_and_se(torch.tensor([1.0]))[1] is None


def test_token_pools():
    passages = torch.tensor([[5, 7, 7, 9], [9, 2, 5, 30]])
    text = token_pool(ProbeConfig(), passages, 40, exclude=[2])
    assert text.tolist() == [5, 7, 9, 30]
    vocab = token_pool(ProbeConfig(induction_tokens="vocabulary"), passages, 6, exclude=[0, 2, 99])
    assert vocab.tolist() == [1, 3, 4, 5]
    with pytest.raises(ValueError, match="needs the vocabulary size"):
        token_pool(ProbeConfig(induction_tokens="vocabulary"), passages, None, [])
    with pytest.raises(ValueError, match="at least 2 distinct"):
        random_rows(torch.tensor([4]), 3, 2)


def test_gates_and_failures():
    uniform = CopyOracle(confidence=0.0)  # every token costs log(V): nothing is copied
    passages = torch.randint(4, VOCAB, (3, 16), generator=torch.Generator().manual_seed(2))
    cfg = ProbeConfig(induction_len=8, induction_rows=3, copy_len=8, context_len=10, continuation_len=6)
    res = probe_decoder(uniform, passages, [BOS], VOCAB, config=cfg)
    for value in (res.induction_first, res.induction_second, res.copy_second, res.closed_book, res.open_book):
        assert value == pytest.approx(math.log(VOCAB), rel=1e-5)
    assert res.induction_ratio == pytest.approx(1.0) and res.copy_ratio == pytest.approx(1.0)
    assert res.gain_ratio == pytest.approx(0.0, abs=1e-6)
    assert res.gates() == {"induction": False, "copy": False, "open_book_gain": False} and not res.passed
    assert len(res.failures()) == 3 and "FAILED" in res.summary() and "> 0.5" in res.failures()[0]
    # Passages without repeated tokens, random tokens from 496 ids: the oracle's copy is rarely misled
    # by an earlier match (it follows the last one).
    distinct = torch.stack([torch.randperm(496, generator=torch.Generator().manual_seed(i))[:16] + 4 for i in range(3)])
    wide = ProbeConfig(induction_len=8, induction_rows=3, copy_len=8, context_len=10, continuation_len=6,
                       induction_tokens="vocabulary")
    good = probe_decoder(CopyOracle(vocab=500, confidence=12.0), distinct, [BOS], 500, [0, 1, 2, 3], config=wide)
    assert good.gates()["induction"] and good.gates()["copy"] and good.induction_ratio < 0.1
    d = good.to_dict()
    assert d["gates"] == good.gates() and d["passed"] == good.passed and d["se"]["induction_ratio"] is not None
    # the bounds are the config's: a loose config passes the non-reader
    loose = ProbeConfig(induction_len=8, induction_rows=3, copy_len=8, context_len=10, continuation_len=6,
                        induction_ratio_max=1.01, copy_ratio_max=1.01, gain_ratio_min=-0.01)
    assert probe_decoder(uniform, passages, [BOS], VOCAB, config=loose).passed


def test_heldout_windows_are_seeded_and_skip_short_documents():
    docs = [list(range(100, 100 + n)) for n in (5, 40, 12, 30, 3)]
    w = heldout_windows(docs, 10, count=10, seed=0)
    assert w.shape == (3, 10)  # only the three documents with >= 10 tokens
    for row in w.tolist():
        assert row == list(range(row[0], row[0] + 10))  # contiguous slices of one document
    assert torch.equal(w, heldout_windows(docs, 10, count=10, seed=0))
    assert heldout_windows(docs, 10, count=2, seed=0).shape == (2, 10)
    with pytest.raises(ValueError, match="no document"):
        heldout_windows(docs, 41, count=1)


def test_bad_inputs():
    with pytest.raises(ValueError, match="probe.copy_len"):
        ProbeConfig(copy_len=1)
    with pytest.raises(ValueError, match="probe.passages"):
        ProbeConfig(passages=0)
    with pytest.raises(ValueError, match="probe.induction_tokens"):
        ProbeConfig(induction_tokens="random")
    with pytest.raises(ValueError, match="passages must be"):
        probe_decoder(CopyOracle(), torch.zeros(2, 5, dtype=torch.long), [BOS], VOCAB)


def heldout_texts() -> list[str]:
    import gzip
    import json

    path = Path(resources_dir()) / "pydoc_small" / "test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def test_bundled_tiny_decoder_does_not_read_its_context():
    """The bundled tiny decoder (a real trained LM, 0.6M params) is a non-reader: every ratio near or past 1."""
    from arc_encoder.decoders import load_frozen_decoder
    from arc_encoder.probe import probe_texts

    model, tok = load_frozen_decoder(str(Path(resources_dir()) / "tiny_lm"), "cpu", torch.float32)
    res = probe_texts(model, tok, heldout_texts(), ProbeConfig(passages=4, induction_rows=4))
    assert res.prefix_ids == [] and not any(res.gates().values())
    assert res.induction_ratio > 0.9 and res.copy_ratio > 0.9 and res.gain_ratio < 0


def resources_dir() -> str:
    from arc_encoder.resources import __file__ as resources

    return str(Path(resources).parent)


SMOLLM2 = Path("/work/models/smollm2")


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason=f"needs the converted SmolLM2-135M-Instruct directory {SMOLLM2}")
def test_real_llm_passes_the_gates():
    """SmolLM2-135M reads its context: all three gates with a wide margin (4 passages, 4 induction rows)."""
    from arc_encoder.decoders import load_frozen_decoder
    from arc_encoder.probe import probe_texts

    model, tok = load_frozen_decoder(str(SMOLLM2), "cpu", torch.float32)
    res = probe_texts(model, tok, heldout_texts(), ProbeConfig(passages=4, induction_rows=4))
    assert res.prefix_ids == []  # its tokenizer adds no BOS (its bos_token is the chat marker <|im_start|>)
    assert res.passed, res.summary()
    assert res.induction_ratio < 0.25 and res.copy_ratio < 0.25 and res.gain_ratio > 0.12, res.summary()
    assert res.induction_first > 8 and res.induction_second > 0.5  # an absolute gate of 0.5 nats would refuse it


# ------------------------------------------------------------------ `arc-encoder probe` (CLI)
@pytest.fixture(scope="module")
def saved_decoder(tmp_path_factory):
    """A tiny random Llama saved with its own small BPE tokenizer, and held-out texts for it."""
    import json

    from arc_encoder.tiny import train_tokenizer
    from conftest import TEXT

    d = tmp_path_factory.mktemp("probe")
    tok = train_tokenizer([TEXT], vocab_size=300)
    model = tiny_causal_lm(tiny_config("llama", vocab_size=len(tok), hidden_size=24, num_heads=3, num_kv_heads=1,
                                       num_layers=2))
    model.save_pretrained(d / "dec")
    tok.save_pretrained(d / "dec")
    texts = [" ".join([TEXT] * 6), " ".join([TEXT] * 5), "short text"]
    (d / "heldout.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    (d / "short.jsonl").write_text(json.dumps({"id": "0", "text": "too short to probe"}) + "\n")
    return d, model, tok, texts


def test_probe_command_gates_exit_codes_and_json(saved_decoder, capsys):
    import json

    from arc_encoder.cli.main import main
    from arc_encoder.probe import probe_texts

    d, model, tok, texts = saved_decoder
    argv = ["probe", str(d / "dec"), "--data", str(d / "heldout.jsonl"), "--device", "cpu", "--passages", "2",
            "--json", str(d / "p.json")]
    assert main(argv) == 1  # a random model copies nothing
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("arc-encoder probe: gate missed:") and "induction" in err[0]
    rec = json.loads((d / "p.json").read_text())
    direct = probe_texts(model.eval(), tok, texts, count=2)
    assert rec["passages"] == 2 and rec["passed"] is False and rec["gates"] == direct.gates()
    for key in ("induction_second", "copy_second", "open_book_gain", "induction_ratio", "copy_ratio", "gain_ratio"):
        assert rec[key] == pytest.approx(getattr(direct, key), rel=1e-4)
    assert rec["prefix_ids"] == [] and rec["se"]["induction_ratio"] > 0 and rec["config"]["induction_tokens"] == "text"
    assert rec["peak_rss_mib"] > 0 and 0 <= rec["load_seconds"] <= rec["seconds"]
    loose = argv + ["--induction-ratio-max", "100", "--copy-ratio-max", "100", "--gain-ratio-min", "-100"]
    assert main(loose) == 0
    assert json.loads((d / "p.json").read_text())["passed"] is True


def test_probe_command_bad_input_is_one_error_line(saved_decoder, capsys, tmp_path):
    from arc_encoder.cli.main import main

    d = saved_decoder[0]
    for argv, message in (
        (["probe", str(tmp_path / "nope"), "--data", str(d / "heldout.jsonl")], "does not exist"),
        (["probe", str(d / "dec"), "--data", str(d / "short.jsonl"), "--device", "cpu"], "320 decoder tokens"),
        (["probe", str(d / "dec"), "--data", str(tmp_path / "none.jsonl"), "--device", "cpu"], "no such file"),
    ):
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("arc-encoder probe: error:") and message in err[0], err
    for bad in (["--passages", "0"], ["--induction-max", "1.0"], ["--induction-tokens", "random"]):
        with pytest.raises(SystemExit) as exc:  # --induction-max: the absolute gate is gone, not reinterpreted
            main(["probe", str(d / "dec"), "--data", str(d / "heldout.jsonl"), *bad])
        assert exc.value.code == 2
