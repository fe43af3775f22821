"""Datasets to training rows, and rows to padded batches.

A training row is `input_ids` (at least two tokens, so at least one action) with optional columns:
- `rewards`: a list aligned with the tokens, `rewards[k]` is earned when token `k` is produced (`rewards[0]` is ignored);
- `reward`: a scalar sequence reward, earned by the row's last action. Packing folds it into `rewards` at the
  document's last target token, which is the same thing and survives packing;
- `completion_mask`: 1 where a token is a training target (with `completion_only_loss`, the default);
- `prompt_length`: how many leading tokens are the prompt (0 when absent). Reward functions see the tokens after it as
  the completion; a pre-tokenised row may give it (counting its own left padding), else its `completion_mask` (or
  `labels`) sets it at the first target; given alone, under `completion_only_loss` it also takes the prompt out of the
  targets;
- `done`: a boolean (`None` is `False`), the row's last action ends the episode even without EOS: a completion cut at a
  generation limit whose reward judged it as finished. Packing folds it into a token-aligned `dones` list (1 at the
  document's last target token), which survives the cuts and reorderings of every packing strategy;
- `seq_lengths` (packed rows): the lengths of the spans a row holds, as TRL's `bfd` packing writes them. Each span is
  a document (or the part of one a row boundary left): its own episode and its own attention span (see
  `DataCollatorForQHead`).
With `reward_columns=True` a row also keeps the original `prompt` and every column that is not a format column, so
that reward functions receive them as TRL's `GRPOTrainer` passes them (`prompts`, `**dataset_columns`).

Truncation (one rule for every path): when `max_length` cuts tokens off a row (no packing, or `bfd` packing, which
truncates), the row's last kept action is its last action. It bootstraps there (a cut episode continues), and it
loses the row's `done`, unless the row has a scalar `reward`: that reward judged the whole row, so it is paid on the
last kept action, which is then terminal (a bootstrap would count the future the reward already counts a second
time). `wrapped` and `bfd_split` packing cut no token off: a document split across rows keeps its reward, `done` and
EOS on its real last token, and the part before the split bootstraps at the split.

Formats recognised, the way TRL's trainers recognise them (first match wins):
- pre-tokenised: `input_ids`, optionally `rewards`, `reward`, `completion_mask`, `attention_mask`, `labels` and a
  `prompt` for reward functions. The row's own `attention_mask` marks padding (0), which is taken out of the row with
  the matching entries of every token-aligned column (padding may only lead or trail the real tokens, and earns no
  reward); `labels` of -100 mark tokens that are not training targets (every other label must be the token itself:
  the shift onto the next token happens in training);
- prompt/completion: `prompt` and `completion`, both strings (the completion gets EOS appended, so its last action
  is terminal) or both lists of messages (rendered with the tokenizer's chat template, which ends the turn itself);
- conversational: `messages`, a list of messages rendered with the chat template; the loss covers the whole
  conversation, and reward functions see the last message as the completion and the ones before it as the prompt;
- plain text: the `dataset_text_field` column (default `"text"`). Each document gets EOS appended, so a document that
  fits ends with a terminal action, and one that is cut bootstraps where it was cut. The prompt is empty.
Every format may carry a scalar `reward` and a `done` flag; the tokenised one a per-token `rewards` list too.
Bad values raise a `TypeError` or `ValueError` naming the column, the row's index in the dataset and what was
expected, when the data is prepared: token ids that are not integers in `[0, vocab_size)`, rewards that are not finite
numbers or do not fit in float32 (alone, or times the trainer's `reward_scale`), a `completion_mask` entry other than
0/1, a message without `content`, a `prompt_length` that is not an integer within the row, a `done` that is not a
bool.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers.utils import logging
from trl.data_utils import apply_chat_template, common_prefix_length, get_dataset_column_names, pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import pad

from .chat import is_messages
from .reward_functions import FLOAT32_MAX

# Columns a format consumes; every other column is an extra one, handed to reward functions as a keyword argument.
logger = logging.get_logger(__name__)

FORMAT_COLUMNS = ("input_ids", "attention_mask", "labels", "rewards", "reward", "completion_mask", "prompt_length")
FORMAT_COLUMNS += ("done", "dones", "seq_lengths")
CANDIDATE_COLUMNS = ("candidate_ids", "candidate_rewards", "candidate_sampled_reward")
FORMAT_COLUMNS += CANDIDATE_COLUMNS
FORMAT_COLUMNS += ("prompt", "completion", "messages", "completion_ids")  # the last is a reward-function argument
# Columns of a pre-tokenised row with one entry per token: a row's own padding is cut out of each.
TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels", "rewards", "completion_mask") + CANDIDATE_COLUMNS
# Row keys the collator turns into tensors; the rest travel as lists in `batch["reward_inputs"]`.
ROW_TENSOR_KEYS = ("input_ids", "rewards", "reward", "completion_mask", "prompt_length", "done", "dones")
ROW_TENSOR_KEYS += ("seq_lengths",)
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


def _number(value: Any) -> float | None:
    """`value` as a float when it is a real number (bools, ints, floats, numpy or torch scalars), `None` otherwise."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _check_float32(number: float, scale: float, what: str) -> None:
    """A ValueError unless `number` and `number * scale` (the trainer's `reward_scale`) fit in float32, where rewards
    are computed: a Python float of 1e39 is finite but float32's inf, which no loss can use."""
    if abs(number) > FLOAT32_MAX:
        raise ValueError(
            f"{what} is {number:g}: it does not fit in float32 (|x| <= {FLOAT32_MAX:.4g}), as rewards are computed."
        )
    if abs(number * scale) > FLOAT32_MAX:
        raise ValueError(
            f"{what} is {number:g}, which times `reward_scale` ({scale:g}) does not fit in float32 (|x| <= "
            f"{FLOAT32_MAX:.4g}): scale the data down or lower `reward_scale`."
        )


def _check_rewards(rewards: Any, n_tokens: int, where: str, scale: float = 1.0) -> list[float]:
    """The `rewards` of a row as floats, or a TypeError/ValueError naming the row and what is wrong (also when a value,
    or a value times `scale`, does not fit in float32)."""
    if isinstance(rewards, (str, bytes, dict)) or not hasattr(rewards, "__len__"):
        raise TypeError(
            f"`rewards` of {where} is {rewards!r} ({type(rewards).__name__}): it must be a list of numbers, one per "
            "token of `input_ids` (rewards[k] is earned when token k is produced); use `reward` for one number per row."
        )
    if len(rewards) != n_tokens:
        raise ValueError(
            f"`rewards` of {where} has {len(rewards)} values for {n_tokens} tokens: it must be aligned with "
            "`input_ids` (rewards[k] is earned when token k is produced)."
        )
    values = []
    for k, value in enumerate(rewards):
        number = _number(value)
        if number is None:
            raise TypeError(
                f"`rewards` of {where} holds {value!r} ({type(value).__name__}) at token {k}: every entry must be a "
                "number (0 for no reward)."
            )
        if not math.isfinite(number):
            raise ValueError(f"`rewards` of {where} holds NaN or inf ({number} at token {k}).")
        _check_float32(number, scale, f"`rewards` of {where} at token {k}")
        values.append(number)
    return values


def _check_reward(value: Any, where: str, scale: float = 1.0) -> float | None:
    """The scalar `reward` of a row as a float (`None`: the row has none), or a TypeError/ValueError (also when it, or
    it times `scale`, does not fit in float32)."""
    if value is None:
        return None
    number = _number(value)
    if number is None:
        raise TypeError(
            f"`reward` of {where} is {value!r} ({type(value).__name__}): it must be a number, one per row (or None "
            "for no reward); per-token rewards go in `rewards`."
        )
    if not math.isfinite(number):
        raise ValueError(f"`reward` of {where} is {number}: it must be finite (leave it empty for no reward).")
    _check_float32(number, scale, f"`reward` of {where}")
    return number


def _check_token_ids(input_ids: list, where: str, vocab_size: int | None) -> list[int]:
    """`input_ids` of a pre-tokenised row, checked: integers in `[0, vocab_size)` (`>= 0` without a vocabulary size)."""
    if input_ids and all(type(token) is int for token in input_ids):  # Arrow's ints: only the range to check
        if min(input_ids) >= 0 and (vocab_size is None or max(input_ids) < vocab_size):
            return input_ids
    for k, token in enumerate(input_ids):
        if hasattr(token, "item") and getattr(token, "ndim", None) == 0:
            token = token.item()
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise TypeError(
                f"`input_ids` of {where} holds {token!r} ({type(token).__name__}) at token {k}: token ids must be "
                "integers."
            )
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(
                f"`input_ids` of {where} holds {token} at token {k}: token ids must be in {bound}, the model's "
                "vocabulary (was the data tokenised with another tokenizer?)."
            )
    return [int(token) for token in input_ids]


def _label_targets(labels: Any, input_ids: list, where: str) -> list[int]:
    """A row's `labels` as a 0/1 target list (`None`: every token is a target); a ValueError for a label that is
    neither -100 nor the token itself (pre-shifted labels would train the wrong tokens)."""
    if labels is None:
        return [1] * len(input_ids)
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__") or len(labels) != len(input_ids):
        raise ValueError(
            f"`labels` of {where} must have one entry per token of `input_ids` ({len(input_ids)}), got {labels!r}."
        )
    targets = []
    for k, (label, token) in enumerate(zip(labels, input_ids, strict=True)):
        if label != -100 and label != token:
            raise ValueError(
                f"`labels` of {where} holds {label!r} at token {k}, where `input_ids` holds {token!r}: a label must be "
                "the token itself (a training target) or -100 (not one). Labels are shifted onto the next token in "
                "training: pass them unshifted, as for transformers' causal LMs."
            )
        targets.append(int(label != -100))
    return targets


def _real_span(mask: Any, n_tokens: int, where: str) -> tuple[int, int]:
    """`(start, stop)` of the real tokens a row's `attention_mask` marks with 1; a ValueError when it is not one 0/1
    entry per token or has padding between real tokens (cutting it out would join tokens that never followed each
    other)."""
    if isinstance(mask, (str, bytes)) or not hasattr(mask, "__len__") or len(mask) != n_tokens:
        raise ValueError(
            f"`attention_mask` of {where} must have one entry per token of `input_ids` ({n_tokens}), got {mask!r}."
        )
    real = []
    for k, value in enumerate(mask):
        if _number(value) not in (0.0, 1.0):
            raise ValueError(f"`attention_mask` of {where} holds {value!r} at token {k}: it must be 1 (a token) or 0.")
        if value:
            real.append(k)
    if not real:
        return 0, 0
    if real[-1] - real[0] + 1 != len(real):
        gap = next(k for k in range(real[0], real[-1]) if not mask[k])
        raise ValueError(
            f"`attention_mask` of {where} has padding (0) at token {gap}, between real tokens: padding may only lead "
            "or trail a row. Split the row, or drop the masked tokens from it."
        )
    return real[0], real[-1] + 1


def _strip_padding(example: dict[str, Any], where: str) -> dict[str, Any]:
    """A pre-tokenised example with its `labels` as a 0/1 target list and its own padding (`attention_mask` 0) cut out
    of every token-aligned column, so that padding is no token, no action and no target. Padding must earn no reward.
    """
    input_ids = list(example["input_ids"])
    n = len(input_ids)
    example = dict(example)
    if "labels" in example:
        example["labels"] = _label_targets(example["labels"], input_ids, where)
    if example.get("attention_mask") is None:
        return example
    start, stop = _real_span(example["attention_mask"], n, where)
    if (start, stop) == (0, n):
        return example
    if example.get("prompt_length") is not None:  # counts `input_ids` as given: the leading padding comes off it
        example["prompt_length"] = _check_prompt_length(example["prompt_length"], stop - start, where, start)
    for name in TOKEN_COLUMNS:
        column = example.get(name)
        if column is None:
            continue
        if name == "rewards":
            for k, value in enumerate(_check_rewards(column, n, where)):
                if value != 0 and not start <= k < stop:
                    raise ValueError(
                        f"`rewards` of {where} holds {value} at token {k}, which `attention_mask` marks as padding: "
                        "padding is not a token and earns no reward."
                    )
        elif isinstance(column, (str, bytes)) or not hasattr(column, "__len__") or len(column) != n:
            raise ValueError(
                f"`{name}` of {where} must have one entry per token of `input_ids` ({n}, padding included), got "
                f"{column!r}."
            )
        example[name] = list(column)[start:stop]
    return example


def _last_target(targets: list[int] | None, n_tokens: int) -> int:
    """The index of the last token after the first that is a training target (the token a row's last action
    produces); the last token when every token is a target or none is."""
    if targets is not None:
        for k in range(n_tokens - 1, 0, -1):
            if targets[k]:
                return k
    return n_tokens - 1


def check_candidates(
    example: dict[str, Any], n_tokens: int, where: str, vocab_size: int | None = None, reward_scale: float = 1.0
) -> dict:
    """The candidate columns of a row, checked (a ValueError naming the column and the row otherwise): all three or
    none, one entry per token, as many effects as ids at each token, ids in `[0, vocab_size)`, finite effects that
    fit in float32 times `reward_scale`. Returns `{}` when the row has none (all three `None` or absent)."""
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
        for r in token_effects:
            _check_float32(r, reward_scale, f"`candidate_rewards` of {where} at token {i}")
        out_ids.append(token_ids)
        out_effects.append([float(r) for r in token_effects])
    sampled = [0.0 if r is None else r for r in sampled]
    if not all(isinstance(r, (int, float)) and math.isfinite(r) for r in sampled):
        raise ValueError(f"`candidate_sampled_reward` of {where} holds a NaN, inf or non-number.")
    for i, r in enumerate(sampled):
        _check_float32(r, reward_scale, f"`candidate_sampled_reward` of {where} at token {i}")
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


def _check_prompt_length(value: Any, n_tokens: int, where: str, padding: int = 0) -> int:
    """A pre-tokenised row's `prompt_length` (leading tokens that are the prompt), an integer in `[0, n_tokens]`, less
    the `padding` tokens its `attention_mask` marks before the first real token; a TypeError/ValueError otherwise."""
    number = _number(value)
    if isinstance(value, bool) or number is None or not float(number).is_integer():
        raise TypeError(
            f"`prompt_length` of {where} is {value!r} ({type(value).__name__}): it must be an integer, the number of "
            "leading tokens of `input_ids` that are the prompt."
        )
    length = int(number) - padding
    if not 0 <= length <= n_tokens:
        raise ValueError(
            f"`prompt_length` of {where} is {int(number)}: it must lie in [{padding}, {n_tokens + padding}] (the "
            f"row's {padding} leading padding tokens, up to all of its {n_tokens} real tokens)."
        )
    return length


def _check_messages(messages: Any, column: str, where: str) -> None:
    """A TypeError/ValueError naming the column, the row and the message unless every message is a dict with a string
    `role` and a `content` (a string or a list of content parts; `None` or absent only beside `tool_calls`): a chat
    template renders a missing content as nothing, a silently empty turn."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise TypeError(
                f"`{column}` of {where}: message {i} is {message!r}; every message must be a dict with a string `role`."
            )
        content = message.get("content")
        if content is None and message.get("tool_calls"):
            continue
        if not isinstance(content, (str, list)):
            got = "no `content`" if "content" not in message else f"`content` {content!r} ({type(content).__name__})"
            raise ValueError(
                f"`{column}` of {where}: message {i} (role {message['role']!r}) has {got}: it must be a string (or a "
                "list of content parts; absent only for a message with `tool_calls`)."
            )


def _encode(tokenizer, text: str) -> list[int]:
    # Chat templates write their special tokens into the text; plain text gets none, as before (EOS is added as an id).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class BoundaryMerges:
    """Warns once (per `prepare_dataset` call and process) when a prompt's last tokens and its completion's first ones
    merge into other tokens, as TRL's `SFTTrainer` warns: the completion then starts where the two tokenisations part,
    inside the prompt's text, so reward functions receive the merged characters at the start of the completion (a
    prompt ending in `<|assistant|>` and a completion starting with `<think>` gives GPT-2's `><` token, and the
    completion `'><think>...'` that TRL's `think_format_reward` scores 0)."""

    def __init__(self):
        self.warned = False

    def check(self, tokenizer, prompt_ids: list[int], input_ids: list[int], prompt_length: int, where: str) -> None:
        if self.warned or prompt_length >= len(prompt_ids):
            return
        self.warned = True
        merged = tokenizer.decode(input_ids[prompt_length : prompt_length + 1])
        completion = tokenizer.decode(input_ids[prompt_length:])
        logger.warning(
            f"The prompt and the completion of {where} merge at their boundary: the prompt's end "
            f"{tokenizer.decode(prompt_ids[prompt_length:])!r} and the completion's start tokenise together as "
            f"{merged!r}, so the completion starts inside the prompt's text ({completion[:40]!r}...): reward functions "
            "see it so (a format reward anchored at the completion's start scores 0) and the model is trained on a "
            "context it does not see when generating from the prompt. End prompts on a token boundary (a newline after "
            "the generation prompt of the chat template, say). Shown once; it likely applies to more rows."
        )


def _tokenize(
    example: dict[str, Any], where: str, *, fmt: str, tokenizer, text_field: str, merges: BoundaryMerges | None = None
) -> tuple[list, int, Any]:
    """`(input_ids, prompt_length, prompt)` of one example; `prompt` is what reward functions get as the prompt."""
    merges = merges if merges is not None else BoundaryMerges()
    if fmt == "tokenized":
        input_ids = list(example["input_ids"])
        if example.get("prompt_length") is not None:  # the data's own split (its leading padding taken out)
            return (
                input_ids,
                _check_prompt_length(example["prompt_length"], len(input_ids), where),
                example.get("prompt"),
            )
        mask = example.get("completion_mask")
        mask = example.get("labels") if mask is None else mask  # `labels` as 0/1 targets (`_strip_padding`)
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
        _check_messages(messages, "messages", where)
        input_ids = _encode(tokenizer, apply_chat_template({"messages": messages}, tokenizer)["text"])
        prompt_length = 0
        if len(messages) > 1:
            prompt_text = tokenizer.apply_chat_template(
                messages[:-1], tokenize=False, add_generation_prompt=messages[-1]["role"] == "assistant"
            )
            prompt_ids = _encode(tokenizer, prompt_text)
            prompt_length = common_prefix_length(prompt_ids, input_ids)
            merges.check(tokenizer, prompt_ids, input_ids, prompt_length, where)
        return input_ids, prompt_length, messages[:-1]
    prompt, completion = example["prompt"], example["completion"]
    if is_messages(prompt) and is_messages(completion):
        _check_messages(prompt, "prompt", where)
        _check_messages(completion, "completion", where)
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
    prompt_length = common_prefix_length(prompt_ids, input_ids)
    merges.check(tokenizer, prompt_ids, input_ids, prompt_length, where)
    return input_ids, prompt_length, prompt


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
    vocab_size: int | None,
    merges: BoundaryMerges | None = None,
    reward_scale: float = 1.0,
    candidate_scale: float = 1.0,
    sequence_reward_scale: float = 1.0,
) -> dict:
    """Tokenise, check, truncate to `max_length` (the module docstring's truncation rule); keep `reward` and `done`
    apart, or fold them into the token-aligned `rewards` and `dones` and number the tokens (`position_ids`, packing)."""
    where = f"example {idx}"
    if fmt == "tokenized":
        example = _strip_padding(example, where)
    input_ids, prompt_length, prompt = _tokenize(
        example, where, fmt=fmt, tokenizer=tokenizer, text_field=text_field, merges=merges
    )
    if fmt == "tokenized":  # the other formats come from the tokenizer
        input_ids = _check_token_ids(input_ids, where, vocab_size)
    n = len(input_ids)
    rewards = example.get("rewards")
    if rewards is not None:
        rewards = _check_rewards(rewards, n, where, reward_scale)
    mask = example.get("completion_mask")
    if mask is not None and (isinstance(mask, (str, bytes)) or not hasattr(mask, "__len__") or len(mask) != n):
        raise ValueError(f"`completion_mask` of {where} must have one entry per token of `input_ids`.")
    for k, value in enumerate(mask if mask is not None else []):
        if _number(value) not in (0.0, 1.0):
            raise ValueError(
                f"`completion_mask` of {where} holds {value!r} at token {k}: it must be 1 (a training target) or 0."
            )
    given_prompt_length = fmt == "tokenized" and example.get("prompt_length") is not None
    labels = example.get("labels") if fmt == "tokenized" else None
    if fmt == "prompt_completion" or (given_prompt_length and mask is None and labels is None):
        mask = [0] * prompt_length + [1] * (n - prompt_length)
    targets = list(mask) if mask is not None and completion_only_loss else None
    # 0/1 targets (`_strip_padding`), honoured whatever `completion_only_loss` says; other formats make their own.
    if labels is not None and targets is not None:  # a target where both say so
        targets = [int(bool(t) and bool(m)) for t, m in zip(labels, targets, strict=True)]
    elif labels is not None:
        targets = labels
    kept = min(n, max_length)
    cut = n > max_length
    row = {"input_ids": input_ids[:kept]}
    if fmt in ("prompt_completion", "messages") or mask is not None or labels is not None or given_prompt_length:
        row["prompt_length"] = min(prompt_length, kept)
    if targets is not None:
        row["completion_mask"] = targets[:kept]
    reward = _check_reward(example.get("reward"), where, sequence_reward_scale)
    done = check_done(example.get("done"), where)
    # The truncation rule: a cut row's last kept action bootstraps, unless a scalar reward judged the whole row.
    done = (done and not cut) or (cut and reward is not None)
    # Every row of a dataset must have the same keys: a column that exists gives a key, `None` where it is empty.
    has_done = "done" in example or "reward" in example
    if any(name in example for name in CANDIDATE_COLUMNS):
        candidates = check_candidates(example, n, where, vocab_size, candidate_scale)
        if candidates and fold_reward:
            raise ValueError(f"{where} has candidate labels, which do not survive packing: set `packing=False`.")
        for name in CANDIDATE_COLUMNS:
            row[name] = candidates[name][:kept] if candidates else None
    if rewards is not None:
        rewards = rewards[:kept]
    if fold_reward:
        # Packing: the row's last action, the one that produces its last target token, earns the reward and ends the
        # episode; token-aligned, that survives the cuts and reorderings of every packing strategy.
        last = _last_target(row.get("completion_mask"), kept)
        if "reward" in example or "rewards" in example:
            rewards = rewards if rewards is not None else [0.0] * kept
            if reward is not None and kept:
                rewards[last] += reward
        if has_done:
            row["dones"] = [0] * kept
            if kept:
                row["dones"][last] = int(done)
        # Numbers the document's tokens, so that the spans a packing strategy cuts can be found in the packed rows.
        row["position_ids"] = list(range(kept))
    else:
        if "reward" in example:
            row["reward"] = reward
        if has_done:
            row["done"] = done
    if rewards is not None or "rewards" in example:
        row["rewards"] = rewards
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
    vocab_size: int | None = None,
    formatting_func: Callable[[dict], str] | None = None,
    reward_scale: float = 1.0,
    reward_clip: float | None = None,
    reward_normalization: str | None = None,
) -> Dataset | IterableDataset:
    """Turn a dataset in any supported format into training rows (see the module docstring).

    Args:
        dataset: a `Dataset` or a streaming `IterableDataset`.
        tokenizer: the model's tokenizer (needs `eos_token_id`, and a chat template for conversational data).
        text_field: the plain-text column.
        max_length: tokens per row: longer rows are truncated, or packed rows are this long (the truncation rule of
            the module docstring).
        packing: pack rows into `max_length`-token rows with TRL's `pack_dataset`. Each document stays its own
            episode and attention span: the rows get TRL's `seq_lengths` (`DataCollatorForQHead`).
        packing_strategy: `"wrapped"`, `"bfd"` or `"bfd_split"` (see `trl.pack_dataset`).
        num_proc: processes for `map` (map-style datasets only).
        completion_only_loss: train on completion tokens only where the data separates a completion (prompt/
            completion formats, or a `completion_mask` column); `False` trains on the prompt too.
        reward_columns: keep the prompt and the extra columns for reward functions (not with `packing`).
        vocab_size: pre-tokenised ids (and candidate ids) must be below it; defaults to `len(tokenizer)`, or no upper
            bound without a tokenizer. `QHeadTrainer` passes the model's vocabulary size.
        formatting_func: as `SFTTrainer`'s: `f(example) -> str`, applied to every example first; its text becomes
            the `text_field` column and the example is plain text (its `prompt`, `completion` and `messages` columns
            are dropped, so the whole text is trained on and reward functions see it all as the completion; other
            columns stay). Ignored, with a warning, for a pre-tokenised dataset (as SFTTrainer does).
        reward_scale, reward_clip, reward_normalization: the trainer's (`QHeadConfig`): every reward of the data
            must fit in float32, and so must each times `reward_scale` unless `reward_clip` bounds the product (the
            sequence `reward` is normalised before it is scaled: with `reward_normalization` only it must fit);
            candidate effects are scaled and never clipped. `QHeadTrainer` passes its config's.

    Raises:
        ValueError: for an empty dataset, or one in which no row has a token to train on (see `has_action`), and for
            bad values (naming the column and the row's index).
        TypeError: for values of the wrong type (naming the column and the row's index).

    Example:
    ```python
    >>> from datasets import Dataset
    >>> rows = prepare_dataset(Dataset.from_dict({"prompt": ["2+2="], "completion": ["4"]}), tokenizer)
    >>> rows[0]["completion_mask"]  # GPT-2: "2", "+", "2", "=" are not targets; "4" and EOS are
    [0, 0, 0, 0, 1, 1]
    ```
    """
    if formatting_func is not None:
        dataset = apply_formatting_func(dataset, formatting_func, text_field, num_proc)
    columns = get_dataset_column_names(dataset)
    fmt = detect_format(columns, text_field)
    if fmt != "tokenized" and tokenizer is None:
        raise ValueError(f"A dataset in the {fmt!r} format needs a tokenizer: pass `processing_class`.")
    if reward_columns and packing:
        raise ValueError(
            "Reward functions score one completion per row, and packing puts several in a row: set `packing=False`."
        )
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError("The dataset has no rows: there is nothing to train on.")
    if vocab_size is None and tokenizer is not None:
        vocab_size = len(tokenizer)
    map_kwargs = {"num_proc": num_proc} if isinstance(dataset, Dataset) and num_proc else {}
    fn_kwargs = {
        "fmt": fmt,
        "tokenizer": tokenizer,
        "text_field": text_field,
        # `wrapped` and `bfd_split` packing cut rows without losing a token; truncating first would throw tokens away.
        # `bfd` truncates each document to `max_length` anyway: truncated here, the truncation rule applies to it.
        "max_length": 2**62 if packing and packing_strategy != "bfd" else max_length,
        "fold_reward": packing,
        "completion_only_loss": completion_only_loss,
        "reward_columns": reward_columns,
        "vocab_size": vocab_size,
        "merges": BoundaryMerges(),  # warns once for this dataset
        # What each reward is multiplied by in float32 before anything bounds it (a clip bounds the scaled rewards).
        "reward_scale": 1.0 if reward_clip is not None else float(reward_scale),
        "candidate_scale": float(reward_scale),
        "sequence_reward_scale": 1.0
        if reward_normalization is not None or reward_clip is not None
        else float(reward_scale),
    }
    consumed = [c for c in columns if c in FORMAT_COLUMNS or c == text_field]
    remove = consumed if reward_columns else columns
    dataset = dataset.map(_to_row, fn_kwargs=fn_kwargs, with_indices=True, remove_columns=remove, **map_kwargs)
    # A row without an action (a blank line's lone EOS, a prompt that fills `max_length`, a 0- or 1-token row) has
    # nothing to train: left in, a batch of such rows divides 0 by 0, and a packed one trains across documents.
    dataset = _drop_rows_without_action(dataset, "rows")
    if packing:
        if "prompt_length" in get_dataset_column_names(dataset):
            dataset = dataset.remove_columns("prompt_length")
        dataset = pack_dataset(dataset, max_length, strategy=packing_strategy)
        if "seq_lengths" in get_dataset_column_names(dataset):  # bfd: TRL's own spans
            dataset = dataset.remove_columns("position_ids")
        else:  # wrapped: a span starts at each row and at each document's first token
            dataset = dataset.map(_seq_lengths_from_positions, remove_columns=["position_ids"])
        # A row that holds only the last token of a document cut at the row's start (wrapped) has no action.
        dataset = _drop_rows_without_action(dataset, "packed rows")
    return dataset


def apply_formatting_func(dataset, formatting_func: Callable[[dict], str], text_field: str, num_proc=None):
    """`dataset` with `text_field = formatting_func(example)` and without its other format columns (`prompt`,
    `completion`, `messages`): plain text, as `SFTTrainer` makes it. A pre-tokenised dataset is returned as it is, with
    a warning. A `TypeError` names the first example for which the function does not return a string."""
    columns = get_dataset_column_names(dataset)
    if "input_ids" in columns:
        logger.warning(
            "The dataset is already tokenised (it has `input_ids`): `formatting_func` is ignored (as SFTTrainer does)."
        )
        return dataset

    def format_example(example, idx):
        text = formatting_func(example)
        if not isinstance(text, str):
            raise TypeError(
                f"`formatting_func` returned {type(text).__name__} for example {idx}: it must return one string per "
                "example (the text to train on)."
            )
        return {text_field: text}

    remove = [c for c in columns if c in ("prompt", "completion", "messages") and c != text_field]
    map_kwargs = {"num_proc": num_proc} if isinstance(dataset, Dataset) and num_proc else {}
    return dataset.map(format_example, with_indices=True, remove_columns=remove, **map_kwargs)


def _seq_lengths_from_positions(row: dict[str, Any]) -> dict[str, list[int]]:
    """`seq_lengths` of a packed row from its documents' token numbers: a span starts at the row's first token and at
    every document's first token (number 0)."""
    positions = row["position_ids"]
    starts = [k for k, p in enumerate(positions) if k == 0 or p == 0]
    return {"seq_lengths": [b - a for a, b in zip(starts, starts[1:] + [len(positions)], strict=True)]}


def _drop_rows_without_action(dataset: Dataset | IterableDataset, what: str) -> Dataset | IterableDataset:
    """`dataset` without the rows that have no action (`has_action`): counted in the log, and a ValueError when none
    is left (map-style datasets; a stream is filtered as it is read)."""
    before = len(dataset) if isinstance(dataset, Dataset) else None
    dataset = dataset.filter(has_action)
    if before is None:
        return dataset
    dropped = before - len(dataset)
    if dropped == before:
        raise ValueError(
            f"None of the {before} {what} has a token to train on (an action: a target token after at least one "
            "token of its document): is every prompt longer than `max_length`, or every row empty or one token long?"
        )
    if dropped:
        logger.warning(
            f"Dropped {dropped} of {before} {what} with no token to train on (prompt as long as `max_length`, fewer "
            "than two tokens, or no completion token)."
        )
    return dataset


def has_action(row: dict[str, Any]) -> bool:
    """Whether a prepared row holds at least one action: a token that is a training target and does not start a span
    of the row (its first token, or the first of a packed document, `seq_lengths`)."""
    input_ids, mask = row["input_ids"], row.get("completion_mask")
    starts = set(span_starts(row.get("seq_lengths"), len(input_ids)))
    return any(k not in starts and (mask is None or mask[k]) for k in range(1, len(input_ids)))


def span_starts(seq_lengths: list[int] | None, n_tokens: int) -> list[int]:
    """The first token of each span of a row: `[0]` for a row of one document, one per `seq_lengths` entry else."""
    if not seq_lengths:
        return [0]
    return [0] + [int(x) for x in itertools.accumulate(seq_lengths[:-1])]


@dataclass
class DataCollatorForQHead:
    """Pads training rows into a batch: `input_ids`, `attention_mask`, `labels` (-100 where a token is not a target)
    and, when any row has them, token-aligned `rewards` (0 on padding), `reward` (`[B]`, NaN where a row has none),
    `prompt_length` (`[B]`), `done` (`[B]` bool, `False` where a row has none) and the packed form of `done`,
    token-aligned `dones` (`[B, T]` bool, `False` on padding). Other row keys (the prompt and extra columns kept for
    reward functions) travel as lists in `batch["reward_inputs"]`.

    Packed rows (`seq_lengths`) also get `position_ids` (`[B, T]`, 0 on padding) restarting at 0 at each span, as TRL's
    `DataCollatorForLanguageModeling` makes them, and the first token of each span is not a target: no action crosses
    from one document into the next, so each is its own episode. `QHeadTrainer` runs such a batch with these positions
    and no attention mask, from which transformers' attention masks keep each span to itself (TRL's padding-free
    training does the same).

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
        positions = self._packed_positions(examples) if any("seq_lengths" in e for e in examples) else None
        labels = []
        for row, (ids, example) in enumerate(zip(input_ids, examples, strict=True)):
            target = ids.clone()
            target[0] = -100  # the first token is never a target (no state precedes it), also under left padding
            if positions is not None:  # nor is a packed document's first: the step into it crosses episodes
                target[positions[row] == 0] = -100
            if example.get("completion_mask") is not None:
                target[torch.as_tensor(example["completion_mask"]) == 0] = -100
            labels.append(target)
        side, multiple = self.padding_side, self.pad_to_multiple_of
        batch = {
            "input_ids": pad(input_ids, self.pad_token_id, side, multiple),
            "attention_mask": pad([torch.ones_like(ids) for ids in input_ids], 0, side, multiple),
            "labels": pad(labels, -100, side, multiple),
        }
        if positions is not None:
            batch["position_ids"] = pad(positions, 0, side, multiple)
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

    @staticmethod
    def _packed_positions(examples: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Per row, token positions restarting at 0 at each span of `seq_lengths` (a row without them is one span),
        made by TRL's `DataCollatorForLanguageModeling` as for its own packed rows."""
        seq_lengths = []
        for i, e in enumerate(examples):
            lengths = [int(x) for x in e.get("seq_lengths") or [len(e["input_ids"])]]
            if sum(lengths) != len(e["input_ids"]) or min(lengths) < 1:
                raise ValueError(
                    f"`seq_lengths` of batch row {i} is {lengths} for {len(e['input_ids'])} tokens: it must split the "
                    "row into spans of at least one token."
                )
            seq_lengths.append(lengths)
        return DataCollatorForLanguageModeling.get_position_ids_from_packed_seq_lengths(seq_lengths)

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
