"""Distribution-preserving token exclusion (G-IDLE, arXiv 2503.18050) as a `generate` logits processor.

Banned tokens are removed by the KL projection of the incoming distribution onto the allowed set: with
`p = softmax(scores)` and `A` the allowed tokens, the output is `log q` with `q(x) = p(x) / p(A)` on `A` and `-inf` on
the banned tokens, which is `argmin_{q : q(banned) = 0} KL(q || p)`. Its exact cost is
`KL(q || p) = -log p(A) = -log(1 - p(banned))` nats per step.

- `TokenExclusionLogitsProcessor`: bans a fixed list of token ids (every row) and/or a per-row `[N, |V|]` boolean mask
  from a callable on `input_ids`, returns normalised log-probabilities, and records the exact KL per sequence.
- `sequence_ban`: such a callable for multi-token banned sequences (their last token is banned wherever the sequence's
  other tokens end the row).
- `exclusion_logprobs`: the pure tensor function (projection and its KL).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..stop_tokens import stop_token_ids
from .kl_record import KLRecordingProcessor, SequenceKLRecord

__all__ = ["TokenExclusionLogitsProcessor", "exclusion_logprobs", "sequence_ban"]

BanFn = Callable[[torch.LongTensor], torch.Tensor]


# ---- the math ------------------------------------------------------------------------------------------------------------


def exclusion_logprobs(scores: torch.Tensor, banned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL projection of `softmax(scores)` onto the tokens not in `banned`, and its cost.

    Args:
        scores: `[N, |V|]` scores `z` (logits or log-probs: `p = softmax(z)` either way; `-inf` allowed).
        banned: `[N, |V|]` boolean, True where a token is banned (broadcastable, e.g. `[1, |V|]`).

    Returns:
        `(logprobs, kl)`: `[N, |V|]` fp32 `log q`, `log p - log p(A)` on allowed tokens and `-inf` on banned ones, and
        `[N]` `KL(q || p) = -log p(A)`. A row whose allowed tokens all have probability 0 gets `kl = inf` and NaN
        log-probs; `TokenExclusionLogitsProcessor` checks for it.
    """
    logp = torch.log_softmax(scores.float(), dim=-1)
    kept = logp.masked_fill(banned, float("-inf"))
    log_mass = torch.logsumexp(kept, dim=-1)  # log p(A): more accurate than log1p(-p(banned)) when p(A) is small
    # A row that bans nothing has p(A) = 1 exactly; its log-sum-exp can round to a few 1e-7 and charge a phantom KL.
    log_mass = torch.where(banned.expand_as(kept).any(-1), log_mass, 0.0)
    return kept - log_mass[:, None], -log_mass


# ---- helpers ---------------------------------------------------------------------------------------------------------------


def _check_token_id(token_id, vocab_size: int, what: str) -> int:
    if isinstance(token_id, torch.Tensor) and token_id.dim() == 0 and not token_id.is_floating_point():
        token_id = int(token_id)
    if isinstance(token_id, bool) or not isinstance(token_id, int):
        raise TypeError(f"{what} must hold integer token ids, got {token_id!r} ({type(token_id).__name__}).")
    if not 0 <= token_id < vocab_size:
        raise ValueError(f"{what}: token id {token_id} is outside the vocabulary [0, {vocab_size}).")
    return token_id


def _model_vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])  # what `generate`'s scores are as wide as
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def sequence_ban(sequences: Iterable[Sequence[int]], vocab_size: int) -> BanFn:
    """A `banned_fn` for `TokenExclusionLogitsProcessor` that bans token sequences.

    For each sequence `[t_1, ..., t_n]` the returned callable bans `t_n` in every row whose last `n - 1` tokens are
    `t_1 .. t_{n-1}` (a one-token sequence bans its token everywhere), so the sequence is never completed. Like
    `generate`'s `bad_words_ids`, it looks at the whole row, prompt included.

    Args:
        sequences: the banned sequences of token ids, each non-empty.
        vocab_size: width of the scores; every id must lie in `[0, vocab_size)` (`ValueError` naming the id).

    Returns:
        `fn(input_ids: [N, L]) -> [N, vocab_size]` boolean mask, True where banned.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"`vocab_size` must be a positive integer, got {vocab_size!r}.")
    checked = []
    for sequence in sequences:
        sequence = [_check_token_id(t, vocab_size, "`sequences`") for t in sequence]
        if not sequence:
            raise ValueError("`sequences` must not contain an empty sequence.")
        checked.append(sequence)

    def banned_fn(input_ids: torch.LongTensor) -> torch.Tensor:
        mask = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.bool, device=input_ids.device)
        for sequence in checked:
            prefix, last = sequence[:-1], sequence[-1]
            if not prefix:
                mask[:, last] = True
            elif len(prefix) <= input_ids.shape[1]:
                tail = input_ids[:, input_ids.shape[1] - len(prefix) :]
                hit = (tail == torch.tensor(prefix, device=input_ids.device)).all(-1)
                mask[:, last] |= hit
        return mask

    return banned_fn


# ---- the logits processor -----------------------------------------------------------------------------------------------


class TokenExclusionLogitsProcessor(KLRecordingProcessor):
    r"""Ban tokens without distorting the rest: scores become `log(p(x) / p(A))` on allowed tokens, `-inf` on banned.

    With `p = softmax(scores)` and `A` the allowed tokens, the returned normalised log-probabilities are the KL
    projection of `p` onto distributions that never emit a banned token (G-IDLE, arXiv 2503.18050): the allowed
    tokens keep their relative probabilities. Greedy decoding takes the most likely allowed token; beam search scores
    hypotheses by `log q`.

    Order in `generate`: built-in processors, then the `logits_processor` list in order, then the sampling warpers
    (temperature, top-k, top-p). That is the order to use:
    - Temperature commutes with the exclusion exactly (`q^(1/T)` renormalised over `A` is `p^(1/T)` renormalised over
      `A`), so where it goes does not matter.
    - Top-p (and top-k, min-p, ...) do not commute with it: after the exclusion (the default) the nucleus is taken
      from the renormalised allowed distribution, as intended; before it, the nucleus is taken with the banned
      tokens' mass and can keep fewer allowed tokens, or only banned ones (then nothing is left: `RuntimeError`).
    - With `QTiltLogitsProcessor`: both orders sample the same distribution (tilting and renormalising over `A` are
      both reweightings), the tilt of the projected base `∝ p(x) exp(Q/beta)` on `A`, unless the tilt has a `top_k`
      (placed after the exclusion, its top-k is taken among the allowed tokens). Place the exclusion first
      (`[exclusion, tilt]`) and the two records add up to the exact `KL(final || base)` per step; with the tilt first
      each record is exact for its own step (`KL(tilted || base)`, then `KL(final || tilted)`), but their sum is not
      the KL of the final distribution to the base.

    Exact KL: each step adds `KL(q || p) = -log p(A) = -log(1 - p(banned))`, where `p` is the softmax of the scores the
    processor receives, per row, for the steps up to and including EOS (steps after a row emitted EOS or pad are not
    counted). Read it as `processor.kl` after `generate` (`[rows]`; with beam search one entry per running beam,
    following its hypothesis). A new `generate` call starts a new record; `reset()` forces one. Warpers after the
    processor are not part of it.

    Banning EOS is allowed: rows then cannot finish by emitting it and run to `max_new_tokens` (or another stop id).
    If every token of an unfinished row is banned, or every allowed token has probability 0 (an earlier processor
    masked them all), the processor raises a `RuntimeError` instead of returning NaN. Rows that already finished are
    exempt: `generate` replaces their token with padding, and they get the unrestricted distribution when nothing is
    left.

    Args:
        banned_token_ids: ids banned in every row (each in `[0, vocab_size)`, else `ValueError` naming the id).
        banned_fn: optional per-row bans: `fn(input_ids: [N, L]) -> [N, |V|]` boolean tensor, True where banned,
            called once per step (see `sequence_ban` for banned token sequences); combined with `banned_token_ids`.
        vocab_size: width of the scores; default: the rows of `model`'s LM head. One of the two is required.
        model: the generating model (plain, PEFT or `AutoModelForCausalLMWithQHead`), for the defaults of
            `vocab_size` and `eos_token_id`.
        eos_token_id: id(s) after which a row counts as finished; default: `model`'s generation config `eos_token_id`
            and `pad_token_id` (none without a model: every step counts).
        record_kl: record the exact KL (default).

    Example:
    ```python
    >>> exclusion = TokenExclusionLogitsProcessor([bad_id], model=model)
    >>> out = model.generate(**inputs, logits_processor=[exclusion], do_sample=True, top_p=0.9, max_new_tokens=32)
    >>> exclusion.kl  # nats of KL(q || p) per sequence
    ```
    """

    def __init__(
        self,
        banned_token_ids: Iterable[int] = (),
        banned_fn: BanFn | None = None,
        *,
        vocab_size: int | None = None,
        model: nn.Module | None = None,
        eos_token_id: int | list[int] | None = None,
        record_kl: bool = True,
    ):
        if vocab_size is None and model is None:
            raise TypeError("Pass `vocab_size` or `model`: the banned ids are checked against the vocabulary.")
        if vocab_size is not None and (
            isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1
        ):
            raise ValueError(f"`vocab_size` must be a positive integer, got {vocab_size!r}.")
        if model is not None:
            model_vocab = _model_vocab_size(model)
            if vocab_size is not None and vocab_size != model_vocab:
                raise ValueError(f"`vocab_size` ({vocab_size}) differs from the model's LM head ({model_vocab} rows).")
            vocab_size = model_vocab
        if isinstance(banned_token_ids, torch.Tensor):
            banned_token_ids = banned_token_ids.reshape(-1).tolist()
        elif isinstance(banned_token_ids, int):
            banned_token_ids = [banned_token_ids]
        ids = sorted({_check_token_id(t, vocab_size, "`banned_token_ids`") for t in banned_token_ids})
        if len(ids) == vocab_size:
            raise ValueError(f"`banned_token_ids` bans all {vocab_size} tokens of the vocabulary: nothing to sample.")
        if banned_fn is not None and not callable(banned_fn):
            raise TypeError(f"`banned_fn` must be callable, got {type(banned_fn).__name__}.")
        self.vocab_size = vocab_size
        self.banned_token_ids = ids
        self.banned_fn = banned_fn
        self.record_kl = bool(record_kl)
        if eos_token_id is None:
            eos_token_id = (stop_token_ids(model) or []) if model is not None else []
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self._record = SequenceKLRecord(eos)
        self._ids = torch.tensor(ids, dtype=torch.long)

    def __repr__(self) -> str:
        n, fn = len(self.banned_token_ids), self.banned_fn
        return f"{type(self).__name__}({n} banned ids, banned_fn={fn!r}, vocab_size={self.vocab_size})"

    def _banned(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        rows, width = scores.shape
        if width < self.vocab_size:
            raise ValueError(
                f"The scores have {width} tokens but the processor was built for a vocabulary of {self.vocab_size}."
            )
        banned = torch.zeros(1, width, dtype=torch.bool, device=scores.device)
        banned[:, self._ids.to(scores.device)] = True
        if self.banned_fn is None:
            return banned
        extra = self.banned_fn(input_ids)
        if not isinstance(extra, torch.Tensor) or extra.dtype != torch.bool or tuple(extra.shape) != (rows, width):
            got = (
                f"{extra.dtype} tensor of shape {tuple(extra.shape)}"
                if isinstance(extra, torch.Tensor)
                else type(extra).__name__
            )
            raise ValueError(f"`banned_fn` must return a bool tensor of shape {(rows, width)}, got a {got}.")
        return banned | extra.to(scores.device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._record.step(input_ids)  # beam search reorders rows: follow them
        banned = self._banned(input_ids, scores)
        logprobs, step = exclusion_logprobs(scores, banned)
        stuck = torch.isinf(step)  # no allowed probability mass left
        if bool(stuck.any()):
            live = stuck & ~self._record.finished.to(stuck.device)
            if bool(live.any()):
                rows = live.nonzero()[:, 0].tolist()
                everything = banned.expand_as(scores)[live].all(-1)
                why = (
                    "every token is banned"
                    if bool(everything.all())
                    else "every token that is not banned has probability 0 (masked by an earlier processor or "
                    "warper, e.g. a tilt's top_k or top-p placed before the exclusion)"
                )
                raise RuntimeError(f"TokenExclusionLogitsProcessor: in row(s) {rows} {why}: nothing left to sample.")
            # finished rows: generate pads them anyway; give them the unrestricted distribution rather than NaN
            logprobs = torch.where(stuck[:, None], torch.log_softmax(scores.float(), dim=-1), logprobs)
        if self.record_kl:
            self._record.add(step)
        return logprobs
