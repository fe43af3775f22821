"""`trl-qhead`: the console script (`[project.scripts]`). Subcommands:

- `train`: `recipes/qhead_lora.py` (LoRA + Q head; TRL's parser: QHeadConfig, TRL's ModelConfig, the recipe's
  script arguments, `--config file.yaml`);
- `eval`: the same arguments; loads `--model_name_or_path` (a saved Q-head folder or Hub repo), evaluates the Q-head
  loss on `--dataset_test_split` and writes `eval_results.json` to `--output_dir`. The reward and return settings
  (`gamma`, `use_lm_rewards`, `reward_scale`, ...) are those the model was trained with
  (`qhead_training_settings.json`, see `trl_qhead.training_settings`) unless a flag or `--config` sets them;
- `demo`: `recipes/demo_sentiment.py` (needs the `demo` extra).

The recipes and their configs ship inside the wheel as `trl_qhead.recipes`; `--config qhead_lora.yaml` names a shipped
config when no such file exists in the current folder. Several processes: `accelerate launch -m trl_qhead.cli train ...`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = """usage: trl-qhead {{train,eval,demo}} [--help] [ARGS...]

  train   train LoRA adapters and a Q head (recipes/qhead_lora.py); `trl-qhead train --help` lists every flag
  eval    evaluate a saved model's Q-head loss on a dataset split (same flags as train)
  demo    the offline sentiment demo (recipes/demo_sentiment.py; pip install 'trl-qhead[demo]')

Shipped configs (for --config): {configs}
"""


def recipe(name: str):
    """A recipe module: `trl_qhead.recipes.<name>` when installed, the checkout's `recipes.<name>` otherwise."""
    try:
        return importlib.import_module(f"trl_qhead.recipes.{name}")
    except ModuleNotFoundError as error:
        if error.name not in ("trl_qhead.recipes", f"trl_qhead.recipes.{name}"):
            raise
        return importlib.import_module(f"recipes.{name}")


def configs_dir() -> Path:
    return Path(recipe("launch").__file__).resolve().parent / "configs"


def _resolve_config(argv: list[str]) -> list[str]:
    """`--config NAME` names a shipped config when NAME is not a file here."""
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--config" and not os.path.exists(argv[i + 1]):
            shipped = configs_dir() / argv[i + 1]
            if shipped.is_file():
                argv[i + 1] = str(shipped)
    return argv


def check_model_source(name: str | None, flag: str = "--model_name_or_path") -> None:
    """A SystemExit naming the flag unless `name` is an existing folder or has the form of a Hub repo id
    (`persistence.check_model_source`)."""
    from . import persistence  # here: `trl-qhead --help` imports no torch

    if not name:
        raise SystemExit(f"`{flag}` is required: a saved model's folder or a Hub repo id.")
    try:
        persistence.check_model_source(name)
    except FileNotFoundError as error:
        raise SystemExit(f"`{flag}` {error}") from None


def train(argv: Sequence[str]):
    module = recipe("qhead_lora")
    module.ensure_cpu_processes()
    parser = module.make_parser()
    parser.prog = "trl-qhead train"
    script_args, training_args, model_args = parser.parse_args_and_config(_resolve_config(list(argv)))
    check_model_source(model_args.model_name_or_path)
    if script_args.tokenizer_name_or_path:
        check_model_source(script_args.tokenizer_name_or_path, "--tokenizer_name_or_path")
    return module.main(script_args, training_args, model_args)


def evaluate(argv: Sequence[str]) -> dict:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from . import AutoModelForCausalLMWithQHead, QHeadTrainer

    module = recipe("qhead_lora")
    parser = module.make_parser()
    parser.prog = "trl-qhead eval"
    argv = _resolve_config(list(argv))
    explicit = explicit_fields(parser, argv)
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if training_args.dataset_name is None:
        raise SystemExit("trl-qhead eval: set --dataset_name (and --dataset_test_split, default 'test').")
    name = model_args.model_name_or_path
    check_model_source(name)
    if script_args.tokenizer_name_or_path:
        check_model_source(script_args.tokenizer_name_or_path, "--tokenizer_name_or_path")
    training_args, source = _with_training_settings(training_args, name, explicit, revision=model_args.model_revision)
    print(f"trl-qhead eval: reward and return settings {source}", file=sys.stderr)
    model = AutoModelForCausalLMWithQHead.from_pretrained(
        name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(
        script_args.tokenizer_name_or_path or name, trust_remote_code=training_args.trust_remote_code
    )
    dataset = load_dataset(
        training_args.dataset_name,
        training_args.dataset_config,
        data_files=training_args.dataset_data_files,
        split=script_args.dataset_test_split,
    )
    trainer = QHeadTrainer(
        model, training_args, train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer
    )
    metrics = trainer.evaluate()
    metrics = {**metrics, **trainer.state.log_history[-1]}  # with the Q-head metrics `log` added (loss_q, q_mean, ...)
    metrics["reward_settings"] = source
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "eval_results.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(json.dumps(metrics, indent=2))
    return metrics


def explicit_fields(parser, argv: Sequence[str]) -> set[str]:
    """The field names a command line sets, filled in when `parser.parse_args_and_config(argv)` runs: its
    `--name` / `--name=value` flags, and the keys of its `--config` YAML (recorded as TRL's parser applies them)."""
    names = {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    apply_config = parser.set_defaults_with_config

    def set_defaults_with_config(**config):
        names.update(config)
        return apply_config(**config)

    parser.set_defaults_with_config = set_defaults_with_config
    return names


def _with_training_settings(training_args, name: str, explicit: set[str], revision: str | None = None):
    """`(training_args, where its reward settings come from)`: the saved settings of the model `name` fill every
    reward/return field not in `explicit` (`trl_qhead.training_settings`)."""
    from .training_settings import TRAINING_SETTINGS_NAME, apply_training_settings, load_training_settings

    settings = load_training_settings(name, revision=revision)
    if settings is None:
        return training_args, (
            f"from the command line and QHeadConfig's defaults ({name} has no {TRAINING_SETTINGS_NAME}: pass the "
            "training run's --config, or the flags, to score with the settings it was trained with)"
        )
    training_args, applied = apply_training_settings(training_args, settings, explicit)
    saved = f"{name}/{TRAINING_SETTINGS_NAME}"
    if applied:
        source = f"from {saved}: {', '.join(f'{k}={v!r}' for k, v in applied.items())} (flags and --config win)"
    else:
        source = f"from the command line and --config (the rest already match {saved})"
    if settings.get("reward_functions"):
        source += (
            f"; the model was also trained with the reward functions {settings['reward_functions']}, which this "
            "command cannot call: its loss_q leaves them out"
        )
    return training_args, source


def demo(argv: Sequence[str]) -> None:
    argv = list(argv)
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in argv):
        argv += ["--output_dir", os.path.join("outputs", "demo")]  # here, not inside the installed package
    os.environ.setdefault("TRL_QHEAD_CACHE", str(Path.home() / ".cache" / "trl-qhead"))
    recipe("demo_sentiment").main(argv)


COMMANDS = {"train": train, "eval": evaluate, "demo": demo}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in COMMANDS:
        configs = ", ".join(sorted(p.name for p in configs_dir().glob("*.yaml")))
        print(USAGE.format(configs=configs), end="")
        if argv and argv[0] not in ("-h", "--help", "help"):
            print(f"trl-qhead: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    COMMANDS[argv[0]](argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
