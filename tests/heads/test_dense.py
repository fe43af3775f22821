"""The dense Q head, `Q(s, .) = W_q h + b_q`: every read of the `QHead` interface (full Q, gather of k ids, V, V*)
against the obvious float64 computation, a plain `nn.Linear` read as a dense head, and resizing the vocabulary."""

import pytest
import torch

from tests.conftest import make_tiny_gpt2
from trl_qhead import AutoModelForCausalLMWithQHead
from trl_qhead.heads import DenseQHead, as_q_head


def _head(hidden=8, vocab=30, seed=0):
    torch.manual_seed(seed)
    head = DenseQHead(hidden, vocab)
    head.reset_parameters("normal", std=0.5)
    with torch.no_grad():
        head.bias.normal_()
    return head


@pytest.mark.parametrize("rows", [3, 200])  # a handful of rows (decoding's product layout) and many
def test_every_read_equals_the_float64_product(rows):
    head = _head()
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(rows, 8, generator=gen)
    q64 = hidden.double() @ head.weight.double().T + head.bias.double()  # (N, |V|)
    features = head.features(hidden)
    torch.testing.assert_close(head.q_from_features(features).double(), q64, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 30, (rows, 4), generator=gen)
    torch.testing.assert_close(head.gather(features, ids).double(), q64.gather(-1, ids), rtol=1e-5, atol=1e-5)
    logits = torch.randn(rows, 30, generator=gen)
    policy = torch.softmax(logits, -1)
    torch.testing.assert_close(
        head.expected_value(features, policy).double(), (policy.double() * q64).sum(-1), rtol=1e-5, atol=1e-5
    )
    log_pi = torch.log_softmax(logits.double(), -1)
    want = 0.3 * torch.logsumexp(log_pi + q64 / 0.3, -1)
    torch.testing.assert_close(head.soft_value(features, log_pi, 0.3), want, rtol=1e-5, atol=1e-5)


def test_gather_reaches_only_the_gathered_rows_and_the_hidden_state():
    head = _head()
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    ids = torch.tensor([[[1, 2]] * 5, [[3, 1]] * 5])  # (2, 5, 2)
    head.gather(head.features(hidden), ids).sum().backward()
    touched = head.weight.grad.abs().sum(-1) > 0
    assert touched.nonzero().flatten().tolist() == [1, 2, 3]
    assert hidden.grad.abs().sum() > 0  # the Q loss trains the backbone through a dense head


def test_a_plain_linear_is_read_as_a_dense_head_sharing_its_parameters():
    linear = torch.nn.Linear(8, 30).double()
    head = as_q_head(linear)
    assert isinstance(head, DenseQHead) and head.weight is linear.weight and head.bias is linear.bias
    hidden = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(head.full_q(hidden), linear(hidden))
    no_bias = as_q_head(torch.nn.Linear(8, 30, bias=False))
    assert not no_bias.bias.any()
    with pytest.raises(TypeError, match="QHead"):
        as_q_head(torch.nn.ReLU())


def test_rank_is_not_a_dense_option_and_inits():
    with pytest.raises(ValueError, match="q_head_rank"):
        DenseQHead.build(None, hidden_size=8, vocab_size=30, rank=2)
    assert not DenseQHead(8, 30).weight.any()  # zeros, also when built directly
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=64), q_head_init="lm_head")
    assert torch.equal(model.q_head.weight, model.get_output_embeddings().weight.float())
    assert model.q_head.to_config() == {"q_head_type": "dense", "q_head_rank": None}
    assert model.q_head.hidden_linear_form().weight.dtype == torch.float64
    assert model.q_head.lm_head_input(torch.zeros(1, 32)) is None  # no in-head tilt


def test_resize_token_embeddings_resizes_the_dense_head(tmp_path):
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=64), q_head_init="normal").eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = model(ids, return_q=True).q_values
    model.resize_token_embeddings(70)
    assert model.q_head.weight.shape == (70, 32) and model.vocab_size == 70
    with torch.no_grad():
        after = model(ids, return_q=True).q_values
    torch.testing.assert_close(after[..., :64], before)
    assert not after[..., 64:].any()  # new tokens start at Q = 0
    model.save_pretrained(tmp_path / "resized")
    loaded = AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "resized"))
    assert torch.equal(loaded.q_head.weight, model.q_head.weight)
