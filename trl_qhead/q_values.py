"""Reading the Q head without multiplying it out over the vocabulary (docs/DESIGN.md section 4).

- `Q(s_t, a_t)` needs one row of `W_q` per position: gather it and take a dot product with `h_t` (O(T*H)).
- `V(s) = sum_a pi(a|s) Q(s, a)` is a target, so it needs no grad, and only where the returns read it, in chunks so
  that no `[B, T, |V|]` buffer is made. (The training path takes `V` from the chunked LM-head kernel instead, which
  reuses its softmax; this is the path for models whose full logits are at hand.)

Both work for the dense head (`nn.Linear`) and the tied head (`tied_head.TiedQHead`, `Q = W_lm (U h) + b`): for the
tied head `Q(s_t, a_t) = W_lm[a_t] . (U h_t) + b[a_t]` and `V(s) = (pi^T W_lm) . (U h) + pi^T b`, one `|V| x H`
product per state and no `|V|`-sized Q buffer.
"""

from __future__ import annotations

import torch
from torch import nn

from .tied_head import TiedQHead


def gather_action_q(hidden: torch.Tensor, q_head: nn.Module, actions: torch.LongTensor) -> torch.Tensor:
    """`Q(s_t, a_t) = W_q[a_t] . h_t + b_q[a_t]` for every position, `[B, T]` in fp32; grad reaches only those rows.

    For a tied head, `W_lm[a_t] . (U h_t) + b[a_t]` (grad reaches U and those entries of b, never `W_lm`)."""
    if isinstance(q_head, TiedQHead):
        return q_head.gather(hidden, actions)
    weight_rows = q_head.weight[actions]  # [B, T, H]
    return (hidden.to(weight_rows.dtype) * weight_rows).sum(-1) + q_head.bias[actions]


@torch.no_grad()
def state_values(
    hidden: torch.Tensor, logits: torch.Tensor, q_head: nn.Module, value_mask: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """`V(s_t) = sum_a softmax(z_t)[a] * q_t[a]` at the positions where `value_mask` is set; 0 elsewhere; no grad.

    Args:
        hidden: `[B, T, H]` final hidden states.
        logits: `[B, T, |V|]` LM logits (the policy `pi`).
        q_head: the Q head (dense or tied).
        value_mask: `[B, T]` bool, where `V` is needed.
        chunk_size: positions per chunk; bounds the extra memory to two `[chunk_size, |V|]` fp32 buffers.
    """
    values = torch.zeros(value_mask.shape, dtype=torch.float32, device=hidden.device)
    rows, cols = value_mask.nonzero(as_tuple=True)
    for start in range(0, rows.numel(), chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        policy = torch.softmax(logits[r, c].float(), dim=-1)
        if isinstance(q_head, TiedQHead):  # (pi^T W_lm) . (U h) + pi^T b
            weight = q_head.lm_weight()
            mean_row = (policy.to(weight.dtype) @ weight).float()
            values[r, c] = (mean_row * q_head.project(hidden[r, c])).sum(-1) + policy @ q_head.bias
            continue
        q = q_head(hidden[r, c].to(q_head.weight.dtype))
        values[r, c] = (policy * q).sum(-1)
    return values


def gather_candidate_q(hidden: torch.Tensor, q_head: nn.Module, candidate_ids: torch.LongTensor) -> torch.Tensor:
    """`Q(s_t, a) = W_q[a] . h_t + b_q[a]` for `k` ids per position: `[B, T, k]` in fp32 from `candidate_ids`
    `[B, T, k]`. Gathers `B * T * k` rows of `W_q` (O(T k H) memory and compute, no `|V|`-sized product); the gradient
    reaches only those rows (and `h_t`). `gather_action_q` is the case `k = 1`."""
    if isinstance(q_head, TiedQHead):  # W_lm[a] . (U h_t) + b[a], h_t broadcast over the k candidates
        return q_head.gather(hidden.unsqueeze(-2), candidate_ids)
    weight_rows = q_head.weight[candidate_ids]  # [B, T, k, H]
    q = torch.einsum("bth,btkh->btk", hidden.to(weight_rows.dtype), weight_rows)
    return q + q_head.bias[candidate_ids]
