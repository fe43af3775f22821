"""Evaluating a tilted policy: reward against KL to the base policy, beside best-of-N, with the diversity and the
likelihood of the samples so that reward hacking would show.

- best-of-N from the base policy's own samples: `best_of_n_indices` (disjoint groups of N) and its KL: the bound
  `best_of_n_kl(N) = log N - (N - 1) / N`, exact only for a reward without ties, and the exact KL for each prompt's
  empirical reward distribution, ties included, `best_of_n_kl(N, rewards)` (`best_of_n_kl_per_prompt`,
  `best_of_n_levels`);
- diversity: `distinct_n`, `distinct_n_per_prompt_set`;
- likelihood under a reference model: `completion_nll`, `perplexity`, `score_likelihood`;
- how far adapters moved the policy: `policy_drift_kl`, `KL(pi_adapted || pi_pretrained)`, exact per step on given
  completions; `policy_log_ratios`, `log pi_adapted(y|x) - log pi_pretrained(y|x)` per completion, whose mean over the
  adapted policy's own samples estimates that KL per completion (the KL of a trained policy's row);
- the ceiling: `kl_optimal_rows`, the KL-regularised optimum `pi exp(R / beta) / Z` estimated from the base samples
  (the policy a tilt with the soft-optimal Q samples: no method beats it at equal KL);
- the frontier table: `base_and_best_of_n_rows`, `tilted_row`, `policy_row` (any other sampler, e.g. a trained policy),
  `frontier_comparison` (every other row against best-of-N at equal KL, its exact KL or the bound, with the gain
  ratio; `mean_gain_ratio`), `markdown_table`, `frontier_json`, `plot_frontier`;
- how sure the mean gain ratio is: `bootstrap_gain_ratio`, a percentile interval from resampling the prompts and
  recomputing the whole comparison.

Samples come from `trl_qhead.rollouts.sample_completions`; `recipes/demo_sentiment.py` runs the whole evaluation,
`recipes/gvpo_frontier.py` adds GVPO-trained policies to it.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from trl.trainer.utils import selective_log_softmax

from .modeling import AutoModelForCausalLMWithQHead
from .reference import as_reference
from .rollouts import Samples

# The best-of-N settings of the table: the samples per prompt must be a multiple of the largest.
BEST_OF_NS = (2, 4, 8, 16)


def _check_n(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive integer (the N of best-of-N), got {n!r}.")


def _check_prompt_rewards(rewards, name: str = "rewards") -> list[float]:
    """One prompt's rewards as floats; a ValueError/TypeError naming `name` and the sample otherwise."""
    if hasattr(rewards, "tolist"):  # a tensor or an array
        rewards = rewards.tolist()
    if isinstance(rewards, (str, bytes)) or not isinstance(rewards, Sequence):
        raise TypeError(f"`{name}` must be a list of rewards (one per base sample), got {type(rewards).__name__}.")
    if len(rewards) == 0:
        raise ValueError(f"`{name}` is empty: every prompt needs at least one base-sample reward.")
    for i, r in enumerate(rewards):
        if type(r) is not float and (isinstance(r, bool) or not isinstance(r, numbers.Real)):  # floats: the fast way
            raise TypeError(f"`{name}[{i}]` must be a real number, got {type(r).__name__} ({r!r}).")
        if not math.isfinite(r):
            raise ValueError(f"`{name}[{i}]` is {r!r}: the rewards must be finite.")
    return [float(r) for r in rewards]


def best_of_n_levels(rewards: Sequence[float], n: int) -> tuple[list[float], list[float], list[float]]:
    """Best-of-`n` from one prompt's empirical reward distribution, level by level.

    With `q_r` the share of `rewards` at level `r`, `F(r)` the share at or below it and `F(r-)` the share strictly
    below, the highest of `n` independent draws lands on level `r` with probability `P_r = F(r)^n - F(r-)^n`; within a
    level best-of-`n` keeps the base policy's proportions (ties broken uniformly among the tied draws, which is what
    keeping the first of a group of i.i.d. samples does).

    Args:
        rewards: the rewards of one prompt's base samples, `[m]`, finite.
        n: the N of best-of-N, >= 1.

    Returns:
        `(levels, q, p)`: the distinct reward levels in ascending order, their base shares `q_r` and their
        best-of-`n` probabilities `P_r`, each a list of the same length (both sum to 1).
    """
    _check_n(n)
    return _levels(_check_prompt_rewards(rewards), n)


def _levels(values: Sequence[float], n: int) -> tuple[list[float], list[float], list[float]]:
    """`best_of_n_levels` of checked rewards."""
    m = len(values)
    levels, q, p = [], [], []
    below = 0  # samples strictly below the current level
    for level, group in itertools.groupby(sorted(values)):  # ascending, once each
        count = sum(1 for _ in group)
        levels.append(level)
        q.append(count / m)
        p.append(((below + count) ** n - below**n) / m**n)  # in integers: exact, no cancellation (n = 1 gives q)
        below += count
    return levels, q, p


def best_of_n_kl_per_prompt(n: int, rewards: Sequence[Sequence[float]]) -> list[float]:
    """Per prompt, the exact `KL(best-of-n || base) = sum_r P_r log(P_r / q_r)` for that prompt's empirical reward
    distribution (`best_of_n_levels`, ties included): 0 for `n = 1` or when every sample ties, and at most
    `log n - (n - 1) / n`, which it approaches as distinct samples accumulate.

    Args:
        n: the N of best-of-N, >= 1.
        rewards: one list of base-sample rewards per prompt, `[P][m_p]` (each non-empty, finite).
    """
    _check_n(n)
    if hasattr(rewards, "tolist"):  # a [P, m] tensor or array
        rewards = rewards.tolist()
    if isinstance(rewards, (str, bytes)) or not isinstance(rewards, Sequence) or len(rewards) == 0:
        raise ValueError("`rewards` must be a non-empty list with one list of base-sample rewards per prompt.")
    kls = []
    for prompt, prompt_rewards in enumerate(rewards):
        _, q, p = _levels(_check_prompt_rewards(prompt_rewards, f"rewards[{prompt}]"), n)
        # P_r underflows to 0 only for a level far below the top at large n: 0 log 0 = 0.
        kls.append(sum(pr * math.log(pr / qr) for pr, qr in zip(p, q, strict=True) if pr > 0))
    return kls


def best_of_n_kl(n: int, rewards: Sequence[Sequence[float]] | None = None) -> float:
    """KL(best-of-N || base), nats per completion.

    Without `rewards`: `log N - (N - 1) / N` (Beirami et al.), exact for a reward without ties and an upper bound
    otherwise. With `rewards` (one list of base-sample rewards per prompt): the mean over prompts of the exact KL of
    best-of-N for each prompt's empirical reward distribution, ties included (`best_of_n_kl_per_prompt`); a reward with
    many ties (VADER's 0.0 for every text without a sentiment word) has a KL well below the bound. From m samples per
    prompt the estimate is biased low, by less than 0.05 nats at N = 16 from m = 16 (`recipes/best_of_n_kl_bias.py`).
    """
    _check_n(n)
    if rewards is None:
        return math.log(n) - (n - 1) / n
    kls = best_of_n_kl_per_prompt(n, rewards)
    return sum(kls) / len(kls)


def best_of_n_indices(rewards: Sequence[float], num_samples: int, n: int) -> list[int]:
    """For each prompt (rows `num_samples` apart), split its samples into `num_samples // n` disjoint groups of `n` in
    order and keep the highest-reward sample of each group (the first on ties)."""
    if n < 1 or num_samples % n:
        raise ValueError(f"`n` ({n}) must divide the samples per prompt ({num_samples}).")
    if len(rewards) % num_samples:
        raise ValueError(f"{len(rewards)} rewards are not a whole number of groups of {num_samples}.")
    chosen = []
    for start in range(0, len(rewards), n):
        group = range(start, start + n)
        chosen.append(max(group, key=lambda i: (rewards[i], -i)))
    return chosen


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct word n-grams / word n-grams over `texts` (lower-cased, whitespace-split); 0 when there are none."""
    seen, total = set(), 0
    for text in texts:
        words = text.lower().split()
        grams = list(zip(*(words[k:] for k in range(n)), strict=False))  # the n-grams of one text
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def distinct_n_per_prompt_set(texts: Sequence[str], num_prompts: int, n: int = 2) -> float:
    """Mean distinct-n over sets of one completion per prompt (`texts` prompt-major, the same count per prompt): every
    row of the table is measured on sets of the same size, so the numbers compare."""
    per_prompt = len(texts) // num_prompts
    if per_prompt * num_prompts != len(texts) or per_prompt == 0:
        raise ValueError(f"{len(texts)} texts do not split evenly over {num_prompts} prompts.")
    sets = [[texts[p * per_prompt + j] for p in range(num_prompts)] for j in range(per_prompt)]
    return sum(distinct_n(s, n) for s in sets) / len(sets)


@torch.no_grad()
def completion_nll(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 32,
    desc: str = "scoring",
) -> tuple[list[float], list[int]]:
    """Per sequence: the summed negative log-likelihood of its completion tokens given its prompt, and their count.

    `model` is any causal LM (call it inside `trl_qhead.reference.as_reference` for the pretrained model of a PEFT model).
    """
    nlls, counts = [], []
    device = next(model.parameters()).device
    pairs = [(list(p), list(c)) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, unit="batch", dynamic_ncols=True, leave=False):
        chunk = pairs[start : start + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        target = torch.full_like(ids, -100)
        for row, (p, c) in enumerate(chunk):  # right padding; positions follow the real tokens
            n = len(p) + len(c)
            ids[row, :n] = torch.tensor(p + c)
            attn[row, :n] = 1
            target[row, len(p) : n] = torch.tensor(c, dtype=torch.long)
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, :-1]  # (B, T - 1, V)
        labels = target[:, 1:].to(device)  # (B, T - 1)
        scored = labels != -100
        # TRL's `selective_log_softmax` (log-softmax then gather, one row's buffer at a time), in fp32: on bf16 logits
        # it would stay in bf16.
        logps = selective_log_softmax(logits.float(), labels.clamp(min=0))  # (B, T - 1)
        nlls.extend((-logps * scored).sum(1).tolist())
        counts.extend(scored.sum(1).tolist())
    return nlls, counts


def perplexity(nlls: Sequence[float], counts: Sequence[int]) -> float:
    """`exp(total NLL / total tokens)` over a set of sequences."""
    total = sum(counts)
    return math.exp(sum(nlls) / total) if total else float("nan")


@torch.no_grad()
def policy_drift_kl(
    qmodel: AutoModelForCausalLMWithQHead,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 32,
) -> float:
    """Mean per-sequence KL(pi_adapted || pi_pretrained) over the completions (states sampled from pi_adapted, the
    per-step KL exact over the vocabulary). 0 for a model without adapters."""
    if not qmodel.is_peft_model:
        return 0.0
    backbone = qmodel.pretrained_model
    device = next(qmodel.parameters()).device
    total, n_seq = 0.0, 0
    pairs = [(list(p), list(c)) for p, c in zip(prompt_ids, completion_ids, strict=True) if len(c) > 0]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attn, steps = torch.zeros_like(ids), torch.zeros(ids.shape, dtype=torch.bool)
        for row, (p, c) in enumerate(chunk):
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            attn[row, : len(p) + len(c)] = 1
            steps[row, len(p) - 1 : len(p) + len(c) - 1] = True  # the states at which a completion token was drawn
        ids, attn, steps = ids.to(device), attn.to(device), steps.to(device)
        adapted = torch.log_softmax(backbone(input_ids=ids, attention_mask=attn).logits.float(), -1)
        with as_reference(backbone):
            pretrained = torch.log_softmax(backbone(input_ids=ids, attention_mask=attn).logits.float(), -1)
        kl = (adapted.exp() * (adapted - pretrained)).sum(-1)
        total += float((kl * steps).sum())
        n_seq += len(chunk)
    return total / max(n_seq, 1)


@torch.no_grad()
def policy_log_ratios(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 32,
) -> list[float]:
    """Per completion: `log pi_adapted(y|x) - log pi_pretrained(y|x)`, summed over its tokens.

    `pi_adapted` is `model` as it is (adapters on), `pi_pretrained` the same model with its adapters disabled
    (`trl_qhead.reference.as_reference`); both are evaluated in eval mode (dropout off), and the training mode is
    restored. Over completions sampled from `pi_adapted`, the mean is an unbiased Monte Carlo estimate of
    `KL(pi_adapted || pi_pretrained)` per completion (a single completion's ratio can be negative).

    Args:
        model: a PEFT causal LM (the backbone of an `AutoModelForCausalLMWithQHead`), or any causal LM (then every
            ratio is 0).
        prompt_ids, completion_ids: the prompts (one per completion) and completions, token ids without padding.
        pad_token_id: the id used to pad a batch (masked out).
        batch_size: sequences per forward.
    """
    was_training = model.training
    model.eval()
    try:
        adapted, _ = completion_nll(
            model, prompt_ids, completion_ids, pad_token_id=pad_token_id, batch_size=batch_size
        )
        with as_reference(model):
            pretrained, _ = completion_nll(
                model, prompt_ids, completion_ids, pad_token_id=pad_token_id, batch_size=batch_size
            )
    finally:
        model.train(was_training)
    return [p - a for a, p in zip(adapted, pretrained, strict=True)]  # NLLs: log pi_a - log pi_p = nll_p - nll_a


@dataclass
class FrontierRow:
    """One line of the reward-vs-KL table: a sampling method at one setting, measured on held-out prompts.

    `train_seconds` is a one-off training cost of the method (e.g. fitting a policy), `None` where it has none or it
    was not measured; `markdown_table` shows the column only when a row has it. `distinct_2` and `perplexity` are
    `None` for a row that has no texts of its own (`kl_optimal_rows`). A best-of-N row's `kl` is the exact KL from the
    base samples' reward distribution (`best_of_n_kl(N, rewards)`) and `kl_bound` the bound `log N - (N - 1) / N`
    (`None` for every other row).
    """

    method: str
    setting: str
    reward: float
    reward_sem: float
    kl: float
    samples_per_output: int
    seconds_per_output: float
    distinct_2: float | None
    perplexity: float | None
    n: int
    train_seconds: float | None = None
    kl_bound: float | None = None


def _mean_sem(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def _rewards_per_prompt(samples: Samples, name: str) -> list[list[float]]:
    """`samples.rewards` split by prompt, `[P][num_samples]`; a ValueError naming `name` when they do not fit."""
    if len(samples.rewards) != len(samples.texts) or len(samples.texts) != len(samples.prompts) * samples.num_samples:
        raise ValueError(
            f"`{name}` has {len(samples.rewards)} rewards and {len(samples.texts)} samples for {len(samples.prompts)} "
            f"prompts x {samples.num_samples} samples: score every sample first."
        )
    m = samples.num_samples
    return [samples.rewards[p * m : (p + 1) * m] for p in range(len(samples.prompts))]


def base_and_best_of_n_rows(base: Samples, best_of: Sequence[int] = BEST_OF_NS) -> list[FrontierRow]:
    """Rows for base sampling (every sample) and best-of-N (disjoint groups of N of the same samples); `base` must be
    scored (`rewards` filled) and its likelihood measured (`score_likelihood`).

    A best-of-N row's reward is the mean of its groups' maxima (unbiased for best-of-N's expected reward: each group is
    N independent draws); its `kl` the exact KL for each prompt's empirical reward distribution over all its samples
    (`best_of_n_kl(N, rewards)`, ties included), and `kl_bound` the bound `log N - (N - 1) / N`."""
    per_prompt = _rewards_per_prompt(base, "base")
    per_sample_seconds = base.seconds / len(base.texts)
    rows = []
    for n in (1, *best_of):
        chosen = best_of_n_indices(base.rewards, base.num_samples, n)
        picked = base.select(chosen)
        reward, sem = _mean_sem(picked["rewards"])
        rows.append(
            FrontierRow(
                method="base sampling" if n == 1 else "best-of-N",
                setting="" if n == 1 else f"N={n}",
                reward=reward,
                reward_sem=sem,
                kl=0.0 if n == 1 else best_of_n_kl(n, per_prompt),
                samples_per_output=n,
                seconds_per_output=n * per_sample_seconds,
                distinct_2=distinct_n_per_prompt_set(picked["texts"], len(base.prompts)),
                perplexity=perplexity(picked["nll"], picked["n_tokens"]),
                n=len(chosen),
                kl_bound=None if n == 1 else best_of_n_kl(n),
            )
        )
    return rows


KL_OPTIMAL = "KL-optimal (estimate)"


def kl_optimal_rows(base: Samples, betas: Sequence[float]) -> list[FrontierRow]:
    """Reference rows: the KL-regularised optimum `pi*_beta(y|x) = pi(y|x) exp(R(x, y) / beta) / Z(x)` at each beta,
    estimated from the base samples by self-normalised importance weights (method `KL_OPTIMAL`).

    On each prompt, sample `i` gets the weight `w_i = softmax(r / beta)_i` over that prompt's `n` samples; the row's
    reward is `mean_x sum_i w_i r_i` and its KL `mean_x sum_i w_i log(n w_i)`, which is `E*[R] / beta - log Z` with
    `Z` estimated by `mean_i exp(r_i / beta)`. `pi*_beta` is what the tilt with the soft-optimal `Q*_beta` samples
    (docs/DESIGN.md section 6), so these rows are the frontier a token-level tilt approaches as its Q improves: no
    policy gets more reward at the same KL. The estimate is consistent as `n` grows; with few samples per prompt it
    can only reweight what was sampled (its KL stays below `log n`), so it understates the optimum where the KL nears
    `log n`. It draws no samples: `samples_per_output` is `n`, `seconds_per_output` 0, `distinct_2` None (a weighting
    has no texts of its own), and the perplexity is the weights' `exp(sum w NLL / sum w tokens)` (None without
    `nll`).

    Args:
        base: the scored base samples (`rewards`, and `nll`/`n_tokens` from `score_likelihood`).
        betas: the temperatures, each > 0.
    """
    if not base.rewards:
        raise ValueError("`base` has no rewards: score the samples before estimating the KL-optimal rows.")
    if len(base.rewards) != len(base.texts):
        raise ValueError(f"`base` has {len(base.rewards)} rewards for {len(base.texts)} samples.")
    bad = next((i for i, r in enumerate(base.rewards) if not math.isfinite(r)), None)
    if bad is not None:
        raise ValueError(f"`base.rewards[{bad}]` is {base.rewards[bad]!r}: the weights need finite rewards.")
    if any(not beta > 0 for beta in betas):
        raise ValueError(f"`betas` must all be > 0, got {list(betas)}.")
    n = base.num_samples
    rewards = torch.tensor(base.rewards, dtype=torch.float64).view(-1, n)  # (P, n)
    nll = torch.tensor(base.nll, dtype=torch.float64).view(-1, n) if base.nll else None
    tokens = torch.tensor(base.n_tokens, dtype=torch.float64).view(-1, n) if base.n_tokens else None
    rows = []
    for beta in betas:
        weights = torch.softmax(rewards / beta, dim=1)  # (P, n)
        per_prompt = (weights * rewards).sum(1)  # (P,)
        kl = torch.special.xlogy(weights, weights * n).sum(1).mean().item()  # 0 log 0 = 0
        reward, sem = _mean_sem(per_prompt.tolist())  # s.e. over prompts
        ppl = None
        if nll is not None and tokens is not None:
            ppl = math.exp((weights * nll).sum().item() / (weights * tokens).sum().item())
        rows.append(
            FrontierRow(
                method=KL_OPTIMAL,
                setting=f"beta={beta:g}",
                reward=reward,
                reward_sem=sem,
                kl=kl,
                samples_per_output=n,
                seconds_per_output=0.0,
                distinct_2=None,
                perplexity=ppl,
                n=len(base.rewards),
            )
        )
    return rows


def tilted_row(samples: Samples, beta: float, method: str = "Q-tilted") -> FrontierRow:
    """The row of tilted sampling at `beta` (KL from the processor, mean over samples); `method` names the tilt
    (which Q head or source) where one table holds several."""
    return policy_row(samples, method, f"beta={beta:g}", kl=sum(samples.kl) / len(samples.kl))


def policy_row(
    samples: Samples, method: str, setting: str, *, kl: float, train_seconds: float | None = None
) -> FrontierRow:
    """The row of a sampler that draws one sample per output (a tilt, a trained policy) from its scored samples.

    Args:
        samples: its samples on the held-out prompts, scored (`rewards`) and with their likelihood under the
            pretrained model (`score_likelihood`).
        method, setting: the row's labels, e.g. `"GVPO"`, `"beta=0.1"`.
        kl: its KL to the base policy, nats per completion (e.g. the mean of `policy_log_ratios`).
        train_seconds: its one-off training cost, if any.
    """
    reward, sem = _mean_sem(samples.rewards)
    return FrontierRow(
        method=method,
        setting=setting,
        reward=reward,
        reward_sem=sem,
        kl=kl,
        samples_per_output=1,
        seconds_per_output=samples.seconds / len(samples.texts),
        distinct_2=distinct_n_per_prompt_set(samples.texts, len(samples.prompts)),
        perplexity=perplexity(samples.nll, samples.n_tokens),
        n=len(samples.texts),
        train_seconds=train_seconds,
    )


BASELINE_METHODS = ("base sampling", "best-of-N")


BEST_OF_N_CURVES = ("exact", "bound")


def _interpolate(curve: Sequence[tuple[float, float]], kl: float) -> float | None:
    """The reward of the piecewise-linear `curve` (sorted `(kl, reward)` points) at `kl`; `None` outside it."""
    for (k0, v0), (k1, v1) in zip(curve, curve[1:], strict=False):
        if k0 <= kl <= k1:
            return v0 + (v1 - v0) * (kl - k0) / (k1 - k0) if k1 > k0 else max(v0, v1)
    return None


def _gain_ratio(reward: float, reference: float | None, base: float | None) -> float | None:
    return None if reference is None or base is None or reference <= base else (reward - base) / (reference - base)


def frontier_comparison(rows: Sequence[FrontierRow], best_of_n_curve: str = "exact") -> list[dict]:
    """For each row other than base sampling and best-of-N (Q-tilted, a trained policy, ...), the best-of-N reward at
    the same KL (linear interpolation between the measured best-of-N points, base sampling at KL 0; `None` beyond
    N = 16), the difference, and the gain ratio `(reward - base) / (best_of_n_at_kl - base)`: the share of best-of-N's
    gain over base sampling that the row gets at equal KL (1 = parity; `None` where best-of-N is not defined there or
    gains nothing). Each entry names the row's `method` and `setting`.

    `best_of_n_curve` places best-of-N's points: `"exact"` (the default) at their `kl`, the exact KL from the base
    samples' rewards; `"bound"` at `kl_bound`, `log N - (N - 1) / N` (at `kl` for a row without one), as every figure
    before the exact KL was measured. The bound puts best-of-N further right, which flatters every other row."""
    if best_of_n_curve not in BEST_OF_N_CURVES:
        raise ValueError(f"`best_of_n_curve` must be one of {BEST_OF_N_CURVES}, got {best_of_n_curve!r}.")

    def position(r: FrontierRow) -> float:
        return r.kl_bound if best_of_n_curve == "bound" and r.kl_bound is not None else r.kl

    curve = sorted([(position(r), r.reward) for r in rows if r.method in BASELINE_METHODS])
    base = next((r.reward for r in rows if r.method == "base sampling"), None)
    out = []
    for r in rows:
        if r.method in BASELINE_METHODS:
            continue
        ref = _interpolate(curve, r.kl)
        out.append(
            {
                "method": r.method,
                "setting": r.setting,
                "kl": r.kl,
                "reward": r.reward,
                "best_of_n_at_kl": ref,
                "difference": None if ref is None else r.reward - ref,
                "gain_ratio": _gain_ratio(r.reward, ref, base),
            }
        )
    return out


def mean_gain_ratio(
    comparison: Sequence[dict], kl_range: tuple[float, float] = (0.2, 1.5), method: str | None = None
) -> float | None:
    """The mean `gain_ratio` of `frontier_comparison` over the rows (of `method`, or all when `None`) whose KL lies in
    `kl_range` (nats), `None` when none does: one number per configuration, the method against best-of-N at equal KL."""
    ratios = [
        c["gain_ratio"]
        for c in comparison
        if c["gain_ratio"] is not None
        and kl_range[0] <= c["kl"] <= kl_range[1]
        and (method is None or c.get("method") == method)
    ]
    return sum(ratios) / len(ratios) if ratios else None


@dataclass
class GainRatioInterval:
    """A mean gain ratio with its bootstrap confidence interval over prompts (`bootstrap_gain_ratio`).

    Args:
        estimate: the mean gain ratio on all the prompts, what the table reports (`None`: no row in the KL range).
        low, high: the percentile interval of the resampled ratios (`None` with `estimate`).
        confidence: the interval's nominal coverage, e.g. 0.95.
        n_boot: the resamples drawn.
        n_defined: the resamples in which some row lay in the KL range (the interval is over those).
    """

    estimate: float | None
    low: float | None
    high: float | None
    confidence: float
    n_boot: int
    n_defined: int


def bootstrap_gain_ratio(
    base: Samples,
    tilted: Mapping[str, Samples],
    *,
    best_of: Sequence[int] = BEST_OF_NS,
    kl_range: tuple[float, float] = (0.2, 1.5),
    best_of_n_curve: str = "exact",
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> GainRatioInterval:
    """The mean gain ratio of one method against best-of-N over `kl_range`, with a percentile bootstrap interval over
    prompts.

    Each resample draws the prompts with replacement and recomputes the whole comparison on them, jointly for every
    row: base sampling's reward, best-of-N's rewards (the mean of disjoint groups' maxima, as `base_and_best_of_n_rows`)
    and KLs (exact from the resampled prompts' base rewards, or the bound), every tilted row's reward and KL, the
    interpolation at each tilted KL and the mean ratio over the rows whose KL lies in `kl_range` (a row may enter or
    leave the range between resamples). So the interval carries the noise of the base samples, of best-of-N and of the
    tilted samples at once, and the prompts' own spread; on all the prompts it reproduces
    `mean_gain_ratio(frontier_comparison(rows, best_of_n_curve), kl_range)` of the table's rows exactly.

    Args:
        base: the scored base samples (`rewards`), `num_samples` per prompt a multiple of every N in `best_of`.
        tilted: one method's rows, `{setting: samples}` (e.g. `{"beta=0.3": ...}`), each scored and with its
            per-completion KL in `kl` (a tilt's processor records it; for a trained policy put `policy_log_ratios`
            there), on the same prompts as `base` in the same order (any number of samples per prompt).
        best_of: the N of the best-of-N points.
        kl_range: the KL range (nats) of the rows averaged.
        best_of_n_curve: `"exact"` or `"bound"`, as in `frontier_comparison`.
        n_boot: resamples, >= 1.
        confidence: the interval's coverage, in (0, 1).
        seed: seeds the resampling (the same seed gives the same interval).
    """
    if best_of_n_curve not in BEST_OF_N_CURVES:
        raise ValueError(f"`best_of_n_curve` must be one of {BEST_OF_N_CURVES}, got {best_of_n_curve!r}.")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"`n_boot` must be a positive integer, got {n_boot!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence!r}.")
    if not kl_range[0] <= kl_range[1]:
        raise ValueError(f"`kl_range` must be (low, high) with low <= high, got {kl_range!r}.")
    if not tilted:
        raise ValueError("`tilted` is empty: give at least one row's samples, `{setting: samples}`.")
    base_rewards = _rewards_per_prompt(base, "base")
    for n in best_of:
        _check_n(n)
        if base.num_samples % n:
            raise ValueError(f"best-of-{n} needs a multiple of {n} base samples per prompt, not {base.num_samples}.")
    num_prompts = len(base_rewards)
    columns = [[sum(r) / len(r) for r in base_rewards]]  # per prompt: base reward, best-of-N rewards, then KLs
    for n in best_of:
        columns.append([sum(max(r[i : i + n]) for i in range(0, len(r), n)) * n / len(r) for r in base_rewards])
    for n in best_of:
        exact = best_of_n_curve == "exact"
        columns.append(best_of_n_kl_per_prompt(n, base_rewards) if exact else [best_of_n_kl(n)] * num_prompts)
    for setting, samples in tilted.items():
        if samples.prompts != base.prompts:
            raise ValueError(f"`tilted[{setting!r}]` was sampled on other prompts than `base` (or in another order).")
        if samples.kl is None or len(samples.kl) != len(samples.texts):
            raise ValueError(f"`tilted[{setting!r}]` needs one KL per completion in `kl`.")
        rewards = _rewards_per_prompt(samples, f"tilted[{setting!r}]")
        k = samples.num_samples
        columns.append([sum(r) / k for r in rewards])
        columns.append([sum(samples.kl[p * k : (p + 1) * k]) / k for p in range(num_prompts)])
    per_prompt = torch.tensor(columns, dtype=torch.float64).T  # (P, 1 + 2 len(best_of) + 2 len(tilted))
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(num_prompts, (n_boot, num_prompts), generator=generator)  # (B, P)
    means = torch.cat([per_prompt.mean(0, keepdim=True), per_prompt[picks].mean(1)])  # (1 + B, C): all, resamples
    ratios = [_mean_ratio(row, len(best_of), kl_range) for row in means.tolist()]
    estimate, resampled = ratios[0], [r for r in ratios[1:] if r is not None]
    if estimate is None or not resampled:
        return GainRatioInterval(estimate, None, None, confidence, n_boot, len(resampled))
    tail = (1 - confidence) / 2
    low, high = torch.quantile(torch.tensor(resampled, dtype=torch.float64), torch.tensor([tail, 1 - tail]).double())
    return GainRatioInterval(estimate, low.item(), high.item(), confidence, n_boot, len(resampled))


def _mean_ratio(means: Sequence[float], num_best_of: int, kl_range: tuple[float, float]) -> float | None:
    """The mean gain ratio from one set of means: base reward, best-of-N rewards, best-of-N KLs, then (reward, KL) of
    each tilted row (`bootstrap_gain_ratio`'s columns)."""
    base = means[0]
    rewards, kls = means[1 : 1 + num_best_of], means[1 + num_best_of : 1 + 2 * num_best_of]
    curve = sorted([(0.0, base), *zip(kls, rewards, strict=True)])
    tilted = means[1 + 2 * num_best_of :]
    ratios = []
    for reward, kl in zip(tilted[::2], tilted[1::2], strict=True):
        ratio = _gain_ratio(reward, _interpolate(curve, kl), base)
        if ratio is not None and kl_range[0] <= kl <= kl_range[1]:
            ratios.append(ratio)
    return sum(ratios) / len(ratios) if ratios else None


def markdown_table(rows: Sequence[FrontierRow]) -> str:
    """The table as markdown, one line per row (what `results.md` shows). A "KL bound" column (best-of-N's
    `log N - (N - 1) / N`, blank for other rows) follows the KL when a row has `kl_bound`, and a "training s" column is
    added when a row has `train_seconds` (blank for the rows without)."""
    with_training = any(r.train_seconds is not None for r in rows)
    with_bound = any(r.kl_bound is not None for r in rows)
    lines = [
        "| method | setting | mean reward (± s.e.) | KL to base (nats) |"
        + (" KL bound (nats) |" if with_bound else "")
        + " samples per output | s per output | distinct-2 | base-model ppl | n |"
        + (" training s |" if with_training else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        + (" --- |" if with_bound else "")
        + (" --- |" if with_training else ""),
    ]
    for r in rows:
        training = "" if not with_training else f" {'' if r.train_seconds is None else f'{r.train_seconds:.0f}'} |"
        bound = "" if not with_bound else f" {'' if r.kl_bound is None else f'{r.kl_bound:.3f}'} |"
        lines.append(
            f"| {r.method} | {r.setting} | {r.reward:+.3f} ± {r.reward_sem:.3f} | {r.kl:.3f} |{bound} "
            f"{r.samples_per_output} | {r.seconds_per_output:.2f} | {_number(r.distinct_2, '.3f')} "
            f"| {_number(r.perplexity, '.1f')} | {r.n} |" + training
        )
    return "\n".join(lines)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def frontier_json(rows: Sequence[FrontierRow]) -> list[dict]:
    """The table as JSON-ready dicts, one per row (what `results.json` holds under `rows`)."""
    return [asdict(row) for row in rows]


def plot_frontier(
    rows: Sequence[FrontierRow], path: str | os.PathLike, title: str, reward_label: str = "mean reward"
) -> None:
    """Mean reward against KL to the base policy: best-of-N (with base at KL 0) at its exact KL, the same points at the
    bound `log N - (N - 1) / N` (dashed, where the rows have `kl_bound`), and one curve per other method (Q-tilted
    sampling, a trained policy, ...), in their order in `rows`, saved to `path` (needs matplotlib, in the `demo`
    extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    base = [r for r in rows if r.method == "base sampling"]
    # Every curve starts at base sampling: best-of-1, the tilt at beta = infinity and a policy trained with an
    # infinite KL penalty are the base policy itself.
    others = list(dict.fromkeys(r.method for r in rows if r.method not in BASELINE_METHODS))
    labels = {
        "best-of-N": "best-of-N (N x compute), exact KL",
        "Q-tilted": "Q-tilted (1x)",
        KL_OPTIMAL: "KL-optimal pi exp(R/beta)/Z (estimate)",
    }
    styles = ("s-", "^-", "D-", "v-", "P-")
    curves = [("best-of-N", "o-")] + [(m, styles[i % len(styles)]) for i, m in enumerate(others or ["Q-tilted"])]
    for method, style in curves:
        label = labels.get(method, method)
        pts = sorted(base + [r for r in rows if r.method == method], key=lambda r: r.kl)
        ax.errorbar(
            [r.kl for r in pts],
            [r.reward for r in pts],
            yerr=[r.reward_sem for r in pts],
            fmt=style,
            capsize=3,
            label=label,
        )
        for r in pts:
            if r.method != "base sampling":
                tag = r.setting.replace("beta=", "β=")
                ax.annotate(tag, (r.kl, r.reward), textcoords="offset points", xytext=(4, -10), fontsize=7)
    bound = sorted(base + [r for r in rows if r.method == "best-of-N" and r.kl_bound is not None], key=lambda r: r.kl)
    if len(bound) > len(base):  # the old x positions: how far right the bound puts best-of-N
        ax.plot(
            [r.kl if r.kl_bound is None else r.kl_bound for r in bound],
            [r.reward for r in bound],
            "o--",
            color="tab:blue",
            alpha=0.4,
            label="best-of-N at the bound log N - (N-1)/N",
        )
    for r in base:
        ax.annotate("base", (r.kl, r.reward), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KL(policy || base policy), nats per completion")
    ax.set_ylabel(reward_label)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7 if len(curves) > 2 else None)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def score_likelihood(samples: Samples, model, pad_token_id: int) -> Samples:
    """Fill `samples.nll` and `samples.n_tokens` with the completions' likelihood under `model`."""
    prompts = [samples.prompt_ids[i // samples.num_samples] for i in range(len(samples.completion_ids))]
    samples.nll, samples.n_tokens = completion_nll(model, prompts, samples.completion_ids, pad_token_id=pad_token_id)
    return samples
