"""How far the exact best-of-N KL of an empirical reward distribution is from the truth, by base samples per prompt.

`trl_qhead.evaluation.best_of_n_kl(N, rewards)` computes best-of-N's KL exactly for each prompt's *empirical* reward
distribution (its m base samples). The policy the table measures is best-of-N from the *true* distribution, so the
estimate is biased: a sample of m holds at most m levels, and its shares of a point mass are noisy. This script measures
that bias on problems whose true KL is known exactly, shaped like VADER's rewards: a point mass at 0.0 (every text
without a sentiment word) holding a share `zeros` of the texts, the rest spread over many distinct levels, a fifth of
them below 0 and the remainder above. The true distribution is a population of `--population` equally likely
texts (`zeros x population` of them at 0.0, the others at distinct levels), so its best-of-N KL is
`best_of_n_kl(N, [population])` exactly, with nothing estimated. (The KL depends only on the reward's ranks and ties:
where the levels lie does not matter, only their shares.)

For each share of zeros, N and m: `--replicates` prompts, each with m base samples drawn with replacement from the
population; the table gives the mean of the per-prompt estimates minus the true KL (the bias; its Monte Carlo error
is the per-prompt s.d. / sqrt(replicates)) and the per-prompt standard deviation (the s.d. of a mean over P prompts
is that / sqrt(P): 32 prompts divide it by 5.7). Below it, the reward side: the table's best-of-N reward (the mean
of disjoint groups' maxima) is unbiased, while the order-statistic expectation over the same empirical distribution,
`sum_r P_r r`, is biased low, which is why the evaluation keeps the groups.

Usage:
    python recipes/best_of_n_kl_bias.py                        # the table of docs/frontier.md, a few seconds
    python recipes/best_of_n_kl_bias.py --replicates 20000     # smaller Monte Carlo error
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if not __package__ and str(REPO_ROOT) not in sys.path:  # `python recipes/best_of_n_kl_bias.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from trl_qhead.evaluation import best_of_n_kl, best_of_n_kl_per_prompt, best_of_n_levels  # noqa: E402

BELOW_SHARE = 0.2  # the share of the texts not at 0.0 that score below it (VADER's negative scores)


def population(size: int, zeros: float) -> list[float]:
    """`size` equally likely rewards: `round(zeros * size)` at 0.0, a fifth of the others at distinct negative levels
    and the rest at distinct positive levels (the values only set the order; the KL ignores them)."""
    at_zero = round(zeros * size)
    below = round(BELOW_SHARE * (size - at_zero))
    above = size - at_zero - below
    return (
        [-(i + 1) / (below + 1) for i in range(below)]
        + [0.0] * at_zero
        + [(i + 1) / (above + 1) for i in range(above)]
    )


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def kl_table(
    zeros_shares: Sequence[float], ns: Sequence[int], ms: Sequence[int], replicates: int, size: int, seed: int
) -> tuple[list[dict], str]:
    """The bias and spread of the estimate for every (share of zeros, N, m); returns the entries and the markdown."""
    rng = random.Random(seed)
    entries = []
    for zeros in zeros_shares:
        truth = population(size, zeros)
        draws = {m: [rng.choices(truth, k=m) for _ in range(replicates)] for m in ms}  # the same prompts for every N
        for n in ns:
            true_kl = best_of_n_kl(n, [truth])
            cells = {}
            for m in ms:
                mean, sd = _mean_sd(best_of_n_kl_per_prompt(n, draws[m]))
                cells[m] = {"bias": mean - true_kl, "sd": sd}
            entries.append({"zeros": zeros, "n": n, "true_kl": true_kl, "bound": best_of_n_kl(n), "cells": cells})
    header = "| share at 0.0 | N | true KL | bound | " + " | ".join(f"m = {m}" for m in ms) + " |"
    lines = [header, "| " + " | ".join(["---"] * (4 + len(ms))) + " |"]
    for e in entries:
        cells = " | ".join(f"{c['bias']:+.3f} ({c['sd']:.2f})" for c in e["cells"].values())
        lines.append(f"| {e['zeros']:g} | {e['n']} | {e['true_kl']:.3f} | {e['bound']:.3f} | {cells} |")
    return entries, "\n".join(lines)


def reward_table(zeros: float, n: int, ms: Sequence[int], replicates: int, size: int, seed: int) -> str:
    """Best-of-`n`'s expected reward from m samples: the disjoint groups' mean (the table's) against the
    order-statistic expectation over the empirical distribution, both minus the truth."""
    rng = random.Random(seed)
    truth = population(size, zeros)

    def expectation(rewards: Sequence[float]) -> float:
        levels, _, p = best_of_n_levels(rewards, n)
        return sum(pr * level for pr, level in zip(p, levels, strict=True))

    true_reward = expectation(truth)
    lines = [
        f"| m (share at 0.0 {zeros:g}, N = {n}, true reward {true_reward:+.3f}) | groups' mean: bias (s.d.) | "
        "empirical expectation: bias (s.d.) |",
        "| --- | --- | --- |",
    ]
    for m in (m for m in ms if m % n == 0):
        groups, plug_in = [], []
        for _ in range(replicates):
            sample = rng.choices(truth, k=m)
            groups.append(sum(max(sample[i : i + n]) for i in range(0, m, n)) * n / m)
            plug_in.append(expectation(sample))
        (g, g_sd), (e, e_sd) = _mean_sd(groups), _mean_sd(plug_in)
        lines.append(f"| {m} | {g - true_reward:+.3f} ({g_sd:.2f}) | {e - true_reward:+.3f} ({e_sd:.2f}) |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zeros", type=float, nargs="+", default=[0.0, 0.3, 0.6, 0.9], help="shares of texts at 0.0")
    p.add_argument("--ns", type=int, nargs="+", default=[4, 16], help="the N of best-of-N")
    p.add_argument("--ms", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128], help="base samples per prompt")
    p.add_argument("--replicates", type=int, default=2000, help="simulated prompts per cell")
    p.add_argument("--population", type=int, default=1000, help="equally likely texts of the true distribution")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    if any(not 0 <= z < 1 for z in args.zeros):
        raise ValueError(f"`--zeros` must lie in [0, 1), got {args.zeros}.")
    if min(args.ns) < 1 or min(args.ms) < 1 or args.replicates < 2 or args.population < 2:
        raise ValueError("`--ns`, `--ms` must be >= 1, `--replicates` and `--population` >= 2.")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    args = check_args(build_parser().parse_args(argv))
    began = time.perf_counter()
    _, table = kl_table(args.zeros, args.ns, args.ms, args.replicates, args.population, args.seed)
    rewards = reward_table(max(args.zeros), max(args.ns), args.ms, args.replicates, args.population, args.seed + 1)
    text = (
        "Bias of best_of_n_kl(N, rewards) from m base samples per prompt: mean estimate - true KL (per-prompt s.d.), "
        f"{args.replicates} prompts per cell\n\n{table}\n\nBest-of-N's reward from the same samples\n\n{rewards}\n\n"
        f"{time.perf_counter() - began:.1f} s"
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
