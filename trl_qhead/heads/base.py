"""The `QHead` interface: what every consumer of a Q head (the model's forward, the trainer, the chunked V and V*
kernels, the decoding processor, `fold_tilt`, `rerank`, save / load) calls, and the linear-head math written once.

A head reads the policy's final hidden states `h` (`[..., H]`) and, where it needs them, the tokens they came from (a
`QContext`). It maps them to *features* `f = phi(h, context)` (`[..., F]`) once per forward; every read of Q then
starts from the features:

- `q_from_features(f)`: the full `[..., |V|]` Q;
- `gather(f, ids)`: `Q(s, a)` for `[..., k]` token ids (k = 1 is the trainer's action gather), O(k F) per position;
- `expected_value(f, policy)`: `V = sum_a pi(a) Q(s, a)` for `[N, |V|]` probabilities;
- `soft_value(f, log_policy, beta)`: `V* = beta log sum_a pi(a) exp(Q(s, a) / beta)`.

The heads of this package are *linear in their features*, `Q(s, .) = W f + b` (`linear_form()` returns `W`, `b`):
the base class implements the four reads above from that form (the full-Q product is `linear_q`, the one place it is
written; V is `(pi^T W) . f + pi^T b`, an `[N, F]` buffer instead of an `[N, |V|]` one). A head that is not linear
in any features returns `None` from `linear_form()` and overrides `q_from_features` (the others then go through the
full Q).

Decoding also asks two optional questions, `None` where a head has no answer: `hidden_linear_form()` (`Q = W h + b`
in the policy's own hidden state, which `fold_tilt` writes into the LM head) and `lm_head_input(h)` (`g` with
`Q = W_lm g + b`, so that the LM head applied to `h + g / beta` gives the tilted logits: the processor's in-head
tilt). Heads with their own cache over the context keep per-sequence decode state, updated once per generation step
(`update_decode_state`, rows reordered by beam search) and dropped with `reset_decode_state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

Q_HEAD_INITS = ("zeros", "normal", "lm_head")

# Up to this many rows, `(W f^T)^T + b` runs about twice as fast as `F.linear(f, W, b)` on CPU (MKL) and as fast
# elsewhere: it matters at decoding, where the product costs as much as the LM head for a handful of rows.
_FEW_ROWS = 64


@dataclass
class QContext:
    """The tokens the hidden states were computed from, for heads that read the context themselves (dense and tied
    heads ignore it). Every field is optional and shaped as the backbone's inputs.

    Args:
        input_ids: `[B, T]` token ids (at decoding: the sequences so far, `[N, L]`).
        attention_mask: `[B, T]`, 1 on real tokens.
        position_ids: `[B, T]` positions (packed rows restart at 0 at each document).
    """

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None


class LinearForm(NamedTuple):
    """`Q(s, .) = weight @ f + bias`: `weight` `[|V|, F]` (detached where it is not the head's own), `bias` `[|V|]`."""

    weight: torch.Tensor
    bias: torch.Tensor


def linear_q(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The full-Q product `W f + b`, `[..., |V|]` from features `[..., F]`, in the weight's dtype when it matches the
    bias's, else the product in the weight's dtype and the sum in the bias's (a bf16 LM head read by an fp32 bias)."""
    features = features.to(weight.dtype)
    if bias is not None and bias.dtype != weight.dtype:
        return F.linear(features, weight).to(bias.dtype) + bias
    if bias is not None and features.dim() == 2 and features.shape[0] <= _FEW_ROWS:
        return torch.addmm(bias[:, None], weight, features.T).T.contiguous()
    return F.linear(features, weight, bias)


def linear_expected_value(
    policy: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """`V = sum_a pi(a) (W f + b)_a = (pi^T W) . f + pi^T b`, `[N]` in the policy's dtype, from `policy` `[N, |V|]` and
    `features` `[N, F]`: one `|V| x F` product per row (the cost of the full Q) and an `[N, F]` buffer, not `[N, |V|]`."""
    dtype = policy.dtype
    mean_row = (policy.to(weight.dtype) @ weight).to(dtype)  # (N, F)
    return (mean_row * features.to(dtype)).sum(-1) + policy @ bias.to(dtype)


class QHead(nn.Module):
    """A vocabulary-sized Q head (see the module docstring). Subclasses set `q_head_type` (the registry's key, saved
    in `q_head_config.json`) and implement `build`, `reset_parameters`, `features` and `linear_form` (or
    `q_from_features`); everything else has a default.

    Args:
        hidden_size: `H`, the size of the policy's hidden state the head reads.
        vocab_size: `|V|`, one Q value per token.
    """

    q_head_type: ClassVar[str] = ""
    # What Q is, in words (a model card states it).
    formula: ClassVar[str] = "`Q(s, a)` from the policy's final hidden state `h_s`"
    # What a checkpoint of another shape was saved from, in load errors ("... saved from a model with another ...").
    shape_source: ClassVar[str] = "vocabulary or hidden size"
    # True for a head with its own network that trains on the Q loss alone: the trainer then leaves `L_LM` out and
    # keeps the frozen policy in eval mode, as `QHeadConfig(q_head_only=True)` does.
    leaves_policy_frozen: ClassVar[bool] = False

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.hidden_size, self.vocab_size = int(hidden_size), int(vocab_size)

    # ---- construction, config, state ----------------------------------------------------------------------------------

    @classmethod
    def build(
        cls, backbone: nn.Module, *, hidden_size: int, vocab_size: int, device=None, rank: int | None = None
    ) -> QHead:
        """A fresh head for `backbone` (bound to it, see `bind`). `rank` is the `q_head_rank` option: heads without
        one raise a `ValueError` naming it when it is not `None`."""
        raise NotImplementedError

    def bind(self, backbone: nn.Module) -> None:
        """Attach to the backbone the head reads from (a tied head reads the LM head's weight); called again after the
        backbone changes (`merge_and_unload`). Default: nothing to do."""

    def reset_parameters(self, init: str = "zeros", *, std: float = 0.02, backbone: nn.Module | None = None) -> None:
        """(Re)initialise in place: `"zeros"` (Q = 0), `"normal"` (std `std`) or `"lm_head"` (Q starts as the logits)."""
        raise NotImplementedError

    def resize_vocab(self, vocab_size: int) -> None:
        """Follow `resize_token_embeddings`: new tokens get Q = 0 (their rows and bias start at zero)."""
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        return self.hidden_size

    @property
    def out_features(self) -> int:
        return self.vocab_size

    def to_config(self) -> dict:
        """What `q_head_config.json` records about the head besides its shape: its type and options."""
        return {"q_head_type": self.q_head_type, "q_head_rank": None}

    def saved_fingerprint(self) -> dict:
        """Entries added to `q_head_config.json` at save so that loading can tell the head is read against the same
        things it was trained against (a tied head: the LM head). Default: none."""
        return {}

    def check_fingerprint(self, config: dict, where: str) -> None:
        """Raise a `ValueError` naming `where` (the config file) when `config`'s fingerprint does not match this
        model. Default: nothing to check."""

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        """The `build` options (besides `rank`) that rebuild a saved head from its `q_head_config.json` entries, so
        that loading a folder makes the same head before its tensors are read. Default: none."""
        return {}

    def saved_tensors(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """What `q_head.safetensors` holds: the head's state dict, or `state` (the head's part of a state dict a
        trainer gathered, keys relative to the head). Default: all of it. A head holding shared tensors (a Q model's
        tied embeddings) keeps each once."""
        return dict(self.state_dict() if state is None else state)

    def load_saved_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Load what `saved_tensors` wrote (checked against its names and shapes already). Default: the state dict."""
        self.load_state_dict(state)

    def q_network_parameters(self, backbone: nn.Module) -> set[int]:
        """The ids of the backbone's parameters that belong to the head's own network (trained by the Q loss, kept
        trainable by `q_head_only`). Default: none."""
        return set()

    def check_training(self, backbone: nn.Module) -> None:
        """Raise a `ValueError` before training when the backbone's trainable parameters cannot go with this head (a
        head that must leave the policy the base model). Default: any."""

    def check_merge(self) -> None:
        """Raise a `ValueError` before `merge_and_unload` when merging the backbone's adapters into its weights would
        break the head (the adapter is the head's own network). Default: nothing to check."""

    # ---- reading Q ------------------------------------------------------------------------------------------------------

    def features(self, hidden: torch.Tensor, context: QContext | None = None) -> torch.Tensor:
        """`f = phi(h, context)`, `[..., F]` from hidden states `[..., H]` (with grad where the head has parameters in
        it). Compute it once per forward and pass it to the reads below."""
        raise NotImplementedError

    def linear_form(self) -> LinearForm | None:
        """`(W, b)` with `Q(s, .) = W f + b` on the features, or `None` for a head that is not linear in them."""
        return None

    def q_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """The full Q, `[..., |V|]` (fp32 for fp32 heads), from features `[..., F]`."""
        form = self._require_linear_form()
        return linear_q(features, form.weight, form.bias)

    def gather(self, features: torch.Tensor, ids: torch.LongTensor) -> torch.Tensor:
        """`Q(s, a)` for `ids` `[..., k]` against features `[..., F]` (the same leading shape): `[..., k]`. A linear head
        gathers `k` rows of `W` per position (O(k F), no `|V|`-sized product; the gradient reaches only those rows)."""
        form = self.linear_form()
        if form is None:
            return self.q_from_features(features).gather(-1, ids)
        rows = form.weight[ids]  # (..., k, F)
        dtype = torch.promote_types(rows.dtype, form.bias.dtype)
        q = (features.unsqueeze(-2).to(dtype) * rows.to(dtype)).sum(-1)
        return q + form.bias[ids]

    def expected_value(
        self, features: torch.Tensor, policy: torch.Tensor, *, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`V = sum_a pi(a) Q(s, a)`, `[N]`, from features `[N, F]` and probabilities `[N, |V|]` (no grad needed).

        Args:
            weight: the linear form's `W` as the caller already holds it (e.g. the LM head's weight in the chunked
                kernel's compute dtype), so that no copy of a `[|V|, F]` weight is made per call.
        """
        form = self.linear_form()
        if form is None:
            return (policy * self.q_from_features(features).to(policy.dtype)).sum(-1)
        return linear_expected_value(policy, features, form.weight if weight is None else weight, form.bias)

    def soft_value(self, features: torch.Tensor, log_policy: torch.Tensor, beta: float) -> torch.Tensor:
        """`V* = beta log sum_a pi(a) exp(Q(s, a) / beta)`, `[N]` in `log_policy`'s dtype, from features `[N, F]` and
        log-probabilities `[N, |V|]` (one `[N, |V|]` Q buffer: the log-sum-exp has no linear shortcut)."""
        q = self.q_from_features(features).to(log_policy.dtype)
        return beta * torch.logsumexp(log_policy + q / beta, dim=-1)

    def full_q(self, hidden: torch.Tensor, context: QContext | None = None) -> torch.Tensor:
        """The full Q, `[..., |V|]`, from hidden states (features and product in one call)."""
        return self.q_from_features(self.features(hidden, context))

    def forward(self, hidden: torch.Tensor, context: QContext | None = None) -> torch.Tensor:
        return self.full_q(hidden, context)

    def _require_linear_form(self) -> LinearForm:
        form = self.linear_form()
        if form is None:
            raise NotImplementedError(f"{type(self).__name__} has no linear form: it must override `q_from_features`.")
        return form

    # ---- decoding ---------------------------------------------------------------------------------------------------

    def hidden_linear_form(self) -> LinearForm | None:
        """`(W, b)` in float64 with `Q(s, .) = W h + b` in the policy's own hidden state (what `fold_tilt` adds to the
        LM head, divided by beta), or `None` for a head that reads more than `h`."""
        return None

    def lm_head_input(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """`g` (`[..., H]`) with `Q(s, .) = W_lm g + b` for this backbone's LM head `W_lm` and the head's bias `b`, so
        that the LM head applied to `h + g / beta` (plus `b / beta`) gives the tilted logits; `None` where the head has
        no such form (the processor then adds `Q / beta` to the scores)."""
        return None

    def update_decode_state(self, context: QContext, parent: torch.LongTensor | None) -> None:
        """Called by the decoding processor once per generation step, before it reads Q. `context.input_ids` are the
        sequences so far (`[N, L]`), `parent` `[N]` the row each came from at the previous step (beam search reorders
        rows), `None` at the first step of a new generation. A head with its own KV cache reorders it by `parent`
        and extends it here. Default: no state."""

    def reset_decode_state(self) -> None:
        """Drop any decode state (the processor is removed). Default: no state."""

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, vocab_size={self.vocab_size}"


def check_q_head_init(q_head_init: object) -> str:
    if q_head_init not in Q_HEAD_INITS:
        raise ValueError(f"`q_head_init` must be one of {Q_HEAD_INITS}, got {q_head_init!r}.")
    return q_head_init
