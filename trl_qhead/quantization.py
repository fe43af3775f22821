"""bitsandbytes 4-bit / 8-bit loading for `AutoModelForCausalLMWithQHead` (QLoRA).

The Q head is our own fp32 `nn.Linear` outside the backbone, so quantization never touches it. What needs care:

- the LM head (and the input embedding it may be tied to) must stay unquantised: the Q head reads the same final hidden
  state, and the tilt `logits + Q / beta` adds Q values to exact logits. transformers skips the output embedding by
  default, but forgets it as soon as the user sets `llm_int8_skip_modules`; `prepare_quantization_config` puts it back.
- bitsandbytes is an optional extra: a clear `ImportError` up front beats a failure deep inside transformers.
- bitsandbytes on CPU: `Linear4bit.forward` repacks its weights into a CPU inference layout the first time it runs
  without grad in eval mode on a CPU with AVX512-BF16, and `matmul_4bit` cannot back-propagate through that layout, so
  training after an inference pass (train -> generate -> train) fails. `disable_cpu_inference_repacking` turns the
  repacking off.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from . import bnb_notice

QUANT_INSTALL_HINT = "pip install 'trl-qhead[quant]'  (or: pip install bitsandbytes)"


def is_kbit_config(quantization_config) -> bool:
    """True for a bitsandbytes config (object or dict) that loads in 4 or 8 bits."""
    if quantization_config is None:
        return False
    if isinstance(quantization_config, dict):
        return bool(quantization_config.get("load_in_4bit") or quantization_config.get("load_in_8bit"))
    return bool(
        getattr(quantization_config, "load_in_4bit", False) or getattr(quantization_config, "load_in_8bit", False)
    )


def require_bitsandbytes() -> None:
    """Raise an `ImportError` that says how to install bitsandbytes when it cannot be imported."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"Loading in 4 or 8 bits (`load_in_4bit` / `load_in_8bit`) needs bitsandbytes, which is not installed: "
            f"{QUANT_INSTALL_HINT}."
        ) from error


def is_kbit_model(model: nn.Module) -> bool:
    """True when `model` (a transformers model, possibly inside a PEFT wrapper) was loaded in 4 or 8 bits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def output_embedding_names(pretrained_model_name_or_path: str | os.PathLike, **config_kwargs) -> list[str]:
    """Module names transformers keeps unquantised by default: the output embedding and the weights tied to it.

    Builds the model on the meta device from its config, so nothing is loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return sorted(get_keys_to_not_convert(skeleton))


def prepare_quantization_config(quantization_config, pretrained_model_name_or_path, **config_kwargs):
    """Check bitsandbytes and keep the LM head (and what is tied to it) out of quantization.

    Not TRL's `get_quantization_config`, which builds a `BitsAndBytesConfig` from `ModelConfig`'s flags (the recipe,
    `recipes/qhead_lora.py`, uses it): this completes the config a caller passes, whatever built it. TRL 1.16 has no
    `get_kbit_device_map`; the recipe places each process's 4-bit weights on its own GPU with accelerate's
    `PartialState().local_process_index`, as that function used to.

    Args:
        quantization_config: a `BitsAndBytesConfig` or its dict; other configs are returned unchanged.
        pretrained_model_name_or_path: the model about to be loaded (to find its LM head's module name).
        config_kwargs: passed to `AutoConfig.from_pretrained` (`revision`, `trust_remote_code`, ...).

    Returns:
        The config to pass to `from_pretrained`: a copy when `llm_int8_skip_modules` had to be completed.
    """
    if not is_kbit_config(quantization_config):
        return quantization_config
    require_bitsandbytes()
    bnb_notice.release()  # bitsandbytes' CPU kernel notice, held back at import, is about what is asked for now
    from transformers import BitsAndBytesConfig

    if isinstance(quantization_config, dict):
        quantization_config = BitsAndBytesConfig.from_dict(quantization_config)
    skip = quantization_config.llm_int8_skip_modules
    if skip is None:
        return quantization_config  # transformers' default skips the output embedding and its tied weights
    keep = output_embedding_names(pretrained_model_name_or_path, **config_kwargs)
    missing = [name for name in keep if name not in skip]
    if not missing:
        return quantization_config
    quantization_config = copy.deepcopy(quantization_config)
    quantization_config.llm_int8_skip_modules = list(skip) + missing
    return quantization_config


def disable_cpu_inference_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes' `Linear4bit` layers on CPU from switching to their inference-only weight layout.

    See the module docstring: without this, a no-grad eval pass (generation) repacks the weights and the next training
    step fails in `matmul_4bit`. Layers already repacked are converted back. Returns the number of layers touched.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and module.weight.device.type == "cpu":
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state
                )
            count += 1
    return count
