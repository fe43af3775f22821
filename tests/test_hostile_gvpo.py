"""Hostile inputs to GVPO (issue 27): fractional member masks, offline rows with a short, fractional or missing
`completion_mask`, rewards that are strings or leave float32, and a trainer given a model that has no name or path.
Each gives a ValueError/TypeError naming the row (its group and member) and the column, before any forward; the valid
neighbours of each case still give the loss of the documented formula."""

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from tests.conftest import make_tiny_gpt2
from trl_qhead.gvpo import GVPOConfig, GVPOTrainer, gvpo_loss, gvpo_loss_on_groups


def _groups(changes=None):
    """Two groups of two rows of prompt [5, 6] + a 2-token completion; `changes[(g, i)]` updates row i of group g."""
    changes = changes or {}
    groups = []
    for g in range(2):
        group = []
        for i in range(2):
            row = {"input_ids": [5, 6, 10 + g, 20 + i], "completion_mask": [0, 0, 1, 1], "reward": float(g + i)}
            row.update(changes.get((g, i), {}))
            group.append(row)
        groups.append(group)
    return groups


class _Forwards(torch.nn.Module):
    """A tiny GPT-2 that counts its forwards: an error must come before the first."""

    def __init__(self):
        super().__init__()
        self.lm = make_tiny_gpt2(vocab_size=64, seed=1)
        self.calls = 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.lm(**kwargs)

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()


# ---- gvpo_loss: the member mask -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.4, -1.0, 2.0, math.nan])
def test_gvpo_loss_refuses_a_mask_that_is_not_zero_or_one(value):
    mask = torch.tensor([[1.0, 1.0, value]])
    with pytest.raises(ValueError, match="`mask` holds .* at group 0, member 2"):
        gvpo_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[0.0, 1.0, 2.0]]), 0.1, mask)


def test_gvpo_loss_takes_a_zero_one_float_mask_as_the_bool_mask():
    logps, ref, rewards = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    as_float = gvpo_loss(logps, ref, rewards, 0.3, torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
    as_bool = gvpo_loss(logps, ref, rewards, 0.3, torch.tensor([[True, False, True], [True, True, True]]))
    torch.testing.assert_close(as_float.loss, as_bool.loss)
    # by hand, group 0 (members 0 and 2): half the unbiased variance of beta Delta - R over 2 members
    residual = [0.3 * (logps[0, i] - ref[0, i]).item() - rewards[0, i].item() for i in (0, 2)]
    group0 = 0.5 * (residual[0] - residual[1]) ** 2 / 2
    residual1 = [0.3 * (logps[1, i] - ref[1, i]).item() - rewards[1, i].item() for i in range(3)]
    mean1 = sum(residual1) / 3
    group1 = 0.5 * sum((r - mean1) ** 2 for r in residual1) / 2
    assert as_bool.loss.item() == pytest.approx((group0 + group1) / 2, rel=1e-5)


def test_gvpo_loss_names_the_member_of_an_infinite_reward():
    rewards = torch.tensor([[0.0, 1.0], [1e39, 2.0]], dtype=torch.float64)  # 1e39 is inf in float32
    with pytest.raises(ValueError, match="group 1, member 0"):
        gvpo_loss(torch.zeros(2, 2), torch.zeros(2, 2), rewards, 0.1)


# ---- gvpo_loss_on_groups: the rows --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,error,message",
    [
        (
            {"completion_mask": [0, 0, 1]},
            ValueError,
            "`completion_mask` of row 3 \\(group 1, member 1\\) has 3 entries",
        ),
        ({"completion_mask": [0, 0, 1, 0.5]}, ValueError, "`completion_mask` of row 3 .* holds 0.5 at token 3"),
        ({"completion_mask": [0, 0, 1, math.nan]}, ValueError, "`completion_mask` of row 3 .* holds nan at token 3"),
        ({"completion_mask": [1, 0, 1, 1]}, ValueError, "`completion_mask` of row 3 .* first token"),
        ({"completion_mask": "0011"}, ValueError, "`completion_mask` of row 3"),
        ({"reward": "1.0"}, TypeError, "`reward` of row 3 \\(group 1, member 1\\) is '1.0'"),
        ({"reward": True}, TypeError, "`reward` of row 3"),
        ({"reward": 1e39}, ValueError, "`reward` of row 3 .* float32"),
        ({"reward": math.inf}, ValueError, "`reward` of row 3"),
        ({"input_ids": []}, ValueError, "`input_ids` of row 3"),
        ({"input_ids": [5, 6, 10, 64]}, ValueError, "`input_ids` of row 3 .* holds 64 at token 3"),
        ({"input_ids": [5, 6, 10, 2.0]}, ValueError, "`input_ids` of row 3"),
    ],
)
def test_gvpo_loss_on_groups_names_the_row_and_column_of_a_bad_value(change, error, message):
    model = _Forwards()
    with pytest.raises(error, match=message):
        gvpo_loss_on_groups(model, _groups({(1, 1): change}), 0.1, ref_model=model)
    assert model.calls == 0


@pytest.mark.parametrize("column", ["input_ids", "completion_mask", "reward"])
def test_gvpo_loss_on_groups_names_a_missing_column(column):
    model = _Forwards()
    groups = _groups()
    del groups[0][1][column]
    with pytest.raises(ValueError, match=f"row 1 \\(group 0, member 1\\) has no \\['{column}'\\]"):
        gvpo_loss_on_groups(model, groups, 0.1, ref_model=model)
    assert model.calls == 0


def test_gvpo_loss_on_groups_still_takes_a_none_or_nan_reward_as_unscorable():
    model = make_tiny_gpt2(vocab_size=64, seed=1).eval()  # no dropout: the two calls see the same log-probs
    left_out = gvpo_loss_on_groups(model, _groups({(1, 1): {"reward": None}}), 0.1, ref_model=model)
    nan = gvpo_loss_on_groups(model, _groups({(1, 1): {"reward": math.nan}}), 0.1, ref_model=model)
    assert left_out.mask.tolist() == nan.mask.tolist() == [[True, True], [True, False]]
    assert left_out.num_groups.item() == 1  # group 1 has one member left: it does not count
    torch.testing.assert_close(left_out.loss, nan.loss)


# ---- GVPOTrainer: a model with no name or path ----------------------------------------------------------------------


def _reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _args(tmp_path):
    return GVPOConfig(
        output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2, max_completion_length=4,
        max_steps=1, report_to=[], use_cpu=True,
    )  # fmt: skip


def test_trainer_refuses_a_model_built_from_a_config_and_never_saved(tmp_path, gpt2_tokenizer):
    prompts = Dataset.from_dict({"prompt": ["Hi", "A"]})
    with pytest.raises(ValueError, match="no name or path .*save_pretrained.*peft_config"):
        GVPOTrainer(make_tiny_gpt2(), _reward, _args(tmp_path), train_dataset=prompts, processing_class=gpt2_tokenizer)
    with pytest.raises(ValueError, match="no name or path .*processing_class"):
        GVPOTrainer(make_tiny_gpt2(), _reward, _args(tmp_path), train_dataset=prompts)


def test_trainer_takes_an_unsaved_model_with_lora_adapters(tmp_path, gpt2_tokenizer):
    lora = LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, r=2, lora_alpha=4)
    trainer = GVPOTrainer(
        make_tiny_gpt2(), _reward, _args(tmp_path), train_dataset=Dataset.from_dict({"prompt": ["Hi", "A"]}),
        processing_class=gpt2_tokenizer, peft_config=lora,
    )  # fmt: skip
    assert trainer.ref_model is None  # its adapters disabled are the reference: no path needed


# ---- attack round: groups of one, bad betas, numpy and tensor rows -----------------------------------------------


def test_gvpo_loss_on_groups_refuses_groups_of_one():
    model = _Forwards()
    with pytest.raises(ValueError, match="at least 2"):
        gvpo_loss_on_groups(model, [[row] for group in _groups() for row in group], 0.1, ref_model=model)
    assert model.calls == 0


@pytest.mark.parametrize("beta", [0.0, -0.1, math.nan, math.inf])
def test_gvpo_loss_refuses_a_bad_beta(beta):
    with pytest.raises(ValueError, match="`beta` must be a finite number > 0"):
        gvpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), beta)


def test_gvpo_loss_on_groups_reads_numpy_and_tensor_rows_as_lists():
    import numpy as np

    model = make_tiny_gpt2(vocab_size=64, seed=1).eval()
    plain = gvpo_loss_on_groups(model, _groups(), 0.1, ref_model=model)
    typed = _groups()
    typed[0][0] = {k: np.asarray(v) if k != "reward" else np.float32(v) for k, v in typed[0][0].items()}
    typed[1][1] = {k: torch.tensor(v) for k, v in typed[1][1].items()}
    torch.testing.assert_close(gvpo_loss_on_groups(model, typed, 0.1, ref_model=model).loss, plain.loss)
