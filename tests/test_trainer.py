"""QHeadTrainer end to end on a tiny GPT-2 with the real GPT-2 tokenizer."""

import copy

import pytest
import torch
from datasets import Dataset, IterableDataset
from peft import LoraConfig

import trl_qhead.trainer
from tests.conftest import make_tiny_gpt2
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer
from trl_qhead.mdp import action_mask_from_labels, next_tokens

CORPUS = [
    "The cat sat on the mat and looked at the door.",
    "A dog ran across the park to find a ball.",
    "The sun rose over the hills and the birds sang.",
    "She opened the book and read the first page aloud.",
    "Rain fell on the roof all night long.",
    "He poured a cup of tea and sat by the window.",
] * 6


def _config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=30,
        logging_steps=1,
        max_length=32,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    defaults.update(kwargs)
    return QHeadConfig(**defaults)


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_training_lowers_lm_and_q_losses(tmp_path, gpt2_tokenizer):
    # Reference log-prob rewards give the Q head something to fit from the first step (zero rewards and a zero head
    # start at loss_q = 0).
    config = _config(tmp_path, use_lm_rewards=True, gamma=0.5)
    trainer = QHeadTrainer(
        make_tiny_gpt2(), config, train_dataset=Dataset.from_dict({"text": CORPUS}), processing_class=gpt2_tokenizer
    )
    trainer.train()
    loss_lm, loss_q = _logged(trainer, "loss_lm"), _logged(trainer, "loss_q")
    assert len(loss_lm) == 30 and len(loss_q) == 30
    assert sum(loss_lm[-5:]) < 0.8 * sum(loss_lm[:5])
    assert sum(loss_q[-5:]) < 0.8 * sum(loss_q[:5])
    for key in ("q_mean", "v_mean", "g_mean"):
        assert len(_logged(trainer, key)) == 30


def test_q_head_learns_which_token_a_per_token_reward_pays_for(tmp_path, gpt2_tokenizer):
    # Markov sequences over four tokens; emitting `paid` right after `trigger` earns 1. With gamma = 0 the target is
    # the immediate reward, so Q(s, paid) must rank first in the states that end with `trigger` and be near 0 elsewhere.
    trigger, paid, others = 10, 11, [12, 13]
    alphabet = [trigger, paid, *others]
    gen = torch.Generator().manual_seed(0)

    # Transition probabilities over `alphabet` given the last token: `paid` can follow any token, but pays only after
    # `trigger`, so Q(s, paid) must depend on the state, not only on the token.
    transitions = torch.tensor(
        [[0.1, 0.5, 0.2, 0.2], [0.4, 0.2, 0.2, 0.2], [0.4, 0.3, 0.1, 0.2], [0.4, 0.3, 0.2, 0.1]]
    )

    def sample(n_rows):
        rows = []
        for _ in range(n_rows):
            row = [0]
            for _ in range(15):
                row.append(torch.multinomial(transitions[row[-1]], 1, generator=gen).item())
            rows.append([alphabet[i] for i in row])
        return rows

    ids = sample(64)
    rewards = [[float(t == paid and k > 0 and row[k - 1] == trigger) for k, t in enumerate(row)] for row in ids]
    config = _config(tmp_path, gamma=0.0, max_steps=120, learning_rate=2e-2, per_device_train_batch_size=8)
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=64))
    dataset = Dataset.from_dict({"input_ids": ids, "rewards": rewards})
    QHeadTrainer(model, config, train_dataset=dataset, processing_class=_SmallVocab(gpt2_tokenizer, 64)).train()

    test_ids = torch.tensor(
        [[alphabet[i] for i in torch.randint(0, 4, (16,), generator=gen).tolist()] for _ in range(8)]
    )
    with torch.no_grad():
        q = model.eval()(test_ids, return_q=True).q_values[:, :, alphabet]
    best = torch.tensor(alphabet)[q.argmax(-1)]
    after_trigger = test_ids == trigger
    assert (best[after_trigger] == paid).float().mean() > 0.95
    assert q[after_trigger][:, 1].mean() == pytest.approx(1.0, abs=0.2)
    assert q[~after_trigger][:, 1].mean() == pytest.approx(0.0, abs=0.2)


class _SmallVocab:
    """The real tokenizer, reporting a vocabulary of `n` tokens, for pre-tokenised ids of a model with `n` tokens."""

    def __init__(self, tokenizer, n):
        self._tokenizer, self._n = tokenizer, n
        self.eos_token_id = self.pad_token_id = 0

    def __len__(self):
        return self._n

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_save_reload_and_continue_training_give_identical_q_values(tmp_path, gpt2_tokenizer):
    dataset = Dataset.from_dict({"text": CORPUS})
    trained = AutoModelForCausalLMWithQHead(make_tiny_gpt2())
    QHeadTrainer(
        trained, _config(tmp_path, use_lm_rewards=True, max_steps=5), dataset, processing_class=gpt2_tokenizer
    ).train()
    trained.save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForCausalLMWithQHead.from_pretrained(tmp_path / "ckpt")
    probe = torch.tensor([gpt2_tokenizer("The cat sat on the")["input_ids"]])
    q_before = trained.eval()(probe, return_q=True).q_values
    assert torch.equal(q_before, reloaded.eval()(probe, return_q=True).q_values)

    for model in (trained, reloaded):
        config = _config(tmp_path, use_lm_rewards=True, max_steps=5, seed=1)
        QHeadTrainer(model, config, dataset, processing_class=gpt2_tokenizer).train()
    q_trained = trained.eval()(probe, return_q=True).q_values
    assert torch.equal(q_trained, reloaded.eval()(probe, return_q=True).q_values)
    assert not torch.equal(q_trained, q_before)


def test_streaming_dataset_trains_with_max_steps(tmp_path, gpt2_tokenizer):
    def lines():
        yield from ({"text": line} for line in CORPUS)

    config = _config(tmp_path, max_steps=4, streaming=True, packing=True, max_length=16)
    trainer = QHeadTrainer(
        make_tiny_gpt2(), config, IterableDataset.from_generator(lines), processing_class=gpt2_tokenizer
    )
    trainer.train()
    assert trainer.state.global_step == 4 and len(_logged(trainer, "loss_lm")) == 4


def test_packed_dataset_trains(tmp_path, gpt2_tokenizer):
    config = _config(tmp_path, max_steps=3, packing=True, max_length=24, gae_lambda=0.9)
    trainer = QHeadTrainer(
        make_tiny_gpt2(), config, Dataset.from_dict({"text": CORPUS}), processing_class=gpt2_tokenizer
    )
    assert all(len(row["input_ids"]) == 24 for row in list(trainer.train_dataset)[:-1])
    trainer.train()
    assert trainer.state.global_step == 3


def test_trains_from_names_alone_with_local_text_files(tmp_path, gpt2_tokenizer):
    model_dir = tmp_path / "tiny"
    make_tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    config = _config(tmp_path, max_steps=2, dataset_name="text", dataset_data_files=str(corpus))
    trainer = QHeadTrainer(str(model_dir), config)
    trainer.train()
    trainer.save_model()
    reloaded = AutoModelForCausalLMWithQHead.from_pretrained(config.output_dir)
    assert torch.equal(reloaded.q_head.weight, trainer.model.q_head.weight)


def test_lm_rewards_with_peft_use_the_adapter_free_base(tmp_path, gpt2_tokenizer):
    base = make_tiny_gpt2().eval()
    lora = LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    config = _config(tmp_path, use_lm_rewards=True, max_steps=2)
    trainer = QHeadTrainer(
        copy.deepcopy(base),
        config,
        Dataset.from_dict({"text": CORPUS}),
        processing_class=gpt2_tokenizer,
        peft_config=lora,
    )
    assert trainer.ref_model is None  # no second copy: adapters are disabled for the reference pass
    trainer.train()
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # make the policy differ from the base
    input_ids = torch.tensor([gpt2_tokenizer("The cat sat on the mat")["input_ids"]])
    mask = torch.ones_like(input_ids)
    rewards = trainer._reference_logprobs(trainer.model, input_ids, mask, next_tokens(input_ids))
    expected = torch.log_softmax(base(input_ids).logits, -1).gather(-1, next_tokens(input_ids)[..., None])[..., 0]
    torch.testing.assert_close(rewards, expected, rtol=1e-5, atol=1e-5)


def test_lm_rewards_without_peft_use_a_frozen_copy(tmp_path, gpt2_tokenizer):
    config = _config(tmp_path, use_lm_rewards=True, max_steps=2)
    trainer = QHeadTrainer(
        make_tiny_gpt2(), config, Dataset.from_dict({"text": CORPUS}), processing_class=gpt2_tokenizer
    )
    before = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.ref_model.state_dict().items())
    assert not all(p.requires_grad for p in trainer.ref_model.parameters())


def test_bad_setups_fail_early_and_clearly(tmp_path, gpt2_tokenizer):
    dataset = Dataset.from_dict({"text": CORPUS})
    with pytest.raises(ValueError, match="`processing_class` has 50257 tokens .* 100"):
        QHeadTrainer(make_tiny_gpt2(vocab_size=100), _config(tmp_path), dataset, processing_class=gpt2_tokenizer)
    with pytest.raises(ValueError, match="`ref_model`"):
        QHeadTrainer(
            make_tiny_gpt2(), _config(tmp_path), dataset, processing_class=gpt2_tokenizer, ref_model=make_tiny_gpt2()
        )
    with pytest.raises(ValueError, match="`train_dataset`"):
        QHeadTrainer(make_tiny_gpt2(), _config(tmp_path), processing_class=gpt2_tokenizer)
    with pytest.raises(TypeError, match="`args`"):
        QHeadTrainer(make_tiny_gpt2(), args={"gamma": 0.9}, train_dataset=dataset, processing_class=gpt2_tokenizer)


def test_q_head_learning_rate_moves_only_the_head_fast(tmp_path, gpt2_tokenizer):
    config = _config(tmp_path, use_lm_rewards=True, max_steps=1, learning_rate=1e-6, q_head_learning_rate=0.1)
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2())
    backbone_before = [p.detach().clone() for p in model.pretrained_model.parameters()]
    trainer = QHeadTrainer(model, config, Dataset.from_dict({"text": CORPUS}), processing_class=gpt2_tokenizer)
    trainer.train()
    # Adam's first step moves each parameter with a gradient by about its group's learning rate.
    assert model.q_head.bias.detach().abs().max().item() == pytest.approx(0.1, rel=0.05)
    moved = max(
        (p - b).abs().max().item() for p, b in zip(model.pretrained_model.parameters(), backbone_before, strict=True)
    )
    assert 0 < moved < 1.1e-6


def test_q_head_bias_gets_its_own_learning_rate(tmp_path, gpt2_tokenizer):
    config = _config(
        tmp_path, use_lm_rewards=True, max_steps=1, learning_rate=1e-6, q_head_learning_rate=1e-3,
        q_head_bias_learning_rate=0.1,
    )  # fmt: skip
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2())
    backbone_before = [p.detach().clone() for p in model.pretrained_model.parameters()]
    trainer = QHeadTrainer(model, config, Dataset.from_dict({"text": CORPUS}), processing_class=gpt2_tokenizer)
    trainer.train()
    # Adam's first step moves each parameter with a gradient by about its group's rate; the head started at zero.
    assert model.q_head.bias.detach().abs().max().item() == pytest.approx(0.1, rel=0.05)
    assert model.q_head.weight.detach().abs().max().item() == pytest.approx(1e-3, rel=0.05)
    moved = max(
        (p - b).abs().max().item() for p, b in zip(model.pretrained_model.parameters(), backbone_before, strict=True)
    )
    assert 0 < moved < 1.1e-6
    rates = sorted(group["initial_lr"] for group in trainer.optimizer.param_groups)
    assert rates == [1e-6, 1e-6, 1e-3, 0.1]  # backbone (decay, no decay), Q weight, Q bias: one schedule for all


def test_a_zero_bias_learning_rate_freezes_the_bias(tmp_path, gpt2_tokenizer):
    config = _config(
        tmp_path, use_lm_rewards=True, max_steps=2, learning_rate=1e-6, q_head_learning_rate=1e-3,
        q_head_bias_learning_rate=0.0,
    )  # fmt: skip
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(), q_head_init="normal")
    bias_before = model.q_head.bias.detach().clone()
    weight_before = model.q_head.weight.detach().clone()
    trainer = QHeadTrainer(model, config, Dataset.from_dict({"text": CORPUS}), processing_class=gpt2_tokenizer)
    trainer.train()
    assert torch.equal(model.q_head.bias.detach(), bias_before)  # not a step of any size, and no Adam state
    assert not (model.q_head.weight.detach() == weight_before).all()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(model.q_head.bias) not in in_optimizer and id(model.q_head.weight) in in_optimizer
    assert sorted(group["initial_lr"] for group in trainer.optimizer.param_groups) == [1e-6, 1e-6, 1e-3]


def test_logged_losses_are_token_weighted_over_accumulated_micro_batches(tmp_path, gpt2_tokenizer):
    # Rows of very different lengths in micro-batches of one: a mean of per-micro-batch means would weigh a 3-token row
    # like a 30-token one, and `loss_lm + q_weight * loss_q` would then differ from the `loss` transformers logs (the
    # loss optimised: a mean over every target token of the accumulated batch).
    lengths = [3, 30, 5, 24, 2, 17, 9, 28]
    rows = [[(7 * i + 3 * k) % 500 + 10 for k in range(n)] for i, n in enumerate(lengths)]
    data = Dataset.from_dict({"input_ids": rows, "reward": [float(i % 3) - 1.0 for i in range(len(rows))]})
    config = _config(
        tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=4, q_weight=0.7,
        gamma=0.9, learning_rate=1e-3,
    )  # fmt: skip
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(), q_head_init="normal")
    trainer = QHeadTrainer(model, config, train_dataset=data, processing_class=gpt2_tokenizer)
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss_lm" in entry]
    assert len(history) == 4
    for entry in history:
        assert entry["loss_lm"] + 0.7 * entry["loss_q"] == pytest.approx(entry["loss"], rel=1e-4)
    assert len({round(entry["loss_q"], 4) for entry in history}) > 1  # a nonzero, moving Q loss


def test_trainer_targets_stop_at_done_and_bootstrap_otherwise(gpt2_tokenizer, monkeypatch):
    """gamma = 1, Monte Carlo, one sequence reward per row and a nonzero Q head: the target of every action of a `done`
    row is its reward exactly, and so is that of a row cut by `max_length` (its reward is paid on the last kept action,
    which is terminal: the README's truncation rule); a row without `done` adds V of the state after its last action."""
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(), q_head_init="normal")
    with torch.no_grad():
        # An offset, so that V(s) (a policy average of q) is far from 0 and a wrong bootstrap would show.
        model.q_head.bias.normal_(1.5, 0.5, generator=torch.Generator().manual_seed(0))
    rows = [[5, 9, 11, 40, 41], [3, 4, 5, 6, 7], [8, 9, 10, 12, 13, 14]]  # no EOS (50256) anywhere
    data = Dataset.from_dict(
        {
            "input_ids": rows,
            "completion_mask": [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]],
            "reward": [0.75, -1.25, 2.0],
            "done": [True, False, True],
        }
    )
    args = QHeadConfig(output_dir="/tmp/unused", gamma=1.0, report_to=[], use_cpu=True, max_length=5)
    trainer = QHeadTrainer(model, args, train_dataset=data, processing_class=gpt2_tokenizer)
    assert trainer.train_dataset["done"] == [True, False, True]  # the third row, cut by max_length=5, is terminal
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])

    targets = []
    compute_returns = trl_qhead.trainer.compute_returns

    def spy(*args, **kwargs):
        targets.append(compute_returns(*args, **kwargs))
        return targets[-1]

    monkeypatch.setattr(trl_qhead.trainer, "compute_returns", spy)
    model.eval()
    trainer.compute_loss(model, batch)
    (returns,) = targets

    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], return_q=True)
    values = (torch.softmax(out.logits.float(), -1) * out.q_values).sum(-1)  # V(s) = sum_a pi(a|s) q(s, a)
    for row, reward in enumerate([0.75, -1.25, 2.0]):
        g = returns[row][action_mask[row]]
        if row != 1:
            assert torch.equal(g, torch.full_like(g, reward))  # r on the last action, nothing bootstrapped
        else:
            v_cut = values[row, action_mask[row].nonzero().max() + 1]
            assert v_cut.abs() > 0.1  # a bootstrap that would show
            torch.testing.assert_close(g, torch.full_like(g, reward) + v_cut, rtol=1e-5, atol=1e-5)
