"""Where actions, rewards and episode ends sit on the model's position grid (docs/DESIGN.md section 1).

Position `t` of a `[B, T]` batch holds the state `s_t` (the prefix up to token `t`) and, when token `t + 1` is a
training target, the action `a_t = x_{t+1}`. These helpers turn a collated batch (token ids, attention mask, labels with
-100 where a token is not a target, per-token rewards) into the grid tensors that `compute_returns` and the losses take.
They only shift and mask: padding on either side works because nothing here looks at token ids to find padding.

Episodes. Without packing a row is one episode. Its actions need not be contiguous: a `completion_mask` with several runs
(a multi-turn row: assistant turns with tool outputs or user turns between them) leaves tokens between the runs that no
action produces. Those are the environment's moves, not actions: they are never trained on, a reward earned on one of them
goes to the last action before it (`fold_onto_actions`), and the returns flow across them from one action to the next
(`trl_qhead.returns.compute_returns`). Only the row's last action bootstraps (`bootstrap_mask`), and an EOS that closes an
earlier turn does not end the episode (`episode_dones(..., one_episode_per_row=True)`). Packed rows hold one document
after another, each its own episode, ended by its EOS (or its `dones` flag): `episode_ids` (from the packed batch's
`position_ids`, which restart at 0 with each document) tell the helpers below and `compute_returns` where one ends,
so that no return, bootstrap or folded reward crosses from one document into the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def action_mask_from_labels(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`mask[b, t] = True` where position `t` holds an action: token `t + 1` is a target and `s_t` is a real state.

    Args:
        labels: `[B, T]` token ids, -100 where the token is not a training target (padding, prompt).
        attention_mask: `[B, T]`, 1 on real tokens.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = (labels[:, 1:] != -100) & attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    return mask


def next_tokens(input_ids: torch.Tensor) -> torch.Tensor:
    """`a[b, t] = input_ids[b, t + 1]`, the action taken at position `t` (0 at the last position, never an action)."""
    actions = torch.zeros_like(input_ids)
    actions[:, :-1] = input_ids[:, 1:]
    return actions


def episode_dones(
    actions: torch.Tensor,
    action_mask: torch.Tensor,
    eos_token_id: int | list[int] | None,
    *,
    done: torch.Tensor | None = None,
    token_dones: torch.Tensor | None = None,
    one_episode_per_row: bool = False,
) -> torch.Tensor:
    """`d[b, t] = 1` where the episode really ends with action `a_t`: nothing after it counts (docs/DESIGN.md section 1).

    An action ends the episode when it emits EOS, when its row is marked `done` and it is the row's last action, or
    when `token_dones` flags the token it produces. A packed document ends with EOS (or a flag in `token_dones`), so
    its last action is terminal too. Padding never counts (it has no action), even when the pad token is the EOS
    token, as for GPT-2.

    With `one_episode_per_row` (rows that are not packed: each row is one episode, possibly of several turns) an EOS
    action ends the episode only when it is the row's last action: an EOS that closes an earlier turn (chat models
    whose EOS is the end-of-turn token, e.g. `<|im_end|>`) is followed by the rest of the same episode, so its return
    must see the later turns' rewards.

    Args:
        actions: `[B, T]` the token taken at each position (`next_tokens`).
        action_mask: `[B, T]` bool, where a position holds an action.
        eos_token_id: the EOS id(s); `None` for none.
        done: optional `[B]` bool, the row's `done` column: its last action ends the episode even without EOS (a
            completion cut at a generation limit whose reward judged it as finished).
        token_dones: optional `[B, T]` token-aligned flags, `token_dones[b, k]` set when producing token `k` ends the
            episode (a `done` folded into packed rows); `d_t = token_dones[t + 1]`.
        one_episode_per_row: EOS ends the episode only at the row's last action (unpacked rows); `False`: wherever
            it is emitted (packed rows).

    Returns:
        `[B, T]` float32, 1 where an episode ends, 0 elsewhere.
    """
    dones = torch.zeros_like(action_mask, dtype=torch.bool)
    if eos_token_id is not None:
        eos = torch.as_tensor(eos_token_id, device=actions.device).reshape(-1)
        emits_eos = torch.isin(actions, eos)
        dones |= (emits_eos & last_action_mask(action_mask)) if one_episode_per_row else emits_eos
    if done is not None:
        dones |= last_action_mask(action_mask) & done.to(device=action_mask.device, dtype=torch.bool)[:, None]
    if token_dones is not None:
        dones[:, :-1] |= token_dones[:, 1:].to(device=action_mask.device) != 0
    return (dones & action_mask.bool()).float()


def episode_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """`[B, T]` the index of the episode each position belongs to, in a packed batch whose `position_ids` restart at 0
    with each document (TRL's padding-free packing): 1 for the row's first document, 2 for the next, ..."""
    return (position_ids == 0).long().cumsum(dim=1)


def last_action_mask(action_mask: torch.Tensor, episode_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`True` at each row's last action (the rightmost position holding one); rows without an action get none. With
    `episode_ids` (`[B, T]`, packed rows), at the last action of each episode: an action whose next action in the row
    belongs to another episode, or that has none."""
    positions = torch.arange(action_mask.shape[1], device=action_mask.device)
    if episode_ids is None:
        return positions == last_action_index(action_mask)[:, None]
    act = action_mask.bool()
    T = act.shape[1]
    after = torch.full_like(positions.expand_as(act), T)
    after[:, :-1] = torch.where(act[:, 1:], positions[1:], T)
    next_action = after.flip(1).cummin(dim=1).values.flip(1)  # the next action's position, T when none
    next_episode = episode_ids.gather(1, next_action.clamp(max=T - 1))
    return act & ((next_action == T) | (next_episode != episode_ids))


def last_action_index(action_mask: torch.Tensor) -> torch.Tensor:
    """`(B,)` the position of each row's last action, -1 for a row without one."""
    if action_mask.shape[1] == 0:  # an empty grid: no row has an action
        return torch.full(action_mask.shape[:1], -1, dtype=torch.long, device=action_mask.device)
    positions = torch.arange(action_mask.shape[1], device=action_mask.device).expand_as(action_mask)
    return torch.where(action_mask.bool(), positions, -1).amax(dim=1)


def bootstrap_mask(action_mask: torch.Tensor, episode_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`True` at the state just after each row's (or, with `episode_ids`, each episode's) last action: where Monte
    Carlo returns need `V(s)`. An earlier run of actions of the same episode (a multi-turn row) does not bootstrap:
    its return goes on to the next action."""
    mask = torch.zeros_like(action_mask, dtype=torch.bool)
    mask[:, 1:] = last_action_mask(action_mask, episode_ids)[:, :-1]
    return mask


def value_mask(
    action_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    gae_lambda: float | None,
    episode_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(B, T)` bool, where `compute_returns` reads `V(s)`: each episode's bootstrap state for Monte Carlo returns
    (`gae_lambda` None or 1), every real state otherwise."""
    monte_carlo = gae_lambda is None or gae_lambda == 1
    return bootstrap_mask(action_mask, episode_ids) if monte_carlo else attention_mask.bool()


def token_rewards_to_actions(token_rewards: torch.Tensor) -> torch.Tensor:
    """Per-token rewards (`rewards[k]` is earned when token `k` is produced) onto the action grid: `r_t = rewards[t+1]`."""
    return tokens_to_actions(token_rewards.float())


def tokens_to_actions(columns: torch.Tensor) -> torch.Tensor:
    """A token-aligned `[B, T, ...]` column onto the action grid: entry `t + 1` (about the token action `a_t`
    produces) moves to position `t`; the last position gets zeros (it holds no action)."""
    shifted = torch.zeros_like(columns)
    shifted[:, :-1] = columns[:, 1:]
    return shifted


@dataclass
class StepGrid:
    """The `(B, T)` grid of one training batch (docs/DESIGN.md section 1), computed once per micro-batch.

    Args:
        actions: `a_t = x_{t+1}` (`next_tokens`).
        action_mask: bool, where position `t` holds a trained action (`action_mask_from_labels`).
        episodes: packed rows' document index per position (`episode_ids_from_positions`), `None` unpacked.
        values_needed: bool, where the returns read `V(s)` (`value_mask`).
    """

    actions: torch.Tensor
    action_mask: torch.Tensor
    episodes: torch.Tensor | None
    values_needed: torch.Tensor


def step_grid(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None,
    gae_lambda: float | None,
) -> StepGrid:
    """Actions, their mask, the packed episodes and where V is read, for one batch."""
    action_mask = action_mask_from_labels(labels, attention_mask)  # (B, T) bool
    episodes = None if position_ids is None else episode_ids_from_positions(position_ids)  # (B, T) or None
    return StepGrid(
        actions=next_tokens(input_ids),
        action_mask=action_mask,
        episodes=episodes,
        values_needed=value_mask(action_mask, attention_mask, gae_lambda, episodes),
    )


def fold_onto_actions(
    rewards: torch.Tensor, action_mask: torch.Tensor, episode_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Rewards on the action grid, with those of positions that hold no action moved onto the last action before them.

    Between two runs of actions (a multi-turn row) the tokens are the environment's moves: a reward earned on one of
    them is part of the transition that follows the agent's last action, so that action earns it. The same holds
    after the row's last action. Positions before the row's first action (the prompt) have no action to earn their
    rewards: they are dropped. Padding must hold 0 (the collator pads rewards with 0).

    Args:
        rewards: `[B, T]` rewards on the action grid (`r_t`, e.g. from `token_rewards_to_actions`).
        action_mask: `[B, T]` bool, where a position holds an action.
        episode_ids: optional `[B, T]` episode index per position (packed rows): a reward is only moved onto an
            action of its own episode (before a document's first action it is dropped, as before a row's).

    Returns:
        `[B, T]` float32, zero off the actions.
    """
    positions = torch.arange(action_mask.shape[1], device=action_mask.device).expand_as(action_mask)
    owner = torch.where(action_mask.bool(), positions, -1).cummax(dim=1).values  # the last action at or before t
    has_owner = owner >= 0
    if episode_ids is not None:
        has_owner &= episode_ids.gather(1, owner.clamp(min=0)) == episode_ids
    kept = torch.where(has_owner, rewards.float(), 0.0)
    return torch.zeros_like(kept).scatter_add_(1, owner.clamp(min=0), kept)


def sequence_rewards_to_actions(sequence_rewards: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """A scalar reward per row onto the row's last action: `r[b, t_last(b)] = R_b`, 0 elsewhere (docs/DESIGN.md section 2).

    Rows without an action, and NaN entries (no reward source applied to the row), get nothing.

    Args:
        sequence_rewards: `[B]` float.
        action_mask: `[B, T]` bool, where a position holds an action.
    """
    last = last_action_index(action_mask)
    rows = torch.arange(action_mask.shape[0], device=action_mask.device)
    keep = (last >= 0) & torch.isfinite(sequence_rewards)
    rewards = torch.zeros(action_mask.shape, dtype=torch.float32, device=action_mask.device)
    rewards[rows[keep], last[keep]] = sequence_rewards[keep].float()
    return rewards
