"""Best-of-N's exact KL (`best_of_n_kl(n, rewards)`), the frontier on it, and the bootstrap interval of the mean gain
ratio, against enumeration of every n-tuple of draws and problems with a known answer."""

import itertools
import math
import random

import pytest
import torch

from trl_qhead import evaluation
from trl_qhead.rollouts import Samples

DISCRETE = [
    [0.0, 0.0, 1.0, 2.0, 2.0, 2.0],  # three levels, ties at both ends
    [1.0, 1.0, 1.0, 3.0],  # a point mass below one sample
    [-0.5, 0.3, 0.3, 0.3, 0.3],  # a point mass on top
    [0.1, 0.2, 0.3],  # distinct
    [7.0],
]


def _enumerate_best_of_n(rewards, n, ties="uniform"):
    """The probability of each sample index under best-of-n, by enumerating all `m^n` equally likely n-tuples of
    draws; among draws tied at the maximum, `ties="uniform"` spreads the pick evenly, `"first"` keeps the first drawn
    (what `best_of_n_indices` does within a group)."""
    m = len(rewards)
    probs = [0.0] * m
    for draw in itertools.product(range(m), repeat=n):
        top = max(rewards[i] for i in draw)
        tied = [i for i in draw if rewards[i] == top]
        if ties == "first":
            probs[tied[0]] += 1 / m**n
        else:
            for i in tied:
                probs[i] += 1 / (len(tied) * m**n)
    return probs


@pytest.mark.parametrize("rewards", DISCRETE)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_exact_kl_matches_enumeration_of_every_n_tuple(rewards, n):
    m = len(rewards)
    probs = _enumerate_best_of_n(rewards, n)
    assert _enumerate_best_of_n(rewards, n, ties="first") == pytest.approx(probs, abs=1e-12)  # the table's tie rule
    # the KL over samples (the base policy puts 1/m on each) is the KL over levels: ties share a level evenly
    expected = sum(p * math.log(p * m) for p in probs if p > 0)
    assert evaluation.best_of_n_kl(n, [rewards]) == pytest.approx(expected, abs=1e-12)
    levels, q, p = evaluation.best_of_n_levels(rewards, n)
    assert levels == sorted(set(rewards))
    for level, q_r, p_r in zip(levels, q, p, strict=True):
        members = [i for i in range(m) if rewards[i] == level]
        assert q_r == pytest.approx(len(members) / m)
        assert p_r == pytest.approx(sum(probs[i] for i in members), abs=1e-12)
        assert [probs[i] for i in members] == pytest.approx([p_r / len(members)] * len(members), abs=1e-12)


def test_the_mean_over_prompts_and_the_per_prompt_values():
    per_prompt = evaluation.best_of_n_kl_per_prompt(3, DISCRETE)
    assert per_prompt == pytest.approx([evaluation.best_of_n_kl(3, [r]) for r in DISCRETE])
    assert evaluation.best_of_n_kl(3, DISCRETE) == pytest.approx(sum(per_prompt) / len(DISCRETE))
    assert len(set(per_prompt)) > 2  # the prompts differ: a mean of one value would not test the averaging
    # the order of the samples does not matter, nor the container
    shuffled = [random.Random(i).sample(r, len(r)) for i, r in enumerate(DISCRETE)]
    assert evaluation.best_of_n_kl_per_prompt(3, shuffled) == pytest.approx(per_prompt, abs=1e-15)
    assert evaluation.best_of_n_kl(3, torch.tensor([DISCRETE[0], DISCRETE[0]])) == pytest.approx(per_prompt[0])


def test_distinct_rewards_approach_the_bound_from_below_as_samples_accumulate():
    rng = random.Random(0)
    for n in (2, 4, 16):
        bound = evaluation.best_of_n_kl(n)
        previous = 0.0
        for m in (16, 64, 256, 2048):
            rewards = [rng.gauss(0, 1) for _ in range(m)]
            kl = evaluation.best_of_n_kl(n, [rewards])
            assert previous < kl < bound
            previous = kl
        assert kl == pytest.approx(bound, abs=2e-4)


def test_one_draw_and_total_ties_cost_nothing_and_ties_cost_kl():
    rewards = [[0.3, -1.0, 2.0, 0.0], [0.5, 0.5, 0.5]]
    assert evaluation.best_of_n_kl(1, rewards) == 0.0
    assert evaluation.best_of_n_kl(16, [[0.5] * 16, [-2.0] * 3]) == 0.0
    assert evaluation.best_of_n_kl(1) == 0.0
    # a point mass at the top: best-of-4 cannot move far from the base policy
    tied_top = evaluation.best_of_n_kl(4, [[0.0] * 4 + [1.0] * 12])
    assert 0 < tied_top < evaluation.best_of_n_kl(4, [list(range(16))]) < evaluation.best_of_n_kl(4)


@pytest.mark.parametrize(
    ("n", "rewards", "error", "match"),
    [
        (0, None, ValueError, "`n` must be a positive integer"),
        (2.0, None, ValueError, "`n` must be a positive integer"),
        (True, [[1.0]], ValueError, "`n` must be a positive integer"),
        (2, [], ValueError, "one list of base-sample rewards per prompt"),
        (2, [[1.0], []], ValueError, r"`rewards\[1\]` is empty"),
        (2, [[1.0, float("nan")]], ValueError, r"`rewards\[0\]\[1\]` is nan"),
        (2, [[1.0], [0.0, float("inf")]], ValueError, r"`rewards\[1\]\[1\]` is inf"),
        (2, [[1.0, "0.5"]], TypeError, r"`rewards\[0\]\[1\]` must be a real number"),
        (2, [[1.0, None]], TypeError, r"`rewards\[0\]\[1\]` must be a real number"),
        (2, [1.0, 2.0], TypeError, r"`rewards\[0\]` must be a list of rewards"),
    ],
)
def test_bad_inputs_are_named(n, rewards, error, match):
    with pytest.raises(error, match=match):
        evaluation.best_of_n_kl(n, rewards)


def _samples(rewards_per_prompt, kl=None, prompts=None) -> Samples:
    k = len(rewards_per_prompt[0])
    rewards = [r for prompt in rewards_per_prompt for r in prompt]
    return Samples(
        prompts=prompts or [f"p{i}" for i in range(len(rewards_per_prompt))],
        num_samples=k,
        prompt_ids=[[1]] * len(rewards_per_prompt),
        completion_ids=[[2]] * len(rewards),
        texts=["a b"] * len(rewards),
        kl=kl,
        seconds=1.0,
        rewards=rewards,
        nll=[2.0] * len(rewards),
        n_tokens=[2] * len(rewards),
    )


TIED_BASE = [[0.0] * 10 + [0.1 * i for i in range(1, 7)], [0.0] * 4 + [0.05 * i - 0.3 for i in range(12)]]


def test_best_of_n_rows_carry_the_exact_kl_and_the_bound():
    rows = evaluation.base_and_best_of_n_rows(_samples(TIED_BASE))
    assert rows[0].method == "base sampling" and rows[0].kl == 0.0 and rows[0].kl_bound is None
    for row, n in zip(rows[1:], evaluation.BEST_OF_NS, strict=True):
        assert row.setting == f"N={n}"
        assert row.kl == pytest.approx(evaluation.best_of_n_kl(n, TIED_BASE))
        assert row.kl_bound == pytest.approx(math.log(n) - (n - 1) / n)
        assert row.kl < row.kl_bound  # the ties pull best-of-N left
    table = evaluation.markdown_table(rows)
    header, rule, base, *best = table.splitlines()
    assert "| KL to base (nats) | KL bound (nats) |" in header
    assert all(line.count("|") == 11 for line in table.splitlines())
    assert base.split("|")[5] == "  " and best[-1].split("|")[5].strip() == f"{math.log(16) - 15 / 16:.3f}"
    assert "KL bound" not in evaluation.markdown_table(rows[:1])


def test_the_comparison_reads_the_exact_curve_by_default_and_the_bound_on_request():
    def row(method, setting, kl, reward, kl_bound=None):
        return evaluation.FrontierRow(method, setting, reward, 0.0, kl, 1, 0.0, 1.0, 10.0, 1, None, kl_bound)

    rows = [
        row("base sampling", "", 0.0, 0.1),
        row("best-of-N", "N=2", 0.2, 0.3, kl_bound=0.4),
        row("best-of-N", "N=4", 0.6, 0.5, kl_bound=1.0),
        row("Q-tilted", "beta=1", 0.4, 0.3),
    ]
    (exact,) = evaluation.frontier_comparison(rows)
    (bound,) = evaluation.frontier_comparison(rows, best_of_n_curve="bound")
    assert exact["best_of_n_at_kl"] == pytest.approx(0.4) and exact["gain_ratio"] == pytest.approx(0.2 / 0.3)
    assert bound["best_of_n_at_kl"] == pytest.approx(0.3) and bound["gain_ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="best_of_n_curve"):
        evaluation.frontier_comparison(rows, best_of_n_curve="upper")


def test_the_plot_draws_both_curves(tmp_path):
    pytest.importorskip("matplotlib")
    rows = evaluation.base_and_best_of_n_rows(_samples(TIED_BASE))
    rows.append(evaluation.tilted_row(_samples([[0.2, 0.4], [0.1, 0.3]], kl=[0.3, 0.2, 0.4, 0.1]), 0.5))
    evaluation.plot_frontier(rows, tmp_path / "f.png", "title")
    assert (tmp_path / "f.png").stat().st_size > 1000


# ---- the bootstrap interval --------------------------------------------------------------------------------------


def _table_ratio(base, tilted, curve="exact"):
    rows = evaluation.base_and_best_of_n_rows(base)
    rows += [evaluation.tilted_row(s, float(setting.split("=")[1])) for setting, s in tilted.items()]
    return evaluation.mean_gain_ratio(evaluation.frontier_comparison(rows, curve), (0.2, 1.5))


def _random_problem(num_prompts, seed, tilt_kl=(0.5, 1.0), tilt_mean=(0.7, 0.8), per_prompt=16, tilted_k=4):
    """Base rewards uniform on [0, 1] rounded to 2 decimals (a few ties), tilted rewards normal, their KLs
    exponential with the given means."""
    g = random.Random(seed)
    base = _samples([[round(g.random(), 2) for _ in range(per_prompt)] for _ in range(num_prompts)])
    tilted = {}
    for kl, mean in zip(tilt_kl, tilt_mean, strict=True):
        rewards = [[g.gauss(mean, 0.3) for _ in range(tilted_k)] for _ in range(num_prompts)]
        kls = [g.expovariate(1 / kl) for _ in range(num_prompts * tilted_k)]
        tilted[f"beta={kl}"] = _samples(rewards, kl=kls)
    return base, tilted


def test_the_estimate_is_the_table_s_ratio_and_a_seed_fixes_the_interval():
    base, tilted = _random_problem(12, seed=1)
    for curve in ("exact", "bound"):
        interval = evaluation.bootstrap_gain_ratio(base, tilted, best_of_n_curve=curve, n_boot=300, seed=3)
        assert interval.estimate == pytest.approx(_table_ratio(base, tilted, curve), abs=1e-12)
        assert interval.low < interval.estimate < interval.high
        assert interval.n_boot == 300 and interval.n_defined == 300 and interval.confidence == 0.95
        again = evaluation.bootstrap_gain_ratio(base, tilted, best_of_n_curve=curve, n_boot=300, seed=3)
        assert again == interval
        other = evaluation.bootstrap_gain_ratio(base, tilted, best_of_n_curve=curve, n_boot=300, seed=4)
        assert (other.low, other.high) != (interval.low, interval.high)
    narrow = evaluation.bootstrap_gain_ratio(base, tilted, n_boot=300, confidence=0.5, seed=3)
    wide = evaluation.bootstrap_gain_ratio(base, tilted, n_boot=300, confidence=0.95, seed=3)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_the_interval_covers_a_known_ratio_at_its_nominal_rate():
    # Base rewards uniform on [0, 1] (continuous: best-of-N's KL is the bound, its reward N / (N + 1)); two tilted rows
    # whose true KL and mean reward are set so that their true gain ratios are 0.6 and 0.9, the mean 0.75.
    bound = {n: evaluation.best_of_n_kl(n) for n in evaluation.BEST_OF_NS}
    curve = sorted([(0.0, 0.5)] + [(bound[n], n / (n + 1)) for n in evaluation.BEST_OF_NS])
    kls, targets = (0.4, 1.0), (0.6, 0.9)
    means = []
    for kl, target in zip(kls, targets, strict=True):
        k0, v0 = max(p for p in curve if p[0] <= kl)
        k1, v1 = min(p for p in curve if p[0] >= kl)
        means.append(0.5 + target * (v0 + (v1 - v0) * (kl - k0) / (k1 - k0) - 0.5))
    covered, runs = 0, 100
    for seed in range(runs):
        g = random.Random(seed)
        base = _samples([[g.random() for _ in range(16)] for _ in range(32)])
        tilted = {
            f"beta={kl}": _samples(
                [[g.gauss(mean, 0.3) for _ in range(4)] for _ in range(32)],
                kl=[g.expovariate(1 / kl) for _ in range(32 * 4)],
            )
            for kl, mean in zip(kls, means, strict=True)
        }
        interval = evaluation.bootstrap_gain_ratio(
            base, tilted, best_of_n_curve="bound", n_boot=200, confidence=0.9, seed=seed
        )
        covered += interval.low <= sum(targets) / 2 <= interval.high
    # 90% nominal; a binomial(100, 0.9) count lies in [82, 97] with probability > 0.99
    assert 82 <= covered <= 97, covered


def test_degenerate_inputs():
    base, tilted = _random_problem(1, seed=0)
    single = evaluation.bootstrap_gain_ratio(base, tilted, n_boot=50)  # one prompt: every resample is the data
    assert single.low == single.high == pytest.approx(single.estimate)
    base, tilted = _random_problem(8, seed=0, tilt_kl=(3.0, 0.05))  # no row in [0.2, 1.5]
    none = evaluation.bootstrap_gain_ratio(base, tilted, n_boot=50)
    assert none.estimate is None and none.low is None and none.high is None
    base, tilted = _random_problem(8, seed=0)
    with pytest.raises(ValueError, match="n_boot"):
        evaluation.bootstrap_gain_ratio(base, tilted, n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        evaluation.bootstrap_gain_ratio(base, tilted, confidence=1.0)
    with pytest.raises(ValueError, match="kl_range"):
        evaluation.bootstrap_gain_ratio(base, tilted, kl_range=(1.5, 0.2))
    with pytest.raises(ValueError, match="`tilted` is empty"):
        evaluation.bootstrap_gain_ratio(base, {})
    with pytest.raises(ValueError, match="best-of-3 needs a multiple of 3"):
        evaluation.bootstrap_gain_ratio(base, tilted, best_of=(2, 3))
    moved = _samples([[0.5] * 4] * 8, kl=[0.3] * 32, prompts=[f"q{i}" for i in range(8)])
    with pytest.raises(ValueError, match=r"`tilted\['beta=2'\]` was sampled on other prompts"):
        evaluation.bootstrap_gain_ratio(base, {"beta=2": moved})
    with pytest.raises(ValueError, match=r"`tilted\['beta=2'\]` needs one KL per completion"):
        evaluation.bootstrap_gain_ratio(base, {"beta=2": _samples([[0.5] * 4] * 8)})
    base.rewards = base.rewards[:-1]
    with pytest.raises(ValueError, match="`base` has 127 rewards and 128 samples"):
        evaluation.bootstrap_gain_ratio(base, tilted)
