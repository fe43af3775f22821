"""Datasets to rows and rows to batches: formats, truncation, packing, reward alignment, bad input."""

import pytest
import torch
from datasets import Dataset, IterableDataset

from tests.oracles import action_rewards
from tests.test_data_formats import (
    chat_tokenizer,  # noqa: F401 (fixtures)
    example_datasets,
)
from trl_qhead import (
    DataCollatorForQHead,
    prepare_dataset,
)
from trl_qhead.data import DataCollatorForQHead, prepare_dataset
from trl_qhead.mdp import action_mask_from_labels, episode_dones, next_tokens

EOS = 0  # the EOS id of the `done` tests' hand-made rows


def test_text_is_tokenised_with_eos_and_blank_lines_dropped(gpt2_tokenizer):
    dataset = Dataset.from_dict({"text": ["Hello world", "", "A much longer line of text here"]})
    rows = prepare_dataset(dataset, gpt2_tokenizer, max_length=4)
    assert rows.column_names == ["input_ids"]
    assert rows[0]["input_ids"] == gpt2_tokenizer("Hello world")["input_ids"] + [gpt2_tokenizer.eos_token_id]
    assert len(rows) == 2 and len(rows[1]["input_ids"]) == 4  # truncated: no EOS, so it bootstraps at the cut
    assert rows[1]["input_ids"][-1] != gpt2_tokenizer.eos_token_id


def test_missing_columns_list_what_was_found_and_expected(gpt2_tokenizer):
    dataset = Dataset.from_dict({"content": ["x"], "score": [1.0]})
    with pytest.raises(ValueError, match=r"\['content', 'score'\].*input_ids.*`text`"):
        prepare_dataset(dataset, gpt2_tokenizer)
    with pytest.raises(ValueError, match="`body`"):
        prepare_dataset(dataset, gpt2_tokenizer, text_field="body")


def test_sequence_reward_lands_on_the_last_kept_token():
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5], [6, 7]], "reward": [2.5, -1.0]})
    rows = prepare_dataset(dataset, None, max_length=3)
    assert rows["reward"] == [2.5, -1.0]  # kept apart from `rewards`, so that it can be normalised
    batch = DataCollatorForQHead(pad_token_id=0)(list(rows))
    assert action_rewards(batch).tolist() == [[0.0, 2.5, 0.0], [-1.0, 0.0, 0.0]]  # the last action as trained


def test_per_token_rewards_add_to_the_sequence_reward():
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3]], "rewards": [[9.0, 0.5, 0.25]], "reward": [1.0]})
    batch = DataCollatorForQHead(pad_token_id=0)(list(prepare_dataset(dataset, None)))
    assert action_rewards(batch).tolist() == [[0.5, 1.25, 0.0]]


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        ({"input_ids": [[1, 2, 3]], "rewards": [[0.0, 1.0]]}, "`rewards` of example 0 has 2 values for 3 tokens"),
        ({"input_ids": [[1, 2, 3]], "rewards": [[0.0, float("nan"), 1.0]]}, "`rewards` of example 0 holds NaN"),
        ({"input_ids": [[1, 2, 3]], "reward": [float("inf")]}, "`reward` of example 0"),
        ({"input_ids": [[1, 2, 3]], "completion_mask": [[1, 1]]}, "`completion_mask` of example 0"),
    ],
)
def test_bad_rewards_raise_early_naming_the_field(columns, match):
    with pytest.raises(ValueError, match=match):
        prepare_dataset(Dataset.from_dict(columns), None)


def test_packed_documents_end_with_terminal_eos(gpt2_tokenizer):
    eos = gpt2_tokenizer.eos_token_id
    docs = ["one two three", "four five", "six seven eight nine ten", "eleven"]
    rows = prepare_dataset(Dataset.from_dict({"text": docs}), gpt2_tokenizer, max_length=8, packing=True)
    flat = [t for row in rows["input_ids"] for t in row]
    expected = [t for d in docs for t in gpt2_tokenizer(d)["input_ids"] + [eos]]
    assert flat == expected and all(len(r) == 8 for r in rows["input_ids"][:-1])  # nothing lost, rows full

    batch = DataCollatorForQHead(pad_token_id=eos)([rows[0]])
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    dones = episode_dones(next_tokens(batch["input_ids"]), action_mask, eos)
    eos_positions = (batch["input_ids"][0] == eos).nonzero().flatten()
    assert dones[0].nonzero().flatten().tolist() == [p - 1 for p in eos_positions.tolist() if p > 0]


def test_packing_keeps_token_rewards_aligned():
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6, 7]], "rewards": [[0, 0, 1.0], [0, 2.0, 0, 0]]})
    rows = prepare_dataset(dataset, None, max_length=5, packing=True)
    assert rows["input_ids"] == [[1, 2, 3, 4, 5], [6, 7]]
    assert rows["rewards"] == [[0, 0, 1.0, 0, 2.0], [0, 0]]


def test_streaming_datasets_are_prepared_lazily(gpt2_tokenizer):
    def gen():
        yield from ({"text": f"line number {i}"} for i in range(5))

    stream = IterableDataset.from_generator(gen)
    rows = list(prepare_dataset(stream, gpt2_tokenizer, max_length=16, packing=True))
    assert sum(len(r["input_ids"]) for r in rows) == sum(
        len(gpt2_tokenizer(f"line number {i}")["input_ids"]) + 1 for i in range(5)
    )


def test_collator_pads_either_side_and_masks_targets():
    rows = [{"input_ids": [5, 6, 7], "rewards": [0, 1.0, 2.0]}, {"input_ids": [8, 9], "completion_mask": [0, 1]}]
    right = DataCollatorForQHead(pad_token_id=0)(rows)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert right["rewards"].tolist() == [[0, 1.0, 2.0], [0, 0, 0]]
    left = DataCollatorForQHead(pad_token_id=0, padding_side="left")(rows)
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 9]]
    assert torch.equal(
        action_mask_from_labels(left["labels"], left["attention_mask"]).sum(1),
        action_mask_from_labels(right["labels"], right["attention_mask"]).sum(1),
    )


@pytest.mark.parametrize("ids", [[], [5]])
def test_empty_and_one_token_rows_are_rejected(ids):
    with pytest.raises(ValueError, match="`input_ids` of batch row 1"):
        DataCollatorForQHead(pad_token_id=0)([{"input_ids": [1, 2]}, {"input_ids": ids}])


def _done_at_last_action(rows, pad_token_id=EOS):
    """Per row: whether the collated batch makes its last action terminal, for rows with no EOS in them."""
    batch = DataCollatorForQHead(pad_token_id=pad_token_id)(list(rows))
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    dones = episode_dones(next_tokens(batch["input_ids"]), action_mask, None, done=batch.get("done"))
    return [bool(d[m].any()) for d, m in zip(dones, action_mask, strict=True)]


def test_done_column_in_every_format_and_dropped_by_truncation(gpt2_tokenizer, chat_tokenizer):  # noqa: F811
    tokenized = Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [9, 10, 11], [12, 13]], "done": [True, True, None]})
    rows = prepare_dataset(tokenized, None, max_length=3)
    assert rows["done"] == [False, True, False]  # row 0 was cut by max_length: it bootstraps; None is False
    assert _done_at_last_action(rows) == [False, True, False]
    assert prepare_dataset(tokenized, None, max_length=4)["done"] == [True, True, False]

    for fmt, data in example_datasets().items():
        tokenizer = chat_tokenizer if fmt in ("conversational", "messages") else gpt2_tokenizer
        data = data.add_column("done", [True, False])
        rows = prepare_dataset(data, tokenizer, max_length=64)
        assert rows["done"] == [True, False], fmt
        for i, full in enumerate(rows["input_ids"]):  # cut one token short: a completion token (an action) is left
            cut = prepare_dataset(data.select([i]), tokenizer, max_length=len(full) - 1)
            # it bootstraps at the cut, unless a scalar reward judged the whole row (the truncation rule)
            scored = "reward" in data.column_names and data[i]["reward"] is not None
            assert cut["done"] == [scored], (fmt, i)
        streamed = prepare_dataset(IterableDataset.from_generator(data.__iter__), tokenizer, max_length=64)
        assert [row["done"] for row in streamed] == [True, False], fmt


def test_done_survives_packing_at_the_document_end():
    docs = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    data = Dataset.from_dict({"input_ids": docs, "done": [True, False, True]})
    rows = prepare_dataset(data, None, max_length=5, packing=True)  # wrapped: [1 2 3 4 5], [6 7 8 9]
    assert rows["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    batch = DataCollatorForQHead(pad_token_id=EOS)(list(rows))
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    dones = episode_dones(next_tokens(batch["input_ids"]), action_mask, None, token_dones=batch["dones"])
    # Terminal: the actions producing 3 and 9 (the ends of the `done` documents); 7 ends a document that is not.
    assert dones.tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]

    # bfd truncates the 4-token document to 3 (its end is gone) and keeps the others whole.
    bfd = prepare_dataset(data, None, max_length=3, packing=True, packing_strategy="bfd")
    ends = {tuple(ids): flags for ids, flags in zip(bfd["input_ids"], bfd["dones"], strict=True)}
    assert ends == {(1, 2, 3): [0, 0, 1], (4, 5, 6): [0, 0, 0], (8, 9): [0, 1]}


@pytest.mark.parametrize("value", ["yes", 2, 0.5])
def test_bad_done_values_raise_naming_the_field_and_row(value):
    data = Dataset.from_dict({"input_ids": [[1, 2, 3]], "done": [value]})  # Arrow columns hold one type
    with pytest.raises(ValueError, match=r"`done` of example 0 is .*bool"):
        prepare_dataset(data, None)
    with pytest.raises(ValueError, match=r"`done` of batch row 1 is .*bool"):
        DataCollatorForQHead(pad_token_id=0)(
            [{"input_ids": [1, 2], "done": True}, {"input_ids": [4, 5], "done": value}]
        )
