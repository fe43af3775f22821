"""Slow, obvious references the tests (and `recipes/benchmark_training.py`) check the library against.

They are written straight from docs/DESIGN.md and share no code path with the efficient implementation except
`compute_returns` (tested on its own against the formulas in `test_returns.py`) and the MDP grid helpers.
"""

from __future__ import annotations

from typing import Any

import torch

from trl_qhead.mdp import action_mask_from_labels, sequence_rewards_to_actions, token_rewards_to_actions
from trl_qhead.returns import compute_returns


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
    """The naive reference: full `(B, T, V)` Q values, `V` from the dense softmax, plain means.

    Slow and memory-hungry on purpose: it is the obvious reading of the math, used to check the fast path.
    """
    mask = action_mask.float()
    n = mask.sum().clamp(min=1)
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    lm = -(log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1) * mask).sum() / n
    values = (log_probs.exp() * q_values).sum(-1).detach()  # (B, T)
    returns = compute_returns(rewards, values, action_mask, gamma=gamma, gae_lambda=gae_lambda, dones=dones)
    action_q = q_values.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return lm + q_weight * (((action_q - returns) ** 2) * mask).sum() / n


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
        if action_mask is None:  # every real token is a target
            action_mask = action_mask_from_labels(torch.zeros_like(input_ids), batch["attention_mask"])
        rewards = rewards + sequence_rewards_to_actions(batch["reward"], action_mask)
    return rewards
