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

Cost: the top-k come from one extra forward of the base model over prompt + completion (no grad). Texts are scored in
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

from .chat import completions_like, is_messages
from .reward_functions import RewardFunctions, texts_for_rewards

__all__ = ["LabelCost", "PrefixScorer", "check_candidate_args", "label_completions", "top_k_next_tokens"]


@dataclass
class LabelCost:
    """What labelling cost: reward calls (`RewardFunctions.score` calls), texts scored (distinct) and looked up (with
    memo hits), and seconds in the top-k forward and in the reward functions."""

    reward_calls: int = 0
    texts_scored: int = 0
    texts_requested: int = 0
    states_labelled: int = 0
    topk_seconds: float = 0.0
    reward_seconds: float = 0.0

    def add(self, other: LabelCost) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def check_candidate_args(candidate_rewards: int | None, candidate_stride: int, prefix_shaping: bool) -> None:
    """ValueErrors for `generate_and_score`'s candidate arguments (k, stride, shaping)."""
    if candidate_rewards is not None and (
        isinstance(candidate_rewards, bool) or not isinstance(candidate_rewards, int) or candidate_rewards < 1
    ):
        raise ValueError(f"`candidate_rewards` (k) must be a positive integer or None, got {candidate_rewards!r}.")
    if isinstance(candidate_stride, bool) or not isinstance(candidate_stride, int) or candidate_stride < 1:
        raise ValueError(f"`candidate_stride` must be a positive integer (1: every state), got {candidate_stride!r}.")
    if not isinstance(prefix_shaping, bool):
        raise ValueError(f"`prefix_shaping` must be True or False, got {prefix_shaping!r}.")


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


class PrefixScorer:
    """Scores `prompt + decode(token ids)` with reward functions, batched and memoised (the texts of the prompt's and
    the prefix's tokens, `reward_functions.texts_for_rewards`, as the whole completion is scored).

    `request` registers a text (keyed by its prompt group and the decoded text: the same text is scored once, whatever
    token ids produced it), `flush` scores everything pending in calls of at most `batch_size` texts, and `score`
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
        self._scores: dict[tuple[Any, str], float] = {}
        self._pending: dict[tuple[Any, str], tuple[list[int], str]] = {}  # key -> (token ids, prompt text)

    def add_group(self, group, prompt, columns: dict[str, Any]) -> None:
        """The prompt (and the extra dataset columns, passed to the functions) of a group of texts."""
        self._groups[group] = (prompt, columns)

    def request(self, group, prompt_ids: list[int], token_ids: list[int]) -> tuple[Any, str]:
        """Register `prompt + token_ids` of a group for scoring; the texts are those of the tokens
        (`reward_functions.texts_for_rewards`), as the whole completion is scored."""
        (prompt_text,), (text,) = texts_for_rewards(self.tokenizer, [prompt_ids], [token_ids])
        key = (group, text)
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
            for (group, _), (_, prompt_text) in chunk:
                prompt = self._groups[group][0]
                prompts.append(prompt if is_messages(prompt) else prompt_text)  # conversations stay messages
            texts = [text for (_, text), _ in chunk]
            columns: dict[str, list] = {}
            for (group, _), _ in chunk:
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

    def score(self, key: tuple[Any, str]) -> float:
        return self._scores[key]


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

    Returns:
        Per completion a dict of the columns (see the module docstring), and the `LabelCost`.
    """
    cost = LabelCost()
    scorer = PrefixScorer(functions, tokenizer, batch_size)
    for g, (prompt, columns) in enumerate(zip(group_prompts, group_columns, strict=True)):
        scorer.add_group(g, prompt, columns)
    top = None
    if k is not None:
        began = time.perf_counter()
        top = top_k_next_tokens(model, prompt_ids, completion_ids, k, pad_token_id)
        cost.topk_seconds += time.perf_counter() - began

    plans = []
    for row, (c_ids, g) in enumerate(zip(completion_ids, groups, strict=True)):
        n = len(c_ids)
        states = list(range(0, n, stride)) if top is not None else []
        prefix_keys = {}
        p_ids = prompt_ids[row]
        for j in set(states) | ({*range(n + 1)} if prefix_shaping else set()) | {j + 1 for j in states}:
            prefix_keys[j] = scorer.request(g, p_ids, c_ids[:j])
        cand_keys = {j: [scorer.request(g, p_ids, c_ids[:j] + [a]) for a in top[row][j].tolist()] for j in states}
        plans.append((states, prefix_keys, cand_keys))
    scorer.flush()

    out = []
    for row, (states, prefix_keys, cand_keys) in enumerate(plans):
        p, n = len(prompt_ids[row]), len(completion_ids[row])
        columns: dict[str, list] = {}
        if top is not None:
            ids: list[list[int]] = [[] for _ in range(p + n)]
            effects: list[list[float]] = [[] for _ in range(p + n)]
            sampled = [0.0] * (p + n)
            for j in states:
                base = scorer.score(prefix_keys[j])
                ids[p + j] = top[row][j].tolist()
                effects[p + j] = [scorer.score(key) - base for key in cand_keys[j]]
                sampled[p + j] = scorer.score(prefix_keys[j + 1]) - base
            columns.update(candidate_ids=ids, candidate_rewards=effects, candidate_sampled_reward=sampled)
            cost.states_labelled += len(states)
        if prefix_shaping:
            scores = [scorer.score(prefix_keys[j]) for j in range(n + 1)]
            shaped = [0.0] * p + [scores[j + 1] - scores[j] for j in range(n)]
            if not all(math.isfinite(r) for r in shaped):
                raise ValueError("A prefix score is not finite: the reward functions must return finite numbers.")
            columns["prefix_rewards"] = shaped
        out.append(columns)
    cost.add(scorer.cost)
    return out, cost
