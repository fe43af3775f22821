"""Continuations of many prefixes sampled from a base policy: what future-value labels (`labels.FutureValueLabels`)
average over."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

__all__ = ["cut_continuation", "sample_continuations"]

# Ancestral sampling from the policy itself (as `rollouts.PURE_SAMPLING`): the soft value is an expectation under pi.
_ANCESTRAL = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def cut_continuation(generated: Sequence[int], stop_ids: Collection[int], limit: int) -> list[int]:
    """The tokens of one sampled continuation: up to and including its first stop token, at most `limit` of them.

    `generate` pads a row that stopped (with a pad id that may be a real token), so everything after the first stop
    token goes; cutting a longer sample at `limit` draws exactly from the `limit`-token distribution (sampling is
    autoregressive), which lets prefixes with different limits share one `generate` call.
    """
    out = []
    for token in generated[:limit]:
        out.append(token)
        if token in stop_ids:
            break
    return out


@torch.no_grad()
def sample_continuations(
    model,
    prefixes: Sequence[Sequence[int]],
    limits: Sequence[int],
    num_continuations: int,
    *,
    pad_token_id: int,
    stop_ids: Collection[int],
    batch_size: int = 64,
) -> list[list[list[int]]]:
    """`num_continuations` continuations of each prefix, sampled from `model`'s own distribution with `generate`.

    Args:
        model: a causal LM with `generate` (an `AutoModelForCausalLMWithQHead` samples from its LM head: the base
            policy, whatever processors tilted the completions).
        prefixes: token ids (prompt and completion so far), one list per prefix, each non-empty.
        limits: per prefix, the most tokens a continuation may have (>= 1).
        num_continuations: continuations per prefix (`num_return_sequences`).
        pad_token_id: left-pads the prefixes of one call.
        stop_ids: a continuation ends at the first of these (kept, as a completion keeps its EOS); `generate` stops
            on exactly these ids (not on the generation config's).
        batch_size: prefixes per `generate` call (each yields `num_continuations` rows).

    Returns:
        Per prefix, `num_continuations` lists of token ids (a list may be shorter than its limit only when it ends
        with a stop token).
    """
    if len(prefixes) != len(limits):
        raise ValueError(f"{len(prefixes)} prefixes but {len(limits)} limits: one limit per prefix.")
    if any(limit < 1 for limit in limits) or any(len(prefix) == 0 for prefix in prefixes):
        raise ValueError("Every prefix needs at least one token and a continuation limit >= 1.")
    device = next(model.parameters()).device
    stops = sorted(set(stop_ids))
    # A call generates up to its largest limit for every row, so prefixes of similar limits share a call: labels'
    # limits run from the horizon down to 1 along a completion, and in the caller's order every call ran to about the
    # horizon. The samples' distribution does not depend on the order; the answer keeps the caller's.
    order = sorted(range(len(prefixes)), key=lambda i: -limits[i])
    out: list[list[list[int]]] = [[] for _ in prefixes]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        rows = [list(prefixes[i]) for i in batch]
        row_limits = [limits[i] for i in batch]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.as_tensor(row)
            mask[i, width - len(row) :] = 1
        sequences = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            **_ANCESTRAL,
            max_new_tokens=max(row_limits),
            num_return_sequences=num_continuations,
            pad_token_id=pad_token_id,
            eos_token_id=stops,
        ).cpu()
        generated = sequences[:, width:].tolist()  # (rows * n, new tokens), prompt-major
        for i, (index, limit) in enumerate(zip(batch, row_limits, strict=True)):
            chunk = generated[i * num_continuations : (i + 1) * num_continuations]
            out[index] = [cut_continuation(tokens, stops, limit) for tokens in chunk]
    return out
