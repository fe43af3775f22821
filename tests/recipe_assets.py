"""Tiny on-disk assets for tests that run `recipes/qhead_lora.py`: a dropout-free 2-layer GPT-2 folder, a small text
corpus and the real GPT-2 tokenizer folder. Dropout is off so that runs differing only in how the batch is split
(processes, resumption) compute the same numbers."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from recipes.offline_assets import gpt2_tokenizer_dir

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "qhead_lora.py"
WORDS = "the a cat dog sat ran on under mat tree big small red blue quickly slowly and then".split()


def save_tiny_gpt2(folder: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer GPT-2 with the real vocabulary and no dropout, saved as an ordinary model folder."""
    torch.manual_seed(seed)
    settings = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(GPT2Config(**{**settings, **overrides})).save_pretrained(folder)
    return folder


def write_corpus(path: Path, n_lines: int = 64, seed: int = 0) -> Path:
    """Lines of 4 to 20 random words: a plain-text dataset for `--dataset_name text`."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) + "." for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n")
    return path


def recipe_args(model_dir: Path, corpus: Path, output_dir: Path, **flags) -> list[str]:
    """Command-line arguments of a short LoRA run on the tiny model; `flags` add or override (`None` drops one)."""
    defaults = {
        "model_name_or_path": model_dir,
        "tokenizer_name_or_path": gpt2_tokenizer_dir(),
        "dataset_name": "text",
        "dataset_data_files": corpus,
        "max_length": 32,
        "packing": "true",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": "true",
        "save_dir": output_dir,  # the seed's alias of --output_dir
    }
    args = []
    for name, value in {**defaults, **flags}.items():
        if value is not None:
            args += [f"--{name}", str(value)]
    return args


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a script subprocess: this one's, offline and quiet. Nothing is added to PYTHONPATH: scripts
    run as the README shows them, from the repository root of a fresh clone, and must find what they import."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run(command: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run a command from the repository root; fail with its output when it fails."""
    result = subprocess.run(
        command, cwd=REPO, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{command} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


PYTHON = sys.executable


def run_in_process(args: list[str]):
    """`recipes/qhead_lora.py` with these arguments in this process (no interpreter start-up); returns its trainer."""
    from recipes.qhead_lora import main, make_parser

    return main(*make_parser().parse_args_and_config(args))
