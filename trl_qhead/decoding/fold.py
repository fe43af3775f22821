"""`fold_tilt`: the tilt folded into the LM head, `W_lm + W_q / beta` with `(W_q, b_q)` the Q head's
`hidden_linear_form()` (tied head: `W_lm U`, so `W_lm (I + U / beta)`), an ordinary causal LM (LayerNorm surgery
carries a nonzero Q-head bias where the LM head has none)."""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn
from transformers import PreTrainedModel

from ..backbone import is_peft_model
from ..modeling import AutoModelForCausalLMWithQHead
from .tilt import check_beta


@torch.no_grad()
def fold_tilt(model: AutoModelForCausalLMWithQHead, beta: float, *, verify: bool = True) -> PreTrainedModel:
    """An ordinary causal LM whose logits are `z + Q / beta`: the tilt folded into its LM head.

    The LM head becomes `W_lm + W_q / beta` (for a tied Q head `W_lm (I + U / beta)`, the same thing; untied from the input embeddings where they were tied, LoRA adapters
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
    beta = check_beta(beta)
    if not isinstance(model, AutoModelForCausalLMWithQHead):
        raise TypeError(f"`model` must be an AutoModelForCausalLMWithQHead, got {type(model).__name__}.")
    form = model.q_head.hidden_linear_form()  # Q = W h + b in the policy's own hidden state, float64
    if form is None:
        raise ValueError(
            f"The q_head_type={model.q_head_type!r} head is not a linear map of the policy's hidden state (it reads "
            "more than h), so its tilt cannot be folded into the LM head. Use QTiltLogitsProcessor."
        )
    folded = copy.deepcopy(model.pretrained_model)
    if is_peft_model(folded):
        folded = folded.merge_and_unload()
    folded.eval()
    head = folded.get_output_embeddings()
    scale = 0.0 if math.isinf(beta) else 1.0 / beta
    weight = head.weight.double() + form.weight.to(head.weight.device) * scale
    bias = form.bias.to(head.weight.device) * scale
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
    _warn_engines_that_tie(folded)
    return folded


# Architectures whose vLLM implementation never loads `lm_head.weight` (vLLM's `GPT2LMHeadModel.load_weights` skips it,
# assuming the head is the input embeddings): a folded checkpoint loses its tilt there.
VLLM_TIED_HEAD_MODEL_TYPES = ("gpt2",)


def _warn_engines_that_tie(folded: PreTrainedModel) -> None:
    model_type = getattr(folded.config, "model_type", None)
    if model_type in VLLM_TIED_HEAD_MODEL_TYPES:
        warnings.warn(
            f"The folded {model_type} model is saved untied (`tie_word_embeddings=False`, its own `lm_head.weight`), "
            f"which transformers loads; vLLM's {model_type} implementation skips `lm_head.weight` when it loads "
            "weights (it assumes the head is the input embeddings), so under vLLM the tilt is lost: the untied head "
            "is never loaded. Serve it with transformers, or use QTiltLogitsProcessor.",
            UserWarning,
            stacklevel=4,  # the caller of fold_tilt (under its torch.no_grad wrapper)
        )


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
