"""`arc_encoder.info` and `arc-encoder eval info`: bits recovered, rates, EM@k, correlations."""

import gzip
import json
import math

import pytest
import torch

from arc_encoder.cli.main import main
from arc_encoder.info import InfoEvaluator, eval_batches, pearson, spearman
from arc_encoder.objectives import IGNORE_INDEX, DecoderInputs, target_scores
from conftest import TEXT, make_model

DOCS = [TEXT[i:] + " " + TEXT[:i] for i in range(0, 300, 41)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("info")
    model, decoder = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer), dec_vocab=len(tokenizer),
                                chunk_len=16, pooling_factors=(2, 4, 8))
    decoder.save_pretrained(tmp / "decoder")
    tokenizer.save_pretrained(tmp / "decoder")
    model.projector("dec").config.decoder = str(tmp / "decoder")
    ckpt = model.save_pretrained(tmp / "ckpt")
    with gzip.open(tmp / "test.jsonl.gz", "wt") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d}) + "\n")
    return tmp, model.eval(), decoder.eval(), tokenizer, ckpt


def test_target_scores_em_is_greedy_prefix_match(setup):
    _, _, decoder, _, _ = setup
    torch.manual_seed(0)
    embeds = torch.randn(2, 7, 24)
    labels = torch.full((2, 7), IGNORE_INDEX)
    logits = decoder(inputs_embeds=embeds).logits
    greedy = logits[:, :-1].argmax(-1)
    labels[0, 3:7] = greedy[0, 2:6]  # row 0: every label is the greedy token
    labels[1, 3:7] = greedy[1, 2:6]
    labels[1, 4] = (greedy[1, 3] + 1) % logits.shape[-1]  # row 1: second target wrong
    s = target_scores(decoder, DecoderInputs(embeds, torch.ones(2, 7, dtype=torch.long), labels), em_k=2)
    assert s.tokens == [4, 4] and s.correct == [4, 3]
    assert s.prefix_exact == [True, False]
    assert s.tokens_head == [2, 2] and s.tail().tokens == [2, 2]
    assert sum(s.nll_head) + sum(s.tail().nll) == pytest.approx(sum(s.nll), rel=1e-6)
    s1 = target_scores(decoder, DecoderInputs(embeds, torch.ones(2, 7, dtype=torch.long), labels), em_k=1)
    assert s1.prefix_exact == [True, True]


def test_point_accounting(setup):
    _, model, decoder, tok, _ = setup
    batches = eval_batches(DOCS, model, "dec", tok, 24, 8, max_samples=10, batch_size=4)
    assert [len(b) for b in batches] == [4, 4, 2]
    ev = InfoEvaluator(model, decoder, batches, em_k=2)
    p4, p8 = ev.point(4), ev.point(8)
    ids = ev.all_encoder_ids()
    chunks = [c for x in ids for c in model.chunk(x)]
    assert p4.vectors == sum(math.ceil(len(c) / 4) for c in chunks)
    assert p8.vectors < p4.vectors
    assert p4.rate_vectors_per_token == pytest.approx(p4.vectors / p4.context_tokens)
    assert p4.bits_recovered_per_token == pytest.approx(p4.bits_none_per_token - p4.bits_given_vectors_per_token)
    assert p4.bits_per_vector == pytest.approx(p4.bits_recovered_per_token * p4.context_tokens / p4.vectors)
    assert p4.loss_none == p8.loss_none and p4.bits_none_per_token == p8.bits_none_per_token  # shared baseline
    assert p4.factor_counts == {"4": len(chunks)}
    # Per-chunk plans: all-4 plan equals the fixed point; coarser plan has fewer vectors.
    plan = [[4] * len(model.chunk(x)) for x in ids]
    same = ev.point(plan, label="plan")
    assert same.adaptive and same.pooling_factor is None
    assert same.loss_compressed == pytest.approx(p4.loss_compressed, abs=1e-6)
    with pytest.raises(ValueError, match="entries for 10 samples"):
        ev.point([[4]])


def test_chunk_len_override_changes_and_restores(setup):
    _, model, decoder, tok, _ = setup
    ev = InfoEvaluator(model, decoder, eval_batches(DOCS, model, "dec", tok, 24, 8, 4, 4))
    p = ev.point(4, chunk_len=5)
    assert p.chunk_len == 5 and model.encoder.config.chunk_len == 16
    pieces = [x[i : i + 5] for x in ev.all_encoder_ids() for i in range(0, len(x), 5)]
    assert p.vectors == sum(math.ceil(len(c) / 4) for c in pieces)  # 5-token chunks: 2 vectors each
    assert p.vectors > ev.point(4).vectors


def test_correlations():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, 2], [3, 4]))


def test_eval_info_cli(setup, tmp_path, capsys):
    _, _, _, _, ckpt = setup
    data = setup[0] / "test.jsonl.gz"
    out = tmp_path / "info.json"
    code = main(["eval", "info", str(ckpt), "--decoder", "dec", "--data", str(data), "--context-tokens", "24",
                 "--target-tokens", "8", "--max-samples", "8", "--batch-size", "4", "--adaptive", "zlib",
                 "--output", str(out), "--no-progress", "--pooling-factors", "2,4,8,3"])
    assert code == 0
    res = json.loads(out.read_text())
    labels = [p["label"] for p in res["points"]]
    assert labels == ["pf2", "pf4", "pf8", "pf3", "adaptive-zlib"]
    assert [p["trained_factor"] for p in res["points"]] == [True, True, True, False, True]
    rates = {p["label"]: p["rate_vectors_per_token"] for p in res["points"]}
    assert rates["pf2"] > rates["pf4"] > rates["pf8"] and rates["adaptive-zlib"] <= rates["pf4"] + 1e-9
    printed = capsys.readouterr().out
    assert "pf3 (untrained)" in printed and "recEM" in printed and "greedy reconstruction of the first 8" in printed
    for p in res["points"]:  # greedy reconstruction of the first 8 windows at every point
        assert p["greedy_recon_samples"] == 8 and 0 <= p["greedy_recon_bleu4"] <= 1
        assert p["greedy_recon_exact"] in [i / 8 for i in range(9)] and 0 <= p["recon_acc"] <= 1
    assert main(["eval", "info", str(ckpt), "--decoder", "dec", "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert main(["eval", "info", str(ckpt), "--decoder", "zzz", "--data", str(data)]) == 2


def test_reconstruction_scores_hand_computed():
    from arc_encoder.info import reconstruction_scores

    same = reconstruction_scores([[1, 2, 3, 4, 5], [6, 7, 8, 9]], [[1, 2, 3, 4, 5], [6, 7, 8, 9]])
    assert (same.samples, same.exact_match, same.bleu4, same.token_match) == (2, 1.0, pytest.approx(1.0), 1.0)
    one_off = reconstruction_scores([[1, 2, 3, 4, 5], [6, 7, 8, 0]], [[1, 2, 3, 4, 5], [6, 7, 8, 9]])
    assert one_off.exact_match == 0.5 and one_off.token_match == pytest.approx(8 / 9)
    # pooled n-gram precisions: 8/9, 6/7, 4/5, 2/3
    assert one_off.bleu4 == pytest.approx((8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25)
    with pytest.raises(ValueError, match="reconstructions"):
        reconstruction_scores([[1]], [])


def test_greedy_reconstruction_scores_what_the_decoder_writes(setup, monkeypatch):
    """Generation forced to write each context back (then one token wrong): exact match and BLEU follow,
    and the decoder is asked for exactly the context's length from [vectors][<Rec>]."""
    from arc_encoder.bleu import corpus_bleu

    _, model, decoder, tok, _ = setup
    batches = eval_batches(DOCS, model, "dec", tok, 24, 8, max_samples=6, batch_size=4)
    ev = InfoEvaluator(model, decoder, batches)
    refs = [c for b in batches for c in b.context_ids][:5]
    calls, wrong = [], {"row": None}

    def fake_generate(inputs_embeds, attention_mask, max_new_tokens, min_new_tokens, **kw):
        start = sum(len(c) for c in calls)
        rows = [list(r) for r in refs[start : start + inputs_embeds.shape[0]]]
        calls.append(rows)
        assert max_new_tokens == min_new_tokens == 24 and kw["do_sample"] is False
        vectors = [sum(-(-len(c) // 4) for c in model.chunk(x)) for x in batches[len(calls) - 1].encoder_ids]
        assert attention_mask.sum(-1).tolist() == [v + 1 for v in vectors[: len(rows)]]  # no BOS (reference), + <Rec>
        if wrong["row"] is not None and start <= wrong["row"] < start + len(rows):
            rows[wrong["row"] - start][-1] = (rows[wrong["row"] - start][-1] + 1) % len(tok)
        return torch.tensor(rows)

    monkeypatch.setattr(decoder, "generate", fake_generate)
    g = ev.greedy_reconstruction(5, 4, pad_token_id=0)
    assert [len(c) for c in calls] == [4, 1] and (g.samples, g.exact_match, g.token_match) == (5, 1.0, 1.0)
    assert g.bleu4 == pytest.approx(1.0)
    calls.clear()
    wrong["row"] = 4
    g = ev.greedy_reconstruction(5, 4)
    hyps = [list(r) for r in refs]
    hyps[4][-1] = (hyps[4][-1] + 1) % len(tok)
    assert g.exact_match == pytest.approx(4 / 5) and g.token_match == pytest.approx(1 - 1 / 120)
    assert g.bleu4 == pytest.approx(corpus_bleu(hyps, refs).bleu) and g.bleu4 < 1.0
    calls.clear()
    p = ev.point(4, greedy_samples=5)
    assert p.greedy_recon_samples == 5 and p.greedy_recon_exact == pytest.approx(4 / 5)
    assert ev.point(4).greedy_recon_samples == 0 and ev.point(4).greedy_recon_bleu4 is None
