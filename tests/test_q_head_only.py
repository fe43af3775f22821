"""The best configuration as public API: `QHeadConfig(q_labels="effects")` (one-step candidate-effect labels) and
`QHeadConfig(q_head_only=True)` (the Q head alone on the frozen policy, no LM loss)."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from tests.conftest import make_tiny_gpt2
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer
from trl_qhead.config import Q_HEAD_ONLY_BIAS_LEARNING_RATE, Q_HEAD_ONLY_LEARNING_RATE


def _rows():
    """Two scored completions with candidate labels; real rewards, and one row that is not done (it would bootstrap
    V), so that any return reaching the targets shows."""
    return [
        {
            "input_ids": [5, 6, 7, 8, 9],
            "completion_mask": [0, 1, 1, 1, 1],
            "reward": 1.5,
            "done": True,
            "candidate_ids": [[], [1, 2], [], [3, 8], [4, 2]],  # 8 is the sampled token at 3: no pair
            "candidate_rewards": [[], [0.5, -0.5], [], [1.0, 2.0], [0.3, -0.2]],
            "candidate_sampled_reward": [0.0, 0.25, 0.0, -0.25, 0.1],
        },
        {
            "input_ids": [9, 10, 11, 12],
            "completion_mask": [0, 0, 1, 1],
            "reward": -2.0,
            "done": False,
            "candidate_ids": [[], [12, 13], [14, 15], [16, 17]],
            "candidate_rewards": [[], [0.1, 0.2], [0.3, 0.4], [-0.7, 0.9]],
            "candidate_sampled_reward": [0.0, 0.5, 0.6, -0.1],
        },
    ]


def _config(tmp_path, **kwargs):
    return QHeadConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


def test_q_head_only_defaults_to_the_demo_learning_rates(tmp_path):
    args = _config(tmp_path, q_head_only=True)
    assert (args.q_head_learning_rate, args.q_head_bias_learning_rate) == (2e-5, 1e-2)
    assert (Q_HEAD_ONLY_LEARNING_RATE, Q_HEAD_ONLY_BIAS_LEARNING_RATE) == (2e-5, 1e-2)
    args = _config(tmp_path, q_head_only=True, q_head_learning_rate=1e-4)
    assert (args.q_head_learning_rate, args.q_head_bias_learning_rate) == (1e-4, 1e-2)
    plain = _config(tmp_path)  # the defaults outside the mode are unchanged
    assert (plain.q_labels, plain.q_head_only, plain.q_head_learning_rate) == ("returns", False, None)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"q_labels": "effect"}, "`q_labels` must be one of"),
        ({"q_labels": "effects", "use_lm_rewards": True}, "`use_lm_rewards`"),
        ({"q_labels": "effects", "reward_normalization": "batch"}, "`reward_normalization`"),
        ({"q_labels": "effects", "reward_clip": 1.0}, "`reward_clip`"),
        ({"q_labels": "effects", "candidate_weight": 0.0}, "`candidate_weight` must be > 0"),
        ({"q_head_only": True, "q_weight": 0.0}, "`q_weight` must be > 0"),
        ({"q_head_only": "yes"}, "`q_head_only` must be True or False"),
    ],
)
def test_combinations_that_cannot_combine_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **kwargs)


def test_trainer_refuses_what_the_modes_cannot_use(tmp_path, gpt2_tokenizer):
    data = Dataset.from_list(_rows())
    lora = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2())
    with pytest.raises(ValueError, match="has adapters"):
        QHeadTrainer(model, _config(tmp_path, q_head_only=True), train_dataset=data, peft_config=lora,
                     processing_class=gpt2_tokenizer)  # fmt: skip
    plain = data.remove_columns(["candidate_ids", "candidate_rewards", "candidate_sampled_reward"])
    with pytest.raises(ValueError, match="needs candidate labels"):
        QHeadTrainer(
            model, _config(tmp_path, q_labels="effects"), train_dataset=plain, processing_class=gpt2_tokenizer
        )
    with pytest.raises(ValueError, match="drop `reward_funcs`"):
        QHeadTrainer(
            model,
            _config(tmp_path, q_labels="effects"),
            train_dataset=data,
            processing_class=gpt2_tokenizer,
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        )


@pytest.mark.parametrize("head", ["dense", "tied"])
def test_q_head_only_trains_the_head_and_leaves_every_policy_weight_bit_identical(tmp_path, gpt2_tokenizer, head):
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(), q_head_type=head)
    policy = {name: p.detach().clone() for name, p in model.pretrained_model.named_parameters()}
    head_before = {name: p.detach().clone() for name, p in model.q_head.named_parameters()}
    args = _config(
        tmp_path, q_head_only=True, q_labels="effects", max_steps=3, per_device_train_batch_size=2,
        q_head_learning_rate=1e-2, learning_rate=1e-2, weight_decay=0.1, save_strategy="no",
    )  # fmt: skip
    trainer = QHeadTrainer(model, args, train_dataset=Dataset.from_list(_rows()), processing_class=gpt2_tokenizer)
    trainer.train()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.q_head.parameters()}  # the head's parameters, and only those
    for name, p in model.pretrained_model.named_parameters():
        assert torch.equal(p, policy[name]), name
    for name, p in model.q_head.named_parameters():
        assert not torch.equal(p, head_before[name]), name  # every head parameter moved


def _reference_effects_loss(model, rows, candidate_weight):
    """The obvious reading of effects labels, one row at a time from the raw rows: every sampled action regressed on
    0, every candidate `c != a_t` of a state on `r'(s, c) - r'(s, a_t)`, summed and divided by the number of actions;
    no LM term."""
    total, n_actions = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        q = model(input_ids=ids, attention_mask=torch.ones_like(ids), return_q=True).q_values[0]  # (T, V)
        for t in range(len(row["input_ids"]) - 1):
            if not row["completion_mask"][t + 1]:
                continue
            n_actions += 1
            action = row["input_ids"][t + 1]
            total = total + q[t, action] ** 2
            sampled = row["candidate_sampled_reward"][t + 1]
            for c, effect in zip(row["candidate_ids"][t + 1], row["candidate_rewards"][t + 1], strict=True):
                if c != action:
                    total = total + candidate_weight * (q[t, c] - (effect - sampled)) ** 2
    return total / n_actions


@pytest.mark.parametrize("head", ["dense", "tied"])
def test_effects_labels_train_on_the_effects_an_independent_computation_gives(tmp_path, gpt2_tokenizer, head):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(), q_head_type=head)
    with torch.no_grad():
        for p in model.q_head.parameters():
            p.normal_(0, 0.3)
    model.eval()  # no dropout: the two computations must see the same network
    args = _config(tmp_path, q_labels="effects", q_head_only=True, candidate_weight=0.7, gamma=0.9)
    rows = _rows()
    trainer = QHeadTrainer(model, args, train_dataset=Dataset.from_list(rows), processing_class=gpt2_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    params = list(model.q_head.parameters())
    fast = trainer.compute_loss(model, batch)
    fast_grads = torch.autograd.grad(fast, params)
    reference = _reference_effects_loss(model, rows, 0.7)
    reference_grads = torch.autograd.grad(reference, params)
    assert fast.item() == pytest.approx(reference.item(), rel=1e-5)
    for a, b in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the same rows with q_labels="returns" train on something else: the rewards and the bootstrap reach the targets
    returns_args = _config(tmp_path, q_head_only=True, candidate_weight=0.7, gamma=0.9)
    returns_trainer = QHeadTrainer(model, returns_args, train_dataset=Dataset.from_list(rows),
                                   processing_class=gpt2_tokenizer)  # fmt: skip
    assert abs(returns_trainer.compute_loss(model, batch).item() - reference.item()) > 1e-3


def test_q_head_only_reads_the_frozen_policy_without_dropout(tmp_path, gpt2_tokenizer):
    """Trainer.training_step puts the model in train mode; with q_head_only the policy's dropout stays off, so the
    loss of a batch is the same on every call (with dropout 0.5 on it would not be) and equals eval mode's."""
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5))
    data = Dataset.from_list(_rows())
    trainer = QHeadTrainer(model, _config(tmp_path, q_head_only=True), train_dataset=data,
                           processing_class=gpt2_tokenizer)  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    losses = []
    for _ in range(3):
        model.train()
        with torch.no_grad():
            losses.append(trainer.compute_loss(model, batch).item())
        assert not model.pretrained_model.training
    model.eval()
    with torch.no_grad():
        losses.append(trainer.compute_loss(model, batch).item())
    assert len(set(losses)) == 1, losses
