"""Shared fixtures: tiny random models with odd sizes, no network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One CPU thread per process (inherited by the processes tests launch): the models are tiny, and
# on a 2-core CI machine several processes with 2 threads each contend, doubling the suite's time.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from arc_encoder import ARCConfig, ARCEncoder, ARCModel, EncoderConfig
from arc_encoder.tiny import tiny_causal_lm, tiny_config, train_tokenizer

FAMILIES = ["llama", "mistral", "qwen2"]

TEXT = (
    "The quick brown fox jumps over the lazy dog. Python is a programming language that lets "
    "you work quickly and integrate systems more effectively. A list is a mutable sequence. "
    "Dictionaries map hashable keys to arbitrary values. Exceptions signal errors. "
) * 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer([TEXT], vocab_size=300)


def make_encoder(family="llama", pooling_factor=4, vocab_size=99, **cfg) -> ARCEncoder:
    enc_cfg = EncoderConfig(base_model=f"tiny-{family}", pooling_factor=pooling_factor,
                            layers_removed=cfg.pop("layers_removed", 1), **cfg)
    torch.manual_seed(1)
    return ARCEncoder.from_base_model(enc_cfg, backbone_config=tiny_config(family, vocab_size=vocab_size))


def make_model(family="llama", dec_family="llama", pooling_factor=4, tokenizer=None, vocab_size=99,
               dec_vocab=101, **cfg):
    """ARCModel with one projector 'dec' for a tiny decoder of another width (24 vs 32)."""
    enc = make_encoder(family, pooling_factor, vocab_size=vocab_size, **cfg)
    model = ARCModel(ARCConfig(encoder=enc.config), enc, tokenizer)
    decoder = tiny_causal_lm(tiny_config(dec_family, vocab_size=dec_vocab, hidden_size=24,
                                         num_heads=3, num_kv_heads=1, num_layers=2), seed=2)
    model.add_decoder("dec", decoder, hidden_dim=16)
    return model, decoder


def rehash(checkpoint, rel: str) -> None:
    """Record file ``rel``'s current sha256 and size in the checkpoint's manifest: a checkpoint whose
    files agree with its manifest but not with each other (what the tensor checks are for)."""
    import json
    from pathlib import Path

    from arc_encoder.storage import sha256_file

    path = Path(checkpoint) / "manifest.json"
    manifest = json.loads(path.read_text())
    target = Path(checkpoint) / rel
    manifest["files"][rel] = {"sha256": sha256_file(target), "bytes": target.stat().st_size}
    path.write_text(json.dumps(manifest))


def saved_generate_model(tmp_path, tokenizer):
    """A saved checkpoint with projector 'q' for a saved tiny decoder, and the library's greedy
    6-token answer to "Lists are" after the context "A list is mutable."."""
    from arc_encoder import freeze_decoder
    from arc_encoder.tiny import tiny_causal_lm

    enc = make_encoder("llama", vocab_size=len(tokenizer))
    model = ARCModel(ARCConfig(encoder=enc.config), enc, tokenizer).eval()
    dec = freeze_decoder(tiny_causal_lm(tiny_config("qwen2", vocab_size=len(tokenizer), hidden_size=24, num_heads=3,
                                                    num_kv_heads=1)))
    dec.save_pretrained(tmp_path / "dec")
    tokenizer.save_pretrained(tmp_path / "dec")
    model.add_decoder("q", dec, hidden_dim=16, decoder_path=str(tmp_path / "dec"))
    ckpt = model.save_pretrained(tmp_path / "ck")
    expected = model.generate(dec, tokenizer, "q", ["A list is mutable."], ["Lists are"], max_new_tokens=6,
                              do_sample=False)[0]
    return ckpt, expected
