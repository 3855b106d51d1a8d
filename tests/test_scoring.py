"""Logits and NLL at labelled positions only: equal to the full forward pass, for every family."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

from arc_encoder.scoring import IGNORE_INDEX, LogitHead, labelled_logits, labelled_nll, logit_head
from arc_encoder.tiny import tiny_causal_lm, tiny_config

VOCAB = 97


def gemma3_config(softcap=None, **kw):
    """Tiny Gemma 3 text config: one sliding (window 4) and one full layer, head_dim 12 != hidden / heads."""
    return AutoConfig.for_model(
        "gemma3_text", vocab_size=VOCAB, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, head_dim=12, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
        final_logit_softcapping=softcap, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)


def make(family: str):
    if family == "gemma3":
        cfg = gemma3_config(softcap=0.05)  # small cap: softcapping changes every logit a lot
    else:
        cfg = tiny_config(family, vocab_size=VOCAB, hidden_size=24, num_heads=3, num_kv_heads=1, num_layers=2)
    return tiny_causal_lm(cfg, seed=3).eval()


def rows_and_labels(b=3, s=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[1, 7:] = IGNORE_INDEX  # a short target
    mask = torch.ones(b, s, dtype=torch.long)
    mask[2, 8:] = 0  # right padding: its labels are ignored through the mask
    return ids, labels, mask


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen2", "gemma3"])
def test_labelled_nll_and_logits_equal_the_full_forward_pass(family):
    model = make(family)
    ids, labels, mask = rows_and_labels()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [b, s-1, V]
        ref = F.cross_entropy(full.transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
        on = (labels[:, 1:] != IGNORE_INDEX) & mask[:, 1:].bool()
        for chunk in (None, 1, 4):
            nll = labelled_nll(model, labels, mask, input_ids=ids, chunk_size=chunk)
            assert nll.shape == (3, 10) and nll.dtype == torch.float32
            torch.testing.assert_close(nll[on], ref[on], rtol=1e-5, atol=1e-5)
            assert float(nll[~on].abs().sum()) == 0.0
        logits, targets = labelled_logits(model, labels, mask, input_ids=ids)
        assert logits.shape == (int(on.sum()), VOCAB)
        torch.testing.assert_close(logits, full[on], rtol=1e-5, atol=1e-5)
        assert torch.equal(targets, labels[:, 1:][on])
        # inputs_embeds gives the same as input_ids
        embeds = model.get_input_embeddings()(ids)
        if family == "gemma3":  # Gemma scales its token embeddings inside the embedding module
            assert model.get_input_embeddings().embed_scale != 1.0
        nll_e = labelled_nll(model, labels, mask, inputs_embeds=embeds)
        torch.testing.assert_close(nll_e[on], ref[on], rtol=1e-4, atol=1e-4)


def test_gemma3_softcapping_is_applied_and_checked():
    model = make("gemma3")
    head = logit_head(model)
    assert head is not None and head.softcap == pytest.approx(0.05) and head.vocab_size == VOCAB
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = head.logits(head.hidden(input_ids=ids))
    assert float(logits.abs().max()) <= 0.05 + 1e-6  # capped
    assert head.matches(model, ids)
    uncapped = LogitHead(head.body, head.head, softcap=None)
    assert not uncapped.matches(model, ids)  # a missed transform is caught
    assert logit_head(make("llama")).softcap is None


def test_chunks_bound_the_logits_that_exist_at_once():
    model = make("llama")
    ids, labels, mask = rows_and_labels(b=4, s=13)
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    with torch.no_grad():
        labelled_nll(model, labels, mask, input_ids=ids, chunk_size=5)
    hook.remove()
    n = int(((labels[:, 1:] != IGNORE_INDEX) & mask[:, 1:].bool()).sum())
    assert sum(seen) == n and max(seen) == 5 and len(seen) == -(-n // 5)  # head sees labelled rows only


def test_gradients_through_checkpointed_chunks_equal_the_full_loss():
    model = make("gemma3")
    ids, labels, mask = rows_and_labels()
    on = (labels[:, 1:] != IGNORE_INDEX) & mask[:, 1:].bool()
    embeds = model.get_input_embeddings()(ids).detach()
    a = embeds.clone().requires_grad_(True)
    full = model(inputs_embeds=a, attention_mask=mask).logits[:, :-1].float()
    F.cross_entropy(full[on], labels[:, 1:][on]).backward()
    b = embeds.clone().requires_grad_(True)
    nll = labelled_nll(model, labels, mask, inputs_embeds=b, chunk_size=3)
    (nll.sum() / on.sum()).backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


class Oracle(nn.Module):
    """Not a Hugging Face model: logits from a table, so only the full forward pass applies."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, use_cache=False):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


def test_modules_without_a_separate_head_use_the_full_forward_pass():
    oracle = Oracle()
    assert logit_head(oracle) is None
    ids, labels, mask = rows_and_labels()
    nll = labelled_nll(oracle, labels, mask, input_ids=ids)
    ref = F.cross_entropy(oracle.table[ids[:, :-1]].transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
    on = (labels[:, 1:] != IGNORE_INDEX) & mask[:, 1:].bool()
    torch.testing.assert_close(nll[on], ref[on])
    # head=False forces the full pass on an HF model too; the numbers agree with the head path.
    model = make("llama")
    with torch.no_grad():
        torch.testing.assert_close(labelled_nll(model, labels, mask, input_ids=ids, head=False),
                                   labelled_nll(model, labels, mask, input_ids=ids), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    model = make("llama")
    ids, labels, mask = rows_and_labels()
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        labelled_nll(model, labels, mask)
    with pytest.raises(ValueError, match="labels must be"):
        labelled_nll(model, labels[0], input_ids=ids)
    with pytest.raises(ValueError, match="chunk_size"):
        labelled_nll(model, labels, mask, input_ids=ids, chunk_size=0)
