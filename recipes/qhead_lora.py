# Copyright the trl-qhead authors. Licensed under the Apache License, Version 2.0.
"""Train a causal LM (GPT-2 by default) with LoRA adapters, optionally on a 4-bit base, and a Q head.

Runs as a plain script on one process, or under `accelerate launch` on several (DDP, FSDP, DeepSpeed ZeRO-2; configs in
`recipes/configs/accelerate/`). Arguments are `QHeadConfig` (all of `transformers.TrainingArguments` plus the Q-head
and dataset fields), TRL's `ModelConfig` (model, LoRA, 4/8-bit) and the script arguments below, from flags and/or
`--config file.yaml` (flags win). The seed's flag names are accepted as aliases (see `--help`).

```bash
# one process, a local text file
python recipes/qhead_lora.py --config recipes/configs/qhead_lora.yaml \
    --dataset_name text --dataset_data_files corpus.txt --save_dir out --steps 1000

# 4 GPUs, DDP; QLoRA with --load_in_4bit
accelerate launch --config_file recipes/configs/accelerate/multi_gpu.yaml --num_processes 4 \
    recipes/qhead_lora.py --config recipes/configs/qhead_lora.yaml --load_in_4bit

# the seed's flags
python recipes/qhead_lora.py --gamma 0.99 --gae_lambda 0.95 --use_lm_rewards --q_weight 1.0 --seed 0 \
    --steps 1000 --save_interval 200 --save_dir out --wandb --dataset_name text --dataset_data_files corpus.txt
```
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, set_seed
from trl import DatasetMixtureConfig, ModelConfig, TrlParser, get_dataset, get_peft_config, get_quantization_config
from trl.scripts.utils import DatasetConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
if not __package__ and str(REPO_ROOT) not in sys.path:  # `python recipes/qhead_lora.py` or `accelerate launch`
    sys.path.insert(0, str(REPO_ROOT))

if __package__:  # `recipes.qhead_lora` in a checkout, `trl_qhead.recipes.qhead_lora` installed (`trl-qhead train`)
    from .launch import ensure_cpu_processes
else:
    from recipes.launch import ensure_cpu_processes
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer  # noqa: E402

DEFAULT_MODEL = "gpt2"
# GPT-2's attention and MLP projections; PEFT's own default for GPT-2 is `c_attn` alone.
GPT2_LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]


@dataclass
class ScriptArguments:
    """Arguments of this script that are neither training nor model arguments.

    Args:
        tokenizer_name_or_path: tokenizer to load; defaults to `--model_name_or_path`.
        q_head_init: init of the fresh Q head: `"zeros"` (default), `"normal"` or `"lm_head"`.
    """

    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer name or path; defaults to --model_name_or_path."}
    )
    q_head_init: str = field(
        default="zeros", metadata={"help": "Init of a fresh Q head.", "choices": ["zeros", "normal", "lm_head"]}
    )
    # TRL's `ScriptArguments` dataset flags (its `dataset_name` and `dataset_config` are QHeadConfig fields here).
    dataset_train_split: str | None = field(
        default=None, metadata={"help": "Split to train on (TRL's name for --dataset_split; default 'train')."}
    )
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to evaluate on when --eval_strategy is not 'no'."}
    )
    dataset_streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset (TRL's name for --streaming; needs --max_steps)."}
    )
    # TRL's `DatasetMixtureConfig` (a `datasets:` list in the --config YAML), but its `streaming`: that is --streaming.
    datasets: list[DatasetConfig] = field(
        default_factory=list,
        metadata={
            "help": "A mixture of datasets (TRL's `datasets:` list of the YAML config, loaded with trl.get_dataset); "
            "when set, --dataset_name is ignored."
        },
    )
    test_split_size: float | None = field(
        default=None, metadata={"help": "Split this share of the mixture off as its test split (TRL's name)."}
    )

    def __post_init__(self):
        self.datasets = [DatasetConfig(**d) if isinstance(d, dict) else d for d in self.datasets]  # from the YAML


class _SeedAlias(argparse.Action):
    """A flag of the seed's command line that sets one or more `TrainingArguments` fields."""

    def __init__(self, option_strings, dest, sets: dict, **kwargs):
        self.sets = sets
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        for name, value in self.sets.items():
            setattr(namespace, name, values if value is None else value)


def make_parser() -> TrlParser:
    """TRL's parser over `(ScriptArguments, QHeadConfig, ModelConfig)`, with the seed's flags as aliases."""
    parser = TrlParser((ScriptArguments, QHeadConfig, ModelConfig), description=__doc__.split("\n\n")[0])
    # A LoRA recipe: adapters on by default (`--use_peft false` trains the full model), on GPT-2 unless told otherwise.
    parser.set_defaults(model_name_or_path=DEFAULT_MODEL, use_peft=True)
    seed = parser.add_argument_group(
        "seed flags",
        "The seed's flag names, accepted as aliases. --gamma, --q_weight, --gae_lambda, --use_lm_rewards and --seed "
        "are QHeadConfig fields of the same name (listed above). Aliases are for the command line; a --config file "
        "uses the names they stand for.",
    )
    aliases = [
        ("--save_dir", {"output_dir": None}, str, "DIR", "same as --output_dir DIR"),
        ("--steps", {"max_steps": None}, int, "N", "same as --max_steps N"),
        (
            "--save_interval",
            {"save_steps": None, "save_strategy": "steps"},
            int,
            "N",
            "--save_steps N (every N steps)",
        ),
    ]
    for flag, sets, type_, metavar, help_ in aliases:
        seed.add_argument(flag, action=_SeedAlias, sets=sets, type=type_, metavar=metavar, help=help_)
    seed.add_argument("--wandb", action=_SeedAlias, sets={"report_to": ["wandb"]}, nargs=0, help="--report_to wandb")
    return parser


def lora_config(model_args: ModelConfig, model_name_or_path: str, **config_kwargs):
    """TRL's `LoraConfig` from `model_args`, with GPT-2's targets (PEFT sets `fan_in_fan_out` for `Conv1D` itself).

    Targets: `--lora_target_modules` when given; for GPT-2 `c_attn`, `c_proj` and `c_fc`; otherwise PEFT's default
    for the architecture.
    """
    config = AutoConfig.from_pretrained(model_name_or_path, **config_kwargs)
    targets = model_args.lora_target_modules
    if targets is None and config.model_type == "gpt2":
        targets = GPT2_LORA_TARGETS
    # `fan_in_fan_out` is left to PEFT: it sets it (with a warning) when the targets are `Conv1D` (GPT-2).
    return get_peft_config(dataclasses.replace(model_args, lora_target_modules=targets))


def load_model(
    script_args: ScriptArguments, model_args: ModelConfig, training_args: QHeadConfig | None = None
) -> AutoModelForCausalLMWithQHead:
    """The backbone from `--model_name_or_path` (4/8-bit when asked), LoRA when `--use_peft`, and a fresh Q head."""
    name = model_args.model_name_or_path
    training_args = training_args if training_args is not None else QHeadConfig(output_dir="unused", report_to=[])
    quantization_config = get_quantization_config(model_args)
    model_kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if training_args.trust_remote_code:
        model_kwargs["trust_remote_code"] = True
    if model_args.attn_implementation is not None:
        model_kwargs["attn_implementation"] = model_args.attn_implementation
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config
        if torch.cuda.is_available():
            from accelerate import PartialState

            # bitsandbytes weights are placed at load time: each process loads onto its own GPU.
            model_kwargs["device_map"] = {"": PartialState().local_process_index}
    config_kwargs = {k: model_kwargs[k] for k in ("revision", "trust_remote_code") if k in model_kwargs}
    peft_config = lora_config(model_args, name, **config_kwargs) if model_args.use_peft else None
    return AutoModelForCausalLMWithQHead.from_pretrained(
        name, peft_config=peft_config, q_head_init=script_args.q_head_init, **model_kwargs
    )


def apply_trl_dataset_flags(script_args: ScriptArguments, training_args: QHeadConfig) -> None:
    """TRL's `--dataset_train_split` and `--dataset_streaming` set the QHeadConfig fields they name."""
    if script_args.dataset_train_split is not None:
        training_args.dataset_split = script_args.dataset_train_split
    if script_args.dataset_streaming:
        if training_args.max_steps is None or training_args.max_steps <= 0:
            raise ValueError(
                "`--dataset_streaming` needs `--max_steps` > 0: a stream has no length to count epochs by."
            )
        training_args.streaming = True


def load_eval_dataset(script_args: ScriptArguments, training_args: QHeadConfig):
    """The `--dataset_test_split` of the dataset when `--eval_strategy` is not `no`, else `None`."""
    if str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) == "no":
        return None
    if training_args.dataset_name is None:
        raise ValueError("`--eval_strategy` needs a dataset with a test split: set `--dataset_name`.")
    from datasets import load_dataset

    try:
        return load_dataset(
            training_args.dataset_name,
            training_args.dataset_config,
            data_files=training_args.dataset_data_files,
            split=script_args.dataset_test_split,
            streaming=training_args.streaming,
        )
    except ValueError as error:
        if "split" not in str(error).lower():
            raise
        raise ValueError(
            f"`--eval_strategy {training_args.eval_strategy}` evaluates on the split "
            f"{script_args.dataset_test_split!r} of {training_args.dataset_name!r}, which has none ({error}). Name "
            "an existing one with `--dataset_test_split`, or set `--eval_strategy no`."
        ) from error


def load_mixture(script_args: ScriptArguments, training_args: QHeadConfig):
    """`(train, eval)` of the `datasets:` mixture with TRL's `get_dataset` (eval: its `test` split when
    `--eval_strategy` is not `no`), or `None` without a mixture."""
    if not script_args.datasets:
        return None
    mixture = DatasetMixtureConfig(
        datasets=script_args.datasets, streaming=training_args.streaming, test_split_size=script_args.test_split_size
    )
    dataset = get_dataset(mixture)
    evaluating = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    if evaluating and "test" not in dataset:
        raise ValueError("`--eval_strategy` evaluates on the mixture's test split: set `test_split_size`.")
    return dataset["train"], dataset["test"] if evaluating else None


def main(script_args: ScriptArguments, training_args: QHeadConfig, model_args: ModelConfig) -> QHeadTrainer:
    """Build the model and tokenizer, train (resuming when asked), save the final model; returns the trainer."""
    apply_trl_dataset_flags(script_args, training_args)
    mixture = load_mixture(script_args, training_args)
    train_dataset, eval_dataset = mixture if mixture else (None, load_eval_dataset(script_args, training_args))
    set_seed(training_args.seed)  # LoRA's random init happens before the Trainer seeds anything
    model = load_model(script_args, model_args, training_args)
    tokenizer = AutoTokenizer.from_pretrained(
        script_args.tokenizer_name_or_path or model_args.model_name_or_path,
        trust_remote_code=training_args.trust_remote_code,
    )
    trainer = QHeadTrainer(
        model, training_args, processing_class=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset
    )

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Saved adapters and Q head to {training_args.output_dir}.")
    return trainer


if __name__ == "__main__":
    ensure_cpu_processes()  # `accelerate launch --cpu --num_processes N` really starts N gloo processes
    main(*make_parser().parse_args_and_config())
