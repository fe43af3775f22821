"""Rewards in training and on generated data: `QHeadTrainer(reward_funcs=...)` in every dataset format (streamed),
reward models and reference log-probs in the trainer, `generate_and_score`, and the offline-RL loop on a toy task where
a sequence reward from a TRL-style reward function makes Q-tilted samples better than base samples."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerState
from trl.rewards import get_soft_overlong_punishment

from tests.conftest import make_tiny_gpt2
from tests.test_data_formats import CHAT_TEMPLATE, example_datasets
from tests.test_reward_functions import reward_model_dir  # noqa: F401 (fixtures)
from trl_qhead import (
    AutoModelForCausalLMWithQHead,
    QHeadConfig,
    QHeadTrainer,
    QTiltLogitsProcessor,
    generate_and_score,
)
from trl_qhead.data import prepare_dataset

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


def trainer_config(tmp_path, **kwargs) -> QHeadConfig:
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

    dataset = example_datasets()[fmt].to_iterable_dataset()
    trainer = QHeadTrainer(
        make_tiny_gpt2(),
        trainer_config(tmp_path, max_steps=1, streaming=True),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=spy,
    )
    trainer.train()
    prompts, completions, completion_ids, columns = calls[0]
    rows = list(prepare_dataset(example_datasets()[fmt], tokenizer, reward_columns=True))
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
        trainer_config(tmp_path, max_steps=2, use_lm_rewards=True, lm_reward_coef=0.5, reward_normalization="running"),
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
    dataset = example_datasets()["text"]
    with pytest.raises(ValueError, match="`reward_weights` was set but the trainer has no `reward_funcs`"):
        QHeadTrainer(
            make_tiny_gpt2(),
            trainer_config(tmp_path, reward_weights=[1.0]),
            train_dataset=dataset,
            processing_class=gpt2_tokenizer,
        )
    with pytest.raises(ValueError, match="`reward_weights` has 2 weights for 1 reward functions"):
        QHeadTrainer(
            make_tiny_gpt2(),
            trainer_config(tmp_path, reward_weights=[1.0, 2.0]),
            train_dataset=dataset,
            processing_class=gpt2_tokenizer,
            reward_funcs=count_b,
        )
    with pytest.raises(ValueError, match="packing"):
        QHeadTrainer(
            make_tiny_gpt2(),
            trainer_config(tmp_path, packing=True, max_length=16),
            train_dataset=dataset,
            processing_class=gpt2_tokenizer,
            reward_funcs=count_b,
        )


# ---- generated data ---------------------------------------------------------------------------------------------------


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
        trainer_config(
            tmp_path, gamma=1.0, learning_rate=3e-2, num_train_epochs=2, per_device_train_batch_size=32, seed=0
        ),
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
