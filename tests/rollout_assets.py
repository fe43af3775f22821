"""The model, prompts and settings shared by the 1- and N-process `generate_and_score` tests."""

from __future__ import annotations

from datasets import Dataset
from transformers import AutoTokenizer

from recipes.offline_assets import gpt2_tokenizer_dir
from tests.conftest import make_tiny_gpt2
from trl_qhead import AutoModelForCausalLMWithQHead

# 5 prompts: 2 processes get 3 and 2 (an uneven split); prompts of different lengths (left padding differs by batch).
PROMPTS = Dataset.from_dict(
    {
        "prompt": ["The cat", "A dog ran under the big", "Then", "Slowly the red tree", "On the mat a small"],
        "topic": ["cat", "dog", "none", "tree", "mat"],
    }
)
ROLLOUT_KWARGS = dict(num_generations=3, max_new_tokens=6, batch_size=2, seed=1234, show_progress=False)


def make_model_and_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(seed=0), q_head_init="normal")
    return model.eval(), tokenizer


def rows_of(data: Dataset) -> list[dict]:
    return [dict(row) for row in data]
