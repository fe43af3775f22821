"""The chunked LM-head kernel: `log pi(a_t|s_t)` (with grad) and `V(s_t)` (no grad) from the final hidden states,
a chunk of positions at a time, so that training never holds `(B, T, V)` logits (docs/DESIGN.md section 4).

The forward projects each chunk through the LM head and keeps only its log-sum-exp; the backward recomputes the chunk
and turns it into its gradient in place (TRL's fused-LM-head idea). When `V` is needed at every position (lambda < 1)
it is folded into the same pass, reusing each chunk's softmax: one Q-head product per chunk (the head's
`expected_value`, `heads.base`), no second LM head.
"""

from __future__ import annotations

import torch
from torch import nn

from .heads import QHead, as_q_head

# `torch.addmm(..., out_dtype=torch.float32)` from bf16/fp16 inputs, CUDA only.
_MM_OUT_DTYPE = torch.__version__ >= "2.8"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b` into an fp32 `acc`, without rounding `a @ b` to a low precision first (as TRL's fused head)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _MM_OUT_DTYPE and acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _ChunkedLogProbs(torch.autograd.Function):
    """`log softmax(h W^T + b)[target]` for `N` rows of `h`, `chunk_size` rows at a time, and optionally (no grad)
    `V = sum_a softmax(z)_a Q_a` for the rows in `value_rows`, from the same softmax (`value_fn(policy, rows, w)`
    with `w` the LM head's weight in the compute dtype, which a head tied to it reuses).

    Memory: a few `[chunk_size, |V|]` buffers, never `[N, |V|]`. The backward recomputes each chunk's logits and turns
    them into their gradient in place (`d log p_t / dz = onehot(t) - softmax(z)`), as TRL's `ChunkedLogProbFunction`
    does; here the chunks are positions with the whole vocabulary, so the log-sum-exp is exact in one pass and the
    softmax is there to be reused for `V`. Under autocast the products run in the autocast dtype and the softmax in
    fp32; weight gradients accumulate in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, value_rows, chunk_size, value_fn=None):
        ctx.set_materialize_grads(False)
        dtype = _compute_dtype(hidden)
        fp = torch.promote_types(dtype, torch.float32)  # the softmax's precision: fp32, or fp64 for fp64 inputs
        n_rows = hidden.shape[0]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        log_z = hidden.new_empty(n_rows, dtype=fp)
        logprobs = hidden.new_empty(n_rows, dtype=fp)
        values = None if value_rows is None else hidden.new_zeros(n_rows, dtype=fp)
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            h = hidden[start:end].to(dtype)
            z = torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())
            z = z.to(fp)
            lz = torch.logsumexp(z, dim=-1)
            log_z[start:end] = lz
            logprobs[start:end] = z.gather(1, targets[start:end, None]).squeeze(1) - lz
            if value_rows is None:
                continue
            rows = value_rows[start:end].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            every_row = rows.numel() == end - start
            # The softmax of the rows that need V, in place when that is all of them (lambda < 1).
            policy = (z if every_row else z[rows]).sub_(lz[rows, None]).exp_()
            values[start + rows] = value_fn(policy, start + rows, w).to(fp)
        ctx.save_for_backward(hidden, weight, bias, targets, log_z)
        ctx.compute_dtype, ctx.chunk_size = dtype, chunk_size
        if values is not None:
            ctx.mark_non_differentiable(values)
        return logprobs, values

    @staticmethod
    def backward(ctx, grad_logprobs, grad_values):
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if grad_logprobs is None:
            return (None,) * 7
        dtype, chunk_size = ctx.compute_dtype, ctx.chunk_size
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        fp = log_z.dtype
        g = grad_logprobs.to(fp)
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=fp, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=fp, device=bias.device) if needs_bias else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end].to(dtype)
            z = torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())
            g_chunk = g[start:end, None]
            # dL/dz = g * (onehot(target) - softmax(z)), built in the logits' own buffer.
            grad_z = z.to(fp).sub_(log_z[start:end, None]).exp_().mul_(-g_chunk)
            grad_z.scatter_add_(1, targets[start:end, None], g_chunk)
            grad_z = grad_z.to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = torch.mm(grad_z, w)
            if grad_weight is not None:
                _accumulate_mm(grad_weight, grad_z.t(), h)
            if grad_bias is not None:
                grad_bias += grad_z.sum(0, dtype=fp)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def action_logprobs_and_values(
    hidden: torch.Tensor,
    lm_head: nn.Linear,
    actions: torch.LongTensor,
    logprob_mask: torch.Tensor,
    *,
    q_head: nn.Module | None = None,
    value_mask: torch.Tensor | None = None,
    chunk_size: int = 256,
    q_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`log pi(a_t|s_t)` (with grad) and `V(s_t)` (no grad) without a `(B, T, V)` buffer (docs/DESIGN.md section 4).

    Args:
        hidden: `[B, T, H]` final hidden states.
        lm_head: the LM head, a plain `nn.Linear` (`z = W h + b`); heads that post-process their logits need the
            full logits instead (`AutoModelForCausalLMWithQHead` falls back by itself).
        actions: `[B, T]` the token taken at each position.
        logprob_mask: `[B, T]` bool, where the log-probs are wanted; 0 elsewhere.
        q_head: the Q head (a `QHead`, or a plain `nn.Linear` dense head), needed with `value_mask`: `V` is its
            `expected_value` on each chunk's softmax (a linear head: `(pi^T W) . f + pi^T b`, an `[rows, F]` buffer
            instead of a `[rows, |V|]` one; a head whose weight is the LM head's reuses it in the compute dtype).
        value_mask: `[B, T]` bool, where `V(s)` is wanted; 0 elsewhere. Computed in the same pass as the log-probs.
        chunk_size: positions per chunk: bounds the logits-sized buffers to a few `[chunk_size, |V|]`.
        q_features: `[B, T, F]`, the head's features of `hidden` when the caller has them (else computed here for
            the rows that need V).

    Returns:
        `(logprobs, values)`, both `[B, T]` fp32; `values` is `None` without `value_mask`.
    """
    if value_mask is not None and q_head is None:
        raise ValueError("`value_mask` needs the `q_head` to compute V(s).")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
    logprob_mask = logprob_mask.bool()
    rows = logprob_mask if value_mask is None else logprob_mask | value_mask.bool()
    h = hidden[rows]
    # Rows that only need V (the bootstrap state) get any valid target; their log-prob is masked out below.
    targets = torch.where(logprob_mask, actions, 0)[rows]
    value_rows = value_fn = None
    if value_mask is not None:
        value_rows = value_mask.bool()[rows]
        value_fn = _value_reader(as_q_head(q_head), h, value_rows, q_features, rows, lm_head.weight)
    row_logprobs, row_values = _ChunkedLogProbs.apply(
        h, lm_head.weight, lm_head.bias, targets, value_rows, chunk_size, value_fn
    )
    logprobs = row_logprobs.new_zeros(rows.shape).masked_scatter(rows, row_logprobs)
    logprobs = torch.where(logprob_mask, logprobs, 0.0)
    values = None
    if row_values is not None:
        values = row_values.new_zeros(rows.shape).masked_scatter(rows, row_values)
        values = torch.where(value_mask.bool(), values, 0.0)
    return logprobs, values


@torch.no_grad()
def _value_reader(head: QHead, h, value_rows, q_features, rows, lm_weight):
    """`value_fn(policy, row_ids, w)` for the kernel: the head's `expected_value` on the features of those rows, with
    the linear form's weight read once (the kernel's `w` when it is the LM head's own weight, as for a tied head;
    under autocast the head's weight in the autocast dtype, as an `nn.Linear` would run)."""
    if q_features is not None:
        features = q_features[rows].detach()
    else:  # only the rows that need V
        chosen = head.features(h[value_rows].detach())
        features = chosen.new_zeros(h.shape[0], chosen.shape[-1])
        features[value_rows] = chosen
    form = head.linear_form()
    held: dict[str, torch.Tensor | None] = {}

    def value_fn(policy: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if "weight" not in held:
            weight = None if form is None else form.weight.detach()
            if weight is not None and weight.data_ptr() == lm_weight.data_ptr() and weight.shape == lm_weight.shape:
                weight = w  # the LM head's own weight, in the compute dtype already
            elif weight is not None and torch.is_autocast_enabled(w.device.type):
                weight = weight.to(w.dtype)
            held["weight"] = weight
        return head.expected_value(features[ids], policy, weight=held["weight"])

    return value_fn
