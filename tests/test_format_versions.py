"""Format 2 configs are strict; format-1 checkpoints load with the settings they were trained with."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import rehash
import torch
from safetensors.torch import load_file

from arc_encoder import ARCConfig, ARCModel, EncoderConfig, ProjectorConfig
from arc_encoder.checkpoint import verify_checkpoint
from arc_encoder.config import FORMAT_VERSION, LEGACY_ENCODER_OPTIONS, LEGACY_PROJECTOR_OPTIONS, upgrade_v1
from arc_encoder.tiny import tiny_causal_lm, tiny_config

V1 = Path(__file__).resolve().parent / "fixtures" / "v1_tiny"  # written by the format-1 code (fixtures/make_v1_fixture.py)


def test_defaults_are_the_reference_and_legacy_options_are_explicit():
    enc = EncoderConfig(base_model="m")
    assert (enc.pooled_residual, enc.final_norm, enc.pooled_query_input, enc.pooling_groups) == (
        True, False, "pooled_hidden", "balanced")
    proj = ProjectorConfig(input_dim=4, output_dim=5)
    assert (proj.bias, proj.special_token_space, proj.activation) == (False, "encoder", "none")
    legacy = EncoderConfig(base_model="m", **LEGACY_ENCODER_OPTIONS)
    assert (legacy.pooled_residual, legacy.final_norm, legacy.pooled_query_input, legacy.pooling_groups) == (
        False, True, "pooled_queries", "fixed_tail")


@pytest.mark.parametrize("kwargs, field", [
    ({"pooled_residual": "no"}, "pooled_residual"),
    ({"final_norm": 1}, "final_norm"),
    ({"pooling_factor": True}, "pooling_factor"),
    ({"pooling_factor": "4"}, "pooling_factor"),
    ({"layers_removed": False}, "layers_removed"),
    ({"chunk_len": 8.0}, "chunk_len"),
    ({"pooling_factors": "248"}, "pooling_factors"),
    ({"pooling_factors": [4, True]}, "pooling_factors"),
    ({"pooled_query_input": "mean"}, "pooled_query_input"),
    ({"pooling_groups": "tail"}, "pooling_groups"),
    ({"pooled_query_positions": "group_mean"}, "pooled_query_input='pooled_queries'"),
])
def test_strict_encoder_types(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EncoderConfig(base_model="m", **kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"bias": "yes"}, "bias"),
    ({"hidden_dim": True}, "hidden_dim"),
    ({"decoder_vocab_size": "32000"}, "decoder_vocab_size"),
    ({"special_token_space": "vocab"}, "special_token_space"),
    ({"special_tokens": "continuation"}, "special_tokens"),
])
def test_strict_projector_types(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ProjectorConfig(input_dim=4, output_dim=5, **kwargs)


def test_v1_config_maps_explicitly_never_to_new_defaults():
    data = json.loads((V1 / "arc_config.json").read_text())
    assert data["format_version"] == 1 and "pooling_groups" not in data["encoder"]
    cfg = ARCConfig.from_dict(data)
    assert cfg.format_version == FORMAT_VERSION
    for key, value in LEGACY_ENCODER_OPTIONS.items():
        assert getattr(cfg.encoder, key) == value, key
    for key, value in LEGACY_PROJECTOR_OPTIONS.items():
        assert getattr(cfg.projectors["dec"], key) == value, key
    # A recorded format-1 value wins over the format-1 default ...
    data["encoder"]["pooled_residual"] = True
    assert ARCConfig.from_dict(data).encoder.pooled_residual is True
    # ... but a format-2 key in a format-1 file is not a file we wrote.
    data["encoder"]["pooling_groups"] = "balanced"
    with pytest.raises(ValueError, match=r"format_version 1 config: encoder: unknown keys \['pooling_groups'\]"):
        upgrade_v1(data)


def test_missing_or_unknown_format_version_is_refused():
    data = ARCConfig(encoder=EncoderConfig(base_model="m")).to_dict()
    assert ARCConfig.from_dict(data) == ARCConfig(encoder=EncoderConfig(base_model="m"))
    del data["format_version"]
    with pytest.raises(ValueError, match="format_version is missing"):
        ARCConfig.from_dict(data)
    with pytest.raises(ValueError, match="format_version 3 is not supported"):
        ARCConfig.from_dict({**data, "format_version": 3})


def test_v1_checkpoint_reproduces_the_v1_code_outputs():
    model = ARCModel.from_pretrained(V1).eval()
    expected = load_file(str(V1.parent / "v1_tiny_expected.safetensors"))
    contexts = [row[row != 0].tolist() for row in expected["contexts"]]
    with torch.no_grad():
        ctx = model.compress(contexts, "dec")
        marker = model.projector("dec").special_embedding("continuation")
    assert ctx.lengths.tolist() == expected["lengths"].tolist() == [3, 2]
    torch.testing.assert_close(ctx.embeddings, expected["embeddings"], atol=1e-6, rtol=0)
    torch.testing.assert_close(marker, expected["continuation"], atol=0, rtol=0)
    # the format-1 tensors: biases and decoder-space special tokens
    assert model.projector("dec").special_tokens.shape == (2, 12)
    assert model.projector("dec").net[0].bias is not None


def test_v1_checkpoint_gains_a_projector_and_becomes_format_2(tmp_path):
    path = tmp_path / "v1"
    shutil.copytree(V1, path)
    model = ARCModel.from_pretrained(path)
    model.add_decoder("new", tiny_causal_lm(tiny_config("llama", vocab_size=23, hidden_size=8, num_heads=2,
                                                        num_kv_heads=1, num_layers=1)), hidden_dim=6)
    model.save_projector("new", path)
    assert json.loads((path / "arc_config.json").read_text())["format_version"] == FORMAT_VERSION
    assert json.loads((path / "manifest.json").read_text())["format_version"] == FORMAT_VERSION
    assert verify_checkpoint(path) == []
    again = ARCModel.from_pretrained(path).eval()
    assert again.config.encoder.pooling_groups == "fixed_tail"  # the old encoder keeps its semantics
    assert again.config.projectors["dec"].bias and not again.config.projectors["new"].bias
    assert again.projector("new").special_tokens.shape == (2, 16)  # encoder space
    expected = load_file(str(V1.parent / "v1_tiny_expected.safetensors"))
    with torch.no_grad():
        ctx = again.compress([row[row != 0].tolist() for row in expected["contexts"]], "dec")
    torch.testing.assert_close(ctx.embeddings, expected["embeddings"], atol=1e-6, rtol=0)


def test_v1_projector_file_refused_by_a_format_2_projector(tmp_path):
    path = tmp_path / "v1"
    shutil.copytree(V1, path)
    cfg = json.loads((path / "arc_config.json").read_text())
    cfg["format_version"] = FORMAT_VERSION  # claims format 2: no legacy mapping, so the tensors do not fit
    (path / "arc_config.json").write_text(json.dumps(cfg))
    rehash(path, "arc_config.json")
    with pytest.raises(ValueError, match=r"dec.safetensors: tensor names do not match the config .*unexpected \['net.0.bias'"):
        ARCModel.from_pretrained(path, verify=False)
