"""The efficient loss (gathered Q(s,a), V only where needed, chunked) equals the naive dense computation: same loss,
same gradient for every parameter, with padding on both sides, rewards, episode ends and every return estimator."""

import pytest
import torch

from tests.conftest import make_tiny_gpt2
from trl_qhead import AutoModelForCausalLMWithQHead
from trl_qhead.losses import dense_qhead_loss, qhead_loss, state_values
from trl_qhead.mdp import action_mask_from_labels, bootstrap_mask, episode_dones, next_tokens

EOS = 7


def _batch(padding_side: str, seed: int = 0):
    """Four rows of different lengths over a 50-token alphabet, some with an EOS inside, padded on one side."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [12, 9, 5, 2]
    rows = [torch.randint(10, 60, (n,), generator=gen) for n in lengths]
    row_rewards = [torch.randn(n, generator=gen) for n in lengths]
    rows[0][6] = EOS  # an episode that ends in the middle of the row
    rows[1][-1] = EOS  # one that ends with the row
    width = max(lengths)
    input_ids = torch.full((len(rows), width), EOS)  # pad with EOS, as GPT-2 does: masks must not look at ids
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    rewards = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        input_ids[i, span] = row
        attention_mask[i, span] = 1
        rewards[i, span] = row_rewards[i]
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels, rewards


def _model():
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=64), q_head_init="normal").eval()  # no dropout
    with torch.no_grad():
        model.q_head.bias.normal_(0, 0.5)
    return model


def _efficient(model, input_ids, attention_mask, labels, rewards, gamma, lam, chunk):
    action_mask = action_mask_from_labels(labels, attention_mask)
    actions = next_tokens(input_ids)
    monte_carlo = lam is None or lam == 1
    value_mask = bootstrap_mask(action_mask) if monte_carlo else attention_mask.bool()
    out = model(input_ids, attention_mask, actions=actions, value_mask=value_mask, value_chunk_size=chunk)
    dones = episode_dones(actions, action_mask, EOS)
    loss, _ = qhead_loss(
        out.logits, out.action_q, out.state_values, actions, action_mask, rewards, dones,
        gamma=gamma, gae_lambda=lam, q_weight=0.7,
    )  # fmt: skip
    return loss


def _dense(model, input_ids, attention_mask, labels, rewards, gamma, lam):
    action_mask = action_mask_from_labels(labels, attention_mask)
    actions = next_tokens(input_ids)
    out = model(input_ids, attention_mask, return_q=True)
    dones = episode_dones(actions, action_mask, EOS)
    return dense_qhead_loss(
        out.logits, out.q_values, actions, action_mask, rewards, dones, gamma=gamma, gae_lambda=lam, q_weight=0.7
    )


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("lam", [None, 0.0, 0.95])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_efficient_loss_and_gradients_equal_dense(padding_side, lam, chunk):
    model = _model()
    batch = _batch(padding_side)
    loss_fast = _efficient(model, *batch, gamma=0.9, lam=lam, chunk=chunk)
    grads_fast = torch.autograd.grad(loss_fast, list(model.parameters()), allow_unused=True)
    loss_dense = _dense(model, *batch, gamma=0.9, lam=lam)
    grads_dense = torch.autograd.grad(loss_dense, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss_fast, loss_dense, rtol=1e-5, atol=1e-5)
    names = [name for name, _ in model.named_parameters()]
    for name, g_fast, g_dense in zip(names, grads_fast, grads_dense, strict=True):
        assert (g_fast is None) == (g_dense is None), name
        if g_fast is not None:
            torch.testing.assert_close(g_fast, g_dense, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert any(g is not None and g.abs().sum() > 0 for g in grads_fast[-2:]), "the Q head must get a gradient"


def test_left_and_right_padding_give_the_same_loss():
    model = _model()
    left = _efficient(model, *_batch("left"), gamma=0.9, lam=0.5, chunk=4)
    right = _efficient(model, *_batch("right"), gamma=0.9, lam=0.5, chunk=4)
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)


def test_state_values_match_dense_softmax_expectation():
    model = _model()
    input_ids, attention_mask, _, _ = _batch("right")
    out = model(input_ids, attention_mask, return_q=True)
    mask = attention_mask.bool()
    values = state_values(out.hidden_states, out.logits, model.q_head, mask, chunk_size=5)
    dense = (torch.softmax(out.logits, -1) * out.q_values).sum(-1) * mask
    torch.testing.assert_close(values, dense, rtol=1e-5, atol=1e-5)
    assert not values.requires_grad


def test_action_q_is_the_gathered_full_q():
    model = _model()
    input_ids, attention_mask, _, _ = _batch("left")
    actions = next_tokens(input_ids)
    out = model(input_ids, attention_mask, return_q=True, actions=actions)
    torch.testing.assert_close(out.action_q, out.q_values.gather(-1, actions.unsqueeze(-1)).squeeze(-1))


def test_mdp_grid_of_a_left_padded_row():
    input_ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    mask = action_mask_from_labels(labels, attention_mask)
    assert mask.tolist() == [[False, False, True, True, False], [True, True, True, True, False]]
    assert bootstrap_mask(mask).tolist() == [[False] * 4 + [True], [False] * 4 + [True]]
    dones = episode_dones(next_tokens(input_ids), mask, eos_token_id=7)
    assert dones.tolist() == [[0, 0, 0, 1, 0], [0, 1, 0, 0, 0]]
