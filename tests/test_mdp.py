"""`trl_qhead.mdp`: actions, masks, episode ends and rewards on the position grid, against hand-worked rows and loops."""

import math

import pytest
import torch

from trl_qhead.data import DataCollatorForQHead
from trl_qhead.mdp import (
    action_mask_from_labels,
    bootstrap_mask,
    episode_dones,
    fold_onto_actions,
    next_tokens,
    sequence_rewards_to_actions,
)
from trl_qhead.rewards import (
    scatter_completion_rewards,
)

EOS = 0  # the EOS id of these tests' hand-made rows


def test_mdp_grid_of_a_left_padded_row():
    input_ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    mask = action_mask_from_labels(labels, attention_mask)
    assert mask.tolist() == [[False, False, True, True, False], [True, True, True, True, False]]
    assert bootstrap_mask(mask).tolist() == [[False] * 4 + [True], [False] * 4 + [True]]
    dones = episode_dones(next_tokens(input_ids), mask, eos_token_id=7)
    assert dones.tolist() == [[0, 0, 0, 1, 0], [0, 1, 0, 0, 0]]


def _dones_by_loop(actions, action_mask, eos, done, token_dones, one_episode_per_row=False):
    """The obvious reading: an action ends the episode if it emits EOS (anywhere, or with `one_episode_per_row` only as
    the row's last action), is the last action of a `done` row, or produces a token flagged in `token_dones`."""
    B, T = actions.shape
    expected = torch.zeros(B, T)
    for b in range(B):
        positions = [t for t in range(T) if action_mask[b, t]]
        for t in positions:
            eos_ends = actions[b, t] == eos and (not one_episode_per_row or t == positions[-1])
            if eos_ends or (done[b] and t == positions[-1]) or token_dones[b, t + 1]:
                expected[b, t] = 1.0
    return expected


def test_one_episode_per_row_ends_only_at_the_rows_last_action():
    """A multi-turn row (completion mask with several runs, EOS closing each turn): without packing only the row's last
    EOS ends the episode; packed, every EOS does."""
    gen = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(10):
        n = int(torch.randint(3, 12, (1,), generator=gen))
        ids = torch.randint(0, 3, (n,), generator=gen).tolist()
        mask = (torch.rand(n, generator=gen) < 0.6).long().tolist()
        rows.append({"input_ids": ids, "completion_mask": mask})
    batch = DataCollatorForQHead(pad_token_id=EOS)(rows)
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    actions = next_tokens(batch["input_ids"])
    none = [False] * len(rows)
    for per_row in (True, False):
        dones = episode_dones(actions, action_mask, EOS, one_episode_per_row=per_row)
        expected = _dones_by_loop(actions, action_mask, EOS, none, torch.zeros_like(actions), per_row)
        assert torch.equal(dones, expected)
    # The rows really have EOS actions before their last one.
    assert (
        episode_dones(actions, action_mask, EOS).sum()
        > episode_dones(actions, action_mask, EOS, one_episode_per_row=True).sum()
    )


def test_rewards_between_turns_go_to_the_action_before_them_and_only_the_row_end_bootstraps():
    gen = torch.Generator().manual_seed(4)
    action_mask = torch.rand(6, 11, generator=gen) < 0.4
    action_mask[:, -1] = False
    action_mask[5] = False  # a row without actions keeps nothing
    rewards = torch.randn(6, 11, generator=gen)
    folded = fold_onto_actions(rewards, action_mask)
    bootstrap = bootstrap_mask(action_mask)
    for b in range(6):
        expected = torch.zeros(11)
        owner = None  # the last action at or before t
        for t in range(11):
            if action_mask[b, t]:
                owner = t
            if owner is not None:
                expected[owner] += rewards[b, t]
        torch.testing.assert_close(folded[b], expected)
        positions = [t for t in range(11) if action_mask[b, t]]
        assert bootstrap[b].nonzero().flatten().tolist() == ([positions[-1] + 1] if positions else [])


@pytest.mark.parametrize("side", ["right", "left"])
def test_episode_dones_match_a_loop(side):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(12):
        n = int(torch.randint(2, 9, (1,), generator=gen))
        ids = torch.randint(0, 4, (n,), generator=gen).tolist()  # EOS (0) appears often, mid-row and at the end
        prompt = int(torch.randint(0, n - 1, (1,), generator=gen))
        row = {"input_ids": ids, "completion_mask": [0] * prompt + [1] * (n - prompt), "done": bool(i % 3)}
        row["dones"] = torch.randint(0, 2, (n,), generator=gen).tolist()
        rows.append(row)
    batch = DataCollatorForQHead(pad_token_id=EOS, padding_side=side)(rows)
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    actions = next_tokens(batch["input_ids"])
    dones = episode_dones(actions, action_mask, EOS, done=batch["done"], token_dones=batch["dones"])
    expected = _dones_by_loop(actions, action_mask, EOS, batch["done"], batch["dones"])
    assert torch.equal(dones, expected) and dones.sum() > 0
    # Each source alone: EOS only is the old behaviour; padding (EOS as pad) never counts.
    eos_only = episode_dones(actions, action_mask, EOS)
    assert torch.equal(eos_only, _dones_by_loop(actions, action_mask, EOS, [False] * 12, torch.zeros_like(actions)))
    no_eos = episode_dones(actions, action_mask, None, done=batch["done"])
    assert torch.equal(no_eos, _dones_by_loop(actions, action_mask, -1, batch["done"], torch.zeros_like(actions)))


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


def test_episode_ids_split_last_actions_bootstraps_and_folded_rewards():
    """Packed rows: a slow loop over episodes against the vectorised masks and the fold."""
    from trl_qhead.mdp import bootstrap_mask, episode_ids_from_positions, fold_onto_actions, last_action_mask

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        positions = torch.zeros(3, 12, dtype=torch.long)
        for row in range(3):  # documents of random lengths, numbered from 0 each
            t = 0
            while t < 12:
                n = int(torch.randint(1, 5, (1,), generator=g))
                positions[row, t : t + n] = torch.arange(min(n, 12 - t))
                t += n
        episodes = episode_ids_from_positions(positions)
        act = torch.rand(3, 12, generator=g) < 0.6
        act[:, -1] = False
        rewards = torch.randn(3, 12, generator=g)
        last, folded = last_action_mask(act, episodes), fold_onto_actions(rewards, act, episodes)
        expected_last = torch.zeros_like(act)
        expected_fold = torch.zeros(3, 12)
        for row in range(3):
            for t in range(12):
                same = [p for p in range(12) if act[row, p] and episodes[row, p] == episodes[row, t]]
                if act[row, t] and max(same) == t:
                    expected_last[row, t] = True
                owners = [p for p in same if p <= t]
                if owners:  # a reward goes to the last action at or before it, in its own episode
                    expected_fold[row, max(owners)] += rewards[row, t]
        assert torch.equal(last, expected_last)
        torch.testing.assert_close(folded, expected_fold)
        assert torch.equal(bootstrap_mask(act, episodes)[:, 1:], expected_last[:, :-1])
