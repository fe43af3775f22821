"""Rewards in training and on generated data: `QHeadTrainer(reward_funcs=...)` in every dataset format (streamed),
reward models and reference log-probs in the trainer, `generate_and_score`, and the offline-RL loop on a toy task where
a sequence reward from a TRL-style reward function makes Q-tilted samples better than base samples."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessor, PreTrainedTokenizerFast, TrainerState
from trl.rewards import get_soft_overlong_punishment, think_format_reward

from tests.conftest import make_tiny_gpt2
from tests.test_data_formats import CHAT_TEMPLATE, _datasets
from tests.test_rewards import reward_model_dir  # noqa: F401 (a fixture)
from trl_qhead import (
    AutoModelForCausalLMWithQHead,
    QHeadConfig,
    QHeadTrainer,
    QTiltLogitsProcessor,
    generate_and_score,
)
from trl_qhead.data import DataCollatorForQHead, prepare_dataset
from trl_qhead.mdp import action_mask_from_labels
from trl_qhead.rewards import RewardComputer

# ---- a toy world: six words, a 2-layer GPT-2 over them ------------------------------------------------------------

WORDS = ["<eos>", "a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def word_tokenizer():
    # Words never seen are not expected here; mapping them to EOS avoids a seventh token.
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


def make_word_model(seed: int = 0) -> AutoModelForCausalLMWithQHead:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(WORDS), n_layer=2, n_embd=32, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return AutoModelForCausalLMWithQHead(GPT2LMHeadModel(config))


def count_b(completions, **kwargs) -> list[float]:
    """A reward function with TRL's interface: one point per emitted "b"."""
    return [float(completion.split().count("b")) for completion in completions]


def _config(tmp_path, **kwargs) -> QHeadConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    return QHeadConfig(**{**defaults, **kwargs})


# ---- the trainer ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "conversational", "messages", "tokenized"])
def test_trainer_streams_every_format_with_reward_functions(tmp_path, gpt2_tokenizer, fmt):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    calls = []

    def spy(prompts, completions, completion_ids, trainer_state, **kwargs):
        assert isinstance(trainer_state, TrainerState)
        calls.append((prompts, completions, completion_ids, kwargs))
        return [float(len(ids)) for ids in completion_ids]

    dataset = _datasets()[fmt].to_iterable_dataset()
    trainer = QHeadTrainer(
        make_tiny_gpt2(),
        _config(tmp_path, max_steps=1, streaming=True),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=spy,
    )
    trainer.train()
    prompts, completions, completion_ids, columns = calls[0]
    rows = list(prepare_dataset(_datasets()[fmt], tokenizer, reward_columns=True))
    assert completion_ids == [row["input_ids"][row.get("prompt_length", 0) :] for row in rows]
    assert completions[0] == (
        [{"role": "assistant", "content": tokenizer.decode(completion_ids[0], skip_special_tokens=True)}]
        if fmt in ("conversational", "messages")
        else tokenizer.decode(completion_ids[0], skip_special_tokens=True)
    )
    if fmt == "prompt_completion":
        assert prompts == ["2+2=", "Hello"] and columns["solution"] == ["4", "x"]
    logs = trainer.state.log_history[0]
    assert logs["rewards/spy/mean"] == pytest.approx(sum(map(len, completion_ids)) / 2)
    assert not math.isnan(logs["loss"])


def test_trainer_with_reward_model_path_lm_rewards_and_running_normalisation(
    tmp_path,
    gpt2_tokenizer,
    reward_model_dir,  # noqa: F811
):
    dataset = Dataset.from_dict({"prompt": ["The sky is", "Roses are"], "completion": [" blue", " red"]})
    trainer = QHeadTrainer(
        make_tiny_gpt2(),
        _config(tmp_path, max_steps=2, use_lm_rewards=True, lm_reward_coef=0.5, reward_normalization="running"),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=gpt2_tokenizer,
        reward_funcs=[reward_model_dir, get_soft_overlong_punishment(3, 2)],
    )
    trainer.train()
    trainer.evaluate()
    assert trainer.state.log_history[-1]["eval_rewards/soft_overlong_punishment_reward/mean"] == -0.5
    logs = trainer.state.log_history[0]
    assert {"rewards/tiny-rm/mean", "rewards/soft_overlong_punishment_reward/mean", "rewards/lm/mean"} <= set(logs)
    assert logs["rewards/soft_overlong_punishment_reward/mean"] == -0.5  # both completions are 2 tokens (with EOS)
    assert logs["rewards/lm/mean"] < 0  # summed log-probs of the completion under the reference
    assert trainer.reward_computer.moments.count == 4  # two steps of two samples; evaluation does not count
    trainer.save_model(str(tmp_path / "saved"))
    state = trainer.reward_computer.moments.state_dict()
    trainer.reward_computer.moments.update(torch.tensor([100.0]))
    trainer._load_from_checkpoint(str(tmp_path / "saved"))  # what resuming from a checkpoint calls
    assert trainer.reward_computer.moments.state_dict() == state


def test_trainer_rejects_inconsistent_reward_arguments(tmp_path, gpt2_tokenizer):
    dataset = _datasets()["text"]
    with pytest.raises(ValueError, match="`reward_weights` was set but the trainer has no `reward_funcs`"):
        QHeadTrainer(
            make_tiny_gpt2(),
            _config(tmp_path, reward_weights=[1.0]),
            train_dataset=dataset,
            processing_class=gpt2_tokenizer,
        )
    with pytest.raises(ValueError, match="`reward_weights` has 2 weights for 1 reward functions"):
        QHeadTrainer(
            make_tiny_gpt2(),
            _config(tmp_path, reward_weights=[1.0, 2.0]),
            train_dataset=dataset,
            processing_class=gpt2_tokenizer,
            reward_funcs=count_b,
        )
    with pytest.raises(ValueError, match="packing"):
        QHeadTrainer(
            make_tiny_gpt2(),
            _config(tmp_path, packing=True, max_length=16),
            train_dataset=dataset,
            processing_class=gpt2_tokenizer,
            reward_funcs=count_b,
        )


# ---- generated data ---------------------------------------------------------------------------------------------------


class ForceToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.token] = 0.0
        return forced


def test_generate_and_score_builds_a_trainable_dataset(word_tokenizer, capsys):
    prompts = Dataset.from_dict({"prompt": ["a", "c d", "e"], "target": ["b", "c", "d"]})
    seen = []

    def matches(completions, target, **kwargs):
        seen.append(target)
        return [1.0 if t in c.split() else None for c, t in zip(completions, target, strict=True)]

    def per_token_b(completion_ids, **kwargs):
        return [[0.5 if token == 2 else 0.0 for token in ids] for ids in completion_ids]

    torch.manual_seed(0)
    backbone = make_word_model().pretrained_model  # a plain causal LM works as well as a Q-head model
    data = generate_and_score(
        backbone,
        word_tokenizer,
        prompts,
        [count_b, matches, per_token_b],
        reward_weights=[1.0, 2.0, 1.0],
        num_generations=3,
        max_new_tokens=5,
        batch_size=2,
    )
    assert "Generating and scoring" in capsys.readouterr().err  # the progress bar
    assert len(data) == 9 and data["prompt"] == ["a"] * 3 + ["c d"] * 3 + ["e"] * 3
    assert seen[0] == ["b"] * 3 + ["c"] * 3  # the first batch: two prompts, three completions each
    for row in data:
        prompt_ids = word_tokenizer(row["prompt"])["input_ids"]
        completion_ids = row["input_ids"][len(prompt_ids) :]
        assert row["input_ids"][: len(prompt_ids)] == prompt_ids
        assert row["completion_mask"] == [0] * len(prompt_ids) + [1] * len(completion_ids)
        assert 1 <= len(completion_ids) <= 5 and 0 not in completion_ids[:-1]  # cut at the first EOS
        assert row["completion"] == word_tokenizer.decode(completion_ids, skip_special_tokens=True)
        assert row["reward_count_b"] == completion_ids.count(2)
        match = 1.0 if row["target"] in row["completion"].split() else None
        assert row["reward_matches"] == match
        assert row["reward"] == row["reward_count_b"] + (2.0 * match if match else 0.0)
        assert row["rewards"] == [0.0] * len(prompt_ids) + [0.5 if t == 2 else 0.0 for t in completion_ids]

    # The dataset trains as it is: the sequence reward on the last action, per-token rewards on theirs.
    rows = list(prepare_dataset(data, word_tokenizer))
    batch = DataCollatorForQHead(0)(rows)
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    rewards, _ = RewardComputer(word_tokenizer)(batch, action_mask)
    assert rewards.sum().item() == pytest.approx(sum(data["reward"]) + sum(map(sum, data["rewards"])))


def test_generate_and_score_passes_logits_processors_and_chat_templates(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    prompts = [{"prompt": [{"role": "user", "content": "Hi"}]}]
    token = tokenizer(" yes")["input_ids"][0]
    data = generate_and_score(
        make_tiny_gpt2(),
        tokenizer,
        prompts,
        think_format_reward,
        num_generations=2,
        max_new_tokens=3,
        logits_processor=[ForceToken(token)],
        show_progress=False,
    )
    assert data["completion"] == [[{"role": "assistant", "content": " yes yes yes"}]] * 2
    assert tokenizer.decode(data[0]["input_ids"]) == "user:\nHi\nassistant:\n yes yes yes"
    assert data["reward"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="expected a `prompt` column"):
        generate_and_score(make_tiny_gpt2(), tokenizer, Dataset.from_dict({"text": ["x"]}), show_progress=False)


# ---- the offline-RL loop on a toy task ----------------------------------------------------------------------------


def test_sequence_reward_from_a_reward_function_makes_tilted_samples_better(tmp_path, word_tokenizer):
    """Sample from a random policy over six words, train the Q head on those samples with the reward "number of b"
    computed by the trainer, then sample again: the Q-tilted policy earns far more than the base policy."""
    model = make_word_model(seed=0)
    prompts = Dataset.from_dict({"prompt": ["a", "c", "d", "e"]})
    torch.manual_seed(1)
    samples = generate_and_score(
        model, word_tokenizer, prompts, num_generations=32, max_new_tokens=8, show_progress=False
    )
    trainer = QHeadTrainer(
        model,
        _config(tmp_path, gamma=1.0, learning_rate=3e-2, num_train_epochs=2, per_device_train_batch_size=32, seed=0),
        train_dataset=samples,
        processing_class=word_tokenizer,
        reward_funcs=count_b,
    )
    trainer.train()
    first_epoch = [logs["rewards/count_b/mean"] for logs in trainer.state.log_history[:4]]  # 4 batches of 32
    assert sum(first_epoch) / 4 == pytest.approx(sum(count_b(samples["completion"])) / len(samples))

    def mean_reward(logits_processor):
        torch.manual_seed(2)
        data = generate_and_score(
            model,
            word_tokenizer,
            prompts,
            count_b,
            num_generations=16,
            max_new_tokens=8,
            logits_processor=logits_processor,
            show_progress=False,
        )
        return sum(data["reward"]) / len(data)

    base, tilted = mean_reward(None), mean_reward([QTiltLogitsProcessor(model, beta=0.5)])
    print(f"toy task, mean reward over 64 samples: base {base:.3f}, Q-tilted (beta=0.5) {tilted:.3f}")
    assert tilted > base + 1.0
