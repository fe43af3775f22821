"""The reference policy of `use_lm_rewards`: `log pi_ref(a_t | s_t)` on the position grid, and how to get a reference
(a frozen copy, or the same PEFT model with its adapters disabled, so that no second copy of the weights is held)."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from trl.trainer.utils import selective_log_softmax

from .backbone import attention_inputs, causal_lm_forward, plain_lm_head
from .chunked_lm_head import action_logprobs_and_values
from .modeling import AutoModelForCausalLMWithQHead


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy to serve as the reference policy of a model without adapters.

    Kept rather than TRL's `create_reference_model` (the same three steps): `trl.create_reference_model` warns that it
    moved, and its new home `trl.experimental.utils` warns on import that it is unstable.
    """
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


@torch.no_grad()
def reference_logprobs(
    reference: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    actions: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    chunk_size: int = 256,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`log pi_ref(a_t | s_t)` on the position grid, `(B, T)` fp32, without building a `(B, T, V)` buffer.

    Args:
        reference: a causal LM (`logits` in its output), or a PEFT model when called inside `as_reference()`.
        input_ids, attention_mask: the batch.
        actions: `[B, T]` next-token ids (`trl_qhead.mdp.next_tokens`).
        action_mask: `[B, T]`, where the log-probs are needed (0 elsewhere); default: every real token.
        chunk_size: positions per chunk of the LM head (see `trl_qhead.chunked_lm_head.action_logprobs_and_values`).
        position_ids: `[B, T]` positions of packed rows (`backbone.attention_inputs`), `None` otherwise.
    """
    mask = (attention_mask if action_mask is None else action_mask).bool()
    if isinstance(reference, AutoModelForCausalLMWithQHead):  # the reference policy is its backbone
        reference = reference.pretrained_model
    lm_head = plain_lm_head(reference)
    inputs = attention_inputs(attention_mask, position_ids)
    hidden, outputs = causal_lm_forward(
        reference, input_ids, inputs.pop("attention_mask"), full_logits=lm_head is None, use_cache=False, **inputs
    )
    if outputs.logits.shape[-2] == hidden.shape[-2]:  # the model gave full logits (no `logits_to_keep`, or T == 1)
        return torch.where(mask, selective_log_softmax(outputs.logits.float(), actions), 0.0)
    with _gathered_under_zero3(lm_head):
        logprobs, _ = action_logprobs_and_values(hidden, lm_head, actions, mask, chunk_size=chunk_size)
    return logprobs


@contextlib.contextmanager
def _gathered_under_zero3(module: nn.Module | None):
    """Under DeepSpeed ZeRO-3, `module`'s parameters gathered (read-only) for the duration: the chunked kernel reads
    the LM head's weight after the reference's forward, when ZeRO-3 has partitioned it again. A no-op otherwise.

    What `deepspeed.zero.GatheredParameters(params, modifier_rank=None)` does, through the methods ZeRO-3 puts on its
    parameters (so deepspeed is not imported here)."""
    params = [p for p in (module.parameters() if module is not None else ()) if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    params[0].all_gather(param_list=params)
    try:
        yield
    finally:
        params[0].partition(param_list=params, has_been_updated=False)


@contextlib.contextmanager
def as_reference(model: nn.Module):
    """Run a PEFT model as its frozen base: adapters disabled and dropout off (the reward must not be noisy).

    The training mode is restored afterwards, so the policy's own forward keeps its dropout.

    Adapters are disabled with PEFT's own `disable_adapter()`; kept rather than TRL's `use_adapter(model, None)`
    (which is only that call) because the reference pass also needs eval mode, and a model without adapters passes.
    """
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            yield model
    finally:
        model.train(was_training)
