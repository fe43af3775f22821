"""The registry: `q_head_type` -> class, and "adding a head is one file plus a registry line". A toy head defined here
(`Q = W2 (W1 h) + b`, its features `W1 h` of size r) and registered with one line works end to end, with no edit
anywhere else: the trainer's loss (gather with packing, V, soft V*, candidates), the processor, `fold_tilt`, `rerank`
and save / load, each against an independent computation from the head's full Q."""

import math

import pytest
import torch
from datasets import Dataset
from torch import nn

from tests.conftest import make_tiny_gpt2
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer, QTiltLogitsProcessor, fold_tilt, rerank
from trl_qhead.heads import Q_HEADS, LinearForm, QHead, build_q_head, check_q_head_type, q_head_types
from trl_qhead.mdp import action_mask_from_labels, next_tokens


class ToyQHead(QHead):
    """`Q(s, .) = W2 (W1 h) + b`: W1 `r x H`, W2 `|V| x r` (the "one file" of a new head)."""

    q_head_type = "toy"

    def __init__(self, hidden_size, vocab_size, rank, device=None):
        super().__init__(hidden_size, vocab_size)
        self.rank = rank
        self.down = nn.Parameter(torch.zeros(rank, hidden_size, device=device))
        self.up = nn.Parameter(torch.zeros(vocab_size, rank, device=device))
        self.bias = nn.Parameter(torch.zeros(vocab_size, device=device))

    @classmethod
    def build(cls, backbone, *, hidden_size, vocab_size, device=None, rank=None):
        if rank is None:
            raise ValueError("q_head_type='toy' needs `q_head_rank`.")
        return cls(hidden_size, vocab_size, rank, device=device)

    @torch.no_grad()
    def reset_parameters(self, init="zeros", *, std=0.02, backbone=None):
        self.down.normal_(0.0, 1.0 / math.sqrt(self.hidden_size))
        self.up.zero_() if init == "zeros" else self.up.normal_(0.0, std)
        self.bias.zero_()

    def to_config(self):
        return {"q_head_type": self.q_head_type, "q_head_rank": self.rank}

    def features(self, hidden, context=None):
        return nn.functional.linear(hidden.float(), self.down)

    def linear_form(self):
        return LinearForm(self.up, self.bias)

    def hidden_linear_form(self):
        return LinearForm(self.up.double() @ self.down.double(), self.bias.double())


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(Q_HEADS, ToyQHead.q_head_type, ToyQHead)  # the registry line


def _toy_model(seed=0):
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=64), q_head_type="toy", q_head_rank=3)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.q_head.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def _reference_q(model, ids):
    """The toy's Q from its parameters, written out: `(h W1^T) W2^T + b` on the backbone's hidden states."""
    with torch.no_grad():
        hidden = model(ids).hidden_states.float()
    head = model.q_head
    return hidden @ head.down.T @ head.up.T + head.bias


def test_registry_lists_and_checks_types(toy):
    assert set(q_head_types()) >= {"dense", "tied", "toy"}
    assert check_q_head_type("toy") == "toy"
    for bad in ("nope", None, 3):
        with pytest.raises(ValueError, match="q_head_type"):
            check_q_head_type(bad)
    head = build_q_head("toy", make_tiny_gpt2(vocab_size=64), hidden_size=32, vocab_size=64, rank=2)
    assert isinstance(head, ToyQHead) and head.rank == 2
    with pytest.raises(ValueError, match="q_head_rank"):
        AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=64), q_head_type="toy")


def test_model_reads_equal_the_reference(toy):
    model = _toy_model()
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.ones_like(ids)
    q = _reference_q(model, ids)
    actions = next_tokens(ids)
    action_mask = action_mask_from_labels(ids, mask)
    values_at = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        full = model(ids, mask, return_q=True, actions=actions, value_mask=values_at)
        fused = model(ids, mask, actions=actions, value_mask=values_at, logprob_mask=action_mask, value_chunk_size=4)
    torch.testing.assert_close(full.q_values, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.action_q, q.gather(-1, actions[..., None])[..., 0], rtol=1e-5, atol=1e-5)
    v = (torch.softmax(full.logits.float(), -1) * q).sum(-1)
    torch.testing.assert_close(full.state_values, v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.state_values, v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [{}, {"q_target": "soft", "target_beta": 0.5}])
def test_trainer_loss_equals_its_dense_twins_and_trains_the_toy(toy, tmp_path, gpt2_tokenizer, target):
    """Packed rows, lambda-returns (V or V* at every state): the toy's loss equals the loss of the dense head with
    `W_q = W2 W1` (the dense path is checked against independent references in tests/test_losses.py)."""
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(), q_head_type="toy", q_head_rank=3, q_head_init="normal")
    with torch.no_grad():
        model.q_head.bias.normal_(0.0, 0.5)
    dense = AutoModelForCausalLMWithQHead(model.pretrained_model)
    with torch.no_grad():
        dense.q_head.weight.copy_(model.q_head.up @ model.q_head.down)
        dense.q_head.bias.copy_(model.q_head.bias)
    rows = {"text": ["The cat sat.", "A dog ran far away.", "Rain."] * 2, "reward": [1.0, -1.0, 0.5] * 2}
    config = QHeadConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=3, max_length=16, report_to=[],
        save_strategy="no", disable_tqdm=True, learning_rate=1e-2, gae_lambda=0.5, packing=True, **target,
    )  # fmt: skip
    trainer = QHeadTrainer(model, config, train_dataset=Dataset.from_dict(rows), processing_class=gpt2_tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert "position_ids" in batch  # packed
    model.eval()
    with torch.no_grad():
        got, want = trainer.compute_loss(model, batch), trainer.compute_loss(dense, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    before = {k: v.clone() for k, v in model.q_head.state_dict().items()}
    trainer.train()
    assert all(not torch.equal(before[k], v) for k, v in model.q_head.state_dict().items())


def test_processor_fold_and_rerank_use_the_toy(toy):
    model = _toy_model()
    ids = torch.randint(0, 64, (2, 3))
    beta = 0.5
    expected = ids  # greedy from logits + Q / beta, one full forward per token: the slow, obvious loop
    for _ in range(4):
        with torch.no_grad():
            scores = model(expected).logits[:, -1].float() + _reference_q(model, expected)[:, -1] / beta
        expected = torch.cat([expected, scores.argmax(-1, keepdim=True)], dim=-1)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4, pad_token_id=0)
    with QTiltLogitsProcessor(model, beta) as processor:
        got = model.generate(ids, logits_processor=[processor], **kwargs)
    assert torch.equal(got, expected)
    assert torch.equal(fold_tilt(model, beta).generate(ids, **kwargs), expected)
    samples = torch.randint(1, 64, (4, 5))
    scored = rerank(model, samples, 2, prompt_length=2, eos_token_id=None, pad_token_id=None)
    q = _reference_q(model, samples)
    torch.testing.assert_close(scored.scores.flatten(), q[:, -2].gather(-1, samples[:, -1:])[:, 0])


def test_save_and_load_round_trip(toy, tmp_path):
    model = _toy_model()
    model.save_pretrained(tmp_path / "toy")
    loaded = AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "toy"))
    assert isinstance(loaded.q_head, ToyQHead) and loaded.q_head_rank == 3
    for name, tensor in model.q_head.state_dict().items():
        assert torch.equal(loaded.q_head.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="q_head_type='toy'"):
        AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=64)).load_q_head(tmp_path / "toy")


class SoftplusQHead(QHead):
    """`Q = softplus(W h) + b`: linear in no features, so it overrides `q_from_features` and every other read takes
    the base class's default through the full Q (as a head with its own network over the context would)."""

    q_head_type = "softplus"

    def __init__(self, hidden_size, vocab_size, device=None):
        super().__init__(hidden_size, vocab_size)
        self.weight = nn.Parameter(torch.zeros(vocab_size, hidden_size, device=device))
        self.bias = nn.Parameter(torch.zeros(vocab_size, device=device))

    @classmethod
    def build(cls, backbone, *, hidden_size, vocab_size, device=None, rank=None):
        return cls(hidden_size, vocab_size, device=device)

    @torch.no_grad()
    def reset_parameters(self, init="zeros", *, std=0.02, backbone=None):
        self.weight.normal_(0.0, std)
        self.bias.zero_()

    def features(self, hidden, context=None):
        return hidden.float()

    def q_from_features(self, features):
        return nn.functional.softplus(features @ self.weight.T) + self.bias


def test_a_head_linear_in_no_features_gets_every_read_from_its_full_q(monkeypatch):
    monkeypatch.setitem(Q_HEADS, SoftplusQHead.q_head_type, SoftplusQHead)
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=64), q_head_type="softplus", q_head_init="normal")
    model.eval()
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        hidden = model(ids).hidden_states.float()
    q = nn.functional.softplus(hidden @ model.q_head.weight.T) + model.q_head.bias  # the reference
    actions, mask = next_tokens(ids), torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        full = model(ids, return_q=True, actions=actions, value_mask=mask)
        fused = model(ids, actions=actions, value_mask=mask, logprob_mask=mask, value_chunk_size=3)
    torch.testing.assert_close(full.q_values, q)
    torch.testing.assert_close(full.action_q, q.gather(-1, actions[..., None])[..., 0])
    v = (torch.softmax(full.logits.float(), -1) * q).sum(-1)
    torch.testing.assert_close(full.state_values, v)
    torch.testing.assert_close(fused.state_values, v)
    log_pi = torch.log_softmax(full.logits.float(), -1)
    torch.testing.assert_close(
        model.q_head.soft_value(model.q_head.features(hidden), log_pi, 0.5),
        0.5 * torch.logsumexp(log_pi + q / 0.5, -1),
    )
    with pytest.raises(ValueError, match="cannot be folded"):
        fold_tilt(model, 0.5)
    with QTiltLogitsProcessor(model, 0.5, record_kl=False) as processor:
        assert not processor._head_tilt  # no `lm_head_input`: the processor adds Q / beta itself
        out = model.generate(
            ids[:, :2], logits_processor=[processor], do_sample=False, max_new_tokens=2, pad_token_id=0
        )
    with torch.no_grad():
        first = model(ids[:, :2])
        hidden = first.hidden_states[:, -1].float()
        q_last = nn.functional.softplus(hidden @ model.q_head.weight.T) + model.q_head.bias
    assert torch.equal(out[:, 2], (first.logits[:, -1].float() + q_last / 0.5).argmax(-1))  # the first tilted step
