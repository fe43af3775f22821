"""Hostile data (issue 14): rows with nothing to train and non-finite losses, caught at preparation or at the step
where they happen; a pre-tokenised dataset's own `attention_mask` and `labels`, honoured; values of the wrong type or
range, an error naming the column, the row's dataset index and what was expected, when the data is prepared."""

import copy
import math

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


# ---- issue 27: messages without content, masks that are not 0/1, rewards float32 cannot hold, `prompt_length` -------

CHAT_TEMPLATE = (  # each turn "role:\ncontent" (a missing content renders as nothing)
    r"{% for m in messages %}{{ m['role'] + ':\n' + (m['content'] or '') }}"
    r"{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize(
    ("message", "error", "match"),
    [
        (
            {"role": "assistant"},
            ValueError,
            r"`messages` of example 1: message 1 \(role 'assistant'\) has no `content`",
        ),
        ({"role": "assistant", "content": None}, ValueError, r"message 1 \(role 'assistant'\) has `content` None"),
        ({"role": "assistant", "content": 5}, ValueError, r"message 1 \(role 'assistant'\) has `content` 5 \(int\)"),
        ({"role": 3, "content": "x"}, TypeError, r"`messages` of example 1: message 1 is .*string `role`"),
    ],
)
def test_a_message_without_content_is_refused_naming_the_row_and_message(chat_tokenizer, message, error, match):
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    data = [{"messages": good}, {"messages": [good[0], message]}]
    with pytest.raises(error, match=match):
        list(prepare_dataset(_no_arrow(data), chat_tokenizer))


def test_a_prompt_completion_message_without_content_is_refused(chat_tokenizer):
    data = [{"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "Hello"}]}]
    with pytest.raises(ValueError, match=r"`prompt` of example 0: message 0 \(role 'user'\) has no `content`"):
        list(prepare_dataset(_no_arrow(data), chat_tokenizer))


def test_a_tool_call_message_without_content_is_accepted(chat_tokenizer):
    call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}
    messages = [{"role": "user", "content": "Hi"}, call, {"role": "assistant", "content": "Done"}]
    rows = list(prepare_dataset(_no_arrow([{"messages": messages}]), chat_tokenizer))
    assert chat_tokenizer.decode(rows[0]["input_ids"]).endswith("assistant:\nDone<|endoftext|>")


def _no_arrow(rows):
    """A stream whose rows keep their own keys and types (Arrow would give every message every key, `None` where
    absent, and one type to a column); prepared lazily: read it (`list`) to prepare it."""
    from datasets import IterableDataset

    def generate():
        yield from rows

    return IterableDataset.from_generator(generate)


@pytest.mark.parametrize("value", [0.5, math.nan, 2, -1, "1"])
def test_a_completion_mask_that_is_not_zero_or_one_is_refused(gpt2_tokenizer, value):
    rows = [
        {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]},
        {"input_ids": [5, 6, 7], "completion_mask": [0, 1, value]},
    ]
    data = Dataset.from_list(rows) if not isinstance(value, str) else _no_arrow(rows)
    with pytest.raises(ValueError, match=f"`completion_mask` of example 1 holds {value!r} at token 2: it must be 1"):
        list(prepare_dataset(data, gpt2_tokenizer))


@pytest.mark.parametrize(
    ("columns", "scale", "match"),
    [
        ({"reward": 1e39}, 1.0, r"`reward` of example 1 is 1e\+39: it does not fit in float32"),
        ({"reward": -1e39}, 1.0, r"`reward` of example 1 is -1e\+39"),
        ({"reward": 1e38}, 10.0, r"`reward` of example 1 is 1e\+38, which times `reward_scale` \(10\)"),
        ({"rewards": [0.0, 1e39, 0.0]}, 1.0, r"`rewards` of example 1 at token 1 is 1e\+39: it does not fit"),
        ({"rewards": [0.0, 0.0, -4e37]}, 10.0, r"`rewards` of example 1 at token 2 is -4e\+37, which times"),
    ],
)
def test_rewards_float32_cannot_hold_are_refused_at_preparation(tmp_path, gpt2_tokenizer, columns, scale, match):
    rows = [{"input_ids": [5, 6, 7], **{k: 0.0 if k == "reward" else [0.0] * 3 for k in columns}},
            {"input_ids": [5, 6, 7], **columns}]  # fmt: skip
    config = QHeadConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, reward_scale=scale)
    with pytest.raises(ValueError, match=match):  # was: inf in float32, dropped as "no reward" or "not finite"
        QHeadTrainer(AutoModelForCausalLMWithQHead(make_tiny_gpt2()), config, train_dataset=Dataset.from_list(rows),
                     processing_class=gpt2_tokenizer)  # fmt: skip


def test_a_huge_sequence_reward_is_accepted_when_it_is_normalised_before_scaling(gpt2_tokenizer):
    data = Dataset.from_dict({"input_ids": [[5, 6, 7], [5, 6, 8]], "reward": [1e38, -1e38]})
    with pytest.raises(ValueError, match="times `reward_scale`"):
        prepare_dataset(data, gpt2_tokenizer, reward_scale=10.0)
    rows = prepare_dataset(data, gpt2_tokenizer, reward_scale=10.0, reward_normalization="batch")
    assert rows["reward"] == [1e38, -1e38]


def test_candidate_effects_float32_cannot_hold_are_refused(gpt2_tokenizer):
    row = {"input_ids": [5, 6, 7], "candidate_ids": [[], [8, 9], []], "candidate_sampled_reward": [0.0, 0.0, 0.0]}
    for effects, scale, match in [
        ([[], [0.0, 1e39], []], 1.0, r"`candidate_rewards` of example 0 at token 1 is 1e\+39"),
        ([[], [0.0, 1e38], []], 10.0, r"`candidate_rewards` of example 0 at token 1 is 1e\+38, which times"),
    ]:
        with pytest.raises(ValueError, match=match):
            prepare_dataset(Dataset.from_list([{**row, "candidate_rewards": effects}]), gpt2_tokenizer,
                            reward_scale=scale)  # fmt: skip
    sampled = {**row, "candidate_rewards": [[], [0.0, 0.0], []], "candidate_sampled_reward": [0.0, 1e39, 0.0]}
    with pytest.raises(ValueError, match=r"`candidate_sampled_reward` of example 0 at token 1 is 1e\+39"):
        prepare_dataset(Dataset.from_list([sampled]), gpt2_tokenizer)


class _Recorder:
    """A reward function that records what it is called on and pays the completion's token count."""

    def __init__(self):
        self.seen = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.seen += list(zip(prompts, completions, [list(ids) for ids in completion_ids], strict=True))
        return [float(len(ids)) for ids in completion_ids]


def test_a_pre_tokenised_prompt_length_is_honoured(tmp_path, gpt2_tokenizer):
    ids = gpt2_tokenizer("The cat sat on the mat")["input_ids"]  # 6 tokens
    data = Dataset.from_dict({"input_ids": [ids], "prompt_length": [2]})
    rows = prepare_dataset(data, gpt2_tokenizer, reward_columns=True)
    assert rows[0]["prompt_length"] == 2
    assert rows[0]["completion_mask"] == [0, 0, 1, 1, 1, 1]  # the prompt is no target (completion_only_loss)
    assert prepare_dataset(data, gpt2_tokenizer, completion_only_loss=False)[0].get("completion_mask") is None
    recorder = _Recorder()
    config = QHeadConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, per_device_train_batch_size=1,
                         save_strategy="no")  # fmt: skip
    trainer = QHeadTrainer(AutoModelForCausalLMWithQHead(make_tiny_gpt2()), config, train_dataset=data,
                           processing_class=gpt2_tokenizer, reward_funcs=recorder)  # fmt: skip
    trainer.train()
    prompt, completion, completion_ids = recorder.seen[0]
    assert (prompt, completion) == ("The cat", " sat on the mat") and completion_ids == ids[2:]


def test_prompt_length_counts_the_rows_own_left_padding(gpt2_tokenizer):
    data = Dataset.from_dict(
        {"input_ids": [[50256, 50256, 5, 6, 7, 8]], "attention_mask": [[0, 0, 1, 1, 1, 1]], "prompt_length": [3],
         "completion_mask": [[0, 0, 0, 1, 1, 1]]}
    )  # fmt: skip
    row = prepare_dataset(data, gpt2_tokenizer)[0]
    assert row["input_ids"] == [5, 6, 7, 8] and row["prompt_length"] == 1 and row["completion_mask"] == [0, 1, 1, 1]


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-1, ValueError, r"`prompt_length` of example 1 is -1: it must lie in \[0, 3\]"),
        (4, ValueError, r"`prompt_length` of example 1 is 4"),
        (1.5, TypeError, r"`prompt_length` of example 1 is 1.5 \(float\): it must be an integer"),
        ("1", TypeError, r"`prompt_length` of example 1 is '1' \(str\)"),
        (True, TypeError, r"`prompt_length` of example 1 is True"),
    ],
)
def test_a_bad_prompt_length_is_refused(gpt2_tokenizer, value, error, match):
    rows = [{"input_ids": [5, 6, 7], "prompt_length": 1}, {"input_ids": [5, 6, 7], "prompt_length": value}]
    data = _no_arrow(rows) if isinstance(value, (str, bool, float)) else Dataset.from_list(rows)
    with pytest.raises(error, match=match):
        list(prepare_dataset(data, gpt2_tokenizer))


# ---- attack round: boundaries of the new checks -------------------------------------------------------------------


def test_the_largest_float32_reward_is_accepted_and_the_next_is_not(gpt2_tokenizer):
    largest = float(torch.finfo(torch.float32).max)
    rows = prepare_dataset(Dataset.from_dict({"input_ids": [[5, 6, 7]], "reward": [largest]}), gpt2_tokenizer)
    assert torch.tensor(rows["reward"], dtype=torch.float32).isfinite().all()
    with pytest.raises(ValueError, match="does not fit in float32"):
        prepare_dataset(Dataset.from_dict({"input_ids": [[5, 6, 7]], "reward": [largest * 1.0001]}), gpt2_tokenizer)


def test_a_reward_clip_bounds_a_scaled_reward_beyond_float32(gpt2_tokenizer):
    # clip(10 * 1e38) = clip: the product never reaches the loss, so the row is fine
    data = Dataset.from_dict({"input_ids": [[5, 6, 7]], "reward": [1e38], "rewards": [[0.0, -1e38, 0.0]]})
    rows = prepare_dataset(data, gpt2_tokenizer, reward_scale=10.0, reward_clip=5.0)
    assert rows[0]["reward"] == 1e38 and rows[0]["rewards"][1] == -1e38
    with pytest.raises(ValueError, match="times `reward_scale`"):
        prepare_dataset(data, gpt2_tokenizer, reward_scale=10.0)


def test_a_completion_mask_of_bools_is_read_as_zero_one(gpt2_tokenizer):
    data = Dataset.from_dict({"input_ids": [[5, 6, 7]], "completion_mask": [[False, True, True]]})
    assert prepare_dataset(data, gpt2_tokenizer)[0]["completion_mask"] == [False, True, True]


def test_an_empty_prompt_length_falls_back_to_the_completion_mask(gpt2_tokenizer):
    data = Dataset.from_list(
        [{"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1], "prompt_length": None},
         {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1], "prompt_length": 1}]
    )  # fmt: skip
    rows = prepare_dataset(data, gpt2_tokenizer)
    assert [row["prompt_length"] for row in rows] == [2, 1]  # a given one is honoured beside a mask that disagrees
    assert [row["completion_mask"] for row in rows] == [[0, 0, 1, 1]] * 2


def test_a_prompt_length_as_long_as_the_row_leaves_nothing_to_train(gpt2_tokenizer):
    data = Dataset.from_dict({"input_ids": [[5, 6, 7], [5, 6, 7]], "prompt_length": [3, 1]})
    rows = prepare_dataset(data, gpt2_tokenizer)  # the all-prompt row has no action: dropped (and counted)
    assert len(rows) == 1 and rows[0]["prompt_length"] == 1


def test_an_empty_content_string_is_a_valid_message(chat_tokenizer):
    data = Dataset.from_dict({"messages": [[{"role": "user", "content": ""}, {"role": "assistant", "content": "Hi"}]]})
    rows = prepare_dataset(data, chat_tokenizer)
    assert chat_tokenizer.decode(rows[0]["input_ids"]) == "user:\n\nassistant:\nHi<|endoftext|>"
