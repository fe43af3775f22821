"""Rows with nothing to train and non-finite losses (issue 14, item 4): caught at preparation or at the step where
they happen, never trained through silently."""

import pytest
import torch
from datasets import Dataset

from tests.conftest import make_tiny_gpt2
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer, prepare_dataset
from trl_qhead.data import has_action


def test_rows_without_an_action_are_dropped_at_preparation_and_counted(gpt2_tokenizer, caplog):
    long_prompt = "word " * 40  # 40 tokens: fills max_length=16, so the completion is cut away
    data = Dataset.from_dict({"prompt": [long_prompt, "Hi", long_prompt], "completion": [" there"] * 3})
    with caplog.at_level("WARNING"):
        rows = prepare_dataset(data, gpt2_tokenizer, max_length=16)
    assert len(rows) == 1 and rows[0]["input_ids"][:1] == gpt2_tokenizer("Hi")["input_ids"]
    assert "Dropped 2 of 3 rows" in caplog.text
    tokenized = Dataset.from_dict({"input_ids": [[5], [], [5, 6, 7]], "completion_mask": [[1], [], [1, 0, 0]]})
    # one token, no token, and three tokens none of whose successors is a target: nothing to train in any
    with pytest.raises(ValueError, match="None of the 3 rows has a token to train on"):
        prepare_dataset(tokenized, gpt2_tokenizer, max_length=16)


def test_has_action():
    assert has_action({"input_ids": [1, 2]}) and not has_action({"input_ids": [1]})
    assert has_action({"input_ids": [1, 2, 3], "completion_mask": [0, 0, 1]})
    assert not has_action({"input_ids": [1, 2, 3], "completion_mask": [1, 0, 0]})  # only the first token: no action


def test_every_prompt_longer_than_max_length_is_refused_by_the_trainer(tmp_path, gpt2_tokenizer):
    data = Dataset.from_dict({"prompt": ["word " * 40] * 4, "completion": [" there"] * 4})
    config = QHeadConfig(output_dir=str(tmp_path), max_length=16, report_to="none", max_steps=1)
    with pytest.raises(ValueError, match="max_length"):
        QHeadTrainer(AutoModelForCausalLMWithQHead(make_tiny_gpt2()), config, train_dataset=data,
                     processing_class=gpt2_tokenizer)  # fmt: skip


def test_a_non_finite_loss_stops_training_naming_the_step(tmp_path, gpt2_tokenizer):
    # A reward of 1e30 squares to inf in the Q loss: training must stop there, before the weights turn NaN.
    data = Dataset.from_dict({"prompt": ["Hello", "Hi"], "completion": [" world", " there"], "reward": [1e30, 0.5]})
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2())
    config = QHeadConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to="none", save_strategy="no"
    )
    trainer = QHeadTrainer(model, config, train_dataset=data, processing_class=gpt2_tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="at step 1"):
        trainer.train()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(p, before[name]), name
