"""The offline-RL loop in rounds: sample from the current Q-tilted policy, label, refit the Q head on the union of the
rounds' data (on-policy aggregation, as Q# and DAgger do), and again (docs/labels.md, "Rounds")."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, concatenate_datasets

from .checks import check_beta
from .config import QHeadConfig
from .decoding import QTiltLogitsProcessor
from .labels import LabelSource
from .rollouts import generate_and_score
from .trainer import QHeadTrainer

__all__ = ["OfflineRLRounds", "offline_rl_rounds"]

# Seeds of successive rounds stay this far apart, so that no two rounds sample a prompt from the same seed.
ROUND_SEED_STRIDE = 1_000_003


@dataclass
class OfflineRLRounds:
    """What `offline_rl_rounds` did.

    Attributes:
        datasets: per round, the scored (and labelled) samples it drew, with a `round` column.
        train_dataset: what the last round trained on (the union of every round's samples with `aggregate=True`).
        train_sizes: per round, the rows it trained on.
        mean_rewards: per round, the mean weighted sequence reward of its samples (`sequence_reward` where prefix
            shaping moved it there; None where no row has one): how the sampling policy improves.
    """

    datasets: list[Dataset]
    train_dataset: Dataset
    train_sizes: list[int]
    mean_rewards: list[float | None]


def _mean_reward(data: Dataset) -> float | None:
    column = "sequence_reward" if "sequence_reward" in data.column_names else "reward"
    values = [r for r in data[column] if r is not None] if column in data.column_names else []
    return math.fsum(values) / len(values) if values else None


def offline_rl_rounds(
    model,
    tokenizer,
    prompts: Dataset | Sequence[dict[str, Any]],
    reward_funcs,
    config: QHeadConfig,
    *,
    beta: float,
    rounds: int = 1,
    labels: LabelSource | Sequence[LabelSource] | None = None,
    aggregate: bool = True,
    sampling: dict[str, Any] | None = None,
    tilt_kwargs: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> OfflineRLRounds:
    """`rounds` rounds of the offline-RL loop on one `AutoModelForCausalLMWithQHead`, trained in place.

    Round `r` samples `prompts` with `generate_and_score` (scored by `reward_funcs`, labelled by `labels`): round 0
    from the base policy, round `r > 0` from the policy tilted by the Q head that round `r - 1` trained
    (`QTiltLogitsProcessor(model, beta)`, taken off the model after sampling). It then trains `QHeadTrainer` on the
    union of rounds `0 .. r` (`aggregate=True`: Q#'s and DAgger's on-policy aggregation, so the head learns the
    states the tilted policy visits without forgetting the base policy's) or on round `r` alone (`aggregate=False`:
    Controlled Decoding's and Value-Augmented Sampling's loop), continuing from round `r - 1`'s weights.

    Args:
        model: an `AutoModelForCausalLMWithQHead`.
        tokenizer: its tokenizer.
        prompts: a dataset (or list of rows) with a `prompt` column, as `generate_and_score` takes.
        reward_funcs: as `generate_and_score` takes them.
        config: the `QHeadConfig` of every round's training; round `r` writes under `output_dir/round-<r>`.
        beta: the tilt's temperature in rounds `r > 0` (the `beta` you will decode with).
        rounds: how many rounds (>= 1); `rounds=1` is base sampling and one fit.
        labels: a label source, or a list, for `generate_and_score(labels=...)`; None: the sequence rewards alone.
        aggregate: train on the union of the rounds (default) or on the last round's samples alone.
        sampling: more `generate_and_score` arguments (`num_generations`, `max_new_tokens`, `batch_size`,
            `generation_kwargs`, `truncated_completions`, `reward_weights`, `seed`, ...). With a `seed`, round `r`
            uses `seed + r * ROUND_SEED_STRIDE`, so rounds draw from different random streams.
        tilt_kwargs: more `QTiltLogitsProcessor` arguments (`top_k`, `record_kl`).
        trainer_kwargs: more `QHeadTrainer` arguments (`reward_funcs`, `callbacks`, ...).

    Returns:
        An `OfflineRLRounds`.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"`rounds` must be a positive integer, got {rounds!r}.")
    beta = check_beta(beta)
    if not isinstance(config, QHeadConfig):
        raise TypeError(f"`config` must be a QHeadConfig, got {type(config).__name__}.")
    sampling = dict(sampling or {})
    for name in ("logits_processor", "labels", "reward_funcs"):
        if name in sampling:
            raise ValueError(f"`sampling` cannot set `{name}`: `offline_rl_rounds` sets it (see its arguments).")
    seed = sampling.pop("seed", None)
    datasets, train_sizes, mean_rewards = [], [], []
    train_dataset = None
    for r in range(rounds):
        processor = QTiltLogitsProcessor(model, beta, **(tilt_kwargs or {})) if r > 0 else None
        try:
            data = generate_and_score(
                model,
                tokenizer,
                prompts,
                reward_funcs,
                logits_processor=[processor] if processor is not None else None,
                labels=labels,
                seed=None if seed is None else seed + r * ROUND_SEED_STRIDE,
                **sampling,
            )
        finally:
            if processor is not None:
                processor.remove()  # the hook must not tilt the training forwards
        data = data.add_column("round", [r] * len(data))
        datasets.append(data)
        mean_rewards.append(_mean_reward(data))
        train_dataset = concatenate_datasets(datasets) if aggregate else data
        train_sizes.append(len(train_dataset))
        round_config = dataclasses.replace(config, output_dir=os.path.join(config.output_dir, f"round-{r}"))
        QHeadTrainer(
            model, round_config, train_dataset=train_dataset, processing_class=tokenizer, **(trainer_kwargs or {})
        ).train()
    return OfflineRLRounds(datasets, train_dataset, train_sizes, mean_rewards)
