"""GVPO on the evaluation frontier: policies trained with GVPO, beside base sampling and best-of-N, at equal KL.

GVPO (`trl_qhead.gvpo`) trains a policy towards `pi_ref exp(R / beta) / Z`, the target that the Q tilt also aims at.
This script puts GVPO-trained policies on the demo's reward-vs-KL table (`recipes/demo_sentiment.py`), with the demo's
prompts, reward, data and evaluation settings and seeds:

1. Data: the demo's training groups (`generate_and_score`, `--num_generations` completions per training prompt from
   the pretrained model, pure ancestral sampling, VADER sentiment), sampled with the demo's seed: the same completions.
2. Training, once per beta of `--betas`: LoRA adapters (`--lora_r`, top `--lora_layers` blocks) trained offline with
   the GVPO loss on those groups (`gvpo_loss_on_groups`, the reference being the pretrained model, i.e. the adapters
   disabled), `--epochs` passes of `--groups_per_step` prompts per AdamW step. Every policy starts from the
   pretrained model.
3. Evaluation on the demo's held-out prompts: base sampling and best-of-N from `--eval_samples` pretrained samples per
   prompt (the demo's seed: with `--lora_r 0` the demo's base policy is the pretrained one, and these rows are its
   rows), and `--policy_samples` samples per prompt from each GVPO policy (the seed of the demo's Q-tilted samples),
   with their mean reward, their KL to the pretrained policy estimated from the samples (the mean of
   `log pi_theta(y|x) - log pi_base(y|x)` over them, summed over completion tokens), distinct-2, the pretrained
   model's perplexity, the training time and the sampling time; and each GVPO row against best-of-N at equal KL
   (`frontier_comparison`, gain ratios).

Usage:
    python recipes/gvpo_frontier.py --threads 2                    # SmolLM2-135M-Instruct, betas 0.5 0.2 0.05
    python recipes/gvpo_frontier.py --betas 1 0.3 --epochs 2 --learning_rate 2e-4 --lora_r 8

Outputs go to `--output_dir` (default `outputs/gvpo_frontier/`): `results.md`, `results.json` (the rows, the
comparison, training logs and every GVPO sample with its token ids and log-ratio), `frontier.png`, and the adapters
of each policy in `adapters/beta_<beta>/` (PEFT's format). `gvpo_rows` returns the rows for another frontier.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if not __package__ and str(REPO_ROOT) not in sys.path:  # `python recipes/gvpo_frontier.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

# `common` first: it sets the environment (offline hub, OpenMP's passive waiting) that torch reads at its import.
if __package__:  # a checkout's `recipes`, or the installed `trl_qhead.recipes`
    from . import common, tasks
else:
    from recipes import common, tasks

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PreTrainedTokenizerBase, set_seed  # noqa: E402

from trl_qhead import AutoModelForCausalLMWithQHead  # noqa: E402
from trl_qhead.evaluation import (  # noqa: E402
    BEST_OF_NS,
    FrontierRow,
    base_and_best_of_n_rows,
    frontier_comparison,
    frontier_json,
    markdown_table,
    mean_gain_ratio,
    plot_frontier,
    policy_log_ratios,
    policy_row,
    score_likelihood,
)
from trl_qhead.gvpo import group_rows, gvpo_loss_on_groups  # noqa: E402
from trl_qhead.reference import as_reference  # noqa: E402
from trl_qhead.rollouts import Samples, sample_completions  # noqa: E402

DEFAULT_BETAS = (0.5, 0.2, 0.05)
METHOD = "GVPO"


@dataclass
class GVPOPolicy:
    """One GVPO-trained policy, evaluated: its frontier row, its held-out samples (scored, with the pretrained
    model's likelihood), each sample's `log pi_theta(y|x) - log pi_base(y|x)` (the row's KL is their mean), its
    training log (one entry per optimizer step) and the folder its adapters were saved to (or `None`)."""

    beta: float
    row: FrontierRow
    samples: Samples
    log_ratios: list[float]
    train_log: list[dict] = field(default_factory=list)
    adapters_dir: str | None = None


# ---- data and base rows (the demo's calls, with the demo's seeds) --------------------------------------------------


def training_groups(model, tokenizer, train_prompts: Sequence[str], reward_fn: Callable, args) -> Dataset:
    """The demo's training data: `args.num_generations` scored completions per prompt from the pretrained policy
    (adapters disabled), sampled as `recipes/demo_sentiment.py` samples them (`common.sample_training_data`: same seed,
    batching and sampling arguments), without candidate labels."""
    with as_reference(model.pretrained_model):
        scored, _ = common.sample_training_data(
            model, tokenizer, train_prompts, reward_fn, args, args.num_generations, candidates=False
        )
    return scored


def base_rows(model, tokenizer, eval_prompts: Sequence[str], reward_fn: Callable, args) -> list[FrontierRow]:
    """Base sampling and best-of-N rows from `args.eval_samples` samples per held-out prompt of the pretrained policy
    (adapters disabled), drawn as the demo draws them (`common.sample_scored`, seed `seed + 1`)."""
    backbone = model.pretrained_model
    with as_reference(backbone):
        base = common.sample_scored(model, tokenizer, eval_prompts, reward_fn, args)
        score_likelihood(base, backbone, tokenizer.pad_token_id)
    return base_and_best_of_n_rows(base)


def train_gvpo(
    model: AutoModelForCausalLMWithQHead,
    groups: Sequence[Sequence[dict]],
    *,
    beta: float,
    epochs: int,
    learning_rate: float,
    groups_per_step: int,
    seed: int,
    pad_token_id: int,
    max_grad_norm: float = 1.0,
) -> list[dict]:
    """Train the model's adapters with the GVPO loss on offline groups (AdamW, constant rate); returns the log.

    Each epoch visits the groups in a seeded random order (the same order for every beta), `groups_per_step` of them
    (whole groups: the loss is a variance within each) per step. Dropout is off throughout, so that
    `Delta = log pi_theta - log pi_ref` carries no dropout noise; the reference is the adapters disabled.
    """
    backbone = model.pretrained_model
    params = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    backbone.eval()
    log = []
    for epoch in range(epochs):
        order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(order), groups_per_step):
            batch = [groups[i] for i in order[start : start + groups_per_step]]
            out = gvpo_loss_on_groups(backbone, batch, beta, pad_token_id=pad_token_id)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            m = out.mask.float()
            log.append(
                {
                    "step": len(log) + 1,
                    "epoch": epoch + (start + len(batch)) / len(order),
                    "loss": float(out.loss.detach()),
                    "log_ratio_mean": float(out.log_ratio.sum() / m.sum().clamp(min=1)),
                    "grad_norm": float(grad_norm),
                }
            )
        print(f"      beta={beta:g} epoch {epoch + 1}/{epochs}: loss {log[-1]['loss']:.4f}", flush=True)
    return log


def evaluate_policy(
    model: AutoModelForCausalLMWithQHead,
    tokenizer: PreTrainedTokenizerBase,
    eval_prompts: Sequence[str],
    reward_fn: Callable,
    *,
    setting: str,
    policy_samples: int,
    max_new_tokens: int,
    gen_batch_size: int,
    seed: int,
    train_seconds: float | None = None,
) -> tuple[FrontierRow, Samples, list[float]]:
    """Sample the adapted policy on the held-out prompts (seed `seed + 2`, the demo's Q-tilted seed), score the samples
    and their likelihood under the pretrained model; returns the row, the samples and each sample's log-ratio
    `log pi_theta(y|x) - log pi_base(y|x)` (base: adapters disabled), whose mean is the row's KL."""
    backbone = model.pretrained_model
    samples = sample_completions(
        model,
        tokenizer,
        eval_prompts,
        policy_samples,
        max_new_tokens=max_new_tokens,
        batch_size=gen_batch_size,
        seed=seed + 2,
        generation_kwargs=common.SAMPLING,
        desc=f"{METHOD} {setting}",
    )
    common.score(samples, reward_fn)
    prompt_ids = [samples.prompt_ids[i // samples.num_samples] for i in range(len(samples.completion_ids))]
    log_ratios = policy_log_ratios(backbone, prompt_ids, samples.completion_ids, pad_token_id=tokenizer.pad_token_id)
    with as_reference(backbone):
        score_likelihood(samples, backbone, tokenizer.pad_token_id)
    kl = sum(log_ratios) / len(log_ratios)
    return policy_row(samples, METHOD, setting, kl=kl, train_seconds=train_seconds), samples, log_ratios


def gvpo_policies(
    model: AutoModelForCausalLMWithQHead,
    tokenizer: PreTrainedTokenizerBase,
    scored: Dataset,
    eval_prompts: Sequence[str],
    reward_fn: Callable = tasks.sentiment_reward,
    *,
    betas: Sequence[float] = DEFAULT_BETAS,
    num_generations: int = 8,
    epochs: int = 2,
    learning_rate: float = 5e-4,
    groups_per_step: int = 2,
    policy_samples: int = 4,
    max_new_tokens: int = 24,
    gen_batch_size: int = 64,
    seed: int = 0,
    adapters_dir: str | Path | None = None,
) -> list[GVPOPolicy]:
    """Train one GVPO policy per beta on the scored groups and evaluate each on the held-out prompts.

    Args:
        model: an `AutoModelForCausalLMWithQHead` with LoRA adapters (`recipes/common.py::load_model`); the
            adapters disabled are the reference (the base policy of the KL), and every policy starts from the adapter
            weights as given (LoRA's init: the pretrained model). They are restored when this returns.
        tokenizer: its tokenizer.
        scored: `generate_and_score` rows, `num_generations` consecutive completions per prompt.
        eval_prompts: the held-out prompts.
        reward_fn: the reward of the evaluation (a TRL reward function).
        betas: GVPO's KL coefficients, one policy each.
        num_generations: the group size of `scored`.
        epochs, learning_rate, groups_per_step: the training (see `train_gvpo`).
        policy_samples: samples per held-out prompt from each policy.
        max_new_tokens, gen_batch_size: sampling.
        seed: the run's seed (the demo's): shuffling `seed + epoch`, sampling `seed + 2`.
        adapters_dir: where to save each policy's adapters (`<adapters_dir>/beta_<beta>`), or `None`.
    """
    if not model.is_peft_model:
        raise ValueError("`model` must have LoRA adapters (`load_model(..., lora_r > 0)`): GVPO trains them.")
    if not betas or any(not (math.isfinite(b) and b > 0) for b in betas):
        raise ValueError(f"`betas` must be finite numbers > 0, got {list(betas)!r}.")
    groups = group_rows(scored.to_list(), num_generations)
    backbone = model.pretrained_model
    initial = {n: p.detach().clone() for n, p in backbone.named_parameters() if p.requires_grad}
    policies = []
    try:
        for beta in betas:
            setting = f"beta={beta:g}"
            with torch.no_grad():  # every policy starts from the same adapters
                for name, p in backbone.named_parameters():
                    if name in initial:
                        p.copy_(initial[name])
            print(f"      training {METHOD} {setting} on {len(groups)} groups of {num_generations}", flush=True)
            began = time.perf_counter()
            log = train_gvpo(
                model,
                groups,
                beta=beta,
                epochs=epochs,
                learning_rate=learning_rate,
                groups_per_step=groups_per_step,
                seed=seed,
                pad_token_id=tokenizer.pad_token_id,
            )
            train_seconds = time.perf_counter() - began
            row, samples, log_ratios = evaluate_policy(
                model,
                tokenizer,
                eval_prompts,
                reward_fn,
                setting=setting,
                policy_samples=policy_samples,
                max_new_tokens=max_new_tokens,
                gen_batch_size=gen_batch_size,
                seed=seed,
                train_seconds=train_seconds,
            )
            saved = None
            if adapters_dir is not None:
                saved = str(Path(adapters_dir) / f"beta_{beta:g}")
                backbone.save_pretrained(saved)
            print(
                f"      {METHOD} {setting}: reward {row.reward:+.3f}, KL {row.kl:.3f}, training {train_seconds:.0f} s",
                flush=True,
            )
            policies.append(GVPOPolicy(beta, row, samples, log_ratios, log, saved))
    finally:
        with torch.no_grad():
            for name, p in backbone.named_parameters():
                if name in initial:
                    p.copy_(initial[name])
    return policies


def gvpo_rows(*args, **kwargs) -> list[FrontierRow]:
    """The frontier rows of `gvpo_policies(*args, **kwargs)`, one per beta (method "GVPO", setting "beta=<beta>")."""
    return [policy.row for policy in gvpo_policies(*args, **kwargs)]


# ---- the run ----------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = common.build_parser("", "").parse_args(
        []
    )  # the demo's data and evaluation settings are this script's defaults
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default=d.model, help="'smollm2' (offline, from PyPI) or a hub name / local folder")
    p.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "gvpo_frontier"))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--n_train_prompts", type=int, default=d.n_train_prompts)
    p.add_argument("--n_eval_prompts", type=int, default=d.n_eval_prompts)
    p.add_argument("--num_generations", type=int, default=d.num_generations, help="GVPO's group size k")
    p.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--prompts_file", default=d.prompts_file, help="one prompt per line (default: the demo's)")
    p.add_argument("--reward", default=d.reward, help="'vader' or 'package.module:function', a TRL reward function")
    p.add_argument("--betas", type=float, nargs="+", default=list(DEFAULT_BETAS), help="one GVPO policy per beta")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training groups")
    p.add_argument("--learning_rate", type=float, default=5e-4, help="LoRA adapters (AdamW, constant)")
    p.add_argument("--groups_per_step", type=int, default=2, help="prompts (groups of k completions) per step")
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank of the GVPO policies (>= 1)")
    p.add_argument("--lora_layers", type=int, default=d.lora_layers, help="adapt the top N blocks (0: all)")
    p.add_argument("--eval_samples", type=int, default=d.eval_samples, help="base samples per held-out prompt")
    p.add_argument("--policy_samples", type=int, default=d.tilted_samples, help="samples per prompt and policy")
    p.add_argument("--gen_batch_size", type=int, default=d.gen_batch_size)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no_save_adapters", action="store_true", help="do not save each policy's adapters")
    args = p.parse_args(argv)
    if args.eval_samples % max(BEST_OF_NS):
        p.error(f"--eval_samples must be a multiple of {max(BEST_OF_NS)} (the largest best-of-N).")
    if any(not (math.isfinite(b) and b > 0) for b in args.betas):
        p.error("--betas must all be finite and > 0.")
    if args.lora_r < 1:
        p.error("--lora_r must be >= 1: GVPO trains the LoRA adapters.")
    for name in ("epochs", "groups_per_step", "policy_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1.")
    if args.num_generations < 2:
        p.error("--num_generations must be >= 2: GVPO's loss is a variance within each group.")
    return args


def run(args: argparse.Namespace) -> dict:
    """The whole comparison; returns what `results.json` holds."""
    began = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)

    print(
        f"[1/4] Loading {args.model} with LoRA adapters (r={args.lora_r}, top {args.lora_layers} blocks)", flush=True
    )
    model, tokenizer = common.load_model(args.model, args.lora_r, args.lora_layers)
    reward_fn = tasks.resolve_reward(args.reward)
    train_prompts, eval_prompts = tasks.split_prompts(
        tasks.load_prompts(args.prompts_file), args.n_train_prompts, args.n_eval_prompts, args.seed
    )

    print(f"[2/4] The demo's training groups: {args.num_generations} completions x {len(train_prompts)}", flush=True)
    began_data = time.perf_counter()
    scored = training_groups(model, tokenizer, train_prompts, reward_fn, args)
    data_seconds = time.perf_counter() - began_data

    print(f"[3/4] Base sampling and best-of-N on {len(eval_prompts)} held-out prompts", flush=True)
    rows = base_rows(model, tokenizer, eval_prompts, reward_fn, args)

    print(f"[4/4] GVPO policies for beta in {args.betas}", flush=True)
    policies = gvpo_policies(
        model,
        tokenizer,
        scored,
        eval_prompts,
        reward_fn,
        betas=args.betas,
        num_generations=args.num_generations,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        groups_per_step=args.groups_per_step,
        policy_samples=args.policy_samples,
        max_new_tokens=args.max_new_tokens,
        gen_batch_size=args.gen_batch_size,
        seed=args.seed,
        adapters_dir=None if args.no_save_adapters else out_dir / "adapters",
    )
    rows += [policy.row for policy in policies]
    comparison = frontier_comparison(rows)
    results = {
        "model": args.model,
        "args": vars(args),
        "rows": frontier_json(rows),
        "vs_best_of_n_at_equal_kl": comparison,
        "mean_gain_ratio_kl_0.2_1.5": mean_gain_ratio(comparison, (0.2, 1.5), method=METHOD),
        "data_seconds": data_seconds,
        "train_reward_mean": sum(scored["reward"]) / len(scored),
        "policies": [_policy_json(policy) for policy in policies],
        "wall_seconds": time.perf_counter() - began,
    }
    write_outputs(results, rows, out_dir, args)
    return results


def _policy_json(policy: GVPOPolicy) -> dict:
    s = policy.samples
    n = len(policy.log_ratios)
    mean = sum(policy.log_ratios) / n
    sem = math.sqrt(sum((r - mean) ** 2 for r in policy.log_ratios) / max(n - 1, 1) / n)
    return {
        "beta": policy.beta,
        "setting": policy.row.setting,
        "train_seconds": policy.row.train_seconds,
        "sampling_seconds": s.seconds,
        "kl": policy.row.kl,
        "kl_sem": sem,
        "adapters_dir": policy.adapters_dir,
        "train_log": policy.train_log,
        "samples": [
            {
                "prompt": s.prompt_of(i),
                "prompt_ids": s.prompt_ids[i // s.num_samples],
                "completion_ids": s.completion_ids[i],
                "text": s.texts[i],
                "reward": s.rewards[i],
                "log_ratio": policy.log_ratios[i],
            }
            for i in range(len(s.texts))
        ],
    }


def write_outputs(results: dict, rows: Sequence[FrontierRow], out_dir: Path, args: argparse.Namespace) -> None:
    ratio = results["mean_gain_ratio_kl_0.2_1.5"]
    comparison = "\n".join(
        f"- {c['method']} {c['setting']}: KL {c['kl']:.3f}, reward {c['reward']:+.3f}; best-of-N at that KL "
        + (
            "(outside its KL range, N=1..16)"
            if c["best_of_n_at_kl"] is None
            else f"{c['best_of_n_at_kl']:+.3f}, difference {c['difference']:+.3f}"
            + ("" if c["gain_ratio"] is None else f", gain ratio {c['gain_ratio']:.2f}")
        )
        for c in results["vs_best_of_n_at_equal_kl"]
    )
    policies = "\n".join(
        f"- {p['setting']}: KL {p['kl']:.3f} ± {p['kl_sem']:.3f} (s.e. of the sample mean); training "
        f"{p['train_seconds']:.0f} s ({len(p['train_log'])} steps, final loss {p['train_log'][-1]['loss']:.4f}); "
        f"sampling {p['sampling_seconds']:.0f} s"
        for p in results["policies"]
    )
    md = (
        f"# GVPO on the frontier: {args.model}\n\n{markdown_table(rows)}\n\n"
        f"GVPO against best-of-N at equal KL (interpolated):\n{comparison}\n\n"
        "Mean gain ratio (GVPO gain / best-of-N gain at equal KL) over GVPO rows with KL in [0.2, 1.5]: "
        + ("none in range" if ratio is None else f"{ratio:.2f}")
        + f".\n\nGVPO policies (epochs {args.epochs}, learning rate {args.learning_rate:g}, LoRA r={args.lora_r} on "
        f"the top {args.lora_layers} blocks, {args.groups_per_step} groups of {args.num_generations} per step):\n"
        f"{policies}\n\nData step {results['data_seconds']:.0f} s; wall time {results['wall_seconds']:.0f} s.\n"
    )
    (out_dir / "results.md").write_text(md)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    name = "SmolLM2-135M-Instruct" if args.model == "smollm2" else args.model
    plot_frontier(
        rows,
        out_dir / "frontier.png",
        f"{name}: GVPO and best-of-N, reward vs KL on {args.n_eval_prompts} held-out prompts",
        reward_label="mean reward (held-out prompts)",
    )
    print("\n" + md)
    print(
        f"Outputs in {out_dir}/: results.md, results.json, frontier.png"
        + ("" if args.no_save_adapters else ", adapters/")
    )


def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
