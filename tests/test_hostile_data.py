"""Hostile data (issue 14): rows with nothing to train and non-finite losses, caught at preparation or at the step
where they happen; a pre-tokenised dataset's own `attention_mask` and `labels`, honoured; values of the wrong type or
range, an error naming the column, the row's dataset index and what was expected, when the data is prepared."""

import pytest
import torch
from datasets import Dataset

from tests.conftest import make_tiny_gpt2
from trl_qhead import AutoModelForCausalLMWithQHead, DataCollatorForQHead, QHeadConfig, QHeadTrainer, prepare_dataset
from trl_qhead.data import has_action
from trl_qhead.mdp import action_mask_from_labels


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


# ---- a pre-tokenised dataset's own padding and labels -------------------------------------------------------------


def test_own_padding_is_taken_out_of_every_token_column():
    unpadded = {
        "input_ids": [[5, 6, 7], [8, 9]],
        "rewards": [[0.0, 1.0, 2.0], [0.0, 3.0]],
        "completion_mask": [[0, 1, 1], [1, 1]],
        "reward": [1.0, 2.0],
    }
    padded = {  # row 0 right-padded with 0s, row 1 left-padded with 50256s (their reward 0, their mask anything)
        "input_ids": [[5, 6, 7, 0, 0], [50256, 50256, 8, 9]],
        "attention_mask": [[1, 1, 1, 0, 0], [0, 0, 1, 1]],
        "rewards": [[0.0, 1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]],
        "completion_mask": [[0, 1, 1, 1, 1], [1, 1, 1, 1]],
        "reward": [1.0, 2.0],
    }
    for kwargs in ({}, {"max_length": 2}, {"packing": True, "max_length": 4}):
        expected = prepare_dataset(Dataset.from_dict(unpadded), None, **kwargs).to_list()
        assert prepare_dataset(Dataset.from_dict(padded), None, **kwargs).to_list() == expected, kwargs
    # Before, padding was trained: 4 actions in row 0 instead of 2, two of them producing padding.
    batch = DataCollatorForQHead(pad_token_id=0)(list(prepare_dataset(Dataset.from_dict(padded), None)))
    assert action_mask_from_labels(batch["labels"], batch["attention_mask"]).sum(1).tolist() == [2, 1]


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_labels_of_minus_100_are_not_targets(completion_only_loss):
    data = Dataset.from_dict(
        {"input_ids": [[5, 6, 7, 8, 0]], "attention_mask": [[1, 1, 1, 1, 0]], "labels": [[-100, -100, 7, 8, -100]]}
    )
    rows = prepare_dataset(data, None, completion_only_loss=completion_only_loss)
    assert rows[0]["input_ids"] == [5, 6, 7, 8] and rows[0]["completion_mask"] == [0, 0, 1, 1]
    assert rows[0]["prompt_length"] == 2  # reward functions see [7, 8] as the completion
    batch = DataCollatorForQHead(pad_token_id=0)(list(rows))
    assert action_mask_from_labels(batch["labels"], batch["attention_mask"]).tolist() == [[False, True, True, False]]
    both = data.add_column("completion_mask", [[0, 0, 0, 1, 1]])  # a target only where both say so
    assert prepare_dataset(both, None)[0]["completion_mask"] == [0, 0, 0, 1]


@pytest.mark.parametrize(
    ("columns", "error", "match"),
    [
        ({"attention_mask": [[1, 0, 1]]}, ValueError, r"`attention_mask` of example 1 has padding \(0\) at token 1"),
        ({"attention_mask": [[1, 1]]}, ValueError, r"`attention_mask` of example 1 must have one entry per token"),
        ({"attention_mask": [[1, 2, 1]]}, ValueError, r"`attention_mask` of example 1 holds 2 at token 1"),
        ({"labels": [[6, 7, -100]]}, ValueError, r"`labels` of example 1 holds 6 at token 0.*unshifted"),
        ({"labels": [[5, 6]]}, ValueError, r"`labels` of example 1 must have one entry per token"),
        (
            {"attention_mask": [[1, 1, 0]], "rewards": [[0.0, 0.0, 3.0]]},
            ValueError,
            r"`rewards` of example 1 holds 3.0 at token 2, which `attention_mask` marks as padding",
        ),
    ],
)
def test_bad_attention_mask_and_labels_raise_at_preparation(columns, error, match):
    good = {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [1, 2, 3], "rewards": [0.0, 0.0, 0.0]}
    rows = [{name: good[name] for name in ("input_ids", *columns)}, {"input_ids": [5, 6, 7]}]
    rows[1].update({name: values[0] for name, values in columns.items()})
    with pytest.raises(error, match=match):
        prepare_dataset(Dataset.from_list(rows), None)


# ---- values of the wrong type or range ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "value", "error", "match"),
    [
        ("rewards", ["a", "b", "c"], TypeError, r"`rewards` of example 1 holds 'a' \(str\) at token 0"),
        ("rewards", [0.0, None, 1.0], TypeError, r"`rewards` of example 1 holds None \(NoneType\) at token 1"),
        ("rewards", [[0.0], [1.0], [2.0]], TypeError, r"`rewards` of example 1 holds \[0.0\] \(list\) at token 0"),
        ("rewards", 1.5, TypeError, r"`rewards` of example 1 is 1.5 \(float\): it must be a list of numbers"),
        ("reward", "high", TypeError, r"`reward` of example 1 is 'high' \(str\): it must be a number"),
        ("reward", "1.5", TypeError, r"`reward` of example 1 is '1.5' \(str\)"),
        ("reward", [1.0, 2.0], TypeError, r"`reward` of example 1 is \[1.0, 2.0\] \(list\)"),
        ("input_ids", [5, -1, 7], ValueError, r"`input_ids` of example 1 holds -1 at token 1: .*\[0, 50257\)"),
        ("input_ids", [5, 50257, 7], ValueError, r"`input_ids` of example 1 holds 50257 at token 1: .*\[0, 50257\)"),
        ("input_ids", [5.0, 6.0, 7.0], TypeError, r"`input_ids` of example 1 holds 5.0 \(float\) at token 0"),
        ("input_ids", ["a", "b", "c"], TypeError, r"`input_ids` of example 1 holds 'a' \(str\) at token 0"),
    ],
)
def test_values_of_the_wrong_type_or_range_raise_naming_column_and_row(gpt2_tokenizer, column, value, error, match):
    # Row 0 is good (an empty entry, or good ids); row 1 has the bad value. Arrow stores a column in one type, so ids
    # of another type than int make a dataset of the bad row alone (row 0).
    if column != "input_ids":
        rows = [{"input_ids": [1, 2, 3], column: None}, {"input_ids": [5, 6, 7], column: value}]
    elif all(isinstance(token, int) for token in value):
        rows = [{"input_ids": [1, 2, 3]}, {"input_ids": value}]
    else:
        rows, match = [{"input_ids": value}], match.replace("example 1", "example 0")
    with pytest.raises(error, match=match):
        prepare_dataset(Dataset.from_list(rows), gpt2_tokenizer)


def test_token_ids_beyond_the_models_vocabulary_raise_in_the_trainer(tmp_path, gpt2_tokenizer):
    data = Dataset.from_dict({"input_ids": [[5, 6, 7], [5, 60000, 7]]})  # GPT-2 has 50257 tokens
    config = QHeadConfig(output_dir=str(tmp_path), report_to="none", max_steps=1)
    with pytest.raises(ValueError, match=r"`input_ids` of example 1 holds 60000 at token 1"):  # was: IndexError
        QHeadTrainer(AutoModelForCausalLMWithQHead(make_tiny_gpt2()), config, train_dataset=data,
                     processing_class=gpt2_tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match=r"holds 600 at token 1: token ids must be in \[0, 512\)"):
        prepare_dataset(Dataset.from_dict({"input_ids": [[5, 6, 7], [5, 600, 7]]}), None, vocab_size=512)


@pytest.mark.parametrize("packing", [False, True])
def test_an_empty_dataset_raises_at_preparation(tmp_path, gpt2_tokenizer, packing):
    config = QHeadConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, packing=packing, max_length=8)
    for data in (Dataset.from_dict({"text": []}), Dataset.from_dict({"input_ids": []})):
        with pytest.raises(ValueError, match="The dataset has no rows"):  # was (packing): torch's num_samples=0
            QHeadTrainer(AutoModelForCausalLMWithQHead(make_tiny_gpt2()), config, train_dataset=data,
                         processing_class=gpt2_tokenizer)  # fmt: skip


@pytest.mark.parametrize("strategy", ["wrapped", "bfd"])
def test_all_blank_text_raises_with_packing_too(gpt2_tokenizer, strategy):
    # Each blank line is a lone EOS: no action. Packed, they used to make rows of EOS after EOS, trained as actions.
    data = Dataset.from_dict({"text": ["", "", ""]})
    with pytest.raises(ValueError, match="None of the 3 rows has a token to train on"):
        prepare_dataset(data, gpt2_tokenizer, packing=True, max_length=8, packing_strategy=strategy)
