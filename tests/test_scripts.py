"""Every script a README command runs works from the repository root of a fresh clone, with nothing on PYTHONPATH.

Each script in `recipes/` and `tools/` is run here, or in the test file named in `RUN_BY`, as a subprocess with
minimal arguments (tiny models, a few steps). A script that no test runs fails `test_every_script_is_run_by_a_test`.
"""

import json
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import make_tiny_gpt2
from tests.recipe_assets import REPO, run

# The test file that runs each script as a subprocess (its name appears there as the command runs it).
RUN_BY = {
    "recipes/benchmark_frontier.py": "tests/recipes/test_benchmark_frontier.py",
    "recipes/benchmark_generation.py": "tests/recipes/test_benchmarks.py",
    "recipes/benchmark_training.py": "tests/recipes/test_benchmarks.py",
    "recipes/best_of_n_kl_bias.py": "tests/recipes/test_best_of_n_kl_bias.py",
    "recipes/checkpoint_size.py": "tests/test_scripts.py",
    "recipes/demo_sentiment.py": "tests/test_scripts.py",
    "recipes/gpu_check.py": "tests/test_scripts.py",
    "recipes/gvpo_frontier.py": "tests/recipes/test_gvpo_frontier.py",
    "recipes/offline_assets.py": "tests/test_scripts.py",
    "recipes/qhead_lora.py": "tests/recipes/test_qhead_lora.py",
    "tools/hostile_counts.py": "tests/test_scripts.py",
    "tools/lower_bounds.py": "tests/test_scripts.py",
}


def test_every_script_is_run_by_a_test():
    scripts = {
        path.relative_to(REPO).as_posix()
        for folder in ("recipes", "tools")
        for path in (REPO / folder).glob("*.py")
        if 'if __name__ == "__main__":' in path.read_text()  # scripts, not the modules they import
    }
    assert scripts == set(RUN_BY)
    for script, test_file in RUN_BY.items():
        text = (REPO / test_file).read_text()
        assert Path(script).name in text or "RECIPE" in text, (script, test_file)


def _python(script: str, *args: str, timeout: float = 300) -> str:
    return run([sys.executable, script, *map(str, args)], timeout=timeout).stdout


def test_checkpoint_size_prints_its_table():
    out = _python("recipes/checkpoint_size.py", "--r", "2", "--n_layer", "1")
    assert "GPT-2 small shapes (1 blocks), LoRA r=2" in out
    for row in ("full model", "LoRA adapters", "Q head", "checkpoint = adapters + Q head", "tied Q head"):
        assert f"| {row}" in out, row


def test_offline_assets_fetches_the_tokenizer():
    from transformers import AutoTokenizer

    folder = Path(_python("recipes/offline_assets.py", "gpt2-tokenizer").strip())
    assert AutoTokenizer.from_pretrained(folder)("Hello world").input_ids == [15496, 995]  # GPT-2's real BPE


def test_demo_runs_end_to_end_as_a_script(tmp_path, gpt2_tokenizer):
    model_dir = tmp_path / "tiny-gpt2"
    make_tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    prompts_file = tmp_path / "prompts.txt"  # the user's own prompts
    prompts_file.write_text("\n".join(f"My review number {i} says" for i in range(6)) + "\n")
    stdout = _python(
        "recipes/demo_sentiment.py", "--model", model_dir, "--output_dir", out, "--prompts_file", prompts_file,
        "--reward", "vader", "--n_train_prompts", 4,
        "--n_eval_prompts", 2, "--num_generations", 2, "--max_new_tokens", 4, "--epochs", 1, "--train_batch_size", 4,
        "--lora_r", 2, "--tilted_samples", 1, "--betas", 1.0, "--gen_batch_size", 16, "--threads", 1,
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in results["rows"]][:2] == ["base sampling", "best-of-N"]
    assert "| best-of-N | N=16 |" in stdout
    assert "My review number" in (out / "samples.md").read_text()  # sampled from the given prompts


def test_hostile_counts_classifies_every_hostile_case():
    counts = json.loads(_python("tools/hostile_counts.py", "--json"))
    files = sorted(path.name for path in (REPO / "tests").glob("test_hostile_*.py"))
    assert sorted(counts["files"]) == files
    assert all(counts["features"][file] != file for file in files), "a hostile file without a feature in FEATURES"
    for kind in ("clear error", "correct result"):
        assert counts["total"][kind] == sum(c.get(kind, 0) for c in counts["files"].values())
    # This file's hostile rewards: the multi-turn returns are checked numbers, a reward of 1e39 a clear error.
    rewards = counts["files"]["test_hostile_rewards.py"]
    assert rewards["clear error"] > 0 and rewards["correct result"] > 0
    assert counts["passed"] is None  # collected, not run


def test_lower_bounds_pins_every_bound_but_torch():
    with open(REPO / "pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    project = pyproject["project"]
    bounds = [req for req in project["dependencies"] if ">=" in req]
    bounds += [req for extra in ("dev", "quant", "demo") for req in project["optional-dependencies"][extra]]
    expected = {req.split(">=")[0].strip(): req.split(">=")[1].split()[0].split(",")[0] for req in bounds}
    expected.pop("torch")
    pins = _python("tools/lower_bounds.py", "dev", "quant", "demo").split()
    assert sorted(set(pins)) == sorted({f"{name}=={version}" for name, version in expected.items()})
    # --build-system adds the build requirement's lower bound (setuptools, for pip's build environment).
    (build_requirement,) = pyproject["build-system"]["requires"]
    with_build = _python("tools/lower_bounds.py", "--build-system", "dev", "quant", "demo").split()
    assert sorted(set(with_build) - set(pins)) == [build_requirement.replace(">=", "==")]
    with pytest.raises(AssertionError, match="unknown extra"):
        run([sys.executable, "tools/lower_bounds.py", "gpu"], timeout=60)


def test_gpu_check_without_cuda_exits_with_a_clear_message():
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: recipes/gpu_check.py would run its checks")
    result = subprocess.run(
        [sys.executable, "recipes/gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result
    assert "gpu_check: no CUDA device" in result.stderr
