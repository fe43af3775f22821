"""Reading a Q head without multiplying it out over the vocabulary (docs/DESIGN.md section 4), for any `QHead`.

- `Q(s_t, a_t)` (and `Q(s_t, c)` for k candidates) is the head's `gather`: a linear head gathers one row of its
  weight per id and takes a dot product with its features (O(T k F)).
- `V(s) = sum_a pi(a|s) Q(s, a)` is a target, so it needs no grad, and only where the returns read it, in chunks so
  that no `[B, T, |V|]` buffer is made (the head's `expected_value`). The training path takes `V` from the chunked
  LM-head kernel instead, which reuses its softmax; this is the path for models whose full logits are at hand.

`q_head` may be any `QHead` or a plain `nn.Linear` (a dense head); `features` (what `q_head.features` returns for
`hidden`) saves recomputing them when the caller has them.
"""

from __future__ import annotations

import torch
from torch import nn

from .heads import QContext, as_q_head


def gather_candidate_q(
    hidden: torch.Tensor,
    q_head: nn.Module,
    candidate_ids: torch.LongTensor,
    *,
    context: QContext | None = None,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """`Q(s_t, a)` for `k` ids per position: `[B, T, k]` in fp32 from `hidden` `[B, T, H]` and `candidate_ids`
    `[B, T, k]`. A linear head gathers `B * T * k` rows (O(T k F) memory and compute, no `|V|`-sized product); the
    gradient reaches only those rows (and `h_t`). `gather_action_q` is the case `k = 1`."""
    head = as_q_head(q_head)
    return head.gather(head.features(hidden, context) if features is None else features, candidate_ids)


def gather_action_q(
    hidden: torch.Tensor,
    q_head: nn.Module,
    actions: torch.LongTensor,
    *,
    context: QContext | None = None,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """`Q(s_t, a_t)` for every position, `[B, T]` in fp32 (dense: `W_q[a_t] . h_t + b_q[a_t]`; tied:
    `W_lm[a_t] . (U h_t) + b[a_t]`); the gradient reaches only the gathered rows (never `W_lm`)."""
    return gather_candidate_q(hidden, q_head, actions.unsqueeze(-1), context=context, features=features)[..., 0]


@torch.no_grad()
def state_values(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    q_head: nn.Module,
    value_mask: torch.Tensor,
    chunk_size: int = 1024,
    *,
    context: QContext | None = None,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """`V(s_t) = sum_a softmax(z_t)[a] * q_t[a]` at the positions where `value_mask` is set; 0 elsewhere; no grad.

    Args:
        hidden: `[B, T, H]` final hidden states.
        logits: `[B, T, |V|]` LM logits (the policy `pi`).
        q_head: the Q head.
        value_mask: `[B, T]` bool, where `V` is needed.
        chunk_size: positions per chunk; bounds the extra memory to a few `[chunk_size, |V|]` fp32 buffers.
        context, features: see the module docstring.
    """
    head = as_q_head(q_head)
    if features is None:
        features = head.features(hidden, context)
    values = torch.zeros(value_mask.shape, dtype=torch.float32, device=hidden.device)
    rows, cols = value_mask.nonzero(as_tuple=True)
    for start in range(0, rows.numel(), chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        policy = torch.softmax(logits[r, c].float(), dim=-1)
        values[r, c] = head.expected_value(features[r, c], policy).float()
    return values
