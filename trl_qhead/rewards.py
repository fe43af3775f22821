"""Reward sources, summed into `r_t` on the action grid (DESIGN.md section 2).

- zero: the default for plain text.
- per-token and sequence rewards from the data: arrive in the batch as token-aligned `rewards` (see `trl_qhead.data`).
- reference log-probs (`use_lm_rewards`): `r_t = log pi_ref(a_t | s_t)`. With a PEFT model the reference is the same
  network with its adapters disabled, so no second copy of the weights is held.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from trl.trainer.utils import selective_log_softmax

from .mdp import token_rewards_to_actions


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy to serve as the reference policy of a model without adapters."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


@torch.no_grad()
def reference_logprobs(
    reference: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, actions: torch.Tensor
) -> torch.Tensor:
    """`log pi_ref(a_t | s_t)` on the position grid, `[B, T]` fp32, without building a `[B, T, |V|]` log-softmax.

    Args:
        reference: a causal LM (`logits` in its output), or a PEFT model when called inside `disable_adapter()`.
        input_ids, attention_mask: the batch.
        actions: `[B, T]` next-token ids (`trl_qhead.mdp.next_tokens`).
    """
    logits = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    return selective_log_softmax(logits.float(), actions)


@contextlib.contextmanager
def as_reference(model: nn.Module):
    """Run a PEFT model as its frozen base: adapters disabled and dropout off (the reward must not be noisy).

    The training mode is restored afterwards, so the policy's own forward keeps its dropout.
    """
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            yield model
    finally:
        model.train(was_training)


def action_rewards(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The data's rewards on the action grid (`r_t = rewards[t + 1]`), zeros when the batch carries none."""
    if "rewards" in batch:
        return token_rewards_to_actions(batch["rewards"])
    return torch.zeros(batch["input_ids"].shape, dtype=torch.float32, device=batch["input_ids"].device)
