"""`trl_qhead.q_values`: gathered `Q(s_t, a_t)` and chunked `V(s)` equal the dense computation."""

import torch

from tests.test_losses import padded_batch, tiny_qhead_model
from trl_qhead.mdp import next_tokens
from trl_qhead.q_values import state_values


def test_state_values_match_dense_softmax_expectation():
    model = tiny_qhead_model()
    input_ids, attention_mask, _, _ = padded_batch("right")
    out = model(input_ids, attention_mask, return_q=True)
    mask = attention_mask.bool()
    values = state_values(out.hidden_states, out.logits, model.q_head, mask, chunk_size=5)
    dense = (torch.softmax(out.logits, -1) * out.q_values).sum(-1) * mask
    torch.testing.assert_close(values, dense, rtol=1e-5, atol=1e-5)
    assert not values.requires_grad


def test_action_q_is_the_gathered_full_q():
    model = tiny_qhead_model()
    input_ids, attention_mask, _, _ = padded_batch("left")
    actions = next_tokens(input_ids)
    out = model(input_ids, attention_mask, return_q=True, actions=actions)
    torch.testing.assert_close(out.action_q, out.q_values.gather(-1, actions.unsqueeze(-1)).squeeze(-1))
