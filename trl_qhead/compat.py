"""The one place that bridges transformers releases.

transformers 5.24 renamed `past_key_values` to `cache`, both in every `ModelOutput` and as the keyword of every model's
`forward` (the old keyword still works there, with a deprecation warning, until 5.40). The rest of the package reads and
passes KV caches only through the two functions below, so it runs unchanged on the releases before and after.
"""

from __future__ import annotations

from transformers.modeling_outputs import CausalLMOutputWithPast

# The name under which the installed transformers keeps a model's KV cache.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(outputs) -> object | None:
    """The KV cache a model's forward returned, or `None` when it returned none."""
    return getattr(outputs, CACHE_NAME, None)


def cache_kwargs(cache: object | None) -> dict:
    """The keyword arguments that hand `cache` to a model's forward: `{"cache": cache}` or `{"past_key_values": cache}`."""
    return {CACHE_NAME: cache}
