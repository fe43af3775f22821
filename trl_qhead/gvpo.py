"""GVPO, Group Variance Policy Optimization (Zhang et al. 2025, arXiv 2504.19599), on TRL's `GRPOTrainer`.

GVPO trains a policy towards the KL-regularised optimum `pi*(y|x) = pi_ref(y|x) exp(R(x, y)/beta) / Z(x)`, the
optimum of `max_pi E_pi[R] - beta KL(pi || pi_ref)`. For k completions `y_1..y_k` of a prompt x (from any sampling
distribution with full support: no importance sampling) it regresses the centred implicit reward
`beta (Delta_i - mean Delta)`, `Delta_i = log pi_theta(y_i|x) - log pi_ref(y_i|x)` (sequence log-probs, summed over
completion tokens), on the centred reward `R_i - mean R`. The group's loss is the unbiased sample variance of the
residual `beta Delta - R`, halved; it is zero exactly when `beta Delta(y) - R(y)` is the same for every y, i.e. at
`pi = pi*` (the log-partition `beta log Z(x)` is that constant).

Layout: the pure loss (`gvpo_loss`, tensors in, no model) first; then the model-facing helpers of the offline path
(`sequence_logprobs`, `group_rows`, `gvpo_loss_on_groups`); then `GVPOConfig` and `GVPOTrainer` (wiring only).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from accelerate.utils import is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import (
    get_config_model_id,
    pad,
    selective_log_softmax,
    split_pixel_values_by_grid,
    split_tensor_dict,
    unsplit_pixel_values_by_grid,
)

from .checks import check_beta

__all__ = [
    "GVPOConfig",
    "GVPOLossOutput",
    "GVPOTrainer",
    "group_rows",
    "gvpo_loss",
    "gvpo_loss_on_groups",
    "sequence_logprobs",
]


# --------------------------------------------------------------------------------------------------------------------
# The loss (pure tensors)
# --------------------------------------------------------------------------------------------------------------------


class GVPOLossOutput(NamedTuple):
    """What `gvpo_loss` returns. Everything but `loss` is detached.

    loss: scalar, the mean over groups (with at least 2 valid members) of each group's loss.
    weights: `[G, k]`, `w_i = (R_i - mean R) - beta (Delta_i - mean Delta)` (0 on invalid members): the gradient of
        `loss` is `-(1/G') sum_g (beta / (n_g - 1)) sum_i w_gi grad log pi_theta(y_gi)`.
    log_ratio: `[G, k]`, `Delta_i = log pi_theta(y_i) - log pi_ref(y_i)` (0 on invalid members).
    centred_rewards: `[G, k]`, `R_i - mean R` (0 on invalid members).
    mask: `[G, k]` bool, the members that count (given mask and not-NaN reward).
    num_groups: scalar, `G'`, the number of groups with at least 2 valid members.
    """

    loss: torch.Tensor
    weights: torch.Tensor
    log_ratio: torch.Tensor
    centred_rewards: torch.Tensor
    mask: torch.Tensor
    num_groups: torch.Tensor


def gvpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    mask: torch.Tensor | None = None,
) -> GVPOLossOutput:
    r"""The GVPO loss on groups of completions, from sequence log-probs and rewards.

    Shapes: `[G, k]` for every tensor, G groups (prompts) of k completions each. For group g with valid members
    `V_g` (`mask` true and reward not NaN), `n_g = |V_g|`, and per member

        Delta_i = policy_logps_i - ref_logps_i                         (log pi_theta(y_i|x) - log pi_ref(y_i|x))
        a_i     = beta * (Delta_i - mean_{V_g} Delta)                  (centred implicit reward)
        b_i     = R_i - mean_{V_g} R                                   (centred reward)

    the group's loss is

        L_g = 1 / (2 (n_g - 1)) * sum_{i in V_g} (a_i - b_i)^2 ,

    half the unbiased sample variance of `beta Delta - R` over the group (as the authors' verl recipe: 0.5 and
    `1/(k-1)`), and the returned loss is the mean of `L_g` over the `G'` groups with `n_g >= 2` (0, with a graph, if
    none). Because `sum_i (a_i - b_i) = 0`, the dependence of the group means on theta drops out of the gradient:

        grad L_g = -(beta / (n_g - 1)) * sum_{i in V_g} w_i grad log pi_theta(y_i|x),
        w_i = (R_i - mean R) - beta (Delta_i - mean Delta),

    the paper's weighted log-likelihood form (zero-sum weights, so `Z(x)` cancels) times `beta / (n_g - 1)`.
    In expectation over groups drawn i.i.d. from a sampling distribution mu with full support, `L_g` is
    `Var_mu[beta Delta - R] / 2`, whose unique minimiser is `pi_theta = pi_ref exp(R/beta) / Z`.

    Args:
        policy_logps: `[G, k]` float, `log pi_theta(y_i|x)` summed over completion tokens, with grad.
        ref_logps: `[G, k]` float, `log pi_ref(y_i|x)` likewise (treated as a constant).
        rewards: `[G, k]` float, the sequence rewards; NaN marks an unscorable completion, left out of its group.
        beta: the KL coefficient, finite and > 0.
        mask: optional `[G, k]` bool (or 0/1), false for members to leave out (e.g. masked truncated completions).
            Any other value is a ValueError: GVPO's loss is a variance over the members of a group, and weighing a
            member by 0.4 has no unbiased meaning there (weight the reward instead).

    Returns:
        A `GVPOLossOutput`; the loss is float32.
    """
    beta = check_beta(beta)
    if policy_logps.dim() != 2:
        raise ValueError(f"`policy_logps` must have shape [G, k], got {tuple(policy_logps.shape)}.")
    for name, tensor in (("ref_logps", ref_logps), ("rewards", rewards), ("mask", mask)):
        if tensor is not None and tensor.shape != policy_logps.shape:
            raise ValueError(
                f"`{name}` must have the shape of `policy_logps` {tuple(policy_logps.shape)}, got {tuple(tensor.shape)}."
            )
    if mask is not None and mask.dtype != torch.bool:
        bad = ~((mask == 0) | (mask == 1))
        if bad.any():
            g, i = bad.nonzero()[0].tolist()
            raise ValueError(
                f"`mask` holds {mask[g, i].item()} at group {g}, member {i}: it must be bool or 0/1 (a member is in "
                "its group or not; the loss is a group variance, which has no meaning for a fractional member)."
            )
    policy_logps = policy_logps.float()
    ref_logps = ref_logps.detach().float().to(policy_logps.device)
    rewards = rewards.detach().float().to(policy_logps.device)
    valid = ~torch.isnan(rewards)
    if mask is not None:
        valid = valid & mask.to(device=policy_logps.device, dtype=torch.bool)
    infinite = torch.isinf(rewards) & valid
    if infinite.any():
        g, i = infinite.nonzero()[0].tolist()
        raise ValueError(
            f"`rewards` must be finite in float32 (NaN marks an unscorable completion), got {rewards[g, i].item()} at "
            f"group {g}, member {i}."
        )
    m = valid.float()
    n = m.sum(dim=1, keepdim=True)  # [G, 1]
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    log_ratio = (policy_logps - ref_logps) * m  # invalid members: 0, and no gradient through them
    centred_rewards = (rewards - rewards.sum(1, keepdim=True) / n.clamp(min=1)) * m
    centred_log_ratio = (log_ratio - log_ratio.sum(1, keepdim=True) / n.clamp(min=1)) * m
    residual = beta * centred_log_ratio - centred_rewards  # a_i - b_i
    per_group = 0.5 * residual.pow(2).sum(dim=1) / (n.squeeze(1) - 1).clamp(min=1)
    counted = (n.squeeze(1) >= 2).float()
    num_groups = counted.sum()
    loss = (per_group * counted).sum() / num_groups.clamp(min=1)
    return GVPOLossOutput(
        loss=loss,
        weights=(-residual).detach(),
        log_ratio=log_ratio.detach(),
        centred_rewards=centred_rewards,
        mask=valid,
        num_groups=num_groups,
    )


# --------------------------------------------------------------------------------------------------------------------
# Offline path: groups of `generate_and_score` rows (or any rows with input_ids, completion_mask and reward)
# --------------------------------------------------------------------------------------------------------------------


def sequence_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """`[B]`: `sum_t completion_mask[t] * log pi(input_ids[t] | input_ids[:t])` for a causal LM.

    `input_ids`, `attention_mask`, `completion_mask`: `[B, T]` (any padding side; position ids follow the attention
    mask). The model returns `[B, T, |V|]` logits; the fp32 log-softmax is taken one row at a time, so it adds one
    `[T, |V|]` buffer, not another `[B, T, |V|]`. Put dropout off (or the model in eval mode) for the reference pass
    to match: with dropout on, `Delta` is noisy even where the weights agree.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    targets = input_ids[:, 1:]
    weights = completion_mask[:, 1:].to(logits.dtype)
    out = []
    for row in range(input_ids.shape[0]):
        # TRL's `selective_log_softmax` on one fp32 row: its own loop over rows would keep bf16 logits in bf16.
        row_logps = selective_log_softmax(logits[row, :-1].float(), targets[row])  # (T - 1,)
        out.append((row_logps * weights[row].float()).sum())
    return torch.stack(out)


def group_rows(rows: Iterable[dict[str, Any]], num_generations: int) -> list[list[dict[str, Any]]]:
    """Split rows into consecutive groups of `num_generations` completions of one prompt (`generate_and_score`'s order).

    Raises a `ValueError` when the row count is not a multiple of `num_generations` or a group mixes prompts.
    """
    if not isinstance(num_generations, int) or isinstance(num_generations, bool) or num_generations < 2:
        raise ValueError(f"`num_generations` must be an integer >= 2, got {num_generations!r}.")
    rows = list(rows)
    if len(rows) % num_generations:
        raise ValueError(f"{len(rows)} rows do not split into groups of `num_generations`={num_generations}.")
    groups = [rows[i : i + num_generations] for i in range(0, len(rows), num_generations)]
    for index, group in enumerate(groups):
        prompts = [row.get("prompt") for row in group]
        if any(p != prompts[0] for p in prompts):
            raise ValueError(
                f"Group {index} (rows {index * num_generations}..{(index + 1) * num_generations - 1}) mixes prompts: "
                "GVPO needs the k completions of one prompt as consecutive rows."
            )
    return groups


def _check_row(row: Any, index: int, k: int, vocab_size: int | None) -> tuple[list[int], list[int], float]:
    """`(input_ids, completion_mask, reward)` of row `index` of `gvpo_loss_on_groups`'s groups (`reward` NaN for an
    unscorable one), or a TypeError/ValueError naming the row (its group and member) and the column."""
    where = f"row {index} (group {index // k}, member {index % k})"
    if not isinstance(row, dict):
        raise TypeError(
            f"{where} must be a dict with `input_ids`, `completion_mask` and `reward`, got {type(row).__name__}."
        )
    missing = [name for name in ("input_ids", "completion_mask", "reward") if name not in row]
    if missing:
        raise ValueError(
            f"{where} has no {missing} (columns {sorted(row)}): every row needs `input_ids` (prompt + completion), "
            "`completion_mask` (one 0/1 per token, 1 on completion tokens) and `reward` (a number, or None)."
        )
    ids, mask, reward = row["input_ids"], row["completion_mask"], row["reward"]
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__") or len(ids) == 0:
        raise ValueError(f"`input_ids` of {where} must be a non-empty list of token ids, got {ids!r}.")
    ids = [i.item() if hasattr(i, "item") else i for i in ids]
    for t, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0 or (vocab_size and token >= vocab_size):
            raise ValueError(
                f"`input_ids` of {where} holds {token!r} at token {t}: ids must be integers in [0, {vocab_size})."
            )
    if isinstance(mask, (str, bytes)) or not hasattr(mask, "__len__") or len(mask) != len(ids):
        length = len(mask) if hasattr(mask, "__len__") else mask
        raise ValueError(
            f"`completion_mask` of {where} has {length!r} entries for {len(ids)} tokens of `input_ids`: it must have "
            "one 0/1 per token (1 on completion tokens)."
        )
    mask = [m.item() if hasattr(m, "item") else m for m in mask]
    for t, m in enumerate(mask):
        if not (isinstance(m, bool) or (isinstance(m, numbers.Real) and m in (0, 1))):
            raise ValueError(f"`completion_mask` of {where} holds {m!r} at token {t}: it must be 0 or 1.")
    if mask[0]:
        raise ValueError(
            f"`completion_mask` of {where} is 1 on its first token, which no state precedes (it cannot be scored): the "
            "row must start with at least one prompt token."
        )
    if reward is None:
        return ids, [int(m) for m in mask], math.nan
    value = reward.item() if hasattr(reward, "item") and getattr(reward, "ndim", 0) == 0 else reward
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`reward` of {where} is {reward!r} ({type(reward).__name__}): it must be a number or None.")
    value = float(value)
    if math.isinf(value) or (math.isfinite(value) and abs(value) > torch.finfo(torch.float32).max):
        raise ValueError(f"`reward` of {where} is {value}: it must be finite in float32 (None: unscorable).")
    return ids, [int(m) for m in mask], value


def gvpo_loss_on_groups(
    model,
    groups: Sequence[Sequence[dict[str, Any]]],
    beta: float,
    ref_model=None,
    pad_token_id: int = 0,
) -> GVPOLossOutput:
    """The GVPO loss of `model` on offline groups (e.g. `group_rows(generate_and_score(...), k)`), with grad.

    Each row needs `input_ids` (prompt + completion tokens), `completion_mask` (same length, 1 on completion tokens) and
    `reward` (a float, or None for an unscorable completion, left out of its group); a row that lacks one, or whose
    values are of the wrong type, length or range (ids outside the vocabulary, a mask entry other than 0/1 or 1 on the
    first token, a reward that is not a number finite in float32) raises a TypeError/ValueError naming the row, its
    group and member, and the column, before any forward. The completions may come from any
    policy (GVPO needs no importance weights). The reference log-probs come from `ref_model` when given, else from
    `model` with its PEFT adapters disabled; a model with neither raises a `ValueError`. An
    `AutoModelForCausalLMWithQHead` is read through its backbone (`model.pretrained_model`); its Q head plays no part. Every group must have the
    same size k (a `[G, k]` grid). See `gvpo_loss` for the exact loss.
    """
    if not groups:
        raise ValueError("`groups` is empty.")
    k = len(groups[0])
    if any(len(group) != k for group in groups):
        raise ValueError(
            f"Every group must have the same number of completions, got sizes {[len(g) for g in groups]}."
        )
    if k < 2:
        raise ValueError(
            f"Every group has {k} completion(s): GVPO's loss is a variance within each group of completions of one "
            "prompt, so a group needs at least 2 (with 1 the loss is 0 and nothing is learnt)."
        )
    # An `AutoModelForCausalLMWithQHead` scores with its backbone (the PEFT model whose adapters give the reference).
    model = getattr(model, "pretrained_model", model)
    rows = [row for group in groups for row in group]
    device = next(model.parameters()).device
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab_size = getattr(embeddings, "num_embeddings", None)
    checked = [_check_row(row, index, k, vocab_size) for index, row in enumerate(rows)]

    def column(values: list[list[int]]) -> list[torch.Tensor]:
        return [torch.tensor(v, dtype=torch.long, device=device) for v in values]

    input_ids = pad(column([ids for ids, _, _ in checked]), pad_token_id)  # (N, T), right-padded (TRL's `pad`)
    attention_mask = pad(column([[1] * len(ids) for ids, _, _ in checked]), 0)
    completion_mask = pad(column([mask for _, mask, _ in checked]), 0)
    rewards = torch.tensor([reward for _, _, reward in checked], dtype=torch.float32, device=device).view(-1, k)
    policy_logps = sequence_logprobs(model, input_ids, attention_mask, completion_mask)
    with torch.no_grad():
        if ref_model is not None:
            ref_logps = sequence_logprobs(ref_model, input_ids, attention_mask, completion_mask)
        elif hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                ref_logps = sequence_logprobs(model, input_ids, attention_mask, completion_mask)
        else:
            raise ValueError("Pass `ref_model`, or a PEFT model whose disabled adapters give the reference.")
    has_tokens = completion_mask.sum(-1).view(-1, k) > 0
    return gvpo_loss(policy_logps.view(-1, k), ref_logps.view(-1, k), rewards, beta, mask=has_tokens)


# --------------------------------------------------------------------------------------------------------------------
# Config and trainer (online: GRPOTrainer's generation, reward functions and reference model)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class GVPOConfig(GRPOConfig):
    r"""Configuration for [`GVPOTrainer`]: everything of TRL's `GRPOConfig` (generation, reward functions, reference
    model) with the GVPO loss in place of GRPO's clipped surrogate.

    Parameters:
        > GVPO

        beta (`float`, *optional*, defaults to `0.1`):
            KL coefficient of the objective `E_pi[R] - beta KL(pi || pi_ref)`, whose optimum `pi_ref exp(R/beta) / Z`
            GVPO converges to. Must be finite and > 0 (the reference model, or the PEFT model with its adapters
            disabled, is always used). Scaling every reward by c is the same as dividing beta by c.
        num_generations (`int`, *optional*, defaults to `8`):
            Completions per prompt, the group size k; at least 2 (the loss is a variance within each group).
        per_device_train_batch_size (`int`, *optional*, defaults to `8`):
            Must be a multiple of `num_generations`: each micro-batch holds whole groups, because each completion's
            weight depends on the current log-probs of all k completions of its prompt.
        scale_rewards (`str`, *optional*, defaults to `"none"`):
            Must be `"none"` (or `False`): GVPO centres the raw weighted rewards per group; dividing by a standard
            deviation would change the optimum. It only affects the advantages GRPOTrainer logs.

    GVPO uses the weighted sum of the reward functions (`reward_weights`; `multi_objective_aggregation` must be
    `"sum_then_normalize"`), no clipping and no importance sampling: `epsilon`, `delta`, `loss_type`,
    `importance_sampling_level` and the vLLM importance-sampling correction have no effect, and samples reused over
    `num_iterations > 1` or generated by vLLM are fine as they are. `mask_truncated_completions=True` leaves truncated
    completions out of their group. The GRPO-only options `entropy_coef`, `use_adaptive_entropy`,
    `top_entropy_quantile < 1` and `off_policy_mask_threshold` are refused (they would change the optimum).
    """

    beta: float = field(
        default=0.1,
        metadata={"help": "KL coefficient: GVPO's optimum is pi_ref exp(R/beta) / Z. Finite and > 0."},
    )
    scale_rewards: str = field(
        default="none",
        metadata={"help": "Must be 'none': GVPO centres the raw rewards per group (no std scaling)."},
    )

    def __post_init__(self):
        self.beta = check_beta(self.beta)
        k = self.num_generations
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(
                f"`num_generations` must be an integer >= 2 for GVPO (the loss is a variance within each group of "
                f"completions of one prompt), got {k!r}."
            )
        if self.per_device_train_batch_size % k:
            raise ValueError(
                f"`per_device_train_batch_size` ({self.per_device_train_batch_size}) must be a multiple of "
                f"`num_generations` ({k}) for GVPO: each micro-batch must hold whole groups."
            )
        scale = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if scale != "none":
            raise ValueError(
                f"`scale_rewards` must be 'none' for GVPO, got {self.scale_rewards!r}: dividing rewards by a standard "
                "deviation changes the optimum pi_ref exp(R/beta)/Z (to rescale the rewards, change `beta`)."
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "`multi_objective_aggregation` must be 'sum_then_normalize' for GVPO (R is the weighted sum of the "
                f"reward functions), got {self.multi_objective_aggregation!r}."
            )
        refused = {
            "entropy_coef": self.entropy_coef != 0.0,
            "use_adaptive_entropy": bool(self.use_adaptive_entropy),
            "top_entropy_quantile": self.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
        }
        for name, is_set in refused.items():
            if is_set:
                raise ValueError(
                    f"`{name}` ({getattr(self, name)!r}) is a GRPO loss option that GVPO does not support (it would "
                    "change the optimum); leave it at its default."
                )
        evaluates = self.do_eval or str(getattr(self.eval_strategy, "value", self.eval_strategy)) != "no"
        k_eval = self.num_generations_eval or k
        if evaluates and (k_eval < 2 or self.per_device_eval_batch_size % k_eval):
            raise ValueError(
                f"`per_device_eval_batch_size` ({self.per_device_eval_batch_size}) must be a multiple of "
                f"`num_generations_eval` or `num_generations` ({k_eval}, at least 2) for GVPO: whole groups per batch."
            )
        super().__post_init__()


def _shuffle_groups(batch: dict[str, Any], group_size: int) -> dict[str, Any]:
    """Shuffle whole groups of `group_size` consecutive rows (every sequence value in unison; scalars untouched)."""
    num_rows = len(next(v for v in batch.values() if v is not None and not (torch.is_tensor(v) and v.ndim == 0)))
    order = torch.randperm(num_rows // group_size)
    permutation = (order[:, None] * group_size + torch.arange(group_size)[None, :]).flatten()

    def permute(value):
        if value is None or (torch.is_tensor(value) and value.ndim == 0):
            return value
        if torch.is_tensor(value):
            return value[permutation.to(value.device)]
        return [value[i] for i in permutation.tolist()]

    return {key: permute(value) for key, value in batch.items()}


def _check_model_source(model, *arguments, **kwargs) -> None:
    """A ValueError, before GRPOTrainer's, for a model instance with no name or path (built from a config and never
    saved) where GRPOTrainer would load something from that path: the reference model (unless the model is, or a
    `peft_config` makes it, a PEFT model, whose disabled adapters give the reference) or the tokenizer (unless a
    `processing_class` is passed). GRPOTrainer's own error there is "Repo id must use alphanumeric chars: ''"."""
    config = getattr(model, "config", None)
    if isinstance(model, str) or config is None or get_config_model_id(config):
        return
    bound = inspect.signature(GRPOTrainer.__init__).bind_partial(None, model, *arguments, **kwargs).arguments
    why = []
    if not is_peft_model(model) and bound.get("peft_config") is None:
        why.append(
            "its reference model (a frozen copy of the initial weights) is loaded from the model's name or path: save "
            "the model with `save_pretrained(folder)` and pass the folder, or train LoRA adapters (`peft_config`), "
            "whose disabled adapters are the reference"
        )
    if bound.get("processing_class") is None:
        why.append("its tokenizer is loaded from the same name or path: pass `processing_class`")
    if why:
        raise ValueError(
            f"The model ({type(model).__name__}) has no name or path (built from a config and never saved), and "
            f"GVPOTrainer needs one: {'; '.join(why)}."
        )


class GVPOTrainer(GRPOTrainer):
    """TRL's `GRPOTrainer` with the GVPO loss (`gvpo_loss`): same arguments, same generation, reward functions,
    reference model (a frozen copy, or the PEFT model with its adapters disabled) and logging.

    Differences from GRPO: the loss (GVPO's, on sequence log-probs, no clipping or importance weights); the rewards
    used are the raw weighted sums, not GRPO's advantages; the generation batch is shuffled by whole groups so that
    each micro-batch holds the k completions of its prompts. Logged metrics (besides GRPOTrainer's reward, length and
    timing ones): `gvpo/loss` (the loss before gradient-accumulation scaling), `gvpo/log_ratio_mean` (mean sequence
    `log pi_theta - log pi_ref` of the completions: a KL estimate when they are on-policy), `gvpo/weight_abs_mean`
    (`mean |w_i|`), `gvpo/implicit_reward_std` (std of `beta Delta` within groups) and `gvpo/residual_std` (std of
    `beta Delta - R` within groups; 0 at the optimum).

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from trl_qhead import GVPOConfig, GVPOTrainer
    >>> def short(completions, **kwargs):
    ...     return [-len(c) / 10 for c in completions]
    >>> args = GVPOConfig("out", beta=0.1, num_generations=4, per_device_train_batch_size=8)
    >>> GVPOTrainer("gpt2", short, args, train_dataset=Dataset.from_dict({"prompt": ["Hi", "Tell me"] * 8})).train()
    ```
    """

    _tag_names = ["trl", "gvpo", "trl-qhead"]
    _name = "GVPO"
    _paper = {
        "title": "GVPO: Group Variance Policy Optimization for Large Language Model Post-Training",
        "id": "2504.19599",
        "citation": (
            "@article{zhang2025gvpo,\n"
            "    title   = {{GVPO: Group Variance Policy Optimization for Large Language Model Post-Training}},\n"
            "    author  = {Kaichen Zhang and Yuzhong Hong and Junwei Bao and Hongfei Jiang and Yang Song and "
            "Dingqian Hong and Hui Xiong},\n"
            "    year    = 2025,\n"
            "    eprint  = {arXiv:2504.19599},\n"
            "}"
        ),
    }

    def __init__(self, model, reward_funcs=None, args: GVPOConfig | None = None, *more, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model") or "model"
            args = GVPOConfig(f"{str(name).split('/')[-1]}-GVPO")
        if not isinstance(args, GVPOConfig):
            raise TypeError(f"`args` must be a GVPOConfig (it validates GVPO's settings), got {type(args).__name__}.")
        self._gvpo_rewards_per_func = None
        _check_model_source(model, reward_funcs, args, *more, **kwargs)
        super().__init__(model, reward_funcs, args, *more, **kwargs)

    # Rewards: keep the raw per-function rewards (gathered over processes) that GRPOTrainer turns into advantages.
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gvpo_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func = self._gvpo_rewards_per_func
        self._gvpo_rewards_per_func = None
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable: left out of its group
        local = len(inputs)
        start = self.accelerator.process_index * local
        output["gvpo_rewards"] = rewards[start : start + local]
        return output

    def _group_size(self) -> int:
        return self.num_generations if self.model.training else self.num_generations_eval

    # The generation batch is shuffled by whole groups (GRPOTrainer shuffles rows), then split into micro-batches.
    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return self._generate_and_score_completions(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = split_pixel_values_by_grid(batch)
            batch = _shuffle_groups(batch, self.num_generations)
            batches = split_tensor_dict(batch, self.args.steps_per_generation)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in batches]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        k = self._group_size()
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        rows = completion_ids.shape[0]
        if rows % k:
            raise ValueError(f"A GVPO micro-batch of {rows} rows does not hold whole groups of {k} completions.")
        same_prompt = prompt_ids.view(-1, k, prompt_ids.shape[1]) == prompt_ids.view(-1, k, prompt_ids.shape[1])[:, :1]
        if not same_prompt.all():
            raise RuntimeError("GVPO groups mix prompts: consecutive rows of a micro-batch must share their prompt.")
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, _, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_aux_loss=self.aux_loss_enabled,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            num_images=inputs.get("num_images"),
            pixel_attention_mask=inputs.get("pixel_attention_mask"),
            spatial_shapes=inputs.get("spatial_shapes"),
            num_tiles=inputs.get("num_tiles"),
            image_sizes=inputs.get("image_sizes"),
            token_type_ids=inputs.get("token_type_ids"),
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
            image_position_ids=inputs.get("image_position_ids"),
        )
        policy_logps = (per_token_logps * mask).sum(-1)
        ref_logps = (inputs["ref_per_token_logps"] * mask).sum(-1)
        has_tokens = mask.sum(-1) > 0  # masked truncated completions leave their group
        out = gvpo_loss(
            policy_logps.view(-1, k),
            ref_logps.view(-1, k),
            inputs["gvpo_rewards"].view(-1, k),
            self.beta,
            has_tokens.view(-1, k),
        )
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = out.loss / accumulation
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(aux_loss.detach()).mean().item())
        self._log_gvpo_metrics(mode, out)
        return loss

    def _log_gvpo_metrics(self, mode: str, out: GVPOLossOutput) -> None:
        m = out.mask.float()
        n = m.sum(1)
        counted = (n >= 2).float()
        implicit = self.beta * out.log_ratio
        centred_implicit = (implicit - (implicit * m).sum(1, keepdim=True) / n.clamp(min=1)[:, None]) * m
        residual = -out.weights
        group_var = lambda x: (x.pow(2).sum(1) / (n - 1).clamp(min=1) * counted).sum()  # noqa: E731
        stats = torch.stack(
            [
                out.loss.detach() * out.num_groups,
                out.num_groups,
                out.log_ratio.sum(),
                out.weights.abs().sum(),
                m.sum(),
                group_var(centred_implicit),
                group_var(residual),
            ]
        )
        totals = self.accelerator.reduce(stats, reduction="sum").tolist()
        groups, members = max(totals[1], 1.0), max(totals[4], 1.0)
        self._metrics[mode]["gvpo/loss"].append(totals[0] / groups)
        self._metrics[mode]["gvpo/log_ratio_mean"].append(totals[2] / members)
        self._metrics[mode]["gvpo/weight_abs_mean"].append(totals[3] / members)
        self._metrics[mode]["gvpo/implicit_reward_std"].append(math.sqrt(max(totals[5] / groups, 0.0)))
        self._metrics[mode]["gvpo/residual_std"].append(math.sqrt(max(totals[6] / groups, 0.0)))
