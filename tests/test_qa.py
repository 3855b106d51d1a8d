"""`arc_encoder.qa`, `arc-encoder eval make-qa` and `eval qa`: rows whose answers are only in their
passage, exact-match scoring, Wilson intervals, and the three prompts (closed, open, compressed)."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from arc_encoder import ARCConfig, ARCModel, freeze_decoder
from arc_encoder.corpus import read_corpus
from arc_encoder.cli.main import main
from arc_encoder.qa import (
    EXAMPLE,
    QAEvaluator,
    answer_contained,
    exact_match,
    first_line,
    make_qa_rows,
    normalize_answer,
    qa_jsonl,
    qa_prompt,
    read_qa_rows,
    wilson_interval,
)
from arc_encoder.samples import qa_sample
from arc_encoder.tiny import tiny_causal_lm, tiny_config
from conftest import make_encoder

RES = Path(__file__).resolve().parent.parent / "arc_encoder" / "resources"
CORPUS = RES / "pydoc_small" / "test.jsonl.gz"
TOKENIZER = RES / "tiny_lm"  # a real BPE trained on the bundled docs (1,024 tokens): realistic counts


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def corpus():
    return read_corpus(CORPUS)


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_make_qa_rows_are_valid(tok, corpus):
    ids, texts = corpus
    docs = dict(zip(map(str, ids), texts))
    rows = make_qa_rows(ids, texts, tok, per_kind=8, context_tokens=64, seed=3)
    assert [r["kind"] for r in rows] == ["needle", "span"] * 8  # interleaved: any prefix is balanced
    assert len({r["id"] for r in rows}) == 16
    for r in rows:
        ctx, q, a = r["context"], r["question"], r["answer"]
        assert r["source_id"] in docs
        assert q.startswith("\n\n" + EXAMPLE)  # blank line, then the worked example
        assert a.casefold() not in q.casefold()  # not guessable from the question
        if r["kind"] == "needle":
            key = re.fullmatch(r"What is the (\w+ \w+) code\?", q.removeprefix("\n\n" + EXAMPLE)).group(1)
            needle = f"The {key} code is {a}."
            assert re.fullmatch(r"\d{5,7}", a)
            assert ctx.count(a) == 1 and ctx.count(needle) == 1
            rest = " ".join(ctx.replace(needle, "").split())
            assert rest in " ".join(docs[r["source_id"]].split())  # a real passage, only the needle added
            assert not set(key.split()) & set(re.findall(r"\w+", rest.casefold()))
            assert n_tokens(tok, ctx) <= 64 + n_tokens(tok, " " + needle) + 1
        else:
            start = q.removeprefix("\n\n" + EXAMPLE + "Complete this sentence from the text: ")
            assert ctx.casefold().count(a.casefold()) == 1  # the answer occurs once in its passage
            assert ctx.count(start + " " + a) == 1  # ...right after the quoted start of its sentence
            assert ctx in docs[r["source_id"]]  # a real passage, whole sentences of one document
            assert n_tokens(tok, ctx) <= 64 and 1 <= n_tokens(tok, " " + a) <= 4
            assert not set(re.findall(r"\w+", a.casefold())) & set(re.findall(r"\w+", start.casefold()))
        # exactly what fine-tuning trains on: question + "\n" as the prompt, " " + answer + EOS as target
        sample = qa_sample(ctx, q, a, tok, tok)
        assert sample.prompt_ids == tok(qa_prompt(q), add_special_tokens=False)["input_ids"]
        assert sample.continuation_ids[:-1] == tok(" " + a, add_special_tokens=False)["input_ids"]


def test_make_qa_is_deterministic_and_seeded(tok, corpus):
    ids, texts = corpus
    a = qa_jsonl(make_qa_rows(ids, texts, tok, per_kind=5, context_tokens=64, seed=1))
    assert a == qa_jsonl(make_qa_rows(ids, texts, tok, per_kind=5, context_tokens=64, seed=1))
    assert a != qa_jsonl(make_qa_rows(ids, texts, tok, per_kind=5, context_tokens=64, seed=2))
    zero = make_qa_rows(ids, texts, tok, kinds=["span"], per_kind=3, context_tokens=64, seed=1, shots=0)
    assert [r["kind"] for r in zero] == ["span"] * 3
    assert all(r["question"].startswith("\n\nComplete this sentence") for r in zero)


def test_make_qa_excludes_sources_and_refuses_too_little_text(tok, corpus):
    ids, texts = corpus
    first = make_qa_rows(ids, texts, tok, per_kind=6, context_tokens=64, seed=0)
    used = {r["source_id"] for r in first}
    second = make_qa_rows(ids, texts, tok, per_kind=6, context_tokens=64, seed=0, exclude_sources=used)
    assert not used & {r["source_id"] for r in second}
    with pytest.raises(ValueError, match=r"only \d+ span rows .*27 documents excluded.*lower --per-kind"):
        make_qa_rows(ids, texts, tok, per_kind=6, context_tokens=64, exclude_sources=map(str, ids[:-1]))
    with pytest.raises(ValueError, match="not one of needle, span"):
        make_qa_rows(ids, texts, tok, kinds=["trivia"])


def test_make_qa_cli(tmp_path, capsys):
    out, other = tmp_path / "qa.jsonl", tmp_path / "train.jsonl"
    args = ["eval", "make-qa", str(CORPUS), str(out), "--tokenizer", str(TOKENIZER), "--per-kind", "4",
            "--context-tokens", "64", "--seed", "5"]
    assert main(args) == 0
    first = out.read_bytes()
    assert "wrote 8 QA rows (needle 4, span 4)" in capsys.readouterr().out
    assert main(args) == 0 and out.read_bytes() == first  # same inputs, same bytes
    rows = read_qa_rows(out)
    assert [sorted(r) for r in rows] == [sorted(["id", "kind", "context", "question", "answer", "source_id"])] * 8
    assert main(args[:3] + [str(other)] + args[4:] + ["--exclude", str(out)]) == 0
    assert not {r["source_id"] for r in rows} & {r["source_id"] for r in read_qa_rows(other)}
    capsys.readouterr()
    assert main(["eval", "make-qa", str(out), str(out), "--tokenizer", str(TOKENIZER)]) == 2
    assert "is the CORPUS file" in capsys.readouterr().err
    assert main(args[:3] + [str(other)] + args[4:] + ["--exclude", str(other)]) == 2
    assert "is the --exclude file" in capsys.readouterr().err
    assert main(args[:-2] + ["--per-kind", "5000"]) == 2
    assert "lower --per-kind" in capsys.readouterr().err


def test_normalisation_and_exact_match():
    assert normalize_answer('  "Structures."  ') == "structures"
    assert normalize_answer("`repr()`") == "repr()"  # parentheses are part of an identifier
    assert normalize_answer("3.8.") == "3.8"  # inner dots stay
    assert normalize_answer("Method  Resolution\tOrder!") == "method resolution order"
    assert exact_match("ValueError.", "valueerror") and exact_match("'4829173'", "4829173")
    assert not exact_match("48291730", "4829173") and not exact_match("The code is 4829173.", "4829173")
    assert answer_contained("The code is 4829173.", "4829173")
    assert not answer_contained("The code is 48291730.", "4829173")  # whole words only
    assert not answer_contained("anything", "...")  # nothing left of the answer: no match
    assert first_line("\n  ValueError\n\nComplete this sentence") == "ValueError"
    assert first_line(" 4829173") == "4829173" and first_line("") == ""


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4) and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(1, 20) == pytest.approx((0.0089, 0.2361), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


@pytest.fixture(scope="module")
def qa_setup(tmp_path_factory, tok, corpus):
    """A saved tiny checkpoint (x4, chunks of 32) with projector 'dec' for a saved tiny random decoder
    that uses the bundled BPE, and 3 + 3 QA rows of 64-token passages."""
    tmp = tmp_path_factory.mktemp("qa")
    enc = make_encoder("llama", pooling_factor=4, vocab_size=len(tok), chunk_len=32)
    model = ARCModel(ARCConfig(encoder=enc.config), enc, tok).eval()
    dec = freeze_decoder(tiny_causal_lm(tiny_config("qwen2", vocab_size=len(tok), hidden_size=24, num_heads=3,
                                                    num_kv_heads=1), seed=3))
    dec.save_pretrained(tmp / "dec")
    tok.save_pretrained(tmp / "dec")
    model.add_decoder("dec", dec, hidden_dim=16, decoder_path=str(tmp / "dec"), tokenizer=tok)
    ckpt = model.save_pretrained(tmp / "ck")
    ids, texts = corpus
    rows = make_qa_rows(ids, texts, tok, per_kind=3, context_tokens=64, seed=0)
    data = tmp / "qa.jsonl"
    data.write_text(qa_jsonl(rows))
    return model, dec, rows, ckpt, data


def test_eval_qa_prompts(qa_setup, tok):
    model, dec, rows, _, _ = qa_setup
    ev = QAEvaluator(model, dec, tok, "dec", max_new_tokens=2, batch_size=4)
    assert model.projector("dec").config.bos == "reference" and ev.prefix == [tok.bos_token_id]
    prompts = [tok(qa_prompt(r["question"]), add_special_tokens=False)["input_ids"] for r in rows]
    contexts = [tok(r["context"], add_special_tokens=False)["input_ids"] for r in rows]
    closed_prefix, closed_prompts = ev.text_inputs(rows, with_context=False)
    assert closed_prefix == [[tok.bos_token_id]] * len(rows) and closed_prompts == prompts  # no context at all
    open_prefix, open_prompts = ev.text_inputs(rows, with_context=True)
    assert open_prefix == [[tok.bos_token_id] + c for c in contexts] and open_prompts == prompts
    # the compressed prompt is the fine-tuning row's: [BOS][vectors][<Cont>][question + "\n"]
    samples = [qa_sample(r["context"], r["question"], r["answer"], tok, tok) for r in rows]
    assert [s.prompt_ids for s in samples] == prompts


def test_eval_qa_scores_forced_answers(qa_setup, tok, monkeypatch):
    """With generation forced to " <answer>\\n<junk>", every mode scores EM 1, with a wrong answer 0; the
    positions reported are the decoder's prefill."""
    model, dec, rows, _, _ = qa_setup
    ev = QAEvaluator(model, dec, tok, "dec", max_new_tokens=8, batch_size=4)
    answers = iter([])
    seen = []

    def fake_generate(inputs_embeds, attention_mask, **kw):
        seen.extend(attention_mask.sum(-1).tolist())  # what the decoder prefills, per row
        texts = [" " + next(answers) + "\nComplete this" for _ in range(inputs_embeds.shape[0])]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        width = max(map(len, ids))
        return torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])

    monkeypatch.setattr(dec, "generate", fake_generate)
    for context, pf in (("none", None), ("text", None), ("compressed", 4)):
        answers = iter([r["answer"] for r in rows])
        seen.clear()
        mode = ev.run_mode(rows, context, pf)
        assert mode.answers == [r["answer"] for r in rows]
        assert mode.positions == seen  # the positions reported are the ones prefilled
        report = mode.report(rows)
        assert report["overall"]["exact_match"] == 1.0 and report["overall"]["count"] == 6
        assert report["by_kind"]["needle"]["exact_match_ci95"] == pytest.approx([0.4385, 1.0], abs=1e-4)
        answers = iter(["wrong"] * len(rows))
        assert ev.run_mode(rows, context, pf).report(rows)["overall"]["exact_match"] == 0.0


def test_eval_qa_cli(qa_setup, tmp_path, capsys):
    _, _, rows, ckpt, data = qa_setup
    out = tmp_path / "qa.json"
    code = main(["eval", "qa", str(ckpt), "--decoder", "dec", "--data", str(data), "--pooling-factors", "2,4",
                 "--max-new-tokens", "3", "--batch-size", "4", "--output", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "closed_book" in printed and "compressed_x4" in printed
    res = json.loads(out.read_text())
    assert res["benchmark"] == "qa" and res["decoder"] == "dec" and res["rows"] == 6
    assert res["command"].startswith("arc-encoder eval qa ") and res["date"] and res["checkpoint"] == str(ckpt.resolve())
    modes = {m["mode"]: m for m in res["modes"]}
    assert list(modes) == ["closed_book", "open_book", "compressed_x2", "compressed_x4"]
    assert modes["compressed_x4"]["trained_factor"] and not modes["compressed_x2"]["trained_factor"]
    for m in modes.values():
        assert m["overall"]["count"] == 6 and {k: v["count"] for k, v in m["by_kind"].items()} == {"needle": 3, "span": 3}
        lo, hi = m["overall"]["exact_match_ci95"]
        assert 0.0 <= lo <= m["overall"]["exact_match"] <= hi <= 1.0
    pos = {k: m["overall"]["prefill_positions_mean"] for k, m in modes.items()}
    # counted as the command counts: the tokenizers as loaded from the checkpoint and the decoder's directory
    loaded = ARCModel.from_pretrained(ckpt)
    dec_tok = AutoTokenizer.from_pretrained(ckpt.parent / "dec")
    prompts = [len(dec_tok(qa_prompt(r["question"]), add_special_tokens=False)["input_ids"]) for r in rows]
    contexts = [len(dec_tok(r["context"], add_special_tokens=False)["input_ids"]) for r in rows]
    vectors4 = [sum(-(-len(c) // 4) for c in loaded.chunk(x)) for x in loaded.tokenize([r["context"] for r in rows])]
    assert pos["closed_book"] == pytest.approx(1 + sum(prompts) / 6)  # BOS + question: no context
    assert pos["open_book"] == pytest.approx(pos["closed_book"] + sum(contexts) / 6)
    assert pos["compressed_x4"] == pytest.approx(pos["closed_book"] + sum(vectors4) / 6 + 1)  # + <Cont>
    assert pos["closed_book"] < pos["compressed_x4"] < pos["compressed_x2"] < pos["open_book"]
    assert [p["id"] for p in res["predictions"]] == [r["id"] for r in rows]
    assert set(res["predictions"][0]) == {"id", "kind", "answer", "closed_book", "open_book", "compressed_x2",
                                          "compressed_x4"}
    assert main(["eval", "qa", str(ckpt), "--decoder", "dec", "--data", str(data), "--output", str(data)]) == 2
    assert "is the --data file" in capsys.readouterr().err
    assert main(["eval", "qa", str(ckpt), "--decoder", "dec", "--data", str(data), "--max-rows", "0"]) == 2
