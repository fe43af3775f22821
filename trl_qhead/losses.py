"""The training loss `L = L_LM + q_weight * L_Q`, a pure function of tensors on the position grid.

Everything it needs is computed before it is called (`QHeadTrainer.compute_loss` reads in that order): the log-probs
of the actions and `Q(s_t, a_t)` from one forward pass (`AutoModelForCausalLMWithQHead.forward`), the rewards, the
episode ends and the return targets (`trl_qhead.returns.compute_returns`). The efficient forward that produces
`action_logprobs` and `action_q` without `[B, T, |V|]` buffers lives in `trl_qhead.chunked_lm_head` and
`trl_qhead.q_values`; both names are re-exported here, where they used to live.
"""

from __future__ import annotations

import torch

from .chunked_lm_head import action_logprobs_and_values
from .q_values import gather_action_q, state_values
from .soft import linex_loss

__all__ = ["action_logprobs_and_values", "gather_action_q", "qhead_loss", "state_values"]


def qhead_loss(
    action_logprobs: torch.Tensor,
    action_q: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    q_weight: float,
    num_items: torch.Tensor | int | None = None,
    target_beta: float | None = None,
    candidate_q: torch.Tensor | None = None,
    candidate_targets: torch.Tensor | None = None,
    candidate_mask: torch.Tensor | None = None,
    candidate_weight: float = 1.0,
    lm_loss: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`L = L_LM + q_weight * L_Q` summed over the action positions and divided by the number of actions.

    `L_LM = -log pi(a_t|s_t)` and `L_Q = l(Q(s_t, a_t), G_t)`, both summed over the positions where `action_mask` is
    set (whatever the other positions hold is ignored). `l` is the squared error `(q - y)^2` (learns the mean) or, with
    `target_beta`, `2 * linex_loss(q, y, target_beta)` (learns `beta log E exp(y / beta)`; the factor 2 makes it tend to
    the squared error as beta -> inf). With candidate labels, `L_Q` also sums
    `candidate_weight * l(Q(s_t, a), y_{t,a})` over the (state, candidate) pairs of `candidate_mask`; the whole sum is
    divided by the same `N` (sampled actions), so each pair weighs `candidate_weight` times a sampled action.

    Args:
        action_logprobs: `(B, T)` `log pi(a_t|s_t)`, with grad.
        action_q: `(B, T)` `Q(s_t, a_t)`, with grad.
        returns: `(B, T)` targets `G_t` (constants, e.g. from `compute_returns`).
        action_mask: `(B, T)` bool, where a position holds an action.
        q_weight: weight of `L_Q`.
        num_items: the number of actions the loss is averaged over; defaults to this batch's. The trainer passes the
            count over all gradient-accumulation micro-batches and processes, as transformers does for `L_LM`.
        target_beta: None (squared error) or the beta of the LINEX loss (`q_target="soft"`).
        candidate_q, candidate_targets, candidate_mask: `(B, T, k)` `Q(s_t, a)` with grad, targets (constants, e.g.
            `soft.candidate_targets`) and the pairs that count; all three or none.
        candidate_weight: the weight of each pair.
        lm_loss: `False` leaves `L_LM` out of the loss (`q_head_only`: the policy is frozen); `loss_lm` is still
            reported.

    Returns:
        `(loss, stats)`: `loss` a scalar; `stats` holds detached scalars `loss_lm`, `loss_q` (means over this batch's
        actions, sampled actions only), `q_mean` and `g_mean`, and with candidates `loss_candidates` (mean over the
        pairs), `candidate_target_sq` (the mean squared target over the pairs) and `candidates_per_action`.
    """
    is_action = action_mask.bool()
    mask = is_action.float()
    local_items = mask.sum().clamp(min=1)
    denominator = local_items if num_items is None else num_items
    lm_sum = -torch.where(is_action, action_logprobs, 0.0).sum()
    q_sum = _q_loss(action_q, returns, is_action, target_beta)
    total_q = q_sum
    stats = {
        "loss_lm": lm_sum.detach() / local_items,
        "loss_q": q_sum.detach() / local_items,
        "q_mean": (action_q.detach() * mask).sum() / local_items,
        "g_mean": (returns.detach() * mask).sum() / local_items,
    }
    if (candidate_q is None) != (candidate_targets is None) or (candidate_q is None) != (candidate_mask is None):
        raise ValueError("pass all of `candidate_q`, `candidate_targets` and `candidate_mask`, or none")
    if candidate_q is not None:
        pairs = candidate_mask.bool()
        c_sum = _q_loss(candidate_q, candidate_targets, pairs, target_beta)
        total_q = total_q + candidate_weight * c_sum
        n_pairs = pairs.sum()
        stats["loss_candidates"] = c_sum.detach() / n_pairs.clamp(min=1)
        # the loss of a head that predicts 0 at every pair (with the squared error): `1 - loss_candidates /
        # candidate_target_sq` is the share of the labels a head reproduces, on held-out rows its generalisation
        target_sq = torch.where(pairs, candidate_targets.detach().float() ** 2, 0.0).sum()
        stats["candidate_target_sq"] = target_sq / n_pairs.clamp(min=1)
        stats["candidates_per_action"] = n_pairs.float() / local_items
    loss = ((lm_sum if lm_loss else 0.0) + q_weight * total_q) / denominator
    return loss, stats


def _q_loss(q: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, target_beta: float | None) -> torch.Tensor:
    """`sum_mask (q - y)^2`, or `sum_mask 2 * LINEX(q, y; beta)` with `target_beta`; positions off the mask never read."""
    if target_beta is None:
        return torch.where(mask, (q - target.detach()) ** 2, 0.0).sum()
    return 2.0 * linex_loss(q, target.detach(), target_beta, mask, reduction="sum")
