"""`trl_qhead.chunked_lm_head`: exact in float64, and no logits-sized tensor kept for the backward."""

import torch
from torch import nn

from tests.test_losses import dense_loss, efficient_loss, padded_batch, tiny_qhead_model
from trl_qhead.chunked_lm_head import action_logprobs_and_values


def test_no_logits_sized_tensor_is_kept_for_the_backward():
    model = tiny_qhead_model()
    input_ids, attention_mask, labels, rewards = padded_batch("right")
    chunk, vocab = 4, model.vocab_size
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []  # the shapes of what autograd keeps for the backward, besides the parameters themselves

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            saved.append(tuple(tensor.shape))
        return tensor

    def logits_sized(shapes):
        return [
            shape for shape in shapes if shape and shape[-1] == vocab and torch.Size(shape).numel() > chunk * vocab
        ]

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        efficient_loss(model, input_ids, attention_mask, labels, rewards, lam=0.95, chunk=chunk)
    assert saved and not logits_sized(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dense_loss(model, input_ids, attention_mask, labels, rewards, lam=0.95)
    assert logits_sized(saved)  # the check does see a logits-sized buffer when there is one


def test_action_logprobs_and_values_in_float64_are_exact():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    lm_head, q_head = nn.Linear(16, 50).double(), nn.Linear(16, 50).double()
    actions = torch.randint(0, 50, (3, 7))
    logprob_mask, value_mask = torch.rand(3, 7) > 0.3, torch.rand(3, 7) > 0.5
    logprobs, values = action_logprobs_and_values(
        hidden, lm_head, actions, logprob_mask, q_head=q_head, value_mask=value_mask, chunk_size=4
    )
    z = lm_head(hidden)
    dense = torch.log_softmax(z, -1).gather(-1, actions[..., None])[..., 0] * logprob_mask
    torch.testing.assert_close(logprobs, dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        values, (torch.softmax(z, -1) * q_head(hidden)).sum(-1) * value_mask, rtol=0, atol=1e-12
    )
    weights = torch.randn(3, 7, dtype=torch.float64)
    params = [hidden, lm_head.weight, lm_head.bias]
    for g_fast, g_dense in zip(
        torch.autograd.grad((logprobs * weights).sum(), params),
        torch.autograd.grad((dense * weights).sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(g_fast, g_dense, rtol=0, atol=1e-12)
    assert not values.requires_grad
