"""Q heads: the `QHead` interface (`base.py`), one file per head, and the registry below.

Adding a head is one file (a `QHead` subclass) plus one line in `Q_HEADS`; docs/heads.md walks through the tied head
as the example.
"""

from __future__ import annotations

from torch import nn

from .adapter import AdapterQHead
from .base import Q_HEAD_INITS, LinearForm, QContext, QHead, check_q_head_init, linear_expected_value, linear_q
from .dense import DenseQHead
from .q_model import QModelHead
from .tied import TiedQHead, check_q_head_rank, lm_head_weight

# The type of a fresh head, and of a checkpoint saved before heads had types.
DEFAULT_Q_HEAD_TYPE = DenseQHead.q_head_type

# `q_head_type` -> class. The key is what `q_head_config.json` records and `from_pretrained(q_head_type=...)` takes.
Q_HEADS: dict[str, type[QHead]] = {
    DenseQHead.q_head_type: DenseQHead,
    TiedQHead.q_head_type: TiedQHead,
    AdapterQHead.q_head_type: AdapterQHead,
    QModelHead.q_head_type: QModelHead,
}


def q_head_types() -> tuple[str, ...]:
    return tuple(Q_HEADS)


def check_q_head_type(q_head_type: object) -> str:
    if not isinstance(q_head_type, str) or q_head_type not in Q_HEADS:
        raise ValueError(f"`q_head_type` must be one of {q_head_types()}, got {q_head_type!r}.")
    return q_head_type


def q_head_class(q_head_type: str) -> type[QHead]:
    return Q_HEADS[check_q_head_type(q_head_type)]


def build_q_head(
    q_head_type: str,
    backbone: nn.Module,
    *,
    hidden_size: int,
    vocab_size: int,
    device=None,
    rank: int | None = None,
    **options,
) -> QHead:
    """A fresh head of type `q_head_type` for `backbone`, bound to it (`QHead.build`); `options` are the head's own
    (`q_head_options`, e.g. a context head's `output` or `q_model`): a head that takes none raises a `TypeError`."""
    cls = q_head_class(q_head_type)
    try:
        return cls.build(backbone, hidden_size=hidden_size, vocab_size=vocab_size, device=device, rank=rank, **options)
    except TypeError as error:
        if options and "unexpected keyword" in str(error):
            raise TypeError(
                f"q_head_type={q_head_type!r} takes no q_head_options {sorted(options)} ({error})."
            ) from error
        raise


def as_q_head(module: nn.Module) -> QHead:
    """`module` itself when it is a `QHead`; a plain `nn.Linear` (what the dense head used to be) as a `DenseQHead`
    sharing its parameters."""
    if isinstance(module, QHead):
        return module
    if isinstance(module, nn.Linear):
        return DenseQHead.from_linear(module)
    raise TypeError(f"Expected a QHead (or an nn.Linear dense head), got {type(module).__name__}.")


__all__ = [
    "AdapterQHead",
    "QModelHead",
    "DEFAULT_Q_HEAD_TYPE",
    "Q_HEADS",
    "Q_HEAD_INITS",
    "DenseQHead",
    "LinearForm",
    "QContext",
    "QHead",
    "TiedQHead",
    "as_q_head",
    "build_q_head",
    "check_q_head_init",
    "check_q_head_rank",
    "check_q_head_type",
    "linear_expected_value",
    "linear_q",
    "lm_head_weight",
    "q_head_class",
    "q_head_types",
]
