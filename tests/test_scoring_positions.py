"""Logits only where labels are: the same numbers as the full forward, far fewer columns."""

import pytest
import torch

from arc_encoder.objectives import IGNORE_INDEX, mean_loss, next_token_logits
from arc_encoder.tiny import tiny_causal_lm, tiny_config


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen2"])
def test_labelled_positions_match_the_full_forward(family):
    decoder = tiny_causal_lm(tiny_config(family, vocab_size=61, hidden_size=24, num_heads=3, num_kv_heads=3,
                                         num_layers=2), seed=4).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, 61, (3, 13))
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0  # a right-padded row
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 8:] = ids[0, 8:]
    labels[1, 7:12] = ids[1, 7:12]
    labels[2, 8:10] = ids[2, 8:10]
    logits, kept = next_token_logits(decoder, labels, mask, input_ids=ids)
    full = decoder(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    assert logits.shape[1] == 6 < 12  # columns 6..11 predict labels 7..12
    torch.testing.assert_close(logits, full[:, 6:], rtol=1e-5, atol=1e-5)
    assert torch.equal(kept, labels[:, 7:])
    expected = torch.nn.functional.cross_entropy(full.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(mean_loss(logits, kept), expected, rtol=1e-5, atol=1e-6)
