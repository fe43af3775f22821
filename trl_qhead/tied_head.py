"""The tied Q head: `Q(s, .) = W_lm (U h) + b`, sharing the LM head's rows (docs/DESIGN.md section 5).

`W_lm` is the backbone's LM head weight, read from the backbone at every call (never copied into the Q head, never
saved with it, never trained through the Q loss: it is always detached). What the head owns and trains is `U` (H x H,
or `U = A B` with `A` H x r and `B` r x H when `q_head_rank=r`) and a `|V|` bias `b`. `U` starts at zero, so the
untrained tilt is zero.

Everything that reads a Q head (`q_values`, `chunked_lm_head`, the decoding sources, `fold_tilt`) asks this module for
the two pieces it needs: `project(h) = U h` (an H x H product per position) and `lm_weight()` (`W_lm`, detached).
`Q(s_t, a_t) = W_lm[a_t] . (U h_t) + b[a_t]`, so gathering stays O(T k H) and no `|V|`-sized product is taken.

Which LM heads it can read (`lm_head_weight`): a plain `nn.Linear` (any float dtype); a PEFT LoRA-adapted head (its
merged weight: base plus the active adapters' delta, recomputed at each call because the adapters train); a
bitsandbytes 4-bit head (dequantised once and cached while the packed weight stays the same). Any other head raises a
`TypeError` that says to use `q_head_type="dense"`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

Q_HEAD_TYPES = ("dense", "tied")


def check_q_head_type(q_head_type: object) -> str:
    if q_head_type not in Q_HEAD_TYPES:
        raise ValueError(f"`q_head_type` must be one of {Q_HEAD_TYPES}, got {q_head_type!r}.")
    return q_head_type


def check_q_head_rank(q_head_rank: object, hidden_size: int) -> int | None:
    """`None` (full rank, U is H x H) or an int in [1, H]."""
    if q_head_rank is None:
        return None
    if isinstance(q_head_rank, bool) or not isinstance(q_head_rank, int) or not 1 <= q_head_rank <= hidden_size:
        raise ValueError(
            f"`q_head_rank` must be None (full rank) or an integer in [1, {hidden_size}] (the hidden size), got "
            f"{q_head_rank!r}."
        )
    return q_head_rank


def lm_head_weight(head: nn.Module) -> torch.Tensor:
    """The `[|V|, H]` weight an LM head multiplies its input by, detached (see the module docstring)."""
    if hasattr(head, "get_base_layer") and hasattr(head, "get_delta_weight"):  # PEFT LoRA layer
        weight = lm_head_weight(head.get_base_layer())
        if getattr(head, "merged", False) or getattr(head, "disable_adapters", False):
            return weight  # merged adapters are in the base weight already; disabled ones add nothing
        with torch.no_grad():
            for name in head.active_adapters:
                if name in getattr(head, "lora_A", {}):
                    weight = weight + head.get_delta_weight(name).to(weight)
        return weight.detach()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"The tied Q head cannot read the weight of the LM head {type(head).__name__}; use q_head_type='dense'."
        )
    if weight.is_floating_point():
        return weight.detach()
    if type(weight).__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        with torch.no_grad():
            return bnbf.dequantize_4bit(weight.data, weight.quant_state).detach()
    raise TypeError(
        f"The tied Q head cannot read the weight of the LM head {type(head).__name__} (dtype {weight.dtype}): only "
        "plain, LoRA-adapted and bitsandbytes 4-bit heads are supported. Use q_head_type='dense'."
    )


class TiedQHead(nn.Module):
    """`Q(s, .) = W_lm (U h) + b` with `W_lm` read from the backbone's LM head (see the module docstring).

    Args:
        hidden_size, vocab_size: `H` and `|V|` (those of the LM head).
        rank: `None` for a full `H x H` U, else U = A B of rank `rank`.
        device: where the parameters live.

    Call `bind(backbone)` before use (`AutoModelForCausalLMWithQHead` does): the backbone is kept as a plain attribute,
    not a submodule, so its weights are neither in this module's parameters nor in its state dict.
    """

    q_head_type = "tied"

    def __init__(self, hidden_size: int, vocab_size: int, rank: int | None = None, device=None):
        super().__init__()
        self.hidden_size, self.vocab_size = int(hidden_size), int(vocab_size)
        self.rank = check_q_head_rank(rank, self.hidden_size)
        kw = dict(dtype=torch.float32, device=device)
        if self.rank is None:
            self.u = nn.Parameter(torch.zeros(self.hidden_size, self.hidden_size, **kw))
        else:
            self.u_left = nn.Parameter(torch.zeros(self.hidden_size, self.rank, **kw))  # A, H x r
            self.u_right = nn.Parameter(torch.zeros(self.rank, self.hidden_size, **kw))  # B, r x H
        self.bias = nn.Parameter(torch.zeros(self.vocab_size, **kw))
        self.__dict__["_backbone"] = None
        self.__dict__["_dequantized"] = None

    # nn.Linear-like shape names, read by the model and the save path
    @property
    def in_features(self) -> int:
        return self.hidden_size

    @property
    def out_features(self) -> int:
        return self.vocab_size

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, vocab_size={self.vocab_size}, rank={self.rank}"

    # ---- the LM head ------------------------------------------------------------------------------------------------

    def bind(self, backbone: nn.Module) -> None:
        """Read `W_lm` from `backbone.get_output_embeddings()` from now on (checked against this head's shape)."""
        head = backbone.get_output_embeddings() if backbone is not None else None
        if head is None or getattr(head, "weight", None) is None:
            raise TypeError(
                f"q_head_type='tied' needs an LM head to tie to; {type(backbone).__name__} has no output embeddings."
            )
        self.__dict__["_backbone"] = backbone
        self.__dict__["_dequantized"] = None
        shape = tuple(self.lm_weight().shape)
        if shape != (self.vocab_size, self.hidden_size):
            raise ValueError(
                f"The tied Q head is for an LM head of shape {(self.vocab_size, self.hidden_size)}, but the backbone's "
                f"LM head has shape {shape}."
            )

    def lm_weight(self) -> torch.Tensor:
        """`W_lm`, `[|V|, H]`, detached: the Q loss never reaches it."""
        backbone = self.__dict__["_backbone"]
        if backbone is None:
            raise RuntimeError("The tied Q head is not bound to a backbone (`bind(backbone)`).")
        head = backbone.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if type(weight).__name__ == "Params4bit":  # frozen: dequantise once
            key = (id(weight), weight.data_ptr(), weight.device)
            cached = self.__dict__["_dequantized"]
            if cached is None or cached[0] != key:
                self.__dict__["_dequantized"] = cached = (key, lm_head_weight(head))
            return cached[1]
        return lm_head_weight(head)

    # ---- parameters -------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.bias.device

    @property
    def dtype(self) -> torch.dtype:
        return self.bias.dtype

    def u_matrix(self) -> torch.Tensor:
        """U, `[H, H]` (the product `A B` for a low-rank head)."""
        return self.u if self.rank is None else self.u_left @ self.u_right

    @torch.no_grad()
    def reset_parameters(self, init: str = "zeros", std: float = 0.02) -> None:
        """`"zeros"`: U = 0 (low rank: A = 0, B ~ N(0, 1/H) so that A gets gradients); `"normal"`: U ~ N(0, std^2)
        (low rank: A and B scaled so that U's entries have std `std`); `"lm_head"`: U = I, Q starts as the logits
        without their bias (full rank only). The bias starts at zero."""
        if init == "lm_head":
            if self.rank is not None:
                raise ValueError("q_head_init='lm_head' (U = I) needs a full-rank tied head (`q_head_rank=None`).")
            self.u.copy_(torch.eye(self.hidden_size))
        elif self.rank is None:
            self.u.zero_() if init == "zeros" else self.u.normal_(0.0, std)
        else:
            self.u_right.normal_(0.0, 1.0 / math.sqrt(self.hidden_size))
            if init == "zeros":
                self.u_left.zero_()
            else:  # entries of A B: sum of r products, std(A) * std(B) * sqrt(r) = std
                self.u_left.normal_(0.0, std * math.sqrt(self.hidden_size / self.rank))
        self.bias.zero_()

    # ---- reading Q --------------------------------------------------------------------------------------------------

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """`U h` in fp32 for hidden states of any leading shape (an H x H, or 2 H r, product per position)."""
        hidden = hidden.to(self.dtype)
        if self.rank is None:
            return F.linear(hidden, self.u)
        return F.linear(F.linear(hidden, self.u_right), self.u_left)

    def q_from_projection(self, projected: torch.Tensor) -> torch.Tensor:
        """`W_lm g + b` (fp32) from `g = U h`: the vocabulary-sized product, in the LM head's dtype."""
        weight = self.lm_weight()
        if weight.dtype == torch.float32:
            return F.linear(projected, weight, self.bias)
        return F.linear(projected.to(weight.dtype), weight).float() + self.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full Q, `[..., |V|]` fp32."""
        return self.q_from_projection(self.project(hidden))

    def gather(self, hidden: torch.Tensor, actions: torch.LongTensor) -> torch.Tensor:
        """`Q(s, a) = W_lm[a] . (U h) + b[a]` (fp32), broadcasting `hidden` `[..., H]` against `actions` as the dense
        `gather_action_q` does; O(k H) per position after the `U h` product, gradients reach U and b only."""
        rows = self.lm_weight()[actions].to(self.dtype)  # [..., H], detached
        return (self.project(hidden) * rows).sum(-1) + self.bias[actions]

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """`W_lm U` (fp32, `[|V|, H]`): the dense head with the same Q values (inspection, tests)."""
        return self.lm_weight().float() @ self.u_matrix()


def is_tied(q_head: nn.Module) -> bool:
    return isinstance(q_head, TiedQHead)
