"""Datasets to training rows, and rows to padded batches.

A training row is `input_ids` (at least two tokens, so at least one action) with optional columns:
- `rewards`: a list aligned with the tokens, `rewards[k]` is earned when token `k` is produced (`rewards[0]` is ignored);
- `reward`: a scalar sequence reward, earned by the row's last action. Packing folds it into `rewards` at the
  document's last token, which is the same thing and survives packing;
- `completion_mask`: 1 where a token is a training target (with `completion_only_loss`, the default);
- `prompt_length`: how many leading tokens are the prompt (0 when absent). Reward functions see the tokens after it as
  the completion;
- `done`: a boolean (`None` is `False`), the row's last action ends the episode even without EOS: a completion cut at a
  generation limit whose reward judged it as finished. A row that `max_length` truncates loses it (its last trained
  action is no longer the episode's end, so it bootstraps). Packing folds it into a token-aligned `dones` list (1 at
  the document's last token), which survives the cuts and reorderings of every packing strategy.
With `reward_columns=True` a row also keeps the original `prompt` and every column that is not a format column, so
that reward functions receive them as TRL's `GRPOTrainer` passes them (`prompts`, `**dataset_columns`).

Formats recognised, the way TRL's trainers recognise them (first match wins):
- pre-tokenised: `input_ids`, optionally `rewards`, `reward`, `completion_mask` and a `prompt` for reward functions;
- prompt/completion: `prompt` and `completion`, both strings (the completion gets EOS appended, so its last action
  is terminal) or both lists of messages (rendered with the tokenizer's chat template, which ends the turn itself);
- conversational: `messages`, a list of messages rendered with the chat template; the loss covers the whole
  conversation, and reward functions see the last message as the completion and the ones before it as the prompt;
- plain text: the `dataset_text_field` column (default `"text"`). Each document gets EOS appended, so a document that
  fits ends with a terminal action, and one that is cut bootstraps where it was cut. The prompt is empty.
Every format may carry a scalar `reward` and a `done` flag; the tokenised one a per-token `rewards` list too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers.utils import logging
from trl.data_utils import apply_chat_template, common_prefix_length, get_dataset_column_names, pack_dataset
from trl.trainer.utils import pad

from .chat import is_messages

# Columns a format consumes; every other column is an extra one, handed to reward functions as a keyword argument.
logger = logging.get_logger(__name__)

FORMAT_COLUMNS = ("input_ids", "attention_mask", "labels", "rewards", "reward", "completion_mask", "prompt_length")
FORMAT_COLUMNS += ("done", "dones")
CANDIDATE_COLUMNS = ("candidate_ids", "candidate_rewards", "candidate_sampled_reward")
FORMAT_COLUMNS += CANDIDATE_COLUMNS
FORMAT_COLUMNS += ("prompt", "completion", "messages", "completion_ids")  # the last is a reward-function argument
# Row keys the collator turns into tensors; the rest travel as lists in `batch["reward_inputs"]`.
ROW_TENSOR_KEYS = ("input_ids", "rewards", "reward", "completion_mask", "prompt_length", "done", "dones")
ROW_TENSOR_KEYS += CANDIDATE_COLUMNS


def detect_format(column_names: list[str], text_field: str = "text") -> str:
    """`"tokenized"`, `"prompt_completion"`, `"messages"` or `"text"`; a `ValueError` listing the columns found and
    the ones expected otherwise."""
    columns = set(column_names)
    if "input_ids" in columns:
        return "tokenized"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "messages" in columns:
        return "messages"
    if text_field in columns:
        return "text"
    hint = ""
    if "prompt" in columns:
        hint = (
            " A dataset of prompts alone has nothing to train on: sample completions for it with "
            "`trl_qhead.generate_and_score`."
        )
    raise ValueError(
        f"The dataset has columns {sorted(columns)}; expected one of: `input_ids` (pre-tokenised, optionally with "
        f"`rewards`, `reward` and `completion_mask`), `prompt` and `completion`, `messages`, or the text column "
        f"`{text_field}` (set `dataset_text_field` to change it).{hint}"
    )


def _check_rewards(rewards: list[float], n_tokens: int, where: str) -> None:
    if len(rewards) != n_tokens:
        raise ValueError(
            f"`rewards` of {where} has {len(rewards)} values for {n_tokens} tokens: it must be aligned with "
            "`input_ids` (rewards[k] is earned when token k is produced)."
        )
    if not all(math.isfinite(r) for r in rewards):
        raise ValueError(f"`rewards` of {where} holds NaN or inf.")


def check_candidates(example: dict[str, Any], n_tokens: int, where: str, vocab_size: int | None = None) -> dict:
    """The candidate columns of a row, checked (a ValueError naming the column and the row otherwise): all three or
    none, one entry per token, as many effects as ids at each token, ids in `[0, vocab_size)`, finite effects. Returns
    `{}` when the row has none (all three `None` or absent)."""
    present = [name for name in CANDIDATE_COLUMNS if example.get(name) is not None]
    if not present:
        return {}
    if len(present) != len(CANDIDATE_COLUMNS):
        missing = [name for name in CANDIDATE_COLUMNS if name not in present]
        raise ValueError(f"{where} has {present} but not {missing}: candidate labels need all three columns.")
    ids, effects, sampled = (example[name] for name in CANDIDATE_COLUMNS)
    for name, column in zip(CANDIDATE_COLUMNS, (ids, effects, sampled), strict=True):
        if len(column) != n_tokens:
            raise ValueError(
                f"`{name}` of {where} has {len(column)} entries for {n_tokens} tokens: it must be aligned with "
                "`input_ids` (entry i concerns the action that produces token i)."
            )
    out_ids, out_effects = [], []
    for i, (token_ids, token_effects) in enumerate(zip(ids, effects, strict=True)):
        token_ids, token_effects = list(token_ids or []), list(token_effects or [])
        if len(token_ids) != len(token_effects):
            raise ValueError(
                f"`candidate_rewards` of {where} has {len(token_effects)} values at token {i} for "
                f"{len(token_ids)} `candidate_ids`: one effect per candidate."
            )
        for a in token_ids:
            if isinstance(a, bool) or not isinstance(a, int) or a < 0 or (vocab_size is not None and a >= vocab_size):
                raise ValueError(
                    f"`candidate_ids` of {where} holds {a!r} at token {i}: ids must be integers in [0, {vocab_size})."
                )
        if not all(isinstance(r, (int, float)) and math.isfinite(r) for r in token_effects):
            raise ValueError(f"`candidate_rewards` of {where} holds a NaN, inf or non-number at token {i}.")
        out_ids.append(token_ids)
        out_effects.append([float(r) for r in token_effects])
    sampled = [0.0 if r is None else r for r in sampled]
    if not all(isinstance(r, (int, float)) and math.isfinite(r) for r in sampled):
        raise ValueError(f"`candidate_sampled_reward` of {where} holds a NaN, inf or non-number.")
    return {"candidate_ids": out_ids, "candidate_rewards": out_effects, "candidate_sampled_reward": sampled}


def check_done(value: Any, where: str) -> bool:
    """The `done` flag of a row as a bool: `True`/`False`, 0/1 (also as numpy or tensor scalars), `None` is `False`."""
    if value is None:
        return False
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise ValueError(
        f"`done` of {where} is {value!r}: it must be a bool (or 0/1, or None for False), True when the row's last "
        "action ends the episode."
    )


def _encode(tokenizer, text: str) -> list[int]:
    # Chat templates write their special tokens into the text; plain text gets none, as before (EOS is added as an id).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenize(example: dict[str, Any], where: str, *, fmt: str, tokenizer, text_field: str) -> tuple[list, int, Any]:
    """`(input_ids, prompt_length, prompt)` of one example; `prompt` is what reward functions get as the prompt."""
    if fmt == "tokenized":
        input_ids = list(example["input_ids"])
        mask = example.get("completion_mask")
        prompt_length = next((i for i, m in enumerate(mask) if m), len(mask)) if mask is not None else 0
        return input_ids, prompt_length, example.get("prompt")
    if fmt == "text":
        text = example[text_field]
        if not isinstance(text, str):
            raise TypeError(f"`{text_field}` of {where} must be a string, got {type(text).__name__}.")
        return _encode(tokenizer, text) + [tokenizer.eos_token_id], 0, ""
    if fmt == "messages":
        messages = example["messages"]
        if not is_messages(messages) or not messages:
            raise TypeError(f"`messages` of {where} must be a non-empty list of {{'role', 'content'}} dicts.")
        input_ids = _encode(tokenizer, apply_chat_template({"messages": messages}, tokenizer)["text"])
        prompt_length = 0
        if len(messages) > 1:
            prompt_text = tokenizer.apply_chat_template(
                messages[:-1], tokenize=False, add_generation_prompt=messages[-1]["role"] == "assistant"
            )
            prompt_length = common_prefix_length(_encode(tokenizer, prompt_text), input_ids)
        return input_ids, prompt_length, messages[:-1]
    prompt, completion = example["prompt"], example["completion"]
    if is_messages(prompt) and is_messages(completion):
        rendered = apply_chat_template({"prompt": prompt, "completion": completion}, tokenizer)
        prompt_text, completion_text, eos = rendered["prompt"], rendered["completion"], []
    elif isinstance(prompt, str) and isinstance(completion, str):
        prompt_text, completion_text, eos = prompt, completion, [tokenizer.eos_token_id]
    else:
        raise TypeError(
            f"`prompt` and `completion` of {where} must both be strings or both be lists of messages, got "
            f"{type(prompt).__name__} and {type(completion).__name__}."
        )
    prompt_ids = _encode(tokenizer, prompt_text)
    input_ids = _encode(tokenizer, prompt_text + completion_text)
    if eos and input_ids[-1:] != eos:
        input_ids += eos
    # Tokens can merge across the boundary: the completion starts where the two tokenisations part, as in TRL's SFT.
    return input_ids, common_prefix_length(prompt_ids, input_ids), prompt


def _to_row(
    example: dict[str, Any],
    idx: int,
    *,
    fmt: str,
    tokenizer,
    text_field: str,
    max_length: int,
    fold_reward: bool,
    completion_only_loss: bool,
    reward_columns: bool,
) -> dict:
    """Tokenise, check, truncate to `max_length`; keep `reward` and `done` apart, or fold them into the token-aligned
    `rewards` and `dones` (packing)."""
    where = f"example {idx}"
    input_ids, prompt_length, prompt = _tokenize(example, where, fmt=fmt, tokenizer=tokenizer, text_field=text_field)
    rewards = example.get("rewards")
    if rewards is not None:
        _check_rewards(list(rewards), len(input_ids), where)
        rewards = [float(r) for r in rewards]
    mask = example.get("completion_mask")
    if mask is not None and len(mask) != len(input_ids):
        raise ValueError(f"`completion_mask` of {where} must have one entry per token of `input_ids`.")
    if fmt == "prompt_completion":
        mask = [0] * prompt_length + [1] * (len(input_ids) - prompt_length)
    row = {"input_ids": input_ids[:max_length]}
    if fmt in ("prompt_completion", "messages") or mask is not None:  # formats without a prompt: 0, the default
        row["prompt_length"] = min(prompt_length, max_length)
    if mask is not None and completion_only_loss:
        row["completion_mask"] = list(mask)[:max_length]
    # Every row of a dataset must have the same keys: a column that exists gives a key, `None` where it is empty.
    reward = example.get("reward")
    if reward is not None:
        reward = float(reward)
        if not math.isfinite(reward):
            raise ValueError(f"`reward` of {where} is {reward}: it must be finite (leave it empty for no reward).")
    if "done" in example:
        done = check_done(example["done"], where)
        if fold_reward:  # packing: a token-aligned flag on the document's last token survives the cuts
            row["dones"] = [0] * (len(input_ids) - 1) + [int(done)]
        else:  # a truncated row ends where it was cut, not where the episode ended: it bootstraps there
            row["done"] = done and len(input_ids) <= max_length
    if any(name in example for name in CANDIDATE_COLUMNS):
        vocab_size = len(tokenizer) if tokenizer is not None else None
        candidates = check_candidates(example, len(input_ids), where, vocab_size)
        if candidates and fold_reward:
            raise ValueError(f"{where} has candidate labels, which do not survive packing: set `packing=False`.")
        for name in CANDIDATE_COLUMNS:
            row[name] = candidates[name][:max_length] if candidates else None
    if fold_reward and ("reward" in example or "rewards" in example):
        rewards = (rewards if rewards is not None else [0.0] * len(input_ids))[:max_length]
        if reward is not None:
            rewards[-1] += reward  # the reward of the last action of the row as trained
    elif "reward" in example:
        row["reward"] = reward
    if rewards is not None or "rewards" in example:
        row["rewards"] = None if rewards is None else rewards[:max_length]
    if reward_columns:
        row["prompt"] = prompt
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
    completion_only_loss: bool = True,
    reward_columns: bool = False,
) -> Dataset | IterableDataset:
    """Turn a dataset in any supported format into training rows (see the module docstring).

    Args:
        dataset: a `Dataset` or a streaming `IterableDataset`.
        tokenizer: the model's tokenizer (needs `eos_token_id`, and a chat template for conversational data).
        text_field: the plain-text column.
        max_length: tokens per row: longer rows are truncated, or packed rows are this long.
        packing: pack rows into `max_length`-token rows with TRL's `pack_dataset`.
        packing_strategy: `"wrapped"`, `"bfd"` or `"bfd_split"` (see `trl.pack_dataset`).
        num_proc: processes for `map` (map-style datasets only).
        completion_only_loss: train on completion tokens only where the data separates a completion (prompt/
            completion formats, or a `completion_mask` column); `False` trains on the prompt too.
        reward_columns: keep the prompt and the extra columns for reward functions (not with `packing`).

    Example:
    ```python
    >>> from datasets import Dataset
    >>> rows = prepare_dataset(Dataset.from_dict({"prompt": ["2+2="], "completion": ["4"]}), tokenizer)
    >>> rows[0]["completion_mask"]  # GPT-2: "2", "+", "2", "=" are not targets; "4" and EOS are
    [0, 0, 0, 0, 1, 1]
    ```
    """
    columns = get_dataset_column_names(dataset)
    fmt = detect_format(columns, text_field)
    if fmt != "tokenized" and tokenizer is None:
        raise ValueError(f"A dataset in the {fmt!r} format needs a tokenizer: pass `processing_class`.")
    if reward_columns and packing:
        raise ValueError(
            "Reward functions score one completion per row, and packing puts several in a row: set `packing=False`."
        )
    map_kwargs = {"num_proc": num_proc} if isinstance(dataset, Dataset) and num_proc else {}
    fn_kwargs = {
        "fmt": fmt,
        "tokenizer": tokenizer,
        "text_field": text_field,
        # Packing cuts rows itself; truncating first would throw tokens away.
        "max_length": 2**62 if packing else max_length,
        "fold_reward": packing,
        "completion_only_loss": completion_only_loss,
        "reward_columns": reward_columns,
    }
    consumed = [c for c in columns if c in FORMAT_COLUMNS or c == text_field]
    remove = consumed if reward_columns else columns
    dataset = dataset.map(_to_row, fn_kwargs=fn_kwargs, with_indices=True, remove_columns=remove, **map_kwargs)
    if not packing:
        # A row without an action (a blank line's lone EOS, a prompt that fills `max_length`, a 0- or 1-token row)
        # has nothing to train: left in, a batch of such rows divides 0 by 0. Dropped here, counted in the log.
        before = len(dataset) if isinstance(dataset, Dataset) else None
        dataset = dataset.filter(has_action)
        if before is not None:
            dropped = before - len(dataset)
            if dropped == before:
                raise ValueError(
                    f"None of the {before} rows has a token to train on (an action: a target token after at least one "
                    "token): is every prompt longer than `max_length`, or every row empty?"
                )
            if dropped:
                logger.warning(
                    f"Dropped {dropped} of {before} rows with no token to train on (prompt as long as `max_length`, "
                    "fewer than two tokens, or no completion token)."
                )
    if packing:
        if "prompt_length" in get_dataset_column_names(dataset):
            dataset = dataset.remove_columns("prompt_length")
        dataset = pack_dataset(dataset, max_length, strategy=packing_strategy)
        if "seq_lengths" in get_dataset_column_names(dataset):
            dataset = dataset.remove_columns("seq_lengths")
    return dataset


def has_action(row: dict[str, Any]) -> bool:
    """Whether a prepared row holds at least one action: a token after the first that is a training target."""
    input_ids, mask = row["input_ids"], row.get("completion_mask")
    if len(input_ids) < 2:
        return False
    return mask is None or any(mask[1:])


@dataclass
class DataCollatorForQHead:
    """Pads training rows into a batch: `input_ids`, `attention_mask`, `labels` (-100 where a token is not a target)
    and, when any row has them, token-aligned `rewards` (0 on padding), `reward` (`[B]`, NaN where a row has none),
    `prompt_length` (`[B]`), `done` (`[B]` bool, `False` where a row has none) and the packed form of `done`,
    token-aligned `dones` (`[B, T]` bool, `False` on padding). Other row keys (the prompt and extra columns kept for
    reward functions) travel as lists in `batch["reward_inputs"]`.

    Args:
        pad_token_id: id written into padding (masked out by `attention_mask`, so EOS is fine).
        padding_side: `"right"` (training) or `"left"` (generation-style batches); both train identically.
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
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
        if any(e.get("reward") is not None for e in examples):
            values = [math.nan if e.get("reward") is None else float(e["reward"]) for e in examples]
            batch["reward"] = torch.tensor(values, dtype=torch.float32)
        if any(e.get("done") is not None for e in examples):
            done = [check_done(e.get("done"), f"batch row {i}") for i, e in enumerate(examples)]
            batch["done"] = torch.tensor(done, dtype=torch.bool)
        if any(e.get("dones") is not None for e in examples):
            dones = [
                torch.as_tensor(e["dones"] if e.get("dones") is not None else [0] * len(e["input_ids"])).bool()
                for e in examples
            ]
            batch["dones"] = pad(dones, False, side, multiple)
        if any(e.get("candidate_ids") is not None for e in examples):
            batch.update(self._candidates(examples))
        if any("prompt_length" in e for e in examples):
            batch["prompt_length"] = torch.tensor([int(e.get("prompt_length", 0)) for e in examples])
        extra = [key for key in examples[0] if key not in ROW_TENSOR_KEYS]
        if extra:
            batch["reward_inputs"] = {key: [e.get(key) for e in examples] for key in extra}
        return batch

    def _candidates(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Candidate labels on the token grid: `candidate_ids` `[B, T, k]` (0 where masked), `candidate_rewards`
        `[B, T, k]`, `candidate_mask` `[B, T, k]` bool, `candidate_sampled_reward` `[B, T]`; `k` the most candidates of
        any token in the batch (tokens with fewer are masked). Still token-aligned: the trainer shifts them onto the
        actions (entry `t + 1` to position `t`)."""
        k = max((len(c) for e in examples for c in (e.get("candidate_ids") or [])), default=0)
        ids, effects, masks, sampled = [], [], [], []
        for e in examples:
            n = len(e["input_ids"])
            row_ids = torch.zeros(n, k, dtype=torch.long)
            row_effects = torch.zeros(n, k, dtype=torch.float32)
            row_mask = torch.zeros(n, k, dtype=torch.bool)
            row_sampled = torch.zeros(n, dtype=torch.float32)
            if e.get("candidate_ids") is not None:
                for i, (c, r) in enumerate(zip(e["candidate_ids"], e["candidate_rewards"], strict=True)):
                    if c:
                        row_ids[i, : len(c)] = torch.as_tensor(c, dtype=torch.long)
                        row_effects[i, : len(c)] = torch.as_tensor(r, dtype=torch.float32)
                        row_mask[i, : len(c)] = True
                row_sampled = torch.as_tensor(
                    [0.0 if r is None else float(r) for r in e["candidate_sampled_reward"]], dtype=torch.float32
                )
            ids.append(row_ids)
            effects.append(row_effects)
            masks.append(row_mask)
            sampled.append(row_sampled)
        side, multiple = self.padding_side, self.pad_to_multiple_of
        return {
            "candidate_ids": pad(ids, 0, side, multiple),
            "candidate_rewards": pad(effects, 0.0, side, multiple),
            "candidate_mask": pad(masks, False, side, multiple),
            "candidate_sampled_reward": pad(sampled, 0.0, side, multiple),
        }
