"""Return targets (Monte Carlo, TD(0) and lambda-returns) for token-level value / Q learning.

The math, for one sequence with padding removed: tokens x_0..x_{n-1}, state s_t is position t, and the
action a_t = x_{t+1} sits at position t for t = 0..n-2. r_t is the reward of a_t, d_t = 1 where the episode
really ends with a_t (nothing after it counts), and V(s_t) is the value of state t. The last action
bootstraps from the state right after it:

    G_{n-2} = r_{n-2} + gamma * (1 - d_{n-2}) * V(s_{n-1})
    G_t     = r_t + gamma * (1 - d_t) * ((1 - lam) * V(s_{t+1}) + lam * G_{t+1})      for t < n-2

lam = 1 (the default, ``gae_lambda=None``) is Monte Carlo with a bootstrap at the end:
G_t = sum_{k=t}^{n-2} gamma^(k-t) r_k + gamma^(n-1-t) V(s_{n-1}) when no d_t is set; it reads V only at the
bootstrap state. lam = 0 is TD(0): G_t = r_t + gamma * (1 - d_t) * V(s_{t+1}). In between it is the
lambda-return, which equals GAE advantages plus values. The targets are constants: no gradient flows
through them.

A row with several runs of actions (a multi-turn completion mask) is one episode: the positions between two runs
hold the environment's moves, not actions, and are skipped, so above t + 1 reads "the position of the next action"
(G_t continues to it, V read at the state where it is taken). Only the row's last action bootstraps.

Soft returns (``beta`` set, DESIGN.md section 6): ``values`` holds the soft values
V*(s) = beta * log sum_a pi(a|s) exp(Q*(s, a) / beta) (``trl_qhead.soft.soft_state_values``) and the blend of the
bootstrap and the continuation happens in exp space:

    G_{n-2} = r_{n-2} + gamma * (1 - d_{n-2}) * V*(s_{n-1})
    G_t     = r_t + gamma * (1 - d_t) * beta * log((1 - lam) * exp(V*(s_{t+1}) / beta) + lam * exp(G_{t+1} / beta))

so that, on-policy (actions sampled from pi, the policy whose V* it is) and with gamma = 1,
E[exp(G_t / beta) | s_t, a_t] = exp(Q*(s_t, a_t) / beta) for every lam: the LINEX loss
(``trl_qhead.soft.linex_loss``) regressed on G_t is minimised by Q*. lam = 1 is the Monte Carlo return (the same
numbers as ``beta=None``), lam = 0 soft TD(0) r_t + gamma * (1 - d_t) * V*(s_{t+1}) (also the same numbers as
``beta=None``: only the values differ). With gamma < 1 and 0 < lam the exp-moment is biased low (Jensen:
E[X^gamma] <= E[X]^gamma), so only lam = 0 is consistent for the discounted soft Bellman equation
Q*(s, a) = r + gamma * (1 - d) * V*(s').
"""

import math

import torch

from .checks import check_beta
from .mdp import last_action_mask

__all__ = ["compute_returns"]


def _check_2d(name: str, x: torch.Tensor, shape: torch.Size | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"`{name}` must be 2-D [batch, seq_len], got shape {tuple(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"`{name}` must have the shape of `rewards` {tuple(shape)}, got {tuple(x.shape)}")


@torch.no_grad()
def compute_returns(
    rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    gamma: float,
    gae_lambda: float | None = None,
    dones: torch.Tensor | None = None,
    beta: float | None = None,
    episode_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Computes lambda-return targets G_t on the model's position grid.

    Every position t with ``action_mask[b, t]`` set holds an action. A row is one episode: each action continues
    to the row's next action, and only the row's last action bootstraps, from ``values[b, t + 1]``. Positions
    between two actions that hold none (several runs of actions in a row: a multi-turn completion mask, the
    tokens between the runs being the environment's moves) are skipped: an action at t whose next action is at
    p > t + 1 has ``G_t = r_t + gamma * (1 - d_t) * ((1 - lam) * V(s_p) + lam * G_p)``, ``s_p`` the state where
    the next action is taken (the environment's moves are part of the transition, and cost no discount).
    Rewards earned on those tokens must already be on the action before them (``mdp.fold_onto_actions``).

    Args:
        rewards: [B, T] reward r_t of the action at position t. Must be finite where ``action_mask`` is set;
            ignored elsewhere.
        values: [B, T] value V(s_t) of the state at position t. With ``gae_lambda`` None or 1 only the
            bootstrap positions (just after each row's last action) are read, so the rest may hold anything,
            NaN included.
        action_mask: [B, T] bool or 0/1 tensor, 1 where position t holds an action. Position T - 1 must not
            hold one, since its bootstrap state would be off the grid.
        gamma: discount factor in [0, 1].
        gae_lambda: lambda in [0, 1]; None means 1 (Monte Carlo with a bootstrap), 0 is TD(0).
        dones: optional [B, T] bool or 0/1 tensor, 1 where the episode ends with the action at t (no
            bootstrap, nothing after t counts). Defaults to all zeros: every row bootstraps at its end.
        beta: None (the default) for the ordinary lambda-return above. A finite float > 0 for the soft
            lambda-return of the module docstring, with ``values`` then holding the soft values V*(s_t); the blend
            is computed as ``m + beta * logaddexp(log(1 - lam) + (V - m) / beta, log(lam) + (G - m) / beta)`` with
            ``m = max(V, G)``, so no exponential is ever taken of a large number: it stays finite and accurate
            for small beta (0.05) and large returns (100). lam = 0 and lam = 1 skip the blend and give exactly
            the numbers of ``beta=None``.
        episode_ids: optional [B, T] episode index of each position, for rows that hold several episodes (packed
            documents, ``mdp.episode_ids_from_positions``): the last action of each episode bootstraps (from
            ``values[b, t + 1]``, unless done) instead of continuing into the next episode's first action. None:
            each row is one episode.

    Returns:
        [B, T] detached tensor of targets G_t, zero where ``action_mask`` is 0. Its dtype is the promotion of
        ``rewards``, ``values`` and float32 (float32 for int/half/bfloat16 inputs, float64 if either is
        float64); it lives on ``rewards.device``.

    Raises:
        ValueError: on a bad ``gamma`` / ``gae_lambda`` / ``beta`` (not finite and > 0), tensors that are not 2-D
            or whose shapes differ, non-finite ``rewards`` at action positions, or an ``action_mask`` action at
            position T - 1.

    Example:
        >>> rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
        >>> values = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
        >>> mask = torch.tensor([[0, 1, 1, 0]])  # one prompt token, two actions, bootstrap state at t=3
        >>> compute_returns(rewards, values, mask, gamma=0.5)
        tensor([[0.0000, 1.7500, 3.5000, 0.0000]])
    """
    if not 0.0 <= gamma <= 1.0:  # also rejects NaN
        raise ValueError(f"`gamma` must be in [0, 1], got {gamma}")
    if gae_lambda is not None and not 0.0 <= gae_lambda <= 1.0:
        raise ValueError(f"`gae_lambda` must be in [0, 1] or None, got {gae_lambda}")
    lam = 1.0 if gae_lambda is None else float(gae_lambda)
    if beta is not None:
        beta = check_beta(beta)
    _check_2d("rewards", rewards, None)
    _check_2d("values", values, rewards.shape)
    _check_2d("action_mask", action_mask, rewards.shape)
    if dones is not None:
        _check_2d("dones", dones, rewards.shape)
    if episode_ids is not None:
        _check_2d("episode_ids", episode_ids, rewards.shape)

    device = rewards.device
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    r = rewards.detach().to(device=device, dtype=dtype)
    v = values.detach().to(device=device, dtype=dtype)
    act = action_mask.detach().to(device) != 0
    done = torch.zeros_like(act) if dones is None else dones.detach().to(device) != 0
    if act[:, -1:].any():
        raise ValueError("`action_mask` has an action at the last position; its bootstrap state t+1 is missing")
    if (act & ~torch.isfinite(r)).any():
        raise ValueError("`rewards` must be finite at action positions (action_mask == 1)")

    B, T = r.shape
    # Only the row's (episode's) last action bootstraps from V(s_{t+1}); every other one continues to the next action.
    last = last_action_mask(act, None if episode_ids is None else episode_ids.to(device))
    if beta is not None and 0.0 < lam < 1.0:
        log_lam, log_keep = math.log(lam), math.log1p(-lam)
    returns = torch.zeros_like(r)
    g_next = r.new_zeros(B)  # G_p of the next action to the right, at p (carried across positions without one)
    v_next = r.new_zeros(B)  # V(s_p), the state where that next action is taken
    for t in range(T - 2, -1, -1):  # position T-1 holds no action (checked above)
        # torch.where, not arithmetic masking: with lam == 1 a NaN in an unread V must not leak in as 0 * NaN.
        if lam == 1.0:
            blend = g_next
        elif beta is None:
            blend = lam * g_next + (1.0 - lam) * v_next
        elif lam == 0.0:
            blend = v_next
        else:  # beta * log((1 - lam) exp(V/beta) + lam exp(G/beta)), shifted by the larger of the two
            m = torch.maximum(v_next, g_next)
            blend = m + beta * torch.logaddexp(log_keep + (v_next - m) / beta, log_lam + (g_next - m) / beta)
        cont = torch.where(last[:, t], v[:, t + 1], blend)
        g = r[:, t] + torch.where(done[:, t], 0.0, gamma * cont)
        returns[:, t] = torch.where(act[:, t], g, 0.0)
        g_next = torch.where(act[:, t], g, g_next)
        v_next = torch.where(act[:, t], v[:, t], v_next)
    return returns
