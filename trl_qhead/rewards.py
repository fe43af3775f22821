"""Reward sources, summed into `r_t` on the action grid (DESIGN.md section 2).

Sources:
- zero: the default for plain text.
- data: a per-token `rewards` column (`rewards[k]` is earned when token `k` is produced) and a scalar `reward` column
  (earned by the row's last action); see `trl_qhead.data`.
- reward functions and reward models, with TRL's `GRPOTrainer` interface: a callable
  `f(prompts=..., completions=..., completion_ids=..., **dataset_columns)`, sync or async, returning one value per
  completion: a float (a sequence reward, earned by the last action), `None` (the function does not apply to that
  sample) or a list of floats aligned with `completion_ids` (per-token rewards: value `k` is earned by the action that
  produces completion token `k`). A `PreTrainedModel` (e.g. `AutoModelForSequenceClassification` with one label), or
  a name or path loaded as one, scores the decoded prompt + completion with its own tokenizer.
- reference log-probs (`use_lm_rewards`): `r_t += lm_reward_coef * log pi_ref(a_t | s_t)`. With a PEFT model the
  reference is the same network with its adapters disabled, so no second copy of the weights is held.

How they combine, per batch (`RewardComputer`):
1. sequence rewards: `R = nansum_i(w_i * R_i)` over the reward functions and models that return a number for the
   sample (`None` is left out of the sum, as in TRL) plus the data's `reward` (weight 1). A sample for which no source
   returns a number gets no sequence reward.
2. `R` is normalised (`reward_normalization`: `"batch"` uses the batch's mean and std, gathered over processes;
   `"running"` the running ones over training), then multiplied by `reward_scale`, then clipped to
   `[-reward_clip, reward_clip]`, and added to the reward of the row's last action.
3. per-token rewards (the data's `rewards` and `w_i` times each per-token function) are summed per action, multiplied
   by `reward_scale` and clipped, but never normalised: shifting every token's reward by a mean would pay or charge
   for length.
4. reference log-probs are added last, weighted by `lm_reward_coef`, untouched by scaling.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import copy
import math
import numbers
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
    nanstd,
    selective_log_softmax,
    shutdown_event_loop_in_daemon,
    start_event_loop_in_daemon,
)

from .config import REWARD_NORMALIZATIONS
from .losses import action_logprobs_and_values
from .mdp import sequence_rewards_to_actions, token_rewards_to_actions
from .modeling import AutoModelForCausalLMWithQHead, causal_lm_forward, plain_lm_head

RewardFunc = Union[str, PreTrainedModel, Callable[..., list]]  # noqa: UP007 (a runtime alias, as TRL spells it)


# ---- reference log-probs ------------------------------------------------------------------------------------------


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy to serve as the reference policy of a model without adapters."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


@torch.no_grad()
def reference_logprobs(
    reference: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    actions: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """`log pi_ref(a_t | s_t)` on the position grid, `[B, T]` fp32, without building a `[B, T, |V|]` buffer.

    Args:
        reference: a causal LM (`logits` in its output), or a PEFT model when called inside `as_reference()`.
        input_ids, attention_mask: the batch.
        actions: `[B, T]` next-token ids (`trl_qhead.mdp.next_tokens`).
        action_mask: `[B, T]`, where the log-probs are needed (0 elsewhere); default: every real token.
        chunk_size: positions per chunk of the LM head (see `trl_qhead.losses.action_logprobs_and_values`).
    """
    mask = (attention_mask if action_mask is None else action_mask).bool()
    if isinstance(reference, AutoModelForCausalLMWithQHead):  # the reference policy is its backbone
        reference = reference.pretrained_model
    lm_head = plain_lm_head(reference)
    hidden, outputs = causal_lm_forward(
        reference, input_ids, attention_mask, full_logits=lm_head is None, use_cache=False
    )
    if outputs.logits.shape[-2] == hidden.shape[-2]:  # the model gave full logits (no `logits_to_keep`, or T == 1)
        return torch.where(mask, selective_log_softmax(outputs.logits.float(), actions), 0.0)
    logprobs, _ = action_logprobs_and_values(hidden, lm_head, actions, mask, chunk_size=chunk_size)
    return logprobs


@contextlib.contextmanager
def as_reference(model: nn.Module):
    """Run a PEFT model as its frozen base: adapters disabled and dropout off (the reward must not be noisy).

    The training mode is restored afterwards, so the policy's own forward keeps its dropout.
    """
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            yield model
    finally:
        model.train(was_training)


def action_rewards(batch: dict[str, Any], action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The data's rewards on the action grid, zeros when the batch carries none.

    `r_t = rewards[t + 1]`, plus the scalar `reward` of each row on its last action (needs `action_mask`; without it,
    the last real token is taken to be the last target).
    """
    input_ids = batch["input_ids"]
    rewards = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    if "rewards" in batch:
        rewards = rewards + token_rewards_to_actions(batch["rewards"])
    if "reward" in batch:
        if action_mask is None:
            action_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            action_mask[:, :-1] = batch["attention_mask"][:, :-1].bool() & batch["attention_mask"][:, 1:].bool()
        rewards = rewards + sequence_rewards_to_actions(batch["reward"], action_mask)
    return rewards


# ---- pure math ----------------------------------------------------------------------------------------------------


def combine_sequence_rewards(per_source: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`R_b = nansum_i(w_i * R_bi)`: a NaN (`None`) source is left out; NaN where every source is NaN.

    Args:
        per_source: `[B, F]`, NaN where source `i` does not apply to sample `b`.
        weights: `[F]`.
    """
    total = (per_source * weights.to(per_source)).nansum(dim=1)
    return total.masked_fill(torch.isnan(per_source).all(dim=1), math.nan)


def normalize_rewards(rewards: torch.Tensor, mean: torch.Tensor | float, std: torch.Tensor | float, eps: float = 1e-4):
    """`(R - mean) / (std + eps)`; NaN stays NaN."""
    return (rewards - mean) / (std + eps)


def scale_and_clip(rewards: torch.Tensor, scale: float = 1.0, clip: float | None = None) -> torch.Tensor:
    """`clip(scale * R, -clip, clip)`; no clipping when `clip` is `None`."""
    rewards = rewards * scale
    return rewards if clip is None else rewards.clamp(-clip, clip)


def batch_moments(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (Bessel-corrected) std of the non-NaN entries; std is 0 with fewer than two of them."""
    return torch.nanmean(values), torch.nan_to_num(nanstd(values), nan=0.0)


class RunningMoments:
    """Running mean and std of every value seen, merged batch by batch (Chan et al.), in float64.

    Example:
    ```python
    >>> moments = RunningMoments()
    >>> moments.update(torch.tensor([1.0, 2.0])); moments.update(torch.tensor([3.0]))
    >>> moments.mean, round(moments.std, 4)
    (2.0, 1.0)
    ```
    """

    def __init__(self):
        self.count, self.mean, self._m2 = 0, 0.0, 0.0

    @property
    def std(self) -> float:
        # With fewer than two values there is no spread to divide by: 1 leaves the centred rewards as they are.
        return math.sqrt(self._m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, values: torch.Tensor) -> None:
        """Merge the non-NaN entries of `values` into the running moments."""
        values = values[~torch.isnan(values)].double()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self._m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self._m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self._m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def scatter_completion_rewards(
    values: Sequence[torch.Tensor | None], attention_mask: torch.Tensor, prompt_length: torch.Tensor
) -> torch.Tensor:
    """Per-token rewards of each row's completion onto its token positions, `[B, T]` (token-aligned, not yet shifted
    onto actions): value `k` of row `b` goes to the `prompt_length[b] + k`-th real token of the row. Padding on either
    side works: real tokens are found through `attention_mask`.

    Args:
        values: one `[n_b]` tensor (or `None`: nothing) per row, `n_b` the row's completion length.
        attention_mask: `[B, T]`.
        prompt_length: `[B]` prompt tokens per row.
    """
    rewards = torch.zeros(attention_mask.shape, dtype=torch.float32, device=attention_mask.device)
    for row, row_values in enumerate(values):
        if row_values is None or row_values.numel() == 0:
            continue
        positions = attention_mask[row].nonzero().squeeze(-1)
        start = int(prompt_length[row])
        rewards[row, positions[start : start + row_values.numel()]] = row_values.to(rewards)
    return rewards


# ---- reward functions and models ----------------------------------------------------------------------------------


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


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


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
                (`trainer_state`, `log_metric`).
        """
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
        return FunctionRewards(sequence=sequence, per_token=per_token)

    @torch.no_grad()
    def _score_with_model(self, i: int, prompts: list, completions: list) -> torch.Tensor:
        model, tokenizer = self.funcs[i], self.processing_classes[i]
        if _is_messages(prompts[0]):
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
        return model(**inputs).logits[:, 0].float().cpu()

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
                sequence[b, i] = float(value)
                continue
            kinds.add("per-token")
            try:
                values = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
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
            per_token[i][b] = values
        if len(kinds) > 1:
            raise ValueError(
                f"The reward function '{name}' returned floats for some samples and lists for others: return one "
                "kind (sequence rewards, or per-token lists), with None where it does not apply."
            )


def _unique(names: list[str]) -> list[str]:
    """Make repeated names distinct (`f`, `f_1`, ...) so that logs and columns keep every source apart."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        unique.append(name if count == 0 else f"{name}_{count}")
    return unique


# ---- the trainer's per-batch pipeline -----------------------------------------------------------------------------


def _identity(values: torch.Tensor) -> torch.Tensor:
    return values


class RewardComputer:
    """All reward sources of a training batch, combined on the action grid (see the module docstring for the order).

    Args:
        tokenizer: the policy's tokenizer (decodes completions for reward functions).
        reward_functions: the reward functions and models, or `None`.
        lm_reward_coef: weight of the reference log-prob reward.
        reward_scale, reward_clip: multiply, then clip to `[-reward_clip, reward_clip]`, the task rewards.
        reward_normalization: `None`, `"batch"` or `"running"` normalisation of the sequence rewards.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        reward_functions: RewardFunctions | None = None,
        *,
        lm_reward_coef: float = 1.0,
        reward_scale: float = 1.0,
        reward_clip: float | None = None,
        reward_normalization: str | None = None,
    ):
        if reward_normalization not in REWARD_NORMALIZATIONS:
            raise ValueError(
                f"`reward_normalization` must be one of {REWARD_NORMALIZATIONS}, got {reward_normalization!r}."
            )
        self.tokenizer = tokenizer
        self.functions = reward_functions
        self.lm_reward_coef = lm_reward_coef
        self.reward_scale = reward_scale
        self.reward_clip = reward_clip
        self.normalization = reward_normalization
        self.moments = RunningMoments()

    def __call__(
        self,
        batch: dict[str, Any],
        action_mask: torch.Tensor,
        *,
        lm_logprobs: torch.Tensor | None = None,
        training: bool = True,
        gather: Callable[[torch.Tensor], torch.Tensor] = _identity,
        trainer_state=None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """`(rewards [B, T] on the action grid, metrics)`.

        Args:
            batch: a collated batch (`DataCollatorForQHead`).
            action_mask: `[B, T]`, where a position holds an action.
            lm_logprobs: `[B, T]` `log pi_ref(a_t|s_t)` when `use_lm_rewards` is on.
            training: update the running moments (only in training).
            gather: `[B] -> [B_all]` gathers per-row values over processes (NaN-padded), for normalisation and logs.
            trainer_state: passed to reward functions as `trainer_state`, as TRL does.
        """
        device = action_mask.device
        mask = action_mask.float()
        metrics: dict[str, float] = {}
        sources, weights = [], []
        token_rewards = torch.zeros(action_mask.shape, dtype=torch.float32, device=device)

        if "rewards" in batch or "reward" in batch:
            data_parts = []  # per row: the per-token sum, and the sequence reward (NaN where the row has none)
            if "rewards" in batch:
                token_rewards += token_rewards_to_actions(batch["rewards"]) * mask
                data_parts.append((token_rewards * mask).sum(1))
            if "reward" in batch:
                sources.append(batch["reward"].float().to(device))
                weights.append(1.0)
                data_parts.append(sources[-1])
            data_rows = combine_sequence_rewards(torch.stack(data_parts, 1), torch.ones(len(data_parts)))
            self._log(metrics, "rewards/data/mean", "rewards/data/std", data_rows, gather)

        if self.functions is not None:
            scored, extra_metrics = self._score(batch, trainer_state)
            for i in range(len(self.functions)):
                weight = float(self.functions.weights[i])
                sources.append(scored.sequence[:, i].to(device))
                weights.append(weight)
                if any(values is not None for values in scored.per_token[i]):
                    values = scatter_completion_rewards(
                        scored.per_token[i], batch["attention_mask"], self._prompt_length(batch)
                    )
                    token_rewards += weight * token_rewards_to_actions(values) * mask
            totals = scored.totals().to(device)
            for i, name in enumerate(self.functions.names):
                self._log(metrics, f"rewards/{name}/mean", f"rewards/{name}/std", totals[:, i], gather)
            for name, values in extra_metrics.items():
                metrics[name] = sum(values) / len(values)

        rewards = torch.zeros(action_mask.shape, dtype=torch.float32, device=device)
        raw_total = (token_rewards * mask).sum(1)
        if sources:
            sequence = combine_sequence_rewards(torch.stack(sources, dim=1), torch.tensor(weights, device=device))
            raw_total = raw_total + torch.nan_to_num(sequence, nan=0.0)
            sequence = scale_and_clip(self._normalize(sequence, training, gather), self.reward_scale, self.reward_clip)
            rewards += sequence_rewards_to_actions(sequence, action_mask)
        if sources or self.functions is not None or "rewards" in batch:
            self._log(metrics, "reward", "reward_std", raw_total, gather)
        rewards += scale_and_clip(token_rewards, self.reward_scale, self.reward_clip) * mask

        if lm_logprobs is not None:
            lm = lm_logprobs.float() * mask
            self._log(metrics, "rewards/lm/mean", "rewards/lm/std", lm.sum(1), gather)
            rewards += self.lm_reward_coef * lm
        return rewards, metrics

    def _normalize(self, sequence: torch.Tensor, training: bool, gather) -> torch.Tensor:
        if self.normalization is None:
            return sequence
        values = gather(sequence.detach())
        if self.normalization == "batch":
            mean, std = batch_moments(values)
        else:
            if training:
                self.moments.update(values)
            mean, std = self.moments.mean, self.moments.std
        return normalize_rewards(sequence, mean, std)

    @staticmethod
    def _prompt_length(batch) -> torch.Tensor:
        if "prompt_length" in batch:
            return batch["prompt_length"]
        return torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)

    def _score(self, batch, trainer_state) -> tuple[FunctionRewards, dict[str, list[float]]]:
        """Rebuild prompts and completions from the batch, as GRPO hands them to reward functions, and score them."""
        columns = dict(batch.get("reward_inputs", {}))
        given_prompts = columns.pop("prompt", None)
        prompt_length = self._prompt_length(batch).tolist()
        prompt_ids, completion_ids = [], []
        for row, (ids, attention) in enumerate(zip(batch["input_ids"], batch["attention_mask"], strict=True)):
            real = ids[attention.bool()].tolist()
            prompt_ids.append(real[: prompt_length[row]])
            completion_ids.append(real[prompt_length[row] :])
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = []
        for row, ids in enumerate(prompt_ids):
            given = None if given_prompts is None else given_prompts[row]
            prompts.append(given if given is not None else self.tokenizer.decode(ids, skip_special_tokens=True))
        completions = [
            [{"role": "assistant", "content": text}] if _is_messages(prompt) else text
            for prompt, text in zip(prompts, texts, strict=True)
        ]
        extra_metrics: dict[str, list[float]] = {}

        def log_metric(name: str, value: float) -> None:
            extra_metrics.setdefault(name, []).append(float(value))

        scored = self.functions.score(
            prompts,
            completions,
            completion_ids,
            trainer_state=trainer_state,
            log_metric=log_metric,
            **columns,
        )
        return scored, extra_metrics

    @staticmethod
    def _log(metrics: dict[str, float], mean_key: str, std_key: str, rows: torch.Tensor, gather) -> None:
        """Mean and std of `rows` over every process, leaving out the rows where the source did not apply (NaN), as
        TRL logs `rewards/<name>/mean` and `/std`. Nothing when the source applied to no row."""
        values = gather(rows.detach().float())
        if torch.isnan(values).all():
            return
        metrics[mean_key] = torch.nanmean(values).item()
        std = nanstd(values).item()
        if not math.isnan(std):
            metrics[std_key] = std
