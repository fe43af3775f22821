"""Hostile inputs to the soft-target math (issue 27): LINEX at huge targets and tiny betas (a loss that fits in float32
is returned, checked against a float64 evaluation of the definition), mask weights that are negative or NaN, and
lookahead log-probs that are no distribution. Each gives the exact number or a ValueError naming the argument."""

import math

import pytest
import torch

from trl_qhead.soft import PROBABILITY_SUM_TOLERANCE, linex_loss, lookahead_soft_values

C = 20.0  # linex_loss's default max_exponent


def linex_reference(q: float, target: float, beta: float, c: float = C) -> float:
    """`beta^2 (exp(u) - u - 1)`, `u = (target - q) / beta`, the exponential continued by its tangent beyond `c`, from
    the definition in Python floats (float64: `u` up to 1e308 fits)."""
    u = (target - q) / beta
    if u <= c:
        return beta**2 * (math.expm1(u) - u) if abs(u) > 1e-3 else beta**2 * (u * u / 2 + u**3 / 6 + u**4 / 24)
    return beta**2 * (math.expm1(c) - c + math.expm1(c) * (u - c))


def linex_gradient_reference(q: float, target: float, beta: float, c: float = C) -> float:
    """d/dq of `linex_reference`: `beta (1 - exp(min(u, c)))`."""
    u = (target - q) / beta
    return -beta * math.expm1(min(u, c))


@pytest.mark.parametrize(
    "q,target,beta",
    [
        (0.0, 1e30, 1e-2),  # the case: u = 1e32, the loss ~4.9e36
        (0.0, 1e30, 1e-3),
        (0.0, 1e33, 1e-6),  # u = 1e39 overflows float32 itself
        (0.0, -1e37, 1e-3),  # u = -1e40: the linear side, from beta * target
        (5.0, -3e38, 1e-9),  # near float32's limit, tiny beta
        (0.0, 3e38, 1e-12),
        (1e38, -1e38, 1e-3),  # target - q = -2e38 still fits
    ],
)
def test_linex_returns_a_huge_loss_that_fits_in_float32(q, target, beta):
    expected = linex_reference(q, target, beta)
    assert expected < torch.finfo(torch.float32).max
    qs = torch.tensor([q], requires_grad=True)
    loss = linex_loss(qs, torch.tensor([target]), beta, torch.ones(1, dtype=torch.bool), reduction="sum")
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert qs.grad.item() == pytest.approx(linex_gradient_reference(q, target, beta), rel=1e-5)


def test_linex_is_inf_only_where_the_loss_does_not_fit():
    # q = 0, target = 1e38, beta = 0.01: about 4.85e44, beyond float32: inf is the honest answer
    assert linex_reference(0.0, 1e38, 1e-2) > torch.finfo(torch.float32).max
    loss = linex_loss(torch.zeros(1), torch.tensor([1e38]), 1e-2, torch.ones(1))
    assert loss.item() == math.inf


def test_linex_mean_of_two_huge_losses_does_not_overflow_through_its_sum():
    # each loss ~2.4e38 (fits), their sum ~4.8e38 (does not): the mean must be the loss itself
    target = 5e29
    expected = linex_reference(0.0, target, 1.0)
    assert expected < torch.finfo(torch.float32).max < 2 * expected
    loss = linex_loss(torch.zeros(2), torch.full((2,), target), 1.0, torch.ones(2))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("beta", [1e-3, 0.1, 1.0, 30.0])
def test_linex_over_a_grid_of_exponents_matches_the_float64_definition(beta):
    us = [-1e6, -150.0, -99.0, -20.0, -1.0, -0.09, -1e-4, 0.0, 1e-4, 0.05, 0.11, 1.0, 19.0, 21.0, 1e3, 1e8]
    q = torch.zeros(len(us), dtype=torch.float64)
    target = torch.tensor(us, dtype=torch.float64) * beta
    got = linex_loss(q, target, beta, torch.ones(len(us)), reduction="none")
    for u, value in zip(us, got.tolist(), strict=True):
        assert value == pytest.approx(linex_reference(0.0, u * beta, beta), rel=1e-9, abs=1e-300), u


@pytest.mark.parametrize("bad", [-1.0, -1e-8, math.nan, math.inf])
def test_linex_refuses_negative_or_non_finite_mask_weights(bad):
    mask = torch.tensor([1.0, bad, 0.5])
    with pytest.raises(ValueError, match="`mask` holds .* at position \\(1,\\)"):
        linex_loss(torch.zeros(3), torch.ones(3), 0.5, mask)


def test_linex_refuses_a_negative_integer_mask_and_keeps_valid_weights():
    with pytest.raises(ValueError, match="`mask`"):
        linex_loss(torch.zeros(2), torch.ones(2), 0.5, torch.tensor([1, -1]))
    # 0 / positive float weights: the weighted mean of the per-position losses
    weights = torch.tensor([0.0, 2.0, 0.5])
    per = [linex_reference(0.0, 1.0, 0.5)] * 3
    loss = linex_loss(torch.zeros(3), torch.ones(3), 0.5, weights)
    assert loss.item() == pytest.approx((2.0 * per[1] + 0.5 * per[2]) / 2.5, rel=1e-6)


# ---- lookahead_soft_values: a distribution over distinct next tokens ------------------------------------------------


@pytest.mark.parametrize(
    "log_probs",
    [
        torch.zeros(3),  # the case: probabilities 1 + 1 + 1
        torch.log(torch.tensor([0.6, 0.6])),
        torch.log(torch.tensor([[0.5, 0.2], [0.9, 0.2]])),  # the second row sums to 1.1
    ],
)
def test_lookahead_refuses_probabilities_that_sum_above_one(log_probs):
    with pytest.raises(ValueError, match="sum to at most 1"):
        lookahead_soft_values(log_probs, torch.zeros_like(log_probs), 0.5)


@pytest.mark.parametrize(
    "log_probs,message",
    [(torch.tensor([math.nan, -1.0]), "not NaN"), (torch.tensor([0.5, -3.0]), "<= 0")],
)
def test_lookahead_refuses_log_probs_that_are_not_log_probabilities(log_probs, message):
    with pytest.raises(ValueError, match=message):
        lookahead_soft_values(log_probs, torch.zeros(2), 0.5)


@pytest.mark.parametrize("effect", [math.nan, math.inf, -math.inf])
def test_lookahead_refuses_non_finite_effects(effect):
    with pytest.raises(ValueError, match="`effects` must be finite"):
        lookahead_soft_values(torch.log(torch.tensor([0.5, 0.25])), torch.tensor([0.0, effect]), 0.5)


def test_lookahead_accepts_a_full_distribution_and_rounding_within_the_tolerance():
    beta, effects = 0.5, torch.tensor([1.0, -2.0])
    for probs in ([0.5, 0.5], [0.5, 0.5 + PROBABILITY_SUM_TOLERANCE / 2]):
        value = lookahead_soft_values(torch.log(torch.tensor(probs, dtype=torch.float64)), effects, beta).item()
        total = sum(probs)  # a sum above 1 is rounding: the probabilities are read as summing to 1
        expected = beta * math.log(
            sum(p / total * math.exp(e / beta) for p, e in zip(probs, [1.0, -2.0], strict=True))
        )
        assert value == pytest.approx(expected, rel=1e-9)
    # -inf log-probs (probability 0) are fine: the rest of the mass counts with effect 0
    value = lookahead_soft_values(torch.tensor([-math.inf, math.log(0.25)]), effects, beta).item()
    assert value == pytest.approx(beta * math.log(0.25 * math.exp(-4.0) + 0.75), rel=1e-6)


# ---- attack round: betas at float32's ends, empty inputs, infinite targets ----------------------------------------


@pytest.mark.parametrize(
    "q,target,beta",
    [
        (0.0, 1.0, 1e30),  # u = 1e-30: the series; beta^2 = 1e60 overflows float32, the loss is d^2 / 2 = 0.5
        (0.0, 1.5e19, 5e19),  # u = 0.3: beta^2 (e^u - u - 1) ~ 1.2e38 fits, beta^2 does not
        (0.0, 1.0, 1e-30),  # u = 1e30: the linear rise only
        (2.0, -1.0, 1e-30),  # u = -3e30
    ],
)
def test_linex_at_betas_near_float32s_ends_matches_the_definition(q, target, beta):
    qs = torch.tensor([q], requires_grad=True)
    loss = linex_loss(qs, torch.tensor([target]), beta, torch.ones(1), reduction="sum")
    assert loss.item() == pytest.approx(linex_reference(q, target, beta), rel=1e-5)
    loss.backward()
    assert qs.grad.item() == pytest.approx(linex_gradient_reference(q, target, beta), rel=1e-5, abs=1e-30)


def test_linex_of_nothing_is_zero_with_a_gradient():
    q = torch.zeros(0, requires_grad=True)
    for reduction in ("mean", "sum"):
        loss = linex_loss(q, torch.zeros(0), 0.5, torch.zeros(0, dtype=torch.bool), reduction=reduction)
        assert loss.item() == 0.0 and loss.requires_grad
    q = torch.zeros(3, requires_grad=True)  # every position masked out: 0, whatever they hold
    loss = linex_loss(q, torch.tensor([math.nan, math.inf, -math.inf]), 0.5, torch.zeros(3))
    loss.backward()
    assert loss.item() == 0.0 and q.grad.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("target", [math.inf, -math.inf])
def test_linex_of_an_infinite_target_is_infinite_not_nan(target):
    loss = linex_loss(torch.zeros(2), torch.tensor([0.0, target]), 0.5, torch.ones(2))
    assert loss.item() == math.inf


def test_lookahead_over_no_tokens_is_zero():
    value = lookahead_soft_values(torch.zeros(2, 0), torch.zeros(2, 0), 0.5)
    assert value.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("beta", [1e-40, 1e-30, 1e-6])
def test_lookahead_at_a_tiny_beta_is_the_best_effect_or_zero(beta):
    # beta -> 0: max(0, max_b r') while the top-k leave mass outside them, max_b r' when they hold it all
    log_probs = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5], [0.5, 0.25]]))
    effects = torch.tensor([[1.0, 3.0], [-1.0, -2.0], [-1.0, -2.0]])
    value = lookahead_soft_values(log_probs, effects, beta)
    assert value[0].item() == pytest.approx(3.0, rel=1e-5)
    assert value[1].item() == pytest.approx(-1.0, rel=1e-5)  # no rest: the best of the two
    assert value[2].item() == pytest.approx(0.0, abs=1e-4)  # the rest (effect 0) beats both


def test_lookahead_at_a_huge_beta_is_the_mean_effect():
    log_probs, effects = torch.log(torch.tensor([0.5, 0.25])), torch.tensor([1.0, 3.0])
    value = lookahead_soft_values(log_probs, effects, 1e30).item()
    assert value == pytest.approx(0.5 * 1.0 + 0.25 * 3.0, rel=1e-5)
