"""Soft-optimal Q (DESIGN.md section 6) checked to the letter on a problem small enough to enumerate.

The problem: a few tokens, a horizon of 2-3 actions, a fixed random policy `pi(a|s)` given as an explicit table over
every prefix, token 0 (optionally) an EOS that ends the episode, and random rewards: a per-step reward for every
transition plus a reward on each whole sequence, paid with its last action. Everything "true" here (Q^pi, Q*, V*, the
KL-optimal sequence distribution) comes from slow, obvious enumerations over whole sequences in plain Python floats;
the library's tensor functions are then held against them. float64 throughout.
"""

from __future__ import annotations

import itertools
import math
import random
from decimal import Decimal, getcontext

import pytest
import torch

from trl_qhead.returns import compute_returns
from trl_qhead.soft import (
    candidate_targets,
    chunked_soft_state_values,
    linex_loss,
    lookahead_soft_values,
    prefix_shaped_rewards,
    soft_state_values,
)

# --------------------------------------------------------------------------------------------------------------------
# The enumerable problem
# --------------------------------------------------------------------------------------------------------------------


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [x / sum(e) for x in e]


def _soft_mean(ps, gs, beta):
    """beta * log sum_i p_i exp(g_i / beta), shifted by the max so small beta does not overflow."""
    m = max(g for p, g in zip(ps, gs, strict=True) if p > 0)
    return m + beta * math.log(sum(p * math.exp((g - m) / beta) for p, g in zip(ps, gs, strict=True)))


class Tree:
    """Token MDP: the state is the prefix (a tuple of tokens; the prompt is the empty tuple)."""

    def __init__(self, seed, K=3, N=3, eos=0, policy="prefix", step_scale=0.5, final_scale=2.0, pi_scale=1.5):
        rng = random.Random(seed)
        self.K, self.N, self.eos = K, N, eos
        self.states = [s for n in range(N) for s in itertools.product(range(K), repeat=n) if not self._ends(s)]
        by_position = [_softmax([rng.gauss(0, pi_scale) for _ in range(K)]) for _ in range(N)]
        self.pi = {
            s: by_position[len(s)] if policy == "position" else _softmax([rng.gauss(0, pi_scale) for _ in range(K)])
            for s in self.states
        }
        self.step = {(s, a): rng.gauss(0, step_scale) for s in self.states for a in range(K)}
        self.final = {y: rng.gauss(0, final_scale) for y in self.sequences_from(())}

    def _ends(self, s):
        """True if the prefix contains a finished episode (EOS somewhere, or N actions)."""
        return len(s) >= self.N or (self.eos is not None and self.eos in s)

    def terminal(self, y):
        return len(y) == self.N or (self.eos is not None and y[-1] == self.eos)

    def reward(self, s, a):
        y = s + (a,)
        return self.step[(s, a)] + (self.final[y] if self.terminal(y) else 0.0)

    def sequences_from(self, prefix):
        """Every complete sequence extending `prefix` (a non-terminal state, or a terminal sequence itself)."""
        if prefix and self.terminal(prefix):
            return [prefix]
        return [y for a in range(self.K) for y in self.sequences_from(prefix + (a,))]

    def prob(self, y, start):
        """pi(y[start:] | y[:start]): the probability of the actions from position `start` on."""
        return math.prod(self.pi[y[:k]][y[k]] for k in range(start, len(y)))

    def ret(self, y, t):
        """Undiscounted return from action t on."""
        return sum(self.reward(y[:k], y[k]) for k in range(t, len(y)))

    def outcomes(self, s, a):
        """(probability, return from len(s) on) over the complete continuations of (s, a)."""
        t = len(s)
        ys = self.sequences_from(s + (a,))
        return [self.prob(y, t + 1) for y in ys], [self.ret(y, t) for y in ys]

    def q_mean(self, s, a):
        ps, gs = self.outcomes(s, a)
        return sum(p * g for p, g in zip(ps, gs, strict=True))

    def q_soft(self, s, a, beta):
        ps, gs = self.outcomes(s, a)
        return _soft_mean(ps, gs, beta)

    def v_soft(self, s, beta):
        """beta log E_pi[exp(G_0 / beta)] over the whole sequences from state s (no Q involved)."""
        ys = self.sequences_from(s)
        return _soft_mean([self.prob(y, len(s)) for y in ys], [self.ret(y, len(s)) for y in ys], beta)

    def tilted(self, q):
        """Sequence distribution of sampling token by token from pi(a|s) exp(q(s, a)) / Z(s) (q already over beta)."""
        out = {}
        for y in self.sequences_from(()):
            p = 1.0
            for k in range(len(y)):
                s = y[:k]
                logits = [math.log(self.pi[s][a]) + q(s, a) for a in range(self.K)]
                p *= _softmax(logits)[y[k]]
            out[y] = p
        return out

    def kl_optimum(self, beta):
        """pi(y) exp(R(y) / beta) / Z over whole sequences, R(y) the total return."""
        ys = self.sequences_from(())
        logw = [math.log(self.prob(y, 0)) + self.ret(y, 0) / beta for y in ys]
        return dict(zip(ys, _softmax(logw), strict=True))

    def rollouts(self, cut):
        """Sequences sampled from the prompt and stopped after `cut` actions: (sequence, probability, done at end)."""
        out = []
        for y in self.sequences_from(()):
            z = y[:cut]
            if z not in [o[0] for o in out]:
                out.append((z, self.prob(z, 0), self.terminal(z)))
        return out


def total_variation(p, q):
    return 0.5 * sum(abs(p[y] - q[y]) for y in p)


def grid(tree, rows, values_fn=None, left_pad=None, garbage=float("nan")):
    """Rows on the position grid: position 0 is the prompt state, action t at position t, bootstrap state after.

    Returns rewards, values, action_mask, dones [B, T] (float64) and the start position of each row. Padding holds
    `garbage` (rewards, values) so that any read of it shows up; values at terminal states are garbage too.
    """
    T = max(len(y) for y in rows) + 2
    B = len(rows)
    rewards = torch.full((B, T), garbage, dtype=torch.float64)
    values = torch.full((B, T), garbage, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    dones = torch.zeros(B, T, dtype=torch.bool)
    starts = []
    for b, y in enumerate(rows):
        left = (b % 2 == 1) if left_pad is None else left_pad
        start = T - 1 - len(y) if left else 1 if b % 3 == 0 else 0  # a "prompt" position of padding sometimes
        starts.append(start)
        for k in range(len(y)):
            mask[b, start + k] = True
            rewards[b, start + k] = tree.reward(y[:k], y[k])
            dones[b, start + k] = tree.terminal(y[: k + 1])
        if values_fn is not None:
            for k in range(len(y) + 1):
                if not (k and tree.terminal(y[:k])):
                    values[b, start + k] = values_fn(y[:k])
    return rewards, values, mask, dones, starts


BETAS = [0.1, 1.0, 4.0]


# --------------------------------------------------------------------------------------------------------------------
# (a) soft Bellman form, and soft_state_values against whole-sequence enumeration
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("seed", [0, 1])
def test_soft_bellman_form_holds_on_the_enumeration(seed, beta):
    tree = Tree(seed, K=3, N=3)
    for s in tree.states:
        for a in range(tree.K):
            s2 = s + (a,)
            if tree.terminal(s2):
                want = tree.reward(s, a)
            else:
                want = tree.reward(s, a) + _soft_mean(
                    tree.pi[s2], [tree.q_soft(s2, b, beta) for b in range(tree.K)], beta
                )
            assert abs(tree.q_soft(s, a, beta) - want) < 1e-10
        # V* two ways: from Q* and the policy, and from whole sequences.
        from_q = _soft_mean(tree.pi[s], [tree.q_soft(s, b, beta) for b in range(tree.K)], beta)
        assert abs(from_q - tree.v_soft(s, beta)) < 1e-10
        # Jensen: Q* >= Q^pi, strictly somewhere (the problem is not degenerate).
        assert all(tree.q_soft(s, a, beta) >= tree.q_mean(s, a) - 1e-12 for a in range(tree.K))
    gap = max(tree.q_soft(s, a, beta) - tree.q_mean(s, a) for s in tree.states for a in range(tree.K))
    assert gap > 1e-3


@pytest.mark.parametrize("beta", BETAS)
def test_soft_state_values_equals_whole_sequence_soft_value(beta):
    tree = Tree(3, K=4, N=3)
    gen = torch.Generator().manual_seed(0)
    # logits are log pi plus an arbitrary per-state offset: only log_softmax(logits) may matter.
    logits = torch.tensor([[math.log(p) for p in tree.pi[s]] for s in tree.states], dtype=torch.float64)
    logits = logits + 10 * torch.randn(len(tree.states), 1, generator=gen, dtype=torch.float64)
    q = torch.tensor([[tree.q_soft(s, a, beta) for a in range(tree.K)] for s in tree.states], dtype=torch.float64)
    got = soft_state_values(logits, q, beta)
    want = torch.tensor([tree.v_soft(s, beta) for s in tree.states], dtype=torch.float64)
    assert got.shape == (len(tree.states),)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # And on a [B, T, V] layout.
    got3 = soft_state_values(
        logits.view(1, -1, tree.K).expand(2, -1, -1), q.view(1, -1, tree.K).expand(2, -1, -1), beta
    )
    torch.testing.assert_close(got3, want.expand(2, -1), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------------------------------
# (b) tilting with Q* reproduces the KL-optimal sequence distribution; tilting with Q^pi does not
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tilt_with_soft_q_is_the_kl_optimum_and_mean_q_is_not(seed, beta):
    tree = Tree(seed, K=3, N=3)
    target = tree.kl_optimum(beta)
    soft = tree.tilted(lambda s, a: tree.q_soft(s, a, beta) / beta)
    mean = tree.tilted(lambda s, a: tree.q_mean(s, a) / beta)
    assert abs(sum(soft.values()) - 1) < 1e-12
    assert total_variation(soft, target) < 1e-6
    assert total_variation(mean, target) > 1e-3


@pytest.mark.parametrize("beta", [0.3, 2.0])
def test_tilt_with_q_built_by_backward_induction_on_soft_state_values(beta):
    """Q*(s, a) = r + V*(s') with V* from `soft_state_values` only (no whole-sequence enumeration) is the optimum."""
    tree = Tree(4, K=4, N=3)
    q = {}
    for s in sorted(tree.states, key=len, reverse=True):
        for a in range(tree.K):
            s2 = s + (a,)
            v_next = 0.0
            if not tree.terminal(s2):
                logits = torch.tensor([math.log(p) for p in tree.pi[s2]], dtype=torch.float64)
                qs = torch.tensor([q[(s2, b)] for b in range(tree.K)], dtype=torch.float64)
                v_next = soft_state_values(logits, qs, beta).item()
            q[(s, a)] = tree.reward(s, a) + v_next
    tilted = tree.tilted(lambda s, a: q[(s, a)] / beta)
    assert total_variation(tilted, tree.kl_optimum(beta)) < 1e-9


# --------------------------------------------------------------------------------------------------------------------
# (c) the LINEX population minimiser is Q*
# --------------------------------------------------------------------------------------------------------------------


def linex_minimiser(ys, ps, beta, **kwargs):
    """argmin_q sum_i p_i linex(q, y_i) by bisection on the autograd derivative (the loss is convex in q)."""
    ys = torch.tensor(ys, dtype=torch.float64)
    ps = torch.tensor(ps, dtype=torch.float64)

    def slope(q0):
        q = torch.tensor(q0, dtype=torch.float64, requires_grad=True)
        linex_loss(q.expand_as(ys), ys, beta, ps, **kwargs).backward()
        return q.grad.item()

    lo, hi = ys.min().item() - 1.0, ys.max().item() + 1.0
    assert slope(lo) < 0 < slope(hi)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if slope(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("beta", [0.05, 0.5, 3.0])
def test_linex_population_minimiser_is_soft_q(beta):
    tree = Tree(5, K=3, N=3)
    far_from_mean = 0.0
    for s in tree.states:
        for a in range(tree.K):
            ps, gs = tree.outcomes(s, a)
            got = linex_minimiser(gs, ps, beta)
            assert abs(got - tree.q_soft(s, a, beta)) < 1e-9, (s, a)
            far_from_mean = max(far_from_mean, abs(got - tree.q_mean(s, a)))
    assert far_from_mean > 1e-2  # the squared error's minimiser (the mean) would fail this test


def test_linex_clamp_changes_the_minimiser_only_for_samples_rarer_than_exp_minus_max_exponent():
    beta = 0.1
    ys, ps = [0.0, 10.0], [1 - 1e-12, 1e-12]  # the rare sample's u at the optimum is log(1e12) ~ 27.6
    exact = _soft_mean(ps, ys, beta)
    assert abs(linex_minimiser(ys, ps, beta, max_exponent=40.0) - exact) < 1e-9
    assert linex_minimiser(ys, ps, beta, max_exponent=20.0) < exact - 0.1  # capped pull: biased low
    # Shares of at least exp(-20) are exact even with the default clamp.
    ys, ps = [0.0, 10.0], [1 - 1e-8, 1e-8]
    assert abs(linex_minimiser(ys, ps, beta) - _soft_mean(ps, ys, beta)) < 1e-9


# --------------------------------------------------------------------------------------------------------------------
# (d) soft lambda-returns: E[exp(G_t / beta)] = exp(Q* / beta) for every lambda when gamma = 1
# --------------------------------------------------------------------------------------------------------------------


def soft_moment_by_state_action(tree, rows, returns, starts, beta):
    """beta log E[exp(G_t / beta) | s, a] over the rows, weighting each row by its continuation's probability."""
    groups = {}
    for b, y in enumerate(rows):
        for k in range(len(y)):
            p = tree.prob(y, k + 1)
            groups.setdefault((y[:k], y[k]), []).append((p, returns[b, starts[b] + k].item()))
    return {sa: _soft_mean([p for p, _ in pg], [g for _, g in pg], beta) for sa, pg in groups.items()}


@pytest.mark.parametrize("cut", [3, 2])  # 3: every row ends; 2: rows cut after two actions bootstrap from V*
@pytest.mark.parametrize("gae_lambda", [None, 0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("beta", [0.2, 1.0, 3.0])
def test_soft_lambda_returns_are_consistent_for_gamma_one(beta, gae_lambda, cut):
    tree = Tree(6, K=3, N=3)
    rows = [z for z, _, _ in tree.rollouts(cut)]
    rewards, values, mask, dones, starts = grid(tree, rows, values_fn=lambda s: tree.v_soft(s, beta))
    got = compute_returns(rewards, values, mask, gamma=1.0, gae_lambda=gae_lambda, dones=dones, beta=beta)
    assert torch.isfinite(got[mask]).all() and torch.all(got[~mask] == 0)
    moments = soft_moment_by_state_action(tree, rows, got, starts, beta)
    assert len(moments) == sum(1 for s in tree.states if len(s) < cut) * tree.K
    for (s, a), m in moments.items():
        assert abs(m - tree.q_soft(s, a, beta)) < 1e-10, (s, a)
    if gae_lambda == 0.0:  # soft TD(0): exactly r + V*(s'), row by row
        for b, y in enumerate(rows):
            for k in range(len(y)):
                s2 = y[: k + 1]
                want = tree.reward(y[:k], y[k]) + (0.0 if tree.terminal(s2) else tree.v_soft(s2, beta))
                assert abs(got[b, starts[b] + k].item() - want) < 1e-12


@pytest.mark.parametrize("beta", [0.2, 1.0])
def test_mean_blended_lambda_returns_are_not_soft_consistent(beta):
    """The control for the test above: the ordinary lambda-return with V* values misses Q* (so that test can fail)."""
    tree = Tree(6, K=3, N=3)
    rows = [z for z, _, _ in tree.rollouts(3)]
    rewards, values, mask, dones, starts = grid(tree, rows, values_fn=lambda s: tree.v_soft(s, beta))
    got = compute_returns(rewards, values, mask, gamma=1.0, gae_lambda=0.5, dones=dones)
    moments = soft_moment_by_state_action(tree, rows, got, starts, beta)
    assert max(abs(m - tree.q_soft(s, a, beta)) for (s, a), m in moments.items()) > 1e-3


def test_soft_lambda_returns_with_gamma_below_one_are_consistent_only_for_lambda_zero():
    """With gamma < 1 the discounted soft Q is Q(s, a) = r + gamma V(s'), V(s) = beta log E_pi exp(Q(s, .) / beta).

    Soft TD(0) hits it exactly; lambda > 0 is biased low by Jensen (E[X^gamma] <= E[X]^gamma).
    """
    beta, gamma = 0.5, 0.8
    tree = Tree(7, K=3, N=3)
    q, v = {}, {}
    for s in sorted(tree.states, key=len, reverse=True):
        for a in range(tree.K):
            s2 = s + (a,)
            q[(s, a)] = tree.reward(s, a) + (0.0 if tree.terminal(s2) else gamma * v[s2])
        v[s] = _soft_mean(tree.pi[s], [q[(s, a)] for a in range(tree.K)], beta)
    rows = [z for z, _, _ in tree.rollouts(3)]
    rewards, values, mask, dones, starts = grid(tree, rows, values_fn=lambda s: v[s])
    for lam, consistent in [(0.0, True), (0.5, False), (1.0, False)]:
        got = compute_returns(rewards, values, mask, gamma=gamma, gae_lambda=lam, dones=dones, beta=beta)
        moments = soft_moment_by_state_action(tree, rows, got, starts, beta)
        errors = [m - q[sa] for sa, m in moments.items()]
        if consistent:
            assert max(abs(e) for e in errors) < 1e-12
        else:
            assert max(errors) < 1e-12 and min(errors) < -1e-3


# --------------------------------------------------------------------------------------------------------------------
# (e) prefix shaping shifts Q^pi and Q* by a per-state constant: the tilt is unchanged
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.3, 1.0])
@pytest.mark.parametrize("seed", [0, 8])
def test_prefix_shaping_shifts_q_by_a_per_state_constant(seed, beta):
    tree = Tree(seed, K=3, N=3, step_scale=0.0)  # the reward is R(y), paid at the end
    rng = random.Random(seed + 100)
    phi = {s: rng.gauss(0, 2.0) for s in tree.states}  # R on the (non-terminal) prefixes

    def score(prefix):
        return tree.final[prefix] if prefix and tree.terminal(prefix) else phi[prefix]

    rows = tree.sequences_from(())
    _, _, mask, _, starts = grid(tree, rows)
    scores = torch.full(mask.shape, float("nan"), dtype=torch.float64)  # padding: never read
    for b, y in enumerate(rows):
        for k in range(len(y) + 1):
            scores[b, starts[b] + k] = score(y[:k])
    shaped = prefix_shaped_rewards(scores, mask)
    assert torch.isfinite(shaped).all() and torch.all(shaped[~mask] == 0)
    step = {}
    for b, y in enumerate(rows):
        # Telescoping: the row's rewards sum to R(y) minus the score of the prompt (empty completion).
        assert abs(shaped[b].sum().item() - (tree.final[y] - phi[()])) < 1e-12
        for k in range(len(y)):
            step.setdefault((y[:k], y[k]), set()).add(shaped[b, starts[b] + k].item())
    assert all(len(v) == 1 for v in step.values())  # a function of (s, a) only

    shaped_tree = Tree(seed, K=3, N=3, step_scale=0.0)
    shaped_tree.step = {sa: next(iter(v)) for sa, v in step.items()}
    shaped_tree.final = dict.fromkeys(tree.final, 0.0)
    for s in tree.states:
        for a in range(tree.K):
            assert abs(shaped_tree.q_mean(s, a) - (tree.q_mean(s, a) - phi[s])) < 1e-12
            assert abs(shaped_tree.q_soft(s, a, beta) - (tree.q_soft(s, a, beta) - phi[s])) < 1e-12
    for kind in ("q_soft", "q_mean"):
        args = (beta,) if kind == "q_soft" else ()
        before = tree.tilted(lambda s, a, kind=kind, args=args: getattr(tree, kind)(s, a, *args) / beta)
        after = shaped_tree.tilted(lambda s, a, kind=kind, args=args: getattr(shaped_tree, kind)(s, a, *args) / beta)
        assert total_variation(before, after) < 1e-9
    # The shaped values differ from the unshaped ones (so the equalities above are not about unchanged numbers).
    assert max(abs(shaped_tree.q_mean(s, 0) - tree.q_mean(s, 0)) for s in tree.states) > 0.1


def test_prefix_shaped_rewards_on_the_grid():
    nan = float("nan")
    scores = torch.tensor([[nan, 1.0, 3.0, 2.5, 7.0, nan], [nan, nan, 0.5, 1.5, 4.0, -1.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]])  # right padded (a prompt), left padded
    got = prefix_shaped_rewards(scores, mask)
    want = torch.tensor([[0.0, 2.0, -0.5, 4.5, 0.0, 0.0], [0.0, 0.0, 0.0, 2.5, -5.0, 0.0]])
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="last position"):
        prefix_shaped_rewards(scores, torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        prefix_shaped_rewards(scores[0], mask[0])


# --------------------------------------------------------------------------------------------------------------------
# (f) candidate targets
# --------------------------------------------------------------------------------------------------------------------


def _candidate_errors(tree, beta):
    """E[candidate target | s, a_t] - Q(s, a) for every state, sampled action and candidate (mean and soft)."""
    rows = tree.sequences_from(())
    rewards, values, mask, dones, starts = grid(tree, rows)
    G = compute_returns(rewards, values, mask, gamma=1.0, dones=dones)  # every row ends: V is never read
    B, T = G.shape
    effects = torch.zeros(B, T, tree.K, dtype=torch.float64)
    sampled = torch.zeros(B, T, dtype=torch.float64)
    for b, y in enumerate(rows):
        for k in range(len(y)):
            effects[b, starts[b] + k] = torch.tensor(
                [tree.reward(y[:k], a) for a in range(tree.K)], dtype=torch.float64
            )
            sampled[b, starts[b] + k] = tree.reward(y[:k], y[k])
    targets = candidate_targets(G, effects, sampled)
    assert targets.shape == (B, T, tree.K)
    groups = {}
    for b, y in enumerate(rows):
        for k in range(len(y)):
            groups.setdefault((y[:k], y[k]), []).append((tree.prob(y, k + 1), targets[b, starts[b] + k]))
    mean_err, soft_err, explained = [], [], []
    for (s, a_t), pts in groups.items():
        ps = [p for p, _ in pts]
        for a in range(tree.K):
            xs = [x[a].item() for _, x in pts]
            mean = sum(p * x for p, x in zip(ps, xs, strict=True))
            mean_err.append(mean - tree.q_mean(s, a))
            soft_err.append(_soft_mean(ps, xs, beta) - tree.q_soft(s, a, beta))
            # The precise statement: the error is E[C | s, a_t] - E[C | s, a], C the return after step t.
            c_sampled = tree.q_mean(s, a_t) - tree.reward(s, a_t)
            c_candidate = tree.q_mean(s, a) - tree.reward(s, a)
            explained.append(mean_err[-1] - (c_sampled - c_candidate))
    return mean_err, soft_err, explained


def test_candidate_targets_are_exact_when_the_future_does_not_depend_on_the_choice():
    # Additive token rewards (each step's reward depends only on its position and token), a policy that depends only
    # on the position, no EOS: the continuation's return C has the same distribution whatever token is chosen.
    tree = Tree(9, K=3, N=3, eos=None, policy="position", final_scale=0.0)
    for s in tree.states:  # make the step reward a function of (position, token) only
        for a in range(tree.K):
            tree.step[(s, a)] = tree.step[(tuple([0] * len(s)), a)]
    mean_err, soft_err, explained = _candidate_errors(tree, beta=0.5)
    assert max(map(abs, mean_err)) < 1e-12
    assert max(map(abs, soft_err)) < 1e-12
    assert max(map(abs, explained)) < 1e-12


def test_candidate_targets_miss_q_when_the_future_depends_on_the_choice():
    # Same additive rewards, but the policy (hence the continuation) depends on the prefix, and EOS ends episodes.
    tree = Tree(9, K=3, N=3, eos=0, policy="prefix", final_scale=0.0)
    for s in tree.states:
        for a in range(tree.K):
            tree.step[(s, a)] = tree.step[(tuple([1] * len(s)), a)]
    mean_err, _, explained = _candidate_errors(tree, beta=0.5)
    assert max(map(abs, mean_err)) > 1e-2
    assert max(map(abs, explained)) < 1e-12  # ... by exactly E[C | s, a_t] - E[C | s, a]


def test_candidate_targets_shapes_and_sampled_candidate():
    G = torch.tensor([[1.0, 2.0, 0.0]])
    sampled = torch.tensor([[0.5, -1.0, 0.0]])
    effects = torch.tensor([[[0.5, 1.5], [-1.0, 0.0], [3.0, 4.0]]])
    got = candidate_targets(G, effects, sampled)
    assert torch.equal(got, torch.tensor([[[1.0, 2.0], [2.0, 3.0], [3.0, 4.0]]]))
    with pytest.raises(ValueError, match="candidate_effects"):
        candidate_targets(G, effects[..., 0], sampled)


# --------------------------------------------------------------------------------------------------------------------
# (g) stability: small beta, large returns
# --------------------------------------------------------------------------------------------------------------------

getcontext().prec = 60


def decimal_soft_returns(rewards, values, mask, dones, gamma, lam, beta):
    """The soft lambda-return straight from the formula, in 60-digit decimals (exp(2000) is no problem there)."""
    lam, gamma, beta = Decimal(lam), Decimal(gamma), Decimal(beta)
    out = [[0.0] * len(r) for r in rewards]
    for b, (r, v, m, d) in enumerate(zip(rewards, values, mask, dones, strict=True)):
        acts = [t for t, x in enumerate(m) if x]
        g_next = None
        for t in reversed(acts):
            if d[t]:
                g = Decimal(r[t])
            elif t == acts[-1]:
                g = Decimal(r[t]) + gamma * Decimal(v[t + 1])
            else:
                inner = (1 - lam) * (Decimal(v[t + 1]) / beta).exp() + lam * (g_next / beta).exp()
                g = Decimal(r[t]) + gamma * beta * inner.ln()
            out[b][t] = float(g)
            g_next = g
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("gae_lambda", [0.05, 0.5, 0.95])
def test_soft_returns_are_stable_for_small_beta_and_large_returns(gamma, gae_lambda):
    gen = torch.Generator().manual_seed(1)
    B, T = 6, 12
    rewards = (torch.rand(B, T, generator=gen, dtype=torch.float64) * 90 + 10) * torch.sign(torch.randn(B, T))
    values = torch.rand(B, T, generator=gen, dtype=torch.float64) * 90 + 10
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        start = b % 3
        mask[b, start : T - 1 - (b % 2) * 2] = True
    dones = torch.rand(B, T, generator=gen) < 0.15
    beta = 0.05
    want = torch.tensor(
        decimal_soft_returns(
            rewards.tolist(), values.tolist(), mask.tolist(), dones.tolist(), gamma, gae_lambda, beta
        ),
        dtype=torch.float64,
    )
    got64 = compute_returns(rewards, values, mask, gamma=gamma, gae_lambda=gae_lambda, dones=dones, beta=beta)
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-10)
    got32 = compute_returns(
        rewards.float(), values.float(), mask, gamma=gamma, gae_lambda=gae_lambda, dones=dones, beta=beta
    )
    assert got32.dtype == torch.float32 and torch.isfinite(got32).all()
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-3)


def test_soft_returns_match_the_decimal_reference_on_random_batches():
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        B, T = 4, int(torch.randint(2, 10, (1,), generator=gen))
        rewards = torch.randn(B, T, generator=gen, dtype=torch.float64) * 3
        values = torch.randn(B, T, generator=gen, dtype=torch.float64) * 3
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):
            n = int(torch.randint(0, T, (1,), generator=gen))
            start = int(torch.randint(0, T - n, (1,), generator=gen))
            mask[b, start : start + n] = True
        dones = torch.rand(B, T, generator=gen) < 0.2
        gamma = float(torch.rand(1, generator=gen))
        lam = float(torch.rand(1, generator=gen))
        beta = float(torch.rand(1, generator=gen)) * 3 + 0.05
        got = compute_returns(rewards, values, mask, gamma=gamma, gae_lambda=lam, dones=dones, beta=beta)
        want = decimal_soft_returns(rewards.tolist(), values.tolist(), mask.tolist(), dones.tolist(), gamma, lam, beta)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_soft_state_values_are_stable_for_small_beta():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 7, 50, generator=gen, dtype=torch.float64) * 3
    q = torch.rand(5, 7, 50, generator=gen, dtype=torch.float64) * 90 + 10
    beta = 0.05
    log_pi = torch.log_softmax(logits, -1)
    b = Decimal(beta)
    want = [
        float(b * sum((Decimal(lp) + Decimal(x) / b).exp() for lp, x in zip(lrow, qrow, strict=True)).ln())
        for lrow, qrow in zip(log_pi.view(-1, 50).tolist(), q.view(-1, 50).tolist(), strict=True)
    ]
    want = torch.tensor(want, dtype=torch.float64).view(5, 7)
    torch.testing.assert_close(soft_state_values(logits, q, beta), want, rtol=1e-13, atol=1e-12)
    got32 = soft_state_values(logits.float(), q.float(), beta)
    assert got32.dtype == torch.float32 and torch.isfinite(got32).all()
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-3)


def test_linex_is_finite_for_small_beta_and_large_errors():
    beta = 0.05
    q = torch.tensor([0.0, 0.0, 100.0, -100.0, 5.0], requires_grad=True)
    y = torch.tensor([100.0, -100.0, 0.0, 100.0, 5.0])
    loss = linex_loss(q, y, beta, torch.ones(5, dtype=torch.bool), reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()
    c = 20.0
    bounded = -beta * math.expm1(c)  # beyond the clamp the slope stays beta (1 - exp(c))
    torch.testing.assert_close(q.grad, torch.tensor([bounded, beta, beta, bounded, 0.0]), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# linex_loss: values, gradient, limits, masks
# --------------------------------------------------------------------------------------------------------------------


def test_linex_value_and_gradient_match_the_formula():
    gen = torch.Generator().manual_seed(4)
    for beta in (0.05, 0.3, 1.0, 7.0):
        q0 = torch.randn(200, generator=gen, dtype=torch.float64) * 2
        # Errors spanning |u| < 0.1 (the series branch), moderate u, and both signs, all below the clamp.
        y = q0 + beta * torch.linspace(-19.0, 19.0, 200, dtype=torch.float64) * torch.rand(200, generator=gen)
        q = q0.clone().requires_grad_(True)
        loss = linex_loss(q, y, beta, torch.ones(200, dtype=torch.bool), reduction="none")
        # The reference in 60-digit decimals: in floats exp(u) - u - 1 cancels for small u.
        want = [float(Decimal(beta) ** 2 * (Decimal(u).exp() - Decimal(u) - 1)) for u in ((y - q0) / beta).tolist()]
        torch.testing.assert_close(loss.detach(), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
        loss.sum().backward()
        want_grad = beta * (1 - torch.exp((y - q0) / beta))
        torch.testing.assert_close(q.grad, want_grad, rtol=1e-9, atol=1e-12)


def test_linex_tends_to_half_squared_error_as_beta_grows():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(50, generator=gen, dtype=torch.float64)
    y = torch.randn(50, generator=gen, dtype=torch.float64) * 3
    mask = torch.ones(50, dtype=torch.bool)
    half_mse = (0.5 * (y - q) ** 2).mean()
    errors = [abs(linex_loss(q, y, beta, mask).item() - half_mse.item()) / half_mse.item() for beta in (1e1, 1e2, 1e4)]
    assert errors[0] > 1e-3  # not the squared error at moderate beta
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3
    # In float32 too: the series branch keeps the small-u loss accurate.
    rel32 = abs(linex_loss(q.float(), y.float(), 1e4, mask).item() - half_mse.item()) / half_mse.item()
    assert rel32 < 1e-3


def test_linex_masks_weights_and_reductions():
    nan = float("nan")
    q = torch.tensor([[0.0, 1.0, nan], [2.0, nan, 0.5]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 3.0], [nan, 1.0, 0.5]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    beta = 0.7

    def one(qi, yi):
        u = (yi - qi) / beta
        return beta**2 * (math.exp(u) - u - 1)

    per = [one(0.0, 1.0), one(1.0, 0.0), one(0.5, 0.5)]
    mean = linex_loss(q, y, beta, mask)
    assert abs(mean.item() - sum(per) / 3) < 1e-12
    mean.backward()
    assert torch.isfinite(q.grad).all() and q.grad[0, 2] == 0 and q.grad[1, 1] == 0
    assert abs(linex_loss(q, y, beta, mask, reduction="sum").item() - sum(per)) < 1e-12
    none = linex_loss(q, y, beta, mask, reduction="none")
    assert none[0, 2] == 0 and none[1, 0] == 0 and abs(none[0, 0].item() - per[0]) < 1e-12
    weights = torch.tensor([[0.25, 0.5, 0.0], [0.0, 0.0, 0.25]], dtype=torch.float64)
    got = linex_loss(q, y, beta, weights).item()
    assert abs(got - (0.25 * per[0] + 0.5 * per[1] + 0.25 * per[2])) < 1e-12
    assert linex_loss(q, y, beta, torch.zeros_like(mask)).item() == 0.0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            linex_loss(q, y, bad, mask)
    with pytest.raises(ValueError, match="reduction"):
        linex_loss(q, y, beta, mask, reduction="max")
    with pytest.raises(ValueError, match="same shape"):
        linex_loss(q, y[0], beta, mask)


# --------------------------------------------------------------------------------------------------------------------
# soft_state_values: limits; the chunked variant; compute_returns(beta=...) basics
# --------------------------------------------------------------------------------------------------------------------


def test_soft_state_values_limits_and_masked_tokens():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    q = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    mean = (torch.softmax(logits, -1) * q).sum(-1)
    assert torch.all(soft_state_values(logits, q, 1.0) > mean)  # Jensen, strict for non-constant q
    torch.testing.assert_close(soft_state_values(logits, q, 1e7), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(soft_state_values(logits, q, 1e-4), q.max(-1).values, rtol=0, atol=1e-2)
    # A token with logit -inf (pi = 0) does not count, however large its Q.
    masked_logits, big_q = logits.clone(), q.clone()
    masked_logits[:, 0], big_q[:, 0] = -float("inf"), 1e6
    rest = soft_state_values(logits[:, 1:], q[:, 1:], 0.5)
    torch.testing.assert_close(soft_state_values(masked_logits, big_q, 0.5), rest)
    with pytest.raises(ValueError, match="same shape"):
        soft_state_values(logits, q[:, :3], 1.0)
    with pytest.raises(ValueError, match="beta"):
        soft_state_values(logits, q, 0.0)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunked_soft_state_values_match_the_dense_computation(chunk_size):
    gen = torch.Generator().manual_seed(7)
    B, T, H, V = 3, 6, 5, 11
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    wz, bz = torch.randn(V, H, generator=gen, dtype=torch.float64), torch.randn(V, generator=gen, dtype=torch.float64)
    wq, bq = torch.randn(V, H, generator=gen, dtype=torch.float64), torch.randn(V, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) < 0.5
    mask[0, 0] = True
    beta = 0.3
    logits = hidden @ wz.T + bz
    dense = soft_state_values(logits, hidden @ wq.T + bq, beta)
    want = torch.where(mask, dense, 0.0)
    # Unread positions may hold NaN.
    nan_hidden = hidden.masked_fill(~mask[..., None], float("nan"))
    nan_logits = logits.masked_fill(~mask[..., None], float("nan"))
    from_logits = chunked_soft_state_values(
        nan_hidden, mask, beta, q_weight=wq, q_bias=bq, logits=nan_logits, chunk_size=chunk_size
    )
    fused = chunked_soft_state_values(
        nan_hidden, mask, beta, q_weight=wq, q_bias=bq, lm_weight=wz, lm_bias=bz, chunk_size=chunk_size
    )
    torch.testing.assert_close(from_logits, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused, want, rtol=1e-12, atol=1e-12)
    no_bias = chunked_soft_state_values(hidden, mask, beta, q_weight=wq, lm_weight=wz, chunk_size=chunk_size)
    torch.testing.assert_close(no_bias, torch.where(mask, soft_state_values(hidden @ wz.T, hidden @ wq.T, beta), 0.0))
    with pytest.raises(ValueError, match="exactly one"):
        chunked_soft_state_values(hidden, mask, beta, q_weight=wq, logits=logits, lm_weight=wz)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_soft_state_values(hidden, mask, beta, q_weight=wq, lm_weight=wz, chunk_size=0)


def test_soft_returns_with_lambda_zero_or_one_are_bit_identical_to_the_ordinary_ones():
    gen = torch.Generator().manual_seed(8)
    rewards = torch.randn(5, 9, generator=gen)
    values = torch.randn(5, 9, generator=gen)
    mask = torch.zeros(5, 9, dtype=torch.bool)
    mask[:, 1:7] = True
    mask[2, 7] = True
    dones = torch.rand(5, 9, generator=gen) < 0.2
    for lam in (None, 0.0, 1.0):
        plain = compute_returns(rewards, values, mask, gamma=0.9, gae_lambda=lam, dones=dones)
        soft = compute_returns(rewards, values, mask, gamma=0.9, gae_lambda=lam, dones=dones, beta=0.1)
        assert torch.equal(plain, soft)
    # In between they differ (the soft blend is above the linear one: log-sum-exp >= mean).
    plain = compute_returns(rewards, values, mask, gamma=1.0, gae_lambda=0.5, dones=dones)
    soft = compute_returns(rewards, values, mask, gamma=1.0, gae_lambda=0.5, dones=dones, beta=0.5)
    assert torch.all(soft >= plain - 1e-6) and (soft - plain).max() > 1e-2
    # As beta -> inf the soft blend tends to the linear one.
    far = compute_returns(rewards.double(), values.double(), mask, gamma=1.0, gae_lambda=0.5, dones=dones, beta=1e6)
    torch.testing.assert_close(far, plain.double(), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "bad, error",
    [(0.0, ValueError), (-0.5, ValueError), (float("nan"), ValueError), (float("inf"), ValueError)]
    + [(-float("inf"), ValueError), ("one", TypeError), ([1.0], TypeError), (True, TypeError)],
)
def test_compute_returns_rejects_a_bad_beta(bad, error):
    rewards = torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(error, match="`beta`"):
        compute_returns(rewards, rewards, mask, gamma=1.0, gae_lambda=0.5, beta=bad)


def test_chunked_soft_state_values_with_low_precision_heads():
    """A bf16 LM head is used as it is (no fp32 copy of the weight); the result is fp32 and close to the fp64 value."""
    gen = torch.Generator().manual_seed(9)
    B, T, H, V = 2, 5, 8, 13
    hidden = torch.randn(B, T, H, generator=gen).to(torch.bfloat16)
    wz = torch.randn(V, H, generator=gen).to(torch.bfloat16)
    wq, bq = torch.randn(V, H, generator=gen), torch.randn(V, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    got = chunked_soft_state_values(hidden, mask, 0.5, q_weight=wq, q_bias=bq, lm_weight=wz, chunk_size=4)
    assert got.dtype == torch.float32
    h64 = hidden.double()
    want = soft_state_values(h64 @ wz.double().T, h64 @ wq.double().T + bq.double(), 0.5)
    torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.05)


def test_lookahead_soft_values_equal_the_sum_over_next_tokens_and_stay_finite_at_small_beta():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 6), dim=-1)[:, :4]  # the top 4 of 6 tokens: 2 left outside
    effects = torch.randn(3, 4)
    for beta in (2.0, 0.5, 0.1):
        expected = [
            beta * math.log(sum(p * math.exp(e / beta) for p, e in zip(row_p, row_e, strict=True)) + 1 - sum(row_p))
            for row_p, row_e in zip(probs.tolist(), effects.tolist(), strict=True)
        ]
        got = lookahead_soft_values(probs.log(), effects, beta)
        assert got.shape == (3,) and got.tolist() == pytest.approx(expected, abs=1e-5)
    # beta 0.05 with effects of 10: exp(200) overflows float32 in the direct sum, the logsumexp does not
    small = lookahead_soft_values(probs.log(), 10.0 * effects, 0.05)
    assert torch.isfinite(small).all()
    assert small.tolist() == pytest.approx((10.0 * effects).amax(-1).clamp_min(0).tolist(), abs=0.2)
    # the whole vocabulary in the top-k: nothing outside, the plain soft value
    full = torch.softmax(torch.randn(6), dim=-1)
    values = torch.randn(6)
    assert lookahead_soft_values(full.log(), values, 0.3).item() == pytest.approx(
        0.3 * math.log((full * torch.exp(values / 0.3)).sum().item()), abs=1e-5
    )
    with pytest.raises(ValueError, match="one shape"):
        lookahead_soft_values(probs.log(), effects[:, :3], 0.3)
    with pytest.raises(ValueError, match="beta"):
        lookahead_soft_values(probs.log(), effects, 0.0)
