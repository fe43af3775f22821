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
2. `R` is normalised (`reward_normalization`: `"batch"` uses the mean and std of the optimizer step's sequence rewards,
   every micro-batch of a gradient accumulation cycle on every process (`RewardComputer.prepare_step`); `"running"` the
   running ones over training, updated once per step), then multiplied by `reward_scale`, then clipped to
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
from .mdp import (
    StepGrid,
    episode_ids_from_positions,
    fold_onto_actions,
    sequence_rewards_to_actions,
    token_rewards_to_actions,
)
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


# Keys `RewardComputer.prepare_step` adds to each micro-batch of an optimizer step: the reward functions' scores (so that
# they are called once per sample) and the `[2]` mean and std the step's sequence rewards are normalised with.
STEP_SCORES_KEY = "step_reward_scores"
STEP_MOMENTS_KEY = "step_reward_moments"


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

    def prepare_step(
        self,
        batches: list[dict[str, Any]],
        *,
        gather: Callable[[torch.Tensor], torch.Tensor] = _identity,
        trainer_state=None,
    ) -> None:
        """Fix the normalisation statistics of one optimizer step, before its micro-batches are trained on.

        `reward_normalization` normalises the sequence rewards of the whole step: every micro-batch of a gradient
        accumulation cycle, on every process. Called by `QHeadTrainer.get_batch_samples` with the cycle's
        micro-batches: each is scored once here (the scores are kept in the batch and reused by `__call__`), the raw
        sequence rewards of all of them are gathered in one collective, `"running"` moments are updated once with
        them, and each batch gets the `[2]` mean and std to normalise with (`STEP_MOMENTS_KEY`). So one batch of 4 rows
        and 2 micro-batches of 2 with accumulation train on the same numbers. Does nothing without normalisation.

        Args:
            batches: the step's collated micro-batches (modified in place).
            gather: `[N] -> [N_all]` gathers per-row values over processes (NaN-padded).
            trainer_state: passed to reward functions as `trainer_state`.
        """
        if self.normalization is None or not batches:
            return
        raw = []
        for batch in batches:
            if self.functions is not None:
                batch[STEP_SCORES_KEY] = self._score(batch, trainer_state)
            device = batch["input_ids"].device
            scored = batch[STEP_SCORES_KEY][0] if STEP_SCORES_KEY in batch else None
            sequence = self._raw_sequence(batch, device, scored)
            raw.append(
                torch.full((len(batch["input_ids"]),), math.nan, device=device) if sequence is None else sequence
            )
        values = gather(torch.cat(raw).detach())
        if self.normalization == "batch":
            mean, std = batch_moments(values)
        else:
            self.moments.update(values)
            mean, std = self.moments.mean, self.moments.std
        for batch in batches:
            device = batch["input_ids"].device
            batch[STEP_MOMENTS_KEY] = torch.tensor([float(mean), float(std)], dtype=torch.float32, device=device)

    def _raw_sequence(self, batch: dict[str, Any], device, scored: FunctionRewards | None) -> torch.Tensor | None:
        """`[B]` the weighted sequence rewards of the data's `reward` and the reward functions' `scored` (`nansum`, NaN
        where no source applied), before normalisation; `None` when the batch has no sequence-reward source."""
        sources, weights = [], []
        if "reward" in batch:
            sources.append(batch["reward"].float().to(device))
            weights.append(1.0)
        if scored is not None:
            for i in range(len(self.functions)):
                sources.append(scored.sequence[:, i].to(device))
                weights.append(float(self.functions.weights[i]))
        if not sources:
            return None
        return combine_sequence_rewards(torch.stack(sources, dim=1), torch.tensor(weights, device=device))

    def __call__(
        self,
        batch: dict[str, Any],
        action_mask: torch.Tensor,
        *,
        lm_logprobs: torch.Tensor | None = None,
        training: bool = True,
        gather: Callable[[torch.Tensor], torch.Tensor] = _identity,
        trainer_state=None,
        grid: StepGrid | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """`(rewards [B, T] on the action grid, metrics)`.

        Args:
            batch: a collated batch (`DataCollatorForQHead`).
            action_mask: `[B, T]`, where a position holds an action.
            lm_logprobs: `[B, T]` `log pi_ref(a_t|s_t)` when `use_lm_rewards` is on.
            training: update the running moments (only in training, and only for a batch `prepare_step` did not see).
            grid: the batch's `mdp.step_grid` when the caller has it (its packed episodes are not computed again).
            gather: `[B] -> [B_all]` gathers per-row values over processes (NaN-padded), for normalisation and logs.
            trainer_state: passed to reward functions as `trainer_state`, as TRL does.

        A batch that went through `prepare_step` is normalised with its step's statistics; any other (evaluation, or a
        direct call) with those of the batch itself, gathered over processes (`"batch"`), or the running ones.
        """
        device = action_mask.device
        mask = action_mask.float()
        metrics: dict[str, float] = {}
        token_rewards = torch.zeros(action_mask.shape, dtype=torch.float32, device=device)
        positions = batch.get("position_ids")  # packed rows: a reward is never moved into another document
        if grid is not None:
            episodes = grid.episodes
        else:
            episodes = None if positions is None else episode_ids_from_positions(positions.to(device))

        if "rewards" in batch or "reward" in batch:
            data_parts = []  # per row: the per-token sum, and the sequence reward (NaN where the row has none)
            if "rewards" in batch:
                token_rewards += fold_onto_actions(token_rewards_to_actions(batch["rewards"]), action_mask, episodes)
                data_parts.append((token_rewards * mask).sum(1))
            if "reward" in batch:
                data_parts.append(batch["reward"].float().to(device))
            data_rows = combine_sequence_rewards(torch.stack(data_parts, 1), torch.ones(len(data_parts)))
            self._log(metrics, "rewards/data/mean", "rewards/data/std", data_rows, gather)

        if self.functions is not None:
            scored, extra_metrics = self._scores(batch, trainer_state)
            per_token = scored.weighted_per_token(self.functions.weights)
            if any(values is not None for values in per_token):
                values = scatter_completion_rewards(per_token, batch["attention_mask"], self._prompt_length(batch))
                token_rewards += fold_onto_actions(token_rewards_to_actions(values), action_mask, episodes)
            totals = scored.totals().to(device)
            for i, name in enumerate(self.functions.names):
                self._log(metrics, f"rewards/{name}/mean", f"rewards/{name}/std", totals[:, i], gather)
            for name, values in extra_metrics.items():
                metrics[name] = sum(values) / len(values)

        rewards = torch.zeros(action_mask.shape, dtype=torch.float32, device=device)
        raw_total = (token_rewards * mask).sum(1)
        sequence = self._raw_sequence(batch, device, scored if self.functions is not None else None)
        if sequence is not None:
            raw_total = raw_total + torch.nan_to_num(sequence, nan=0.0)
            sequence = self._normalize(sequence, training, gather, batch.get(STEP_MOMENTS_KEY))
            sequence = scale_and_clip(sequence, self.reward_scale, self.reward_clip)
            rewards += sequence_rewards_to_actions(sequence, action_mask)
        if sequence is not None or self.functions is not None or "rewards" in batch:
            self._log(metrics, "reward", "reward_std", raw_total, gather)
        rewards += scale_and_clip(token_rewards, self.reward_scale, self.reward_clip) * mask

        if lm_logprobs is not None:
            lm = lm_logprobs.float() * mask
            self._log(metrics, "rewards/lm/mean", "rewards/lm/std", lm.sum(1), gather)
            rewards += self.lm_reward_coef * lm
        return rewards, metrics

    def _normalize(self, sequence: torch.Tensor, training: bool, gather, step_moments=None) -> torch.Tensor:
        if self.normalization is None:
            return sequence
        if step_moments is not None:  # the optimizer step's statistics (`prepare_step`)
            return normalize_rewards(sequence, step_moments[0], step_moments[1])
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

    def _scores(self, batch, trainer_state) -> tuple[FunctionRewards, dict[str, list[float]]]:
        """The reward functions' scores of a batch: those `prepare_step` kept in it (each sample is scored once), else
        scored now."""
        if STEP_SCORES_KEY in batch:
            return batch[STEP_SCORES_KEY]
        return self._score(batch, trainer_state)

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
