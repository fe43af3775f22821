"""TRL habits a user brings to trl-qhead (docs/trl_compat.md): what TRL's trainers do and QHeadTrainer does alike, and
the differences stated where they are kept."""

from __future__ import annotations

import json

import pytest
import yaml
from datasets import Dataset

from tests.conftest import make_tiny_gpt2
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer

# ---- the reward settings travel with the model ---------------------------------------------------------------------


def test_eval_without_the_training_config_uses_the_saved_reward_settings(tmp_path, capsys):
    from recipes.offline_assets import gpt2_tokenizer_dir
    from tests.recipe_assets import save_tiny_gpt2, write_corpus
    from trl_qhead import cli
    from trl_qhead.training_settings import TRAINING_SETTINGS_NAME

    model_dir, corpus = save_tiny_gpt2(tmp_path / "gpt2"), write_corpus(tmp_path / "c.txt", n_lines=6)
    common = ["--tokenizer_name_or_path", str(gpt2_tokenizer_dir()), "--dataset_name", "text"]
    common += ["--dataset_data_files", str(corpus), "--max_length", "16", "--report_to", "none"]
    common += ["--disable_tqdm", "true"]
    # The training run's reward settings, in the config file a user may not have at hand when evaluating.
    settings = {"use_lm_rewards": True, "lm_reward_coef": 2.0, "gamma": 0.9, "reward_scale": 3.0}
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(settings))
    cli.main(
        ["train", "--config", str(config), "--model_name_or_path", str(model_dir), *common]
        + ["--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--lora_r", "2", "--save_strategy", "no"]
        + ["--per_device_train_batch_size", "2"]
    )
    saved = json.loads((tmp_path / "run" / TRAINING_SETTINGS_NAME).read_text())
    assert {k: saved[k] for k in settings} == settings and saved["reward_functions"] == []

    runs = iter(range(10))

    def evaluate(*extra):
        capsys.readouterr()
        out = str(tmp_path / f"eval{next(runs)}")
        args = ["eval", "--model_name_or_path", str(tmp_path / "run"), *common, "--dataset_test_split", "train"]
        cli.main([*args, "--output_dir", out, "--per_device_eval_batch_size", "4", *extra])
        return json.loads((tmp_path / out / "eval_results.json").read_text()), capsys.readouterr().err

    with_config, _ = evaluate("--config", str(config))
    without, err = evaluate()
    assert without["eval_loss_q"] == pytest.approx(with_config["eval_loss_q"], rel=1e-5)
    assert with_config["eval_loss_q"] > 1.0  # the reference log-probs reward, times 2: far from zero
    assert TRAINING_SETTINGS_NAME in without["reward_settings"] and "use_lm_rewards=True" in err
    # A flag still wins over the saved settings.
    flagged, _ = evaluate("--use_lm_rewards", "false", "--lm_reward_coef", "1.0")
    assert flagged["eval_loss_q"] != pytest.approx(with_config["eval_loss_q"], rel=1e-3)


# ---- reward functions get TRL's keywords ----------------------------------------------------------------------------


def config(tmp_path, **kwargs) -> QHeadConfig:
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, logging_steps=1, report_to=[])
    return QHeadConfig(**{**defaults, "save_strategy": "no", "disable_tqdm": True, **kwargs})


def test_a_grpo_reward_function_that_logs_extra_columns_trains_and_fills_the_completions_table(
    tmp_path, gpt2_tokenizer
):
    import pandas as pd

    seen = []

    def length_reward(completions, trainer_state, log_extra, log_metric, **kwargs):  # as in TRL's GRPO docs
        lengths = [len(c) for c in completions]
        log_extra("length", lengths)
        log_metric("mean_length", sum(lengths) / len(lengths))
        seen.append((trainer_state.global_step, list(completions)))
        return [float(n) for n in lengths]

    dataset = Dataset.from_dict({"prompt": ["The sky is", "Roses are", "A cat", "Dogs"]})
    dataset = dataset.add_column("completion", [" blue.", " red, and", " sat.", " bark"])
    trainer = QHeadTrainer(
        make_tiny_gpt2(),
        config(tmp_path, max_steps=2, log_completions=True, num_completions_to_print=1),
        train_dataset=dataset,
        processing_class=gpt2_tokenizer,
        reward_funcs=length_reward,
    )
    trainer.train()
    assert [step for step, _ in seen] == [0, 1]
    assert trainer.state.log_history[0]["mean_length"] == pytest.approx(sum(map(len, seen[0][1])) / 2)
    # Where TRL's GRPOTrainer writes its table: output_dir/completions/completions_<step>.parquet, the latest step's rows.
    table = pd.read_parquet(tmp_path / "completions" / "completions_00002.parquet")
    assert list(table["completion"]) == seen[1][1]
    assert list(table["length"]) == [len(c) for c in seen[1][1]]
    assert list(table["length_reward"]) == [float(len(c)) for c in seen[1][1]] and set(table["step"]) == {2}
    rows = set(zip(dataset["prompt"], dataset["completion"], strict=True))
    assert set(zip(table["prompt"], table["completion"], strict=True)) <= rows


# ---- prompt and completion tokens that merge ------------------------------------------------------------------------


def test_a_prompt_that_merges_with_its_completion_is_warned_about_once_naming_the_row(gpt2_tokenizer, caplog):
    import logging

    from trl.rewards import think_format_reward

    from trl_qhead.data import prepare_dataset

    prompts = ["<|user|>\nWhat is 2+2?\n<|assistant|>", "<|user|>\nHi\n<|assistant|>", "<|user|>\nOk\n<|assistant|>\n"]
    dataset = Dataset.from_dict({"prompt": prompts, "completion": ["<think>4</think>4", "<think>h</think>hi", "<t>"]})
    with caplog.at_level(logging.WARNING, logger="trl_qhead.data"):
        rows = prepare_dataset(dataset, gpt2_tokenizer, reward_columns=True)
    warnings = [r.getMessage() for r in caplog.records if "merge at their boundary" in r.getMessage()]
    assert len(warnings) == 1  # once, though two rows merge
    assert "example 0" in warnings[0] and "'><'" in warnings[0]  # the row and the merged token
    # What reward functions then see: the merged '>' starts the completion, and TRL's format reward scores 0.
    completion = gpt2_tokenizer.decode(rows[0]["input_ids"][rows[0]["prompt_length"] :], skip_special_tokens=True)
    assert completion.startswith("><think>")
    assert think_format_reward([[{"content": completion}]]) == [0.0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_qhead.data"):  # a prompt ending on a token boundary: silent
        prepare_dataset(dataset.select([2]), gpt2_tokenizer)
    assert not [r for r in caplog.records if "merge at their boundary" in r.getMessage()]


# ---- the model card states the head it describes ------------------------------------------------------------------


@pytest.mark.parametrize("q_head_type", ["tied", "dense"])
def test_the_model_card_states_the_formula_and_type_of_its_q_head(tmp_path, gpt2_tokenizer, q_head_type):
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=len(gpt2_tokenizer)), q_head_type=q_head_type)
    dataset = Dataset.from_dict({"text": ["The cat sat.", "A dog barked."]})
    trainer = QHeadTrainer(model, config(tmp_path), train_dataset=dataset, processing_class=gpt2_tokenizer)
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert f"`q_head_type={q_head_type}`" in card
    tied, dense = "`Q(s, a) = W_lm (U h_s) + b`", "`Q(s, a) = W_q h_s + b_q`"
    assert (tied in card, dense in card) == ((True, False) if q_head_type == "tied" else (False, True))


# ---- the demo without its extra -------------------------------------------------------------------------------------


def test_the_demo_without_its_extra_ends_with_the_install_command(monkeypatch, tmp_path):
    import importlib
    import sys

    from trl_qhead import cli

    monkeypatch.chdir(tmp_path)
    # This checkout's recipes (an editable install of another checkout would map `trl_qhead.recipes` there).
    monkeypatch.setattr(cli, "recipe", lambda name: importlib.import_module(f"recipes.{name}"))
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)  # as if the `demo` extra were not installed
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo"])
    message = str(exit_.value.code)
    assert 'pip install "trl-qhead[demo]"' in message and "vaderSentiment" in message
    assert not (tmp_path / "outputs").exists()  # before any work


# ---- importing the library prints nothing ---------------------------------------------------------------------------

# Runs `import trl_qhead` as on a CPU with AVX512-BF16 and no `kernels` package, where bitsandbytes' import (through
# transformers -> PEFT) logs "Failed to load CPU gemm_4bit_forward from kernels-community".
AVX512_BF16_CPU = """
import importlib.abc, importlib.machinery, sys
sys.modules["kernels"] = None  # not installed

class AVX512BF16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, AVX512BF16())
"""


def run_python(code: str):
    import subprocess
    import sys

    from tests.recipe_assets import REPO

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_importing_the_library_prints_nothing_and_the_kernel_notice_waits_for_4bit():
    code = AVX512_BF16_CPU + "\n".join(
        [
            "import trl_qhead, trl_qhead.trainer, trl_qhead.gvpo",
            "import logging",
            "from trl_qhead import bnb_notice",
            "held = [f for f in logging.getLogger(bnb_notice.LOGGER_NAME).filters if hasattr(f, 'records')]",
            "sys.stderr.write(f'IMPORTED {len(held[0].records)}\\n')",  # the notice was emitted, and held
            "from trl_qhead.quantization import prepare_quantization_config",
            "prepare_quantization_config({'load_in_4bit': True}, 'unused')",
        ]
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    before, _, after = result.stderr.partition("IMPORTED 1\n")
    assert (result.stdout, before) == ("", "")  # `import trl_qhead` prints nothing
    assert "gemm_4bit_forward" in after  # said when 4-bit is asked for


# ---- defaults: TRL's, or ours with the reason -------------------------------------------------------------------------


def documented_defaults(cls) -> dict[str, str]:
    """`{field: "the text between the backticks of 'defaults to `...`'"}` of a TRL-style `Args` docstring."""
    import re

    pattern = re.compile(r"^\s{8}(\w+) \(.*?\*optional\*, defaults to `(.+?)`\):", re.M)
    return {name: value for name, value in pattern.findall(cls.__doc__)}


def test_every_documented_default_is_the_default():
    import dataclasses

    documented = documented_defaults(QHeadConfig)
    assert len(documented) > 30
    defaults = {f.name: f.default for f in dataclasses.fields(QHeadConfig)}
    for name, text in documented.items():
        assert name in defaults, name
        assert text.strip('"') == str(defaults[name]) or float(text) == defaults[name], (name, text, defaults[name])


def test_defaults_that_differ_from_trl_say_why():
    import dataclasses

    from trl import SFTConfig

    trl_defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
    trl_defaults["activation_checkpointing"] = trl_defaults["gradient_checkpointing"]  # transformers' new name
    ours = {f.name: f.default for f in dataclasses.fields(QHeadConfig)}
    differ = sorted(
        n for n in ours if n in trl_defaults and ours[n] != trl_defaults[n] and n != "gradient_checkpointing"
    )
    assert {"learning_rate", "bf16", "activation_checkpointing"} <= set(differ)
    section = QHeadConfig.__doc__.split("> Defaults that differ from TRL's")[1].split("Example:")[0]
    for name in differ:  # each in the section, with TRL's value and a reason
        entry = section.split(f"        {name} (")[1].split("\n        ")[0:3]
        assert "TRL" in " ".join(entry), name
    assert QHeadConfig(output_dir="x", report_to=[]).logging_steps == trl_defaults["logging_steps"]


# ---- missing TRL features: a dataset mixture, formatting_func, padding_free ----------------------------------------


def test_a_datasets_mixture_in_the_yaml_config_trains_on_every_dataset(tmp_path):
    from recipes.qhead_lora import main, make_parser
    from tests.recipe_assets import recipe_args, save_tiny_gpt2, write_corpus

    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    a, b = write_corpus(tmp_path / "a.txt", n_lines=5, seed=1), write_corpus(tmp_path / "b.txt", n_lines=3, seed=2)
    config = tmp_path / "mixture.yaml"
    mixture = [{"path": "text", "data_files": str(a)}, {"path": "text", "data_files": str(b)}]
    config.write_text(yaml.safe_dump({"datasets": mixture}))
    args = recipe_args(
        model_dir, a, tmp_path / "run", packing="false", max_steps=1, dataset_name=None, dataset_data_files=None
    )
    trainer = main(*make_parser().parse_args_and_config(["--config", str(config), *args, "--save_strategy", "no"]))
    assert len(trainer.train_dataset) == 5 + 3  # every line of both files (TRL's get_dataset concatenates them)


def test_formatting_func_turns_each_example_into_the_text_trained_on(tmp_path, gpt2_tokenizer):
    def formatting_func(example):
        return f"Question: {example['prompt']} Answer: {example['completion']}"

    dataset = Dataset.from_dict({"prompt": ["2+2?", "Sky?"], "completion": ["4", "blue"], "level": [1, 2]})
    trainer = QHeadTrainer(
        make_tiny_gpt2(),
        config(tmp_path, max_steps=1),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=gpt2_tokenizer,
        formatting_func=formatting_func,
    )
    for prepared in (trainer.train_dataset, trainer.eval_dataset):
        for row, example in zip(prepared, dataset, strict=True):
            expected = gpt2_tokenizer(formatting_func(example))["input_ids"] + [gpt2_tokenizer.eos_token_id]
            assert row["input_ids"] == expected
            assert row.get("completion_mask") is None  # the whole text is trained on, as SFTTrainer's formatting
    trainer.train()
    assert trainer.state.global_step == 1
    with pytest.raises(TypeError, match="example 0"):
        QHeadTrainer(
            make_tiny_gpt2(),
            config(tmp_path),
            train_dataset=dataset,
            processing_class=gpt2_tokenizer,
            formatting_func=lambda example: [example["prompt"]],
        )


def test_padding_free_is_refused_with_the_reason_and_the_alternative():
    with pytest.raises(ValueError, match=r"padding_free=True.*packing=True"):
        QHeadConfig(output_dir="x", report_to=[], padding_free=True)
    assert QHeadConfig(output_dir="x", report_to=[], packing=True).padding_free is False
