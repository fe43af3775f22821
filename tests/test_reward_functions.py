"""`trl_qhead.reward_functions`: TRL reward functions (sync, async, built-in), reward models, weights and bad outputs."""

import asyncio
import copy
import math

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification
from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment, think_format_reward

from tests.test_data_formats import CHAT_TEMPLATE, COMPLETION, PROMPT
from tests.test_rewards import completions_of
from trl_qhead import RewardFunctions
from trl_qhead.rewards import (
    combine_sequence_rewards,
)


def test_combine_sequence_rewards_leaves_none_out_like_trl():
    per_source = torch.tensor([[1.0, 2.0, math.nan], [math.nan, math.nan, math.nan], [math.nan, -1.0, 4.0]])
    weights = torch.tensor([0.5, 2.0, -1.0])
    expected = []
    for row in per_source.tolist():  # the obvious reading: sum of w_i * R_i over the sources that apply
        applied = [w * r for w, r in zip(weights.tolist(), row, strict=True) if not math.isnan(r)]
        expected.append(sum(applied) if applied else math.nan)
    assert torch.allclose(combine_sequence_rewards(per_source, weights), torch.tensor(expected), equal_nan=True)


def test_trl_builtin_reward_functions_work_unchanged():
    texts = ["<think>a</think>b", "no think", "<think>x</think>y y y y"]
    ids = [[1, 2, 3], [4, 4, 4, 4, 4], list(range(9))]
    funcs = [think_format_reward, get_soft_overlong_punishment(6, 2), get_repetition_penalty_reward(2, -1.0)]
    scored = RewardFunctions(funcs).score(prompts=[PROMPT] * 3, completions=completions_of(texts), completion_ids=ids)
    assert scored.sequence[:, 0].tolist() == think_format_reward(completions_of(texts))
    assert scored.sequence[:, 1].tolist() == get_soft_overlong_punishment(6, 2)(ids)
    assert scored.sequence[:, 2].tolist() == get_repetition_penalty_reward(2, -1.0)(ids)
    assert RewardFunctions(funcs).names == [
        "think_format_reward",
        "soft_overlong_punishment_reward",
        "repetition_penalty_reward",
    ]


def test_sync_and_async_functions_get_prompts_completions_ids_and_columns():
    calls = {}

    def sync_reward(prompts, completions, completion_ids, solution, **kwargs):
        calls["sync"] = (prompts, completions, completion_ids, solution)
        return [1.0 if c == s else None for c, s in zip(completions, solution, strict=True)]

    async def async_reward(completions, **kwargs):
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]

    class AsyncClass:
        async def __call__(self, completion_ids, **kwargs):
            return [[0.5] * len(ids) for ids in completion_ids]

    funcs = RewardFunctions([sync_reward, async_reward, AsyncClass()], reward_weights=[1, 2, 3])
    scored = funcs.score(["p", "q"], ["4", "five"], [[7], [8, 9]], solution=["4", "5"])
    assert calls["sync"] == (["p", "q"], ["4", "five"], [[7], [8, 9]], ["4", "5"])
    assert torch.allclose(
        scored.sequence, torch.tensor([[1.0, 1.0, math.nan], [math.nan, 4.0, math.nan]]), equal_nan=True
    )
    assert [v.tolist() for v in scored.per_token[2]] == [[0.5], [0.5, 0.5]]
    assert funcs.names == ["sync_reward", "async_reward", "AsyncClass"]


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ([[1.0, 2.0], [1.0]], "returned 2 per-token rewards for sample 0, whose completion has 1 tokens"),
        ([[1.0], [math.nan, 0.0]], "'bad' returned NaN or inf per-token rewards for sample 1"),
        ([[1.0], [0.0, math.inf]], "'bad' returned NaN or inf per-token rewards for sample 1"),
        ([1.0, math.nan], "'bad' returned nan for sample 1"),
        ([1.0], "'bad' returned 1 rewards, but 2 were expected"),
        ([1.0, [0.0, 1.0]], "'bad' returned floats for some samples and lists for others"),
        ([1.0, "x"], "'bad' returned str for sample 1"),
    ],
)
def test_bad_reward_outputs_name_the_function_and_sample(output, message):
    def bad(**kwargs):
        return output

    with pytest.raises(ValueError, match=message):
        RewardFunctions(bad).score(["a", "b"], ["x", "y"], [[1], [2, 3]])


def test_reward_weights_must_match_the_functions():
    with pytest.raises(ValueError, match="`reward_weights` has 1 weights for 2 reward functions"):
        RewardFunctions([think_format_reward, think_format_reward], reward_weights=[1.0])
    assert RewardFunctions([think_format_reward, think_format_reward]).names == [
        "think_format_reward",
        "think_format_reward_1",
    ]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, gpt2_tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, num_labels=1)
    model = GPT2ForSequenceClassification(config)
    path = tmp_path_factory.mktemp("reward_model") / "tiny-rm"
    model.save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return str(path)


def _reference_scores(model, tokenizer, texts):
    """One text at a time, no padding: the obvious way to read a sequence classifier's score."""
    with torch.no_grad():
        return [
            model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
            for text in texts
        ]


def test_reward_model_by_object_and_by_path_scores_with_its_own_tokenizer(reward_model_dir, gpt2_tokenizer):
    from transformers import AutoModelForSequenceClassification

    prompts, completions = ["The sky is", "Once upon"], [" blue and wide", " a time"]
    by_path = RewardFunctions(reward_model_dir)
    assert by_path.names == ["tiny-rm"]
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=1)
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    by_object = RewardFunctions(model, reward_processing_classes=tokenizer)
    expected = _reference_scores(model, tokenizer, [p + c for p, c in zip(prompts, completions, strict=True)])
    for funcs in (by_path, by_object):
        scores = funcs.score(prompts, completions, [[0], [0]]).sequence[:, 0]
        assert scores.tolist() == pytest.approx(expected, abs=1e-5)


def test_reward_model_on_conversations_uses_its_chat_template(reward_model_dir, gpt2_tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=1)
    with pytest.raises(ValueError, match="chat template"):
        RewardFunctions(model, reward_processing_classes=gpt2_tokenizer).score([PROMPT], [COMPLETION], [[0]])
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    score = RewardFunctions(model, reward_processing_classes=tokenizer).score([PROMPT], [COMPLETION], [[0]])
    text = tokenizer.apply_chat_template(PROMPT + COMPLETION, tokenize=False)
    assert score.sequence[0, 0].item() == pytest.approx(_reference_scores(model, tokenizer, [text])[0], abs=1e-5)


def test_tokenizer_of_a_reward_model_without_a_name_must_be_given():
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, num_labels=1, vocab_size=64))
    with pytest.raises(ValueError, match="reward_processing_classes"):
        RewardFunctions(model)


def test_auto_tokenizer_for_reward_model_path(reward_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    funcs = RewardFunctions(reward_model_dir)
    assert funcs.processing_classes[0].get_vocab() == tokenizer.get_vocab()
    assert funcs.funcs[0].config.pad_token_id == tokenizer.eos_token_id  # pads with EOS, as TRL sets it
