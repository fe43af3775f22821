"""Label sources: where the extra training labels of `generate_and_score` come from, one class each (docs/labels.md).

A label source is a frozen dataclass holding its options, checked at construction (a ValueError naming the field).
`generate_and_score(..., labels=source)` (or a list of sources) samples and scores a batch of completions, then calls
`source.label(batch)` with a `LabelBatch`; it returns, per completion, the columns it writes (token-aligned with
`input_ids`, as the `rewards` column is: entry `i` concerns the action that produces token `i`), and its `LabelCost`.
The sources of a batch share one memoised `PrefixScorer`, so a text that two of them need is scored once.

| class | columns | the label of a state `s_j` (completion prefix `c_{<j}`) |
| --- | --- | --- |
| `PrefixShaping` | `rewards` (`reward` -> `sequence_reward`) | the sampled token's effect `R(c_{<=j}) - R(c_{<j})` |
| `CandidateLabels` | `candidate_ids`, `candidate_rewards`, `candidate_sampled_reward` | `r'(s_j, a)` for the top-k `a` |
| `TwoStepLabels` | the candidate columns | `r'(s_j, a) + V1(s_j + a)`, the soft value one step ahead |
| `FutureValueLabels` | the candidate columns | `beta log mean_i exp(G_i(s_j, a) / beta)` over sampled continuations |

`R` is the weighted sum of the reward functions on `prompt + decode(tokens)`, `r'(s, a) = R(s + a) - R(s)` an effect.
`QHeadTrainer` regresses `Q(s_j, a)` on `G_j + label(a) - label(c_j)` (`soft.candidate_targets`; `G_j = 0` with
`QHeadConfig(q_labels="effects")`), so every candidate source is a different estimate of `Q(s_j, a) - R(c_{<j})`.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from .branches import check_branch_support
from .candidates import LabelCost, PrefixScorer, check_candidate_args, label_completions, top_k_next_tokens
from .checks import check_beta
from .continuations import sample_continuations

__all__ = [
    "CandidateLabels",
    "FutureValueLabels",
    "LabelBatch",
    "LabelSource",
    "PrefixShaping",
    "TwoStepLabels",
    "check_fields",
    "check_fits_vocabulary",
    "check_label_sources",
    "label_batch",
    "labels_from_candidate_keywords",
    "labels_summary",
]

CANDIDATE_COLUMNS = ("candidate_ids", "candidate_rewards", "candidate_sampled_reward")


@dataclass(frozen=True)
class LabelBatch:
    """A batch of sampled, scored completions to label: what every `LabelSource.label` reads.

    Attributes:
        model: the model that sampled them (for an `AutoModelForCausalLMWithQHead`, its LM head is the base policy
            whose top-k tokens and continuations the sources read, whatever tilt sampled the completions).
        tokenizer: decodes token ids into the texts the reward functions score.
        scorer: the batch's `PrefixScorer` (reward functions, memo), its groups the prompt examples; shared by the
            sources of the batch: each `request`s texts, `flush`es, then reads `score`s. Its cost is counted once, by
            `label_batch`.
        prompt_ids, completion_ids: per completion, the token ids of its prompt and of itself.
        groups: per completion, the index of its prompt example (the scorer's group).
        group_prompts, group_columns: per prompt example, the prompt and its other dataset columns.
        sequence_rewards: per completion, the weighted sequence reward (`None` where no function returned one).
        pad_token_id: pads batched forwards.
        horizon: the episode's last step is `horizon - 1` (completions cut at `max_new_tokens` end there,
            `truncated_completions="terminal"`); `None`: cut episodes go on.
        stop_ids: ids that end an episode (nothing follows them).
    """

    model: Any
    tokenizer: Any
    scorer: PrefixScorer
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    groups: list[int]
    group_prompts: list
    group_columns: list[dict[str, Any]]
    sequence_rewards: list[float | None]
    pad_token_id: int
    horizon: int | None
    stop_ids: frozenset[int]


class LabelSource(abc.ABC):
    """One source of training labels for `generate_and_score(labels=...)`. Subclasses are frozen dataclasses whose
    `__post_init__` checks their options, list the columns they write in `columns`, and implement `label`.

    Adding a source: subclass, write `label` (request texts from `batch.scorer`, `flush`, read the scores, return one
    dict of token-aligned columns per completion and the cost of anything the scorer does not count), and `check` for
    what can only be checked against the model (before anything is sampled). docs/labels.md walks through one.
    """

    columns: ClassVar[tuple[str, ...]] = ()

    def check(self, model, horizon: int | None) -> None:  # noqa: B027 (a default that checks nothing)
        """ValueErrors for options the model or the episode's horizon rule out, raised before sampling."""

    @abc.abstractmethod
    def label(self, batch: LabelBatch) -> tuple[list[dict[str, Any]], LabelCost]:
        """Per completion of `batch`, the columns this source writes; and the cost outside `batch.scorer`'s own."""

    def summary(self) -> dict[str, Any]:
        """The options that define the labels (for the labelling-cost record): every field but the batch sizes."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.endswith("batch_size")}


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def check_fields(source: LabelSource, positive: tuple[str, ...] = (), beta: str | None = None) -> None:
    """A source's `__post_init__` checks: the `positive` fields positive integers (or None where the field's default
    is None), the `beta` field a finite number > 0 (stored as a float); ValueErrors name `Class.field`."""
    name = type(source).__name__
    defaults = {f.name: f.default for f in fields(source)}
    for field_name in positive:
        value = getattr(source, field_name)
        if not (value is None and defaults[field_name] is None):
            _check_positive_int(value, f"{name}.{field_name}")
    if beta is not None:
        object.__setattr__(source, beta, check_beta(getattr(source, beta), name=f"{name}.{beta}"))


def vocabulary_size(model) -> int | None:
    """The number of rows of the model's output embeddings (the LM head), or None where it has none to read."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(getattr(head, "weight", None), "shape", [None])[0]


def check_fits_vocabulary(model, k: int | None, name: str) -> None:
    """A ValueError (naming `name`) when `k` top tokens are asked of a model with fewer tokens in its vocabulary."""
    size = vocabulary_size(model)
    if size is not None and k is not None and k > size:
        raise ValueError(f"`{name}` (k={k}) is larger than the model's vocabulary ({size} tokens).")


def _label_completions(batch: LabelBatch, **options):
    """`candidates.label_completions` on the batch, with its shared scorer (`options`: `k`, `stride`,
    `prefix_shaping`, `lookahead`, `beta`)."""
    return label_completions(
        batch.model,
        batch.tokenizer,
        batch.scorer.functions,
        batch.prompt_ids,
        batch.completion_ids,
        batch.groups,
        batch.group_prompts,
        batch.group_columns,
        pad_token_id=batch.pad_token_id,
        horizon=batch.horizon,
        stop_ids=batch.stop_ids,
        scorer=batch.scorer,
        **options,
    )


@dataclass(frozen=True)
class PrefixShaping(LabelSource):
    """Potential-based shaping: every prefix of each completion scored, the sampled tokens' effects as per-token
    `rewards` (`R(c_{<=i}) - R(c_{<i})` on completion token `i`, 0 on the prompt; `soft.prefix_shaped_rewards`) in
    place of the sequence reward, which moves to `sequence_reward` (`reward` becomes `None`). They telescope to
    `R(completion) - R(empty completion)`: the same optimal tilt, lower-variance targets. For rewards that can score
    prefixes. (Deprecated keyword: `prefix_shaping=True`.)

    Args:
        batch_size: texts per reward call.
    """

    batch_size: int = 256
    columns: ClassVar[tuple[str, ...]] = ("rewards", "reward", "sequence_reward")

    def __post_init__(self):
        check_fields(self, ("batch_size",))

    def label(self, batch: LabelBatch) -> tuple[list[dict[str, Any]], LabelCost]:
        columns, cost = _label_completions(batch, k=None, stride=1, prefix_shaping=True)
        # A prefix's score sums per-token outputs too: the shaped rewards replace every reward of the functions.
        out = [
            {"sequence_reward": reward, "reward": None, "rewards": row["prefix_rewards"]}
            for row, reward in zip(columns, batch.sequence_rewards, strict=True)
        ]
        return out, cost

    def summary(self) -> dict[str, Any]:
        return {"prefix_shaping": True}


@dataclass(frozen=True)
class CandidateLabels(LabelSource):
    """One-step candidate labels: at every `stride`-th state `s_j` of each completion, the base model's `k` most
    likely next tokens `a`, their effects `r'(s_j, a) = R(c_{<j} + [a]) - R(c_{<j})` and the sampled token's own
    effect (`candidates.label_completions`). `QHeadTrainer` turns them into `k` extra Q targets per labelled state.
    (Deprecated keywords: `candidate_rewards=k`, `candidate_stride`, `candidate_batch_size`.)

    Args:
        k: candidates per labelled state.
        stride: label states `0, stride, 2 stride, ...` of each completion (1: every state).
        batch_size: texts per reward call.
    """

    k: int
    stride: int = 1
    batch_size: int = 256
    columns: ClassVar[tuple[str, ...]] = CANDIDATE_COLUMNS

    def __post_init__(self):
        check_fields(self, ("k", "stride", "batch_size"))

    def check(self, model, horizon: int | None) -> None:
        check_fits_vocabulary(model, self.k, "CandidateLabels.k")

    def label(self, batch: LabelBatch) -> tuple[list[dict[str, Any]], LabelCost]:
        return _label_completions(batch, k=self.k, stride=self.stride, prefix_shaping=False)


@dataclass(frozen=True)
class TwoStepLabels(LabelSource):
    """Two-step candidate labels: each candidate's entry (and the sampled token's) is its effect plus the soft value
    at `beta` of what can follow it, `r'(s, a) + beta log(sum_b pi(b|s+a) exp(r'(s+a, b) / beta) + (1 - sum_b
    pi(b|s+a)))` over the base model's top-`lookahead` next tokens `b` (`soft.lookahead_soft_values`): the
    soft-optimal Q of an episode that ends one step later. Nothing follows a stop token or the episode's last step.
    Costs one more forward per completion (`branches.branch_top_k`) and `lookahead` texts per (state, candidate).
    (Deprecated keywords: `candidate_lookahead=k2`, `candidate_beta`.)

    Args:
        k: candidates per labelled state.
        lookahead: k2, the next tokens valued after each candidate.
        beta: the temperature of the soft value ahead (> 0; the `beta` the tilt will use).
        stride: label every `stride`-th state.
        batch_size: texts per reward call.
    """

    k: int
    lookahead: int
    beta: float
    stride: int = 1
    batch_size: int = 256
    columns: ClassVar[tuple[str, ...]] = CANDIDATE_COLUMNS

    def __post_init__(self):
        check_fields(self, ("k", "lookahead", "stride", "batch_size"), beta="beta")

    def check(self, model, horizon: int | None) -> None:
        check_fits_vocabulary(model, self.k, "TwoStepLabels.k")
        check_fits_vocabulary(model, self.lookahead, "TwoStepLabels.lookahead")
        check_branch_support(model)

    def label(self, batch: LabelBatch) -> tuple[list[dict[str, Any]], LabelCost]:
        return _label_completions(
            batch, k=self.k, stride=self.stride, prefix_shaping=False, lookahead=self.lookahead, beta=self.beta
        )


@dataclass(frozen=True)
class FutureValueLabels(LabelSource):
    """Future-value candidate labels (Q#'s target): at every `stride`-th state `s_j`, for each of the base model's top
    `k` next tokens `a` and the sampled token, `num_continuations` continuations of `c_{<j} + [a]` sampled from the
    base policy up to the episode's end (a stop token, the horizon, or `max_horizon` tokens), each scored as a whole,
    `G_i = R(c_{<j} + [a] + continuation_i) - R(c_{<j})`, and aggregated at the decode `beta`:

        label(s_j, a) = beta log mean_i exp(G_i / beta)

    an estimate of `Q*_beta(s_j, a) - R(c_{<j})`, `Q*_beta(s, a) = beta log E_pi[exp(G / beta) | s, a]` the
    soft-optimal Q whose tilt is the KL-regularised optimum (docs/DESIGN.md section 6). After a stop token, or at the
    episode's last step, nothing follows and the label is the effect `r'(s_j, a)`.

    Bias: `mean_i exp(G_i / beta)` is an unbiased estimate of `E[exp(G / beta)]`, but its log is biased low (Jensen:
    `E[log X] <= log E[X]`), by about `beta Var[exp(G / beta)] / (2 n E[exp(G / beta)]^2)` for `n` continuations, so
    the labels underestimate `Q*` by an amount that shrinks as `1 / n` and grows as `beta` falls (the mean is dominated
    by rare high returns). The sampled token's label comes from fresh continuations too, so its bias is that of the
    candidates' and largely cancels in the trainer's target `G_j + label(a) - label(c_j)`. With `max_horizon`
    shorter than the episode, a continuation is scored where it was cut: rewards after it are not seen.

    Cost per labelled state: one top-k forward per completion (shared by its states), up to `(k + 1) *
    num_continuations` continuations of up to `max_horizon` tokens (`generate` calls of `generation_batch_size`
    prefixes) and as many texts scored (memoised: identical continuations are scored once).

    Args:
        k: candidates per labelled state.
        num_continuations: continuations sampled per (state, candidate).
        beta: the temperature of the aggregation (> 0; the `beta` the tilt will use).
        stride: label every `stride`-th state.
        max_horizon: the most tokens of a continuation; `None`: up to the episode's horizon (`max_new_tokens` of
            `generate_and_score` with `truncated_completions="terminal"`; required otherwise).
        batch_size: texts per reward call.
        generation_batch_size: prefixes per `generate` call (each yields `num_continuations` rows).
    """

    k: int
    num_continuations: int
    beta: float
    stride: int = 1
    max_horizon: int | None = None
    batch_size: int = 256
    generation_batch_size: int = 64
    columns: ClassVar[tuple[str, ...]] = CANDIDATE_COLUMNS

    def __post_init__(self):
        check_fields(
            self,
            ("k", "num_continuations", "stride", "max_horizon", "batch_size", "generation_batch_size"),
            beta="beta",
        )

    def check(self, model, horizon: int | None) -> None:
        check_fits_vocabulary(model, self.k, "FutureValueLabels.k")
        if horizon is None and self.max_horizon is None:
            raise ValueError(
                "`FutureValueLabels` needs a horizon to end its continuations: set `max_horizon`, or sample with "
                "`truncated_completions='terminal'` (the episode then ends at `max_new_tokens`)."
            )

    def room(self, j: int, horizon: int | None) -> int:
        """The most tokens a continuation after the token of state `j` may have (0: nothing follows)."""
        bounds = [
            bound for bound in (None if horizon is None else horizon - j - 1, self.max_horizon) if bound is not None
        ]
        return max(0, min(bounds))

    def label(self, batch: LabelBatch) -> tuple[list[dict[str, Any]], LabelCost]:
        self.check(batch.model, batch.horizon)
        cost = LabelCost()
        scorer, n = batch.scorer, self.num_continuations
        began = time.perf_counter()
        top = top_k_next_tokens(batch.model, batch.prompt_ids, batch.completion_ids, self.k, batch.pad_token_id)
        cost.topk_seconds += time.perf_counter() - began

        # What to continue: (row, j, a) for the candidates and the sampled token of each labelled state.
        owners, prefixes, limits = [], [], []
        states_of = [list(range(0, len(c_ids), self.stride)) for c_ids in batch.completion_ids]
        for row, (p_ids, c_ids) in enumerate(zip(batch.prompt_ids, batch.completion_ids, strict=True)):
            for j in states_of[row]:
                room = self.room(j, batch.horizon)
                for a in dict.fromkeys([*top[row][j].tolist(), c_ids[j]]):
                    if room > 0 and a not in batch.stop_ids:
                        owners.append((row, j, a))
                        prefixes.append(p_ids + c_ids[:j] + [a])
                        limits.append(room)
        began = time.perf_counter()
        sampled = sample_continuations(
            batch.model,
            prefixes,
            limits,
            n,
            pad_token_id=batch.pad_token_id,
            stop_ids=batch.stop_ids,
            batch_size=self.generation_batch_size,
        )
        cost.sampling_seconds += time.perf_counter() - began
        cost.continuations_sampled += n * len(prefixes)
        cost.continuation_tokens += sum(len(c) for conts in sampled for c in conts)
        continuations = dict(zip(owners, sampled, strict=True))

        keys = {}  # (row, j) -> the prefix's key; (row, j, a) -> a's key, or its continuations' keys
        for row, (p_ids, c_ids) in enumerate(zip(batch.prompt_ids, batch.completion_ids, strict=True)):
            g = batch.groups[row]
            for j in states_of[row]:
                keys[row, j] = scorer.request(g, p_ids, c_ids[:j])
                for a in dict.fromkeys([*top[row][j].tolist(), c_ids[j]]):
                    if (row, j, a) in continuations:
                        ahead = c_ids[:j] + [a]
                        keys[row, j, a] = [scorer.request(g, p_ids, ahead + c) for c in continuations[row, j, a]]
                    else:
                        keys[row, j, a] = scorer.request(g, p_ids, c_ids[:j] + [a])
        scorer.flush()
        # beta log mean_i exp(G_i / beta): the two-step soft value with n equally likely "next steps".
        uniform = torch.full((n,), -math.log(n), dtype=torch.float64)

        def value(row: int, j: int, a: int) -> float:
            if (row, j, a) in continuations:
                return scorer.soft_value_ahead(keys[row, j], keys[row, j, a], uniform, self.beta)
            return scorer.score(keys[row, j, a]) - scorer.score(keys[row, j])

        out = []
        for row, (p_ids, c_ids) in enumerate(zip(batch.prompt_ids, batch.completion_ids, strict=True)):
            p, width = len(p_ids), len(p_ids) + len(c_ids)
            ids: list[list[int]] = [[] for _ in range(width)]
            values: list[list[float]] = [[] for _ in range(width)]
            sampled_values = [0.0] * width
            for j in states_of[row]:
                ids[p + j] = top[row][j].tolist()
                values[p + j] = [value(row, j, a) for a in ids[p + j]]
                sampled_values[p + j] = value(row, j, c_ids[j])
            out.append({"candidate_ids": ids, "candidate_rewards": values, "candidate_sampled_reward": sampled_values})
            cost.states_labelled += len(states_of[row])
        return out, cost


def check_label_sources(labels) -> tuple[LabelSource, ...]:
    """`generate_and_score`'s `labels`: one `LabelSource` or a sequence of them, no two writing the same column."""
    sources = (labels,) if isinstance(labels, LabelSource) else labels
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence) or not sources:
        raise TypeError(f"`labels` must be a LabelSource or a non-empty list of them, got {labels!r}.")
    written: dict[str, LabelSource] = {}
    for i, source in enumerate(sources):
        if not isinstance(source, LabelSource):
            raise TypeError(f"`labels[{i}]` must be a LabelSource (e.g. CandidateLabels(k=8)), got {source!r}.")
        for column in source.columns:
            if column in written:
                raise ValueError(
                    f"`labels` has {written[column]!r} and {source!r}, which both write the `{column}` column: "
                    "keep one."
                )
            written[column] = source
    return tuple(sources)


def label_batch(sources: Sequence[LabelSource], batch: LabelBatch) -> tuple[list[dict[str, Any]], LabelCost]:
    """Every source's columns for each completion of the batch, in the order of `sources`, and their cost (the
    shared scorer's counted once)."""
    rows: list[dict[str, Any]] = [{} for _ in batch.completion_ids]
    cost = LabelCost()
    for source in sources:
        columns, source_cost = source.label(batch)
        cost.add(source_cost)
        for row, new in zip(rows, columns, strict=True):
            row.update(new)
    cost.add(batch.scorer.cost)
    return rows, cost


def labels_summary(sources: Sequence[LabelSource], cost: LabelCost) -> dict[str, Any]:
    """The labelling-cost record of a dataset: the cost, the sources' class names and their options (`k`, `stride`,
    `prefix_shaping` and `lookahead` always present, as before label sources)."""
    summary: dict[str, Any] = {**cost.as_dict(), "k": None, "stride": None, "prefix_shaping": False, "lookahead": None}
    for source in sources:
        summary.update(source.summary())
    summary["labels"] = [type(source).__name__ for source in sources]
    return summary


def labels_from_candidate_keywords(
    model,
    candidate_rewards: int | None,
    candidate_stride: int,
    prefix_shaping: bool,
    candidate_batch_size: int,
    candidate_lookahead: int | None,
    candidate_beta: float | None,
) -> tuple[LabelSource, ...]:
    """The label sources that `generate_and_score`'s deprecated `candidate_*` / `prefix_shaping` keywords ask for,
    checked with the keywords' own names in the errors: `CandidateLabels` (or `TwoStepLabels` with
    `candidate_lookahead`), then `PrefixShaping`. Empty when they ask for none."""
    check_candidate_args(candidate_rewards, candidate_stride, prefix_shaping, candidate_lookahead, candidate_beta)
    if candidate_lookahead is not None:
        check_branch_support(model)
    if candidate_rewards is not None:
        for name, k in (("candidate_rewards", candidate_rewards), ("candidate_lookahead", candidate_lookahead)):
            check_fits_vocabulary(model, k, name)
    sources: list[LabelSource] = []
    if candidate_rewards is not None and candidate_lookahead is None:
        sources.append(CandidateLabels(candidate_rewards, candidate_stride, candidate_batch_size))
    elif candidate_rewards is not None:
        sources.append(
            TwoStepLabels(
                candidate_rewards, candidate_lookahead, candidate_beta, candidate_stride, candidate_batch_size
            )
        )
    if prefix_shaping:
        sources.append(PrefixShaping(candidate_batch_size))
    return tuple(sources)
