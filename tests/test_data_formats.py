"""Dataset formats, detected as TRL's trainers detect them: plain text, prompt/completion (standard and
conversational), conversational `messages`, pre-tokenised with per-token and sequence rewards; map-style and streaming
give the same rows; the collator carries what reward functions need."""

import copy
import math

import pytest
import torch
from datasets import Dataset

from trl_qhead.data import DataCollatorForQHead, detect_format, prepare_dataset
from trl_qhead.mdp import action_mask_from_labels, episode_dones, next_tokens

# A minimal chat template: each turn is "role:\ncontent", an assistant turn closes with EOS.
CHAT_TEMPLATE = (
    r"{% for m in messages %}{{ m['role'] + ':\n' + m['content'] }}"
    r"{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)
PROMPT = [{"role": "user", "content": "Say hi"}]
COMPLETION = [{"role": "assistant", "content": "<think>greet</think>hi"}]


@pytest.fixture(scope="module")
def chat_tokenizer(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def example_datasets() -> dict[str, Dataset]:
    return {
        "text": Dataset.from_dict({"text": ["The cat sat.", "A dog barked loudly."], "reward": [1.0, -1.0]}),
        "prompt_completion": Dataset.from_dict(
            {"prompt": ["2+2=", "Hello"], "completion": ["4", " world"], "solution": ["4", "x"]}
        ),
        "conversational": Dataset.from_dict(
            {"prompt": [PROMPT, PROMPT], "completion": [COMPLETION, [{"role": "assistant", "content": "hi"}]]}
        ),
        "messages": Dataset.from_dict({"messages": [PROMPT + COMPLETION, [{"role": "user", "content": "Hi"}]]}),
        "tokenized": Dataset.from_dict(
            {
                "input_ids": [[5, 6, 7, 8], [9, 10, 11]],
                "rewards": [[0.0, 0.5, 0.0, 1.0], [0.0, 0.0, 2.0]],
                "reward": [3.0, None],
                "completion_mask": [[0, 0, 1, 1], [0, 1, 1]],
            }
        ),
    }


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["input_ids", "prompt", "completion"], "tokenized"),
        (["prompt", "completion", "text"], "prompt_completion"),
        (["messages", "text"], "messages"),
        (["text", "reward"], "text"),
    ],
)
def test_detect_format_follows_trl_precedence(columns, expected):
    assert detect_format(columns, "text") == expected


@pytest.mark.parametrize(
    ("columns", "extra"),
    [(["question", "answer"], None), (["prompt", "solution"], "generate_and_score")],
)
def test_missing_columns_error_lists_found_and_expected(gpt2_tokenizer, columns, extra):
    dataset = Dataset.from_dict({name: ["x"] for name in columns})
    with pytest.raises(ValueError) as error:
        prepare_dataset(dataset, gpt2_tokenizer)
    message = str(error.value)
    for name in columns:
        assert f"'{name}'" in message  # found
    for name in ("`input_ids`", "`prompt` and `completion`", "`messages`", "`text`"):
        assert name in message  # expected
    if extra:
        assert extra in message


def test_prompt_completion_masks_prompt_and_ends_with_terminal_eos(gpt2_tokenizer):
    rows = prepare_dataset(example_datasets()["prompt_completion"], gpt2_tokenizer)
    eos = gpt2_tokenizer.eos_token_id
    for row, (prompt, completion) in zip(rows, [("2+2=", "4"), ("Hello", " world")], strict=True):
        prompt_ids = gpt2_tokenizer(prompt)["input_ids"]
        assert row["input_ids"] == gpt2_tokenizer(prompt + completion)["input_ids"] + [eos]
        assert row["prompt_length"] == len(prompt_ids)
        assert row["completion_mask"] == [0] * len(prompt_ids) + [1] * (len(row["input_ids"]) - len(prompt_ids))
    batch = DataCollatorForQHead(eos)(list(rows))
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    # Actions are the completion tokens only: the first is produced from the prompt's last state.
    assert action_mask[0].nonzero().squeeze(-1).tolist() == [3, 4]
    dones = episode_dones(next_tokens(batch["input_ids"]), action_mask, eos)
    last = [mask.nonzero().max().item() for mask in action_mask]
    assert [dones[b, t].item() for b, t in enumerate(last)] == [1.0, 1.0]  # the completion's last action is terminal
    assert dones.sum().item() == 2


def test_completion_only_loss_false_trains_on_the_prompt(gpt2_tokenizer):
    for fmt in ("prompt_completion", "tokenized"):
        rows = prepare_dataset(example_datasets()[fmt], gpt2_tokenizer, completion_only_loss=False)
        assert "completion_mask" not in rows.column_names
        batch = DataCollatorForQHead(gpt2_tokenizer.eos_token_id)(list(rows))
        mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
        assert mask.sum(1).tolist() == [len(r["input_ids"]) - 1 for r in rows]
        assert batch["prompt_length"].tolist() == [r["prompt_length"] for r in rows]  # still known for rewards


def test_conversational_formats_use_the_chat_template(chat_tokenizer):
    rendered = "user:\nSay hi\nassistant:\n<think>greet</think>hi" + chat_tokenizer.eos_token
    prompt_text = "user:\nSay hi\nassistant:\n"
    for fmt in ("conversational", "messages"):
        row = prepare_dataset(example_datasets()[fmt], chat_tokenizer, reward_columns=True)[0]
        assert chat_tokenizer.decode(row["input_ids"]) == rendered
        assert chat_tokenizer.decode(row["input_ids"][: row["prompt_length"]]) == prompt_text
        assert row["input_ids"][-1] == chat_tokenizer.eos_token_id  # the template closes the turn with EOS
        assert row["prompt"] == PROMPT
    conversational = prepare_dataset(example_datasets()["conversational"], chat_tokenizer)[0]
    assert sum(conversational["completion_mask"]) == len(conversational["input_ids"]) - conversational["prompt_length"]
    # `messages` trains on the whole conversation, as TRL's SFT does.
    assert "completion_mask" not in prepare_dataset(example_datasets()["messages"], chat_tokenizer).column_names


def test_conversational_without_chat_template_fails_clearly(gpt2_tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        prepare_dataset(example_datasets()["messages"], gpt2_tokenizer)


def test_mixed_prompt_completion_types_are_rejected(gpt2_tokenizer):
    dataset = Dataset.from_dict({"prompt": ["hi"], "completion": [None]})
    with pytest.raises(TypeError, match="`prompt` and `completion` of example 0"):
        prepare_dataset(dataset, gpt2_tokenizer)


def test_tokenized_rewards_and_sequence_reward_are_kept_apart(gpt2_tokenizer):
    rows = prepare_dataset(example_datasets()["tokenized"], gpt2_tokenizer, max_length=3)
    assert rows[0] == {
        "input_ids": [5, 6, 7],
        "prompt_length": 2,
        "completion_mask": [0, 0, 1],
        "reward": 3.0,
        "rewards": [0.0, 0.5, 0.0],
        "done": True,  # cut by max_length with a scalar reward: paid on the last kept action, which is terminal
    }
    assert rows[1]["reward"] is None
    batch = DataCollatorForQHead(0)(list(rows))
    assert batch["reward"][0].item() == 3.0 and math.isnan(batch["reward"][1].item())
    # Packing keeps the sequence reward by folding it onto the document's last token.
    packed = prepare_dataset(example_datasets()["tokenized"], gpt2_tokenizer, max_length=7, packing=True)
    assert packed[0]["rewards"] == [0.0, 0.5, 0.0, 4.0, 0.0, 0.0, 2.0]


def test_text_reward_column_becomes_a_sequence_reward(gpt2_tokenizer):
    rows = prepare_dataset(example_datasets()["text"], gpt2_tokenizer)
    assert rows["reward"] == [1.0, -1.0] and "prompt_length" not in rows.column_names  # no prompt: 0


def test_reward_columns_keep_the_prompt_and_extra_columns(gpt2_tokenizer):
    rows = prepare_dataset(example_datasets()["prompt_completion"], gpt2_tokenizer, reward_columns=True)
    assert rows["prompt"] == ["2+2=", "Hello"] and rows["solution"] == ["4", "x"]
    assert "completion" not in rows.column_names
    batch = DataCollatorForQHead(gpt2_tokenizer.eos_token_id)(list(rows))
    assert batch["reward_inputs"] == {"prompt": ["2+2=", "Hello"], "solution": ["4", "x"]}
    assert "solution" not in prepare_dataset(example_datasets()["prompt_completion"], gpt2_tokenizer).column_names
    with pytest.raises(ValueError, match="packing"):
        prepare_dataset(example_datasets()["prompt_completion"], gpt2_tokenizer, reward_columns=True, packing=True)


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "conversational", "messages", "tokenized"])
def test_streaming_gives_the_same_rows(chat_tokenizer, fmt):
    dataset = example_datasets()[fmt]
    expected = list(prepare_dataset(dataset, chat_tokenizer, reward_columns=True, max_length=12))
    streamed = list(prepare_dataset(dataset.to_iterable_dataset(), chat_tokenizer, reward_columns=True, max_length=12))
    assert streamed == expected
    collator = DataCollatorForQHead(chat_tokenizer.eos_token_id, padding_side="left")
    assert torch.equal(collator(streamed)["input_ids"], collator(expected)["input_ids"])
