"""The math of the tilt, as pure tensor functions: `log pi' = log_softmax(z + Q / beta)` and its exact KL to `pi`.

`QTiltLogitsProcessor` applies `tilt_logprobs_and_kl` once per generation step; `tilt_logprobs` and `tilt_kl` are the
plain definitions, for users and tests.
"""

from __future__ import annotations

import math

import torch


def check_top_k(top_k) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive integer or None, got {top_k!r}.")
    return top_k


def tilt_logprobs(
    scores: torch.Tensor, q: torch.Tensor, beta: float, top_k_indices: torch.LongTensor | None = None
) -> torch.Tensor:
    """`log pi'(.|s) = log_softmax(scores + q / beta)`, optionally restricted to some tokens.

    Args:
        scores: `[N, |V|]` base scores `z` (logits or log-probs: `pi = softmax(z)` either way).
        q: `[N, |V|]` Q values, or `[N, k]` Q values of the tokens in `top_k_indices`.
        beta: temperature of the tilt, `> 0`; `inf` adds nothing.
        top_k_indices: `[N, k]`; when given only these tokens keep their (tilted) score, all others get `-inf`.

    Returns:
        `[N, |V|]` fp32 normalised log-probabilities of the tilted policy.
    """
    return tilt_logprobs_and_kl(scores, q, beta, top_k_indices, with_kl=False)[0]


def tilt_kl(scores: torch.Tensor, tilted_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact `KL(pi' || pi) = sum_a pi'(a) (log pi'(a) - log pi(a))` over the whole vocabulary, one value per row.

    The plain definition (the processor uses an equivalent form that reuses what the tilt already computed).

    Args:
        scores: `[N, |V|]` base scores, `pi = softmax(scores)`.
        tilted_logprobs: `[N, |V|]` `log pi'` (e.g. from `tilt_logprobs`); tokens with `pi' = 0` contribute 0.
    """
    base = torch.log_softmax(scores.float(), dim=-1)
    terms = tilted_logprobs.exp() * (tilted_logprobs - base)
    # 0 * (-inf - -inf) is NaN in floating point but 0 in the sum: tokens masked out of pi' add nothing.
    return torch.where(torch.isfinite(tilted_logprobs), terms, torch.zeros_like(terms)).sum(-1)


def tilt_logprobs_and_kl(
    scores: torch.Tensor, q: torch.Tensor, beta: float, indices: torch.LongTensor | None, with_kl: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`log pi'` `(N, V)` and, if asked, `KL(pi' || pi)` `(N,)` (else `None`); arguments as for `tilt_logprobs`.

    With `t = q / beta` on the tokens `pi'` keeps, `log pi' - log pi = t - log Z' + log Z`, so
    `KL = sum_a pi'(a) t(a) - log Z' + log Z`: one log-sum-exp of the scores and a dot product on top of the tilt.

    Any beta > 0 is safe: the tilt is `(q - max q) / beta`, exactly 0 at the max (even where beta rounds to 0 in
    fp32) and clamped to `[-inf, 0]`, where the max runs over the tokens the scores allow (finite score, kept by
    top-k). A per-row constant changes neither pi' nor the KL, and this form neither overflows to `+inf` nor forms
    `inf - inf` or `0 / 0`: as beta -> 0 it tends to its limit, `pi` restricted to the allowed tokens of largest Q
    (greedy takes argmax Q, ties broken by the scores). Tokens with `pi' = 0` add 0 to the KL (never `0 * -inf`).
    """
    scores = scores.float()
    kept_scores = scores if indices is None else scores.gather(-1, indices)
    if math.isfinite(beta):
        q = q.float()
        q_max = torch.where(kept_scores > float("-inf"), q, float("-inf")).amax(dim=-1, keepdim=True)
        below = q - q_max
        shift = torch.where(below == 0, 0.0, below / beta).clamp(max=0.0)
    else:
        shift = torch.zeros_like(q, dtype=torch.float32)
    if indices is None:
        tilted = scores + shift
    else:
        tilted = torch.full_like(scores, float("-inf")).scatter_(-1, indices, kept_scores + shift)
    log_norm = torch.logsumexp(tilted, dim=-1, keepdim=True)
    logprobs = tilted - log_norm
    if not with_kl:
        return logprobs, None
    kept = logprobs if indices is None else logprobs.gather(-1, indices)
    probs = kept.exp()
    expected_shift = torch.where(probs > 0, probs * shift, 0.0).sum(-1)  # pi' = 0 (shift may be -inf) adds 0
    return logprobs, expected_shift - log_norm[:, 0] + torch.logsumexp(scores, dim=-1)
