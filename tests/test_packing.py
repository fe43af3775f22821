"""Packed rows and truncated rows (issue 14): each packed document is its own episode and its own attention span,
a truncated row follows one rule under every packing setting, and no packed row is left without an action.

The reference everywhere is the same documents prepared without packing, one per row: packing must not change a
number."""

import pytest
import torch
from datasets import Dataset

from tests.conftest import make_tiny_gpt2, make_tiny_llama
from tests.oracles import action_rewards
from trl_qhead import AutoModelForCausalLMWithQHead, DataCollatorForQHead, QHeadConfig, QHeadTrainer, prepare_dataset
from trl_qhead.backbone import attention_inputs
from trl_qhead.data import has_action
from trl_qhead.mdp import action_mask_from_labels, episode_dones, episode_ids_from_positions, next_tokens
from trl_qhead.returns import compute_returns

EOS = 50256  # GPT-2's
STRATEGIES = ["wrapped", "bfd", "bfd_split"]


def rounded(rows: list[list[float]]) -> list[list[float]]:
    return [[round(g, 4) for g in row] for row in rows]


def returns_by_document(rows, gamma=0.9, value=5.0) -> list[list[float]]:
    """G at every action of every row, in row order, with V(s) = `value` everywhere (so that a bootstrap shows)."""
    batch = DataCollatorForQHead(pad_token_id=EOS)(list(rows))
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    dones = episode_dones(
        next_tokens(batch["input_ids"]), action_mask, EOS, done=batch.get("done"), token_dones=batch.get("dones")
    )
    values = torch.full(action_mask.shape, value)
    episodes = episode_ids_from_positions(batch["position_ids"]) if "position_ids" in batch else None  # as the trainer
    rewards = action_rewards(batch, action_mask)
    returns = compute_returns(rewards, values, action_mask, gamma=gamma, dones=dones, episode_ids=episodes)
    return rounded([row[mask].tolist() for row, mask in zip(returns, action_mask, strict=True)])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_packed_documents_are_separate_episodes(strategy):
    # Neither document ends in EOS or carries `done`: each bootstraps at its own end. Before, the first document's
    # returns collected the second's reward (G = [8.1, 9.0, ...] with V = 0) and the step between them was an action
    # that earned the second document's rewards[0].
    data = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6]], "rewards": [[0, 0, 0], [7.0, 0, 10.0]]})
    packed = prepare_dataset(data, None, max_length=8, packing=True, packing_strategy=strategy)
    assert len(packed) == 1 and packed[0]["seq_lengths"] == [3, 3]
    by_document = sorted(returns_by_document(prepare_dataset(data, None)))
    assert by_document == rounded([[0.9 * 4.5, 4.5], [9.0 + 0.81 * 5, 10.0 + 0.9 * 5]])  # each bootstraps at its end
    row = returns_by_document(packed)[0]
    assert sorted([row[:2], row[2:]]) == by_document  # four actions: no step from one document into the next


def test_a_packed_document_ending_in_eos_does_not_act_from_it(gpt2_tokenizer):
    docs = ["one two", "three four five"]
    rows = prepare_dataset(Dataset.from_dict({"text": docs}), gpt2_tokenizer, max_length=16, packing=True)
    batch = DataCollatorForQHead(pad_token_id=EOS)(list(rows))
    actions = action_mask_from_labels(batch["labels"], batch["attention_mask"])[0]
    ids = batch["input_ids"][0]
    assert ids.tolist().count(EOS) == 2 and not actions[ids == EOS].any()  # no action taken after an EOS
    assert actions.sum() == sum(len(gpt2_tokenizer(d)["input_ids"]) for d in docs)  # every token after the first


@pytest.mark.parametrize(
    ("make_model", "strategy", "padding_side"),
    [
        (make_tiny_gpt2, "wrapped", "right"),  # absolute positions
        (make_tiny_gpt2, "bfd", "left"),
        (make_tiny_llama, "bfd_split", "right"),  # rotary positions
        (make_tiny_llama, "bfd", "left"),
    ],
)
def test_packed_documents_attend_only_to_themselves(make_model, strategy, padding_side):
    docs = [[11, 12, 13], [21, 22, 23, 24], [31, 32], [41, 42, 43, 44, 45]]
    rows = prepare_dataset(Dataset.from_dict({"input_ids": docs}), None, max_length=9, packing=True,
                           packing_strategy=strategy)  # fmt: skip
    batch = DataCollatorForQHead(pad_token_id=0, padding_side=padding_side)(list(rows))
    model = AutoModelForCausalLMWithQHead(make_model(vocab_size=64)).eval()
    inputs = attention_inputs(batch["attention_mask"], batch["position_ids"])
    with torch.no_grad():
        hidden = model(batch["input_ids"], **inputs, use_cache=False).hidden_states
        checked = 0
        for row, ids in enumerate(batch["input_ids"].tolist()):
            start = int(batch["attention_mask"][row].argmax())  # the first real token
            for length in rows[row]["seq_lengths"]:  # each span, run alone from its first token
                span = ids[start : start + length]
                alone = model(torch.tensor([span])).hidden_states[0]
                torch.testing.assert_close(hidden[row, start : start + length], alone, atol=1e-5, rtol=1e-5)
                start, checked = start + length, checked + length
    assert checked == sum(len(r) for r in rows["input_ids"])


@pytest.mark.parametrize("strategy", ["wrapped", "bfd"])
def test_packed_batch_trains_like_the_documents_one_per_row(tmp_path, gpt2_tokenizer, strategy):
    # The whole loss (LM + Q, lambda-returns reading V at every state, reference log-prob rewards, per-token and
    # sequence rewards, EOS and `done` ends) of a packed batch equals that of the same documents, one per row.
    docs = [[464, 3797, 3332, EOS], [15, 16, 17, 18, 19], [30, 31, 32]]
    data = Dataset.from_dict(
        {
            "input_ids": docs,
            "rewards": [[0.0, 0.5, 0.0, 1.0], [0.0, 0.0, -1.0, 0.0, 2.0], [0.0, 3.0, 0.0]],
            "reward": [1.0, None, -2.0],
            "done": [False, True, False],
        }
    )
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2())
    torch.nn.init.normal_(model.q_head.weight, std=0.5)  # a zero head would hide V and Q
    config = QHeadConfig(output_dir=str(tmp_path), report_to="none", gamma=0.9, gae_lambda=0.8, use_lm_rewards=True)
    trainer = QHeadTrainer(model, config, train_dataset=data, processing_class=gpt2_tokenizer)
    model.eval()
    collate = DataCollatorForQHead(pad_token_id=EOS)
    one_per_row = collate(list(prepare_dataset(data, gpt2_tokenizer)))
    packed_rows = prepare_dataset(data, gpt2_tokenizer, max_length=12, packing=True, packing_strategy=strategy)
    assert len(packed_rows) == 1
    with torch.no_grad():
        expected = trainer.compute_loss(model, one_per_row)
        packed = trainer.compute_loss(model, collate(list(packed_rows)))
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("packing", "strategy", "expected"),
    [
        # max_length cuts [1 2 3 4 5] to [1 2 3]: the reward is paid on the last kept action, which is terminal
        (False, None, [[0.9, 1.0]]),
        ("pack", "bfd", [[0.9, 1.0]]),
        # wrapped and bfd_split lose no token: [1 2 3] bootstraps at the split, [4 5] ends with the reward (and
        # bootstraps, as the whole document does: it has no EOS)
        ("pack", "wrapped", [[0.81 * 5, 0.9 * 5], [1.0 + 0.9 * 5]]),
        ("pack", "bfd_split", [[0.81 * 5, 0.9 * 5], [1.0 + 0.9 * 5]]),
    ],
)
def test_a_truncated_row_follows_one_rule(packing, strategy, expected):
    data = Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5]], "reward": [1.0]})
    kwargs = {"packing": True, "packing_strategy": strategy} if packing else {}
    rows = prepare_dataset(data, None, max_length=3, **kwargs)
    assert returns_by_document(rows) == rounded(expected)
    # Before: no packing paid 1.0 + 0.9 * 5 (the future counted twice) and bfd dropped the reward.


@pytest.mark.parametrize("strategy", [None, "bfd"])
def test_a_truncated_row_without_a_reward_bootstraps_and_loses_done(strategy):
    data = Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5], [6, 7]], "done": [True, True], "reward": [None, None]})
    packing = {"packing": True, "packing_strategy": strategy} if strategy else {}
    rows = prepare_dataset(data, None, max_length=3, **packing)
    assert sorted(returns_by_document(rows)) == rounded([[0.0], [0.81 * 5, 0.9 * 5]])  # [6 7] is done, [1 2 3] cut


def test_wrapped_packing_drops_a_last_row_of_one_token_and_trains(tmp_path, gpt2_tokenizer, caplog):
    data = Dataset.from_dict({"input_ids": [[1, 2, 3, 4], [5, 6, 7]]})  # 7 tokens in rows of 3: [7] is left alone
    with caplog.at_level("WARNING"):
        rows = prepare_dataset(data, None, max_length=3, packing=True)
    assert rows["input_ids"] == [[1, 2, 3], [4, 5, 6]] and all(has_action(row) for row in rows)
    assert "Dropped 1 of 3 packed rows" in caplog.text
    config = QHeadConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", packing=True, max_length=3,
                         per_device_train_batch_size=1, num_train_epochs=1)  # fmt: skip
    trainer = QHeadTrainer(make_tiny_gpt2(), config, train_dataset=data, processing_class=gpt2_tokenizer)
    trainer.train()  # used to stop at the last batch: "`input_ids` of batch row 0 has 1 token(s)"
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_documents_of_fewer_than_two_tokens_are_dropped_before_packing(strategy, caplog):
    data = Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [], [5, 6, 7]]})
    with caplog.at_level("WARNING"):
        rows = prepare_dataset(data, None, max_length=3, packing=True, packing_strategy=strategy)
    assert sorted(rows["input_ids"]) == [[1, 2, 3], [5, 6, 7]]  # [4] no longer ends up in a row of its own, or in one
    assert "Dropped 2 of 4 rows" in caplog.text  # with [1 2 3] where a step would have led into it
