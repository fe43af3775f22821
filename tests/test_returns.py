"""Tests for trl_qhead.returns.compute_returns against a slow reference written straight from the formulas."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_qhead.returns import compute_returns

LAMBDAS = [None, 0.0, 0.3, 0.95, 1.0]
GAMMAS = [0.0, 0.5, 0.99, 1.0]


def reference_returns(rewards, values, mask, gamma, gae_lambda, dones):
    """Pure-Python lambda-returns, row by row, from the recursion in the module docstring: over the row's list of
    actions, each continuing to the next one in the list (wherever it sits), the last bootstrapping from t + 1."""
    lam = 1.0 if gae_lambda is None else gae_lambda
    out = [[0.0] * len(row) for row in rewards]
    for b, (r, v, m, d) in enumerate(zip(rewards, values, mask, dones, strict=True)):
        acts = [t for t, a in enumerate(m) if a]
        for i in range(len(acts) - 1, -1, -1):
            t = acts[i]
            if i == len(acts) - 1:
                g = r[t] + gamma * (1 - d[t]) * v[t + 1]
            else:
                p = acts[i + 1]
                g = r[t] + gamma * (1 - d[t]) * ((1 - lam) * v[p] + lam * out[b][p])
            out[b][t] = g
    return out


def action_runs(mask):
    """(first, last) action position of each row, or None for a row without actions."""
    runs = []
    for row in mask.tolist():
        acts = [t for t, a in enumerate(row) if a]
        runs.append((acts[0], acts[-1]) if acts else None)
    return runs


def random_batch(gen, B, T, p_done=0.1):
    """Rows mixing left padding (actions end at T-2), right padding (prompt, then actions) and no actions."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        kind = torch.randint(0, 3, (1,), generator=gen).item()
        n = torch.randint(1, T, (1,), generator=gen).item()  # 1..T-1 actions fit before the bootstrap state
        if kind == 0:  # left padded: bootstrap state is the last position
            mask[b, T - 1 - n : T - 1] = True
        elif kind == 1:  # right padded: prompt of random length, then actions, then padding
            start = torch.randint(0, T - n, (1,), generator=gen).item()
            mask[b, start : start + n] = True
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    dones = torch.rand(B, T, generator=gen, dtype=torch.float64) < p_done
    return rewards, values, mask, dones


@st.composite
def batches(draw, max_b=3, max_t=10):
    """Small float64 batches: each row has 0..T-1 contiguous actions starting anywhere (left/right padding)."""
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(2, max_t))
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        n = draw(st.integers(0, T - 1))
        start = draw(st.integers(0, T - 1 - n))
        mask[b, start : start + n] = True
    finite = st.floats(-10, 10, allow_nan=False)
    rewards = torch.tensor(draw(st.lists(finite, min_size=B * T, max_size=B * T)), dtype=torch.float64)
    values = torch.tensor(draw(st.lists(finite, min_size=B * T, max_size=B * T)), dtype=torch.float64)
    dones = torch.tensor(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T)))
    return rewards.view(B, T), values.view(B, T), mask, dones.view(B, T)


gammas = st.one_of(st.sampled_from(GAMMAS), st.floats(0, 1))
lambdas = st.one_of(st.sampled_from(LAMBDAS), st.floats(0, 1))


def random_multi_turn_batch(gen, B, T, p_done=0.1):
    """Rows whose actions come in several runs (a multi-turn completion mask) with gaps between them, padded on
    either side."""
    mask = torch.rand(B, T, generator=gen) < 0.5
    mask[:, -1] = False  # the last position never holds an action
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    dones = torch.rand(B, T, generator=gen, dtype=torch.float64) < p_done
    return rewards, values, mask, dones


@pytest.mark.parametrize("gae_lambda", LAMBDAS)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_matches_reference_on_multi_turn_rows(gamma, gae_lambda):
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        T = torch.randint(2, 40, (1,), generator=gen).item()
        rewards, values, mask, dones = random_multi_turn_batch(gen, 8, T)
        assert T < 8 or any(len(action_runs_of(row)) > 1 for row in mask.tolist())
        got = compute_returns(rewards, values, mask, gamma=gamma, gae_lambda=gae_lambda, dones=dones)
        want = reference_returns(
            rewards.tolist(), values.tolist(), mask.tolist(), gamma, gae_lambda, dones.long().tolist()
        )
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def action_runs_of(row):
    """The runs of consecutive actions of one row, as (first, last) pairs."""
    runs = []
    for t, a in enumerate(row):
        if a and (t == 0 or not row[t - 1]):
            runs.append([t, t])
        elif a:
            runs[-1][1] = t
    return runs


@pytest.mark.parametrize("gae_lambda", LAMBDAS)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_matches_reference_on_random_padded_batches(gamma, gae_lambda):
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        T = torch.randint(2, 40, (1,), generator=gen).item()
        rewards, values, mask, dones = random_batch(gen, 8, T)
        got = compute_returns(rewards, values, mask, gamma=gamma, gae_lambda=gae_lambda, dones=dones)
        want = reference_returns(
            rewards.tolist(), values.tolist(), mask.tolist(), gamma, gae_lambda, dones.long().tolist()
        )
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10)


@settings(max_examples=100, deadline=None)
@given(batch=batches(), gamma=gammas, garbage=st.booleans())
def test_lambda_one_is_discounted_sum_plus_bootstrap(batch, gamma, garbage):
    rewards, values, mask, _ = batch
    runs = action_runs(mask)
    if garbage:  # only the bootstrap state may be read
        keep = torch.zeros_like(mask)
        for b, run in enumerate(runs):
            if run is not None:
                keep[b, run[1] + 1] = True
        values = values.masked_fill(~keep, float("nan"))
    for gae_lambda in (None, 1.0):
        got = compute_returns(rewards, values, mask, gamma=gamma, gae_lambda=gae_lambda)
        want = torch.zeros_like(rewards)
        for b, run in enumerate(runs):
            if run is None:
                continue
            first, last = run
            for t in range(first, last + 1):
                discounted = sum(gamma ** (k - t) * rewards[b, k].item() for k in range(t, last + 1))
                want[b, t] = discounted + gamma ** (last + 1 - t) * values[b, last + 1].item()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(batch=batches(), gamma=gammas)
def test_lambda_zero_is_td0(batch, gamma):
    rewards, values, mask, dones = batch
    got = compute_returns(rewards, values, mask, gamma=gamma, gae_lambda=0.0, dones=dones)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    want = torch.where(mask, rewards + gamma * (~dones).double() * next_values, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(batch=batches(), gae_lambda=lambdas, use_dones=st.booleans())
def test_gamma_zero_gives_rewards(batch, gae_lambda, use_dones):
    rewards, values, mask, dones = batch
    got = compute_returns(rewards, values, mask, gamma=0.0, gae_lambda=gae_lambda, dones=dones if use_dones else None)
    assert torch.equal(got, torch.where(mask, rewards, 0.0))


@settings(max_examples=100, deadline=None)
@given(
    batch=batches(),
    other=st.lists(st.floats(-10, 10), min_size=30, max_size=30),
    a=st.floats(-3, 3),
    c=st.floats(-3, 3),
    gamma=gammas,
    gae_lambda=lambdas,
)
def test_linear_in_rewards_with_zero_values(batch, other, a, c, gamma, gae_lambda):
    r1, _, mask, dones = batch
    r2 = torch.tensor(other[: r1.numel()], dtype=torch.float64).view_as(r1)
    zeros = torch.zeros_like(r1)

    def G(r):
        return compute_returns(r, zeros, mask, gamma=gamma, gae_lambda=gae_lambda, dones=dones)

    torch.testing.assert_close(G(a * r1 + c * r2), a * G(r1) + c * G(r2), rtol=1e-9, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(batch=batches(), gamma=gammas, gae_lambda=lambdas, data=st.data())
def test_done_cuts_the_episode(batch, gamma, gae_lambda, data):
    rewards, values, mask, dones = batch
    rows = [b for b, run in enumerate(action_runs(mask)) if run is not None]
    if not rows:
        return
    b = data.draw(st.sampled_from(rows))
    first, last = action_runs(mask)[b]
    t = data.draw(st.integers(first, last))
    dones = dones.clone()
    dones[b, t] = True
    before = compute_returns(rewards, values, mask, gamma=gamma, gae_lambda=gae_lambda, dones=dones)
    assert before[b, t].item() == rewards[b, t].item()

    # Change everything after t in row b: rewards, values (to NaN) and dones.
    rewards, values = rewards.clone(), values.clone()
    rewards[b, t + 1 :] = rewards[b, t + 1 :] * 3 + 1
    values[b, t + 1 :] = float("nan")
    dones[b, t + 1 :] = ~dones[b, t + 1 :]
    after = compute_returns(rewards, values, mask, gamma=gamma, gae_lambda=gae_lambda, dones=dones)
    assert torch.equal(after[b, : t + 1], before[b, : t + 1])


@settings(max_examples=50, deadline=None)
@given(batch=batches(), gamma=gammas, gae_lambda=lambdas)
def test_zero_off_actions_and_ignores_garbage_there(batch, gamma, gae_lambda):
    rewards, values, mask, dones = batch
    got = compute_returns(rewards, values, mask, gamma=gamma, gae_lambda=gae_lambda, dones=dones)
    assert torch.all(got[~mask] == 0)
    # Rewards and dones at non-action positions are never read.
    noisy = compute_returns(
        rewards.masked_fill(~mask, float("nan")),
        values,
        mask,
        gamma=gamma,
        gae_lambda=gae_lambda,
        dones=dones | ~mask,
    )
    assert torch.equal(noisy, got)


def test_nan_values_off_bootstrap_with_lambda_one_is_exact():
    nan = float("nan")
    rewards = torch.tensor([[nan, 1.0, 2.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[nan, nan, nan, nan, 10.0, nan], [nan, nan, nan, nan, nan, 4.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]])  # right padded, left padded
    got = compute_returns(rewards, values, mask, gamma=0.5)
    want = torch.tensor(
        [
            [0.0, 1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 10, 2 + 0.5 * 3 + 0.25 * 10, 3 + 0.5 * 10, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1 + 0.5 * 1 + 0.25 * 4, 1 + 0.5 * 4, 0.0],
        ]
    )
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


def test_rows_without_actions_and_empty_grid_are_zero():
    got = compute_returns(torch.ones(2, 4), torch.ones(2, 4), torch.zeros(2, 4, dtype=torch.bool), gamma=0.9)
    assert torch.equal(got, torch.zeros(2, 4))
    empty = compute_returns(torch.ones(3, 0), torch.ones(3, 0), torch.ones(3, 0), gamma=0.9)
    assert empty.shape == (3, 0)


def test_several_runs_in_a_row_are_one_episode():
    rewards = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.0, 0.0, 5.0, 0.0, 7.0]])  # V(s_2) = 5 is never read: only the row's end bootstraps
    mask = torch.tensor([[1, 1, 0, 1, 0]])
    got = compute_returns(rewards, values, mask, gamma=0.5)
    g3 = 1 + 0.5 * 7
    assert torch.equal(got, torch.tensor([[1 + 0.5 * (1 + 0.5 * g3), 1 + 0.5 * g3, 0.0, g3, 0.0]]))


def test_mask_and_done_dtypes_agree():
    gen = torch.Generator().manual_seed(1)
    rewards, values, mask, dones = random_batch(gen, 6, 12, p_done=0.2)
    want = compute_returns(rewards, values, mask, gamma=0.9, gae_lambda=0.5, dones=dones)
    for dtype in (torch.long, torch.int32, torch.float32, torch.uint8):
        got = compute_returns(rewards, values, mask.to(dtype), gamma=0.9, gae_lambda=0.5, dones=dones.to(dtype))
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("r_dtype", "v_dtype", "out_dtype"),
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.float64, torch.float32, torch.float64),
        (torch.float32, torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float16, torch.float32, torch.float32),
        (torch.long, torch.float32, torch.float32),
        (torch.long, torch.long, torch.float32),
    ],
)
def test_output_dtype(r_dtype, v_dtype, out_dtype):
    mask = torch.tensor([[1, 1, 0]])
    got = compute_returns(torch.ones(1, 3, dtype=r_dtype), torch.ones(1, 3, dtype=v_dtype), mask, gamma=1.0)
    assert got.dtype == out_dtype
    assert got.tolist() == [[3.0, 2.0, 0.0]]


@pytest.mark.parametrize("gae_lambda", LAMBDAS)
def test_no_grad_flows(gae_lambda):
    rewards = torch.randn(2, 5, requires_grad=True)
    values = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    got = compute_returns(rewards * 2, values * 2, mask, gamma=0.9, gae_lambda=gae_lambda)
    assert not got.requires_grad
    assert got.grad_fn is None


def _ok():
    return torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]])


@pytest.mark.parametrize("gamma", [-0.1, 1.01, float("nan"), float("inf")])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="`gamma`"):
        compute_returns(*_ok(), gamma=gamma)


@pytest.mark.parametrize("gae_lambda", [-0.1, 1.5, float("nan")])
def test_bad_gae_lambda(gae_lambda):
    with pytest.raises(ValueError, match="`gae_lambda`"):
        compute_returns(*_ok(), gamma=0.9, gae_lambda=gae_lambda)


@pytest.mark.parametrize(
    ("field", "shape"), [("rewards", (8,)), ("rewards", (2, 4, 1)), ("values", (2, 5)), ("values", (8,))]
)
def test_bad_reward_value_shapes(field, shape):
    rewards, values, mask = _ok()
    kwargs = {"rewards": rewards, "values": values, "action_mask": mask}
    kwargs[field] = torch.zeros(shape)
    with pytest.raises(ValueError, match=f"`{field}`"):
        compute_returns(**kwargs, gamma=0.9)


@pytest.mark.parametrize("shape", [(2, 3), (8,), (1, 4)])
def test_bad_mask_and_dones_shapes(shape):
    rewards, values, mask = _ok()
    with pytest.raises(ValueError, match="`action_mask`"):
        compute_returns(rewards, values, torch.zeros(shape), gamma=0.9)
    with pytest.raises(ValueError, match="`dones`"):
        compute_returns(rewards, values, mask, gamma=0.9, dones=torch.zeros(shape))


def test_non_tensor_input():
    rewards, values, mask = _ok()
    with pytest.raises(ValueError, match="`values`"):
        compute_returns(rewards, values.tolist(), mask, gamma=0.9)


@pytest.mark.parametrize("bad", [float("nan"), math.inf, -math.inf])
def test_non_finite_rewards_at_actions(bad):
    rewards, values, mask = _ok()
    rewards[1, 2] = bad
    with pytest.raises(ValueError, match="`rewards`"):
        compute_returns(rewards, values, mask, gamma=0.9)
    rewards[1, 2] = 0.0
    rewards[1, 3] = bad  # not an action: ignored
    assert torch.isfinite(compute_returns(rewards, values, mask, gamma=0.9)).all()


def test_action_at_last_position_has_no_bootstrap_state():
    rewards, values, _ = _ok()
    with pytest.raises(ValueError, match="`action_mask`"):
        compute_returns(rewards, values, torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]]), gamma=0.9)
