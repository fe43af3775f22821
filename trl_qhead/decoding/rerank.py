"""`rerank`: Q-probe-style best-of-k, scoring complete samples by the Q of their final action."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbone import forward_parameters
from ..heads import QContext
from ..modeling import AutoModelForCausalLMWithQHead, transformers_model
from ..stop_tokens import generation_config
from .tilt import check_beta


@dataclass
class RerankOutput:
    """Result of [`rerank`].

    Args:
        sequences: `[P, L]` the chosen sample of each prompt.
        indices: `[P]` row of each chosen sample in the `sequences` passed in.
        scores: `[P, k]` `Q(s, a)` of the final action of every sample, grouped by prompt.
    """

    sequences: torch.LongTensor
    indices: torch.LongTensor
    scores: torch.Tensor


@torch.no_grad()
def rerank(
    model: AutoModelForCausalLMWithQHead,
    sequences: torch.LongTensor,
    num_samples: int,
    *,
    attention_mask: torch.Tensor | None = None,
    prompt_length: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    beta: float | None = None,
    generator: torch.Generator | None = None,
) -> RerankOutput:
    """Q-probe-style best-of-k: score each complete sample by the learned Q of its final action, then pick one per prompt.

    The score of a sample `x_0 .. x_{n-1}` (padding removed) is `Q(s_{n-2}, a_{n-2}) = q_{n-2}[x_{n-1}]`: the value of
    emitting its last real token (EOS, if it finished). One forward pass over all samples; the Q head is gathered at
    one position per sample (no `|V|`-sized product).

    Args:
        model: the `AutoModelForCausalLMWithQHead` whose Q head scores.
        sequences: `[P * k, L]` samples, `k = num_samples` consecutive rows per prompt (the layout of
            `generate(..., num_return_sequences=k)`).
        num_samples: `k`.
        attention_mask: `[P * k, L]` marking the real tokens; or the prompt's `[P * k, prompt_length]` mask (left
            padding), in which case the completion ends at its first EOS. Default: leading `pad_token_id`s of the
            prompt are padding and the completion ends at its first EOS.
        prompt_length: length of the (padded) prompt part of `sequences`; needed unless a full mask is given.
        eos_token_id, pad_token_id: default to the model's generation config.
        beta: `None` picks the argmax; a positive number samples from `softmax(score / beta)` within each prompt.
        generator: for sampling (on the model's device).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    if sequences.dim() != 2 or sequences.shape[0] % num_samples:
        raise ValueError(
            f"`sequences` must be [prompts * num_samples, L]; got shape {tuple(sequences.shape)} for num_samples="
            f"{num_samples}."
        )
    if beta is not None:
        beta = check_beta(beta, allow_inf=False)
    mask = _sample_mask(model, sequences, attention_mask, prompt_length, eos_token_id, pad_token_id)
    last = mask.shape[1] - 1 - mask.flip(-1).int().argmax(-1)  # index of the final real token
    if bool((mask.sum(-1) < 2).any()):
        raise ValueError("Every sample needs at least two real tokens (a state and an action) to be scored.")
    device = model.device
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(transformers_model(model)) else {}
    hidden = model(sequences.to(device), attention_mask=mask.to(device), **kwargs).hidden_states
    rows = torch.arange(sequences.shape[0], device=device)
    last = last.to(device)
    # The head's features on the whole grid (a head that reads the context sees every row's tokens), then s_{n-2}.
    features = model.q_head.features(hidden, QContext(sequences.to(device), mask.to(device)))  # (N, L, F)
    state = features[rows, last - 1]  # s_{n-2}
    action = sequences.to(device)[rows, last]  # a_{n-2} = x_{n-1}
    scores = model.q_head.gather(state, action[:, None])[:, 0].float()
    grouped = scores.view(-1, num_samples)
    if beta is None:
        choice = grouped.argmax(-1)
    else:
        # (score - max) / beta lies in [-inf, 0] (0 at the max): no inf - inf or 0 / 0, however small beta is.
        below = grouped - grouped.amax(-1, keepdim=True)
        logits = torch.where(below == 0, 0.0, below / beta)
        choice = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
    indices = torch.arange(grouped.shape[0], device=device) * num_samples + choice
    return RerankOutput(sequences=sequences[indices.to(sequences.device)], indices=indices, scores=grouped)


def _sample_mask(model, sequences, attention_mask, prompt_length, eos_token_id, pad_token_id) -> torch.Tensor:
    n, length = sequences.shape
    if attention_mask is not None and tuple(attention_mask.shape) == (n, length):
        return attention_mask.bool().to(sequences.device)
    config = generation_config(model)
    if eos_token_id is None and config is not None:
        eos_token_id = config.eos_token_id
    if pad_token_id is None and config is not None:
        pad_token_id = config.pad_token_id
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != n or attention_mask.shape[1] > length:
            raise ValueError(
                f"`attention_mask` must be [N, L] or the prompt's [N, prompt_length]; got {tuple(attention_mask.shape)}"
                f" for sequences {tuple(sequences.shape)}."
            )
        if prompt_length is not None and prompt_length != attention_mask.shape[1]:
            raise ValueError(f"`prompt_length` ({prompt_length}) differs from the prompt mask's length.")
        prompt_length = attention_mask.shape[1]
        prompt_mask = attention_mask.bool().to(sequences.device)
    else:
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or not 0 < prompt_length < length:
            raise ValueError(
                f"`prompt_length` must be an int in [1, {length - 1}] when no full `attention_mask` is given, got "
                f"{prompt_length!r}."
            )
        prompt = sequences[:, :prompt_length]
        if pad_token_id is None:
            prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
        else:  # left padding: the leading run of pad tokens
            prompt_mask = (prompt != pad_token_id).int().cummax(-1).values.bool()
    completion = sequences[:, prompt_length:]
    if eos_token_id is None:
        completion_mask = torch.ones_like(completion, dtype=torch.bool)
    else:
        stop = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        is_eos = torch.isin(completion, stop.to(sequences.device)).int()
        # real up to and including the first EOS
        completion_mask = (is_eos.cumsum(-1) - is_eos) == 0
    return torch.cat([prompt_mask, completion_mask], dim=-1)
