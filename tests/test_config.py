import json

import pytest

from arc_encoder import ARCConfig, EncoderConfig, ProjectorConfig


def test_json_round_trip():
    cfg = ARCConfig(
        encoder=EncoderConfig(base_model="/models/llama", pooling_factor=8, chunk_len=256),
        projectors={"llama-8b": ProjectorConfig(input_dim=3072, output_dim=4096, decoder="/m/8b")},
    )
    again = ARCConfig.from_json(json.dumps(cfg.to_dict()))
    assert again == cfg
    assert again.projectors["llama-8b"].special_tokens == ("continuation", "reconstruction")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"pooling_factor": 0}, "pooling_factor"),
        ({"pooling_factor": 2.5}, "pooling_factor"),
        ({"layers_removed": -1}, "layers_removed"),
        ({"chunk_len": 0}, "chunk_len"),
        ({"chunk_len": 2, "pooling_factor": 4}, "chunk_len"),
        ({"pooled_query_positions": "middle"}, "pooled_query_positions"),
        ({"attn_implementation": "flash"}, "attn_implementation"),
        ({"base_model": ""}, "base_model"),
        ({"max_chunks": 0}, "max_chunks"),
    ],
)
def test_invalid_encoder_values(kwargs, field):
    args = {"base_model": "m", **kwargs}
    with pytest.raises(ValueError, match=field):
        EncoderConfig(**args)


def test_layers_kept_must_fit_backbone():
    cfg = EncoderConfig(base_model="m", layers_removed=3)
    assert cfg.check_backbone(5) == 2
    with pytest.raises(ValueError, match="layers_removed=3 leaves 0"):
        cfg.check_backbone(3)


def test_unknown_keys_rejected():
    data = ARCConfig(encoder=EncoderConfig(base_model="m")).to_dict()
    data["encoder"]["pooling"] = 4
    with pytest.raises(ValueError, match="unknown keys \\['pooling'\\]"):
        ARCConfig.from_dict(data)


def test_invalid_projector_and_names():
    with pytest.raises(ValueError, match="activation"):
        ProjectorConfig(input_dim=4, output_dim=4, activation="relu6")
    with pytest.raises(ValueError, match="special token"):
        ProjectorConfig(input_dim=4, output_dim=4, special_tokens=("cont",))
    with pytest.raises(ValueError, match="projector name"):
        ARCConfig(encoder=EncoderConfig(base_model="m"), projectors={"a/b": ProjectorConfig(input_dim=4, output_dim=4)})


def test_bad_json_is_value_error(tmp_path):
    p = tmp_path / "arc_config.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="arc_config.json"):
        ARCConfig.from_file(p)
    p.write_text(json.dumps({"encoder": {"base_model": "m"}, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        ARCConfig.from_file(p)


def test_compressed_len():
    cfg = EncoderConfig(base_model="m", pooling_factor=4)
    assert [cfg.compressed_len(n) for n in (1, 4, 5, 7, 8, 9)] == [1, 1, 2, 2, 2, 3]


def test_library_never_imports_lightning():
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, arc_encoder; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(arc_encoder.__path__, 'arc_encoder.')]; "
            "assert 'arc_encoder.cli.main' in sys.modules and 'arc_encoder.cache.build' in sys.modules; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
