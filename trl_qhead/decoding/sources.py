"""Where the tilt's `Q(s, .)` comes from: `QSource` and its two implementations.

- `QHeadSource`: the model's own Q head, read off the hidden state its LM head saw in the same forward pass (a forward
  hook, `LMHeadCapture`), so the tilt adds no forward pass.
- `ImplicitQ`: `Q = c (log pi_policy - log pi_ref)` from a (policy, reference) pair ("DPO treats LLMs as Q-functions"),
  for the processor on the reference model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..backbone import forward_parameters, plain_lm_head, position_ids
from ..compat import cache_kwargs, output_cache
from ..heads import QContext
from ..modeling import AutoModelForCausalLMWithQHead, transformers_model


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


class LMHeadCapture:
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

    Costs one `H x |V|` product per token (like the LM head itself), or `k x H` with `token_ids` (top-k tilting); a
    tied head adds an `H x H` product (`U h`) to either. Everything goes through the head's interface (`QHead`):
    its decode state is updated once per step (`update_decode_state`, with the rows' parents under beam search),
    then its features of the captured hidden state are read (`q_from_features` or `gather`).

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
        self._capture = LMHeadCapture(model.get_output_embeddings())
        self._head_tilt_beta: float | None = None
        self._head_tilt_handles: list = []
        self._armed: tuple[int, int] | None = None  # (rows, cache length) the next step's forward must have
        self._tilt_next = False  # the backbone's forward is the armed step: tilt its LM head
        self._tilted = False  # the last LM head forward was tilted

    def attach(self) -> None:
        self._capture.attach()

    def detach(self) -> None:
        self._capture.detach()
        self.model.q_head.reset_decode_state()
        for handle in self._head_tilt_handles:
            handle.remove()
        self._head_tilt_handles = []
        self._armed, self._tilt_next, self._tilted = None, False, False

    # ---- the tilt inside the LM head (heads with an `lm_head_input`, e.g. tied; no KL record) -----------------------

    def supports_head_tilt(self) -> bool:
        """A head with `Q = W_lm g + b` (`QHead.lm_head_input`, e.g. the tied head's `g = U h`) on an LM head whose
        logits are exactly `W_lm h + b_lm`: `z + Q / beta` is then the LM head applied to `h + g / beta`, plus
        `b / beta` (for the tied head an H x H product per token instead of `H x |V|`)."""
        probe = torch.zeros(1, self.model.q_head.in_features, device=self.model.device)
        with torch.no_grad():  # a head without the form answers None
            has_form = self.model.q_head.lm_head_input(probe) is not None
        return has_form and plain_lm_head(transformers_model(self.model)) is not None

    def enable_head_tilt(self, beta: float) -> None:
        """Tilt inside the LM head at the generation steps this source arms (`arm`), and only those: a pre-hook on
        the backbone checks that its forward is the next step of the same generation (rows, one new token, a KV cache
        of the expected length) and the LM head's hooks then read `h + U h / beta` and add `b / beta`."""
        if self._head_tilt_handles:
            return
        self._head_tilt_beta = float(beta)
        head = self.model.get_output_embeddings()
        backbone = transformers_model(self.model)
        self._head_tilt_handles = [
            backbone.register_forward_pre_hook(self._check_step, with_kwargs=True),
            head.register_forward_pre_hook(self._tilt_input),
            head.register_forward_hook(self._tilt_output),
        ]

    def arm(self, rows: int, length: int) -> None:
        """The next forward with `rows` rows, one token and a cache of `length` tokens is this generation's next step."""
        self._armed = (rows, length)

    def _check_step(self, module, args, kwargs):
        armed, self._armed, self._tilt_next = self._armed, None, False
        if armed is None or torch.is_grad_enabled():
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if input_ids is None or cache is None or not hasattr(cache, "get_seq_length"):
            return
        self._tilt_next = tuple(input_ids.shape) == (armed[0], 1) and cache.get_seq_length() == armed[1]

    def _tilt_input(self, module, args):
        if not self._tilt_next:
            self._tilted = False
            return None
        hidden = args[0]
        tilted = hidden + (self.model.q_head.lm_head_input(hidden) / self._head_tilt_beta).to(hidden.dtype)
        return (tilted, *args[1:])

    def _tilt_output(self, module, args, output):
        if not self._tilt_next:
            return None
        self._tilt_next, self._tilted = False, True
        return output + (self.model.q_head.bias / self._head_tilt_beta).to(output.dtype)

    def take_head_tilt(self, input_ids: torch.LongTensor, parent) -> torch.Tensor | None:
        """`None` when the LM head already produced this step's tilted scores; else the full Q of this step (the first
        step of a generation, or any step the check above did not recognise)."""
        tilted, self._tilted = self._tilted, False
        if tilted:
            self._capture.take(input_ids.shape[0], parent is None, "QTiltLogitsProcessor")
            return None
        return self(input_ids, parent)

    def __call__(self, input_ids, parent, token_ids=None):
        hidden, _ = self._capture.take(input_ids.shape[0], parent is None, "QTiltLogitsProcessor")
        q_head = self.model.q_head
        context = QContext(input_ids=input_ids)
        q_head.update_decode_state(context, parent)
        features = q_head.features(hidden, context)  # (N, F)
        if token_ids is not None:
            return q_head.gather(features, token_ids.to(features.device))  # (N, k)
        return q_head.q_from_features(features)  # (N, |V|)


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
        self._capture = LMHeadCapture(reference.get_output_embeddings(), keep_output=True)
        self._inputs_handle = None
        self._inputs: dict[str, torch.Tensor | None] = {}
        self._cache = None
        self._policy_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(self.policy) else {}
        self._policy_positions = "position_ids" in forward_parameters(self.policy)

    def attach(self) -> None:
        self._capture.attach()
        if self._inputs_handle is None:
            self._inputs_handle = transformers_model(self.reference).register_forward_pre_hook(
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
            positions = None if mask is None else position_ids(mask)
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
