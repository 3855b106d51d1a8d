"""decoder_prefix_ids: a decoder's BOS where its tokenizer's own encoding puts one first, else nothing."""

import pytest
from tokenizers import processors

from arc_encoder.decoders import SAMPLE_TEXT, decoder_prefix_ids
from arc_encoder.tiny import train_tokenizer
from conftest import TEXT


@pytest.fixture()
def tok():
    return train_tokenizer([TEXT], vocab_size=300)  # <pad> 0, <s> 1, </s> 2, <unk> 3; no post-processor


def with_template(tok, single: str):
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>")}
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, i) for t, i in ids.items()])
    return tok


def test_no_bos_added_no_prefix(tok):
    assert tok.bos_token_id == 1 and tok(SAMPLE_TEXT)["input_ids"][0] != 1  # has a BOS, does not add it
    assert decoder_prefix_ids(tok) == []


@pytest.mark.parametrize("single, expected", [
    ("<s> $A", [1]),  # Llama / Gemma style: BOS first
    ("<s> $A </s>", [1]),  # BOS and EOS: the EOS is not a prefix
    ("$A </s>", []),  # EOS only (T5 style)
])
def test_prefix_follows_the_tokenizers_own_encoding(tok, single, expected):
    tok = with_template(tok, single)
    first = tok(SAMPLE_TEXT)["input_ids"]
    assert (first[0] == 1) == bool(expected)
    assert decoder_prefix_ids(tok) == expected
    assert getattr(tok, "add_bos_token", False) is False  # the attribute would have said "no BOS" every time


def test_no_bos_token_no_prefix(tok):
    tok = with_template(tok, "<s> $A")
    tok.bos_token = None
    assert tok.bos_token_id is None and decoder_prefix_ids(tok) == []
