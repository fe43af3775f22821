"""The demo's reward-vs-KL frontier for several Q-head configurations at once, against one base and one best-of-N.

Every row is measured in the same run on the same held-out prompts, so the configurations differ only by what they
are: the policy is the frozen pretrained model (no adapters), the training data is sampled and labelled once, base
sampling and best-of-N are sampled once, and every tilted row uses the same seed.

Rows:
- base sampling and best-of-N, N in {2, 4, 8, 16} (as in the demo);
- the ceiling: the KL-optimal policy `pi exp(R / beta) / Z` at each beta, estimated from the base samples
  (`evaluation.kl_optimal_rows`): the policy a tilt with the soft-optimal Q would sample;
- the one-step oracle (`--oracle_k`, 0 to skip): `RewardLookahead`, the reward's exact verdict on the base model's
  top-k next tokens at decode time, `R(x, c + a) - R(x, c)`; what candidate labels teach a head, computed exactly;
  and with `--oracle_lookahead k2` the two-step oracle, each candidate also valued by the soft value (at the row's
  beta) of its own top-k2 next tokens: what two-step labels (`--candidate_lookahead`) teach, computed exactly;
- one tilted curve per configuration `LABELS/TARGET/HEAD` (`--configs`): labels `mc` (one Monte Carlo label per
  sampled action) or `candidates` (also the top-`--candidate_k` candidates of every state), target `mean` or `soft`
  (`QHeadConfig.q_target`, `--target_beta`), head `dense` or `tied` (on the frozen final state), `adapter` (a LoRA
  adapter on the policy's top `--q_lora_layers` blocks, on only for Q) or `q_model` (a separate Q model, the
  policy's first `--q_model_layers` blocks, trained fully) (docs/context_heads.md); `effects` are candidate labels without the
  returns (`QHeadConfig(q_labels="effects")`), so every label is an immediate effect relative to the sampled token,
  `r'(s, a) - r'(s, a_t)`, and the sampled token sits at 0: a learned one-step head, the trained counterpart of the
  oracle, free of the noise the sampled return adds to every label of a state; each trained on the first `scale x
  --num_generations` completions of each training prompt for every `--scales` entry (a data-scaling curve), and on
  the first N training prompts for every N of `--prompt_counts` (a prompt-count scaling curve, e.g. 64 256 1024).

The task: `--prompts_file` and `--reward` (split as the demo splits them), or `--task tone` / `--task judge`, the
context-dependent tasks of `recipes/tasks.py` (docs/tasks.md), whose held-out openings are never seen in training.

Usage:
    python recipes/benchmark_frontier.py                                     # six configurations + the oracle
    python recipes/benchmark_frontier.py --configs effects/mean/dense --scales 0.25 0.5 1 2 --oracle_k 0
    python recipes/benchmark_frontier.py --task tone --configs effects/mean/tied --prompt_counts 64 256 1024
    python recipes/benchmark_frontier.py --help                             # every flag of the demo, and these

Outputs in `--output_dir` (default `outputs/frontier/`): `results.md`, `results.json`, `frontier.png`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if not __package__ and str(REPO_ROOT) not in sys.path:  # `python recipes/benchmark_frontier.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

# `common` first: it sets the environment (offline hub, OpenMP's passive waiting) that torch reads at its import.
if __package__:
    from . import common, tasks
else:
    from recipes import common, tasks

import torch  # noqa: E402
from datasets import Dataset, concatenate_datasets, load_from_disk  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, set_seed  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from trl_qhead.candidates import LabelCost  # noqa: E402
from trl_qhead.decoding import QTiltLogitsProcessor, RewardLookahead  # noqa: E402
from trl_qhead.evaluation import (  # noqa: E402
    KL_OPTIMAL,
    base_and_best_of_n_rows,
    bootstrap_gain_ratio,
    frontier_comparison,
    frontier_json,
    kl_optimal_rows,
    markdown_table,
    mean_gain_ratio,
    plot_frontier,
    score_likelihood,
    tilted_row,
)

LABEL_SOURCE_FILE = "label_source.txt"  # in the saved training data's folder: what labelled its candidates
DEFAULT_CONFIGS = (
    "mc/mean/dense",
    "candidates/mean/dense",
    "candidates/soft/dense",
    "mc/mean/tied",
    "candidates/mean/tied",
    "candidates/soft/tied",
)
LABELS, TARGETS, HEADS = common.LABELS, ("mean", "soft"), ("dense", "tied", "adapter", "q_model")
KL_RANGE = (0.2, 1.5)


def parse_config(spec: str) -> tuple[str, str, str]:
    """`"LABELS/TARGET/HEAD"` -> its three parts, checked."""
    parts = spec.split("/")
    if len(parts) != 3 or parts[0] not in LABELS or parts[1] not in TARGETS or parts[2] not in HEADS:
        raise ValueError(f"A configuration is LABELS/TARGET/HEAD with {LABELS}, {TARGETS}, {HEADS}; got {spec!r}.")
    return parts[0], parts[1], parts[2]


def parse_args(argv: Sequence[str] | None = None):
    p = common.build_parser(__doc__.split("\n")[0], str(REPO_ROOT / "outputs" / "frontier"))
    p.set_defaults(lora_r=0)
    p.add_argument(
        "--task",
        choices=tasks.TASKS,
        default=None,
        help="a task of recipes/tasks.py (its prompts, held-out split and reward; --prompts_file and --reward stay "
        "unset); none: --prompts_file and --reward, split as the demo splits them",
    )
    p.add_argument(
        "--prompt_counts",
        type=int,
        nargs="+",
        default=None,
        help="a prompt-count scaling curve: train every configuration on the first N training prompts for each N "
        "(e.g. 64 256 1024; data sampled once for the largest); default: --n_train_prompts alone",
    )
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="LABELS/TARGET/HEAD, one per curve")
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[1.0],
        help="data sizes in units of --num_generations completions per prompt (0.25: a quarter of them)",
    )
    p.add_argument(
        "--q_lora_r", type=common.int_at_least(1), default=16, help="the adapter head's LoRA rank (HEAD adapter)"
    )
    p.add_argument(
        "--q_lora_layers",
        type=common.int_at_least(0),
        default=15,
        help="the adapter head's LoRA on the top N blocks (0: all; SmolLM2 has 30, and its request is read from "
        "block 15 on: docs/DESIGN.md section 7)",
    )
    p.add_argument(
        "--q_network_learning_rate",
        type=float,
        default=1e-4,
        help="the adapter head's LoRA weights (HEAD adapter); a Q model's trunk trains at --q_learning_rate",
    )
    p.add_argument(
        "--q_model_layers",
        type=common.int_at_least(1),
        default=10,
        help="HEAD q_model: the Q model is the policy's first N blocks (with its final norm and LM head), a copy "
        "trained fully",
    )
    p.add_argument(
        "--q_output",
        choices=("tied", "dense"),
        default="tied",
        help="HEADs adapter and q_model: the output on the Q network's final state, tied (`W^Q (U h^Q) + b`, U from "
        "zero) or dense (`W h^Q + b`, a row per token)",
    )
    p.add_argument(
        "--training_data",
        default=None,
        help="a `training_data` folder an earlier run wrote (same task, prompts, seed, completions and labels): "
        "train on it instead of sampling and labelling again; saved for fewer prompts than this run, only the others "
        "are sampled (the labelling cost and data seconds count them alone) and the union saved to "
        "OUTPUT_DIR/training_data; default: sample all, and save there",
    )
    p.add_argument(
        "--label_fit",
        action="store_true",
        help="also sample and label --num_generations completions of each held-out prompt, and after each "
        "candidate-labelled configuration's training report the share of the labels its head reproduces, "
        "`1 - loss_candidates / candidate_target_sq`, on those (held out) and on as many training prompts' rows",
    )
    p.add_argument("--oracle_k", type=int, default=20, help="top-k of the one-step oracle row (0: no oracle row)")
    p.add_argument(
        "--oracle_lookahead",
        type=int,
        default=0,
        help="k2: also a two-step oracle row (RewardLookahead(lookahead_k=k2, beta=each row's beta)); 0: none",
    )
    args = common.check_args(p.parse_args(argv))
    if args.task is not None and (args.reward != "vader" or args.prompts_file != str(tasks.PROMPTS_FILE)):
        raise ValueError("`--task` sets the prompts and the reward: drop `--prompts_file` and `--reward`.")
    if args.prompt_counts is not None:
        if min(args.prompt_counts) < 1 or len(set(args.prompt_counts)) != len(args.prompt_counts):
            raise ValueError(f"`--prompt_counts` must be distinct numbers >= 1, got {args.prompt_counts}.")
        args.n_train_prompts = max(args.prompt_counts)  # the training prompts sampled; each count takes the first N
    if args.lora_r != 0:
        raise ValueError("`--lora_r` must be 0 here: every row is measured against the one frozen base policy.")
    for spec in args.configs:
        parse_config(spec)
    for scale in args.scales:
        used = scale * args.num_generations
        if used < 1 or used != int(used):
            raise ValueError(
                f"`--scales` {scale:g} x `--num_generations` {args.num_generations} = {used:g}: each must give a "
                "whole number (>= 1) of completions per prompt."
            )
    if args.oracle_k < 0:
        raise ValueError("`--oracle_k` must be >= 0 (0: no oracle row).")
    if args.oracle_lookahead < 0 or (args.oracle_lookahead and not args.oracle_k):
        raise ValueError(
            "`--oracle_lookahead` must be >= 0, and needs `--oracle_k` > 0 (the candidates it looks past)."
        )
    return args


def subset(scored: Dataset, per_prompt: int, used: int, labels: str, n_prompts: int | None = None) -> Dataset:
    """The first `used` of each prompt's `per_prompt` completions (prompt-major rows) of the first `n_prompts` prompts
    (all by default), as the demo's training rows with `labels` (`common.training_rows`)."""
    rows = len(scored) if n_prompts is None else n_prompts * per_prompt
    keep = [i for i in range(rows) if i % per_prompt < used]
    return common.training_rows(scored.select(keep), used, labels=labels)


def task_of(args) -> tuple[list[str], list[str], object]:
    """`(train_prompts, eval_prompts, reward_fn)`: `--task`'s, or `--prompts_file` split as the demo splits it with
    `--reward`."""
    if args.task is not None:
        train, held_out = tasks.task_prompts(args.task, args.n_train_prompts, args.n_eval_prompts, args.seed)
        return train, held_out, tasks.resolve_reward(tasks.TASK_REWARDS[args.task])
    prompts = tasks.load_prompts(args.prompts_file)
    train, held_out = tasks.split_prompts(prompts, args.n_train_prompts, args.n_eval_prompts, args.seed)
    return train, held_out, tasks.resolve_reward(args.reward)


def label_source(args, candidates: bool) -> str:
    """What labelled the training data's candidate columns (`common.training_labels(args)` as written, with every
    option), or "none" without candidates: saved beside the data, so that a run never trains on other labels."""
    return repr(common.training_labels(args)) if candidates else "none"


def load_training_data(path: str, prompts: list[str], per_prompt: int, source: str) -> Dataset:
    """The scored rows an earlier run saved for the first of this run's `prompts` (in order, `per_prompt` completions
    each, with the candidate labels of `source`, a `label_source`; "none": no candidates needed): all
    of them when it saved at least as many prompts (the task's prompts are a fixed list: the first N are the same at
    any N), else the ones it has, for the caller to extend."""
    scored = load_from_disk(path)
    expected = [p for p in prompts for _ in range(per_prompt)]
    if len(scored) > len(expected):
        scored = scored.select(range(len(expected)))
    if len(scored) % per_prompt or list(scored["prompt"]) != expected[: len(scored)]:
        raise ValueError(
            f"`--training_data` {path} holds {len(scored)} rows whose prompts are not the first of this run's "
            f"{len(prompts)} training prompts x {per_prompt} completions: sample it with the same "
            "--task/--prompts_file, --seed, --num_generations and --scales."
        )
    if source == "none":
        return scored
    if "candidate_ids" not in scored.column_names:
        raise ValueError(f"`--training_data` {path} has no candidate labels, which these --configs need.")
    record = Path(path) / LABEL_SOURCE_FILE
    saved_source = record.read_text() if record.exists() else "a source it did not record (an earlier release)"
    if saved_source != source:
        raise ValueError(
            f"`--training_data` {path} was labelled by {saved_source}; this run labels with {source}: sample it "
            "again, or pass the label flags it was sampled with."
        )
    return scored


def save_training_data(scored: Dataset, path: Path, source: str) -> None:
    """`scored` saved to `path` with the `label_source` that labelled it, whole or not at all: written beside it, then
    swapped in, so that a run extending the data it read from the same folder (still mapped, in `scored`) neither
    overwrites it mid-read nor leaves half."""
    partial_path, old_path = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
    for leftover in (partial_path, old_path):  # from an interrupted run
        shutil.rmtree(leftover, ignore_errors=True)
    scored.save_to_disk(str(partial_path))
    (partial_path / LABEL_SOURCE_FILE).write_text(source)
    if path.exists():
        path.rename(old_path)
    partial_path.rename(path)
    shutil.rmtree(old_path, ignore_errors=True)  # the mapped files stay readable until `scored` is dropped


def load_head_model(args, head: str):
    """The tokenizer and the pretrained policy with a fresh `head` Q head: `adapter` (LoRA r `--q_lora_r` on the top
    `--q_lora_layers` blocks, the Q network), `q_model` (the policy's first `--q_model_layers` blocks as a Q model of
    its own), each with the `--q_output` output, or `dense` / `tied` on the frozen final state."""
    if head == "adapter":
        options = {"output": args.q_output}
        return common.load_model(
            args.model, args.q_lora_r, args.q_lora_layers, q_head_type="adapter", q_head_options=options
        )
    if head == "q_model":
        depth = AutoConfig.from_pretrained(common.model_path(args.model)).get_text_config().num_hidden_layers
        if args.q_model_layers > depth:  # the blocks past the policy's would be random, and said only in a warning
            raise ValueError(f"`--q_model_layers` {args.q_model_layers}: the policy has only {depth} blocks to copy.")
        # from_pretrained reads the first N blocks' weights and reports the others as unused: that is the point
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            small = AutoModelForCausalLM.from_pretrained(
                common.model_path(args.model), num_hidden_layers=args.q_model_layers
            )
        finally:
            transformers_logging.set_verbosity(verbosity)
        options = {"q_model": small, "output": args.q_output}
        return common.load_model(args.model, 0, 0, q_head_type="q_model", q_head_options=options)
    return common.load_model(args.model, 0, 0, q_head_type=head)


def label_fit(log: list[dict], sets) -> dict[str, float]:
    """For each evaluated set of `log` (`eval_<name>_*`), the share of the candidate labels the head reproduces:
    `1 - loss_candidates / candidate_target_sq`, 1 for a head that predicts every label, 0 for one that predicts 0
    (the untrained head), below 0 for one that does worse (docs/DESIGN.md section 4); None where every label is 0."""
    fit = {}
    for name in sets:
        entry = next(e for e in reversed(log) if f"eval_{name}_loss_candidates" in e)
        target_sq = entry[f"eval_{name}_candidate_target_sq"]
        fit[name] = 1.0 - entry[f"eval_{name}_loss_candidates"] / target_sq if target_sq > 0 else None
    return fit


def tilted_rows(model, tokenizer, args, eval_prompts, reward_fn, base, method: str, source_of) -> tuple[list, dict]:
    """One tilted row per beta of `args.betas`, sampled with `QTiltLogitsProcessor(source_of(beta), beta)`
    (`common.sample_scored`, the likelihood under the pretrained model), and the method's mean gain ratio with its 95%
    bootstrap interval over prompts (`evaluation.bootstrap_gain_ratio`)."""
    rows, tilted = [], {}
    for beta in args.betas:
        tilt = partial(QTiltLogitsProcessor, source_of(beta), beta=beta)
        samples = common.sample_scored(
            model, tokenizer, eval_prompts, reward_fn, args, tilt=tilt, desc=f"{method} beta={beta:g}"
        )
        score_likelihood(samples, model.pretrained_model, tokenizer.pad_token_id)
        rows.append(tilted_row(samples, beta, method))
        tilted[f"beta={beta:g}"] = samples
    return rows, asdict(bootstrap_gain_ratio(base, tilted, kl_range=KL_RANGE))


def run(args) -> dict:
    began = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    model, tokenizer = common.load_model(args.model, 0, 0)
    train_prompts, eval_prompts, reward_fn = task_of(args)
    counts = sorted(args.prompt_counts or [len(train_prompts)])
    configs = [parse_config(spec) for spec in args.configs]
    per_prompt = int(args.num_generations * max(args.scales))
    with_candidates = any(labels != "mc" for labels, _, _ in configs)
    source = label_source(args, with_candidates)

    print(f"[data] {per_prompt} completions for each of {len(train_prompts)} training prompts", flush=True)
    t0 = time.perf_counter()
    saved = None
    if args.training_data:
        saved = load_training_data(args.training_data, train_prompts, per_prompt, source)
    n_saved = 0 if saved is None else len(saved) // per_prompt
    missing = train_prompts[n_saved:]
    scored, labelling_cost = saved, None  # the saved rows' labelling cost was the earlier run's
    if missing:  # sample and label only the prompts no saved run has, and save the union for the next run
        if saved is not None:
            print(f"[data] {n_saved} prompts saved; sampling the other {len(missing)}", flush=True)
        fresh, labelling_cost = common.sample_training_data(
            model, tokenizer, missing, reward_fn, args, per_prompt, candidates=with_candidates
        )
        scored = fresh if saved is None else concatenate_datasets([saved, fresh])
        save_training_data(scored, out_dir / "training_data", source)
    data_seconds = time.perf_counter() - t0
    held_out_scored = None
    if args.label_fit and with_candidates:  # labelled like the training data, never trained on
        print(f"[label fit] {args.num_generations} labelled completions for each held-out prompt", flush=True)
        held_out_scored, _ = common.sample_training_data(
            model, tokenizer, eval_prompts, reward_fn, args, args.num_generations, candidates=True
        )

    print(f"[base] {args.eval_samples} samples for each of {len(eval_prompts)} held-out prompts", flush=True)
    base = common.sample_scored(model, tokenizer, eval_prompts, reward_fn, args)
    score_likelihood(base, model.pretrained_model, tokenizer.pad_token_id)
    rows = base_and_best_of_n_rows(base) + kl_optimal_rows(base, args.betas)
    runs = [{"method": KL_OPTIMAL, "seconds": 0.0}]  # the ceiling, from the base samples alone

    oracles = ([0] + [args.oracle_lookahead] * bool(args.oracle_lookahead)) if args.oracle_k else []
    for lookahead in oracles:  # 0: the one-step oracle
        if lookahead:
            method = f"oracle two-step (top-{args.oracle_k}, then top-{lookahead})"
        else:
            method = f"oracle one-step (top-{args.oracle_k})"
        t0 = time.perf_counter()
        sources = []  # one per beta: each counts its own reward calls

        def oracle(beta, lookahead=lookahead, sources=sources):
            sources.append(
                RewardLookahead(
                    model,
                    tokenizer,
                    reward_fn,
                    k=args.oracle_k,
                    lookahead_k=lookahead or None,
                    beta=beta if lookahead else None,
                )
            )
            return sources[-1]

        tilted, interval = tilted_rows(model, tokenizer, args, eval_prompts, reward_fn, base, method, oracle)
        rows += tilted
        cost = LabelCost()
        for source in sources:
            cost.add(source.cost)
        runs.append(
            {
                "method": method,
                "seconds": time.perf_counter() - t0,
                "reward_cost": cost.as_dict(),
                "interval": interval,
            }
        )
        results = report(rows, runs, data_seconds, labelling_cost, began, out_dir, args)

    # smallest data first: a long run that stops early has compared every configuration
    for count, scale, (labels, target, head) in [
        (n, x, c) for n in counts for x in sorted(args.scales) for c in configs
    ]:
        used = int(args.num_generations * scale)
        method = f"{labels}/{target}/{head}" + (f" x{scale:g}" if len(args.scales) > 1 else "")
        method += f" n{count}" if len(counts) > 1 else ""
        print(f"[{method}] training on {used} completions for each of {count} prompts", flush=True)
        set_seed(args.seed)
        model, tokenizer = load_head_model(args, head)
        t0 = time.perf_counter()
        rows_used = subset(scored, per_prompt, used, labels, count)
        train_args = args
        if head == "adapter":  # its LoRA weights train at `learning_rate`: the Q network's, not a policy adapter's
            train_args = Namespace(**{**vars(args), "learning_rate": args.q_network_learning_rate})
        fit_sets = None
        if held_out_scored is not None and labels != "mc":
            n = min(len(eval_prompts), count)  # as many prompts as held out, all of them trained on
            fit_sets = {
                "train": subset(scored, per_prompt, min(used, args.num_generations), labels, n),
                "held_out": subset(held_out_scored, args.num_generations, args.num_generations, labels),
            }
        log = common.train_from_args(
            model, tokenizer, rows_used, train_args, q_target=target, labels=labels, eval_dataset=fit_sets
        )
        train_seconds = time.perf_counter() - t0
        model.eval()
        tilted, interval = tilted_rows(
            model, tokenizer, args, eval_prompts, reward_fn, base, method, lambda beta, model=model: model
        )
        rows += tilted
        runs.append(
            {
                "method": method,
                "completions_per_prompt": used,
                "prompts": count,
                "train_seconds": train_seconds,
                "final_loss_q": next((e["loss_q"] for e in reversed(log) if "loss_q" in e), None),
                "label_fit": None if fit_sets is None else label_fit(log, fit_sets),
                "interval": interval,
            }
        )
        results = report(rows, runs, data_seconds, labelling_cost, began, out_dir, args)
    return results  # `--configs` takes at least one: the last configuration's report holds every row


def report(rows, runs, data_seconds, labelling_cost, began, out_dir: Path, args) -> dict:
    """Compare every tilted row with best-of-N, write the outputs (after each configuration, so that a long run that
    stops early keeps what it measured) and return what `results.json` holds."""
    comparison = frontier_comparison(rows)
    for entry in runs:
        entry["mean_gain_ratio"] = mean_gain_ratio(comparison, KL_RANGE, entry["method"])
    results = {
        "args": vars(args),
        "rows": frontier_json(rows),
        "comparison": comparison,
        "runs": runs,
        "data_seconds": data_seconds,
        "labelling_cost": labelling_cost,
        "wall_seconds": time.perf_counter() - began,
    }
    write_outputs(results, rows, out_dir, args)
    return results


def write_outputs(results: dict, rows, out_dir: Path, args) -> None:
    summary = [
        "| method | mean gain ratio, KL in [0.2, 1.5] | 95% interval over prompts | train s | gain ratio per beta (KL) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for entry in results["runs"]:
        ratio = entry["mean_gain_ratio"]
        per_beta = ", ".join(
            f"{c['setting']}: {'-' if c['gain_ratio'] is None else format(c['gain_ratio'], '.2f')} ({c['kl']:.2f})"
            for c in results["comparison"]
            if c["method"] == entry["method"]
        )
        seconds = entry.get("train_seconds", entry.get("seconds", math.nan))
        interval = entry.get("interval") or {}  # the KL-optimal ceiling has none: it is not sampled
        bounds = "-" if interval.get("low") is None else f"{interval['low']:.2f}-{interval['high']:.2f}"
        summary.append(
            f"| {entry['method']} | {'none in range' if ratio is None else format(ratio, '.2f')} | {bounds} "
            f"| {seconds:.0f} | {per_beta} |"
        )
    md = (
        f"# Frontier: {args.model}, {args.n_eval_prompts} held-out prompts\n\n"
        + "\n".join(summary)
        + "\n\n"
        + markdown_table(rows)
        + f"\n\nData: {results['data_seconds']:.0f} s (labelling cost {results['labelling_cost']}). "
        f"Wall time: {results['wall_seconds']:.0f} s.\n"
    )
    (out_dir / "results.md").write_text(md)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot_frontier(
        rows, out_dir / "frontier.png", f"{args.model}: reward vs KL, {args.n_eval_prompts} held-out prompts"
    )
    print("\n" + md)
    print(f"Outputs in {out_dir}/: results.md, results.json, frontier.png")


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
