"""`RewardLookahead`: the reward's own one-step verdict on the next token, as a Q source for the tilt.

`Q(s, a) = R(x, c + a) - R(x, c)` for the base model's `k` most likely next tokens `a` at the state `s = (x, c)`
(prompt `x`, completion so far `c`), and 0 for every other token: the immediate effect of each candidate on a reward
that scores prefixes. Tilting with it is ARGS-style reward-guided decoding (Khanov et al. 2024) with an exact KL
record, and it is the "oracle one-step tilt" of docs/DESIGN.md: the tilt that the candidate labels of
`generate_and_score(candidate_rewards=k)` teach a Q head, computed exactly at decode time instead of learned. It
calls the reward functions at every step, `rows x (k + 1)` texts (memoised within a generation), so it is a
reference row for benchmarks and a decoder for cheap rewards, not a replacement for a trained head.

With `lookahead_k=k2` it looks two steps ahead: `Q(s, a) = r'(s, a) + V1(s + a)`, `V1` the soft value at `beta` of
the base model's top-k2 tokens after `a` (`soft.lookahead_soft_values`), read off one branch forward per step
(`branches.branch_top_k`) and `rows x k x k2` more texts: the exact counterpart of the two-step candidate labels
(`generate_and_score(candidate_lookahead=k2)`).
"""

from __future__ import annotations

import time

import torch

from ..branches import branch_top_k, check_branch_support
from ..candidates import LabelCost, PrefixScorer, check_lookahead_args
from ..modeling import transformers_model
from ..reward_functions import RewardFunctions, texts_for_rewards
from ..stop_tokens import stop_token_ids
from .sources import LMHeadCapture, QSource


class RewardLookahead(QSource):
    """Q values from calling the reward functions on each candidate next token (one-step lookahead).

    For every row of a generation step, the prompt is the row's prompt tokens (what `generate` received, without the
    left padding its attention mask marks: a leading pad id that is a real token, GPT-2's BOS, stays) and the
    completion `c` the tokens generated since; the reward functions see their texts as in training
    (`reward_functions.texts_for_rewards`: the prompt's decode and what the completion adds to it). The `k` tokens
    with the largest base logits (read off the LM head of the same forward pass, no extra forward) are scored as
    `R(prompt, text(c + [a])) - R(prompt, text(c))`. Tokens outside the top `k` get `Q = 0` (no effect assumed);
    with `QTiltLogitsProcessor(..., top_k=k)` they are masked instead and the processor's own top-k are scored. Rows
    that already emitted a stop token get `Q = 0` (their steps are not sampled from).

    Args:
        model: the model whose `generate` the processor runs on (its LM head gives the top-k).
        tokenizer: its tokenizer (decodes prompts and completions, special tokens skipped).
        reward_funcs: TRL reward functions or reward models (anything `RewardFunctions` accepts).
        k: candidates scored per row and step, at most the vocabulary size (as `lookahead_k`).
        reward_weights: one weight per reward function (default all 1).
        batch_size: texts per reward call.
        lookahead_k: k2, or None (default): also value each candidate by the soft value of its top-k2 next tokens
            (two steps ahead; stop tokens have nothing after them). The processor does not know the generation's
            last step, which looks ahead too.
        beta: the temperature of that soft value (> 0), with `lookahead_k`: the processor's beta.

    Example:
    ```python
    >>> source = RewardLookahead(model, tokenizer, sentiment_reward, k=20)
    >>> processor = QTiltLogitsProcessor(source, beta=0.3)
    >>> model.generate(**inputs, logits_processor=[processor], do_sample=True, top_k=0)
    >>> processor.kl, source.cost  # exact KL per sequence; reward calls and texts scored
    ```
    """

    def __init__(
        self,
        model,
        tokenizer,
        reward_funcs,
        k: int = 20,
        *,
        reward_weights=None,
        batch_size: int = 256,
        lookahead_k: int | None = None,
        beta: float | None = None,
    ):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive integer, got {k!r}.")
        beta = check_lookahead_args(lookahead_k, beta, "lookahead_k", "beta")
        if lookahead_k is not None:
            check_branch_support(model)
        self.lookahead_k, self.beta = lookahead_k, beta
        self.model = model  # also where QTiltLogitsProcessor finds the stop tokens
        self.tokenizer = tokenizer
        self.functions = RewardFunctions(reward_funcs, reward_weights=reward_weights)
        self.k = k
        self.batch_size = batch_size
        self.cost = LabelCost()
        self._stop_ids = set(stop_token_ids(model) or [])
        vocab_size = getattr(getattr(model.get_output_embeddings(), "weight", None), "shape", [None])[0]
        for name, value in (("k", k), ("lookahead_k", lookahead_k)):
            if vocab_size is not None and value is not None and value > vocab_size:
                raise ValueError(f"`{name}` ({value}) is larger than the model's vocabulary ({vocab_size} tokens).")
        self._capture = LMHeadCapture(model.get_output_embeddings(), keep_output=True)
        # The attention mask of the forward that started a generation: which prompt tokens are left padding (a pad id
        # that is also a real token, GPT-2's <|endoftext|> as BOS, is read as the model read it).
        self._generating_model = transformers_model(model)
        self._mask_handle = None
        self._attention_mask: torch.Tensor | None = None
        self._scorer: PrefixScorer | None = None
        self._width = 0
        self._prompt_ids: list[list[int]] = []
        self._groups: list[int] = []

    def attach(self) -> None:
        self._capture.attach()
        if self._mask_handle is None:
            self._mask_handle = self._generating_model.register_forward_pre_hook(self._keep_mask, with_kwargs=True)

    def detach(self) -> None:
        self._capture.detach()
        if self._mask_handle is not None:
            self._mask_handle.remove()
            self._mask_handle = None
        self._attention_mask = None
        self._finish_generation()

    def _keep_mask(self, module, args, kwargs) -> None:
        if not self._capture.paused:  # not the branch forward of the lookahead
            mask = kwargs.get("attention_mask")
            self._attention_mask = None if mask is None else mask.detach()

    def _finish_generation(self) -> None:
        if self._scorer is not None:
            self.cost.add(self._scorer.cost)
            self._scorer = None

    def _continuations(self, completions, candidates, live) -> list[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Per row, candidate index -> (ids, log-probs) of the base model's top-k2 next tokens after it (none after a
        stop token, none for finished rows), from one branch forward with this step's hooks paused."""
        rows, branches = [], []
        for row, completion in enumerate(completions):
            sequence = self._prompt_ids[self._groups[row]] + completion
            rows.append(sequence)
            branches.append(
                {i: (len(sequence), a) for i, a in enumerate(candidates[row].tolist()) if a not in self._stop_ids}
                if live[row]
                else {}
            )
        began = time.perf_counter()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._capture.paused = True  # the branch forward runs the same LM head: not this step's hidden state
        try:
            return branch_top_k(self.model, rows, branches, self.lookahead_k, pad)
        finally:
            self._capture.paused = False
            self.cost.topk_seconds += time.perf_counter() - began

    def _start_generation(self, input_ids: torch.LongTensor) -> None:
        self._finish_generation()
        self._scorer = PrefixScorer(self.functions, self.tokenizer, self.batch_size)
        self._width = input_ids.shape[1]
        self._prompt_ids = []
        for row, real in zip(input_ids.cpu().tolist(), self._prompt_mask(input_ids), strict=True):
            self._prompt_ids.append([token for token, keep in zip(row, real, strict=True) if keep])
        self._groups = list(range(len(self._prompt_ids)))
        prompts, _ = texts_for_rewards(self.tokenizer, self._prompt_ids, [[] for _ in self._prompt_ids])
        for group, prompt in enumerate(prompts):
            self._scorer.add_group(group, prompt, {})

    def _prompt_mask(self, input_ids: torch.LongTensor) -> list[list[bool]]:
        """Per prompt row, which tokens are real: the attention mask the model's first forward of this generation
        received (no mask: every token is real, as `generate` then reads it)."""
        mask = self._attention_mask
        rows, width = input_ids.shape
        if mask is None:
            return [[True] * width for _ in range(rows)]
        if mask.dim() != 2 or mask.shape[0] != rows or mask.shape[1] < width:
            raise RuntimeError(
                f"RewardLookahead: the attention mask of the generation's first forward has shape {tuple(mask.shape)}, "
                f"not [{rows}, >= {width}] (the prompts' 2-D mask), so it cannot tell the prompts' left padding from "
                "their tokens."
            )
        return mask[:, :width].bool().cpu().tolist()

    @torch.no_grad()
    def __call__(self, input_ids, parent, token_ids=None):
        _, logits = self._capture.take(input_ids.shape[0], parent is None, "RewardLookahead")
        if parent is None or self._scorer is None:
            self._start_generation(input_ids)
        elif not torch.equal(parent.cpu(), torch.arange(parent.numel())):
            self._groups = [self._groups[i] for i in parent.tolist()]  # beam search reordered the rows
        candidates = token_ids if token_ids is not None else logits.float().topk(self.k, dim=-1).indices
        candidates = candidates.cpu()
        completions = input_ids[:, self._width :].cpu().tolist()
        live = [not self._stop_ids.intersection(completion) for completion in completions]
        ahead = self._continuations(completions, candidates, live) if self.lookahead_k else None
        plans = []
        for row, completion in enumerate(completions):
            if not live[row]:
                plans.append(None)
                continue
            group = self._groups[row]
            prompt_ids = self._prompt_ids[group]
            here = self._scorer.request(group, prompt_ids, completion)
            keys = [self._scorer.request(group, prompt_ids, completion + [a]) for a in candidates[row].tolist()]
            next_keys = {}  # candidate index -> the keys of its top-k2 continuations
            if ahead is not None:
                for i, (ids, _) in ahead[row].items():
                    a = candidates[row, i].item()
                    next_keys[i] = [self._scorer.request(group, prompt_ids, completion + [a, b]) for b in ids.tolist()]
            plans.append((here, keys, next_keys))
        self._scorer.flush()
        effects = torch.zeros(candidates.shape, dtype=torch.float32)  # (N, k)
        for row, plan in enumerate(plans):
            if plan is not None:
                here, keys, next_keys = plan
                base = self._scorer.score(here)
                for i, key in enumerate(keys):
                    effects[row, i] = self._scorer.score(key) - base
                    if i in next_keys:
                        effects[row, i] += self._scorer.soft_value_ahead(
                            key, next_keys[i], ahead[row][i][1], self.beta
                        )
        effects = effects.to(input_ids.device)
        if token_ids is not None:
            return effects
        q = torch.zeros(logits.shape, dtype=torch.float32, device=input_ids.device)  # (N, |V|)
        return q.scatter_(-1, candidates.to(input_ids.device), effects)
