"""Sampling from a policy: `generate_and_score` (completions for a prompt dataset, scored, as a training dataset) and
`sample_completions` (the evaluation sampler: timed, with the per-sequence KL of a tilt processor).

This is the data step of the offline-RL loop of Controlled Decoding and Value-Augmented Sampling: sample from the
current (or base) policy, score with reward functions, fit the Q head on the scored samples with `QHeadTrainer`,
sample again from the Q-tilted policy, and so on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset, DatasetInfo, IterableDataset
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase, set_seed
from trl.data_utils import maybe_apply_chat_template

from .candidates import LabelCost, PrefixScorer
from .chat import completions_like, is_messages
from .labels import (
    LabelBatch,
    LabelSource,
    check_label_sources,
    label_batch,
    labels_from_candidate_keywords,
    labels_summary,
)
from .reward_functions import RewardFunc, RewardFunctions, texts_for_rewards
from .stop_tokens import eos_token_ids

logger = logging.getLogger(__name__)

# Ancestral sampling from the policy itself: no temperature, top-k or top-p (whatever the generation config says).
PURE_SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def generate_and_score(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Dataset | IterableDataset | Iterable[dict[str, Any]],
    reward_funcs: RewardFunc | list[RewardFunc] | None = None,
    *,
    reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase] | None = None,
    reward_weights: list[float] | None = None,
    num_generations: int = 4,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    generation_kwargs: dict[str, Any] | None = None,
    logits_processor: list[LogitsProcessor] | None = None,
    show_progress: bool = True,
    truncated_completions: str = "terminal",
    seed: int | None = None,
    labels: LabelSource | Sequence[LabelSource] | None = None,
    candidate_rewards: int | None = None,
    candidate_stride: int = 1,
    prefix_shaping: bool = False,
    candidate_batch_size: int = 256,
    candidate_lookahead: int | None = None,
    candidate_beta: float | None = None,
) -> Dataset:
    """Sample `num_generations` completions per prompt and score them: a dataset ready for `QHeadTrainer`.

    Args:
        model: an `AutoModelForCausalLMWithQHead` or any transformers causal LM (anything with `generate`).
        tokenizer: the model's tokenizer (a chat template for conversational prompts).
        prompts: rows with a `prompt` column (a string, or a list of messages rendered with the chat template and a
            generation prompt); other columns are kept, repeated for each completion, and passed to the reward
            functions as keyword arguments (e.g. a reference `solution`).
        reward_funcs, reward_processing_classes, reward_weights: as for `QHeadTrainer` / TRL's `GRPOTrainer`. `None`
            only samples.
        num_generations: completions per prompt.
        max_new_tokens: a completion ends with EOS (a terminal action) or is cut here (see `truncated_completions`).
        batch_size: prompts per `generate` call (each yields `num_generations` sequences).
        generation_kwargs: more arguments for `generate`; sampling (`do_sample=True`) unless they say otherwise.
        logits_processor: processors for `generate`, e.g. `[QTiltLogitsProcessor(model, beta)]` to sample from the
            Q-tilted policy.
        show_progress: show a progress bar over the prompts.
        truncated_completions: what a completion cut at `max_new_tokens` is to the trainer, written to the `done`
            column (a completion that emits EOS is always `done`):
            - `"terminal"` (default): the episode ends where it was cut (`done=True`). The horizon is
              `max_new_tokens` and the sequence rewards judged the completion as it is, so the return of its last
              action is its reward, with nothing bootstrapped on top (which would count the future twice).
            - `"bootstrap"`: the episode goes on (`done=False`), so the trainer adds `gamma * V(s)` of the state
              where it was cut. For rewards that only judge the tokens seen so far: per-token rewards, or
              reference log-prob rewards (`use_lm_rewards`) with no sequence reward.
        seed: per-prompt seeding. Prompt `i` of `prompts` is sampled by its own `generate` call under
            `torch.manual_seed(seed + i)` (torch's RNG is restored afterwards), so its completions do not depend on
            `batch_size`, on the other prompts, or on how many processes share the work. `None` (default): one `generate`
            call per `batch_size` prompts, from the current RNG state.
        labels: a label source, or a list of them, labelling every batch after it is scored
            (`trl_qhead.labels`, docs/labels.md): `CandidateLabels(k, stride)` (the base model's top-k next tokens at
            every `stride`-th state, with their effects on the reward), `TwoStepLabels(k, lookahead, beta)` (plus the
            soft value one step ahead), `FutureValueLabels(k, num_continuations, beta)` (soft values of sampled
            continuations), `PrefixShaping()` (per-token shaped rewards); sources in a list share one memoised
            scorer (its batch size the smallest of theirs). Needs `reward_funcs`. `None` (default): no labels.
        candidate_rewards: deprecated, as are `candidate_stride`, `prefix_shaping`, `candidate_batch_size`,
            `candidate_lookahead` and `candidate_beta` (a `FutureWarning`; removed in the next release), in favour of
            `labels`, which they translate to: `candidate_rewards=k, candidate_stride=m, candidate_batch_size=b` is
            `labels=CandidateLabels(k, m, b)`; with `candidate_lookahead=k2, candidate_beta=beta`,
            `TwoStepLabels(k, k2, beta, m, b)`; `prefix_shaping=True` adds `PrefixShaping(b)`. Its meaning: k, or
            `None` (default) for none. Candidate labels (`trl_qhead.candidates`): at every
            `candidate_stride`-th state of each completion, the base model's (the model's LM head's) top-k next
            tokens `a`, with effects `R(prompt, decode(so_far + [a])) - R(prompt, decode(so_far))` from the reward
            functions, and the sampled token's own effect. Adds the token-aligned columns `candidate_ids`,
            `candidate_rewards` (k per scored position, `[]` elsewhere) and `candidate_sampled_reward` (0.0 where not
            scored), which `QHeadTrainer` turns into `k` extra Q targets per scored state. Needs `reward_funcs`.
        candidate_stride: label states `0, m, 2m, ...` of each completion (1: every state).
        prefix_shaping: score every prefix of each completion and write per-token `rewards`
            `R(prefix_{i+1}) - R(prefix_i)` (potential-based shaping, `trl_qhead.soft.prefix_shaped_rewards`: the
            same tilt, lower-variance targets) in place of the sequence reward: `reward` is then `None` and
            `sequence_reward` keeps the weighted sequence reward for reporting. For rewards that can score prefixes.
            Shares its prefix scores with the candidate labels.
        candidate_batch_size: texts per reward call when labelling (each distinct prompt + text is scored once).
        candidate_lookahead: k2, or `None` (default): two-step candidate labels. Each candidate's (and the sampled
            token's) entry becomes its effect plus the soft value of what can follow it, `r'(s, a) + beta log(sum_b
            pi(b|s+a) exp(r'(s+a, b) / beta) + (1 - sum_b pi(b|s+a)))` over the base model's top-k2 next tokens `b`
            after `a` (`trl_qhead.candidates`): the soft-optimal Q of a two-step episode. Needs `candidate_rewards`;
            costs one more forward per completion and `k2` texts scored per (state, candidate). Nothing follows a
            stop token, nor, under `truncated_completions="terminal"`, the `max_new_tokens`-th token.
        candidate_beta: the temperature of that soft value (> 0; the `beta` the tilt will use), with
            `candidate_lookahead` only.

    On several processes (`accelerate launch`, `PartialState().num_processes > 1`) each process samples and scores its
    own contiguous share of the prompts (`PartialState().split_between_processes`), and every process returns the
    whole dataset, in prompt order (`accelerate.utils.gather_object`): each sample is generated and scored once. With a
    `seed` the dataset is the one a single process returns. `model` is each process's own full copy (not wrapped by
    DDP, FSDP or DeepSpeed).

    Returns:
        A `Dataset` with, per completion: `prompt`, `completion` (text, or a one-message list for conversational
        prompts), `input_ids` (prompt + completion tokens), `completion_mask`, `done` (the last action ends the
        episode: the completion emitted EOS, or was cut under `truncated_completions="terminal"`), `reward` (the
        weighted sum of the sequence rewards, `None` where no function applied), `rewards` (token-aligned, when a
        function returns per-token rewards), one `reward_<name>` column per reward function (its raw output), the
        candidate columns above when asked, and the prompt's other columns. `QHeadTrainer` trains on it as a
        pre-tokenised dataset. With label sources, the labelling cost (`LabelCost`: reward calls, texts scored,
        continuations sampled, seconds; with the sources' names, `labels`, and options, `labels.labels_summary`) is
        logged and kept as JSON in `dataset.info.description` (`json.loads(data.info.description)["labelling_cost"]`).

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from trl.rewards import get_soft_overlong_punishment
    >>> prompts = Dataset.from_dict({"prompt": ["The capital of France is", "2 + 2 ="]})
    >>> data = generate_and_score(model, tokenizer, prompts, get_soft_overlong_punishment(32, 8), num_generations=4)
    >>> QHeadTrainer(model, QHeadConfig(output_dir="out"), train_dataset=data, processing_class=tokenizer).train()
    ```
    """
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"`num_generations` must be a positive integer, got {num_generations!r}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if truncated_completions not in ("terminal", "bootstrap"):
        raise ValueError(f"`truncated_completions` must be 'terminal' or 'bootstrap', got {truncated_completions!r}.")
    keywords = {
        "candidate_rewards": (candidate_rewards, None),
        "candidate_stride": (candidate_stride, 1),
        "prefix_shaping": (prefix_shaping, False),
        "candidate_batch_size": (candidate_batch_size, 256),
        "candidate_lookahead": (candidate_lookahead, None),
        "candidate_beta": (candidate_beta, None),
    }
    deprecated = [
        name for name, (value, default) in keywords.items() if type(value) is not type(default) or value != default
    ]
    if deprecated and labels is not None:
        raise ValueError(f"Pass `labels` or the deprecated {deprecated}, not both.")
    if deprecated:
        warnings.warn(
            f"`generate_and_score`'s {deprecated} are deprecated and will be removed in the next release: pass "
            "`labels=` a label source instead (`CandidateLabels(k, stride)`, `TwoStepLabels(k, lookahead, beta)`, "
            "`PrefixShaping()`; trl_qhead.labels).",
            FutureWarning,
            stacklevel=2,
        )
        sources = labels_from_candidate_keywords(
            model, candidate_rewards, candidate_stride, prefix_shaping, candidate_batch_size, candidate_lookahead,
            candidate_beta,
        )  # fmt: skip
    else:
        sources = check_label_sources(labels) if labels is not None else ()
    if sources and reward_funcs is None:
        raise ValueError(
            "Label sources (`labels`, `candidate_rewards`, `prefix_shaping`) score prefixes with "
            "`reward_funcs`: pass some."
        )
    for source in sources:  # before sampling anything
        source.check(model, max_new_tokens if truncated_completions == "terminal" else None)
    column_names = getattr(prompts, "column_names", None)
    if column_names is not None and "prompt" not in column_names:
        raise ValueError(f"The prompt dataset has columns {sorted(column_names)}; expected a `prompt` column.")
    functions = None
    if reward_funcs is not None:
        functions = RewardFunctions(reward_funcs, reward_processing_classes, reward_weights)
    elif reward_weights is not None:
        raise ValueError("`reward_weights` was given without `reward_funcs` to weigh.")
    pad_token_id = ensure_pad_token(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    kwargs = {"do_sample": True, **(generation_kwargs or {})}
    kwargs.update(max_new_tokens=max_new_tokens, num_return_sequences=num_generations, pad_token_id=pad_token_id)
    if logits_processor:
        kwargs["logits_processor"] = LogitsProcessorList(logits_processor)

    terminal_cuts = truncated_completions == "terminal"
    state = PartialState()
    first_index = 0
    if state.num_processes > 1:
        prompts, first_index = _share_of_prompts(prompts, state)
        show_progress = show_progress and state.is_main_process
    total = len(prompts) if hasattr(prompts, "__len__") else None
    rows: list[dict[str, Any]] = []
    cost = LabelCost()
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with (
            tqdm(total=total, desc="Generating and scoring", unit="prompt", disable=not show_progress) as bar,
            _restored_rng(model, seed is not None),
        ):
            for index, examples in _seeded_batches(prompts, batch_size, seed, first_index):
                if index is not None:
                    torch.manual_seed(seed + index)
                rows.extend(
                    _generate_batch(
                        model,
                        tokenizer,
                        examples,
                        functions,
                        eos_ids,
                        kwargs,
                        num_generations,
                        terminal_cuts,
                        sources,
                        cost,
                    )
                )
                bar.update(len(examples))
    finally:
        model.train(was_training)
    if state.num_processes > 1:
        rows = gather_object([rows])  # one list per process, in process order: prompt order
        rows = [row for process_rows in rows for row in process_rows]
    if not rows:
        raise ValueError("The prompt dataset is empty.")
    # A batch where no function returned per-token rewards has no `rewards` key: every row gets every column.
    keys = list(dict.fromkeys(key for row in rows for key in row))
    info = None
    if sources:
        summary = labels_summary(sources, cost)
        logger.info("Labelling cost: %s", summary)
        info = DatasetInfo(description=json.dumps({"labelling_cost": summary}))
    return Dataset.from_list([{key: row.get(key) for key in keys} for row in rows], info=info)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, setting `pad_token = eos_token` first when it has none (GPT-2), as TRL's trainers do.

    Batched prompts are padded by the tokenizer itself (`padding=True`), which refuses to pad without a pad token.
    Padding is read from the attention mask, never from token ids, so EOS as the pad is safe. Raises a `ValueError`
    when the tokenizer has neither token.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token to pad prompts with.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


def _share_of_prompts(prompts, state: PartialState) -> tuple[list[dict], int]:
    """This process's contiguous share of the prompts (`split_between_processes`) and the index of its first one."""
    examples = [dict(example) for example in prompts]
    with state.split_between_processes(list(range(len(examples)))) as indices:
        indices = list(indices)
    return [examples[i] for i in indices], (indices[0] if indices else len(examples))


def _seeded_batches(prompts, batch_size: int, seed: int | None, first_index: int):
    """`(index, examples)`: batches of `batch_size` prompts (index `None`) or, with a seed, one prompt at a time with
    its index in the whole prompt dataset."""
    if seed is None:
        for examples in _batches(prompts, batch_size):
            yield None, examples
        return
    for offset, examples in enumerate(_batches(prompts, 1)):
        yield first_index + offset, examples


def _restored_rng(model, active: bool):
    """Fork torch's RNG (CPU, and the model's CUDA device) for the seeded sampling, so the caller's stream goes on."""
    if not active:
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _batches(prompts, batch_size: int):
    batch = []
    for index, example in enumerate(prompts):
        if "prompt" not in example:
            raise ValueError(f"Prompt example {index} has columns {sorted(example)}; expected a `prompt` column.")
        batch.append(dict(example))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def completion_tokens(
    generated: list[int], eos_ids: set[int], pad_token_id: int, max_new_tokens: int
) -> tuple[list[int], bool]:
    """A completion's own tokens among what `generate` returned for its row, and whether generation ended it.

    A completion ends at its first EOS (kept: it is the terminal action). Without EOS, it was either cut at
    `max_new_tokens` (`ended` is False) or stopped earlier by a stopping criterion such as `stop_strings` (`ended` is
    True), and `generate` padded the rest of its row: trailing pad tokens are not part of it. (When the pad token is an
    EOS token, as for GPT-2, a row stopped early reads as one that emitted EOS.)
    """
    for k, token in enumerate(generated):
        if token in eos_ids:
            return generated[: k + 1], True
    end = len(generated)
    while end > 0 and generated[end - 1] == pad_token_id:
        end -= 1
    return generated[:end], end < max_new_tokens


@torch.no_grad()
def _generate_batch(
    model,
    tokenizer,
    examples,
    functions,
    eos_ids,
    kwargs,
    num_generations,
    cut_is_terminal: bool,
    sources: Sequence[LabelSource] = (),
    cost: LabelCost | None = None,
) -> list[dict]:
    texts = [maybe_apply_chat_template({"prompt": e["prompt"]}, tokenizer)["prompt"] for e in examples]
    # Chat templates carry their own special tokens, plain prompts get none: as the training data is tokenised.
    encoded = tokenizer(text=texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    for text, ids in zip(texts, encoded["attention_mask"].sum(1).tolist(), strict=True):
        if ids == 0:
            raise ValueError(f"Prompt {text!r} has no tokens: generation needs at least one.")
    device = next(model.parameters()).device
    sequences = model.generate(
        input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device), **kwargs
    ).cpu()
    prompt_width = encoded["input_ids"].shape[1]

    prompts, prompt_ids, completion_ids, dones, columns = [], [], [], [], {}
    for row, sequence in enumerate(sequences):
        example = examples[row // num_generations]
        mask = encoded["attention_mask"][row // num_generations].bool()
        prompt_ids.append(encoded["input_ids"][row // num_generations][mask].tolist())
        completion, ended = completion_tokens(
            sequence[prompt_width:].tolist(), eos_ids, kwargs["pad_token_id"], kwargs["max_new_tokens"]
        )
        completion_ids.append(completion)
        # Cut at `max_new_tokens`: its end is terminal or not as the caller says.
        dones.append(ended or cut_is_terminal)
        prompts.append(example["prompt"])
        for key, value in example.items():
            if key != "prompt":
                columns.setdefault(key, []).append(value)
    # Reward functions score the texts of exactly these tokens (`texts_for_rewards`); conversations stay messages.
    prompt_texts, texts = texts_for_rewards(tokenizer, prompt_ids, completion_ids)
    scored_prompts = [p if is_messages(p) else text for p, text in zip(prompts, prompt_texts, strict=True)]
    completions = completions_like(prompts, texts)
    rows = [
        {
            "prompt": prompt,
            "completion": completion,
            "input_ids": p_ids + c_ids,
            "completion_mask": [0] * len(p_ids) + [1] * len(c_ids),
            "done": done,
            **{key: values[row] for key, values in columns.items()},
        }
        for row, (prompt, completion, p_ids, c_ids, done) in enumerate(
            zip(prompts, completions, prompt_ids, completion_ids, dones, strict=True)
        )
    ]
    if functions is None:
        return rows

    scored = functions.score(scored_prompts, completions, completion_ids, **columns)
    sequence = scored.sequence
    total = scored.weighted_sequence(functions.weights)  # NaN where no function returned a sequence reward
    per_token = scored.weighted_per_token(functions.weights)
    has_per_token = any(values is not None for values in per_token)
    for row, data in enumerate(rows):
        data["reward"] = None if math.isnan(total[row]) else float(total[row])
        if has_per_token:
            token_rewards = torch.zeros(len(data["input_ids"]))
            if per_token[row] is not None:
                token_rewards[len(prompt_ids[row]) :] += per_token[row]
            data["rewards"] = token_rewards.tolist()
        for i, name in enumerate(functions.names):
            values = scored.per_token[i][row]
            value = sequence[row, i].item()
            data[f"reward_{name}"] = values.tolist() if values is not None else None if math.isnan(value) else value
    if sources:
        extra = [{key: value for key, value in e.items() if key != "prompt"} for e in examples]
        scorer = PrefixScorer(functions, tokenizer, min(getattr(source, "batch_size", 256) for source in sources))
        for g, (example, columns) in enumerate(zip(examples, extra, strict=True)):
            scorer.add_group(g, example["prompt"], columns)
        batch = LabelBatch(
            model=model,
            tokenizer=tokenizer,
            scorer=scorer,
            prompt_ids=prompt_ids,
            completion_ids=completion_ids,
            groups=[row // num_generations for row in range(len(rows))],
            group_prompts=[e["prompt"] for e in examples],
            group_columns=extra,
            sequence_rewards=[data["reward"] for data in rows],
            pad_token_id=kwargs["pad_token_id"],
            horizon=kwargs["max_new_tokens"] if cut_is_terminal else None,
            stop_ids=frozenset(eos_ids),
        )
        labelled, batch_cost = label_batch(sources, batch)
        cost.add(batch_cost)
        for data, columns in zip(rows, labelled, strict=True):
            data.update(columns)
    return rows


@dataclass
class Samples:
    """Completions of a list of prompts, `num_samples` per prompt, prompt-major (`prompt_index[i] = i // num_samples`).

    Attributes:
        prompts: the prompts, once each.
        num_samples: completions per prompt.
        prompt_ids: token ids of each prompt (no padding).
        completion_ids: token ids of each completion, up to and including its first EOS (nothing after it).
        texts: the decoded completions (special tokens skipped).
        kl: per-completion KL(pi' || pi) summed over its steps, from the tilt processor; `None` for base samples.
        seconds: wall time of the `generate` calls.
        rewards: per-completion rewards, once scored.
        nll, n_tokens: per-completion NLL under a reference model and token count
            (`trl_qhead.evaluation.score_likelihood`).
    """

    prompts: list[str]
    num_samples: int
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    kl: list[float] | None = None
    seconds: float = 0.0
    rewards: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    n_tokens: list[int] = field(default_factory=list)

    def prompt_of(self, i: int) -> str:
        return self.prompts[i // self.num_samples]

    def select(self, indices: Sequence[int]) -> dict[str, list]:
        """The rows `indices` as plain lists (prompt, completion text and ids, reward)."""
        return {
            "prompts": [self.prompt_of(i) for i in indices],
            "prompt_ids": [self.prompt_ids[i // self.num_samples] for i in indices],
            "completion_ids": [self.completion_ids[i] for i in indices],
            "texts": [self.texts[i] for i in indices],
            "rewards": [self.rewards[i] for i in indices] if self.rewards else [],
            "nll": [self.nll[i] for i in indices] if self.nll else [],
            "n_tokens": [self.n_tokens[i] for i in indices] if self.n_tokens else [],
        }


@torch.no_grad()
def sample_completions(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    num_samples: int,
    *,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    logits_processor_factory: Callable[[], object] | None = None,
    generation_kwargs: dict[str, Any] | None = None,
    desc: str = "sampling",
) -> Samples:
    """The evaluation sampler: `num_samples` completions per prompt with `generate` (pure ancestral sampling unless
    `generation_kwargs` say otherwise), with a fresh logits processor per `generate` call so that its per-sequence KL
    can be read, and the time spent in `generate` (training data comes from `generate_and_score` instead).

    Args:
        model: an `AutoModelForCausalLMWithQHead` (or any causal LM with `generate`).
        tokenizer: its tokenizer; prompts are tokenised without special tokens and left-padded.
        prompts: the prompts.
        num_samples: completions per prompt.
        max_new_tokens: a completion ends at EOS or after this many tokens.
        batch_size: sequences per `generate` call (a multiple of `num_samples` is fastest; prompts are never split).
        seed: `transformers.set_seed` before sampling, so a run is reproducible.
        logits_processor_factory: builds a fresh logits processor for each `generate` call (e.g. a
            `QTiltLogitsProcessor`); its per-sequence `kl` is read after the call.
        generation_kwargs: sampling arguments for `generate`; default `PURE_SAMPLING`.
        desc: progress-bar label.
    """
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("`num_samples`, `max_new_tokens` and `batch_size` must all be >= 1.")
    set_seed(seed)
    eos = eos_token_ids(model, tokenizer)
    pad_id = ensure_pad_token(tokenizer)
    prompts_per_call = max(1, batch_size // num_samples)
    prompt_ids, completion_ids, kls = [], [], []
    seconds = 0.0
    model.eval()
    device = next(model.parameters()).device
    with tqdm(total=len(prompts) * num_samples, desc=desc, unit="sample", dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), prompts_per_call):
            chunk = list(prompts[start : start + prompts_per_call])
            enc = tokenizer(chunk, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
            if (enc["attention_mask"].sum(1) == 0).any():
                raise ValueError("A prompt has no tokens: generation needs at least one.")
            kwargs = {}
            processor = None
            if logits_processor_factory is not None:
                processor = logits_processor_factory()
                kwargs["logits_processor"] = LogitsProcessorList([processor])
            began = time.perf_counter()
            out = model.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                **(PURE_SAMPLING if generation_kwargs is None else generation_kwargs),
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=pad_id,
                **kwargs,
            ).cpu()
            seconds += time.perf_counter() - began
            width = enc["input_ids"].shape[1]
            for row, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True):
                prompt_ids.append(row[mask.bool()].tolist())
            for sequence in out:
                completion = sequence[width:].tolist()
                end = next((k + 1 for k, token in enumerate(completion) if token in eos), len(completion))
                completion_ids.append(completion[:end])
            if processor is not None:
                kls.extend(float(k) for k in processor.kl.reshape(-1).tolist())
                if hasattr(processor, "remove"):  # QTiltLogitsProcessor: take its hook off the model now
                    processor.remove()
            bar.update(len(out))
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Samples(
        prompts=list(prompts),
        num_samples=num_samples,
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        texts=texts,
        kl=kls if logits_processor_factory is not None else None,
        seconds=seconds,
    )
