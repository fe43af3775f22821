"""The dense Q head: `Q(s, .) = W_q h + b_q`, its own `|V| x H` weight in fp32 (`q_head_type="dense"`, the default).

Its features are the hidden state itself and its linear form is `(W_q, b_q)`, so every read (full Q, gather, V, V*)
is the base class's; `fold_tilt` adds `W_q / beta` to the LM head. It is an `nn.Linear` too (the state dict holds
`weight` and `bias`, as checkpoints always have).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LinearForm, QContext, QHead, check_q_head_init


class DenseQHead(QHead, nn.Linear):
    """`Q(s, .) = W_q h + b_q` (see the module docstring).

    Args:
        hidden_size, vocab_size: `H` and `|V|`.
        device: where the fp32 parameters live.
    """

    q_head_type = "dense"
    formula = "`Q(s, a) = W_q h_s + b_q` (a dense head, `q_head_type=dense`)"
    # Plain attributes, as nn.Linear sets them (they shadow QHead's read-only properties).
    in_features: int = 0
    out_features: int = 0

    def __init__(self, hidden_size: int, vocab_size: int, device=None):
        nn.Linear.__init__(self, hidden_size, vocab_size, bias=True, dtype=torch.float32, device=device)
        self.hidden_size, self.vocab_size = int(hidden_size), int(vocab_size)

    @classmethod
    def build(cls, backbone, *, hidden_size, vocab_size, device=None, rank=None) -> DenseQHead:
        if rank is not None:
            raise ValueError("`q_head_rank` is for q_head_type='tied'; the dense head has no rank.")
        return cls(hidden_size, vocab_size, device=device)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DenseQHead:
        """A dense head sharing the parameters of a plain `nn.Linear` (its weight and bias, any dtype)."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.in_features, head.out_features = linear.in_features, linear.out_features
        head.hidden_size, head.vocab_size = linear.in_features, linear.out_features
        head.weight = linear.weight
        bias = linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
        head.register_parameter("bias", bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, False))
        return head

    @torch.no_grad()
    def reset_parameters(self, init: str = "zeros", *, std: float = 0.02, backbone: nn.Module | None = None) -> None:
        check_q_head_init(init)  # (nn.Linear.__init__ calls this with no arguments: zeros)
        if init == "zeros":
            self.weight.zero_()
        elif init == "normal":
            self.weight.normal_(0.0, std)
        else:
            self.weight.copy_(backbone.get_output_embeddings().weight.float())
        self.bias.zero_()

    @torch.no_grad()
    def resize_vocab(self, vocab_size: int) -> None:
        old = self.vocab_size
        weight = self.weight.new_zeros(vocab_size, self.hidden_size)
        bias = self.bias.new_zeros(vocab_size)
        weight[: min(old, vocab_size)] = self.weight[:vocab_size]
        bias[: min(old, vocab_size)] = self.bias[:vocab_size]
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
        self.vocab_size = self.out_features = int(vocab_size)

    def features(self, hidden: torch.Tensor, context: QContext | None = None) -> torch.Tensor:
        return hidden

    def linear_form(self) -> LinearForm:
        return LinearForm(self.weight, self.bias)

    def hidden_linear_form(self) -> LinearForm:
        return LinearForm(self.weight.double(), self.bias.double())

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self)
