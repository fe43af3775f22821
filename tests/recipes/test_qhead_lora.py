"""`recipes/qhead_lora.py`: its command line (TRL parser, the seed's flag names, `--config` files), the LoRA targets it
picks, the shipped accelerate configs, and `--resume_from_checkpoint` continuing exactly where a run left off."""

import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config import load_config_from_file
from safetensors.torch import load_file

from recipes.qhead_lora import lora_config, make_parser
from tests.conftest import make_tiny_llama
from tests.recipe_assets import RECIPE, REPO, recipe_args, run, run_in_process, save_tiny_gpt2, write_corpus

SEED_FLAGS = ["--gamma", "--q_weight", "--gae_lambda", "--use_lm_rewards", "--seed"]
SEED_ALIASES = ["--save_interval", "--save_dir", "--steps", "--wandb"]


def test_help_lists_the_seed_flags():
    out = run([sys.executable, str(RECIPE), "--help"], timeout=120).stdout
    for flag in SEED_FLAGS + SEED_ALIASES + ["--model_name_or_path", "--load_in_4bit", "--lora_target_modules"]:
        assert f"  {flag} " in out or f"  {flag}," in out or f"  {flag}\n" in out, flag
    assert "--config" in out


def test_seed_flags_set_the_training_arguments():
    script, training, model = make_parser().parse_args_and_config(
        ["--gamma", "0.9", "--q_weight", "0.5", "--gae_lambda", "0.95", "--use_lm_rewards", "--seed", "3"]
        + ["--save_dir", "run", "--steps", "7", "--save_interval", "2", "--wandb"]
    )
    assert (training.gamma, training.q_weight, training.gae_lambda, training.use_lm_rewards) == (0.9, 0.5, 0.95, True)
    assert training.seed == 3 and training.output_dir == "run" and training.max_steps == 7
    assert training.save_steps == 2 and training.save_strategy == "steps" and training.report_to == ["wandb"]
    assert model.model_name_or_path == "gpt2" and model.use_peft  # the recipe's defaults
    assert script.tokenizer_name_or_path is None


def test_defaults_are_transformers_defaults_without_the_aliases():
    _, training, _ = make_parser().parse_args_and_config([])
    assert training.max_steps == -1 and training.report_to == [] and training.save_steps == 500


def test_config_file_with_flags_on_top():
    config = REPO / "recipes" / "configs" / "qhead_lora.yaml"
    _, training, model = make_parser().parse_args_and_config(["--config", str(config), "--steps", "5"])
    assert training.max_steps == 5  # the flag wins over the file's 2000
    assert training.use_lm_rewards and training.gae_lambda == 0.95 and training.packing
    assert training.dataset_name == "Salesforce/wikitext" and training.output_dir == "gpt2-qhead-lora"
    assert model.use_peft and model.lora_r == 16 and model.model_name_or_path == "gpt2"


@pytest.mark.parametrize("name", ["single_process", "multi_gpu", "fsdp", "deepspeed_zero2"])
def test_accelerate_configs_load(name):
    config = load_config_from_file(str(REPO / "recipes" / "configs" / "accelerate" / f"{name}.yaml"))
    expected = {"single_process": "NO", "multi_gpu": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}
    assert str(config.distributed_type).split(".")[-1] == expected[name]
    if name == "fsdp":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # what QHeadTrainer._save handles
    if name == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2


def test_lora_targets(tmp_path):
    _, _, model_args = make_parser().parse_args_and_config([])
    gpt2 = lora_config(model_args, str(save_tiny_gpt2(tmp_path / "gpt2")))
    assert gpt2.target_modules == {"c_attn", "c_proj", "c_fc"}
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2"), gpt2)
    assert gpt2.fan_in_fan_out  # PEFT sets it for GPT-2's Conv1D projections

    make_tiny_llama().save_pretrained(tmp_path / "llama")
    llama = lora_config(model_args, str(tmp_path / "llama"))
    assert llama.target_modules is None and not llama.fan_in_fan_out  # PEFT's default for the architecture

    _, _, model_args = make_parser().parse_args_and_config(["--lora_target_modules", "q_proj", "v_proj"])
    chosen = lora_config(model_args, str(tmp_path / "llama"))
    assert chosen.target_modules == {"q_proj", "v_proj"}


def _history(output_dir: Path, step: int) -> dict[int, dict]:
    history = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry for entry in history if "loss" in entry}


def test_resume_continues_exactly(tmp_path):
    """6 steps in one go vs 3 steps, then a new process-like run resumed from checkpoint-3: the same losses, learning
    rates and final weights, so optimizer, scheduler, step count, RNG (LoRA dropout is on), adapters and Q head were
    all restored."""
    model_dir, corpus = save_tiny_gpt2(tmp_path / "model"), write_corpus(tmp_path / "corpus.txt", n_lines=48)
    common = dict(steps=6, save_interval=3, per_device_train_batch_size=2, lora_dropout=0.1)
    common |= dict(gae_lambda=0.95, use_lm_rewards="true")  # so the Q head has targets to learn
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_in_process(recipe_args(model_dir, corpus, full, **common))
    trainer = run_in_process(
        recipe_args(model_dir, corpus, resumed, resume_from_checkpoint=full / "checkpoint-3", **common)
    )

    assert trainer.state.global_step == 6
    full_log, resumed_log = _history(full, 6), _history(resumed, 6)
    assert sorted(resumed_log) == list(range(1, 7))  # steps 1-3 come from checkpoint-3's trainer state
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm", "learning_rate", "loss_q"):
            assert resumed_log[step][key] == pytest.approx(full_log[step][key], rel=1e-6, abs=1e-9), (step, key)
    for name in ("adapter_model.safetensors", "q_head.safetensors"):
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    # Resuming changed something: the weights at checkpoint-3 are not the final ones.
    start = load_file(full / "checkpoint-3" / "q_head.safetensors")
    assert not torch.equal(start["weight"], load_file(full / "q_head.safetensors")["weight"])
