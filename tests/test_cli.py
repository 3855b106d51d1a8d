import pytest
import torch
from safetensors.torch import load_file

from arc_encoder import ARCModel
from arc_encoder.cli.main import main
from conftest import make_model, saved_generate_model


@pytest.fixture
def ckpt(tmp_path, tokenizer):
    model, decoder = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer))
    return model.save_pretrained(tmp_path / "ckpt"), model


def test_compress_writes_what_compress_returns(ckpt, tmp_path, capsys):
    path, model = ckpt
    out = tmp_path / "c.safetensors"
    assert main(["compress", str(path), "--decoder", "dec", "--text", "A list is mutable.", "--text", "Exceptions", "--output", str(out), "--device", "cpu"]) == 0
    got = load_file(out)
    with torch.no_grad():
        ref = model.eval().compress(["A list is mutable.", "Exceptions"], "dec")
    torch.testing.assert_close(got["embeddings"], ref.embeddings)
    assert got["lengths"].tolist() == ref.lengths.tolist()
    assert "compressed 2 texts" in capsys.readouterr().out


def test_init_from_local_pretrained_lm(tmp_path, tokenizer, capsys):
    from arc_encoder.tiny import tiny_causal_lm, tiny_config

    lm = tiny_causal_lm(tiny_config("mistral", vocab_size=len(tokenizer)))
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    dec = tiny_causal_lm(tiny_config("qwen2", vocab_size=len(tokenizer), hidden_size=24, num_heads=3, num_kv_heads=1))
    dec.save_pretrained(tmp_path / "dec")
    assert main(["init", str(tmp_path / "ck"), "--base-model", str(tmp_path / "lm"), "--layers-removed", "1",
                 "--decoder", f"q={tmp_path / 'dec'}", "--projector-hidden", "16"]) == 0
    model = ARCModel.from_pretrained(tmp_path / "ck")
    assert len(model.encoder.backbone.layers) == 2
    # The encoder's weights are the LM's own (first two blocks).
    torch.testing.assert_close(model.encoder.backbone.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)
    assert model.projector("q").config.output_dim == 24
    assert main(["verify", str(tmp_path / "ck")]) == 0
    assert main(["info", str(tmp_path / "ck")]) == 0
    assert "pooling      trained at x4; default x4" in capsys.readouterr().out


def test_cli_errors_are_clear(ckpt, tmp_path, capsys):
    path, _ = ckpt
    assert main(["compress", str(path), "--decoder", "nope", "--text", "x", "--output", str(tmp_path / "o")]) == 2
    assert "no projector for decoder 'nope'" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "arc_config.json is missing" in capsys.readouterr().err
    (path / "projectors" / "dec.safetensors").write_bytes(b"garbage")
    assert main(["verify", str(path)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_help_explains_every_command(capsys):
    for cmd in ["init", "info", "verify", "compress", "generate"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "--pooling-factor" in capsys.readouterr().out


def test_generate_cli_matches_library(tmp_path, tokenizer, capsys):
    ckpt, expected = saved_generate_model(tmp_path, tokenizer)
    assert main(["generate", str(ckpt), "--decoder", "q", "--context", "A list is mutable.", "--prompt", "Lists are",
                 "--max-new-tokens", "6", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected


def test_compress_with_pooling_override_and_adaptive(tmp_path, capsys, tokenizer):
    import json

    from safetensors import safe_open

    from conftest import TEXT

    model, _ = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer), chunk_len=16, pooling_factors=(2, 4, 8))
    path = model.save_pretrained(tmp_path / "mixed")
    texts = [TEXT[:150], "the " * 30]
    args = ["compress", str(path), "--decoder", "dec", "--text", texts[0], "--text", texts[1], "--device", "cpu"]
    assert main(args + ["--output", str(tmp_path / "x8.st"), "--pooling-factor", "8"]) == 0
    with torch.no_grad():
        ref = model.eval().compress(texts, "dec", 8)
    with safe_open(str(tmp_path / "x8.st"), "pt") as f:
        assert torch.equal(f.get_tensor("lengths"), ref.lengths)
        assert json.loads(f.metadata()["pooling_factors"]) == 8
    assert main(args + ["--output", str(tmp_path / "ad.st"), "--adaptive", "--adaptive-strength", "2"]) == 0
    with safe_open(str(tmp_path / "ad.st"), "pt") as f:
        plan = json.loads(f.metadata()["pooling_factors"])
        lengths = f.get_tensor("lengths")
    ids = model.tokenize(texts)
    assert [len(p) for p in plan] == [len(model.chunk(x)) for x in ids]
    assert int(lengths.sum()) <= sum(-(-len(c) // 4) for x in ids for c in model.chunk(x))
    assert max(plan[1]) == 8  # the repetitive text is pooled coarsest
    capsys.readouterr()
    assert main(args + ["--output", str(tmp_path / "x3.st"), "--pooling-factor", "3"]) == 0
    assert "never trained" in capsys.readouterr().err
