"""Candidate labels (docs/DESIGN.md section 9): the reward's verdict on the base model's top-k next tokens at sampled
states, scored on the prefix, and the prefix scores behind potential-based shaping.

For a completion `c` of a prompt `p` (tokens `c_0 .. c_{n-1}`) and a state `j` (the prefix `c_{<j}`), the effect of a
token `a` is

    r'(s_j, a) = R(p, decode(c_{<j} + [a])) - R(p, decode(c_{<j}))

with `R` the weighted sum of the reward functions (`RewardFunctions`, TRL's interface: callables, async callables and
reward models), each function's per-token output summed. `generate_and_score(candidate_rewards=k,
candidate_stride=m)` writes, for every `m`-th state `j = 0, m, 2m, ...` of each completion, the base model's `k` most
likely next tokens, their effects and the sampled token's own effect `r'(s_j, c_j)`; the trainer then regresses
`Q(s_j, a)` on `G_j + r'(s_j, a) - r'(s_j, c_j)` (`trl_qhead.soft.candidate_targets`).

Columns (token-aligned with `input_ids`, as the `rewards` column is: entry `i` concerns the action that produces token
`i`, i.e. the state `s_{i-1}`):
- `candidate_ids`: per token a list of `k` ids, `[]` where the state was not scored (prompt tokens, states off the
  stride);
- `candidate_rewards`: per token the `k` effects, `[]` where not scored;
- `candidate_sampled_reward`: per token the sampled token's effect, `0.0` where not scored (read only where
  `candidate_ids` is not empty).

Two-step labels (`candidate_lookahead=k2`, `candidate_beta=beta`): each candidate's entry, and the sampled token's,
becomes `r'(s_j, a) + V1(s_j + a)`, where `V1(s') = beta log(sum_b pi(b|s') exp(r'(s', b) / beta) + (1 - sum_b
pi(b|s')))` over the base model's top-k2 tokens `b` after `a`, each scored on the prefix it makes
(`soft.lookahead_soft_values`): `Q*_beta` of an episode that ends one step later, so a candidate that opens the way to
a rewarding next token ("very", the first half of a word, a negation) is valued for it. `V1` is 0 after a stop token
and at the episode's last step. The trainer's targets are unchanged: `G_j + Q2(s_j, a) - Q2(s_j, c_j)`, with `G_j = 0`
when the rewards are left out (the demo's `--labels effects`), the two-step soft Q relative to the sampled token.

Cost: the top-k come from one extra forward of the base model over prompt + completion (no grad); with lookahead, the
top-k2 after every (state, candidate) pair from one more forward per row with the pairs appended as branch tokens
(`branches.branch_top_k`), and `k2` more texts scored per pair. Texts are scored in
batches of `batch_size` per reward call, each distinct (prompt, text) once (memoised: the `k` candidates of a state
share its prefix, the completions of a prompt share their first prefixes, and the sampled token is often one of the
candidates). `LabelCost` counts the calls and seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .branches import branch_top_k
from .chat import completions_like, is_messages
from .checks import check_beta
from .reward_functions import RewardFunctions, texts_for_rewards
from .soft import lookahead_soft_values

__all__ = [
    "LabelCost",
    "PrefixScorer",
    "check_candidate_args",
    "check_lookahead_args",
    "label_completions",
    "top_k_next_tokens",
]


@dataclass
class LabelCost:
    """What labelling cost: reward calls (`RewardFunctions.score` calls), texts scored (distinct) and looked up (with
    memo hits), states labelled, seconds in the top-k forward and in the reward functions, and, for future-value
    labels (`trl_qhead.labels.FutureValueLabels`), the continuations sampled, their tokens and the seconds of
    `generate`."""

    reward_calls: int = 0
    texts_scored: int = 0
    texts_requested: int = 0
    states_labelled: int = 0
    topk_seconds: float = 0.0
    reward_seconds: float = 0.0
    continuations_sampled: int = 0
    continuation_tokens: int = 0
    sampling_seconds: float = 0.0

    def add(self, other: LabelCost) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def check_candidate_args(
    candidate_rewards: int | None,
    candidate_stride: int,
    prefix_shaping: bool,
    candidate_lookahead: int | None = None,
    candidate_beta: float | None = None,
) -> None:
    """ValueErrors for `generate_and_score`'s candidate arguments (k, stride, shaping, lookahead k2 and its beta)."""
    if candidate_rewards is not None and (
        isinstance(candidate_rewards, bool) or not isinstance(candidate_rewards, int) or candidate_rewards < 1
    ):
        raise ValueError(f"`candidate_rewards` (k) must be a positive integer or None, got {candidate_rewards!r}.")
    if isinstance(candidate_stride, bool) or not isinstance(candidate_stride, int) or candidate_stride < 1:
        raise ValueError(f"`candidate_stride` must be a positive integer (1: every state), got {candidate_stride!r}.")
    if not isinstance(prefix_shaping, bool):
        raise ValueError(f"`prefix_shaping` must be True or False, got {prefix_shaping!r}.")
    check_lookahead_args(candidate_lookahead, candidate_beta, "candidate_lookahead", "candidate_beta")
    if candidate_lookahead is not None and candidate_rewards is None:
        raise ValueError("`candidate_lookahead` looks ahead of the candidates: set `candidate_rewards` (k) too.")


def check_lookahead_args(
    lookahead: int | None, beta: float | None, lookahead_name: str, beta_name: str
) -> float | None:
    """A two-step lookahead's k2 and temperature (`generate_and_score`'s `candidate_lookahead` / `candidate_beta`,
    `RewardLookahead`'s `lookahead_k` / `beta`): both or neither, k2 a positive integer, beta a finite number > 0.
    Returns beta as a float (None without lookahead); ValueErrors name the arguments."""
    if lookahead is None:
        if beta is not None:
            raise ValueError(f"`{beta_name}` was given without `{lookahead_name}` to use it.")
        return None
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1:
        raise ValueError(f"`{lookahead_name}` (k2) must be a positive integer or None, got {lookahead!r}.")
    if beta is None:
        raise ValueError(f"`{lookahead_name}` needs `{beta_name}`, the temperature of the soft value ahead.")
    return check_beta(beta, name=beta_name)


@torch.no_grad()
def top_k_next_tokens(
    model,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    k: int,
    pad_token_id: int,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """The base model's `k` most likely next tokens at every completion state: per row an `[n, k]` long tensor, row
    `j` for the state after `prompt + completion[:j]` (ids sorted by probability, highest first).

    One forward per `batch_size` rows (right-padded); `model` is any causal LM returning `.logits` (for an
    `AutoModelForCausalLMWithQHead`, its LM head: the base policy, whatever tilt sampled the completions). A `k`
    larger than the vocabulary raises a ValueError.
    """
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(prompt_ids), batch_size):
        stop = start + batch_size
        rows = [p + c for p, c in zip(prompt_ids[start:stop], completion_ids[start:stop], strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(r)
            mask[i, : len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        if k > logits.shape[-1]:
            raise ValueError(
                f"`candidate_rewards` (k={k}) is larger than the model's vocabulary ({logits.shape[-1]} tokens)."
            )
        for i in range(len(rows)):
            p, n = len(prompt_ids[start + i]), len(completion_ids[start + i])
            # logits at position t give the distribution of token t + 1: states p - 1 .. p + n - 2
            out.append(logits[i, p - 1 : p - 1 + n].float().topk(k, dim=-1).indices.cpu())
    return out


def _continuations(
    model,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    states_of: list[list[int]],
    top: list[torch.Tensor],
    k2: int,
    pad_token_id: int,
    horizon: int | None,
    stop_ids: frozenset[int],
) -> list[dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]]:
    """Per row, `(j, a) -> (ids [k2], log_probs [k2])`: the base model's top-k2 tokens after each candidate `a` of
    each labelled state `j` and after the sampled token, from one branch forward per row (`branch_top_k`). Stop tokens
    and the states at `horizon - 1` get no entry: nothing follows them."""
    sequences, branches = [], []
    for p_ids, c_ids, states, row_top in zip(prompt_ids, completion_ids, states_of, top, strict=True):
        row_branches = {}
        for j in states:
            if horizon is not None and j >= horizon - 1:
                continue
            for a in [*row_top[j].tolist(), c_ids[j]]:
                if a not in stop_ids:
                    row_branches[j, a] = (len(p_ids) + j, a)
        sequences.append(p_ids + c_ids)
        branches.append(row_branches)
    return branch_top_k(model, sequences, branches, k2, pad_token_id)


class PrefixScorer:
    """Scores `prompt + decode(token ids)` with reward functions, batched and memoised (the texts of the prompt's and
    the prefix's tokens, `reward_functions.texts_for_rewards`, as the whole completion is scored).

    `request` registers a text, keyed by its prompt group, the decoded text and, when a reward function may read
    `completion_ids` (`RewardFunctions.reads_completion_ids`: any callable; TRL's overlong punishment scores
    `len(completion_ids)`), the token ids too: `[" c", "at"]` and `[" cat"]` decode alike but are two completions to
    such a function. Reward models read only the text, so with them alone the same text is scored once, whatever ids
    produced it. `flush` scores everything pending in calls of at most `batch_size` texts, and `score`
    reads a result. A text's score is `nansum_i w_i R_i` over the functions (per-token outputs summed); a text no
    function scored counts 0.

    Args:
        functions: the `RewardFunctions`.
        tokenizer: decodes the token ids (special tokens skipped, as `generate_and_score` decodes completions).
        batch_size: texts per reward call.
    """

    def __init__(self, functions: RewardFunctions, tokenizer, batch_size: int = 256):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        self.functions, self.tokenizer, self.batch_size = functions, tokenizer, batch_size
        self.cost = LabelCost()
        self._groups: dict[Any, tuple[Any, dict[str, Any]]] = {}
        self._by_ids = functions.reads_completion_ids
        self._scores: dict[tuple, float] = {}
        self._pending: dict[tuple, tuple[list[int], str]] = {}  # key -> (token ids, prompt text)

    def add_group(self, group, prompt, columns: dict[str, Any]) -> None:
        """The prompt (and the extra dataset columns, passed to the functions) of a group of texts."""
        self._groups[group] = (prompt, columns)

    def request(self, group, prompt_ids: list[int], token_ids: list[int]) -> tuple:
        """Register `prompt + token_ids` of a group for scoring; the texts are those of the tokens
        (`reward_functions.texts_for_rewards`), as the whole completion is scored."""
        (prompt_text,), (text,) = texts_for_rewards(self.tokenizer, [prompt_ids], [token_ids])
        key = (group, text, tuple(token_ids) if self._by_ids else None)
        self.cost.texts_requested += 1
        if key not in self._scores and key not in self._pending:
            self._pending[key] = (list(token_ids), prompt_text)
        return key

    def flush(self) -> None:
        pending = list(self._pending.items())
        self._pending = {}
        began = time.perf_counter()
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            prompts = []
            for (group, _, _), (_, prompt_text) in chunk:
                prompt = self._groups[group][0]
                prompts.append(prompt if is_messages(prompt) else prompt_text)  # conversations stay messages
            texts = [text for (_, text, _), _ in chunk]
            columns: dict[str, list] = {}
            for (group, _, _), _ in chunk:
                for name, value in self._groups[group][1].items():
                    columns.setdefault(name, []).append(value)
            scored = self.functions.score(
                prompts, completions_like(prompts, texts), [ids for _, (ids, _) in chunk], **columns
            )
            totals = scored.totals() * self.functions.weights.to(scored.sequence)  # [n, F]
            values = totals.nan_to_num(0.0).sum(dim=1).tolist()
            for (key, _), value in zip(chunk, values, strict=True):
                self._scores[key] = float(value)
            self.cost.reward_calls += 1
            self.cost.texts_scored += len(chunk)
        self.cost.reward_seconds += time.perf_counter() - began

    def score(self, key: tuple) -> float:
        return self._scores[key]

    def soft_value_ahead(self, key, next_keys, log_probs: torch.Tensor, beta: float) -> float:
        """`V1(s')` of the text `key` (`s'`): the soft value at `beta` of its scored continuations `next_keys` (their
        effects on `s'`'s score, with the base model's `log_probs` of those tokens; `soft.lookahead_soft_values`)."""
        here = self.score(key)
        effects = torch.tensor([self.score(next_key) - here for next_key in next_keys])  # (k2,)
        return lookahead_soft_values(log_probs, effects, beta).item()


def label_completions(
    model,
    tokenizer,
    functions: RewardFunctions,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    groups: list[int],
    group_prompts: list,
    group_columns: list[dict[str, Any]],
    *,
    k: int | None,
    stride: int,
    prefix_shaping: bool,
    pad_token_id: int,
    batch_size: int = 256,
    lookahead: int | None = None,
    beta: float | None = None,
    horizon: int | None = None,
    stop_ids: frozenset[int] = frozenset(),
    scorer: PrefixScorer | None = None,
) -> tuple[list[dict[str, list]], LabelCost]:
    """Candidate columns (and, with `prefix_shaping`, token-aligned shaped `rewards`) for a batch of completions.

    Args:
        prompt_ids, completion_ids: per completion, the token ids of its prompt and of itself.
        groups: per completion, the index of its prompt example (the memoisation key of its texts).
        group_prompts, group_columns: per prompt example, the prompt (a string or messages) and the extra dataset
            columns, as the reward functions receive them.
        k: candidates per state (None: no candidate columns). stride: label states `0, stride, 2 stride, ...`.
        prefix_shaping: also score every prefix (`j = 0 .. n`) and return `prefix_rewards`, token-aligned with
            prompt + completion: `R(c_{<=i}) - R(c_{<i})` on completion token `i` (0 on the prompt), the per-token
            rewards of `trl_qhead.soft.prefix_shaped_rewards`; they sum to `R(completion) - R(empty completion)`.
        lookahead: k2, or None: two-step labels. Each candidate `a` of state `j` (and the sampled token) gets
            `r'(s_j, a) + V1(s_j + a)`, `V1` the soft value one step ahead (`soft.lookahead_soft_values` at `beta`)
            over the base model's top-k2 tokens after `a` (`branches.branch_top_k`), each scored on the prefix it
            makes; `V1 = 0` after a token of `stop_ids` and at state `horizon - 1` (the episode's last step).
        scorer: a `PrefixScorer` shared with other label sources of the same batch (its memo then spans them, and its
            cost is the caller's to count); None: one of this call's own (`batch_size` texts per reward call).

    Returns:
        Per completion a dict of the columns (see the module docstring), and the `LabelCost`.
    """
    cost = LabelCost()
    own_scorer = scorer is None
    if own_scorer:
        scorer = PrefixScorer(functions, tokenizer, batch_size)
    for g, (prompt, columns) in enumerate(zip(group_prompts, group_columns, strict=True)):
        scorer.add_group(g, prompt, columns)
    top = None
    if k is not None:
        began = time.perf_counter()
        top = top_k_next_tokens(model, prompt_ids, completion_ids, k, pad_token_id)
        cost.topk_seconds += time.perf_counter() - began

    states_of = [list(range(0, len(c), stride)) if top is not None else [] for c in completion_ids]
    ahead = None
    if top is not None and lookahead is not None:
        began = time.perf_counter()
        ahead = _continuations(
            model, prompt_ids, completion_ids, states_of, top, lookahead, pad_token_id, horizon, stop_ids
        )
        cost.topk_seconds += time.perf_counter() - began

    plans = []
    for row, (c_ids, g) in enumerate(zip(completion_ids, groups, strict=True)):
        n = len(c_ids)
        states = states_of[row]
        prefix_keys = {}
        p_ids = prompt_ids[row]
        for j in set(states) | ({*range(n + 1)} if prefix_shaping else set()) | {j + 1 for j in states}:
            prefix_keys[j] = scorer.request(g, p_ids, c_ids[:j])
        cand_keys = {j: [scorer.request(g, p_ids, c_ids[:j] + [a]) for a in top[row][j].tolist()] for j in states}
        next_keys = {}  # (j, a) -> keys of a's top-k2 continuations
        if ahead is not None:
            for (j, a), (ids, _) in ahead[row].items():
                next_keys[j, a] = [scorer.request(g, p_ids, c_ids[:j] + [a, b]) for b in ids.tolist()]
        plans.append((states, prefix_keys, cand_keys, next_keys))
    scorer.flush()

    def value_after(row: int, j: int, a: int, key) -> float:
        """`r'(s_j, a)` (`key`: the text of `c_{<j} + [a]`), plus `V1(s_j + a)` with lookahead."""
        _, prefix_keys, _, next_keys = plans[row]
        effect = scorer.score(key) - scorer.score(prefix_keys[j])
        if (j, a) not in next_keys:  # no lookahead, a stop token, or the last step
            return effect
        return effect + scorer.soft_value_ahead(key, next_keys[j, a], ahead[row][j, a][1], beta)

    out = []
    for row, (states, prefix_keys, cand_keys, _) in enumerate(plans):
        p, n = len(prompt_ids[row]), len(completion_ids[row])
        c_ids = completion_ids[row]
        columns: dict[str, list] = {}
        if top is not None:
            ids: list[list[int]] = [[] for _ in range(p + n)]
            effects: list[list[float]] = [[] for _ in range(p + n)]
            sampled = [0.0] * (p + n)
            for j in states:
                ids[p + j] = top[row][j].tolist()
                effects[p + j] = [value_after(row, j, a, key) for a, key in zip(ids[p + j], cand_keys[j], strict=True)]
                sampled[p + j] = value_after(row, j, c_ids[j], prefix_keys[j + 1])
            columns.update(candidate_ids=ids, candidate_rewards=effects, candidate_sampled_reward=sampled)
            cost.states_labelled += len(states)
        if prefix_shaping:
            scores = [scorer.score(prefix_keys[j]) for j in range(n + 1)]
            shaped = [0.0] * p + [scores[j + 1] - scores[j] for j in range(n)]
            if not all(math.isfinite(r) for r in shaped):
                raise ValueError("A prefix score is not finite: the reward functions must return finite numbers.")
            columns["prefix_rewards"] = shaped
        out.append(columns)
    if own_scorer:
        cost.add(scorer.cost)
    return out, cost
