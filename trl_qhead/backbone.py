"""Calling a transformers causal LM the way this package needs it: under PEFT, with positions that follow the attention
mask, and with its final hidden state (what both the LM head and the Q head read).

One home for what the Q-head model, the reference policy and the decoding sources share.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

# Config fields with which an LM head post-processes its logits (the ones TRL's fused LM head handles): a head with any
# of them set is not a plain `W h + b`, so its log-probs are taken from the full logits.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is wrapped by PEFT (a `PeftModel`)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep the core importable without it
        return False
    return isinstance(model, PeftModel)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The plain transformers model under a PEFT wrapper (`model` itself when there is none)."""
    return model.get_base_model() if is_peft_model(model) else model


def forward_parameters(model: nn.Module) -> set[str]:
    """The names of the keyword arguments the transformers model under any PEFT wrapper takes in `forward`."""
    return set(inspect.signature(unwrap_peft(model).forward).parameters)


def position_ids(attention_mask: torch.Tensor) -> torch.LongTensor:
    """`(B, T)` positions that count real tokens only, as `generate` makes them, so that a left-padded row gets the
    positions of its right-padded twin (padding gets 0 before the first real token)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_inputs(attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> dict:
    """The `attention_mask` / `position_ids` keyword arguments of a backbone forward over a collated batch.

    A batch of packed rows carries `position_ids` restarting at 0 at each document (`DataCollatorForQHead`). It goes
    without an attention mask: transformers then finds the documents from the restarts and keeps each one's attention
    to itself (`masking_utils.find_packed_sequence_indices`; flash-attention kernels read the same positions), as in
    TRL's padding-free training. A 2-D mask would make it ignore the restarts. Padding, position 0 after a real token,
    is a span of its own, so no real token attends to it.

    Args:
        attention_mask: `[B, T]`, 1 on real tokens.
        position_ids: `[B, T]` or `None` (rows that are one sequence each: positions follow the attention mask).
    """
    if position_ids is None:
        return {"attention_mask": attention_mask}
    return {"attention_mask": None, "position_ids": position_ids}


def plain_lm_head(model: nn.Module) -> nn.Linear | None:
    """The LM head of a causal LM when its logits are exactly `W h + b` (a float `nn.Linear`, no softcapping or logit
    scaling in the config), so that log-probs can be computed from the hidden states in chunks; `None` otherwise
    (quantised, adapted or post-processed heads), in which case the full logits are used."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or not head.weight.is_floating_point():  # not a bnb or PEFT-wrapped subclass
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head


def causal_lm_forward(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    full_logits: bool = True,
    **kwargs,
):
    """Run a causal LM (optionally PEFT-wrapped); returns `(final hidden state (B, T, H), outputs)`.

    Positions count real tokens only when the model takes `position_ids` (as `generate` does), so a left-padded row
    equals its right-padded twin. With `full_logits=False` the LM head runs on the last position only
    (`logits_to_keep=1`, when the model takes it): the caller projects the hidden states itself, in chunks.
    """
    parameters = forward_parameters(model)
    if attention_mask is not None and "position_ids" not in kwargs and "position_ids" in parameters:
        positions = position_ids(attention_mask)
        kwargs["position_ids"] = positions[:, -input_ids.shape[1] :] if input_ids is not None else positions
    if not full_logits and "logits_to_keep" in parameters:
        kwargs.setdefault("logits_to_keep", 1)
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True, **kwargs
    )
    # Every transformers causal LM returns the final, normed hidden state last: exactly what its LM head reads.
    return outputs.hidden_states[-1], outputs
