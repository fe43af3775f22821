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

__all__ = ["action_logprobs_and_values", "gather_action_q", "qhead_loss", "state_values"]


def qhead_loss(
    action_logprobs: torch.Tensor,
    action_q: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    q_weight: float,
    num_items: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`L = L_LM + q_weight * L_Q` summed over the action positions and divided by the number of actions.

    `L_LM = -log pi(a_t|s_t)` and `L_Q = (Q(s_t, a_t) - G_t)^2`, both summed over the positions where `action_mask` is
    set (whatever the other positions hold is ignored).

    Args:
        action_logprobs: `(B, T)` `log pi(a_t|s_t)`, with grad.
        action_q: `(B, T)` `Q(s_t, a_t)`, with grad.
        returns: `(B, T)` targets `G_t` (constants, e.g. from `compute_returns`).
        action_mask: `(B, T)` bool, where a position holds an action.
        q_weight: weight of `L_Q`.
        num_items: the number of actions the loss is averaged over; defaults to this batch's. The trainer passes the
            count over all gradient-accumulation micro-batches and processes, as transformers does for `L_LM`.

    Returns:
        `(loss, stats)`: `loss` a scalar; `stats` holds detached scalars `loss_lm`, `loss_q` (means over this batch's
        actions), `q_mean` and `g_mean`.
    """
    is_action = action_mask.bool()
    mask = is_action.float()
    local_items = mask.sum().clamp(min=1)
    denominator = local_items if num_items is None else num_items
    lm_sum = -torch.where(is_action, action_logprobs, 0.0).sum()
    q_sum = (((action_q - returns) ** 2) * mask).sum()
    loss = (lm_sum + q_weight * q_sum) / denominator
    stats = {
        "loss_lm": lm_sum.detach() / local_items,
        "loss_q": q_sum.detach() / local_items,
        "q_mean": (action_q.detach() * mask).sum() / local_items,
        "g_mean": (returns.detach() * mask).sum() / local_items,
    }
    return loss, stats
