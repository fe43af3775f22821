"""Which token ids end a generation: the one home for reading them off a model's generation config and tokenizer."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .modeling import transformers_model


def token_id_list(ids: int | Iterable[int] | None) -> list[int]:
    """`None`, one id or several ids, as a list."""
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def generation_config(model: nn.Module):
    """The `GenerationConfig` of the transformers model that generates (under a Q-head wrapper and PEFT), or `None`."""
    return getattr(transformers_model(model), "generation_config", None)


def eos_token_ids(model: nn.Module, tokenizer=None) -> set[int]:
    """The ids that end a completion: the generation config's `eos_token_id`(s) and the tokenizer's EOS token."""
    ids = set(token_id_list(getattr(generation_config(model), "eos_token_id", None)))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def stop_token_ids(model: nn.Module) -> list[int] | None:
    """The generation config's EOS and pad ids, sorted: after any of them a row of `generate` is finished (it pads
    finished rows). `None` when the model has no generation config."""
    config = generation_config(model)
    if config is None:
        return None
    return sorted(set(token_id_list(config.eos_token_id) + token_id_list(config.pad_token_id)))
