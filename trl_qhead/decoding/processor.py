"""`QTiltLogitsProcessor`: the tilt inside `generate()`, with the exact per-sequence KL it adds."""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from ..checks import check_beta
from ..modeling import AutoModelForCausalLMWithQHead
from ..stop_tokens import stop_token_ids
from .kl_record import KLRecordingProcessor, SequenceKLRecord
from .sources import QHeadSource, QSource
from .tilt import check_top_k, tilt_logprobs_and_kl

# The smallest beta for which a tied head tilts inside the LM head (`record_kl=False`); smaller ones use the processor's
# overflow-free tilt.
HEAD_TILT_MIN_BETA = 1e-3


class QTiltLogitsProcessor(KLRecordingProcessor):
    r"""Tilt `generate` towards high Q: scores become `log_softmax(scores + Q(s, .) / beta)`.

    Sampling then draws from `pi'(a|s) ∝ pi(a|s) exp(Q(s, a) / beta)`; greedy decoding takes its argmax; beam search
    scores hypotheses by `log pi'` (the returned scores are normalised log-probabilities so that beams compare
    fairly). `Q(s, .)` is read from the same forward pass that produced the logits: a hook on the LM head keeps the
    hidden state of the last position, so no forward pass is added (KV cache on as usual).

    Order: `generate` applies its built-in processors first (repetition penalty, min length, bad words, ...), then the
    `logits_processor` list in order, then the sampling warpers (temperature, top-k, top-p). So the tilt applies to
    scores already changed by built-in processors, and temperature/top-p act on the tilted distribution.

    Exact KL: for each row the processor adds up, over the generated steps, `KL(pi'(.|s_t) || pi(.|s_t))` in closed
    form over the vocabulary, where `pi = softmax(scores it receives)` and `pi'` is what it returns (after top-k
    masking). Steps after a row emitted EOS (or pad) are not counted. Read it as `processor.kl` after `generate`
    (`[rows]`: batch x num_return_sequences, or batch x num_beams for beam search, where each entry follows its
    hypothesis as beams are reordered: it is the KL of the running beams, not of beams that finished earlier). A new
    `generate` call (sequences that do not continue the last step's) starts a new record; `reset()` forces one.

    The hook lives while the processor does: call `remove()`, use `with QTiltLogitsProcessor(...) as processor:`, or
    drop the processor (its hook goes with it when it is garbage collected).

    Args:
        model: an `AutoModelForCausalLMWithQHead` (its Q head is the source), or a `QSource` such as `ImplicitQ`.
        beta: tilt temperature, `> 0`. Small beta follows Q greedily; large beta stays close to the base model;
            `float("inf")` reproduces the base model's generation exactly (nothing is added, no hook is installed).
        top_k: restrict the tilt to the base model's top-k tokens (by the incoming scores) and mask all others
            (ILQL / controlled-decoding style); the Q values of those k tokens only are computed.
        record_kl: record the exact KL (default); `False` saves one log-softmax per step. With a tied Q head
            (`Q = W_lm (U h) + b`) and a plain LM head, `False` also moves the tilt into the LM head: from the second
            step of a generation on, the LM head reads `h + U h / beta` and adds `b / beta`, so `generate` receives
            `z + Q / beta` directly at the cost of an H x H product per token (instead of `H x |V|`). Only the forwards
            that continue this processor's generation (same rows, one new token, the KV cache one step longer) are
            tilted, and only without grad; built-in processors (repetition penalty, ...) then act on tilted scores.
            Not for `beta < 1e-3`, where `U h / beta` could overflow.
        eos_token_id: id(s) after which a row counts as finished for the KL record; default: the model's generation
            config `eos_token_id` and `pad_token_id`.

    Example:
    ```python
    >>> processor = QTiltLogitsProcessor(model, beta=1.0)
    >>> out = model.generate(**inputs, logits_processor=[processor], do_sample=True, max_new_tokens=32)
    >>> processor.kl  # nats of KL(pi' || pi) per sequence
    ```
    """

    def __init__(
        self,
        model: AutoModelForCausalLMWithQHead | QSource,
        beta: float,
        top_k: int | None = None,
        *,
        record_kl: bool = True,
        eos_token_id: int | list[int] | None = None,
    ):
        self.beta = check_beta(beta, allow_inf=True)
        self.top_k = check_top_k(top_k)
        self.record_kl = bool(record_kl)
        self.source = model if isinstance(model, QSource) else QHeadSource(model)
        if eos_token_id is None:
            eos_token_id = _default_stop_ids(model)
        self._record = SequenceKLRecord([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self._finalizer = None
        self._head_tilt = (
            not self.record_kl
            and self.top_k is None
            and math.isfinite(self.beta)
            and self.beta >= HEAD_TILT_MIN_BETA  # below, U h / beta could overflow: the stable tilt of `tilt.py`
            and isinstance(self.source, QHeadSource)
            and self.source.supports_head_tilt()
        )
        if math.isfinite(self.beta):
            self.source.attach()
            if self._head_tilt:
                self.source.enable_head_tilt(self.beta)
            # The hook must not keep the processor alive, and must not outlive it.
            self._finalizer = weakref.finalize(self, self.source.detach)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta}, top_k={self.top_k}, source={type(self.source).__name__})"

    # ---- lifetime ---------------------------------------------------------------------------------------------------

    def remove(self) -> None:
        """Remove the hook from the model; the processor cannot be used afterwards (KL stays readable)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> QTiltLogitsProcessor:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- per step ---------------------------------------------------------------------------------------------------

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        parent = self._record.step(input_ids)  # beam search reorders rows: follow them
        if math.isinf(self.beta) and self.top_k is None:
            return scores  # the base model, bit for bit: not even a renormalisation
        indices = None
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            indices = scores.topk(self.top_k, dim=-1).indices
        if self._head_tilt:
            q = self.source.take_head_tilt(input_ids, parent)
            self.source.arm(input_ids.shape[0], input_ids.shape[1])
            if q is None:  # the LM head produced `z + Q / beta` already
                return torch.log_softmax(scores.float(), dim=-1)
            q = q.to(scores.device)
        elif math.isinf(self.beta):
            q = torch.zeros(indices.shape if indices is not None else scores.shape, device=scores.device)
        else:
            q = self.source(input_ids, parent, indices).to(scores.device)
            if q.shape[-1] != (indices.shape[-1] if indices is not None else scores.shape[-1]):
                raise ValueError(
                    f"The Q values have {q.shape[-1]} tokens but the scores have {scores.shape[-1]}: the Q head "
                    "and the generating model must share one vocabulary."
                )
        tilted, step = tilt_logprobs_and_kl(scores, q, self.beta, indices, with_kl=self.record_kl)
        if step is not None:
            self._record.add(step)
        return tilted


def _default_stop_ids(model) -> list[int]:
    # a Q-head model, the model of a QHeadSource, or the reference of an ImplicitQ: the one that generates
    for candidate in (getattr(model, "reference", None), getattr(model, "model", None), model):
        if not isinstance(candidate, nn.Module):
            continue
        ids = stop_token_ids(candidate)
        if ids is not None:
            return ids
    return []
