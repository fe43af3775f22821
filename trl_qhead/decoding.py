"""Q-tilted decoding: sample from `pi'(a|s) ∝ pi(a|s) exp(Q(s, a) / beta)` inside ordinary `generate()`.

- `QTiltLogitsProcessor`: a `transformers.LogitsProcessor` that adds `Q(s, .) / beta` to the scores. It reads the
  hidden state of the last position from the same forward pass that produced the logits (a hook on the LM head), so
  the tilt costs one `H x |V|` product per token and no extra forward pass. It also records the exact
  `KL(pi' || pi)` of every generated sequence, in closed form over the whole vocabulary.
- `fold_tilt`: the tilt folded into the LM head (`W_lm + W_q / beta`): an ordinary causal LM that runs at the base
  model's speed in any generator and loads with plain `transformers`.
- Q sources beyond the head: `ImplicitQ` turns a (policy, reference) pair into `Q = c (log pi_policy - log pi_ref)`
  ("DPO treats LLMs as Q-functions"), usable by the same processor on the reference model.
- `rerank`: Q-probe-style best-of-k: score complete samples by the Q of their final action and pick or sample.

The pure tensor functions (`tilt_logprobs`, `tilt_kl`) hold the math; the classes only wire them to `generate`.
"""

from __future__ import annotations

import copy
import inspect
import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LogitsProcessor, PreTrainedModel

from .compat import cache_kwargs, output_cache
from .losses import gather_action_q
from .modeling import AutoModelForCausalLMWithQHead, _is_peft_model

__all__ = [
    "ImplicitQ",
    "QHeadSource",
    "QSource",
    "QTiltLogitsProcessor",
    "RerankOutput",
    "fold_tilt",
    "rerank",
    "tilt_kl",
    "tilt_logprobs",
]


# ---- validation -------------------------------------------------------------------------------------------------------


def _check_beta(beta, *, name: str = "beta", allow_inf: bool = True) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"`{name}` must be a positive number, got {type(beta).__name__}.")
    beta = float(beta)
    if math.isnan(beta) or beta <= 0 or (math.isinf(beta) and not allow_inf):
        allowed = "a positive number (float('inf') disables the tilt)" if allow_inf else "a positive, finite number"
        raise ValueError(f"`{name}` must be {allowed}, got {beta}.")
    return beta


def _check_top_k(top_k) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive integer or None, got {top_k!r}.")
    return top_k


def _transformers_model(model: nn.Module) -> nn.Module:
    """The plain transformers model that `generate` runs, under a Q-head wrapper and PEFT."""
    if isinstance(model, AutoModelForCausalLMWithQHead):
        model = model.pretrained_model
    return model.get_base_model() if _is_peft_model(model) else model


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(_transformers_model(model).forward).parameters


# ---- the math: pure tensor functions ------------------------------------------------------------------------------------


def tilt_logprobs(
    scores: torch.Tensor, q: torch.Tensor, beta: float, top_k_indices: torch.LongTensor | None = None
) -> torch.Tensor:
    """`log pi'(.|s) = log_softmax(scores + q / beta)`, optionally restricted to some tokens.

    Args:
        scores: `[N, |V|]` base scores `z` (logits or log-probs: `pi = softmax(z)` either way).
        q: `[N, |V|]` Q values, or `[N, k]` Q values of the tokens in `top_k_indices`.
        beta: temperature of the tilt, `> 0`; `inf` adds nothing.
        top_k_indices: `[N, k]`; when given only these tokens keep their (tilted) score, all others get `-inf`.

    Returns:
        `[N, |V|]` fp32 normalised log-probabilities of the tilted policy.
    """
    return _tilt(scores, q, beta, top_k_indices, with_kl=False)[0]


def tilt_kl(scores: torch.Tensor, tilted_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact `KL(pi' || pi) = sum_a pi'(a) (log pi'(a) - log pi(a))` over the whole vocabulary, one value per row.

    The plain definition (the processor uses an equivalent form that reuses what the tilt already computed).

    Args:
        scores: `[N, |V|]` base scores, `pi = softmax(scores)`.
        tilted_logprobs: `[N, |V|]` `log pi'` (e.g. from `tilt_logprobs`); tokens with `pi' = 0` contribute 0.
    """
    base = torch.log_softmax(scores.float(), dim=-1)
    terms = tilted_logprobs.exp() * (tilted_logprobs - base)
    # 0 * (-inf - -inf) is NaN in floating point but 0 in the sum: tokens masked out of pi' add nothing.
    return torch.where(torch.isfinite(tilted_logprobs), terms, torch.zeros_like(terms)).sum(-1)


def _tilt(
    scores: torch.Tensor, q: torch.Tensor, beta: float, indices: torch.LongTensor | None, with_kl: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`log pi'` and, if asked, `KL(pi' || pi)`.

    With `t = q / beta` on the tokens `pi'` keeps, `log pi' - log pi = t - log Z' + log Z`, so
    `KL = sum_a pi'(a) t(a) - log Z' + log Z`: one log-sum-exp of the scores and a dot product on top of the tilt.

    Any beta > 0 is safe: the tilt is `(q - max q) / beta`, exactly 0 at the max (even where beta rounds to 0 in
    fp32) and clamped to `[-inf, 0]`, where the max runs over the tokens the scores allow (finite score, kept by
    top-k). A per-row constant changes neither pi' nor the KL, and this form neither overflows to `+inf` nor forms
    `inf - inf` or `0 / 0`: as beta -> 0 it tends to its limit, `pi` restricted to the allowed tokens of largest Q
    (greedy takes argmax Q, ties broken by the scores). Tokens with `pi' = 0` add 0 to the KL (never `0 * -inf`).
    """
    scores = scores.float()
    kept_scores = scores if indices is None else scores.gather(-1, indices)
    if math.isfinite(beta):
        q = q.float()
        q_max = torch.where(kept_scores > float("-inf"), q, float("-inf")).amax(dim=-1, keepdim=True)
        below = q - q_max
        shift = torch.where(below == 0, 0.0, below / beta).clamp(max=0.0)
    else:
        shift = torch.zeros_like(q, dtype=torch.float32)
    if indices is None:
        tilted = scores + shift
    else:
        tilted = torch.full_like(scores, float("-inf")).scatter_(-1, indices, kept_scores + shift)
    log_norm = torch.logsumexp(tilted, dim=-1, keepdim=True)
    logprobs = tilted - log_norm
    if not with_kl:
        return logprobs, None
    kept = logprobs if indices is None else logprobs.gather(-1, indices)
    probs = kept.exp()
    expected_shift = torch.where(probs > 0, probs * shift, 0.0).sum(-1)  # pi' = 0 (shift may be -inf) adds 0
    return logprobs, expected_shift - log_norm[:, 0] + torch.logsumexp(scores, dim=-1)


# ---- Q sources ----------------------------------------------------------------------------------------------------------


class QSource:
    """Where the tilt's `Q(s, .)` comes from, for the last position of the forward pass that produced the scores.

    A source hooks into the generating model (`attach`) so that it sees each forward pass, and answers `__call__`
    once per generation step. Subclass it to tilt with other value models.
    """

    def attach(self) -> None:
        """Install the hooks that observe the generating model (idempotent)."""

    def detach(self) -> None:
        """Remove the hooks (idempotent)."""

    def __call__(
        self,
        input_ids: torch.LongTensor,
        parent: torch.LongTensor | None,
        token_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Q values of the current step.

        Args:
            input_ids: `[N, L]` the sequences so far (what `generate` passes to logits processors).
            parent: `[N]` for each row, its row at the previous step (beam search reorders rows), or `None` when this
                is the first step of a new `generate` call.
            token_ids: `[N, k]`; when given, return only these tokens' Q values (`[N, k]`), else all (`[N, |V|]`).
        """
        raise NotImplementedError


def _last_position(x: torch.Tensor) -> torch.Tensor:
    # In `generate` (transformers >= 4.45 passes `logits_to_keep=1`) the LM head sees one position; other forwards (a
    # prefill without `logits_to_keep`, training) pass all of them: copy the last one out rather than keep the whole
    # tensor alive, and detach so that a forward with grad leaves no graph here.
    if x.dim() != 3:
        return x.detach()
    return x[:, -1].detach() if x.shape[1] == 1 else x[:, -1].detach().clone()


class _LMHeadCapture:
    """A forward hook on an LM head that keeps the last position of its input (and optionally of its output).

    It counts forward passes between two reads, so a reader can tell whether what it finds belongs to its step.
    """

    def __init__(self, module: nn.Module, keep_output: bool = False):
        self.module = module
        self.keep_output = keep_output
        self.hidden: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.count = 0
        self.paused = False
        self._handle = None

    def attach(self) -> None:
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.hidden = self.logits = None
        self.count = 0

    def _hook(self, module, args, kwargs, output):
        if self.paused:
            return
        hidden = args[0] if args else next(iter(kwargs.values()))
        self.hidden = _last_position(hidden)
        if self.keep_output:
            self.logits = _last_position(output[0] if isinstance(output, tuple) else output)
        self.count += 1

    def take(self, rows: int, new_generation: bool, who: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the last forward saw, checked to belong to this step's `rows` scores; consumed."""
        if self._handle is None:
            raise RuntimeError(f"{who} is not attached: it was removed (`remove()` or the end of a `with` block).")
        if self.count == 0 or self.hidden is None:
            raise RuntimeError(
                f"{who} found no hidden state from the LM head for this step: pass the processor to the `generate` of "
                "the model it was built with (the same LM head module), one processor per model."
            )
        if self.count > 1 and not new_generation:
            raise RuntimeError(
                f"{who}: the LM head ran {self.count} times since the last step (another logits processor that runs "
                "the model, such as classifier-free guidance, or assisted decoding?), so it cannot tell which hidden "
                "state belongs to these scores."
            )
        if self.hidden.shape[0] != rows:
            raise RuntimeError(
                f"{who}: the hidden state read from the LM head has {self.hidden.shape[0]} rows but the scores have "
                f"{rows}: it does not belong to this generation step."
            )
        hidden, logits = self.hidden, self.logits
        self.hidden = self.logits = None
        self.count = 0
        return hidden, logits


class QHeadSource(QSource):
    """Q from the model's own Q head, read off the hidden state the LM head saw in the same forward pass.

    Costs one `H x |V|` product per token (like the LM head itself), or `k x H` with `token_ids` (top-k tilting).

    Args:
        model: an `AutoModelForCausalLMWithQHead` (PEFT-wrapped or not).
    """

    def __init__(self, model: AutoModelForCausalLMWithQHead):
        if not isinstance(model, AutoModelForCausalLMWithQHead):
            raise TypeError(
                "`model` must be an AutoModelForCausalLMWithQHead (or pass a QSource such as ImplicitQ), got "
                f"{type(model).__name__}."
            )
        self.model = model
        self._capture = _LMHeadCapture(model.get_output_embeddings())

    def attach(self) -> None:
        self._capture.attach()

    def detach(self) -> None:
        self._capture.detach()

    def __call__(self, input_ids, parent, token_ids=None):
        hidden, _ = self._capture.take(input_ids.shape[0], parent is None, "QTiltLogitsProcessor")
        q_head = self.model.q_head
        if token_ids is not None:
            return gather_action_q(hidden[:, None, :], q_head, token_ids.to(q_head.weight.device))
        # `(W_q h^T)^T + b_q` is `F.linear(h, W_q, b_q)`; for a handful of rows MKL runs this layout about twice as
        # fast on CPU (and it is as fast elsewhere), which matters when the product costs as much as the LM head.
        return torch.addmm(q_head.bias[:, None], q_head.weight, hidden.to(q_head.weight.dtype).T).T.contiguous()


class ImplicitQ(QSource):
    """Implicit Q from a (policy, reference) pair: `Q(s, a) = c * (log pi_policy(a|s) - log pi_ref(a|s))`.

    A DPO-trained policy is a Q-function of its reference ("From r to Q*: your language model is secretly a
    Q-function"); tilting the reference with it at `beta` samples from `pi_ref^(1 - c/beta) pi_policy^(c/beta)`
    (normalised): `c == beta` reproduces the policy exactly, `c < beta` interpolates towards the reference, `c > beta`
    extrapolates past the policy (Transfer Q*-style weak-to-strong guidance uses a small policy on a large reference
    with the same tokenizer).

    The processor runs on the reference's `generate`; the reference's logits come from the same forward (a hook on its
    LM head). The policy runs once per token on the same tokens, with the attention mask and positions `generate`
    gives the reference and its own KV cache (reordered for beam search): an extra forward by nature, at the policy's
    cost per token.

    The two must be separate modules: a PEFT policy injects its adapters into its base model's layers, so that base
    object is not its reference any more: use a copy without the adapters, `copy.deepcopy(policy).unload()`.

    Args:
        policy: a causal LM (transformers, PEFT or `AutoModelForCausalLMWithQHead`) with the reference's vocabulary.
        reference: the model whose `generate` the processor is passed to.
        c: the scale `c` of the implicit Q (DPO's beta); finite.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module, c: float):
        for name, m in (("policy", policy), ("reference", reference)):
            if not isinstance(m, nn.Module) or not hasattr(m, "get_output_embeddings"):
                raise TypeError(f"`{name}` must be a causal LM, got {type(m).__name__}.")
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise ValueError(f"`c` must be a finite number, got {c!r}.")
        v_pol, v_ref = (
            policy.get_output_embeddings().weight.shape[0],
            reference.get_output_embeddings().weight.shape[0],
        )
        if v_pol != v_ref:
            raise ValueError(f"`policy` has {v_pol} output tokens but `reference` has {v_ref}: they must share one.")
        self.policy = policy.pretrained_model if isinstance(policy, AutoModelForCausalLMWithQHead) else policy
        self.reference = reference
        self.c = float(c)
        self._capture = _LMHeadCapture(reference.get_output_embeddings(), keep_output=True)
        self._inputs_handle = None
        self._inputs: dict[str, torch.Tensor | None] = {}
        self._cache = None
        self._policy_kwargs = {"logits_to_keep": 1} if _accepts(self.policy, "logits_to_keep") else {}
        self._policy_positions = _accepts(self.policy, "position_ids")

    def attach(self) -> None:
        self._capture.attach()
        if self._inputs_handle is None:
            self._inputs_handle = _transformers_model(self.reference).register_forward_pre_hook(
                self._keep_inputs, with_kwargs=True
            )

    def detach(self) -> None:
        self._capture.detach()
        if self._inputs_handle is not None:
            self._inputs_handle.remove()
            self._inputs_handle = None
        self._cache = None

    def _keep_inputs(self, module, args, kwargs):
        if not self._capture.paused:
            self._inputs = {"attention_mask": kwargs.get("attention_mask"), "position_ids": kwargs.get("position_ids")}

    @torch.no_grad()
    def __call__(self, input_ids, parent, token_ids=None):
        _, ref_logits = self._capture.take(input_ids.shape[0], parent is None, "ImplicitQ")
        mask, positions = self._inputs.get("attention_mask"), self._inputs.get("position_ids")
        if mask is not None and mask.dim() != 2:
            raise RuntimeError(
                "ImplicitQ needs the 2D attention mask `generate` passes; got a 4D one (static cache?)."
            )
        device = next(self.policy.parameters()).device
        if parent is None or self._cache is None:  # a new generation: the policy reads the whole prompt
            new_tokens, self._cache = input_ids, None
        else:
            if not torch.equal(parent, torch.arange(parent.numel(), device=parent.device)):
                self._cache.reorder_cache(parent.to(device))
            new_tokens = input_ids[:, -1:]
        kwargs = dict(self._policy_kwargs)
        if mask is not None:
            kwargs["attention_mask"] = mask.to(device)
        if self._policy_positions and (positions is None or positions.shape[-1] != new_tokens.shape[1]):
            # as `generate` makes them: count real tokens only, so left padding does not shift positions
            positions = None if mask is None else (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        if positions is not None and self._policy_positions:
            kwargs["position_ids"] = positions[:, -new_tokens.shape[1] :].to(device)
        self._capture.paused = True  # should the policy share a module with the reference, its forward is not theirs
        try:
            out = self.policy(
                input_ids=new_tokens.to(device),
                **cache_kwargs(self._cache),
                use_cache=True,
                return_dict=True,
                **kwargs,
            )
        finally:
            self._capture.paused = False
        self._cache = output_cache(out)
        policy_logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1).to(ref_logits.device)
        q = self.c * (policy_logprobs - torch.log_softmax(ref_logits.float(), dim=-1))
        return q if token_ids is None else q.gather(-1, token_ids.to(q.device))


# ---- the logits processor -----------------------------------------------------------------------------------------------


class QTiltLogitsProcessor(LogitsProcessor):
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
        record_kl: record the exact KL (default); `False` saves one log-softmax per step.
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
        self.beta = _check_beta(beta)
        self.top_k = _check_top_k(top_k)
        self.record_kl = bool(record_kl)
        self.source = model if isinstance(model, QSource) else QHeadSource(model)
        if eos_token_id is None:
            eos_token_id = _default_stop_ids(model)
        self._stop_ids = torch.tensor(
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.long
        )
        self._prev_ids: torch.Tensor | None = None
        self._kl: torch.Tensor | None = None
        self._finished: torch.Tensor | None = None
        self._finalizer = None
        if math.isfinite(self.beta):
            self.source.attach()
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

    def reset(self) -> None:
        """Forget the running record: the next call starts a new generation (new KL record, new caches)."""
        self._prev_ids = self._kl = self._finished = None

    @property
    def kl(self) -> torch.Tensor | None:
        """`[rows]` summed exact `KL(pi' || pi)` (nats) of the last generation, or None before any step."""
        return None if self._kl is None else self._kl.clone()

    # ---- per step ---------------------------------------------------------------------------------------------------

    def _track(self, input_ids: torch.LongTensor) -> torch.LongTensor | None:
        """Match this step's rows to the last step's (beam search reorders them); None means a new generation."""
        prev, parent = self._prev_ids, None
        if prev is not None and input_ids.shape[1] == prev.shape[1] + 1:
            prefix = input_ids[:, :-1]
            if prefix.shape == prev.shape and torch.equal(prefix, prev):
                parent = torch.arange(input_ids.shape[0], device=input_ids.device)
            else:
                same = (prefix[:, None, :] == prev[None, :, :]).all(-1)  # [rows, previous rows]
                if bool(same.any(-1).all()):
                    parent = same.int().argmax(-1)
        rows = input_ids.shape[0]
        if parent is None:
            self._kl = torch.zeros(rows, dtype=torch.float32, device=input_ids.device)
            self._finished = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        else:
            stop = self._stop_ids.to(input_ids.device)
            self._kl = self._kl[parent]
            self._finished = self._finished[parent] | torch.isin(input_ids[:, -1], stop)
        self._prev_ids = input_ids.clone()
        return parent

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        parent = self._track(input_ids)
        if math.isinf(self.beta) and self.top_k is None:
            return scores  # the base model, bit for bit: not even a renormalisation
        indices = None
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            indices = scores.topk(self.top_k, dim=-1).indices
        if math.isinf(self.beta):
            q = torch.zeros(indices.shape if indices is not None else scores.shape, device=scores.device)
        else:
            q = self.source(input_ids, parent, indices).to(scores.device)
            if q.shape[-1] != (indices.shape[-1] if indices is not None else scores.shape[-1]):
                raise ValueError(
                    f"The Q values have {q.shape[-1]} tokens but the scores have {scores.shape[-1]}: the Q head "
                    "and the generating model must share one vocabulary."
                )
        tilted, step = _tilt(scores, q, self.beta, indices, with_kl=self.record_kl)
        if step is not None:
            self._kl = self._kl + torch.where(self._finished, torch.zeros_like(step), step)
        return tilted


def _default_stop_ids(model) -> list[int]:
    # a Q-head model, the model of a QHeadSource, or the reference of an ImplicitQ: the one that generates
    for candidate in (getattr(model, "reference", None), getattr(model, "model", None), model):
        if not isinstance(candidate, nn.Module):
            continue
        config = getattr(_transformers_model(candidate), "generation_config", None)
        if config is not None:
            ids = []
            for value in (config.eos_token_id, config.pad_token_id):
                if value is not None:
                    ids.extend([value] if isinstance(value, int) else list(value))
            return sorted(set(ids))
    return []


# ---- folding the tilt into the LM head ----------------------------------------------------------------------------------


@torch.no_grad()
def fold_tilt(model: AutoModelForCausalLMWithQHead, beta: float, *, verify: bool = True) -> PreTrainedModel:
    """An ordinary causal LM whose logits are `z + Q / beta`: the tilt folded into its LM head.

    The LM head becomes `W_lm + W_q / beta` (untied from the input embeddings where they were tied, LoRA adapters
    merged first). The user's model is not changed: the backbone is deep-copied. The result saves with
    `save_pretrained` and loads with `AutoModelForCausalLM.from_pretrained` without trl_qhead, and any generator
    (transformers, TRL rollouts, vLLM) samples from the tilted policy at the base model's speed. Its greedy output
    equals `QTiltLogitsProcessor(model, beta)`'s.

    The Q head's bias `b_q / beta` needs a place the architecture loads:
    - zero bias (e.g. an untrained one): nothing to add;
    - an LM head with a bias parameter: added to it;
    - a final `nn.LayerNorm` with a bias right before the LM head (GPT-2, GPT-NeoX, OPT, Phi, ...): the normalised
      vector sums to zero over the hidden units, so `sum_j (h_j - ln_bias_j) / ln_weight_j = 0` for every input and
      the bias is carried exactly by a rank-one change of the LM head together with that LayerNorm's bias (the last
      hidden state, which only the LM head reads, then differs from the original);
    - otherwise (e.g. Llama's RMSNorm and bias-free head) a nonzero bias cannot be folded exactly: `ValueError`
      (use the processor, or a Q head trained with a zero bias).

    Args:
        model: the `AutoModelForCausalLMWithQHead` to fold (PEFT-wrapped or not).
        beta: tilt temperature, `> 0`; `inf` returns an untied copy of the base model.
        verify: compare the folded logits with `z + Q / beta` on a probe input and raise if they differ (catches
            models that post-process their logits, e.g. Gemma 2's soft-capping, where folding is not exact).

    Returns:
        The folded `PreTrainedModel`, in eval mode.
    """
    beta = _check_beta(beta)
    if not isinstance(model, AutoModelForCausalLMWithQHead):
        raise TypeError(f"`model` must be an AutoModelForCausalLMWithQHead, got {type(model).__name__}.")
    folded = copy.deepcopy(model.pretrained_model)
    if _is_peft_model(folded):
        folded = folded.merge_and_unload()
    folded.eval()
    head = folded.get_output_embeddings()
    scale = 0.0 if math.isinf(beta) else 1.0 / beta
    weight = head.weight.double() + model.q_head.weight.double().to(head.weight.device) * scale
    bias = model.q_head.bias.double().to(head.weight.device) * scale
    dtype = head.weight.dtype
    if not (torch.isfinite(weight.to(dtype)).all() and torch.isfinite(bias.to(dtype)).all()):
        raise ValueError(
            f"`beta`={beta} is too small to fold: W_q / beta overflows the LM head's {dtype}. Use "
            "QTiltLogitsProcessor (which handles any beta > 0), or a larger beta."
        )
    # Untie: the tilted head must not change the input embeddings, and saving must keep it as its own tensor.
    for config in {id(c): c for c in (folded.config, folded.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    head.weight = nn.Parameter(weight.to(head.weight.dtype), requires_grad=head.weight.requires_grad)
    if torch.count_nonzero(bias) and getattr(head, "bias", None) is not None:
        head.bias.add_(bias.to(head.bias.dtype))
    elif torch.count_nonzero(bias):
        head.weight.copy_(_fold_bias_into_layernorm(folded, weight, bias).to(head.weight.dtype))
    if verify:
        _verify_fold(model, folded, beta)
    return folded


def _final_layernorm(model: PreTrainedModel) -> nn.LayerNorm | None:
    """The `nn.LayerNorm` (with a bias) whose output is exactly what the LM head reads, found on a probe input."""
    head = model.get_output_embeddings()
    outputs, seen = {}, {}

    def keep(name):
        def hook(module, args, output):
            outputs[name] = output

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    handles.append(head.register_forward_hook(lambda m, args, out: seen.setdefault("input", args[0])))
    try:
        with torch.no_grad():
            model(input_ids=_probe_ids(model))
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    for name in reversed(list(outputs)):
        out, hidden = outputs[name], seen.get("input")
        if (
            isinstance(out, torch.Tensor)
            and hidden is not None
            and out.shape == hidden.shape
            and torch.equal(out, hidden)
        ):
            norm = modules[name]
            return norm if norm.elementwise_affine and norm.bias is not None else None
    return None


def _fold_bias_into_layernorm(model: PreTrainedModel, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Carry `bias` with the LM head `weight` and the final LayerNorm: returns the new head weight (float64).

    With `h = g * n + b` (`n` the normalised vector, `sum_j n_j = 0`) and `u = 1 / g`: `u . h = u . b` for every input.
    Moving the norm's bias to `b* = b + t g` (so that `K = u . b*` is well away from 0) and setting
    `W* = W + v u^T` with `v = (bias + W (b - b*)) / K` gives `W* h* = W h + bias` exactly.
    """
    norm = _final_layernorm(model)
    if norm is None:
        raise ValueError(
            f"The Q head has a nonzero bias and {type(model).__name__} has neither a bias in its LM head nor a final "
            "LayerNorm with a bias to carry it, so the tilt cannot be folded exactly. Use QTiltLogitsProcessor, or "
            "train the Q head with a zero bias (`model.q_head.bias.requires_grad_(False)` after zero init)."
        )
    gain, shift = norm.weight.double().to(weight.device), norm.bias.double().to(weight.device)
    if not bool((gain.abs() > 1e-6 * gain.abs().max()).all()):
        raise ValueError("The final LayerNorm has (near-)zero gains, so it cannot carry the Q head's bias exactly.")
    inverse = 1.0 / gain
    k0 = float(inverse @ shift)
    t = 0.0 if abs(k0) >= 1.0 else (1.0 - k0) / gain.numel()
    new_shift = shift + t * gain
    k = float(inverse @ new_shift)
    v = (bias + weight @ (shift - new_shift)) / k
    norm.bias.copy_(new_shift.to(norm.bias.dtype))
    return weight + torch.outer(v, inverse)


def _probe_ids(model: nn.Module) -> torch.LongTensor:
    vocab = model.get_output_embeddings().weight.shape[0]
    device = model.get_output_embeddings().weight.device
    return (torch.arange(7, device=device)[None] * 7919 + 13) % vocab


def _verify_fold(model: AutoModelForCausalLMWithQHead, folded: PreTrainedModel, beta: float) -> None:
    probe = _probe_ids(folded)
    modes = [(m, m.training) for m in model.modules()]  # restored one by one: `train(flag)` would recurse
    model.eval()
    try:
        with torch.no_grad():
            out = model(probe.to(model.device), return_q=math.isfinite(beta))
            expected = out.logits.float()
            if math.isfinite(beta):
                expected = expected + out.q_values.to(expected.device) / beta
            got = folded(input_ids=probe).logits.float().to(expected.device)
    finally:
        for module, mode in modes:
            module.training = mode
    dtype = folded.get_output_embeddings().weight.dtype
    tolerance = (1e-4 if dtype in (torch.float32, torch.float64) else 5e-2) * (1.0 + expected.abs().max().item())
    error = (got - expected).abs().max().item()
    if not error <= tolerance:  # NaN (inf - inf) fails too
        raise RuntimeError(
            f"The folded model's logits differ from z + Q/beta by {error:.3g} (tolerance {tolerance:.3g}): this "
            "architecture post-processes its logits (soft-capping, scaling?), so the tilt cannot be folded into its "
            "LM head. Use QTiltLogitsProcessor."
        )


# ---- Q-probe reranking --------------------------------------------------------------------------------------------------


@dataclass
class RerankOutput:
    """Result of [`rerank`].

    Args:
        sequences: `[P, L]` the chosen sample of each prompt.
        indices: `[P]` row of each chosen sample in the `sequences` passed in.
        scores: `[P, k]` `Q(s, a)` of the final action of every sample, grouped by prompt.
    """

    sequences: torch.LongTensor
    indices: torch.LongTensor
    scores: torch.Tensor


@torch.no_grad()
def rerank(
    model: AutoModelForCausalLMWithQHead,
    sequences: torch.LongTensor,
    num_samples: int,
    *,
    attention_mask: torch.Tensor | None = None,
    prompt_length: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    beta: float | None = None,
    generator: torch.Generator | None = None,
) -> RerankOutput:
    """Q-probe-style best-of-k: score each complete sample by the learned Q of its final action, then pick one per prompt.

    The score of a sample `x_0 .. x_{n-1}` (padding removed) is `Q(s_{n-2}, a_{n-2}) = q_{n-2}[x_{n-1}]`: the value of
    emitting its last real token (EOS, if it finished). One forward pass over all samples; the Q head is gathered at
    one position per sample (no `|V|`-sized product).

    Args:
        model: the `AutoModelForCausalLMWithQHead` whose Q head scores.
        sequences: `[P * k, L]` samples, `k = num_samples` consecutive rows per prompt (the layout of
            `generate(..., num_return_sequences=k)`).
        num_samples: `k`.
        attention_mask: `[P * k, L]` marking the real tokens; or the prompt's `[P * k, prompt_length]` mask (left
            padding), in which case the completion ends at its first EOS. Default: leading `pad_token_id`s of the
            prompt are padding and the completion ends at its first EOS.
        prompt_length: length of the (padded) prompt part of `sequences`; needed unless a full mask is given.
        eos_token_id, pad_token_id: default to the model's generation config.
        beta: `None` picks the argmax; a positive number samples from `softmax(score / beta)` within each prompt.
        generator: for sampling (on the model's device).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    if sequences.dim() != 2 or sequences.shape[0] % num_samples:
        raise ValueError(
            f"`sequences` must be [prompts * num_samples, L]; got shape {tuple(sequences.shape)} for num_samples="
            f"{num_samples}."
        )
    if beta is not None:
        beta = _check_beta(beta, allow_inf=False)
    mask = _sample_mask(model, sequences, attention_mask, prompt_length, eos_token_id, pad_token_id)
    last = mask.shape[1] - 1 - mask.flip(-1).int().argmax(-1)  # index of the final real token
    if bool((mask.sum(-1) < 2).any()):
        raise ValueError("Every sample needs at least two real tokens (a state and an action) to be scored.")
    device = model.device
    kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    hidden = model(sequences.to(device), attention_mask=mask.to(device), **kwargs).hidden_states
    rows = torch.arange(sequences.shape[0], device=device)
    last = last.to(device)
    state = hidden[rows, last - 1]  # s_{n-2}
    action = sequences.to(device)[rows, last]  # a_{n-2} = x_{n-1}
    scores = gather_action_q(state[:, None, :], model.q_head, action[:, None])[:, 0].float()
    grouped = scores.view(-1, num_samples)
    if beta is None:
        choice = grouped.argmax(-1)
    else:
        # (score - max) / beta lies in [-inf, 0] (0 at the max): no inf - inf or 0 / 0, however small beta is.
        below = grouped - grouped.amax(-1, keepdim=True)
        logits = torch.where(below == 0, 0.0, below / beta)
        choice = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
    indices = torch.arange(grouped.shape[0], device=device) * num_samples + choice
    return RerankOutput(sequences=sequences[indices.to(sequences.device)], indices=indices, scores=grouped)


def _sample_mask(model, sequences, attention_mask, prompt_length, eos_token_id, pad_token_id) -> torch.Tensor:
    n, length = sequences.shape
    if attention_mask is not None and tuple(attention_mask.shape) == (n, length):
        return attention_mask.bool().to(sequences.device)
    config = getattr(_transformers_model(model), "generation_config", None)
    if eos_token_id is None and config is not None:
        eos_token_id = config.eos_token_id
    if pad_token_id is None and config is not None:
        pad_token_id = config.pad_token_id
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != n or attention_mask.shape[1] > length:
            raise ValueError(
                f"`attention_mask` must be [N, L] or the prompt's [N, prompt_length]; got {tuple(attention_mask.shape)}"
                f" for sequences {tuple(sequences.shape)}."
            )
        if prompt_length is not None and prompt_length != attention_mask.shape[1]:
            raise ValueError(f"`prompt_length` ({prompt_length}) differs from the prompt mask's length.")
        prompt_length = attention_mask.shape[1]
        prompt_mask = attention_mask.bool().to(sequences.device)
    else:
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or not 0 < prompt_length < length:
            raise ValueError(
                f"`prompt_length` must be an int in [1, {length - 1}] when no full `attention_mask` is given, got "
                f"{prompt_length!r}."
            )
        prompt = sequences[:, :prompt_length]
        if pad_token_id is None:
            prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
        else:  # left padding: the leading run of pad tokens
            prompt_mask = (prompt != pad_token_id).int().cummax(-1).values.bool()
    completion = sequences[:, prompt_length:]
    if eos_token_id is None:
        completion_mask = torch.ones_like(completion, dtype=torch.bool)
    else:
        stop = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        is_eos = torch.isin(completion, stop.to(sequences.device)).int()
        # real up to and including the first EOS
        completion_mask = (is_eos.cumsum(-1) - is_eos) == 0
    return torch.cat([prompt_mask, completion_mask], dim=-1)
