"""What the context-reading heads share (`adapter.py`, `q_model.py`): Q from a Q network's own final hidden state.

A context head computes `Q(s, .)` from `h^Q`, the final hidden state of a network with its own attention over the
context (a LoRA adapter on the policy's trunk, active only there, or a separate causal LM), not from the policy's
`h`. Its output on `h^Q` is a tied or a dense head of this package (`TiedQHead` bound to the Q network's own LM head,
`W^Q (U h^Q) + b`, U starting at zero so that the untrained tilt is zero; or `DenseQHead`, `W h^Q + b`), so as a
`QHead` it is linear in its features: `features = U h^Q` (or `h^Q`), `linear_form()` the output head's. Every read
(gather, V, V*, full Q) is then the base class's.

Features need the tokens (`QContext`): in training the Q network runs over the batch (with grad); at decoding the
processor calls `update_decode_state` once per step and the head runs the Q network on the new token only, with its
own KV cache (`q_network.CachedQNetwork`), and `features` returns that step's. The policy's `h` is never read.

What a context head cannot do, and says so: fold into the LM head (`hidden_linear_form` is `None`: `fold_tilt`
raises), tilt inside the LM head (`lm_head_input` is `None`: the processor adds `Q / beta` to the scores).
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
from torch import nn

from .base import LinearForm, QContext, QHead, check_q_head_init
from .dense import DenseQHead
from .q_network import CachedQNetwork, GenerateInputs, q_network_hidden
from .tied import TiedQHead, check_q_head_rank

CONTEXT_HEAD_OUTPUTS = ("tied", "dense")


def check_output(output: object) -> str:
    if output not in CONTEXT_HEAD_OUTPUTS:
        raise ValueError(f"`q_head_output` must be one of {CONTEXT_HEAD_OUTPUTS}, got {output!r}.")
    return output


class ContextQHead(QHead):
    """The common part of the context-reading heads (see the module docstring). Subclasses give the Q network
    (`q_network()`, a causal LM) and the context each of its forwards runs in (`network_context()`).

    Args:
        hidden_size: `H_Q`, the Q network's hidden size (the features' size for a dense output).
        vocab_size: `|V|`.
        output: `"tied"` (`W^Q (U h^Q) + b`, `W^Q` the Q network's LM head, detached) or `"dense"` (`W h^Q + b`).
        rank: the tied output's `q_head_rank` (`None`: a full `H_Q x H_Q` U); the dense output has none.
        device: where the output head's parameters live.
    """

    q_head_type: ClassVar[str] = ""
    leaves_policy_frozen: ClassVar[bool] = True

    def __init__(
        self, hidden_size: int, vocab_size: int, *, output: str = "tied", rank: int | None = None, device=None
    ):
        super().__init__(hidden_size, vocab_size)
        self.output_type = check_output(output)
        if output == "dense":
            if rank is not None:
                raise ValueError(
                    f"`q_head_rank` is for the tied output of q_head_type={self.q_head_type!r}, not dense."
                )
            self.output = DenseQHead(hidden_size, vocab_size, device=device)
        else:
            self.output = TiedQHead(hidden_size, vocab_size, check_q_head_rank(rank, hidden_size), device=device)
        self.__dict__["_policy"] = None  # the generating model: a plain attribute, not a submodule
        self.__dict__["_inputs"] = None
        self.__dict__["_cached"] = None
        self.__dict__["_decode"] = None  # (input_ids of the step, h^Q at its last position)

    # ---- what subclasses provide ----------------------------------------------------------------------------------

    def q_network(self) -> nn.Module:
        """The causal LM whose trunk is the Q network."""
        raise NotImplementedError

    def network_context(self):
        """The context manager each forward of the Q network runs in. Default: none."""
        return contextlib.nullcontext()

    # ---- construction ---------------------------------------------------------------------------------------------

    def bind(self, backbone: nn.Module) -> None:
        """Remember the policy (whose `generate` the processor runs on: its attention mask is read at each step) and
        tie the output to the Q network's LM head."""
        self.__dict__["_policy"] = backbone
        inputs = self.__dict__["_inputs"]
        if inputs is not None:
            inputs.detach()
        self.__dict__["_inputs"] = GenerateInputs(backbone)
        self.__dict__["_inputs"].attach()
        if isinstance(self.output, TiedQHead):
            self.output.bind(self.q_network())
        self.reset_decode_state()

    @torch.no_grad()
    def reset_parameters(self, init: str = "zeros", *, std: float = 0.02, backbone: nn.Module | None = None) -> None:
        """The output head's init (`"zeros"`: Q = 0 whatever the Q network says); the Q network keeps its weights."""
        check_q_head_init(init)
        if init == "lm_head" and isinstance(self.output, DenseQHead):
            self.output.reset_parameters(init, std=std, backbone=self.q_network())
        else:
            self.output.reset_parameters(init, std=std, backbone=backbone)

    def resize_vocab(self, vocab_size: int) -> None:
        raise ValueError(
            f"q_head_type={self.q_head_type!r} reads the vocabulary of its Q network: resize the Q network and the "
            "policy together, before building the head."
        )

    @property
    def bias(self) -> nn.Parameter:
        return self.output.bias

    @property
    def device(self) -> torch.device:
        return self.output.bias.device

    def to_config(self) -> dict:
        rank = self.output.rank if isinstance(self.output, TiedQHead) else None
        return {"q_head_type": self.q_head_type, "q_head_rank": rank, "q_head_output": self.output_type}

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        return {"output": config.get("q_head_output", "tied")}

    def check_training(self, backbone: nn.Module) -> None:
        """The policy must stay the base model: no parameter of it, outside the Q network, may train (the LM loss would
        reach it), and the backbone must be the one the head was built on."""
        if backbone is not self.__dict__["_policy"]:
            raise ValueError(
                f"The backbone of the q_head_type={self.q_head_type!r} model was replaced after its head was built (a "
                "`peft_config` given to the trainer?): build the model with everything it needs, e.g. "
                "`from_pretrained(..., peft_config=..., q_head_type='adapter')`."
            )
        own = self.q_network_parameters(backbone)
        trainable = [n for n, p in backbone.named_parameters() if p.requires_grad and id(p) not in own]
        if trainable:
            raise ValueError(
                f"q_head_type={self.q_head_type!r} leaves the policy the base model, but policy parameters require grad "
                f"({trainable[:3]}{' ...' if len(trainable) > 3 else ''}): the LM loss would train them. Freeze them "
                "(`model.pretrained_model.requires_grad_(False)`, then rebuild the head's adapter if any), or, to train "
                "the policy with its LM loss, use q_head_type='tied' or 'dense' with a LoRA `peft_config`."
            )

    def saved_fingerprint(self) -> dict:
        return self.output.saved_fingerprint()

    def check_fingerprint(self, config: dict, where: str) -> None:
        self.output.check_fingerprint(config, where)

    # ---- reading Q ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _q_forward(self):
        """A forward of the Q network: not one of the generating model's (its attention mask is not recorded), in the
        subclass's context."""
        inputs = self.__dict__["_inputs"]
        paused = inputs is not None and inputs.paused
        if inputs is not None:
            inputs.paused = True
        try:
            with self.network_context():
                yield
        finally:
            if inputs is not None:
                inputs.paused = paused

    def network_hidden(self, context: QContext) -> torch.Tensor:
        """`h^Q`, `[B, T, H_Q]`, of the Q network over `context`'s tokens (with grad where it trains)."""
        with self._q_forward():
            return q_network_hidden(self.q_network(), context.input_ids, context.attention_mask, context.position_ids)

    def features(self, hidden: torch.Tensor, context: QContext | None = None) -> torch.Tensor:
        """`U h^Q` (tied) or `h^Q` (dense): at decoding, of the step `update_decode_state` ran; else from a forward of
        the Q network over `context`'s tokens, which must be the tokens `hidden` (`[B, T, H]`) was computed from."""
        decode = self.__dict__["_decode"]
        if decode is not None and context is not None and context.input_ids is decode[0]:
            return self.output.features(decode[1])
        if context is None or context.input_ids is None:
            raise ValueError(
                f"q_head_type={self.q_head_type!r} reads the tokens with its own network: its features need a "
                "`QContext` with the `input_ids` (the policy's hidden states alone do not determine Q)."
            )
        if tuple(context.input_ids.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"q_head_type={self.q_head_type!r}: the context's input_ids have shape {tuple(context.input_ids.shape)} "
                f"but the hidden states {tuple(hidden.shape)}: pass the hidden states of every position of those "
                "tokens (select positions from the features afterwards)."
            )
        return self.output.features(self.network_hidden(context))

    def linear_form(self) -> LinearForm:
        return self.output.linear_form()

    # ---- decoding -------------------------------------------------------------------------------------------------

    def hidden_linear_form(self) -> None:
        return None  # Q reads the context through another network: there is no W with Q = W h (not foldable)

    def lm_head_input(self, hidden: torch.Tensor) -> None:
        return None

    def update_decode_state(self, context: QContext, parent: torch.LongTensor | None) -> None:
        """One cached forward of the Q network on this step's new token (the whole prompt at the first step)."""
        cached = self.__dict__["_cached"]
        if cached is None:
            cached = self.__dict__["_cached"] = CachedQNetwork(self.q_network(), context=self._q_forward)
        input_ids = context.input_ids
        mask = context.attention_mask
        if mask is None or tuple(mask.shape) != tuple(input_ids.shape):
            mask = self.__dict__["_inputs"].mask_for(input_ids)
        hidden = cached.step(input_ids, mask, parent)
        self.__dict__["_decode"] = (input_ids, hidden)

    def reset_decode_state(self) -> None:
        cached = self.__dict__["_cached"]
        if cached is not None:
            cached.reset()
        self.__dict__["_decode"] = None

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, vocab_size={self.vocab_size}, output={self.output_type!r}"
