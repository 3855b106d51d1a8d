"""The seams drawn by the restructure: each idea has one home, and the homes meet where the data flows.

* the decoder-input layout is a pure function (``arc_encoder.layout``) handed the projected marker;
* chunking holds the one context-length limit and the one pooling-factor check;
* decoder identity is kept in an explicit cache, never on the decoder object.
"""

import pytest
import torch

from arc_encoder import decoders, layout
from arc_encoder.chunking import length_problem
from arc_encoder.config import EncoderConfig
from arc_encoder.gguf import embedding_sha256
from conftest import make_model


def test_the_layout_is_a_pure_function_handed_the_marker():
    model, decoder = make_model()
    emb = decoder.get_input_embeddings()
    ctx = model.compress_documents([[[5, 6, 7, 8, 9], [10, 11]], [[12, 13, 14]]], "dec")
    prompts, targets, prefix = [[3, 4], [5]], [[6, 7, 8], [9]], [[1], [1]]
    marker = model.projector("dec").special_embedding("continuation")
    pure = layout.build_decoder_inputs(emb, ctx, prompts, targets, marker, prefix)
    via_model = model.build_decoder_inputs(emb, ctx, prompts, targets, "continuation", prefix)
    torch.testing.assert_close(pure.inputs_embeds, via_model.inputs_embeds)
    assert torch.equal(pure.attention_mask, via_model.attention_mask) and torch.equal(pure.labels, via_model.labels)
    # The marker follows every document: row 0 has two, row 1 one; without a marker embedding, none.
    bare = layout.build_decoder_inputs(emb, ctx, prompts, targets, None, prefix)
    assert (pure.attention_mask.sum(-1) - bare.attention_mask.sum(-1)).tolist() == [2, 1]
    vectors = ctx.document_lengths()
    assert torch.equal(pure.inputs_embeds[0, 1 + vectors[0][0]], marker.to(pure.inputs_embeds.dtype))


def test_one_context_length_limit(tokenizer, tmp_path):
    from arc_encoder.cache.build import check_document_lengths, tokenize_documents
    from arc_encoder.corpus import DocumentStream

    model, _ = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer), chunk_len=4, max_chunks=2)
    text = "one two three four five six seven eight nine ten eleven twelve"
    n = len(model.tokenize([text])[0])
    expected = length_problem(n, 4, 2, "context 0")
    assert expected.startswith(f"context 0 has {n} tokens, over the limit of 8 (2 chunks x 4 tokens)")
    with pytest.raises(ValueError) as compress_err:
        model.compress([text], "dec")
    with pytest.raises(ValueError) as cache_err:
        tokenize_documents(model, [text], ["doc"])
    with pytest.raises(ValueError) as early_err:
        check_document_lengths(DocumentStream(["doc"], [text]), tokenizer, 4, 2)
    assert str(compress_err.value) == expected
    assert str(cache_err.value) == expected.replace("context 0", "document 'doc'")
    assert str(early_err.value) == expected.replace("context 0", "document 'doc'") + " (nothing was written)"


def test_one_pooling_factor_check():
    model, _ = make_model(chunk_len=8)
    wording = r"pooling factor 9 is not an integer in \[1, chunk_len=8\]"
    with pytest.raises(ValueError, match=wording):
        EncoderConfig(base_model="x", chunk_len=8, pooling_factor=4, pooling_factors=(4, 9))
    with pytest.raises(ValueError, match=wording):
        model.encoder(torch.tensor([[5, 6, 7]]), pooling_factors=[9])
    with pytest.raises(ValueError, match="context 0: " + wording):
        model.compress([[5, 6, 7]], "dec", pooling_factors=9)


def test_decoder_identity_lives_in_an_explicit_cache():
    model, decoder = make_model()
    before = set(decoder.__dict__)
    sha = decoders.decoder_identity(decoder)
    model.check_decoder("dec", decoder)
    assert set(decoder.__dict__) == before  # nothing stored on the decoder object
    assert sha == model.projector("dec").config.decoder_sha256 == decoders.decoder_identity(decoder)
    # The identity is the embedding table's, whatever object holds it.
    assert sha == embedding_sha256(decoder.get_input_embeddings().weight.detach())


def test_one_corpus_reader_for_commands_and_training(tmp_path):
    import gzip
    import json

    from arc_encoder.corpus import file_format, read_corpus
    from arc_encoder_train.config import DataConfig
    from arc_encoder_train.data import iter_texts

    rows = [{"id": "a", "text": "First document."}, {"id": "b", "text": "  "}, {"id": "c", "text": "Third one."}]
    path = tmp_path / "docs.JSONL.gz"  # the suffix rule is one, case-insensitive, through the compression
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert file_format(path) == "json"
    ids, texts = read_corpus(path)
    assert ids == ["a", "b", "c"] and texts == [r["text"] for r in rows]
    spec = DataConfig(train_files=[str(path)], validation_files=[str(path)])
    assert list(iter_texts(spec, "train")) == [t for t in texts if t.strip()]
    with pytest.raises(ValueError, match=r"corpus .*x.csv: cannot tell the format from '.csv'"):
        file_format(tmp_path / "x.csv")


def test_one_cache_build_argument_group():
    """`arc-encoder cache build` and `arc-encoder-train cache-build` take the library's one group; each
    adds only where it runs (a device; Lightning's trainer settings)."""
    import argparse

    from arc_encoder.arguments import add_cache_build_arguments
    from arc_encoder.cli.main import build_parser
    from arc_encoder_train.cli import argparse_parser

    group = argparse.ArgumentParser()
    add_cache_build_arguments(group)
    shared = {a.dest for a in group._actions} - {"help"}
    one = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["cache"]
           ._subparsers._group_actions[0].choices["build"]._actions} - {"help", "func"}
    many = {a.dest for a in argparse_parser("cache-build")._actions} - {"help"}
    assert one - shared == {"device"}
    assert many - shared == {"model_dtype", "accelerator", "devices", "strategy"}
    assert shared <= one and shared <= many


def test_a_cache_is_read_without_a_model_and_answered_by_one():
    from arc_encoder.cache import format as cache_format
    from arc_encoder.cache.reader import CompressedCache

    assert not hasattr(CompressedCache, "generate")  # callers call model.generate(..., cache.context(...), ...)
    assert not any(name == "ARCModel" for name in vars(cache_format))
