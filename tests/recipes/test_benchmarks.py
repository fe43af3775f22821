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


@pytest.mark.slow
def test_training_benchmark_rows_for_every_head_type(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    rows = ["a", "lm-tied", "b-tied", "tied-only", "adapter", "q_model"]
    out = tmp_path / "bench.json"
    n_layer, hidden, vocab, lora_r = 2, 64, 50257, 4
    stdout = _run(
        "benchmark_training.py", "--n_layer", str(n_layer), "--n_embd", str(hidden), "--n_head", "2", "--steps", "2",
        "--warmup", "1", "--rounds", "1", "--batch_size", "2", "--seq_len", "16", "--threads", "1",
        "--lora_r", str(lora_r), "--rows", ",".join(rows), "--json", str(out),
    )  # fmt: skip
    summary = json.loads(out.read_text())["summary"]
    assert list(summary) == rows
    for row, entry in summary.items():
        assert entry["n_steps_timed"] == 2, row
        assert entry["seconds_per_step"] > 0 and entry["cpu_seconds_per_step"] > 0 and entry["peak_bytes"] > 0, row
        base = summary[entry["baseline"]]
        assert entry["time_ratio"] == pytest.approx(entry["seconds_per_step"] / base["seconds_per_step"]), row
        assert entry["cpu_ratio"] == pytest.approx(entry["cpu_seconds_per_step"] / base["cpu_seconds_per_step"]), row
        assert f"| {row} | {entry['description']} |" in stdout
    # The tied head's own cost is read against the LM-only step with the same head; the frozen-policy rows against
    # what a user would otherwise run, SFTTrainer's LM step on the same policy.
    assert summary["b-tied"]["baseline"] == "lm-tied"
    assert {summary[row]["baseline"] for row in ("lm-tied", "tied-only", "adapter", "q_model")} == {"a"}
    # What trains in each row, counted independently: the tied head is U (H x H) and a |V| bias; with the policy
    # trainable too in b-tied, alone in tied-only. The adapter adds LoRA A and B on every block's c_attn (H -> 3H),
    # attn c_proj (H -> H), c_fc (H -> 4H) and mlp c_proj (4H -> H): r (in + out) each. The Q model trains fully.
    tied_head = hidden * hidden + vocab
    assert summary["b-tied"]["trainable_params"] == summary["a"]["trainable_params"] + tied_head
    assert summary["lm-tied"]["trainable_params"] == summary["b-tied"]["trainable_params"]
    assert summary["tied-only"]["trainable_params"] == tied_head
    lora = n_layer * lora_r * (4 * hidden + 2 * hidden + 5 * hidden + 5 * hidden)
    assert summary["adapter"]["trainable_params"] == lora + tied_head
    small = GPT2LMHeadModel(GPT2Config(n_layer=n_layer // 2, n_embd=hidden // 2, n_head=2, vocab_size=vocab))
    small_head = (hidden // 2) ** 2 + vocab
    assert summary["q_model"]["trainable_params"] == sum(p.numel() for p in small.parameters()) + small_head


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


def test_training_benchmark_ratio_to_a_zero_baseline_is_none():
    """A tiny model's step on CPU may leave the sampled RSS where it was: a baseline of 0 bytes gives no ratio, not a
    ZeroDivisionError after every row has run."""
    from recipes.benchmark_training import summarise

    def run(row, step_bytes):
        return {"row": row, "step_times_s": [0.2], "step_cpu_s": [0.4], "peak_bytes": 100, "step_bytes": step_bytes,
                "trainable_params": 1}  # fmt: skip

    summary = summarise([run("a", 50), run("lm", 0)], ["a", "lm"])
    assert summary["lm"]["baseline"] == "a" and summary["lm"]["step_ratio"] == 0.0
    assert summary["lm"]["time_ratio"] == pytest.approx(1.0) and summary["lm"]["peak_ratio"] == pytest.approx(1.0)
    zero_base = summarise([run("a", 0), run("lm", 50)], ["a", "lm"])
    assert zero_base["lm"]["step_ratio"] is None and zero_base["lm"]["time_ratio"] == pytest.approx(1.0)
