"""Soft-optimal Q targets (DESIGN.md section 6): pure tensor functions, no model, no trainer.

Tilting the base policy token by token, `pi'(a|s) ∝ pi(a|s) exp(Q(s, a) / beta)`, reproduces the KL-regularised
optimum `pi(y) exp(R(y) / beta) / Z` over whole sequences exactly when Q is the soft-optimal Q of the base policy:

    Q*(s_t, a_t) = beta * log E_pi[exp(G_t / beta) | s_t, a_t]          (G_t the undiscounted return from t on)
                 = r_t + (1 - d_t) * V*(s_{t+1}),
    V*(s)        = beta * log sum_a pi(a|s) exp(Q*(s, a) / beta).

Regressing Q on sampled returns with the squared error learns the mean `Q^pi = E[G | s, a] <= Q*` instead. This module
holds the pieces that learn Q* from on-policy samples:

- `soft_state_values` / `chunked_soft_state_values`: V* from the LM logits and the Q head, the bootstrap values of
  `trl_qhead.returns.compute_returns(..., beta=beta)` (soft lambda-returns);
- `linex_loss`: the exponential-utility regression loss whose minimiser is `beta * log E[exp(y / beta)]`;
- `candidate_targets`: targets for the base model's top-k tokens at a sampled state, sharing the sampled continuation;
- `lookahead_soft_values`: a state's soft value one step ahead from its top-k tokens' probabilities and effects (the
  continuation value of two-step candidate labels);
- `prefix_shaped_rewards`: per-token rewards `R(prefix_{t+1}) - R(prefix_t)` (potential-based shaping).

Shapes follow `compute_returns`: `[B, T]` tensors on the model's position grid, position t holding state `s_t` and,
where `action_mask[b, t]` is set, the action `a_t = x_{t+1}`; vocabulary-sized tensors are `[..., V]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .heads import QHead, linear_q
from .returns import check_beta

__all__ = [
    "candidate_targets",
    "chunked_soft_state_values",
    "linex_loss",
    "prefix_shaped_rewards",
    "soft_state_values",
]


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The promotion of the inputs' dtypes and float32 (float32 for half/bf16/int, float64 if any is float64)."""
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def soft_state_values(logits: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """`V*(s) = beta * logsumexp_a(log_softmax(logits)[a] + q[a] / beta)` over the last (vocabulary) dimension.

    That is `beta * log E_{a ~ pi}[exp(Q(s, a) / beta)]` with `pi = softmax(logits)`: the soft value of the state under
    the base policy, which `compute_returns(..., beta=beta)` bootstraps from. It lies between the mean
    `sum_a pi(a) q[a]` (its limit as beta -> inf) and `max_a q[a]` over the tokens with `pi(a) > 0` (as beta -> 0).
    Computed with `log_softmax` and `logsumexp`, so it is finite for small beta and large Q; tokens with logit `-inf`
    (masked out, e.g. by top-k) do not count.

    Args:
        logits: `[..., V]` LM logits (any offset per row; only `log_softmax(logits)` is used).
        q: `[..., V]` Q values, the same shape.
        beta: the tilt's temperature, a finite float > 0.

    Returns:
        `[...]` soft values in the promotion of the inputs' dtypes and float32; differentiable (detach it for a target).
    """
    beta = check_beta(beta)
    if logits.shape != q.shape:
        raise ValueError(f"`logits` {tuple(logits.shape)} and `q` {tuple(q.shape)} must have the same shape")
    dtype = _float_dtype(logits, q)
    log_pi = torch.log_softmax(logits.to(dtype), dim=-1)
    return beta * torch.logsumexp(log_pi + q.to(dtype) / beta, dim=-1)


@torch.no_grad()
def chunked_soft_state_values(
    hidden: torch.Tensor,
    value_mask: torch.Tensor,
    beta: float,
    *,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    lm_weight: torch.Tensor | None = None,
    lm_bias: torch.Tensor | None = None,
    q_project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_size: int = 1024,
    q_head: QHead | None = None,
    q_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """`V*(s_t)` (as `soft_state_values`) at the positions where `value_mask` is set, a chunk of positions at a time.

    The counterpart of `trl_qhead.losses.state_values` for the soft value: the Q values `q = hidden @ q_weight.T +
    q_bias` are computed `chunk_size` positions at a time, so no `[B, T, V]` Q buffer is made. The policy comes either
    from `logits` (`[B, T, V]`, when the caller already holds them, as `state_values` takes them) or, when `logits` is
    None, from `hidden @ lm_weight.T + lm_bias`, also per chunk (the fused path of `action_logprobs_and_values`: no
    `[B, T, V]` buffer at all). Only the masked positions of `hidden` (and `logits`) are read; the rest may hold
    anything, NaN included. Each product runs in its weight's own dtype, as the model's heads do (no copy of a
    `[V, H]` weight is made; the Q head is normally fp32), and the log-softmax / log-sum-exp in float32 or higher
    (`q / beta` with small beta magnifies rounding).

    Args:
        hidden: `[B, T, H]` final hidden states.
        value_mask: `[B, T]` bool or 0/1, where V* is wanted: for `compute_returns` with `gae_lambda` None or 1 the
            position after each row's last action, for lambda < 1 the position after every action.
        beta: a finite float > 0.
        q_weight, q_bias: the Q head, `[V, H]` and `[V]` (or None), as raw weights; or pass `q_head` instead.
        q_head: a `trl_qhead.heads.QHead`: V* is its `soft_value` on each chunk (its features from `q_features`,
            `[B, T, F]`, when the caller has them, else from `q_head.features` of the chunk's hidden states).
        q_project: optional map applied to each chunk of hidden states before the Q product: the tied head's
            `h -> U h` (with `q_weight` its `W_lm`), so that `Q = W_lm (U h) + b` costs an H x H product per position
            on top of the `[V, H]` one, as a dense head does.
        logits: optional `[B, T, V]` LM logits; exactly one of `logits` and `lm_weight` must be given.
        lm_weight, lm_bias: the LM head, `[V, H]` and `[V]` (or None), used when `logits` is None (a plain linear
            head; heads that post-process their logits need `logits`).
        chunk_size: positions per chunk; bounds the extra memory to a few `[chunk_size, V]` buffers.

    Returns:
        `[B, T]` detached soft values, 0 where `value_mask` is 0, in the promotion of float32 and the inputs' dtypes.
    """
    beta = check_beta(beta)
    if (logits is None) == (lm_weight is None):
        raise ValueError("pass exactly one of `logits` (the LM logits) and `lm_weight` (the LM head's weight)")
    if (q_weight is None) == (q_head is None):
        raise ValueError("pass exactly one of `q_weight` (the Q head's weight) and `q_head` (a QHead)")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}")
    if hidden.dim() != 3 or value_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"`hidden` must be [B, T, H] and `value_mask` [B, T], got {tuple(hidden.shape)}, {tuple(value_mask.shape)}"
        )
    if logits is not None and logits.shape[:2] != hidden.shape[:2]:
        raise ValueError(f"`logits` must be [B, T, V] on `hidden`'s grid, got {tuple(logits.shape)}")
    policy_source = logits if logits is not None else lm_weight
    dtype = _float_dtype(hidden, hidden if q_weight is None else q_weight, policy_source)
    wq = None if q_weight is None else q_weight.detach()
    bq = None if q_bias is None or wq is None else q_bias.detach().to(wq.dtype)
    wz = None if lm_weight is None else lm_weight.detach()
    bz = None if lm_bias is None or wz is None else lm_bias.detach().to(wz.dtype)
    values = torch.zeros(value_mask.shape, dtype=dtype, device=hidden.device)
    rows, cols = (value_mask != 0).nonzero(as_tuple=True)
    for start in range(0, rows.numel(), chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        h = hidden[r, c]
        z = logits[r, c] if logits is not None else F.linear(h.to(wz.dtype), wz, bz)
        if q_head is not None:
            features = q_features[r, c] if q_features is not None else q_head.features(h)
            log_pi = torch.log_softmax(z.to(dtype), dim=-1)
            values[r, c] = q_head.soft_value(features.detach(), log_pi, beta).to(dtype)
            continue
        q = linear_q(h if q_project is None else q_project(h).detach(), wq, bq).to(dtype)
        values[r, c] = soft_state_values(z.to(dtype), q, beta)
    return values


def linex_loss(
    q: torch.Tensor,
    target: torch.Tensor,
    beta: float,
    mask: torch.Tensor,
    *,
    max_exponent: float = 20.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Exponential-utility (LINEX) regression loss `beta^2 (exp(u) - u - 1)`, `u = (target - q) / beta`, over a mask.

    Convex in `q`, with `dl/dq = beta (1 - exp(u))`: for samples `y_i` (weights `w_i`) sharing one `q`, the minimiser
    is `beta * log(sum_i w_i exp(y_i / beta) / sum_i w_i)`, the soft value, where the squared error's is the mean.
    Regressed on on-policy returns (plain Monte Carlo, or the soft lambda-returns of `compute_returns(..., beta=...)`)
    it therefore learns `Q*(s, a) = beta log E[exp(G / beta) | s, a]`. As beta -> inf it tends to `(target - q)^2 / 2`,
    half the squared error of `L_Q` (same minimiser, the mean).

    Numerics (all in the inputs' dtype promoted to float32):
    - Large exponents: beyond `u > max_exponent` the exponential is replaced by its tangent at `max_exponent`,
      `exp(c) (1 + u - c)`, so the loss continues linearly in q and its gradient stays bounded by
      `beta (exp(max_exponent) - 1)` instead of overflowing (the loss stays convex and continuously differentiable).
      What that changes: only samples lying more than `beta * max_exponent` above `q` are affected, and their pull is
      capped. At the exact minimiser every sample with weight share `w_i / sum w` satisfies `u_i <= log(sum w / w_i)`,
      so the minimiser is unchanged as long as every weight share is at least `exp(-max_exponent)` (with equal
      weights: fewer than `exp(20) ~ 5e8` samples per Q); a rarer, larger sample pulls q up less than the exact
      soft value would (a Huber-like robustness). Far from the optimum (early training, q << target) the steps are
      bounded rather than exponential. Keep `max_exponent` below ~80 in float32 (exp(88) overflows).
    - Very negative `u` (q far above the target) needs nothing: `exp(u) -> 0` and the loss is linear, `-beta^2 (u + 1)`.
    - Small `|u|` (large beta): `exp(u) - u - 1` cancels catastrophically, so for `|u| < 0.1` its Taylor series to
      `u^10` is used (truncation below 1e-16 relative); elsewhere `expm1(u) - u` (relative error about
      `2 eps / |u|`, under 3e-6 in float32).
    Positions where `mask` is 0 are never read: `q` and `target` may hold anything there, NaN included.

    Args:
        q: `[...]` predictions (e.g. `Q(s_t, a_t)`, `[B, T]`, with grad).
        target: `[...]` targets, the same shape (detached here).
        beta: a finite float > 0.
        mask: `[...]` bool / 0-1, or non-negative float weights.
        max_exponent: `c` above: where the exponential turns linear; > 0.
        reduction: `"mean"` (`sum(w l) / sum(w)`, 0 when `sum(w) == 0`), `"sum"` (`sum(w l)`, for a caller that
            normalises by its own item count across micro-batches) or `"none"` (`w l` per position, 0 off the mask).
    """
    beta = check_beta(beta)
    if not (math.isfinite(max_exponent) and max_exponent > 0):
        raise ValueError(f"`max_exponent` must be a finite number > 0, got {max_exponent!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"`reduction` must be 'mean', 'sum' or 'none', got {reduction!r}")
    if q.shape != target.shape or q.shape != mask.shape:
        raise ValueError(
            f"`q`, `target` and `mask` must have the same shape, got {tuple(q.shape)}, {tuple(target.shape)}, "
            f"{tuple(mask.shape)}"
        )
    dtype = _float_dtype(q, target)
    keep = mask != 0
    weights = mask.to(dtype)
    # torch.where keeps NaN off the mask out of the forward and gives those positions a zero gradient.
    u = torch.where(keep, (target.detach().to(dtype) - q.to(dtype)) / beta, 0.0)
    # exp(u) - u - 1, with exp continued by its tangent beyond c (each branch sees only inputs safe for it).
    c = float(max_exponent)
    # (u - c).clamp(min=0), not u - u.clamp(max=c): below c its gradient must be exactly 0, not e^c - e^c (which
    # rounds to ~e^c * eps and would shift the minimiser).
    phi_big = torch.expm1(u.clamp(max=c)) - u + math.exp(c) * (u - c).clamp(min=0.0)
    small = u.abs() < 0.1
    s = torch.where(small, u, 0.0)
    series = torch.full_like(s, 1 / math.factorial(10))  # Horner: sum_{k=2}^{10} s^k / k!
    for k in range(9, 1, -1):
        series = series * s + 1 / math.factorial(k)
    phi_small = s * s * series
    loss = beta**2 * torch.where(small, phi_small, phi_big)
    loss = torch.where(keep, loss * weights, 0.0)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    weight_sum = weights.sum()
    return total / torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))


def candidate_targets(
    sampled_return: torch.Tensor, candidate_effects: torch.Tensor, sampled_effect: torch.Tensor
) -> torch.Tensor:
    """Targets for k candidate tokens at each sampled state: `G_t + r'(s_t, a) - r'(s_t, a_t)`, `[B, T, k]`.

    The candidate shares the sampled continuation: its target swaps the sampled action's immediate effect
    `r'(s_t, a_t)` for the candidate's `r'(s_t, a)` (e.g. `R(prefix + a) - R(prefix)`, the reward of the prefix) and
    keeps the rest of the sampled return `G_t - r'(s_t, a_t)`, the return C of the continuation after `a_t`.

    What it estimates, exactly: its expectation over the continuation is `r'(s, a) + E[C | s, a_t]`, which equals
    `Q^pi(s, a) = r'(s, a) + E[C | s, a]` exactly when the expected return after step t does not depend on the token
    chosen at t: later rewards and the policy's later choices must not depend on it (e.g. a reward additive over
    tokens, each token's term depending only on that token and its position, and a continuation whose distribution
    does not depend on the choice, such as a fixed length with no EOS among the candidates). Then, for the soft
    target too, `beta log E[exp(target / beta)] = Q*(s, a)`. Otherwise the error is `E[C | s, a_t] - E[C | s, a]`:
    the label is one-step (a candidate that ends the episode, like EOS, or changes what follows, gets the sampled
    token's future).

    Args:
        sampled_return: `[B, T]` the target of the sampled action, `G_t` (e.g. from `compute_returns`).
        candidate_effects: `[B, T, k]` `r'(s_t, a)` for each candidate `a`.
        sampled_effect: `[B, T]` `r'(s_t, a_t)` for the sampled action, on the same scale as `G_t`.

    Returns:
        `[B, T, k]` targets (in the promotion of the inputs' dtypes); no mask is applied: positions without an action
        and invalid candidates are the loss's to mask (broadcast the `[B, T]` action mask to `[B, T, k]`).
    """
    if sampled_return.shape != sampled_effect.shape or candidate_effects.shape[:-1] != sampled_return.shape:
        raise ValueError(
            f"expected `sampled_return` and `sampled_effect` [B, T] and `candidate_effects` [B, T, k], got "
            f"{tuple(sampled_return.shape)}, {tuple(sampled_effect.shape)}, {tuple(candidate_effects.shape)}"
        )
    return (sampled_return - sampled_effect).unsqueeze(-1) + candidate_effects


def lookahead_soft_values(log_probs: torch.Tensor, effects: torch.Tensor, beta: float) -> torch.Tensor:
    """The soft value of a state one step ahead, from its top-k next tokens: `[...]` from `[..., k]`.

        V1(s) = beta log( sum_b pi(b|s) exp(r'(s, b) / beta) + (1 - sum_b pi(b|s)) )

    `r'(s, b)` is the effect of next token `b` (e.g. `R(prefix + b) - R(prefix)`) and the tokens outside the top-k are
    counted with effect 0. It is `Q*_beta`'s continuation value when the episode ends one step later (docs/DESIGN.md
    section 6): the two-step candidate label of `a` at `s` is `r'(s, a) + V1(s + a)`. Computed as one logsumexp (stable
    for beta down to 0.01); `beta -> 0` gives `max(0, max_b r'(s, b))` while the top-k leave probability outside
    them, `beta -> inf` the mean effect `sum_b pi(b|s) r'(s, b)`.

    Args:
        log_probs: `[..., k]` `log pi(b|s)` of the top-k next tokens.
        effects: `[..., k]` their effects.
        beta: the temperature (> 0), the tilt's `beta`.
    """
    beta = check_beta(beta)
    if log_probs.shape != effects.shape:
        raise ValueError(
            f"`log_probs` and `effects` must have one shape, got {tuple(log_probs.shape)} and {tuple(effects.shape)}."
        )
    dtype = _float_dtype(log_probs, effects)
    log_probs, effects = log_probs.to(dtype), effects.to(dtype)
    rest = (-torch.expm1(torch.logsumexp(log_probs, dim=-1))).clamp_min(0.0)  # 1 - sum_b pi(b|s), (...)
    terms = torch.cat([log_probs + effects / beta, rest.log().unsqueeze(-1)], dim=-1)  # (..., k + 1)
    return beta * torch.logsumexp(terms, dim=-1)


def prefix_shaped_rewards(prefix_scores: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards from a reward of prefixes: `r_t = R(prefix_{t+1}) - R(prefix_t)` at the action positions.

    `prefix_scores[b, t]` is the reward `R` of the prefix ending at position t (the state `s_t`: prompt plus the
    completion so far), so the action at t, which moves the prefix from position t to t + 1, is paid
    `prefix_scores[b, t + 1] - prefix_scores[b, t]`. Over a row's run of actions `first..last` the rewards telescope to
    `prefix_scores[b, last + 1] - prefix_scores[b, first]`: the reward of the whole sequence minus the score of the
    prompt with an empty completion (the state before the first action). That subtracted score is one constant per
    row; add it to the first action's reward if the returns must sum to the sequence reward itself.

    This is potential-based shaping (potential `R` on non-terminal prefixes, 0 after the episode ends, the terminal
    reward `R(y)` replaced by the increments): every return `G_t` from t on (gamma = 1) becomes `G_t - R(prefix_t)`,
    so Q^pi and Q* both change by the per-state constant `-R(prefix_t)` and the tilted policy is unchanged, while the
    targets lose the variance of the part of R already decided by the prefix. Bootstrap values for rows cut before
    their end must be on the same (shaped) scale. One row holds one episode (a prompt and its completion): a packed
    row with several documents needs its scores to restart per document, which one position cannot express at the
    boundary state (it ends one episode and starts the next).

    Args:
        prefix_scores: `[B, T]` `R(prefix_t)` at each position; read only at action positions and the position after
            each; may hold anything (NaN included) elsewhere.
        action_mask: `[B, T]` bool or 0/1, 1 where position t holds an action; position T - 1 must not hold one.

    Returns:
        `[B, T]` rewards, 0 where `action_mask` is 0, in `prefix_scores`' dtype promoted to float32.
    """
    if prefix_scores.dim() != 2 or action_mask.shape != prefix_scores.shape:
        raise ValueError(
            f"`prefix_scores` and `action_mask` must both be [B, T], got {tuple(prefix_scores.shape)}, "
            f"{tuple(action_mask.shape)}"
        )
    act = action_mask != 0
    if act[:, -1:].any():
        raise ValueError("`action_mask` has an action at the last position; its next prefix is off the grid")
    scores = prefix_scores.to(_float_dtype(prefix_scores))
    rewards = torch.zeros_like(scores)
    rewards[:, :-1] = torch.where(act[:, :-1], scores[:, 1:] - scores[:, :-1], 0.0)
    return rewards
