"""A "lora" encoder: adapters + last blocks train, the checkpoint is a small delta on a named base."""

import pytest
import torch

from arc_encoder import ARCModel, EncoderConfig
from arc_encoder.gguf import weights_identity
from arc_encoder.lora import LoRALinear
from arc_encoder.tiny import tiny_causal_lm, tiny_config

from conftest import TEXT


def _base(path, tokenizer, seed):
    lm = tiny_causal_lm(tiny_config(vocab_size=len(tokenizer), hidden_size=32, num_layers=4, num_heads=4,
                                    num_kv_heads=2), seed=seed)
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return lm


def _lora_model(tmp_path, tokenizer, **cfg):
    base = tmp_path / "base"
    _base(base, tokenizer, seed=5)
    config = EncoderConfig(base_model=str(base), layers_removed=1, tuning="lora", lora_rank=3, lora_alpha=6.0,
                           chunk_len=16, **cfg)
    model = ARCModel.from_base_model(config, torch_dtype=torch.float32)
    decoder = tiny_causal_lm(tiny_config(vocab_size=len(tokenizer), hidden_size=24, num_heads=3, num_kv_heads=1,
                                         num_layers=2), seed=2)
    model.add_decoder("dec", decoder, hidden_dim=16)
    return model, base


def _train_a_little(model):
    """Stand-in for training: every trainable tensor moves (B starts at zero, so the adapters matter)."""
    model.encoder.set_trainable(True)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def test_lora_trains_only_adapters_and_the_last_block(tmp_path, tokenizer):
    model, base = _lora_model(tmp_path, tokenizer)
    enc = model.encoder
    assert enc.config.base_sha256 == weights_identity(base)
    wrapped = [m for m in enc.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 7 * (len(enc.blocks) - 1)  # q k v o gate up down in every block but the pooled one
    enc.set_trainable(True)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    last = f"backbone.layers.{len(enc.blocks) - 1}."
    assert trainable == {n for n in enc.delta_state_dict()}
    assert all(n.endswith(("lora_A", "lora_B")) or n.startswith(last) for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    enc.set_trainable(False)
    assert not any(p.requires_grad for p in enc.parameters())


def test_untrained_adapters_compute_the_base_encoder(tmp_path, tokenizer):
    model, base = _lora_model(tmp_path, tokenizer)
    plain = ARCModel.from_base_model(EncoderConfig(base_model=str(base), layers_removed=1, chunk_len=16),
                                     torch_dtype=torch.float32)
    ids = [tokenizer(TEXT, add_special_tokens=False)["input_ids"][:29]]
    a = model.encoder(torch.tensor(ids)).hidden_states
    b = plain.encoder(torch.tensor(ids)).hidden_states
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_delta_round_trip_equals_the_trained_model(tmp_path, tokenizer):
    model, base = _lora_model(tmp_path, tokenizer)
    _train_a_little(model)
    model.eval()
    texts = [TEXT[:200], TEXT[50:400]]
    before = model.compress(texts, "dec")
    out = model.save_pretrained(tmp_path / "ck")
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert "encoder/delta.safetensors" in files and "encoder/model.safetensors" not in files
    full = sum(p.numel() for p in model.encoder.parameters()) * 4
    assert files["encoder/delta.safetensors"] < full / 2  # adapters + one block of four, not the encoder
    loaded = ARCModel.from_pretrained(out).eval()
    after = loaded.compress(texts, "dec")
    torch.testing.assert_close(after.embeddings, before.embeddings, rtol=0, atol=0)
    assert loaded.config.encoder.base_sha256 == model.config.encoder.base_sha256
    # Saved again, it is the same delta (training can continue from a loaded delta).
    again = loaded.save_pretrained(tmp_path / "ck2")
    assert (again / "encoder/delta.safetensors").read_bytes() == (out / "encoder/delta.safetensors").read_bytes()


def test_a_delta_refuses_another_base(tmp_path, tokenizer):
    model, base = _lora_model(tmp_path, tokenizer)
    out = model.save_pretrained(tmp_path / "ck")
    other = tmp_path / "other"
    _base(other, tokenizer, seed=6)  # same shapes, other weights
    with pytest.raises(ValueError, match="not the base this encoder was trained on"):
        ARCModel.from_pretrained(out, base_model=str(other))


def test_a_missing_base_is_one_clear_error(tmp_path, tokenizer, monkeypatch):
    model, base = _lora_model(tmp_path, tokenizer)
    out = model.save_pretrained(tmp_path / "ck")
    monkeypatch.setenv("ARC_ENCODER_HOME", str(tmp_path / "home"))
    import shutil

    shutil.rmtree(base)
    with pytest.raises(FileNotFoundError, match="convert-gguf"):
        ARCModel.from_pretrained(out)


def test_lora_config_is_validated():
    with pytest.raises(ValueError, match="tuning"):
        EncoderConfig(base_model="x", tuning="qlora")
    with pytest.raises(ValueError, match="lora_rank"):
        EncoderConfig(base_model="x", lora_rank=0)
    with pytest.raises(ValueError, match="lora_targets"):
        EncoderConfig(base_model="x", lora_targets=[])


def test_a_shipped_checkpoint_finds_its_base_and_decoder_among_converted_models(tmp_path, tokenizer, monkeypatch):
    """On a new machine the recorded paths do not exist; the converted known models are found by identity."""
    import shutil

    from arc_encoder.decoders import resolve_decoder_path
    from arc_encoder.gguf import known_model_dir
    from arc_encoder.storage import atomic_write_json

    home = tmp_path / "home"
    monkeypatch.setenv("ARC_ENCODER_HOME", str(home))
    model, base = _lora_model(tmp_path, tokenizer)
    decoder_dir = tmp_path / "decoder"
    decoder = tiny_causal_lm(tiny_config(vocab_size=len(tokenizer), hidden_size=24, num_heads=3, num_kv_heads=1,
                                         num_layers=2), seed=2)
    decoder.save_pretrained(decoder_dir)
    tokenizer.save_pretrained(decoder_dir)
    model.projectors.pop("dec")
    model.config.projectors.pop("dec")
    model.add_decoder("dec", decoder, hidden_dim=16, decoder_path=str(decoder_dir))
    out = model.save_pretrained(tmp_path / "ck")
    # "Convert" both onto the new machine, then lose the recorded locations.
    shutil.move(str(base), known_model_dir("smollm2-135m"))
    atomic_write_json(known_model_dir("smollm2-135m") / "provenance.json",
                      {"weights_sha256": weights_identity(known_model_dir("smollm2-135m"))})
    shutil.move(str(decoder_dir), known_model_dir("gemma3-270m"))
    loaded = ARCModel.from_pretrained(out)
    found = resolve_decoder_path("dec", loaded.projector("dec").config, loaded.checkpoint_dir)
    assert found == str(known_model_dir("gemma3-270m"))
    decoder2, _, _ = loaded.load_decoder("dec")
    assert decoder2.config.hidden_size == 24
