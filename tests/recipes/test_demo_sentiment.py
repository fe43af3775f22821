"""The demo's pipeline (recipes/demo_sentiment.py) end to end on a tiny random GPT-2 with the real GPT-2 tokenizer, and
its evaluation helpers against obvious references. No SmolLM2 download here."""

import json
import math

import pytest
import torch
from datasets import Dataset

from recipes import demo_sentiment as demo
from tests.conftest import make_tiny_gpt2

pytest.importorskip("vaderSentiment", reason="the `demo` extra (make test installs it)")


def test_best_of_n_kl_formula():
    assert demo.best_of_n_kl(1) == 0.0
    assert demo.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert demo.best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)


def test_best_of_n_indices_pick_the_max_of_disjoint_groups():
    rewards = [0.1, 0.5, -0.2, 0.3, 0.0, 0.0, 0.9, -1.0]  # two prompts, four samples each
    assert demo.best_of_n_indices(rewards, 4, 1) == list(range(8))
    assert demo.best_of_n_indices(rewards, 4, 2) == [1, 3, 4, 6]  # ties keep the first
    assert demo.best_of_n_indices(rewards, 4, 4) == [1, 6]
    with pytest.raises(ValueError, match="must divide"):
        demo.best_of_n_indices(rewards, 4, 3)


def test_best_of_n_mean_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(5 * 16, generator=g).tolist()
    for n in (2, 4, 8, 16):
        chosen = demo.best_of_n_indices(rewards, 16, n)
        groups = [rewards[i : i + n] for i in range(0, len(rewards), n)]
        assert [rewards[i] for i in chosen] == [max(group) for group in groups]


def test_distinct_2():
    assert demo.distinct_2(["a b c", "a b d"]) == pytest.approx(3 / 4)  # bigrams: ab bc ab bd
    assert demo.distinct_2(["great great great great"]) == pytest.approx(1 / 3)
    assert demo.distinct_2(["one", ""]) == 0.0
    # sets of one completion per prompt: prompt-major texts of 2 prompts x 2 samples
    texts = ["a b", "a b", "c d", "c d"]
    assert demo.distinct_2_per_prompt_set(texts, 2) == pytest.approx(1.0)  # each set is {"a b", "c d"}


def test_split_prompts_disjoint_and_seeded():
    prompts = [f"p{i}" for i in range(10)]
    train, held_out = demo.split_prompts(prompts, 6, 3, seed=1)
    assert len(train) == 6 and len(held_out) == 3 and not set(train) & set(held_out)
    assert (train, held_out) == demo.split_prompts(prompts, 6, 3, seed=1)
    with pytest.raises(ValueError, match="available"):
        demo.split_prompts(prompts, 8, 3, seed=1)


def test_sentiment_reward_is_vader_compound():
    scores = demo.sentiment_reward(prompts=["x", "x"], completions=["I love it, wonderful!", "Awful and sad."])
    assert scores[0] > 0.5 and scores[1] < -0.5


def test_training_rows_centre_per_prompt_and_keep_done():
    data = Dataset.from_dict(  # generate_and_score's layout: two prompts, two completions each
        {
            "input_ids": [[5, 6, 1, 2], [5, 6, 3, 99], [7, 4], [7, 8, 9]],
            "completion_mask": [[0, 0, 1, 1], [0, 0, 1, 1], [0, 1], [0, 1, 1]],
            "done": [True, True, False, True],
            "reward": [0.5, -0.5, 1.0, 0.0],
        }
    )
    rows = demo.training_rows(data, 2).to_list()
    assert [r["input_ids"] for r in rows] == data["input_ids"]  # no EOS appended: `done` marks the episode's end
    assert [r["completion_mask"] for r in rows] == data["completion_mask"]
    assert [r["done"] for r in rows] == [True, True, False, True]
    assert [r["reward"] for r in rows] == pytest.approx([0.5, -0.5, 0.5, -0.5])
    with pytest.raises(ValueError, match="whole number"):
        demo.training_rows(data.select(range(3)), 2)


def test_completion_nll_matches_per_sequence_reference(tiny_gpt2):
    tiny_gpt2.eval()
    prompts, completions = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    nlls, counts = demo.completion_nll(tiny_gpt2, prompts, completions, pad_token_id=0, batch_size=2)
    expected = []
    for p, c in zip(prompts, completions, strict=True):  # one unpadded sequence at a time
        logp = torch.log_softmax(tiny_gpt2(torch.tensor([p + c])).logits[0].float(), -1)
        expected.append(-sum(logp[len(p) - 1 + k, tok].item() for k, tok in enumerate(c)))
    assert counts == [2, 3]
    assert nlls == pytest.approx(expected, rel=1e-5)
    assert demo.perplexity(nlls, counts) == pytest.approx(math.exp(sum(expected) / 5), rel=1e-5)


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
        ("Q-tilted", "beta=1"),
        ("Q-tilted", "beta=0.1"),
    ]
    base, bon, tilted = rows[0], rows[1:5], rows[5:]
    assert base["kl"] == 0.0 and base["n"] == 2 * 16
    for row, n in zip(bon, (2, 4, 8, 16), strict=True):
        assert row["kl"] == pytest.approx(math.log(n) - (n - 1) / n)
        assert row["samples_per_output"] == n and row["n"] == 2 * 16 // n
    rewards = [r["reward"] for r in (base, *bon)]
    assert rewards == sorted(rewards)  # a group of 2N is two groups of N: the mean of the maxima cannot drop
    for row in tilted:
        # A KL, up to float32 rounding: the tiny model's Q head barely tilts, so it sits at ~1e-7 either side of 0.
        assert row["kl"] >= -1e-5 and row["n"] == 2 * 2 and row["samples_per_output"] == 1
    for row in rows:
        assert -1.0 <= row["reward"] <= 1.0 and 0.0 <= row["distinct_2"] <= 1.0 and row["perplexity"] > 1.0
    assert results["policy_drift_kl_lora_vs_pretrained"] >= -1e-5  # a KL, up to float rounding
    assert "| best-of-N | N=16 |" in (out / "results.md").read_text()


def test_frontier_comparison_interpolates_best_of_n():
    def row(method, setting, kl, reward):
        return demo.Row(method, setting, reward, 0.0, kl, 1, 0.0, 1.0, 10.0, 1)

    rows = [
        row("base sampling", "", 0.0, 0.1),
        row("best-of-N", "N=2", demo.best_of_n_kl(2), 0.3),
        row("best-of-N", "N=4", demo.best_of_n_kl(4), 0.5),
        row("Q-tilted", "beta=1", demo.best_of_n_kl(2) / 2, 0.25),
        row("Q-tilted", "beta=0.1", 5.0, 0.9),
    ]
    inside, beyond = demo.frontier_comparison(rows)
    assert inside["best_of_n_at_kl"] == pytest.approx(0.2) and inside["difference"] == pytest.approx(0.05)
    assert beyond["best_of_n_at_kl"] is None and beyond["difference"] is None


def test_policy_drift_kl_is_zero_without_drift_and_matches_a_direct_sum(gpt2_tokenizer):
    from peft import LoraConfig

    from trl_qhead import AutoModelForCausalLMWithQHead

    lora = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=True)
    model = AutoModelForCausalLMWithQHead.from_pretrained(make_tiny_gpt2(), peft_config=lora).eval()
    prompts, completions = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    assert demo.policy_drift_kl(model, prompts, completions, pad_token_id=0) == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    expected = 0.0
    backbone = model.pretrained_model
    for p, c in zip(prompts, completions, strict=True):  # one unpadded sequence at a time
        ids = torch.tensor([p + c])
        adapted = torch.log_softmax(backbone(ids).logits[0].float(), -1)
        with backbone.disable_adapter():
            pretrained = torch.log_softmax(backbone(ids).logits[0].float(), -1)
        steps = range(len(p) - 1, len(p) + len(c) - 1)  # the states that drew a completion token
        expected += sum((adapted[t].exp() * (adapted[t] - pretrained[t])).sum().item() for t in steps)
    drift = demo.policy_drift_kl(model, prompts, completions, pad_token_id=0, batch_size=2)
    assert drift > 0.0
    assert drift == pytest.approx(expected / 2, rel=1e-4)
