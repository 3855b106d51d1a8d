"""Per-decoder input conventions: the BOS policy recorded with each projector and applied wherever a
decoder input is laid out (training windows, fine-tuning rows, generation, eval info)."""

import pytest
import torch

from arc_encoder import ARCModel
from arc_encoder.config import ProjectorConfig, ProjectorOptions
from arc_encoder.samples import collate, qa_sample, text_sample
from arc_encoder.decoders import decoder_prefix, resolve_bos, tokenizer_adds_bos
from arc_encoder.tiny import tiny_causal_lm, tiny_config, train_tokenizer
from arc_encoder_train.data import DecoderTokenizers, row_prefix

from conftest import TEXT, make_model


@pytest.fixture(scope="module")
def bos_tokenizer():
    return train_tokenizer([TEXT], vocab_size=300, add_bos=True)


def test_tokenizer_adds_bos_tells_the_two_conventions_apart(tokenizer, bos_tokenizer):
    assert not tokenizer_adds_bos(tokenizer)
    assert tokenizer_adds_bos(bos_tokenizer)
    assert resolve_bos("auto", bos_tokenizer) == "always"
    assert resolve_bos("auto", tokenizer) == "reference"
    assert resolve_bos("auto", None) == "reference"
    assert resolve_bos("never", bos_tokenizer) == "never"


@pytest.mark.parametrize("policy,window,qa", [("reference", [], [1]), ("always", [1], [1]), ("never", [], [])])
def test_decoder_prefix_per_policy_and_task(policy, window, qa):
    assert decoder_prefix(policy, 1, "continuation") == window
    assert decoder_prefix(policy, 1, "reconstruction") == window
    assert decoder_prefix(policy, 1, "qa") == qa
    assert decoder_prefix(policy, None, "qa") == []


def test_projector_config_refuses_an_unresolved_or_unknown_policy():
    with pytest.raises(ValueError, match="bos"):
        ProjectorConfig(input_dim=3, output_dim=5, bos="auto")
    with pytest.raises(ValueError, match="bos"):
        ProjectorOptions(bos="sometimes")
    # A checkpoint written before the policy was recorded had the reference's layout.
    assert ProjectorConfig(input_dim=3, output_dim=5).bos == "reference"


def test_add_decoder_records_the_resolved_policy_and_it_survives_save_load(tmp_path, tokenizer, bos_tokenizer):
    model, _ = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer), dec_vocab=len(tokenizer))
    decoder = tiny_causal_lm(tiny_config(vocab_size=len(bos_tokenizer), hidden_size=20, num_heads=2,
                                         num_kv_heads=1, num_layers=1), seed=3)
    model.add_decoder("gemma_like", decoder, tokenizer=bos_tokenizer, hidden_dim=8)
    model.add_decoder("plain", decoder, tokenizer=tokenizer, hidden_dim=8)
    model.add_decoder("forced", decoder, ProjectorOptions(bos="never"), tokenizer=bos_tokenizer, hidden_dim=8)
    assert [model.projector(n).config.bos for n in ("dec", "gemma_like", "plain", "forced")] == [
        "reference", "always", "reference", "never"]
    model.save_pretrained(tmp_path / "ck")
    loaded = ARCModel.from_pretrained(tmp_path / "ck")
    assert loaded.projector("gemma_like").config.bos == "always"
    assert loaded.projector("forced").config.bos == "never"


def test_training_rows_start_with_bos_only_where_the_policy_says(tokenizer):
    dec = DecoderTokenizers("dec", tokenizer, bos="always")
    assert row_prefix(dec, qa=False) == [tokenizer.bos_token_id]
    dec.bos = "reference"
    assert row_prefix(dec, qa=False) == [] and row_prefix(dec, qa=True) == [tokenizer.bos_token_id]
    dec.bos = "never"
    assert row_prefix(dec, qa=True) == []


def test_a_bos_prefix_is_laid_out_before_the_compressed_context(tokenizer):
    model, decoder = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer), dec_vocab=len(tokenizer))
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    sample = text_sample(ids[:9], ids[9:14], tokenizer, tokenizer, same_tokenizer=True)
    plain = model.decoder_inputs(decoder, collate([sample], "dec", "continuation", None))
    with_bos = model.decoder_inputs(decoder, collate([sample], "dec", "continuation", decoder_prefix("always", 1, "continuation")))
    assert with_bos.inputs_embeds.shape[1] == plain.inputs_embeds.shape[1] + 1
    bos_embedding = decoder.get_input_embeddings().weight[1]
    assert torch.equal(with_bos.inputs_embeds[0, 0], bos_embedding)
    # Everything after the BOS is the plain layout shifted by one.
    assert torch.allclose(with_bos.inputs_embeds[0, 1:], plain.inputs_embeds[0])


def test_generate_uses_the_projector_policy(tokenizer, monkeypatch):
    model, decoder = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer), dec_vocab=len(tokenizer))
    model.eval()
    seen = []
    real = model.build_decoder_inputs

    def spy(emb, ctx, prompt_ids, target_ids, marker, prefix_ids, *args, **kwargs):
        seen.append([list(p) for p in prefix_ids])
        return real(emb, ctx, prompt_ids, target_ids, marker, prefix_ids, *args, **kwargs)

    monkeypatch.setattr(model, "build_decoder_inputs", spy)
    for policy, expected in (("reference", [tokenizer.bos_token_id]), ("never", [])):
        model.projector("dec").config.bos = policy
        model.generate(decoder, tokenizer, "dec", ["A list is a mutable sequence."], ["x"], max_new_tokens=1,
                       do_sample=False)
        assert seen[-1] == [expected]


def test_qa_sample_and_prefix_compose(tokenizer):
    sample = qa_sample("A list is mutable.", "What is a list?", "mutable", tokenizer, tokenizer)
    batch = collate([sample], "dec", "qa", decoder_prefix("reference", tokenizer.bos_token_id, "qa"))
    assert batch.prefix_ids == [[tokenizer.bos_token_id]]


def test_an_answer_ends_at_any_special_token_of_the_decoder(tokenizer, monkeypatch):
    """A chat decoder may close an answer with a turn marker rather than its EOS; decoding drops special
    tokens, so generation must stop there or the next turn's text is glued to the answer."""
    from arc_encoder.decoders import stop_token_ids

    ids = stop_token_ids(tokenizer)
    assert ids[0] == tokenizer.eos_token_id and set(ids) == set(tokenizer.all_special_ids)
    model, decoder = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer), dec_vocab=len(tokenizer))
    seen = {}
    real = decoder.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder, "generate", spy)
    model.eval().generate(decoder, tokenizer, "dec", ["A list is a mutable sequence."], ["x"], max_new_tokens=2)
    assert seen["eos_token_id"] == ids
