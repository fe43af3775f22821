"""TRL-style reward functions and reward models, called on a batch of completions (`RewardFunctions`).

The interface is that of TRL's `GRPOTrainer`: a callable `f(prompts=..., completions=..., completion_ids=...,
**dataset_columns)`, sync or async, returning one value per completion: a float (a sequence reward), `None` (the
function does not apply to that sample) or a list of floats aligned with `completion_ids` (per-token rewards). A
`PreTrainedModel` (e.g. `AutoModelForSequenceClassification` with one label), or a name or path loaded as one, scores
the decoded prompt + completion with its own tokenizer. Async functions run concurrently on an event loop in a daemon
thread that lives as long as the `RewardFunctions`.

The texts they score are the trained tokens' (`texts_for_rewards`): the prompt text is the decode of the prompt tokens
and the completion text what the completion tokens add to it, so `prompt + completion == decode(prompt + completion
tokens)`. A prompt text whose last characters merge with the completion's first when tokenised ("Hello wor" + "ld!":
`Hello`, ` world`, `!`) is scored as the tokens say (`"Hello"` + `" world!"`), never as the raw texts.

This module only calls the functions, checks what they return and weighs it; where the rewards go on the action grid
is `trl_qhead.rewards`' job (training) and `trl_qhead.rollouts`' (generated data).
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl.data_utils import apply_chat_template
from trl.trainer.utils import (
    get_callable_name,
    get_config_model_id,
    is_async_callable,
    shutdown_event_loop_in_daemon,
    start_event_loop_in_daemon,
)

from .chat import is_messages

RewardFunc = Union[str, PreTrainedModel, Callable[..., list]]  # noqa: UP007 (a runtime alias, as TRL spells it)

# Rewards are computed in float32: a larger number (1e39) is a finite Python float that becomes inf there.
FLOAT32_MAX = torch.finfo(torch.float32).max


def texts_for_rewards(
    tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]
) -> tuple[list[str], list[str]]:
    """`(prompt_texts, completion_texts)`: what reward functions score, decoded from exactly the tokens trained on.

    Per sample, `whole = decode(prompt_ids + completion_ids)` (special tokens skipped, spaces not cleaned up), the
    prompt text is `decode(prompt_ids)` and the completion text is the rest of `whole`, so that
    `prompt_text + completion_text == whole`. The completion is not decoded on its own: SentencePiece-style decoders
    drop the leading space of a sequence's first token (`"Hello"` + `"world"`). Where the decoded prompt is not a
    prefix of `whole` (a character whose bytes straddle the boundary), the prompt text is the part they share.

    Args:
        tokenizer: the policy's tokenizer.
        prompt_ids, completion_ids: per sample, the prompt's and the completion's token ids (no padding).
    """
    options = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    prompts = tokenizer.batch_decode([list(p) for p in prompt_ids], **options)
    wholes = tokenizer.batch_decode(
        [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)], **options
    )
    prompt_texts = [os.path.commonprefix([prompt, whole]) for prompt, whole in zip(prompts, wholes, strict=True)]
    return prompt_texts, [whole[len(prompt) :] for prompt, whole in zip(prompt_texts, wholes, strict=True)]


def combine_sequence_rewards(per_source: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`R_b = nansum_i(w_i * R_bi)`: a NaN (`None`) source is left out; NaN where every source is NaN.

    Args:
        per_source: `[B, F]`, NaN where source `i` does not apply to sample `b`.
        weights: `[F]`.
    """
    total = (per_source * weights.to(per_source)).nansum(dim=1)
    return total.masked_fill(torch.isnan(per_source).all(dim=1), math.nan)


@dataclass
class FunctionRewards:
    """What the reward functions returned for a batch of completions.

    Args:
        sequence: `[B, F]` sequence rewards, NaN where function `i` returned `None` or per-token rewards.
        per_token: `per_token[i][b]`, the `[n_b]` per-token rewards of function `i` for sample `b`, or `None`.
    """

    sequence: torch.Tensor
    per_token: list[list[torch.Tensor | None]]

    def totals(self) -> torch.Tensor:
        """`[B, F]` one number per function and sample (per-token ones summed), NaN where it did not apply."""
        totals = self.sequence.clone()
        for i, column in enumerate(self.per_token):
            for b, values in enumerate(column):
                if values is not None:
                    totals[b, i] = values.sum()
        return totals

    def weighted_sequence(self, weights: torch.Tensor) -> torch.Tensor:
        """`(B,)` the weighted sum of the sequence rewards (`combine_sequence_rewards`), NaN where none applied."""
        return combine_sequence_rewards(self.sequence, weights)

    def weighted_per_token(self, weights: torch.Tensor) -> list[torch.Tensor | None]:
        """Per sample, `sum_i w_i * per_token[i][b]` over the functions that returned per-token rewards for it (a
        `(n_b,)` tensor), or `None` where none did."""
        totals: list[torch.Tensor | None] = [None] * self.sequence.shape[0]
        for weight, column in zip(weights.tolist(), self.per_token, strict=True):
            for b, values in enumerate(column):
                if values is not None:
                    totals[b] = (torch.zeros_like(values) if totals[b] is None else totals[b]) + weight * values
        return totals


class RewardFunctions:
    """TRL-style reward functions and reward models, called together on a batch of completions.

    Args:
        reward_funcs: one, or a list, of: a callable (sync or async) with TRL's reward-function interface, a
            `PreTrainedModel` whose `logits[:, 0]` is the reward (e.g. `AutoModelForSequenceClassification` with
            `num_labels=1`), or a name or path loaded as one.
        reward_processing_classes: the tokenizer of each reward model (one, or a list aligned with `reward_funcs`,
            `None` for functions); a reward model without one gets `AutoTokenizer.from_pretrained` of its name.
        reward_weights: one weight per reward function (default all 1), as `GRPOConfig.reward_weights`.
        model_init_kwargs: keyword arguments for `AutoModelForSequenceClassification.from_pretrained`.

    Example:
    ```python
    >>> from trl.rewards import think_format_reward
    >>> funcs = RewardFunctions([think_format_reward, lambda completions, **kw: [len(c[0]["content"]) for c in completions]])
    >>> out = funcs.score(prompts=[[{"role": "user", "content": "hi"}]],
    ...                   completions=[[{"role": "assistant", "content": "<think>x</think>y"}]], completion_ids=[[1, 2]])
    >>> out.sequence
    tensor([[ 1., 16.]])
    ```
    """

    def __init__(
        self,
        reward_funcs: RewardFunc | list[RewardFunc],
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase | None] | None = None,
        reward_weights: list[float] | None = None,
        model_init_kwargs: dict[str, Any] | None = None,
    ):
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("`reward_funcs` is empty: pass at least one reward function or model.")
        for i, func in enumerate(funcs):
            if isinstance(func, str):
                funcs[i] = AutoModelForSequenceClassification.from_pretrained(
                    func, num_labels=1, **(model_init_kwargs or {})
                )
            elif not (isinstance(func, nn.Module) or callable(func)):
                raise TypeError(
                    f"`reward_funcs[{i}]` must be a callable, a model, or a name or path, got {type(func).__name__}."
                )
        self.funcs = funcs
        self.names = _unique([self._name(func) for func in funcs])

        if reward_weights is None:
            reward_weights = [1.0] * len(funcs)
        if len(reward_weights) != len(funcs):
            raise ValueError(
                f"`reward_weights` has {len(reward_weights)} weights for {len(funcs)} reward functions {self.names}: "
                "give one weight per reward function."
            )
        self.weights = torch.tensor([float(w) for w in reward_weights], dtype=torch.float32)

        if reward_processing_classes is None:
            reward_processing_classes = [None] * len(funcs)
        elif not isinstance(reward_processing_classes, (list, tuple)):
            reward_processing_classes = [reward_processing_classes]
        if len(reward_processing_classes) != len(funcs):
            raise ValueError(
                f"`reward_processing_classes` has {len(reward_processing_classes)} entries for {len(funcs)} reward "
                "functions: give one per reward function (`None` for callables)."
            )
        self.processing_classes = list(reward_processing_classes)
        for i, func in enumerate(funcs):
            if not isinstance(func, nn.Module):
                continue
            if not hasattr(func, "config"):
                raise TypeError(f"Reward model '{self.names[i]}' must be a transformers model (it has no `config`).")
            tokenizer = self.processing_classes[i]
            if tokenizer is None:
                model_id = get_config_model_id(func.config)
                if not model_id:
                    raise ValueError(
                        f"Reward model '{self.names[i]}' has no name or path to load its tokenizer from: pass it in "
                        "`reward_processing_classes`."
                    )
                tokenizer = AutoTokenizer.from_pretrained(model_id)
            if tokenizer.pad_token_id is None:
                tokenizer = copy.copy(tokenizer)
                tokenizer.pad_token = tokenizer.eos_token
            # Sequence classifiers read the score at the last non-padding token, found through `pad_token_id`.
            func.config.get_text_config().pad_token_id = tokenizer.pad_token_id
            func.eval().requires_grad_(False)
            self.processing_classes[i] = tokenizer
        self._loop = self._loop_thread = None

    @property
    def reads_completion_ids(self) -> bool:
        """Whether a function may read `completion_ids`: every callable receives them (TRL's interface), so only a set
        of reward models alone, which score the decoded texts, reads nothing but the text."""
        return any(not isinstance(func, nn.Module) for func in self.funcs)

    @staticmethod
    def _name(func) -> str:
        if isinstance(func, nn.Module):
            name = get_config_model_id(getattr(func, "config", None)) if hasattr(func, "config") else ""
            return str(name).rstrip("/").split("/")[-1] or type(func).__name__
        return get_callable_name(func)

    def __len__(self) -> int:
        return len(self.funcs)

    @property
    def models(self) -> list[tuple[int, nn.Module]]:
        return [(i, func) for i, func in enumerate(self.funcs) if isinstance(func, nn.Module)]

    def score(
        self,
        prompts: list,
        completions: list,
        completion_ids: list[list[int]],
        **kwargs: Any,
    ) -> FunctionRewards:
        """Call every reward function on the batch (async ones concurrently) and check what they return.

        Args:
            prompts: prompts as strings, or lists of messages.
            completions: completions as strings, or lists of one assistant message (conversational data).
            completion_ids: token ids of each completion (what per-token rewards are aligned to).
            kwargs: dataset columns (one list entry per sample) and anything else passed to every function
                (`trainer_state`, `log_metric`, `log_extra`). The last three are always passed, as TRL's
                `GRPOTrainer` passes them: outside a trainer (`generate_and_score`) `trainer_state` is `None` and
                `log_metric(name, value)` / `log_extra(column, values)` record nothing.
        """
        kwargs.setdefault("trainer_state", None)
        kwargs.setdefault("log_metric", _log_nothing)
        kwargs.setdefault("log_extra", _log_nothing)
        n = len(completions)
        sequence = torch.full((n, len(self.funcs)), math.nan, dtype=torch.float32)
        per_token: list[list[torch.Tensor | None]] = [[None] * n for _ in self.funcs]
        async_funcs = []
        for i, func in enumerate(self.funcs):
            if isinstance(func, nn.Module):
                sequence[:, i] = self._score_with_model(i, prompts, completions)
            elif is_async_callable(func):
                async_funcs.append(i)
            else:
                output = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
                self._store(i, output, completion_ids, sequence, per_token)
        if async_funcs:
            outputs = self._run_async(async_funcs, prompts, completions, completion_ids, kwargs)
            for i, output in zip(async_funcs, outputs, strict=True):
                self._store(i, output, completion_ids, sequence, per_token)
        scored = FunctionRewards(sequence=sequence, per_token=per_token)
        self._check_weighted_sums(scored)
        return scored

    def _check_weighted_sums(self, scored: FunctionRewards) -> None:
        """Each function's reward is finite in float32 (`_store`); their weighted sum must be too."""
        total = scored.weighted_sequence(self.weights)
        per_token = scored.weighted_per_token(self.weights)
        for b in range(total.shape[0]):
            token_sum_finite = per_token[b] is None or bool(torch.isfinite(per_token[b]).all())
            if torch.isinf(total[b]) or not token_sum_finite:
                parts = {
                    name: scored.sequence[b, i].item() if scored.per_token[i][b] is None else "per-token"
                    for i, name in enumerate(self.names)
                }
                raise ValueError(
                    f"The weighted sum of the rewards of sample {b} overflows float32 (|R| > {FLOAT32_MAX:.3g}): "
                    f"rewards {parts}, `reward_weights` {self.weights.tolist()}. Scale the reward functions down."
                )

    @torch.no_grad()
    def _score_with_model(self, i: int, prompts: list, completions: list) -> torch.Tensor:
        model, tokenizer = self.funcs[i], self.processing_classes[i]
        if is_messages(prompts[0]):
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    f"Reward model '{self.names[i]}' scores conversational data through its tokenizer's chat template, "
                    "and its tokenizer has none: set `chat_template` on it."
                )
            texts = [
                apply_chat_template({"messages": p + c}, tokenizer)["text"]
                for p, c in zip(prompts, completions, strict=True)
            ]
        else:
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        device = next(model.parameters()).device
        inputs = tokenizer(
            text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
        ).to(device)
        scores = model(**inputs).logits[:, 0].float().cpu()
        weighted = scores * self.weights[i]
        if not torch.isfinite(weighted).all():
            b = int((~torch.isfinite(weighted)).nonzero()[0])
            raise ValueError(
                f"Reward model '{self.names[i]}' returned {scores[b].item()} for sample {b} (weight "
                f"{self.weights[i].item():g}): rewards must be finite in float32 (a half-precision model that "
                "overflows, or damaged weights?)."
            )
        return scores

    def _run_async(self, indices, prompts, completions, completion_ids, kwargs) -> list:
        if self._loop is None:
            self._loop_thread, self._loop, ready = start_event_loop_in_daemon(name="trl-qhead-rewards")
            ready.wait()
            atexit.register(shutdown_event_loop_in_daemon, self._loop_thread, self._loop)

        async def run_all():
            return await asyncio.gather(
                *(
                    self.funcs[i](prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
                    for i in indices
                )
            )

        return asyncio.run_coroutine_threadsafe(run_all(), self._loop).result()

    def _store(self, i: int, output, completion_ids, sequence: torch.Tensor, per_token: list) -> None:
        """Check one function's output and file it as sequence or per-token rewards."""
        name, n = self.names[i], len(completion_ids)
        if torch.is_tensor(output):
            output = output.tolist()
        if isinstance(output, (str, bytes)) or not isinstance(output, Sequence):
            raise ValueError(f"The reward function '{name}' must return a list, got {type(output).__name__}.")
        if len(output) != n:
            raise ValueError(
                f"The reward function '{name}' returned {len(output)} rewards, but {n} were expected (one per "
                "prompt-completion pair)."
            )
        kinds = set()
        for b, value in enumerate(output):
            if value is None:
                continue
            if torch.is_tensor(value) and value.ndim == 0:
                value = value.item()
            if isinstance(value, numbers.Real):
                kinds.add("sequence")
                if not math.isfinite(value):
                    raise ValueError(
                        f"The reward function '{name}' returned {value} for sample {b}: rewards must be finite "
                        "(return None where the function does not apply)."
                    )
                self._check_range(i, float(value), b)
                sequence[b, i] = float(value)
                continue
            kinds.add("per-token")
            try:
                values = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
            except (TypeError, ValueError, RuntimeError) as error:
                raise ValueError(
                    f"The reward function '{name}' returned {type(value).__name__} for sample {b}: expected a float, "
                    "None, or a list of floats aligned with `completion_ids`."
                ) from error
            if values.numel() != len(completion_ids[b]):
                raise ValueError(
                    f"The reward function '{name}' returned {values.numel()} per-token rewards for sample {b}, whose "
                    f"completion has {len(completion_ids[b])} tokens: per-token rewards must be aligned with "
                    "`completion_ids`."
                )
            if not torch.isfinite(values).all():
                raise ValueError(f"The reward function '{name}' returned NaN or inf per-token rewards for sample {b}.")
            if values.numel():
                self._check_range(i, values.abs().max().item(), b, per_token=True)
            per_token[i][b] = values.float()
        if len(kinds) > 1:
            raise ValueError(
                f"The reward function '{name}' returned floats for some samples and lists for others: return one "
                "kind (sequence rewards, or per-token lists), with None where it does not apply."
            )

    def _check_range(self, i: int, value: float, b: int, per_token: bool = False) -> None:
        """A finite reward must stay finite in float32, times its function's weight."""
        weight = float(self.weights[i])
        if abs(value) <= FLOAT32_MAX and abs(value * weight) <= FLOAT32_MAX:
            return
        what = f"a per-token reward of {value:g}" if per_token else f"{value:g}"
        raise ValueError(
            f"The reward function '{self.names[i]}' returned {what} for sample {b}, which is not finite in float32 "
            f"(|R| <= {FLOAT32_MAX:.3g}) times its weight {weight:g}: rewards are computed in float32. Scale it down."
        )


def _log_nothing(name: str, value: Any) -> None:
    """`log_metric` and `log_extra` where nothing collects what reward functions log."""


def _unique(names: list[str]) -> list[str]:
    """Make repeated names distinct (`f`, `f_1`, ...) so that logs and columns keep every source apart."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        unique.append(name if count == 0 else f"{name}_{count}")
    return unique
