"""Reward sources with TRL's interface: functions (sync, async, per-token), reward models (object or path, their own
tokenizer), TRL's built-in `trl.rewards`, weights and `None`, normalisation, scaling, clipping, reference log-probs,
and where each lands on the action grid."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from trl.rewards import get_repetition_penalty_reward, think_format_reward
from trl.trainer.utils import nanstd

from tests.oracles import action_rewards
from tests.test_data_formats import CHAT_TEMPLATE, PROMPT
from trl_qhead import QHeadConfig, RewardFunctions
from trl_qhead.data import DataCollatorForQHead, prepare_dataset
from trl_qhead.mdp import action_mask_from_labels, sequence_rewards_to_actions
from trl_qhead.rewards import (
    RewardComputer,
    RunningMoments,
    scale_and_clip,
)

# ---- pure functions -----------------------------------------------------------------------------------------------


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


def completions_of(texts):
    return [[{"role": "assistant", "content": text}] for text in texts]


# ---- the per-batch pipeline ---------------------------------------------------------------------------------------


def _batch(tokenizer, dataset, **kwargs):
    rows = list(prepare_dataset(dataset, tokenizer, reward_columns=True, **kwargs))
    batch = DataCollatorForQHead(tokenizer.eos_token_id, padding_side="left")(rows)
    return batch, action_mask_from_labels(batch["labels"], batch["attention_mask"])


def test_conversational_batch_reaches_trl_functions_as_grpo_would(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    texts = ["<think>greet</think>hi", "hi there", "<think>a</think>b b b b b b"]
    dataset = Dataset.from_dict({"prompt": [PROMPT] * 3, "completion": completions_of(texts)})
    batch, action_mask = _batch(tokenizer, dataset)
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, kwargs=kwargs)
        return [0.0] * len(prompts)

    funcs = [think_format_reward, get_repetition_penalty_reward(1, -1.0), spy]
    computer = RewardComputer(tokenizer, RewardFunctions(funcs))
    rewards, metrics = computer(batch, action_mask, trainer_state="state")
    assert seen["prompts"] == [PROMPT] * 3
    assert seen["completions"] == completions_of(texts)  # decoded without EOS, as GRPO decodes
    eos = tokenizer.eos_token_id
    assert seen["completion_ids"] == [tokenizer(t)["input_ids"] + [eos] for t in texts]
    assert seen["kwargs"]["trainer_state"] == "state" and callable(seen["kwargs"]["log_metric"])
    think = think_format_reward(completions_of(texts))
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
