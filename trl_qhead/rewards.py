"""Reward sources, summed into `r_t` on the action grid (docs/DESIGN.md section 2).

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
3. per-token rewards (the data's `rewards` and `w_i` times each per-token function) are summed per action (a reward on
   a token no action produces, between the turns of a multi-turn row, goes to the last action before it:
   `mdp.fold_onto_actions`), multiplied by `reward_scale` and clipped, but never normalised: shifting every token's
   reward by a mean would pay or charge for length.
4. reference log-probs are added last, weighted by `lm_reward_coef`, untouched by scaling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from trl.trainer.utils import nanstd

from .chat import completions_like, is_messages
from .config import REWARD_NORMALIZATIONS
from .mdp import fold_onto_actions, sequence_rewards_to_actions, token_rewards_to_actions
from .reference import as_reference, frozen_copy, reference_logprobs
from .reward_functions import (
    FunctionRewards,
    RewardFunc,
    RewardFunctions,
    combine_sequence_rewards,
    texts_for_rewards,
)

# Re-exported: they lived here before `trl_qhead.reference` and `trl_qhead.reward_functions` split off.
__all__ = [
    "FunctionRewards",
    "RewardComputer",
    "RewardFunc",
    "RewardFunctions",
    "RunningMoments",
    "as_reference",
    "batch_moments",
    "combine_sequence_rewards",
    "frozen_copy",
    "normalize_rewards",
    "reference_logprobs",
    "scale_and_clip",
    "scatter_completion_rewards",
]


# ---- pure math ----------------------------------------------------------------------------------------------------


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

    @classmethod
    def from_config(cls, tokenizer: PreTrainedTokenizerBase, reward_functions: RewardFunctions | None, args):
        """The reward pipeline a `QHeadConfig` describes (`lm_reward_coef`, `reward_scale`, `reward_clip`,
        `reward_normalization`)."""
        fields = ("lm_reward_coef", "reward_scale", "reward_clip", "reward_normalization")  # same names in both
        return cls(tokenizer, reward_functions, **{name: getattr(args, name) for name in fields})

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
                token_rewards += fold_onto_actions(token_rewards_to_actions(batch["rewards"]), action_mask)
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
                sources.append(scored.sequence[:, i].to(device))
                weights.append(float(self.functions.weights[i]))
            per_token = scored.weighted_per_token(self.functions.weights)
            if any(values is not None for values in per_token):
                values = scatter_completion_rewards(per_token, batch["attention_mask"], self._prompt_length(batch))
                token_rewards += fold_onto_actions(token_rewards_to_actions(values), action_mask)
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
        """Rebuild prompts and completions from the batch's tokens, as GRPO hands them to reward functions, and score
        them. The texts are those of the trained tokens (`texts_for_rewards`); a conversational prompt (messages, kept
        by the data preparation) is passed as it is."""
        columns = dict(batch.get("reward_inputs", {}))
        given_prompts = columns.pop("prompt", None)
        prompt_length = self._prompt_length(batch).tolist()
        prompt_ids, completion_ids = [], []
        for row, (ids, attention) in enumerate(zip(batch["input_ids"], batch["attention_mask"], strict=True)):
            real = ids[attention.bool()].tolist()
            prompt_ids.append(real[: prompt_length[row]])
            completion_ids.append(real[prompt_length[row] :])
        # The texts of exactly the trained tokens: a prompt whose end merged with the completion's start when the row
        # was tokenised is scored as the tokens read, not as the raw prompt (which would score text twice or not at all).
        prompt_texts, texts = texts_for_rewards(self.tokenizer, prompt_ids, completion_ids)
        prompts = []
        for row, text in enumerate(prompt_texts):
            given = None if given_prompts is None else given_prompts[row]
            prompts.append(given if is_messages(given) else text)  # a conversation stays a list of messages
        completions = completions_like(prompts, texts)
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
