"""`trl_qhead.offline_rl.offline_rl_rounds` (issue 25 deliverable 3): round r samples from the policy tilted by the Q head
of round r - 1 (round 0: the base policy), labels, and refits on the union of the rounds."""

import pytest
from datasets import Dataset

import trl_qhead.offline_rl as offline_rl
from tests.test_rewards_training import count_b, make_word_model, trainer_config, word_tokenizer  # noqa: F401
from trl_qhead import CandidateLabels, QTiltLogitsProcessor, generate_and_score
from trl_qhead.offline_rl import ROUND_SEED_STRIDE, offline_rl_rounds

PROMPTS = Dataset.from_dict({"prompt": ["a", "c", "d", "e"]})
SAMPLING = {"num_generations": 16, "max_new_tokens": 8, "show_progress": False, "seed": 5}


def _config(tmp_path, **kwargs):
    defaults = dict(gamma=1.0, learning_rate=3e-2, num_train_epochs=2, per_device_train_batch_size=32, seed=0)
    return trainer_config(tmp_path, **{**defaults, **kwargs})


class SpyTilt(QTiltLogitsProcessor):
    """The real processor, recording that it was built, called and taken off the model."""

    made: list["SpyTilt"] = []

    def __init__(self, model, beta, **kwargs):
        super().__init__(model, beta, **kwargs)
        self.model, self.beta, self.calls, self.removed = model, beta, 0, False
        SpyTilt.made.append(self)

    def __call__(self, input_ids, scores):
        self.calls += 1
        return super().__call__(input_ids, scores)

    def remove(self):
        self.removed = True
        super().remove()


def test_rounds_sample_from_the_previous_rounds_tilt_and_train_on_the_union(tmp_path, word_tokenizer, monkeypatch):  # noqa: F811
    monkeypatch.setattr(offline_rl, "QTiltLogitsProcessor", SpyTilt)
    SpyTilt.made = []
    model = make_word_model(seed=0)
    result = offline_rl_rounds(
        model, word_tokenizer, PROMPTS, count_b, _config(tmp_path), beta=0.5, rounds=2, sampling=SAMPLING
    )
    # round 0 from the base policy, round 1 through one tilt processor on this model at this beta, then removed
    assert len(SpyTilt.made) == 1
    spy = SpyTilt.made[0]
    assert spy.model is model and spy.beta == 0.5 and spy.calls > 0 and spy.removed
    assert [len(d) for d in result.datasets] == [64, 64]
    assert result.train_sizes == [64, 128]  # the union grows
    assert list(result.train_dataset["round"]) == [0] * 64 + [1] * 64
    rounds_ids = [list(d["input_ids"]) for d in result.datasets]
    assert list(result.train_dataset["input_ids"]) == rounds_ids[0] + rounds_ids[1]
    print(
        f"offline_rl_rounds, toy task: mean reward round 0 (base) {result.mean_rewards[0]:.3f}, round 1 (tilted) "
        f"{result.mean_rewards[1]:.3f}"
    )
    # the tilt of round 0's head samples far more b's than the base policy did
    assert result.mean_rewards[1] > result.mean_rewards[0] + 1.0

    # Round 1's data is exactly what the round-0 model tilted at beta samples: rebuild that model by running round 0
    # alone from the same start, then sample with a plain QTiltLogitsProcessor from round 1's seed.
    again = make_word_model(seed=0)
    offline_rl_rounds(
        again, word_tokenizer, PROMPTS, count_b, _config(tmp_path / "again"), beta=0.5, sampling=SAMPLING
    )
    sampling = {**SAMPLING, "seed": SAMPLING["seed"] + ROUND_SEED_STRIDE}
    with QTiltLogitsProcessor(again, beta=0.5) as tilt:
        expected = generate_and_score(again, word_tokenizer, PROMPTS, count_b, logits_processor=[tilt], **sampling)
    assert rounds_ids[1] == list(expected["input_ids"])


def test_rounds_without_aggregation_train_on_the_last_round_with_labels(tmp_path, word_tokenizer):  # noqa: F811
    model = make_word_model(seed=1)
    sampling = {"num_generations": 2, "max_new_tokens": 3, "show_progress": False, "seed": 0}
    result = offline_rl_rounds(
        model,
        word_tokenizer,
        PROMPTS,
        count_b,
        _config(tmp_path, max_steps=1),
        beta=1.0,
        rounds=2,
        labels=CandidateLabels(k=2),
        aggregate=False,
        sampling=sampling,
    )
    assert result.train_sizes == [8, 8] and list(result.train_dataset["round"]) == [1] * 8
    assert all("candidate_ids" in d.column_names for d in result.datasets)
    assert (tmp_path / "round-0").is_dir() and (tmp_path / "round-1").is_dir()


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"rounds": 0}, ValueError, "`rounds` must be a positive integer"),
        ({"beta": 0.0}, ValueError, "`beta` must be"),
        ({"sampling": {"logits_processor": []}}, ValueError, "`sampling` cannot set `logits_processor`"),
        ({"config": "out"}, TypeError, "`config` must be a QHeadConfig"),
    ],
)
def test_rounds_reject_bad_arguments(tmp_path, word_tokenizer, kwargs, error, message):  # noqa: F811
    arguments = {"beta": 1.0, "config": _config(tmp_path), **kwargs}
    config = arguments.pop("config")
    with pytest.raises(error, match=message):
        offline_rl_rounds(make_word_model(), word_tokenizer, PROMPTS, count_b, config, **arguments)
