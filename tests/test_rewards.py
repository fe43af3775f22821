"""Reward sources with TRL's interface: functions (sync, async, per-token), reward models (object or path, their own
tokenizer), TRL's built-in `trl.rewards`, weights and `None`, normalisation, scaling, clipping, reference log-probs,
and where each lands on the action grid."""

import asyncio
import copy
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification
from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment, think_format_reward
from trl.trainer.utils import nanstd

from tests.oracles import action_rewards
from tests.test_data_formats import CHAT_TEMPLATE, COMPLETION, PROMPT
from trl_qhead import QHeadConfig, RewardFunctions
from trl_qhead.data import DataCollatorForQHead, prepare_dataset
from trl_qhead.mdp import action_mask_from_labels, sequence_rewards_to_actions
from trl_qhead.rewards import (
    RewardComputer,
    RunningMoments,
    combine_sequence_rewards,
    scale_and_clip,
    scatter_completion_rewards,
)

# ---- pure functions -----------------------------------------------------------------------------------------------


def test_combine_sequence_rewards_leaves_none_out_like_trl():
    per_source = torch.tensor([[1.0, 2.0, math.nan], [math.nan, math.nan, math.nan], [math.nan, -1.0, 4.0]])
    weights = torch.tensor([0.5, 2.0, -1.0])
    expected = []
    for row in per_source.tolist():  # the obvious reading: sum of w_i * R_i over the sources that apply
        applied = [w * r for w, r in zip(weights.tolist(), row, strict=True) if not math.isnan(r)]
        expected.append(sum(applied) if applied else math.nan)
    assert torch.allclose(combine_sequence_rewards(per_source, weights), torch.tensor(expected), equal_nan=True)


def test_sequence_rewards_land_on_each_rows_last_action():
    gen = torch.Generator().manual_seed(0)
    action_mask = torch.rand(5, 9, generator=gen) > 0.4
    action_mask[3] = False  # a row without actions gets nothing
    rewards = torch.tensor([1.0, -2.0, math.nan, 4.0, 5.0])
    grid = sequence_rewards_to_actions(rewards, action_mask)
    for b in range(5):
        expected = torch.zeros(9)
        positions = [t for t in range(9) if action_mask[b, t]]
        if positions and not math.isnan(rewards[b].item()):
            expected[positions[-1]] = rewards[b]
        assert torch.equal(grid[b], expected)


@pytest.mark.parametrize("side", ["left", "right"])
def test_per_token_rewards_go_to_the_action_that_produces_the_token(side):
    rows = [[10, 11, 12, 13, 14], [20, 21, 22]]
    prompt_length = torch.tensor([2, 1])
    values = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 6.0])]  # one per completion token
    batch = DataCollatorForQHead(0, padding_side=side)([{"input_ids": r} for r in rows])
    token_grid = scatter_completion_rewards(values, batch["attention_mask"], prompt_length)
    for b, row in enumerate(rows):
        for k, value in enumerate(values[b].tolist()):
            token = row[prompt_length[b] + k]
            position = (batch["input_ids"][b] == token).nonzero().item()
            assert token_grid[b, position] == value
    assert token_grid.sum() == sum(v.sum() for v in values)


def test_running_moments_match_the_moments_of_everything_seen():
    gen = torch.Generator().manual_seed(0)
    moments, seen = RunningMoments(), []
    for size in (3, 1, 7, 2):
        batch = torch.randn(size, generator=gen) * 3 + 1
        batch[0] = math.nan  # a sample no source applied to
        moments.update(batch)
        seen.append(batch[1:])
    everything = torch.cat(seen).double()
    assert moments.count == everything.numel()
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std().item())


def test_scale_then_clip():
    rewards = torch.tensor([-3.0, 0.2, 1.0])
    assert torch.allclose(scale_and_clip(rewards, 2.0, 1.5), torch.tensor([-1.5, 0.4, 1.5]))
    assert torch.equal(scale_and_clip(rewards, 1.0, None), rewards)


# ---- reward functions and models ----------------------------------------------------------------------------------


def _completions(texts):
    return [[{"role": "assistant", "content": text}] for text in texts]


def test_trl_builtin_reward_functions_work_unchanged():
    texts = ["<think>a</think>b", "no think", "<think>x</think>y y y y"]
    ids = [[1, 2, 3], [4, 4, 4, 4, 4], list(range(9))]
    funcs = [think_format_reward, get_soft_overlong_punishment(6, 2), get_repetition_penalty_reward(2, -1.0)]
    scored = RewardFunctions(funcs).score(prompts=[PROMPT] * 3, completions=_completions(texts), completion_ids=ids)
    assert scored.sequence[:, 0].tolist() == think_format_reward(_completions(texts))
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


# ---- the per-batch pipeline ---------------------------------------------------------------------------------------


def _batch(tokenizer, dataset, **kwargs):
    rows = list(prepare_dataset(dataset, tokenizer, reward_columns=True, **kwargs))
    batch = DataCollatorForQHead(tokenizer.eos_token_id, padding_side="left")(rows)
    return batch, action_mask_from_labels(batch["labels"], batch["attention_mask"])


def test_conversational_batch_reaches_trl_functions_as_grpo_would(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    texts = ["<think>greet</think>hi", "hi there", "<think>a</think>b b b b b b"]
    dataset = Dataset.from_dict({"prompt": [PROMPT] * 3, "completion": _completions(texts)})
    batch, action_mask = _batch(tokenizer, dataset)
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, kwargs=kwargs)
        return [0.0] * len(prompts)

    funcs = [think_format_reward, get_repetition_penalty_reward(1, -1.0), spy]
    computer = RewardComputer(tokenizer, RewardFunctions(funcs))
    rewards, metrics = computer(batch, action_mask, trainer_state="state")
    assert seen["prompts"] == [PROMPT] * 3
    assert seen["completions"] == _completions(texts)  # decoded without EOS, as GRPO decodes
    eos = tokenizer.eos_token_id
    assert seen["completion_ids"] == [tokenizer(t)["input_ids"] + [eos] for t in texts]
    assert seen["kwargs"]["trainer_state"] == "state" and callable(seen["kwargs"]["log_metric"])
    think = think_format_reward(_completions(texts))
    repetition = get_repetition_penalty_reward(1, -1.0)(seen["completion_ids"])
    assert metrics["rewards/think_format_reward/mean"] == pytest.approx(sum(think) / 3)
    assert metrics["rewards/repetition_penalty_reward/mean"] == pytest.approx(sum(repetition) / 3)
    expected = sequence_rewards_to_actions(torch.tensor(think) + torch.tensor(repetition), action_mask)
    assert torch.allclose(rewards, expected)


def test_all_sources_combine_in_the_documented_order(gpt2_tokenizer):
    """data reward + weighted functions -> normalise -> scale -> clip on the last action; per-token rewards scaled
    and clipped action by action; reference log-probs weighted by lm_reward_coef and added last."""
    dataset = Dataset.from_dict(
        {"prompt": ["a b", "c", "d e f"], "completion": [" x", " y z", " w"], "reward": [1.0, None, -2.0]}
    )
    batch, action_mask = _batch(gpt2_tokenizer, dataset)

    def seq(completions, **kwargs):
        return [2.0, None, 0.5]

    def per_token(completion_ids, **kwargs):
        return [[0.25 * (k + 1) for k in range(len(ids))] for ids in completion_ids]

    lm = torch.randn(action_mask.shape)
    computer = RewardComputer(
        gpt2_tokenizer,
        RewardFunctions([seq, per_token], reward_weights=[3.0, 2.0]),
        lm_reward_coef=0.5,
        reward_scale=2.0,
        reward_clip=1.6,
        reward_normalization="batch",
    )
    rewards, metrics = computer(batch, action_mask, lm_logprobs=lm)

    sequence = torch.tensor([1.0 + 3.0 * 2.0, math.nan, -2.0 + 3.0 * 0.5])
    applied = sequence[~torch.isnan(sequence)]
    normalised = (sequence - applied.mean()) / (applied.std() + 1e-4)
    expected = sequence_rewards_to_actions((2.0 * normalised).clamp(-1.6, 1.6), action_mask)
    for b in range(3):
        completion_positions = batch["attention_mask"][b].nonzero().squeeze(-1)[batch["prompt_length"][b] :]
        for k, position in enumerate(completion_positions.tolist()):
            expected[b, position - 1] += min(2.0 * 2.0 * 0.25 * (k + 1), 1.6)  # produced by the action before it
    expected += 0.5 * lm * action_mask
    assert torch.allclose(rewards, expected, atol=1e-5)
    assert metrics["rewards/seq/mean"] == pytest.approx(1.25)
    assert metrics["rewards/data/mean"] == pytest.approx(-0.5)  # rows without a reward are left out
    assert metrics["rewards/lm/mean"] == pytest.approx((lm * action_mask).sum(1).mean().item(), abs=1e-5)
    assert metrics["rewards/per_token/std"] == pytest.approx(nanstd(torch.tensor([0.75, 1.5, 0.75])).item())
    assert set(metrics) >= {"reward", "reward_std"}


def test_action_rewards_places_the_data_rewards_as_the_computer_does(gpt2_tokenizer):
    dataset = Dataset.from_dict(
        {"input_ids": [[1, 2, 3, 4], [5, 6]], "rewards": [[0.0, 1.0, 2.0, 3.0], [0.0, 4.0]], "reward": [10.0, None]}
    )
    batch, action_mask = _batch(gpt2_tokenizer, dataset)
    expected, _ = RewardComputer(gpt2_tokenizer)(batch, action_mask)
    assert torch.equal(action_rewards(batch, action_mask), expected)
    assert torch.equal(action_rewards(batch), expected)  # every token is a target here
    assert expected.sum().item() == 20.0


def test_running_normalisation_updates_only_in_training(gpt2_tokenizer):
    dataset = Dataset.from_dict({"prompt": ["a", "b"], "completion": [" x", " y"], "reward": [1.0, 3.0]})
    batch, action_mask = _batch(gpt2_tokenizer, dataset)
    computer = RewardComputer(gpt2_tokenizer, reward_normalization="running")
    computer(batch, action_mask, training=True)
    computer(batch, action_mask, training=False)
    assert computer.moments.count == 2 and computer.moments.mean == 2.0
    rewards, _ = computer(batch, action_mask, training=True)
    last = sequence_rewards_to_actions(torch.tensor([1.0, 3.0]), action_mask) != 0
    assert rewards[last].tolist() == pytest.approx(
        [-1 / (computer.moments.std + 1e-4), 1 / (computer.moments.std + 1e-4)]
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"reward_weights": [1.0, "x"]}, "reward_weights"),
        ({"reward_weights": []}, "reward_weights"),
        ({"lm_reward_coef": math.nan, "use_lm_rewards": True}, "lm_reward_coef"),
        ({"lm_reward_coef": 0.5}, "lm_reward_coef"),
        ({"reward_scale": 0.0}, "reward_scale"),
        ({"reward_clip": -1.0}, "reward_clip"),
        ({"reward_normalization": "group"}, "reward_normalization"),
        ({"completion_only_loss": "yes"}, "completion_only_loss"),
    ],
)
def test_config_validates_reward_fields(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        QHeadConfig(output_dir=str(tmp_path), **kwargs)


def test_config_accepts_reward_fields(tmp_path):
    config = QHeadConfig(
        output_dir=str(tmp_path),
        reward_weights=[1, 0.5],
        use_lm_rewards=True,
        lm_reward_coef=0.1,
        reward_scale=2.0,
        reward_clip=5.0,
        reward_normalization="none",
    )
    assert config.reward_weights == [1.0, 0.5] and config.reward_normalization is None


def test_tokenizer_of_a_reward_model_without_a_name_must_be_given():
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, num_labels=1, vocab_size=64))
    with pytest.raises(ValueError, match="reward_processing_classes"):
        RewardFunctions(model)


def test_auto_tokenizer_for_reward_model_path(reward_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    funcs = RewardFunctions(reward_model_dir)
    assert funcs.processing_classes[0].get_vocab() == tokenizer.get_vocab()
    assert funcs.funcs[0].config.pad_token_id == tokenizer.eos_token_id  # pads with EOS, as TRL sets it
