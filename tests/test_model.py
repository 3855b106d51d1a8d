import pytest
import torch

from arc_encoder import ARCConfig, ARCModel, CompressedContext
from arc_encoder.decoders import freeze_decoder
from arc_encoder.objectives import IGNORE_INDEX, decoder_loss
from arc_encoder.tiny import tiny_causal_lm, tiny_config
from conftest import FAMILIES, TEXT, make_encoder, make_model


def test_compress_shapes_and_chunking():
    model, _ = make_model(pooling_factor=4, chunk_len=8)
    ctx = model.compress([list(range(3, 23)), [5, 6, 7]], "dec")  # 20 tokens: chunks 8+8+4
    assert ctx.embeddings.shape == (2, 2 + 2 + 1, 24)
    assert ctx.lengths.tolist() == [5, 1]
    # Chunks are compressed independently: the first chunk alone gives the first 2 vectors.
    first = model.compress([list(range(3, 11))], "dec")
    torch.testing.assert_close(ctx.embeddings[0, :2], first.embeddings[0], atol=1e-5, rtol=1e-5)
    assert [t.shape[0] for t in ctx.unpad()] == [5, 1]


def test_compress_text_and_errors(tokenizer):
    model, _ = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer), chunk_len=16, max_chunks=2)
    ctx = model.compress(["Python is a language.", "A list"], "dec")
    assert ctx.embeddings.shape[0] == 2 and ctx.decoder == "dec"
    with pytest.raises(ValueError, match="text 1 is empty"):
        model.compress(["fine", "   "], "dec")
    with pytest.raises(ValueError, match="over the limit of 32"):
        model.compress([TEXT], "dec")
    with pytest.raises(ValueError, match="unknown decoder 'nope'.*\\['dec'\\]"):
        model.compress(["fine"], "nope")
    with pytest.raises(ValueError, match="not one string"):
        model.compress("a string", "dec")
    with pytest.raises(ValueError, match="context 0 is empty"):
        model.compress([[]], "dec")


def _marker(model, name):
    return model.projector("dec").special_embedding(name)


def _distinct_markers(model):
    """Both special tokens start as ones (reference init); make them differ so a swap shows."""
    with torch.no_grad():
        model.projector("dec").special_tokens.normal_()


def test_decoder_inputs_layout_one_document_per_row():
    model, decoder = make_model()
    _distinct_markers(model)
    ctx = CompressedContext.from_list([torch.randn(3, 24), torch.randn(1, 24)], "dec")
    emb = decoder.get_input_embeddings()
    inp = model.build_decoder_inputs(emb, ctx, [[7, 8], [9]], [[10, 11, 12], [13]], "reconstruction", [[1], [1]])
    # row 0: 1 prefix + 3 ctx + 1 marker + 2 prompt + 3 target = 10
    assert inp.inputs_embeds.shape == (2, 10, 24)
    assert inp.attention_mask.sum(-1).tolist() == [10, 1 + 1 + 1 + 1 + 1]
    assert inp.labels[0].tolist() == [IGNORE_INDEX] * 7 + [10, 11, 12]
    assert inp.labels[1, :5].tolist() == [IGNORE_INDEX] * 4 + [13]
    torch.testing.assert_close(inp.inputs_embeds[0, 1:4], ctx.embeddings[0])
    torch.testing.assert_close(inp.inputs_embeds[0, 4], _marker(model, "reconstruction"))
    torch.testing.assert_close(inp.inputs_embeds[1, 2], _marker(model, "reconstruction"))
    torch.testing.assert_close(inp.inputs_embeds[0, 7], emb.weight[10])
    # The continuation marker is another vector at the same place.
    cont = model.build_decoder_inputs(emb, ctx, [[7, 8], [9]], [[10, 11, 12], [13]], "continuation", [[1], [1]])
    torch.testing.assert_close(cont.inputs_embeds[0, 4], _marker(model, "continuation"))
    assert not torch.allclose(_marker(model, "continuation"), _marker(model, "reconstruction"))
    left = model.build_decoder_inputs(emb, ctx, [[7, 8], [9]], None, padding_side="left")
    assert left.labels is None and left.attention_mask[1].tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="out of the decoder's vocabulary"):
        model.build_decoder_inputs(emb, ctx, [[500], [9]])
    with pytest.raises(ValueError, match="prompt_ids has 1 rows"):
        model.build_decoder_inputs(emb, ctx, [[5]])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_marker_follows_every_document(padding_side):
    """Reference layout [doc 1][special][doc 2][special][doc 3][special][prompt]: 3 documents in
    row 0, 1 in row 1; positions and values of every slot, either padding side."""
    model, decoder = make_model()
    _distinct_markers(model)
    emb = decoder.get_input_embeddings()
    docs = [[torch.randn(2, 24), torch.randn(3, 24), torch.randn(1, 24)], [torch.randn(4, 24)]]
    ctx = CompressedContext.from_documents(docs, "dec")
    assert ctx.lengths.tolist() == [6, 4] and ctx.document_lengths() == [[2, 3, 1], [4]]
    inp = model.build_decoder_inputs(emb, ctx, [[7, 8], [9]], [[10], [11, 12]], "continuation", [[1], []],
                                     padding_side)
    totals = [1 + 6 + 3 + 2 + 1, 0 + 4 + 1 + 1 + 2]  # prefix + vectors + one marker per doc + prompt + target
    width = max(totals)
    assert inp.inputs_embeds.shape == (2, width, 24) and inp.attention_mask.sum(-1).tolist() == totals
    cont = _marker(model, "continuation")
    for b, (row_docs, prefix, prompt, target) in enumerate(zip(docs, [[1], []], [[7, 8], [9]], [[10], [11, 12]])):
        pos = 0 if padding_side == "right" else width - totals[b]
        assert inp.attention_mask[b, pos:].tolist()[: totals[b]] == [1] * totals[b]
        for tok in prefix:
            torch.testing.assert_close(inp.inputs_embeds[b, pos], emb.weight[tok])
            pos += 1
        for doc in row_docs:
            torch.testing.assert_close(inp.inputs_embeds[b, pos : pos + doc.shape[0]], doc)
            pos += doc.shape[0]
            torch.testing.assert_close(inp.inputs_embeds[b, pos], cont)  # the marker after EVERY document
            pos += 1
        for tok in prompt + target:
            torch.testing.assert_close(inp.inputs_embeds[b, pos], emb.weight[tok])
            pos += 1
        assert inp.labels[b].tolist()[pos - len(target) : pos] == target
        assert (inp.labels[b] != IGNORE_INDEX).sum() == len(target)
    pads = inp.attention_mask == 0
    assert (inp.inputs_embeds[pads] == 0).all()


def test_long_context_chunks_form_one_document_and_a_projector_without_markers_gets_none():
    """A long text is chunked and its chunks concatenated: one document, so one marker after
    its last chunk (none between chunks); a projector without special tokens (the paper's
    long-context setting, reference rec_tok/cont_tok off) gets no marker at all."""
    model, decoder = make_model(pooling_factor=4, chunk_len=8)
    emb = decoder.get_input_embeddings()
    with torch.no_grad():
        ctx = model.compress([list(range(3, 27))], "dec")  # 24 tokens: 3 chunks of 8 -> 2 + 2 + 2 vectors
        assert ctx.document_lengths() == [[6]]
        inp = model.build_decoder_inputs(emb, ctx, [[9]], None, "continuation")
        assert inp.attention_mask.sum().item() == 6 + 1 + 1
        torch.testing.assert_close(inp.inputs_embeds[0, :6], ctx.embeddings[0])
        torch.testing.assert_close(inp.inputs_embeds[0, 6], _marker(model, "continuation"))
        model.add_decoder("long", decoder, hidden_dim=16, special_tokens=())
        bare = model.compress([list(range(3, 27))], "long")
        inp = model.build_decoder_inputs(emb, bare, [[9]], None, "continuation")
        assert inp.attention_mask.sum().item() == 6 + 1  # vectors, then the prompt
        torch.testing.assert_close(inp.inputs_embeds[0, :6], bare.embeddings[0])
        torch.testing.assert_close(inp.inputs_embeds[0, 6], emb.weight[9])
        none = model.build_decoder_inputs(emb, ctx, [[9]], None, None)  # marker=None: the same without markers
        assert none.attention_mask.sum().item() == 6 + 1


def test_compress_documents_equals_compressing_each_document():
    model, _ = make_model(pooling_factor=4, chunk_len=8)
    docs = [[list(range(3, 12)), list(range(20, 25))], [list(range(30, 37))]]
    with torch.no_grad():
        ctx = model.compress_documents(docs, "dec")
        alone = [model.compress([d], "dec").embeddings[0] for row in docs for d in row]
    assert ctx.document_lengths() == [[3, 2], [2]]  # 9 tokens: chunks 8 + 1 -> 2 + 1 vectors
    torch.testing.assert_close(ctx.embeddings[0, :5], torch.cat(alone[:2]))
    torch.testing.assert_close(ctx.embeddings[1, :2], alone[2])
    with pytest.raises(ValueError, match="row 1 has no documents"):
        model.compress_documents([[[5, 6]], []], "dec")
    with pytest.raises(ValueError, match="add up"):
        model.build_decoder_inputs(decoder_embeddings=torch.nn.Embedding(101, 24), context=CompressedContext(
            ctx.embeddings, ctx.lengths, "dec", [[3, 1], [2]]), prompt_ids=[[5], [5]])


def test_comparable_scoring_skips_the_first_target_of_rows_without_prefix_or_prompt():
    from arc_encoder.samples import collate, text_sample

    model, decoder = make_model()
    samples = [text_sample([5, 6, 7, 8, 9], [12, 13, 14], None, None, same_tokenizer=True)]
    batch = collate(samples, "dec", "continuation", None)  # a pretraining window: no BOS
    for mode in ("compressed", "none", "full"):
        plain = model.decoder_inputs(decoder, batch, mode)
        same = model.decoder_inputs(decoder, batch, mode, comparable=True)
        assert [t for t in plain.labels[0].tolist() if t != IGNORE_INDEX] == [12, 13, 14]
        assert [t for t in same.labels[0].tolist() if t != IGNORE_INDEX] == [13, 14], mode
    with_bos = collate(samples, "dec", "continuation", 1)
    labels = model.decoder_inputs(decoder, with_bos, "none", comparable=True).labels[0].tolist()
    assert [t for t in labels if t != IGNORE_INDEX] == [12, 13, 14]  # BOS precedes: every token scored


def test_training_step_trains_encoder_and_projector_never_decoder():
    model, decoder = make_model()
    freeze_decoder(decoder)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    enc_before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctx_ids = [list(range(3, 15)), list(range(20, 29))]
    targets = [[5, 6, 7, 8], [9, 10]]
    losses = []
    for _ in range(8):
        ctx = model.compress(ctx_ids, "dec")
        inp = model.build_decoder_inputs(decoder.get_input_embeddings(), ctx, [[], []], targets, "continuation", [[1], [1]])
        loss = decoder_loss(decoder, inp)
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is None for p in decoder.parameters())
            assert model.encoder.backbone.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
            assert model.projector("dec").net[0].weight.grad.abs().sum() > 0
            assert model.projector("dec").special_tokens.grad[0].abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(model.state_dict()["encoder.backbone.layers.0.mlp.up_proj.weight"],
                           enc_before["encoder.backbone.layers.0.mlp.up_proj.weight"])
    assert losses[-1] < losses[0] - 0.1, losses


def test_decoder_mismatch_refused():
    model, decoder = make_model()
    other = tiny_causal_lm(tiny_config("llama", vocab_size=101, hidden_size=40, num_heads=4, num_kv_heads=2))
    with pytest.raises(ValueError, match="hidden size 40"):
        model.check_decoder("dec", other)
    other = tiny_causal_lm(tiny_config("llama", vocab_size=77, hidden_size=24, num_heads=3, num_kv_heads=1))
    with pytest.raises(ValueError, match="vocabulary 77"):
        model.check_decoder("dec", other)


@pytest.mark.parametrize("family", FAMILIES + ["gpt_neox"])
def test_generate_from_compressed_context(family, tokenizer):
    enc = make_encoder(family, pooling_factor=4, vocab_size=len(tokenizer))
    model = ARCModel(ARCConfig(encoder=enc.config), enc, tokenizer)
    decoder = tiny_causal_lm(tiny_config(family, vocab_size=len(tokenizer), hidden_size=24, num_heads=3, num_kv_heads=1))
    model.add_decoder(family, decoder, hidden_dim=16)
    texts = model.generate(decoder, tokenizer, family, ["Python is a programming language.", "A list is mutable."],
                           ["It is", "Lists are"], max_new_tokens=5, do_sample=False)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    # Greedy generation is a deterministic function of the compressed context.
    again = model.generate(decoder, tokenizer, family, ["Python is a programming language.", "A list is mutable."],
                           ["It is", "Lists are"], max_new_tokens=5, do_sample=False)
    assert again == texts


def test_decoder_inputs_accept_context_in_another_dtype():
    model, decoder = make_model()
    ctx = CompressedContext.from_list([torch.randn(3, 24, dtype=torch.float64)], "dec")
    inp = model.build_decoder_inputs(decoder.get_input_embeddings(), ctx, [[7]], [[8]])
    assert inp.inputs_embeds.dtype == torch.float32
    torch.testing.assert_close(inp.inputs_embeds[0, :3], ctx.embeddings[0].float())


def test_local_decoder_path_is_recorded_absolute(tmp_path, monkeypatch):
    model, decoder = make_model()
    (tmp_path / "dec2").mkdir()
    monkeypatch.chdir(tmp_path)
    model.add_decoder("d2", decoder, hidden_dim=8, decoder_path="dec2")
    assert model.projector("d2").config.decoder == str(tmp_path / "dec2")
    model.add_decoder("d3", decoder, hidden_dim=8, decoder_path="org/hub-id")  # not local: kept as given
    assert model.projector("d3").config.decoder == "org/hub-id"


def test_cached_documents_get_a_marker_each_as_when_compressed_directly(tmp_path, tokenizer):
    """A cache query of 2 documents: the same decoder input as compressing both documents now."""
    import json

    from arc_encoder.cache.build import build_cache
    from arc_encoder.cache.reader import CompressedCache

    model, decoder = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer), dec_vocab=len(tokenizer), chunk_len=16)
    _distinct_markers(model)
    texts = ["A list is a mutable sequence.", "Dictionaries map hashable keys to arbitrary values.", "Exceptions."]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    ckpt = model.save_pretrained(tmp_path / "m")
    build_cache(ckpt, "dec", corpus, tmp_path / "cache", dtype="float32", model=model, progress=False)
    cache = CompressedCache(tmp_path / "cache")
    ctx = cache.context([["d1", "d0"], ["d2"]])
    with torch.no_grad():
        direct = model.compress_documents([[texts[1], texts[0]], [texts[2]]], "dec")
    assert ctx.document_lengths() == direct.document_lengths() and len(ctx.document_lengths()[0]) == 2
    emb = decoder.get_input_embeddings()
    with torch.no_grad():
        a = model.build_decoder_inputs(emb, ctx, [[5], [6]], None, "continuation", [[1], [1]])
        b = model.build_decoder_inputs(emb, direct, [[5], [6]], None, "continuation", [[1], [1]])
    torch.testing.assert_close(a.inputs_embeds, b.inputs_embeds, atol=1e-5, rtol=1e-5)
    first = 1 + direct.document_lengths()[0][0]  # BOS, then document 1's vectors: its marker
    torch.testing.assert_close(a.inputs_embeds[0, first], _marker(model, "continuation"))
