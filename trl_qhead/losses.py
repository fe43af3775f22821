"""The training loss `L = L_LM + q_weight * L_Q`, computed without multiplying the Q head out (DESIGN.md section 3).

- `Q(s_t, a_t)` needs one row of `W_q` per position: gather it and take a dot product with `h_t` (O(T*H)).
- `V(s) = sum_a pi(a|s) Q(s, a)` is a target, so it needs no grad, and only where the returns read it: the bootstrap
  state of each row for Monte Carlo, every state for lambda < 1, in chunks so that no `[B, T, |V|]` buffer is made.

`dense_qhead_loss` is the obvious implementation (full Q at every position) kept as the reference the tests and the
benchmark compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .returns import compute_returns


def gather_action_q(hidden: torch.Tensor, q_head: nn.Linear, actions: torch.LongTensor) -> torch.Tensor:
    """`Q(s_t, a_t) = W_q[a_t] . h_t + b_q[a_t]` for every position, `[B, T]` in fp32; grad reaches only those rows."""
    weight_rows = q_head.weight[actions]  # [B, T, H]
    return (hidden.to(weight_rows.dtype) * weight_rows).sum(-1) + q_head.bias[actions]


@torch.no_grad()
def state_values(
    hidden: torch.Tensor, logits: torch.Tensor, q_head: nn.Linear, value_mask: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """`V(s_t) = sum_a softmax(z_t)[a] * q_t[a]` at the positions where `value_mask` is set; 0 elsewhere; no grad.

    Args:
        hidden: `[B, T, H]` final hidden states.
        logits: `[B, T, |V|]` LM logits (the policy `pi`).
        q_head: the Q head.
        value_mask: `[B, T]` bool, where `V` is needed.
        chunk_size: positions per chunk; bounds the extra memory to two `[chunk_size, |V|]` fp32 buffers.
    """
    values = torch.zeros(value_mask.shape, dtype=torch.float32, device=hidden.device)
    rows, cols = value_mask.nonzero(as_tuple=True)
    for start in range(0, rows.numel(), chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        policy = torch.softmax(logits[r, c].float(), dim=-1)
        q = q_head(hidden[r, c].to(q_head.weight.dtype))
        values[r, c] = (policy * q).sum(-1)
    return values


def lm_loss_sum(logits: torch.Tensor, actions: torch.LongTensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `z_t` against `a_t` over the action positions (no shifted copy of the logits)."""
    targets = actions.masked_fill(~action_mask, -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


def qhead_loss(
    logits: torch.Tensor,
    action_q: torch.Tensor,
    values: torch.Tensor,
    actions: torch.LongTensor,
    action_mask: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    *,
    gamma: float,
    gae_lambda: float | None,
    q_weight: float,
    num_items: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`L = L_LM + q_weight * L_Q` over the action positions, and detached statistics for logging.

    Args:
        logits: `[B, T, |V|]` LM logits.
        action_q: `[B, T]` `Q(s_t, a_t)` (with grad).
        values: `[B, T]` `V(s_t)` (no grad), filled at least where `compute_returns` reads it.
        actions, action_mask, rewards, dones: the MDP on the position grid (see `trl_qhead.mdp`).
        gamma, gae_lambda: as in `compute_returns`.
        q_weight: weight of `L_Q`.
        num_items: the number of actions the loss is averaged over; defaults to this batch's. The trainer passes the
            count over all gradient-accumulation micro-batches and processes, as transformers does for `L_LM`.

    Returns:
        `(loss, stats)`: `stats` holds `loss_lm`, `loss_q` (means over this batch's actions), `q_mean`, `g_mean`.
    """
    mask = action_mask.float()
    local_items = mask.sum().clamp(min=1)
    denominator = local_items if num_items is None else num_items
    returns = compute_returns(rewards, values, action_mask, gamma=gamma, gae_lambda=gae_lambda, dones=dones)
    lm_sum = lm_loss_sum(logits, actions, action_mask)
    q_sum = (((action_q - returns) ** 2) * mask).sum()
    loss = (lm_sum + q_weight * q_sum) / denominator
    stats = {
        "loss_lm": lm_sum.detach() / local_items,
        "loss_q": q_sum.detach() / local_items,
        "q_mean": (action_q.detach() * mask).sum() / local_items,
        "g_mean": (returns * mask).sum() / local_items,
    }
    return loss, stats


def dense_qhead_loss(
    logits: torch.Tensor,
    q_values: torch.Tensor,
    actions: torch.LongTensor,
    action_mask: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    *,
    gamma: float,
    gae_lambda: float | None,
    q_weight: float,
) -> torch.Tensor:
    """The naive reference: full `[B, T, |V|]` Q values, `V` from the dense softmax, plain means.

    Slow and memory-hungry on purpose: it is the obvious reading of DESIGN.md section 2, used to check the fast path.
    """
    mask = action_mask.float()
    n = mask.sum().clamp(min=1)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    lm = -(log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1) * mask).sum() / n
    values = (log_probs.exp() * q_values).sum(-1).detach()
    returns = compute_returns(rewards, values, action_mask, gamma=gamma, gae_lambda=gae_lambda, dones=dones)
    action_q = q_values.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return lm + q_weight * (((action_q - returns) ** 2) * mask).sum() / n
