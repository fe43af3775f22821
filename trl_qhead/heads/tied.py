"""The tied Q head: `Q(s, .) = W_lm (U h) + b`, sharing the LM head's rows (`q_head_type="tied"`; docs/heads.md).

`W_lm` is the backbone's LM head weight, read from the backbone at every call (never copied into the Q head, never
saved with it, never trained through the Q loss: it is always detached). What the head owns and trains is `U` (H x H,
or `U = A B` with `A` H x r and `B` r x H when `q_head_rank=r`) and a `|V|` bias `b`. `U` starts at zero, so the
untrained tilt is zero.

As a `QHead` it is linear in its features: `features(h) = U h` (an H x H product per position) and `linear_form() =
(W_lm, b)`, so every read is the base class's: `Q(s_t, a_t) = W_lm[a_t] . (U h_t) + b[a_t]` (O(k H) per position),
`V(s) = (pi^T W_lm) . (U h) + pi^T b` (no `[N, |V|]` buffer). It also answers both decoding questions:
`hidden_linear_form() = (W_lm U, b)` (for `fold_tilt`) and `lm_head_input(h) = U h` (the in-head tilt).

Which LM heads it can read (`lm_head_weight`): a plain `nn.Linear` (any float dtype); a PEFT LoRA-adapted head (its
merged weight: base plus the active adapters' delta, recomputed at each call because the adapters train); a
bitsandbytes 4-bit head (dequantised once and cached while the packed weight stays the same). Any other head raises a
`TypeError` that says to use `q_head_type="dense"`.

At save it records a fingerprint of the whole `W_lm` (`lm_head_sha256`: the SHA-256 of its bytes in float32,
bfloat16 and float16), and loading refuses any other LM head (`check_fingerprint`); folders saved before, with only
the 8-row `lm_head_probe`, are still checked against that probe.
"""

from __future__ import annotations

import hashlib
import math
import os

import torch
from torch import nn
from torch.nn import functional as F

from .base import LinearForm, QContext, QHead, check_q_head_init

# The dtypes a fingerprint covers: a model saved in one and loaded in another is the same LM head.
FINGERPRINT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


class TiedQHead(QHead):
    """`Q(s, .) = W_lm (U h) + b` with `W_lm` read from the backbone's LM head (see the module docstring).

    Args:
        hidden_size, vocab_size: `H` and `|V|` (those of the LM head).
        rank: `None` for a full `H x H` U, else U = A B of rank `rank`.
        device: where the parameters live.

    Call `bind(backbone)` before use (`AutoModelForCausalLMWithQHead` does): the backbone is kept as a plain attribute,
    not a submodule, so its weights are neither in this module's parameters nor in its state dict.
    """

    q_head_type = "tied"
    formula = (
        "`Q(s, a) = W_lm (U h_s) + b` (a tied head, `q_head_type=tied`: the LM head's rows `W_lm` after an H x H map "
        "`U` of the hidden state, plus a per-token bias)"
    )
    shape_source = "LM head (vocabulary or hidden size)"

    def __init__(self, hidden_size: int, vocab_size: int, rank: int | None = None, device=None):
        super().__init__(hidden_size, vocab_size)
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

    @classmethod
    def build(cls, backbone, *, hidden_size, vocab_size, device=None, rank=None) -> TiedQHead:
        head = cls(hidden_size, vocab_size, check_q_head_rank(rank, hidden_size), device=device)
        head.bind(backbone)
        return head

    def to_config(self) -> dict:
        return {"q_head_type": self.q_head_type, "q_head_rank": self.rank}

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
        shape = tuple(self._read_lm_weight().shape)
        if shape != (self.vocab_size, self.hidden_size):
            raise ValueError(
                f"The tied Q head is for an LM head of shape {(self.vocab_size, self.hidden_size)}, but the backbone's "
                f"LM head has shape {shape}."
            )

    def lm_weight(self) -> torch.Tensor:
        """`W_lm`, `[|V|, H]`, detached: the Q loss never reaches it."""
        weight = self._read_lm_weight()
        if weight.shape[0] != self.vocab_size:
            raise ValueError(
                f"The LM head now has {weight.shape[0]} rows but the tied Q head's bias has {self.vocab_size}: the "
                "token embeddings were resized on the backbone alone. Resize through the wrapper, "
                "`model.resize_token_embeddings(n)`, which resizes the Q head with them."
            )
        return weight

    def _read_lm_weight(self) -> torch.Tensor:
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
    def reset_parameters(self, init: str = "zeros", *, std: float = 0.02, backbone: nn.Module | None = None) -> None:
        """`"zeros"`: U = 0 (low rank: A = 0, B ~ N(0, 1/H) so that A gets gradients); `"normal"`: U ~ N(0, std^2)
        (low rank: A and B scaled so that U's entries have std `std`); `"lm_head"`: U = I, Q starts as the logits
        without their bias (full rank only). The bias starts at zero."""
        check_q_head_init(init)
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

    @torch.no_grad()
    def resize_vocab(self, vocab_size: int) -> None:
        """The LM head was resized: new tokens get a zero bias (their Q is `W_lm[a] . (U h)` from their new rows)."""
        bias = self.bias.new_zeros(vocab_size)
        bias[: min(self.vocab_size, vocab_size)] = self.bias[:vocab_size]
        self.bias = nn.Parameter(bias)
        self.vocab_size = int(vocab_size)

    # ---- the QHead interface ----------------------------------------------------------------------------------------

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """`U h` in fp32 for hidden states of any leading shape (an H x H, or 2 H r, product per position)."""
        hidden = hidden.to(self.dtype)
        if self.rank is None:
            return F.linear(hidden, self.u)
        return F.linear(F.linear(hidden, self.u_right), self.u_left)

    def features(self, hidden: torch.Tensor, context: QContext | None = None) -> torch.Tensor:
        return self.project(hidden)

    def linear_form(self) -> LinearForm:
        return LinearForm(self.lm_weight(), self.bias)

    def hidden_linear_form(self) -> LinearForm:
        """`W_lm U` and `b` in float64: the dense head with the same Q."""
        return LinearForm(self.lm_weight().double() @ self.u_matrix().double(), self.bias.double())

    def lm_head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.project(hidden)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """`W_lm U` (fp32, `[|V|, H]`): the dense head with the same Q values (inspection, tests)."""
        return self.lm_weight().float() @ self.u_matrix()

    # ---- the LM head it was trained against --------------------------------------------------------------------------

    @torch.no_grad()
    def saved_fingerprint(self) -> dict:
        """`{"lm_head_sha256": {dtype: sha256}}` of the whole `W_lm` in each of `FINGERPRINT_DTYPES`."""
        weight = self.lm_weight()
        return {"lm_head_sha256": {_dtype_name(d): lm_weight_sha256(weight, d) for d in FINGERPRINT_DTYPES}}

    @torch.no_grad()
    def check_fingerprint(self, config: dict, where: str) -> None:
        """The LM head must be the one the head was saved with: its whole `W_lm` hashed in its own dtype (a model
        saved in fp32 and loaded in bf16 matches the bf16 hash); folders saved before the hash by the 8-row probe."""
        weight = self.lm_weight()
        hashes = config.get("lm_head_sha256")
        if isinstance(hashes, dict) and _dtype_name(weight.dtype) in hashes:
            if lm_weight_sha256(weight, weight.dtype) == hashes[_dtype_name(weight.dtype)]:
                return
        elif hashes is None and config.get("lm_head_probe") is not None:
            if _probe_matches(config["lm_head_probe"], weight):
                return
        elif hashes is None:
            return  # nothing recorded (a hand-written config)
        elif isinstance(hashes, dict):
            raise ValueError(
                f"{where} fingerprints the LM head in {sorted(hashes)}; this model's LM head is {weight.dtype}: load "
                "the model in one of those dtypes to check it is the LM head the tied Q head was trained with."
            )
        raise ValueError(
            f"The tied Q head in {os.path.dirname(where) or where} was saved with another LM head than this model's "
            f"(the `lm_head_sha256` / `lm_head_probe` in {where} do not match its weights): Q = W_lm (U h) + b reads "
            "the LM head, so it only means something on the LM head it was trained with."
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def lm_weight_sha256(weight: torch.Tensor, dtype: torch.dtype) -> str:
    """SHA-256 of `weight`'s bytes in `dtype` (row-major, on the CPU)."""
    weight = weight.detach()
    if hasattr(weight, "full_tensor"):  # an FSDP2 shard (DTensor): the whole weight, gathered
        weight = weight.full_tensor()
    data = weight.to("cpu", dtype).contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def lm_head_probe(weight: torch.Tensor) -> list[float]:
    """A few entries of `W_lm` (8 rows spread over the vocabulary, 4 columns each): what folders saved before
    `lm_head_sha256` recorded."""
    rows = torch.linspace(0, weight.shape[0] - 1, 8).long().unique().to(weight.device)
    return [float(x) for x in weight[rows, :4].double().flatten().cpu()]


def _probe_matches(probe: list[float], weight: torch.Tensor) -> bool:
    saved = torch.tensor(probe, dtype=torch.float64)
    now = torch.tensor(lm_head_probe(weight), dtype=torch.float64)
    scale = float(saved.abs().max()) if saved.numel() else 0.0
    return now.shape == saved.shape and bool(((now - saved).abs() <= 2e-2 * saved.abs() + 1e-2 * scale).all())
