"""One forward pass for many one-token continuations of a sequence: `branch_top_k`.

Two-step candidate labels need the base model's next-token distribution after each candidate `a` of each labelled
state `j` of a sequence, `pi(. | x + c_{<j} + [a])`. Running every `x + c_{<j} + [a]` on its own costs one forward of
the whole prefix per (state, candidate) pair. Here each sequence runs once with its branch tokens appended, under a 4D
attention mask in which a branch token sees the prefix it continues and itself, at the position it would have in its
own sequence: the same hidden state, for `L + m` tokens of work instead of `m L` (`m` branches of an `L`-token row).

The mask is additive (0 where a token may attend, the dtype's minimum elsewhere), which the eager and SDPA attention
implementations of transformers take as given (`masking_utils`: a 4D mask is used as it is); FlashAttention-2 takes no
custom mask and is refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Mapping, Sequence

import torch

from .modeling import transformers_model

__all__ = ["branch_top_k", "check_branch_support"]


def _branch_inputs(
    sequences: Sequence[Sequence[int]],
    branches: Sequence[Sequence[tuple[int, int]]],
    pad_token_id: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """`(input_ids [B, W], position_ids [B, W], additive mask [B, 1, W, W], L)`: each row's tokens right-padded to
    `L`, then its branch tokens (padded to the batch's most branches); branch `(prefix_length, token)` sits at position
    `prefix_length` and sees the row's first `prefix_length` tokens and itself. Padding sees only itself."""
    length = max(len(s) for s in sequences)
    width = length + max(len(b) for b in branches)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((len(sequences), width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(sequences), 1, 1)  # (B, W, W): everyone sees itself
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    for row, (tokens, row_branches) in enumerate(zip(sequences, branches, strict=True)):
        n = len(tokens)
        ids[row, :n] = torch.as_tensor(list(tokens), dtype=torch.long)
        positions[row, :n] = torch.arange(n)
        allowed[row, :n, :n] = causal[:n, :n]
        for i, (prefix_length, token) in enumerate(row_branches):
            ids[row, length + i] = token
            positions[row, length + i] = prefix_length
            allowed[row, length + i, :prefix_length] = True
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, positions, mask[:, None], length


def check_branch_support(model) -> None:
    """A ValueError unless `model` (a Q-head wrapper or a transformers causal LM) can take a custom 4D attention mask:
    FlashAttention cannot."""
    config = getattr(transformers_model(model), "config", None)
    if str(getattr(config, "_attn_implementation", "")).startswith("flash"):
        raise ValueError(
            "Branch forwards need a 4D attention mask, which FlashAttention takes no part of: load the model with "
            "`attn_implementation='sdpa'` or `'eager'`."
        )


@torch.no_grad()
def branch_top_k(
    model,
    sequences: Sequence[Sequence[int]],
    branches: Sequence[Mapping[Hashable, tuple[int, int]]],
    k: int,
    pad_token_id: int,
    batch_size: int = 8,
) -> list[dict[Hashable, tuple[torch.Tensor, torch.Tensor]]]:
    """The `k` most likely next tokens after each branch, and their log-probabilities.

    Args:
        model: an `AutoModelForCausalLMWithQHead` or a transformers causal LM (the one `generate` runs is used: its
            LM head, adapters included), with eager or SDPA attention (a 4D attention mask).
        sequences: per row, its token ids (no padding).
        branches: per row, a mapping from the caller's key for each branch to its `(prefix_length, token_id)`: the
            continuation `sequence[:prefix_length] + [token_id]`, with `1 <= prefix_length <= len(sequence)`.
        k: next tokens kept per branch.
        pad_token_id: fills the padding (masked out).
        batch_size: rows per forward.

    Returns:
        Per row, the same keys mapped to `(ids [k] long, log_probs [k] float32)` (sorted by probability, highest
        first), on the CPU.
    """
    model = transformers_model(model)
    check_branch_support(model)
    for row, row_branches in enumerate(branches):
        if not isinstance(row_branches, Mapping):
            raise TypeError(
                f"Row {row}: `branches` rows must map keys to (prefix_length, token_id), got "
                f"{type(row_branches).__name__}."
            )
    keys = [list(row_branches) for row_branches in branches]
    pairs = [[row_branches[key] for key in row_keys] for row_branches, row_keys in zip(branches, keys, strict=True)]
    for row, (tokens, row_pairs) in enumerate(zip(sequences, pairs, strict=True)):
        for prefix_length, _ in row_pairs:
            if not 1 <= prefix_length <= len(tokens):
                raise ValueError(f"Row {row}: branch after {prefix_length} tokens of a {len(tokens)}-token sequence.")
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    parameters = inspect.signature(model.forward).parameters.values()
    keeps_logits = any(p.name == "logits_to_keep" or p.kind is p.VAR_KEYWORD for p in parameters)
    out: list[dict[Hashable, tuple[torch.Tensor, torch.Tensor]]] = []
    for start in range(0, len(sequences), batch_size):
        chunk, chunk_branches = sequences[start : start + batch_size], pairs[start : start + batch_size]
        if not any(chunk_branches):
            out.extend({} for _ in chunk)
            continue
        ids, positions, mask, length = _branch_inputs(chunk, chunk_branches, pad_token_id, dtype)
        inputs = {"input_ids": ids.to(device), "position_ids": positions.to(device), "attention_mask": mask.to(device)}
        if keeps_logits:  # the LM head on the branch positions only
            inputs["logits_to_keep"] = ids.shape[1] - length
        logits = model(**inputs).logits[:, -(ids.shape[1] - length) :]  # (B, m_max, V)
        top = logits.float().log_softmax(-1).topk(k, dim=-1)
        top_ids, top_log_probs = top.indices.cpu(), top.values.cpu()  # (B, m_max, k)
        for row, row_keys in enumerate(keys[start : start + batch_size]):
            out.append({key: (top_ids[row, i], top_log_probs[row, i]) for i, key in enumerate(row_keys)})
    return out
