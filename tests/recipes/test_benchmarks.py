"""The benchmark scripts run end to end on tiny shapes and report what the README's tables are made of.

They are run as the README runs them (`python recipes/benchmark_*.py ...`), in a subprocess, so that their thread and
warning settings stay out of the test process. The figures of such tiny runs mean nothing; the tables' structure, the
baselines and the checks the scripts make do.
"""

import json
import subprocess
import sys

import pytest

from tests.recipe_assets import REPO, subprocess_env


def _launch(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, f"recipes/{script}", *args]
    return subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def _run(script: str, *args: str) -> str:
    done = _launch(script, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_training_benchmark_prints_and_writes_every_row(tmp_path):
    rows = ["a", "b", "c", "e", "lm", "a-lora", "d"]
    out = tmp_path / "bench.json"
    tiny = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--batch_size", "2", "--seq_len", "16"]
    stdout = _run(
        "benchmark_training.py", *tiny, "--steps", "2", "--warmup", "1", "--rounds", "1", "--threads", "1",
        "--rows", ",".join(rows), "--json", str(out),
    )  # fmt: skip
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert list(summary) == rows
    for row, entry in summary.items():
        assert entry["n_steps_timed"] == 2, row
        assert entry["seconds_per_step"] > 0 and entry["peak_bytes"] > 0, row
        base = summary[entry["baseline"]]
        assert entry["time_ratio"] == pytest.approx(entry["seconds_per_step"] / base["seconds_per_step"])
        assert entry["peak_ratio"] == pytest.approx(entry["peak_bytes"] / base["peak_bytes"])
        assert f"| {row} | {entry['description']} |" in stdout
    assert summary["a"]["time_ratio"] == summary["a-lora"]["time_ratio"] == 1.0
    assert summary["d"]["baseline"] == "a-lora" and summary["b"]["baseline"] == "a"
    # LoRA rows train the adapters (and, for `d`, the Q head), not the whole backbone.
    assert summary["a-lora"]["trainable_params"] < summary["a"]["trainable_params"]
    assert summary["e"]["logits_buffers"].startswith("dense") and summary["b"]["logits_buffers"] == "chunked"


def test_training_benchmark_rejects_a_row_without_its_baseline(capsys):
    # The check runs when the flags are read, before any work: in this process (no interpreter start-up to pay).
    from recipes.benchmark_training import main

    with pytest.raises(SystemExit) as raised:
        main(["--rows", "b,d"])
    assert raised.value.code != 0 and "add it to --rows" in capsys.readouterr().err


@pytest.mark.slow
def test_generation_benchmark_runs_every_row_and_the_folded_model_matches_the_processor(tmp_path):
    # One run on a tiny shape covers the dense rows and the context heads' rows (`--context_heads` adds them to the
    # same table): the checks are on the table's structure and the processor / folded agreement, not the figures.
    out = tmp_path / "gen.json"
    stdout = _run(
        "benchmark_generation.py", "--rounds", "1", "--batch", "1", "--prompt_length", "4", "--new_tokens", "2",
        "--threads", "1", "--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--context_heads", "--json", str(out),
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["processor_equals_folded_greedy"] is True
    dense_rows = {"plain", "processor", "processor, no KL", "processor, top_k=50", "folded"}
    context_rows = {"adapter: processor", "q_model: processor"}
    assert set(result["wall"]) == set(result["cpu"]) == dense_rows | context_rows
    assert result["wall"]["plain"]["ratio"] == result["cpu"]["plain"]["ratio"] == 1.0
    assert all(result["cpu"][row]["s_per_token"] > 0 for row in context_rows)
    assert "| generation |" in stdout and "| adapter: processor |" in stdout
