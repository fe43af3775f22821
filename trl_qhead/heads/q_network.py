"""The Q network of a context-reading head: a causal LM's trunk whose final hidden state `h^Q` the head reads.

A context head computes `Q(s, .)` from a network with its own attention over the context (a LoRA adapter on the
policy's trunk, or a separate, usually smaller, causal LM): not from the policy's last hidden state. This module is how
that network is called:

- `trunk(model)`: the transformers model without its LM head under PEFT and causal-LM wrappers (`GPT2Model`,
  `LlamaModel`, ...): what is run, so the LM head's hooks (the decoding sources', the exclusion's) never see the Q
  network's forwards and no logits are computed.
- `q_network_hidden`: `h^Q` at every position of a batch (training: with grad; packed rows: `position_ids`).
- `CachedQNetwork`: `h^Q` at the last position during `generate`, one cached forward of the new token per step with
  the network's own KV cache, following the rows through beam search (the parent map of
  `decoding.kl_record.SequenceKLRecord`) and starting over on a new generation.
- `GenerateInputs`: the attention mask `generate` passes to the generating model at each step (a forward pre-hook on
  its trunk, which every forward of the model reaches through `__call__`, PEFT's included), which the Q network needs
  to mask the same padding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ..backbone import forward_parameters, position_ids, unwrap_peft
from ..compat import cache_kwargs, output_cache


def trunk(model: nn.Module) -> nn.Module:
    """The transformers model under `model`'s PEFT and causal-LM wrappers, without its LM head (`base_model`)."""
    model = unwrap_peft(getattr(model, "pretrained_model", model))
    return getattr(model, "base_model", model)


def network_device(network: nn.Module) -> torch.device:
    return next(network.parameters()).device


def q_network_hidden(
    network: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    position_ids_: torch.LongTensor | None = None,
) -> torch.Tensor:
    """`h^Q`, `[B, T, H_Q]`: the final (normed) hidden state of `network`'s trunk at every position.

    Positions count real tokens only (as `backbone.causal_lm_forward`), so a left-padded row equals its right-padded
    twin; packed rows pass their `position_ids` and no attention mask (`backbone.attention_inputs`).

    Args:
        network: a causal LM (transformers or PEFT); its trunk is run (`trunk`).
        input_ids, attention_mask: `[B, T]`.
        position_ids_: `[B, T]` or `None` (positions from the attention mask).
    """
    body = trunk(network)
    device = network_device(body)
    kwargs = {}
    takes_positions = "position_ids" in forward_parameters(body)
    if position_ids_ is not None:
        kwargs["position_ids"] = position_ids_.to(device)
    elif attention_mask is not None and takes_positions:
        kwargs["position_ids"] = position_ids(attention_mask).to(device)
    out = body(
        input_ids=input_ids.to(device),
        attention_mask=None if attention_mask is None else attention_mask.to(device),
        use_cache=False,
        return_dict=True,
        **kwargs,
    )
    return out.last_hidden_state


class GenerateInputs:
    """Keeps the attention mask of each forward `generate` runs on `model` (a forward pre-hook on its trunk), for a
    second network that must mask the same padding. `paused` ignores forwards meanwhile (a Q network that shares the
    trunk with the generating model)."""

    def __init__(self, model: nn.Module):
        self.module = trunk(model)
        self.attention_mask: torch.Tensor | None = None
        self.paused = False
        self._handle = None

    def attach(self) -> None:
        if self._handle is None:
            self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.attention_mask = None

    def _hook(self, module, args, kwargs):
        if not self.paused:
            self.attention_mask = kwargs.get("attention_mask")

    def mask_for(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The `[N, L]` attention mask of the sequences `input_ids` (`[N, L]`): the last forward's, or all ones when
        `generate` passed none (no padding)."""
        mask = self.attention_mask
        if mask is None:
            return torch.ones_like(input_ids)
        if mask.dim() != 2:
            raise RuntimeError(
                "A context Q head needs the 2D attention mask `generate` passes; got a 4D one (static cache?)."
            )
        if tuple(mask.shape) != tuple(input_ids.shape):
            raise RuntimeError(
                f"The attention mask of the last forward has shape {tuple(mask.shape)} but the sequences have "
                f"{tuple(input_ids.shape)}: the Q head's processor must be passed to the `generate` of the model it "
                "was built with."
            )
        return mask


class CachedQNetwork:
    """`h^Q` at the last position of each step of `generate`, from one cached forward of the new token.

    The first step of a generation (`parent is None`, or no cache yet) runs the whole prompt and keeps the KV cache;
    each later step reorders the cache to the rows' parents (beam search; the identity is skipped) and runs the one new
    token with the full attention mask and its position counted over real tokens. So the Q network costs one forward
    of one token per generated token, never a re-forward of the prefix.

    Args:
        network: the causal LM whose trunk is the Q network (transformers or PEFT).
        context: a factory of the context manager each forward runs in (e.g. the adapter head's "adapter on");
            default none.
    """

    def __init__(self, network: nn.Module, context: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.body = trunk(network)
        self.context = context or contextlib.nullcontext
        self._takes_positions = "position_ids" in forward_parameters(self.body)
        self.reset()

    def reset(self) -> None:
        """Drop the cache: the next step starts a new generation."""
        self.cache = None
        self.length = 0  # tokens the cache holds

    @torch.no_grad()
    def step(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, parent: torch.LongTensor | None
    ) -> torch.Tensor:
        """`[N, H_Q]` final hidden state of the last position of `input_ids` (`[N, L]`, the sequences so far).

        Args:
            input_ids: `[N, L]`.
            attention_mask: `[N, L]` (1 on real tokens; `generate` left-pads prompts).
            parent: `[N]` each row's row at the previous step, or `None` for the first step of a generation.
        """
        device = network_device(self.body)
        rows, length = input_ids.shape
        if parent is not None and self.cache is not None:
            if self.length != length - 1:
                raise RuntimeError(
                    f"The Q network's cache holds {self.length} tokens but the sequences have {length}: a step was "
                    "skipped (was the processor called by another generation in between?)."
                )
            if parent.numel() != rows:
                raise RuntimeError(f"{parent.numel()} parent rows for {rows} sequences.")
            if not torch.equal(parent.cpu(), torch.arange(rows)):
                self.cache.reorder_cache(parent.to(device))
            new_tokens = input_ids[:, -1:]
        else:  # a new generation: the whole prompt
            self.cache, new_tokens = None, input_ids
        kwargs = {"attention_mask": attention_mask.to(device)}
        if self._takes_positions:
            kwargs["position_ids"] = position_ids(attention_mask)[:, -new_tokens.shape[1] :].to(device)
        with self.context():
            out = self.body(
                input_ids=new_tokens.to(device), **cache_kwargs(self.cache), use_cache=True, return_dict=True, **kwargs
            )
        self.cache = output_cache(out)
        self.length = length
        return out.last_hidden_state[:, -1]
