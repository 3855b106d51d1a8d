import json

import pytest
import torch

from arc_encoder import ARCModel
from arc_encoder.checkpoint import verify_checkpoint
from arc_encoder.tiny import tiny_causal_lm, tiny_config
from conftest import make_model, rehash


@pytest.fixture
def saved(tmp_path, tokenizer):
    model, decoder = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer))
    model.eval()
    path = model.save_pretrained(tmp_path / "ckpt")
    return model, decoder, path


def test_save_load_identical_outputs(saved):
    model, _, path = saved
    loaded = ARCModel.from_pretrained(path).eval()
    texts = ["Python is a programming language.", "Exceptions signal errors."]
    with torch.no_grad():
        a, b = model.compress(texts, "dec"), loaded.compress(texts, "dec")
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.lengths, b.lengths)
    assert loaded.config == model.config
    assert verify_checkpoint(path) == []
    assert sorted(p.name for p in (path / "projectors").iterdir()) == ["dec.safetensors"]


def test_no_silent_overwrite(saved):
    model, _, path = saved
    with pytest.raises(FileExistsError, match="exists"):
        model.save_pretrained(path)
    model.save_pretrained(path, overwrite=True)
    assert verify_checkpoint(path) == []
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_truncated_file_names_the_file(saved):
    _, _, path = saved
    weights = path / "encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="encoder/model.safetensors: checksum mismatch"):
        ARCModel.from_pretrained(path)
    assert any("model.safetensors" in p for p in verify_checkpoint(path))
    with pytest.raises(ValueError, match=r"model.safetensors: \d+ bytes, manifest says \d+"):
        ARCModel.from_pretrained(path, verify=False)  # no hashing, but sizes are still checked


def test_mismatched_config_names_file_and_tensor(saved):
    _, _, path = saved
    cfg = json.loads((path / "arc_config.json").read_text())
    cfg["projectors"]["dec"]["hidden_dim"] = 18
    (path / "arc_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="arc_config.json: .*manifest says"):
        ARCModel.from_pretrained(path)  # an edited config no longer matches the manifest
    rehash(path, "arc_config.json")
    with pytest.raises(ValueError, match="dec.safetensors: tensor 'net.0.weight' has shape \\(16, 32\\), config expects \\(18, 32\\)"):
        ARCModel.from_pretrained(path)


def test_missing_pieces(saved, tmp_path):
    _, _, path = saved
    with pytest.raises(FileNotFoundError, match="arc_config.json is missing"):
        ARCModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no projector for decoder 'x'"):
        ARCModel.from_pretrained(path, decoders=["x"])
    (path / "projectors" / "dec.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="dec.safetensors: file is missing"):
        ARCModel.from_pretrained(path)


def test_adding_a_decoder_adds_one_file(saved):
    model, _, path = saved
    enc_bytes = (path / "encoder" / "model.safetensors").read_bytes()
    other = tiny_causal_lm(tiny_config("qwen2", vocab_size=57, hidden_size=20, num_heads=2, num_kv_heads=1))
    model.add_decoder("qwen-small", other, hidden_dim=12)
    model.save_projector("qwen-small", path)
    assert (path / "encoder" / "model.safetensors").read_bytes() == enc_bytes
    loaded = ARCModel.from_pretrained(path, decoders=["qwen-small"])
    assert list(loaded.projectors) == ["qwen-small"]
    torch.testing.assert_close(loaded.projector("qwen-small").special_tokens, model.projector("qwen-small").special_tokens)
    assert verify_checkpoint(path) == []


def test_dtype_round_trip(tmp_path):
    model, _ = make_model()
    model.to(torch.bfloat16)
    path = model.save_pretrained(tmp_path / "bf16")
    loaded = ARCModel.from_pretrained(path)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    x = [list(range(3, 12))]
    with torch.no_grad():
        assert torch.equal(model.compress(x, "dec").embeddings, loaded.compress(x, "dec").embeddings)


def test_bert_backbone_round_trip(tmp_path):
    from arc_encoder import ARCConfig
    from test_encoder import _tiny_bert_encoder

    enc = _tiny_bert_encoder(4)
    model = ARCModel(ARCConfig(encoder=enc.config), enc)
    model.add_decoder("dec", tiny_causal_lm(tiny_config("llama", vocab_size=50, hidden_size=24, num_heads=3, num_kv_heads=1)), hidden_dim=8)
    loaded = ARCModel.from_pretrained(model.save_pretrained(tmp_path / "b")).eval()
    x = [list(range(3, 14))]
    with torch.no_grad():
        assert torch.equal(model.eval().compress(x, "dec").embeddings, loaded.compress(x, "dec").embeddings)
