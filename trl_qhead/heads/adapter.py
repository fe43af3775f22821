"""The adapter head (`q_head_type="adapter"`): a PEFT adapter on the policy's own trunk, active only where Q is read.

The model's backbone is a PEFT model (`from_pretrained(..., peft_config=LoraConfig(...), q_head_type="adapter")`)
whose one adapter is the Q network's: the trunk with the adapter on reads the context (its own attention, adapted),
and its final hidden state `h^Q` feeds a tied (`W_lm (U h^Q) + b`, `W_lm` the policy's LM head, detached) or dense
output (`heads.context`). Everywhere else the adapter is off, so the policy is exactly the base model: its logits in
training, the reference log-probs, `generate`, candidate labelling. The LM loss then reaches no trainable weight
(the base is frozen by PEFT, the adapter is off on its path): only the Q loss trains the adapter and the output.

How "off everywhere else" is kept: the adapter layers are switched off when the head is bound, the Q network's
forwards switch them on for their duration only (`adapter_on`), and a forward pre-hook on the trunk switches them
off again before any other forward (PEFT's own `disable_adapter()` context, used for the reference, switches them back
on when it exits; the hook is on the trunk because PEFT calls the causal LM's `forward` directly, past its hooks). The layers' `_disable_adapters` flag is set directly: PEFT's
`enable_adapters` also flips the adapter weights' `requires_grad`, which would hide them from the optimizer whenever
it is built while they are off.

Cost: the Q network is the whole trunk again (one extra forward per training batch, one extra cached forward of one
token per generated token: `q_network.CachedQNetwork`). Saved as the backbone's PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`) plus the output head in `q_head.safetensors`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..backbone import is_peft_model, unwrap_peft
from .context import ContextQHead
from .q_network import trunk


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of a PEFT model that an adapter changes (LoRA layers, `modules_to_save` wrappers): those with
    PEFT's `_disable_adapters` switch."""
    return [m for m in unwrap_peft(model).modules() if hasattr(m, "_disable_adapters")]


def check_adapter_backbone(backbone: nn.Module) -> None:
    """A PEFT model with exactly one adapter that injects layers (LoRA and the like): `ValueError` otherwise."""
    if not is_peft_model(backbone):
        raise ValueError(
            "q_head_type='adapter' trains a PEFT adapter on the trunk as the Q network: pass `peft_config` (e.g. "
            "`LoraConfig(target_modules=..., fan_in_fan_out=True)` for GPT-2) to `from_pretrained` or the trainer."
        )
    configs = backbone.peft_config
    if len(configs) != 1:
        raise ValueError(
            f"q_head_type='adapter' needs exactly one PEFT adapter (the Q network's); the model has {sorted(configs)}. "
            "A policy adapter trained with the LM loss cannot share the trunk with it: merge it first "
            "(`merge_and_unload()`), or keep the policy and use q_head_type='q_model' with a separate Q model."
        )
    ((name, config),) = configs.items()
    if getattr(config, "is_prompt_learning", False) or getattr(config, "is_adaption_prompt", False):
        raise ValueError(
            f"q_head_type='adapter' needs an adapter that injects layers (LoRA and the like); the adapter {name!r} is "
            f"a {type(config).__name__}, which cannot be switched off layer by layer."
        )
    if not adapter_layers(backbone):
        raise ValueError(f"The PEFT adapter {name!r} injected no layers: there is no Q network to train.")


class AdapterQHead(ContextQHead):
    """Q from the policy's trunk with its PEFT adapter on (see the module docstring).

    Args:
        hidden_size, vocab_size: the trunk's `H` and `|V|`.
        output: `"tied"` (default) or `"dense"` (`heads.context`).
        rank: the tied output's rank (`None`: a full `H x H` U).
        device: where the output head's parameters live.

    Call `bind(backbone)` with the PEFT-wrapped policy before use (`build` does).
    """

    q_head_type = "adapter"
    formula = (
        "`Q(s, a) = W_lm (U h^Q_s) + b` or `W h^Q_s + b` (an adapter head, `q_head_type=adapter`: `h^Q` the final "
        "hidden state of the policy's trunk with its PEFT adapter on, which is off for the policy itself)"
    )
    shape_source = "trunk (vocabulary or hidden size)"

    def __init__(
        self, hidden_size: int, vocab_size: int, *, output: str = "tied", rank: int | None = None, device=None
    ):
        super().__init__(hidden_size, vocab_size, output=output, rank=rank, device=device)
        self.__dict__["_layers"] = []
        self.__dict__["_guard"] = None
        self.__dict__["_on"] = False  # inside `adapter_on`: the trunk's forward is the Q network's

    @classmethod
    def build(cls, backbone, *, hidden_size, vocab_size, device=None, rank=None, output: str = "tied") -> AdapterQHead:
        check_adapter_backbone(backbone)
        head = cls(hidden_size, vocab_size, output=output, rank=rank, device=device)
        head.bind(backbone)
        return head

    def q_network_parameters(self, backbone: nn.Module) -> set[int]:
        """The adapter's own parameters (PEFT names them `<layer>.<adapter name>...`)."""
        (name,) = backbone.peft_config
        return {id(p) for n, p in backbone.named_parameters() if f".{name}." in n or n.endswith(f".{name}")}

    def check_merge(self) -> None:
        raise ValueError(
            "The PEFT adapter of a q_head_type='adapter' model is the Q network, not part of the policy: merging it "
            "would change the policy. To get the policy alone, use `model.pretrained_model.get_base_model()` (its "
            "adapter switched off) or the base model it was built on."
        )

    def q_network(self) -> nn.Module:
        policy = self.__dict__["_policy"]
        if policy is None:
            raise RuntimeError("The adapter head is not bound to a backbone (`bind(backbone)`).")
        return policy

    def bind(self, backbone: nn.Module) -> None:
        check_adapter_backbone(backbone)
        guard = self.__dict__["_guard"]
        if guard is not None:
            guard.remove()
        self.__dict__["_policy"] = backbone
        self.__dict__["_layers"] = adapter_layers(backbone)
        self._switch(False)
        # Before every forward of the trunk that is not the Q network's: the adapter is off (module docstring).
        self.__dict__["_guard"] = trunk(backbone).register_forward_pre_hook(self._policy_forward)
        super().bind(backbone)

    def _switch(self, on: bool) -> None:
        for layer in self.__dict__["_layers"]:
            layer._disable_adapters = not on

    def _policy_forward(self, module, args) -> None:
        if not self.__dict__["_on"]:
            self._switch(False)

    @contextlib.contextmanager
    def adapter_on(self):
        """The adapter on for the duration (the Q network's forwards), off again afterwards."""
        self._switch(True)
        self.__dict__["_on"] = True
        try:
            yield
        finally:
            self.__dict__["_on"] = False
            self._switch(False)

    def network_context(self):
        if torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) for m in self._trunk_modules()):
            # the backward would recompute the trunk's activations after `adapter_on` has switched the adapter off
            raise ValueError(
                "q_head_type='adapter' cannot train with gradient (activation) checkpointing: the checkpointed blocks "
                "are recomputed in the backward, when the adapter is off again, so the gradients would be wrong. "
                "Set `gradient_checkpointing=False`, or use q_head_type='q_model' (a separate Q model)."
            )
        return self.adapter_on()

    def _trunk_modules(self):
        return trunk(self.q_network()).modules()
