"""The decoder probe: numbers checked against direct computations on hand-built models."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from arc_encoder.probe import ProbeConfig, heldout_windows, probe_decoder, random_rows, token_nll
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

    def forward(self, input_ids, use_cache=False):
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


def test_probe_numbers_equal_a_direct_computation():
    cfg = ProbeConfig(induction_len=9, induction_rows=5, copy_len=12, context_len=10, continuation_len=6, batch_size=3,
                      seed=4)
    oracle = CopyOracle()
    passages = torch.randint(4, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    res = probe_decoder(oracle, passages, bos_id=BOS, vocab_size=VOCAB, exclude_ids=[0, 1, 2, 3], config=cfg)

    def copies(seqs, length):
        first, second = [], []
        for s in seqs.tolist():
            nll = direct_nll([BOS] + s + s, VOCAB, oracle.confidence)
            first += nll[1:length]  # copy-1 tokens 2..L
            second += nll[length + 1 : 2 * length]  # copy-2 tokens 2..L
        return mean(first), mean(second)

    rand = random_rows(VOCAB, 9, 5, [0, 1, 2, 3], seed=4)
    assert int(rand.min()) >= 4  # special ids are never drawn
    assert (res.induction_first, res.induction_second) == pytest.approx(copies(rand, 9), rel=1e-5)
    assert (res.copy_first, res.copy_second) == pytest.approx(copies(passages[:, :12], 12), rel=1e-5)
    closed, opened = [], []
    for p in passages.tolist():
        closed += direct_nll([BOS] + p[10:16], VOCAB, oracle.confidence)
        opened += direct_nll([BOS] + p[:16], VOCAB, oracle.confidence)[10:16]
    assert res.closed_book == pytest.approx(mean(closed), rel=1e-5)
    assert res.open_book == pytest.approx(mean(opened), rel=1e-5)
    assert res.open_book_gain == pytest.approx(mean(closed) - mean(opened), rel=1e-5)
    # A perfect copier: the second copy costs only the oracle's own uncertainty.
    hit = -math.log(math.exp(6) / (math.exp(6) + VOCAB - 1))
    assert res.induction_second < res.induction_first and res.induction_second >= hit - 1e-6
    assert res.passages == 4 and res.induction_rows == 5


def test_gates_and_failures():
    uniform = CopyOracle(confidence=0.0)  # every token costs log(V): nothing is copied
    passages = torch.randint(4, VOCAB, (3, 16), generator=torch.Generator().manual_seed(2))
    cfg = ProbeConfig(induction_len=8, induction_rows=3, copy_len=8, context_len=10, continuation_len=6)
    res = probe_decoder(uniform, passages, BOS, VOCAB, config=cfg)
    for value in (res.induction_first, res.induction_second, res.copy_second, res.closed_book, res.open_book):
        assert value == pytest.approx(math.log(VOCAB), rel=1e-5)
    assert res.gates() == {"induction": False, "copy": False, "open_book_gain": False} and not res.passed
    assert len(res.failures()) == 3 and "FAILED" in res.summary()
    # Passages without repeated tokens: the oracle's copy is never misled by an earlier match.
    distinct = torch.stack([torch.randperm(VOCAB - 4, generator=torch.Generator().manual_seed(i))[:16] + 4
                            for i in range(3)])
    good = probe_decoder(CopyOracle(confidence=12.0), distinct, BOS, VOCAB, config=cfg)
    assert good.gates()["induction"] and good.gates()["copy"]
    d = good.to_dict()
    assert d["gates"] == good.gates() and d["passed"] == good.passed


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
    with pytest.raises(ValueError, match="passages must be"):
        probe_decoder(CopyOracle(), torch.zeros(2, 5, dtype=torch.long), BOS, VOCAB)


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
    for key in ("induction_second", "copy_second", "open_book_gain"):
        assert rec[key] == pytest.approx(getattr(direct, key), rel=1e-4)
    loose = argv + ["--induction-max", "100", "--copy-max", "100", "--gain-min", "-100"]
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
    with pytest.raises(SystemExit) as exc:
        main(["probe", str(d / "dec"), "--data", str(d / "heldout.jsonl"), "--passages", "0"])
    assert exc.value.code == 2
