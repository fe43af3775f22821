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
