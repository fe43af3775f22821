"""recipes/benchmark_frontier.py: every configuration's curve beside one base, one best-of-N and the oracle row, run as
a script on a tiny GPT-2 with the real GPT-2 tokenizer."""

import json
import sys

import pytest
import torch
from datasets import Dataset

from recipes import benchmark_frontier as frontier
from tests.conftest import make_tiny_gpt2
from tests.recipe_assets import run

pytest.importorskip("vaderSentiment", reason="the `demo` extra (make test installs it)")


def test_config_specs_are_checked():
    assert frontier.parse_config("candidates/soft/tied") == ("candidates", "soft", "tied")
    assert frontier.parse_config("effects/mean/dense") == ("effects", "mean", "dense")
    for bad in ("candidates/soft", "mc/linex/dense", "mc/mean/sparse"):
        with pytest.raises(ValueError, match="LABELS/TARGET/HEAD"):
            frontier.parse_config(bad)
    with pytest.raises(ValueError, match="lora_r"):
        frontier.parse_args(["--lora_r", "4"])
    with pytest.raises(ValueError, match="whole number"):
        frontier.parse_args(["--num_generations", "8", "--scales", "0.3"])
    assert frontier.parse_args(["--num_generations", "8", "--scales", "0.25", "2"]).scales == [0.25, 2.0]
    with pytest.raises(ValueError, match="oracle_lookahead"):
        frontier.parse_args(["--oracle_k", "0", "--oracle_lookahead", "4"])
    with pytest.raises(ValueError, match="oracle_lookahead"):
        frontier.parse_args(["--oracle_lookahead", "-1"])


def test_subset_takes_the_first_completions_of_each_prompt_and_the_labels_asked_for():
    scored = Dataset.from_dict(
        {
            "input_ids": [[7, 1], [7, 2], [7, 3], [8, 4], [8, 5], [8, 6]],
            "completion_mask": [[0, 1]] * 6,
            "done": [True] * 6,
            "reward": [1.0, 0.0, 5.0, 2.0, 4.0, 9.0],
            "candidate_ids": [[[], [1, 2]]] * 6,
            "candidate_rewards": [[[], [0.5, -0.5]]] * 6,
            "candidate_sampled_reward": [[0.0, 0.5]] * 6,
        }
    )
    mc = frontier.subset(scored, 3, 2, "mc")
    assert mc["input_ids"] == [[7, 1], [7, 2], [8, 4], [8, 5]]
    assert mc["reward"] == [0.5, -0.5, -1.0, 1.0]  # centred over the 2 completions used per prompt
    assert not [c for c in mc.column_names if c.startswith("candidate_")]
    cand = frontier.subset(scored, 3, 2, "candidates")
    assert cand["reward"] == mc["reward"] and cand["candidate_rewards"] == [[[], [0.5, -0.5]]] * 4
    effects = frontier.subset(scored, 3, 2, "effects")  # the rows of `candidates`: the trainer leaves the returns out
    assert effects.to_list() == cand.to_list()
    first = frontier.subset(scored, 3, 2, "mc", n_prompts=1)  # a prompt-count subset: the first prompt's rows
    assert first["input_ids"] == [[7, 1], [7, 2]] and first["reward"] == [0.5, -0.5]
    plain = scored.remove_columns(["candidate_ids", "candidate_rewards", "candidate_sampled_reward"])
    with pytest.raises(ValueError, match="needs candidate columns"):
        frontier.subset(plain, 3, 2, "effects")
    with pytest.raises(ValueError, match="`labels`"):
        frontier.subset(scored, 3, 2, "oracle")


def test_label_fit_is_the_share_of_the_labels_reproduced():
    log = [
        {"loss_q": 0.5},
        {"eval_train_loss_candidates": 0.5, "eval_train_candidate_target_sq": 2.0},  # an earlier evaluation
        {"eval_train_loss_candidates": 0.25, "eval_train_candidate_target_sq": 1.0},
        {"eval_held_out_loss_candidates": 3.0, "eval_held_out_candidate_target_sq": 2.0},
        {"eval_zero_loss_candidates": 0.0, "eval_zero_candidate_target_sq": 0.0},
    ]
    fit = frontier.label_fit(log, ["train", "held_out", "zero"])
    assert fit == {"train": 0.75, "held_out": -0.5, "zero": None}  # the last evaluation; worse than 0; no labels


def test_frontier_runs_every_configuration_against_one_base(tmp_path, gpt2_tokenizer):
    model_dir = tmp_path / "tiny-gpt2"
    make_tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    run(
        [
            sys.executable, "recipes/benchmark_frontier.py", "--model", str(model_dir), "--output_dir", str(out),
            "--n_train_prompts", "3", "--n_eval_prompts", "2", "--num_generations", "2", "--max_new_tokens", "4",
            "--epochs", "1", "--train_batch_size", "4", "--tilted_samples", "1", "--betas", "1.0", "0.3",
            "--gen_batch_size", "16", "--threads", "1", "--candidate_k", "3", "--oracle_k", "3", "--oracle_lookahead", "2",
            "--configs", "mc/mean/dense", "candidates/soft/tied", "--scales", "0.5", "1", "--future_continuations", "2",
        ],
        timeout=600,
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    methods = [row["method"] for row in results["rows"]]
    expected = ["oracle one-step (top-3)", "oracle two-step (top-3, then top-2)"]
    expected += ["mc/mean/dense x0.5", "candidates/soft/tied x0.5"]
    expected += ["mc/mean/dense x1", "candidates/soft/tied x1"]
    assert methods[:5] == ["base sampling"] + ["best-of-N"] * 4
    assert methods[5:] == [m for m in ["KL-optimal (estimate)", *expected] for _ in range(2)]  # two betas each
    assert [r["method"] for r in results["runs"]] == ["KL-optimal (estimate)", *expected]
    assert [r.get("completions_per_prompt") for r in results["runs"]] == [None, None, None, 1, 1, 2, 2]
    # every other row is compared with best-of-N at its KL; the oracle really called the reward
    assert [c["method"] for c in results["comparison"]] == methods[5:]
    one_step, two_step = results["runs"][1]["reward_cost"], results["runs"][2]["reward_cost"]
    assert 0 < one_step["texts_requested"] < two_step["texts_requested"]  # k + 1 texts per step, then k k2 more
    assert results["labelling_cost"]["states_labelled"] > 0
    assert results["labelling_cost"]["continuations_sampled"] > 0  # future-value labels (--future_continuations)
    source = (out / "training_data" / "label_source.txt").read_text()
    assert source.startswith("FutureValueLabels(k=3, num_continuations=2, beta=0.3, stride=1,")
    assert (out / "frontier.png").stat().st_size > 0
    for entry in results["runs"][1:]:  # every sampled method's ratio with its bootstrap interval over prompts
        interval = entry["interval"]
        assert interval["estimate"] == entry["mean_gain_ratio"] and interval["n_boot"] == 1000
        assert interval["estimate"] is None or interval["low"] <= interval["estimate"] <= interval["high"]


def test_context_heads_are_configurations(tmp_path, gpt2_tokenizer):
    """HEAD `adapter` (LoRA on the top --q_lora_layers blocks, the Q network) and `q_model` (the policy's first
    --q_model_layers blocks as a Q model): built as asked, trained and decoded beside the others."""
    model_dir = tmp_path / "tiny-gpt2"
    make_tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    args = frontier.parse_args(["--model", str(model_dir), "--q_lora_layers", "1", "--q_model_layers", "1"])
    adapter, _ = frontier.load_head_model(args, "adapter")
    adapted = {n.split(".h.")[1].split(".")[0] for n, _ in adapter.named_parameters() if "lora_" in n}
    assert adapter.q_head_type == "adapter" and adapted == {str(adapter.config.n_layer - 1)}  # the top block only
    q_model, _ = frontier.load_head_model(args, "q_model")
    small = q_model.q_head.q_network()
    assert q_model.q_head_type == "q_model" and len(small.transformer.h) == 1 < q_model.config.n_layer
    policy_first = q_model.pretrained_model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(small.transformer.h[0].attn.c_attn.weight, policy_first)  # a copy of the first block
    assert small.transformer.h[0].attn.c_attn.weight is not policy_first  # trained apart from the frozen policy
    dense_args = frontier.parse_args(["--model", str(model_dir), "--q_model_layers", "1", "--q_output", "dense"])
    for head in ("adapter", "q_model"):
        dense, _ = frontier.load_head_model(dense_args, head)
        assert dense.q_head.output_type == "dense" and dense.q_head.output.weight.shape[0] == dense.config.vocab_size
    assert q_model.q_head.output_type == "tied"  # the default
    too_deep = frontier.parse_args(["--model", str(model_dir), "--q_model_layers", str(q_model.config.n_layer + 1)])
    with pytest.raises(ValueError, match="has only 2 blocks to copy"):
        frontier.load_head_model(too_deep, "q_model")
    for bad in (["--q_lora_r", "0"], ["--q_model_layers", "0"]):
        with pytest.raises(SystemExit):
            frontier.parse_args(bad)

    out = tmp_path / "out"
    frontier.main(  # in this process: the script's own run is the test above
        [
            "--model", str(model_dir), "--output_dir", str(out),
            "--n_train_prompts", "2", "--n_eval_prompts", "2", "--num_generations", "2", "--max_new_tokens", "3",
            "--epochs", "1", "--train_batch_size", "4", "--tilted_samples", "1", "--betas", "1.0",
            "--gen_batch_size", "16", "--threads", "1", "--candidate_k", "2", "--oracle_k", "0",
            "--q_lora_layers", "1", "--q_model_layers", "1", "--configs", "effects/mean/adapter", "mc/mean/q_model",
        ]
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    runs = {r["method"]: r for r in results["runs"]}
    assert {"effects/mean/adapter", "mc/mean/q_model"} <= set(runs)
    assert all(runs[m]["train_seconds"] > 0 and runs[m]["final_loss_q"] is not None for m in runs if "/" in m)
    tilted = [row for row in results["rows"] if row["method"] in runs and "/" in row["method"]]
    assert len(tilted) == 2 and all(row["n"] == 2 for row in tilted)
    # the training data is saved, and a later run may train on it instead of sampling again (checked first)
    split = ["--model", str(model_dir), "--n_train_prompts", "2", "--n_eval_prompts", "2"]
    prompts, _, _ = frontier.task_of(frontier.parse_args(split))
    source = frontier.label_source(frontier.parse_args([*split, "--candidate_k", "2"]), candidates=True)
    assert source == (out / "training_data" / "label_source.txt").read_text() and "CandidateLabels(k=2," in source
    saved = frontier.load_training_data(str(out / "training_data"), prompts, 2, source)
    assert len(saved) == 4 and "candidate_ids" in saved.column_names
    first = frontier.load_training_data(str(out / "training_data"), prompts[:1], 2, source)
    assert first.to_list() == saved.select([0, 1]).to_list()  # a run over the first prompt of the same list
    with pytest.raises(ValueError, match="not the first of this run's 1 training prompts x 2"):
        frontier.load_training_data(str(out / "training_data"), prompts[1:], 2, source)
    with pytest.raises(ValueError, match="not the first of this run's 2 training prompts x 3"):  # 4 rows, 3 per prompt
        frontier.load_training_data(str(out / "training_data"), prompts, 3, source)
    for other_labels in (["--candidate_k", "3"], ["--candidate_k", "2", "--future_continuations", "2"]):
        other = frontier.label_source(frontier.parse_args([*split, *other_labels]), candidates=True)
        with pytest.raises(ValueError, match="was labelled by CandidateLabels\\(k=2,.*this run labels with"):
            frontier.load_training_data(str(out / "training_data"), prompts, 2, other)  # never other labels
    assert frontier.load_training_data(str(out / "training_data"), prompts, 2, "none").to_list() == saved.to_list()
    # a run over more prompts samples only the others, and saves the union in place of the folder it read
    frontier.main(
        [
            "--model", str(model_dir), "--output_dir", str(out), "--training_data", str(out / "training_data"),
            "--n_train_prompts", "3", "--n_eval_prompts", "2", "--num_generations", "2", "--max_new_tokens", "3",
            "--epochs", "1", "--train_batch_size", "4", "--tilted_samples", "1", "--betas", "1.0",
            "--gen_batch_size", "16", "--threads", "1", "--candidate_k", "2", "--oracle_k", "0",
            "--configs", "effects/mean/tied", "--label_fit",
        ]
    )  # fmt: skip
    fit = json.loads((out / "results.json").read_text())["runs"][-1]["label_fit"]
    assert set(fit) == {"train", "held_out"}  # evaluated on both, after training
    assert all(share is None or share <= 1.0 for share in fit.values())
    more, _, _ = frontier.task_of(frontier.parse_args([*split[:3], "3", *split[4:]]))
    extended = frontier.load_training_data(str(out / "training_data"), more, 2, source)
    assert list(extended["prompt"]) == [p for p in more for _ in range(2)] and more[:2] == prompts
    assert extended.select(range(4)).to_list() == saved.to_list()  # the saved rows, kept as they were
    assert not any((out / f"training_data.{leftover}").exists() for leftover in ("partial", "old"))
    assert (out / "training_data" / "label_source.txt").read_text() == source  # the union keeps its record
    (out / "training_data" / "label_source.txt").unlink()  # data saved by a release that did not record it
    with pytest.raises(ValueError, match="a source it did not record"):
        frontier.load_training_data(str(out / "training_data"), more, 2, source)
