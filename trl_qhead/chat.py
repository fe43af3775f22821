"""Conversational data (lists of `{"role", "content"}` messages) versus plain text, in one place."""

from __future__ import annotations

from typing import Any


def is_messages(value: Any) -> bool:
    """Whether `value` is a conversation: a list of messages, each a dict with a `role`."""
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def completions_like(prompts: list, texts: list[str]) -> list:
    """Each decoded completion in its prompt's format, as TRL hands completions to reward functions: a one-message
    assistant conversation after a conversational prompt, the plain text otherwise."""
    return [
        [{"role": "assistant", "content": text}] if is_messages(prompt) else text
        for prompt, text in zip(prompts, texts, strict=True)
    ]
