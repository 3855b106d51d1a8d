"""convert_reference: synthetic checkpoints in the reference's exact layout -> from_pretrained -> same outputs.

Names and shapes follow the reference code (enhanced_transformer.Transformer, TransformerBlock,
EmbProjector, Checkpointer / load_and_save_released_models). The expected outputs come from
tests/reference_arc.py run directly on the reference-layout tensors with the reference's
interleaved complex RoPE.
"""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import reference_arc as ref
from arc_encoder import ARCModel
from arc_encoder.checkpoint import verify_checkpoint
from arc_encoder.convert_reference import ReferenceBackbone, ReferenceDecoder, convert_reference, reference_to_model

TOL = 1e-5
# Meta Llama params.json (args_type "llama"): head_dim = 36 / 3 = 12; FFN width
# int(1.3 * int(8 * 36 / 3)) = 124, rounded up to a multiple of 10 = 130.
BACKBONE = {"dim": 36, "n_layers": 4, "n_heads": 3, "n_kv_heads": 1, "multiple_of": 10, "ffn_dim_multiplier": 1.3,
            "norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 311, "use_scaled_rope": True}
MODEL_ARGS = {"dim": 36, "n_layers": 2, "n_heads": 3, "n_kv_heads": 1, "head_dim": 12, "norm_eps": 1e-5,
              "rope_theta": 500000.0}  # for reference_arc: the 2 kept layers
EMBEDDER_PARAMS = {"n_truncated_layers": 2, "pooling_module": {"pool_type": "mean_pooled_queries", "where": "before"},
                   "memory_tokens": 0, "rec_tok": True, "cont_tok": True, "compress_rates": [-4],
                   "trained_layers": 2, "causal_embedder": False, "train_embedding_mtx": True}


def _tensors(num_llms: int, seed: int = 0) -> tuple[dict, dict]:
    """Embedder and bridge tensors with the reference's names and shapes, at unit scale."""
    gen = torch.Generator().manual_seed(seed)

    def mat(rows, cols):
        return torch.randn(rows, cols, generator=gen) / math.sqrt(cols)

    def norm(n):
        return 1.0 + 0.3 * torch.randn(n, generator=gen)

    dim, hidden, hd = 36, 130, 12
    emb = {"tok_embeddings.weight": torch.randn(311, dim, generator=gen)}
    for i in range(2):  # 4 layers - 2 truncated
        p = f"layers.{i}."
        emb.update({p + "attention.wq.weight": mat(3 * hd, dim), p + "attention.wk.weight": mat(hd, dim),
                    p + "attention.wv.weight": mat(hd, dim), p + "attention.wo.weight": mat(dim, 3 * hd),
                    p + "attention_norm.weight": norm(dim), p + "ffn_norm.weight": norm(dim),
                    p + "feed_forward.w1.weight": mat(hidden, dim), p + "feed_forward.w3.weight": mat(hidden, dim),
                    p + "feed_forward.w2.weight": mat(dim, hidden)})
    for j in range(num_llms):
        emb[f"rec_tok.{j}.weight"] = torch.randn(1, dim, generator=gen)
        emb[f"cont_tok.{j}.weight"] = torch.randn(1, dim, generator=gen)
    bridge = {}
    for j in range(num_llms):
        prefix = f"{j}." if num_llms > 1 else ""
        bridge[prefix + "layer1.weight"] = mat(14, dim)
        bridge[prefix + "layer2.weight"] = mat(22, 14)
    return emb, bridge


def _write_reference(root, num_llms=2, embedder_params=None, drop=()):
    """<root>/checkpoint_000010 in the Checkpointer layout, and the backbone's params.json."""
    emb, bridge = _tensors(num_llms)
    for key in drop:
        emb.pop(key)
    ckpt = root / "checkpoint_000010"
    (ckpt / "embedder").mkdir(parents=True)
    (ckpt / "bridge_module").mkdir()
    bridge_args = {"bridge_type": "multi_module" if num_llms > 1 else "mlp", "in_dim": 36, "hidden_dim": 14, "out_dim": 22}
    (ckpt / "params.json").write_text(json.dumps({"param_dtype": "float32", "embedder_params": embedder_params or EMBEDDER_PARAMS,
                                                  "bridge_module": bridge_args}, indent=4))
    save_file(emb, str(ckpt / "embedder" / "consolidated.safetensors"))
    save_file(bridge, str(ckpt / "bridge_module" / "consolidated.safetensors"))
    (root / "Llama3.2-3B").mkdir()
    (root / "Llama3.2-3B" / "params.json").write_text(json.dumps(BACKBONE))
    return ckpt, root / "Llama3.2-3B" / "params.json", emb, bridge


def _expected(emb, layer1, layer2, ids, pf=4):
    return ref.project(ref.reference_layout_encoder(emb, MODEL_ARGS, ids, pf), layer1, layer2)


def test_backbone_params_read_as_the_reference_reads_them():
    shape = ReferenceBackbone.from_params(BACKBONE)
    assert (shape.head_dim, shape.hidden_dim, shape.n_kv_heads, shape.rope_theta) == (12, 130, 1, 500000.0)


def test_converted_checkpoint_matches_reference_two_decoders(tmp_path, tokenizer):
    ckpt, params, emb, bridge = _write_reference(tmp_path)
    tokenizer.save_pretrained(tmp_path / "tok")
    dst = convert_reference(ckpt, tmp_path / "arc", [ReferenceDecoder("llama8b", "/models/Llama-3.1-8B", 128256),
                                                     ReferenceDecoder("mistral7b", "/models/Mistral-7B")],
                            backbone=params, tokenizer=str(tmp_path / "tok"))
    assert verify_checkpoint(dst) == []
    model = ARCModel.from_pretrained(dst).eval()
    enc = model.config.encoder
    assert (enc.pooling_factor, enc.layers_removed, enc.pooled_residual, enc.final_norm) == (4, 2, True, False)
    assert (enc.pooled_query_input, enc.pooling_groups) == ("pooled_hidden", "balanced")
    cfg = model.config.projectors["llama8b"]
    assert (cfg.bias, cfg.special_token_space, cfg.decoder, cfg.decoder_vocab_size) == (False, "encoder", "/models/Llama-3.1-8B", 128256)
    texts = ["Python is a programming language that lets you work quickly.", "A list is a mutable sequence.", "ok"]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [len(i) for i in ids] == [38, 17, 2]  # 17 @ 4 -> 4, 4, 3, 3, 3; 2 < 4 -> one group
    for j, name in enumerate(["llama8b", "mistral7b"]):
        l1, l2 = bridge[f"{j}.layer1.weight"], bridge[f"{j}.layer2.weight"]
        with torch.no_grad():
            ctx = model.compress(texts, name)  # one padded batch of three lengths
            specials = model.projector(name).special_embeddings(["continuation", "reconstruction"])
        for b, row in enumerate(ids):
            expect = _expected(emb, l1, l2, row)
            assert ctx.lengths[b] == expect.shape[0] == math.ceil(len(row) / 4)
            assert (ctx.embeddings[b, : expect.shape[0]].double() - expect).abs().max() <= TOL
        for k, module in enumerate(["cont_tok", "rec_tok"]):
            expect = ref.project(emb[f"{module}.{j}.weight"], l1, l2)[0]
            assert (specials[k].double() - expect).abs().max() <= TOL


def test_rope_permutation_is_what_makes_them_agree(tmp_path):
    """Without the wq/wk row permutation the converted encoder would compute something else."""
    ckpt, params, emb, bridge = _write_reference(tmp_path, num_llms=1)
    model = reference_to_model(ckpt, [ReferenceDecoder("d")], backbone=params)
    row = list(range(5, 22))  # 17 tokens at pf 4: groups 4, 4, 3, 3, 3
    with torch.no_grad():
        good = model.compress([row], "d").embeddings[0]
        q = model.encoder.backbone.layers[0].self_attn.q_proj.weight
        q.copy_(emb["layers.0.attention.wq.weight"])  # unpermuted
        k = model.encoder.backbone.layers[0].self_attn.k_proj.weight
        k.copy_(emb["layers.0.attention.wk.weight"])
        bad = model.compress([row], "d").embeddings[0]
    expect = _expected(emb, bridge["layer1.weight"], bridge["layer2.weight"], row)
    assert (good.double() - expect).abs().max() <= TOL < (bad.double() - expect).abs().max()


def test_hub_layout_with_model_args(tmp_path):
    """The Hub form: config.json with the EmbedAugModel init arguments, prefixed model.safetensors."""
    emb, bridge = _tensors(1, seed=3)
    hub = tmp_path / "ARC8_Encoder_Llama"
    hub.mkdir()
    model_args = {"dim": 36, "n_layers": 4, "head_dim": 12, "hidden_dim": 130, "n_heads": 3, "n_kv_heads": 1,
                  "norm_eps": 1e-5, "vocab_size": 311, "rope_theta": 500000.0, "max_batch_size": 1}
    (hub / "config.json").write_text(json.dumps({
        "embedder_args": EMBEDDER_PARAMS, "model_args": model_args, "empty_init": 1,
        "bridge_args": {"bridge_type": "mlp", "in_dim": 36, "hidden_dim": 14, "out_dim": 22}}))
    save_file({**{f"embedder.{k}": v for k, v in emb.items()}, **{f"bridge_module.{k}": v for k, v in bridge.items()}},
              str(hub / "model.safetensors"))
    model = reference_to_model(hub, [ReferenceDecoder("llama8b")])
    row = list(range(7, 14))  # 7 tokens at pf 4: groups 4, 3
    with torch.no_grad():
        got = model.compress([row], "llama8b").embeddings[0]
    expect = _expected(emb, bridge["layer1.weight"], bridge["layer2.weight"], row)
    assert got.shape[0] == 2 and (got.double() - expect).abs().max() <= TOL


@pytest.mark.parametrize("change, message", [
    ({"pooling_module": {"pool_type": "mean", "where": "before"}}, "pooling_module.pool_type='mean' is not supported"),
    ({"memory_tokens": 8}, "memory_tokens=8 is not supported"),
    ({"compress_rates": [-2, -4]}, r"compress_rates=\[-2, -4\] is not supported"),
    ({"compress_rates": [16]}, r"compress_rates=\[16\] is not supported"),
    ({"causal_embedder": True}, "causal_embedder=True is not supported"),
])
def test_unsupported_settings_are_named(tmp_path, change, message):
    ckpt, params, _, _ = _write_reference(tmp_path, num_llms=1, embedder_params={**EMBEDDER_PARAMS, **change})
    with pytest.raises(ValueError, match=message):
        reference_to_model(ckpt, [ReferenceDecoder("d")], backbone=params)


def test_bad_inputs_are_clear_errors(tmp_path):
    ckpt, params, _, _ = _write_reference(tmp_path, drop=("layers.1.feed_forward.w2.weight",))
    with pytest.raises(ValueError, match=r"holds 2 decoder\(s\) .*; 1 decoder name\(s\) given"):
        reference_to_model(ckpt, [ReferenceDecoder("d")], backbone=params)
    with pytest.raises(ValueError, match=r"missing tensors \['layers.1.feed_forward.w2.weight'\]"):
        reference_to_model(ckpt, [ReferenceDecoder("a"), ReferenceDecoder("b")], backbone=params)
    with pytest.raises(ValueError, match="do not fit the released ARC encoders"):
        reference_to_model(ckpt, [ReferenceDecoder("a"), ReferenceDecoder("b")])
    with pytest.raises(FileNotFoundError, match=r"point at one of its checkpoints/checkpoint_NNNNNN"):
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        reference_to_model(tmp_path / "run", [ReferenceDecoder("a")])


def test_convert_reference_command(tmp_path, tokenizer, capsys):
    """`arc-encoder convert-reference`: the synthetic two-decoder checkpoint converts to the same vectors."""
    from arc_encoder.cli.main import main

    ckpt, params, emb, bridge = _write_reference(tmp_path)
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"vocab_size": 128256, "hidden_size": 22}))
    dst = tmp_path / "arc"
    argv = ["convert-reference", str(ckpt), str(dst), "--decoder", f"llama8b={tmp_path / 'llama'}",
            "--decoder", "mistral7b", "--backbone", str(params), "--tokenizer", str(tmp_path / "tok")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {dst}") and "pooling x4" in out and "llama8b" in out and "mistral7b" in out
    model = ARCModel.from_pretrained(dst).eval()
    cfg = model.config.projectors["llama8b"]
    assert (cfg.decoder, cfg.decoder_vocab_size) == (str(tmp_path / "llama"), 128256)
    assert model.config.projectors["mistral7b"].decoder == ""
    row = tokenizer(["A list is a mutable sequence."], add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        got = model.compress([row], "mistral7b").embeddings[0]
    expect = _expected(emb, bridge["1.layer1.weight"], bridge["1.layer2.weight"], row)
    assert (got.double() - expect).abs().max() <= TOL
    # Without --decoder the projectors take the reference's llm_number names.
    assert main(["convert-reference", str(ckpt), str(tmp_path / "plain"), "--backbone", str(params)]) == 0
    assert sorted(ARCModel.from_pretrained(tmp_path / "plain").projectors.keys()) == ["llm0", "llm1"]
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["{missing}", "{dst}"], "not a reference ARC-Encoder checkpoint"),
    (["{ckpt}", "{dst}", "--decoder", "a"], "holds 2 decoder(s)"),
    (["{ckpt}", "{dst}", "--decoder", "=x", "--decoder", "b"], "expected NAME or NAME=PATH"),
    (["{ckpt}", "{dst}", "--decoder", "a={missing}", "--decoder", "b"], "is not a local model directory"),
    (["{ckpt}", "{dst}", "--decoder", "a", "--decoder", "b"], "do not fit the released ARC encoders"),
    (["{ckpt}", "{dst}", "--backbone", "{missing}"], "no such file"),
    (["{ckpt}", "{dst}", "--backbone", "{params}", "--tokenizer", "{ckpt}"], "cannot load a tokenizer"),
    (["{ckpt}", "{ckpt}", "--backbone", "{params}"], "is the reference checkpoint"),
    (["{ckpt}", "{dst}", "--backbone", "{params}", "--decoder", "a/b", "--decoder", "b"], "projector name 'a/b'"),
])
def test_convert_reference_command_errors(tmp_path, capsys, args, message):
    from arc_encoder.cli.main import main

    ckpt, params, _, _ = _write_reference(tmp_path)
    names = {"ckpt": ckpt, "dst": tmp_path / "out", "missing": tmp_path / "missing", "params": params}
    assert main(["convert-reference", *(a.format(**names) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("arc-encoder convert-reference: error: ") and message in err
    assert not (tmp_path / "out").exists()
