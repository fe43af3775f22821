"""Hostile numbers in QHeadConfig: every float field (ours and the inherited `TrainingArguments` ones) refuses
NaN and infinities at construction, with an error that names the field."""

import dataclasses
import math

import pytest

from trl_qhead import QHeadConfig


def _config(**kwargs):
    return QHeadConfig(output_dir="unused", report_to=[], **kwargs)


def _float_fields() -> list[str]:
    """Every field typed `float` (or `float | None`), inherited ones included."""
    return [f.name for f in dataclasses.fields(QHeadConfig) if "float" in str(f.type) and "list" not in str(f.type)]


def test_the_float_fields_are_found():
    names = _float_fields()
    for name in ("q_weight", "gamma", "gae_lambda", "reward_scale", "reward_clip", "learning_rate", "max_grad_norm"):
        assert name in names


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("field", _float_fields())
def test_every_float_field_rejects_non_finite_values(field, value):
    with pytest.raises(ValueError, match=f"`{field}`.*finite"):
        _config(**{field: value})


@pytest.mark.parametrize("value", [math.inf, math.nan, -1.0, -math.inf, True])
def test_q_weight_must_be_a_finite_number_at_least_zero(value):
    with pytest.raises(ValueError, match="`q_weight`"):
        _config(q_weight=value)


@pytest.mark.parametrize("value", [[1.0, math.inf], [math.nan]])
def test_reward_weights_reject_non_finite_entries(value):
    with pytest.raises(ValueError, match="`reward_weights`"):
        _config(reward_weights=value)


def test_finite_values_still_pass():
    config = _config(q_weight=0.0, learning_rate=1e-3, max_grad_norm=0.5, reward_clip=2.0, gae_lambda=0.9)
    assert config.q_weight == 0.0 and config.max_grad_norm == 0.5


# ---- issue 27: settings candidate labels cannot be trained with, refused before the data is prepared ---------------

CANDIDATE_ROW = {
    "input_ids": [5, 6, 7],
    "completion_mask": [0, 1, 1],
    "reward": 1.0,
    "candidate_ids": [[], [1, 2], [3, 4]],
    "candidate_rewards": [[], [0.5, -0.5], [1.0, 2.0]],
    "candidate_sampled_reward": [0.0, 0.25, -0.25],
}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"use_lm_rewards": True}, r"`use_lm_rewards=True` would leave the sampled token's .*`use_lm_rewards=False`"),
        ({"reward_clip": 1.0}, r"`reward_clip=1.0` clips the sampled return .*`reward_clip=None`"),
        ({"reward_normalization": "running"}, r"`reward_normalization='running'` .*`reward_normalization=None`"),
    ],
)
@pytest.mark.parametrize("where", ["train_dataset", "eval_dataset"])
def test_candidate_labels_refuse_settings_that_would_make_their_targets_wrong(tmp_path, gpt2_tokenizer, kwargs,
                                                                               match, where):  # fmt: skip
    from datasets import Dataset

    from tests.conftest import make_tiny_gpt2
    from trl_qhead import AutoModelForCausalLMWithQHead, QHeadTrainer

    plain = Dataset.from_dict({"input_ids": [[5, 6, 7]]})
    labelled = Dataset.from_list([CANDIDATE_ROW])
    datasets = {"train_dataset": labelled if where == "train_dataset" else plain}
    datasets["eval_dataset"] = {"held_out": labelled} if where == "eval_dataset" else None
    config = QHeadConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, **kwargs)
    name = "held_out" if where == "eval_dataset" else where
    with pytest.raises(ValueError, match=f"The {name} has candidate labels .*" + match):
        QHeadTrainer(AutoModelForCausalLMWithQHead(make_tiny_gpt2()), config, processing_class=gpt2_tokenizer,
                     **datasets)  # fmt: skip


def test_candidate_weight_zero_leaves_the_columns_out_and_is_accepted():
    config = _config(use_lm_rewards=True, reward_clip=1.0, candidate_weight=0.0)
    config.check_dataset_columns(list(CANDIDATE_ROW))  # nothing raised: the candidates are not trained on
    _config().check_dataset_columns(list(CANDIDATE_ROW))  # the defaults train them
    _config(use_lm_rewards=True).check_dataset_columns(["input_ids", "reward"])  # no candidates: nothing to refuse
    _config(use_lm_rewards=True).check_dataset_columns(None)  # a stream of unknown columns


def test_a_stream_of_candidate_rows_is_checked_by_its_first_row():
    from datasets import IterableDataset

    def rows():
        yield CANDIDATE_ROW

    stream = IterableDataset.from_generator(rows)
    with pytest.raises(ValueError, match="The train_dataset has candidate labels .*use_lm_rewards"):
        _config(use_lm_rewards=True).check_dataset_columns(stream, "train_dataset")
    _config().check_dataset_columns(stream, "train_dataset")  # the defaults: nothing to refuse, nothing read
