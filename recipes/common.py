"""What the recipes share (`demo_sentiment.py`, `benchmark_frontier.py`, `gvpo_frontier.py`): the model, the command
line of the demo's data, training and evaluation settings, and its data, training and sampling steps.

The tasks (prompts and rewards) are in `tasks.py`. Importing this module sets the environment that torch and the hub
read at their import (offline hub, OpenMP's passive waiting), so the scripts import it before torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer, generate_and_score  # noqa: E402
from trl_qhead.candidates import check_candidate_args  # noqa: E402
from trl_qhead.config import Q_HEAD_ONLY_BIAS_LEARNING_RATE, Q_HEAD_ONLY_LEARNING_RATE  # noqa: E402
from trl_qhead.evaluation import BEST_OF_NS  # noqa: E402
from trl_qhead.labels import CandidateLabels, FutureValueLabels, TwoStepLabels  # noqa: E402
from trl_qhead.rollouts import PURE_SAMPLING, Samples, sample_completions  # noqa: E402

if __package__:  # a checkout's `recipes`, or the installed `trl_qhead.recipes`
    from .offline_assets import model_path
    from .tasks import PROMPTS_FILE
else:
    from recipes.offline_assets import model_path
    from recipes.tasks import PROMPTS_FILE

DEFAULT_BETAS = (1.0, 0.5, 0.3, 0.2, 0.15)
# Pure ancestral sampling (transformers' defaults would add top-k 50): the sampled policy is exactly the softmax that
# the tilt's KL and best-of-N's KL are measured against.
SAMPLING = PURE_SAMPLING


def score(samples: Samples, reward_fn: Callable) -> Samples:
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

    `labels`: `"mc"` drops any candidate columns (one Monte Carlo label per sampled action); `"candidates"` and
    `"effects"` carry them as they are (effects are differences of rewards, which the per-prompt centring does not
    change). With `"effects"` the trainer leaves the returns out (`QHeadConfig(q_labels="effects")`, see `train_qhead`).
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
        row = {"input_ids": input_ids, "completion_mask": mask, "done": done, "reward": rewards[i] - baseline}
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
    labels: str = "candidates",
    eval_dataset: dict[str, Dataset] | None = None,
) -> list[dict]:
    """Train the adapters and the Q head on the scored samples (Monte Carlo returns, gamma 1); returns the log, and
    with `eval_dataset` (named sets of rows like `dataset`'s) ends with one evaluation of each (`eval_<name>_*`).

    Without adapters the Q head trains alone on the frozen model, with no LM loss (`QHeadConfig(q_head_only=True)`):
    the policy stays the pretrained model exactly. `labels="effects"` is `QHeadConfig(q_labels="effects")`: every
    label is a candidate's immediate effect relative to the sampled token, `r'(s, a) - r'(s, a_t)`, and the sampled
    token sits at 0 (a one-step head, the learned counterpart of `RewardLookahead`, free of the noise the sampled return
    adds to every label of a state, and blind to later rewards); `"mc"` and `"candidates"` train on the returns.

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
        q_labels="effects" if labels == "effects" else "returns",
        q_head_only=not model.is_peft_model or model.q_head.leaves_policy_frozen,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
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
    trainer = QHeadTrainer(model, args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer)
    trainer.train()
    if eval_dataset is not None:
        trainer.evaluate()
    return [
        entry
        for entry in trainer.state.log_history
        if "loss" in entry or "loss_q" in entry or any(key.startswith("eval_") for key in entry)
    ]


def train_from_args(
    model,
    tokenizer,
    dataset: Dataset,
    args: argparse.Namespace,
    *,
    q_target: str | None = None,
    labels: str | None = None,
    eval_dataset: dict[str, Dataset] | None = None,
) -> list[dict]:
    """`train_qhead` with the command line's epochs, batch size, learning rates, labels and seed (`q_target` and
    `labels` override `args.q_target` and `args.labels`), evaluated at the end on `eval_dataset`; the checkpoint folder
    is `args.output_dir/checkpoint` (nothing is saved there)."""
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
        labels=args.labels if labels is None else labels,
        eval_dataset=eval_dataset,
    )


# ---- the run ----------------------------------------------------------------------------------------------------------


def load_model(
    name: str,
    lora_r: int,
    lora_layers: int,
    dtype: torch.dtype = torch.float32,
    q_head_type: str = "dense",
    q_head_options: dict | None = None,
):
    """The tokenizer and an `AutoModelForCausalLMWithQHead` (a `q_head_type` Q head, built with `q_head_options`)
    with LoRA adapters on the top `lora_layers` blocks (all of them when 0; no adapters when `lora_r` is 0; with
    `q_head_type="adapter"` they are the Q network)."""
    path = model_path(name)
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
        path, peft_config=peft_config, dtype=dtype, q_head_type=q_head_type, q_head_options=q_head_options
    )
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


def build_parser(description: str, output_dir: str) -> argparse.ArgumentParser:
    """The demo's command line (other recipes add their own flags to it)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline, from PyPI) or a hub name / local folder")
    p.add_argument("--output_dir", default=output_dir)
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
    p.add_argument("--q_learning_rate", type=float, default=Q_HEAD_ONLY_LEARNING_RATE, help="Q head weight")
    p.add_argument("--q_bias_learning_rate", type=float, default=Q_HEAD_ONLY_BIAS_LEARNING_RATE, help="Q head bias")
    p.add_argument("--q_weight", type=float, default=1.0)
    p.add_argument("--prompts_file", default=str(PROMPTS_FILE), help="one prompt per line (default: the demo's)")
    p.add_argument(
        "--reward",
        default="vader",
        help="'vader' (VADER sentiment of the completion), 'tone' (sentiment in the tone the prompt asks for: use "
        "--prompts_file recipes/data/tone_openings.txt), 'judge' (recipes/tasks.py) or 'package.module:function', a "
        "TRL reward function",
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
        "--candidate_beta",
        type=float,
        default=0.3,
        help="the temperature of that soft value (--candidate_lookahead) or of the future value (--future_continuations)",
    )
    p.add_argument(
        "--future_continuations",
        type=int,
        default=None,
        help="n: future-value candidate labels (FutureValueLabels, Q#'s target), each candidate valued by "
        "beta log mean exp(G / beta) over n base-policy continuations to the episode's end, beta --candidate_beta; "
        "none by default",
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
        for flag in ("candidate_lookahead", "future_continuations"):
            if getattr(args, flag) is not None:
                raise ValueError(f"`--{flag}` values the candidates: use `--labels effects` or `candidates`.")
    elif args.future_continuations is not None:  # FutureValueLabels' own checks, before the model loads
        if args.candidate_lookahead is not None:
            raise ValueError("`--future_continuations` and `--candidate_lookahead` are two label sources: pick one.")
        try:
            training_labels(args)
        except ValueError as error:
            raise ValueError(
                f"{error} (`--candidate_k`, `--future_continuations`, `--candidate_beta` and `--candidate_stride` are "
                "FutureValueLabels' k, num_continuations, beta and stride)"
            ) from None
    else:  # generate_and_score's own checks, before the model loads
        lookahead = args.candidate_lookahead
        try:
            check_candidate_args(
                args.candidate_k, args.candidate_stride, False, lookahead, args.candidate_beta if lookahead else None
            )
        except ValueError as error:
            raise ValueError(f"{error} (`--candidate_k` is generate_and_score's `candidate_rewards`)") from None
    return args


def training_labels(args: argparse.Namespace) -> CandidateLabels | TwoStepLabels | FutureValueLabels:
    """The label source of `--candidate_k`, `--candidate_stride` and (two-step) `--candidate_lookahead` or (future
    value) `--future_continuations`, with `--candidate_beta`."""
    if args.future_continuations is not None:
        return FutureValueLabels(
            args.candidate_k, args.future_continuations, beta=args.candidate_beta, stride=args.candidate_stride
        )
    if args.candidate_lookahead:
        return TwoStepLabels(
            args.candidate_k,
            lookahead=args.candidate_lookahead,
            beta=args.candidate_beta,
            stride=args.candidate_stride,
        )
    return CandidateLabels(args.candidate_k, stride=args.candidate_stride)


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
        labels=training_labels(args) if candidates else None,
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
