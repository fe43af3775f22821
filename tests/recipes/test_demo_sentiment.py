"""The demo's pipeline (recipes/demo_sentiment.py) end to end on a tiny random GPT-2 with the real GPT-2 tokenizer, and
its evaluation helpers against obvious references. No SmolLM2 download here."""

import json
import math

import pytest
from datasets import Dataset

from recipes import common, tasks
from recipes import demo_sentiment as demo
from tests.conftest import make_tiny_gpt2
from trl_qhead.labels import CandidateLabels, FutureValueLabels

pytest.importorskip("vaderSentiment", reason="the `demo` extra (make test installs it)")


def test_split_prompts_disjoint_and_seeded():
    prompts = [f"p{i}" for i in range(10)]
    train, held_out = tasks.split_prompts(prompts, 6, 3, seed=1)
    assert len(train) == 6 and len(held_out) == 3 and not set(train) & set(held_out)
    assert (train, held_out) == tasks.split_prompts(prompts, 6, 3, seed=1)
    with pytest.raises(ValueError, match="available"):
        tasks.split_prompts(prompts, 8, 3, seed=1)


def test_sentiment_reward_is_vader_compound():
    scores = tasks.sentiment_reward(prompts=["x", "x"], completions=["I love it, wonderful!", "Awful and sad."])
    assert scores[0] > 0.5 and scores[1] < -0.5


def test_tone_reward_flips_the_sentiment_with_the_request_in_the_prompt():
    completions = ["I love it, wonderful!", "Awful and sad."]
    plain = tasks.sentiment_reward(prompts=["x", "x"], completions=completions)
    five = tasks.tone_reward(prompts=["Five stars. The food"] * 2, completions=completions)
    one = tasks.tone_reward(prompts=[" One star. The food"] * 2, completions=completions)
    assert five == pytest.approx(plain) and one == pytest.approx([-r for r in plain])
    with pytest.raises(ValueError, match="prompt 1"):
        tasks.tone_reward(prompts=["Five stars. a", "Three stars. b"], completions=completions)
    assert tasks.resolve_reward("tone") is tasks.tone_reward
    prompts = tasks.load_prompts(tasks.TONE_PROMPTS_FILE)  # every shipped prompt carries a request, both kinds
    signs = tasks.tone_reward(prompts=prompts, completions=["wonderful"] * len(prompts))
    assert {s > 0 for s in signs} == {True, False}


def test_training_rows_centre_per_prompt_and_keep_done():
    data = Dataset.from_dict(  # generate_and_score's layout: two prompts, two completions each
        {
            "input_ids": [[5, 6, 1, 2], [5, 6, 3, 99], [7, 4], [7, 8, 9]],
            "completion_mask": [[0, 0, 1, 1], [0, 0, 1, 1], [0, 1], [0, 1, 1]],
            "done": [True, True, False, True],
            "reward": [0.5, -0.5, 1.0, 0.0],
        }
    )
    rows = common.training_rows(data, 2).to_list()
    assert [r["input_ids"] for r in rows] == data["input_ids"]  # no EOS appended: `done` marks the episode's end
    assert [r["completion_mask"] for r in rows] == data["completion_mask"]
    assert [r["done"] for r in rows] == [True, True, False, True]
    assert [r["reward"] for r in rows] == pytest.approx([0.5, -0.5, 0.5, -0.5])
    with pytest.raises(ValueError, match="whole number"):
        common.training_rows(data.select(range(3)), 2)


def test_demo_end_to_end_on_tiny_gpt2(tmp_path, gpt2_tokenizer):
    model_dir = tmp_path / "tiny-gpt2"
    make_tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    args = demo.parse_args(
        [
            "--model",
            str(model_dir),
            "--output_dir",
            str(out),
            "--n_train_prompts",
            "4",
            "--n_eval_prompts",
            "2",
            "--num_generations",
            "2",
            "--max_new_tokens",
            "6",
            "--epochs",
            "1",
            "--train_batch_size",
            "4",
            "--lora_r",
            "4",
            "--tilted_samples",
            "2",
            "--betas",
            "1.0",
            "0.1",
            "--gen_batch_size",
            "16",
        ]
    )
    results = demo.run(args)

    for name in ("results.md", "results.json", "samples.md", "frontier.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    rows = results["rows"]
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("base sampling", ""),
        ("best-of-N", "N=2"),
        ("best-of-N", "N=4"),
        ("best-of-N", "N=8"),
        ("best-of-N", "N=16"),
        ("KL-optimal (estimate)", "beta=1"),
        ("KL-optimal (estimate)", "beta=0.1"),
        ("Q-tilted", "beta=1"),
        ("Q-tilted", "beta=0.1"),
    ]
    base, bon, optimal, tilted = rows[0], rows[1:5], rows[5:7], rows[7:]
    assert optimal[0]["kl"] < optimal[1]["kl"] < math.log(16) and optimal[1]["reward"] >= base["reward"]
    assert base["kl"] == 0.0 and base["n"] == 2 * 16
    for row, n in zip(bon, (2, 4, 8, 16), strict=True):
        # the exact KL of the base samples' reward distribution, at most the bound (which the row keeps beside it)
        assert row["kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n) and 0.0 <= row["kl"] <= row["kl_bound"]
        assert row["samples_per_output"] == n and row["n"] == 2 * 16 // n
    rewards = [r["reward"] for r in (base, *bon)]
    assert rewards == sorted(rewards)  # a group of 2N is two groups of N: the mean of the maxima cannot drop
    for row in tilted:
        # A KL, up to float32 rounding: the tiny model's Q head barely tilts, so it sits at ~1e-7 either side of 0.
        assert row["kl"] >= -1e-5 and row["n"] == 2 * 2 and row["samples_per_output"] == 1
    for row in (base, *bon, *tilted):
        assert -1.0 <= row["reward"] <= 1.0 and 0.0 <= row["distinct_2"] <= 1.0 and row["perplexity"] > 1.0
    assert results["mean_gain_ratio_kl_0.2_1.5"] is None or -10 < results["mean_gain_ratio_kl_0.2_1.5"] < 10
    interval, ratio = results["mean_gain_ratio_interval"], results["mean_gain_ratio_kl_0.2_1.5"]
    assert interval["n_boot"] == 1000 and (interval["estimate"] is None) == (ratio is None)
    assert ratio is None or interval["estimate"] == pytest.approx(ratio, abs=1e-9)
    assert results["policy_drift_kl_lora_vs_pretrained"] >= -1e-5  # a KL, up to float rounding
    assert "| best-of-N | N=16 |" in (out / "results.md").read_text()


def test_reward_choice_resolves_vader_or_an_import_path():
    from trl.rewards import think_format_reward

    assert tasks.resolve_reward("vader") is tasks.sentiment_reward
    assert tasks.resolve_reward("trl.rewards:think_format_reward") is think_format_reward
    for bad in ("nonsense", "trl.rewards:", "trl.rewards:no_such_function"):
        with pytest.raises(ValueError, match="--reward"):
            tasks.resolve_reward(bad)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--candidate_lookahead", "0"], "`candidate_lookahead` \\(k2\\) must be a positive integer"),
        (["--candidate_lookahead", "4", "--candidate_beta", "0"], "`candidate_beta` must be a finite number > 0"),
        (["--candidate_k", "0"], "`candidate_rewards` \\(k\\) must be a positive integer"),
        (["--candidate_stride", "0"], "`candidate_stride` must be a positive integer"),
        (["--candidate_lookahead", "4", "--labels", "mc"], "use `--labels effects`"),
        (["--future_continuations", "2", "--labels", "mc"], "`--future_continuations` values the candidates"),
        (["--future_continuations", "0"], "FutureValueLabels.num_continuations.*`--future_continuations`"),
        (["--future_continuations", "2", "--candidate_beta", "0"], "FutureValueLabels.beta"),
        (["--future_continuations", "2", "--candidate_lookahead", "4"], "two label sources: pick one"),
        (["--eval_samples", "12"], "multiple of 16"),
        (["--betas", "0.5", "0"], "> 0"),
    ],
)
def test_bad_flags_are_refused_before_anything_runs(argv, message):
    with pytest.raises(ValueError, match=message):
        demo.parse_args(argv)
    assert demo.parse_args(["--candidate_lookahead", "4"]).candidate_beta == 0.3


def test_future_continuations_pick_future_value_labels():
    args = demo.parse_args(["--future_continuations", "4", "--candidate_k", "3", "--candidate_stride", "2"])
    assert common.training_labels(args) == FutureValueLabels(3, 4, beta=0.3, stride=2)
    assert common.training_labels(demo.parse_args([])) == CandidateLabels(8)  # the default: one-step labels
