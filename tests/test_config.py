"""Every QHeadConfig validation error is raised at construction and names its field."""

import pytest

from trl_qhead import QHeadConfig


def _config(**kwargs):
    return QHeadConfig(output_dir="unused", report_to=[], **kwargs)


def test_defaults_are_the_documented_ones():
    config = _config()
    assert (config.gamma, config.q_weight, config.gae_lambda, config.use_lm_rewards) == (0.99, 1.0, None, False)
    assert config.remove_unused_columns is False  # the collator needs reward columns the model does not name


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gamma", -0.1),
        ("gamma", 1.5),
        ("gamma", float("nan")),
        ("gamma", "0.9"),
        ("gae_lambda", -0.01),
        ("gae_lambda", 1.01),
        ("q_weight", -1.0),
        ("q_weight", float("nan")),
        ("max_length", 1),
        ("max_length", 0),
        ("value_chunk_size", 0),
        ("q_head_learning_rate", 0.0),
        ("q_head_learning_rate", -1e-3),
        ("q_head_bias_learning_rate", -1e-2),
        ("q_head_bias_learning_rate", float("inf")),
        ("q_head_bias_learning_rate", True),
        ("packing_strategy", "greedy"),
        ("dataset_text_field", ""),
        ("dataset_split", ""),
    ],
)
def test_bad_values_name_their_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        _config(**{field: value})


def test_streaming_needs_max_steps():
    with pytest.raises(ValueError, match="`max_steps`"):
        _config(streaming=True)
    assert _config(streaming=True, max_steps=3).streaming


def test_data_files_need_a_builder_name():
    with pytest.raises(ValueError, match="`dataset_data_files`"):
        _config(dataset_data_files="corpus.txt")


@pytest.mark.parametrize("lam", [None, 0.0, 0.5, 1.0])
def test_boundary_values_are_accepted(lam):
    config = _config(gamma=1.0, gae_lambda=lam, q_weight=0.0, max_length=2)
    assert config.gamma == 1.0 and config.gae_lambda == lam
