"""Datasets to training rows, and rows to padded batches.

A training row is `input_ids` (at least two tokens, so at least one action), an optional `rewards` list aligned with
the tokens (`rewards[k]` is earned when token `k` is produced; `rewards[0]` is ignored) and an optional
`completion_mask` (1 where a token is a training target). A scalar `reward` column (a sequence reward) is folded into
`rewards` at the row's last token, which makes it the reward of the last action and lets packed rows keep it.

Formats recognised, the way TRL's trainers recognise them:
- pre-tokenised: `input_ids`, optionally `rewards` and/or `reward`;
- plain text: the `dataset_text_field` column (default `"text"`), optionally `reward`. Each document gets EOS appended,
  so a document that fits ends with a terminal action, and one that is cut bootstraps where it was cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from trl.data_utils import get_dataset_column_names, pack_dataset
from trl.trainer.utils import pad


def detect_format(column_names: list[str], text_field: str) -> str:
    """`"tokenized"` or `"text"`; a `ValueError` listing the columns found and expected otherwise."""
    if "input_ids" in column_names:
        return "tokenized"
    if text_field in column_names:
        return "text"
    raise ValueError(
        f"The dataset has columns {sorted(column_names)}; expected `input_ids` (pre-tokenised, optionally with "
        f"`rewards` and `reward`) or the text column `{text_field}` (set `dataset_text_field` to change it)."
    )


def _check_rewards(rewards: list[float], n_tokens: int, where: str) -> None:
    if len(rewards) != n_tokens:
        raise ValueError(
            f"`rewards` of {where} has {len(rewards)} values for {n_tokens} tokens: it must be aligned with "
            "`input_ids` (rewards[k] is earned when token k is produced)."
        )
    if not all(math.isfinite(r) for r in rewards):
        raise ValueError(f"`rewards` of {where} holds NaN or inf.")


def _to_row(example: dict[str, Any], idx: int, *, fmt: str, tokenizer, text_field: str, max_length: int) -> dict:
    """Tokenise (text), check, truncate to `max_length` and fold a scalar `reward` into `rewards`."""
    where = f"example {idx}"
    if fmt == "text":
        text = example[text_field]
        if not isinstance(text, str):
            raise TypeError(f"`{text_field}` of {where} must be a string, got {type(text).__name__}.")
        input_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    else:
        input_ids = list(example["input_ids"])
    rewards = example.get("rewards")
    if rewards is not None:
        _check_rewards(list(rewards), len(input_ids), where)
        rewards = [float(r) for r in rewards]
    if example.get("completion_mask") is not None and len(example["completion_mask"]) != len(input_ids):
        raise ValueError(f"`completion_mask` of {where} must have one entry per token of `input_ids`.")
    row = {"input_ids": input_ids[:max_length]}
    if example.get("completion_mask") is not None:
        row["completion_mask"] = list(example["completion_mask"])[:max_length]
    reward = example.get("reward")
    if reward is not None:
        reward = float(reward)
        if not math.isfinite(reward):
            raise ValueError(f"`reward` of {where} is {reward}: it must be finite.")
        rewards = rewards if rewards is not None else [0.0] * len(input_ids)
        rewards = rewards[:max_length]
        rewards[-1] += reward  # the reward of the last action of the row as trained
    if rewards is not None:
        row["rewards"] = rewards[:max_length]
    return row


def prepare_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer,
    *,
    text_field: str = "text",
    max_length: int = 1024,
    packing: bool = False,
    packing_strategy: str = "wrapped",
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Turn a dataset in any supported format into training rows (see the module docstring).

    Args:
        dataset: a `Dataset` or a streaming `IterableDataset`.
        tokenizer: the model's tokenizer (needs `eos_token_id` for text).
        text_field: the plain-text column.
        max_length: tokens per row: longer rows are truncated, or packed rows are this long.
        packing: pack rows into `max_length`-token rows with TRL's `pack_dataset`.
        packing_strategy: `"wrapped"`, `"bfd"` or `"bfd_split"` (see `trl.pack_dataset`).
        num_proc: processes for `map` (map-style datasets only).
    """
    columns = get_dataset_column_names(dataset)
    fmt = detect_format(columns, text_field)
    if fmt == "text" and tokenizer is None:
        raise ValueError("A plain-text dataset needs a tokenizer: pass `processing_class`.")
    map_kwargs = {"num_proc": num_proc} if isinstance(dataset, Dataset) and num_proc else {}
    fn_kwargs = {"fmt": fmt, "tokenizer": tokenizer, "text_field": text_field}
    # Packing cuts rows itself; truncating first would throw tokens away.
    fn_kwargs["max_length"] = 2**62 if packing else max_length
    dataset = dataset.map(_to_row, fn_kwargs=fn_kwargs, with_indices=True, remove_columns=columns, **map_kwargs)
    if fmt == "text" and not packing:
        # Blank lines are normal in text files; alone they are a lone EOS with no action to learn from.
        dataset = dataset.filter(lambda row: len(row["input_ids"]) >= 2)
    if packing:
        dataset = pack_dataset(dataset, max_length, strategy=packing_strategy)
        if "seq_lengths" in get_dataset_column_names(dataset):
            dataset = dataset.remove_columns("seq_lengths")
    return dataset


@dataclass
class DataCollatorForQHead:
    """Pads training rows into a batch: `input_ids`, `attention_mask`, `labels` (-100 where a token is not a target)
    and, when any row has them, token-aligned `rewards` (0 on padding).

    Args:
        pad_token_id: id written into padding (masked out by `attention_mask`, so EOS is fine).
        padding_side: `"right"` (training) or `"left"` (generation-style batches); both train identically.
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        for i, example in enumerate(examples):
            if len(example["input_ids"]) < 2:
                raise ValueError(
                    f"`input_ids` of batch row {i} has {len(example['input_ids'])} token(s): a row needs at least two "
                    "(one action). Filter empty and one-token sequences out of the dataset."
                )
        input_ids = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
        labels = []
        for ids, example in zip(input_ids, examples, strict=True):
            target = ids.clone()
            target[0] = -100  # the first token is never a target (no state precedes it), also under left padding
            if example.get("completion_mask") is not None:
                target[torch.as_tensor(example["completion_mask"]) == 0] = -100
            labels.append(target)
        side, multiple = self.padding_side, self.pad_to_multiple_of
        batch = {
            "input_ids": pad(input_ids, self.pad_token_id, side, multiple),
            "attention_mask": pad([torch.ones_like(ids) for ids in input_ids], 0, side, multiple),
            "labels": pad(labels, -100, side, multiple),
        }
        if any(e.get("rewards") is not None for e in examples):
            rewards = [
                torch.as_tensor(e["rewards"], dtype=torch.float32)
                if e.get("rewards") is not None
                else torch.zeros(len(e["input_ids"]))
                for e in examples
            ]
            batch["rewards"] = pad(rewards, 0.0, side, multiple)
        return batch
