"""`recipes/gvpo_frontier.py` end to end on a tiny random GPT-2 with the real GPT-2 tokenizer: its base and best-of-N rows
are the demo's, its GVPO rows are well formed, and each row's KL is the mean of log-ratios recomputed directly from the
saved adapters. No SmolLM2 download here."""

import json
import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import demo_sentiment as demo
from recipes import tasks
from tests.conftest import make_tiny_gpt2
from tests.recipe_assets import run

pytest.importorskip("vaderSentiment", reason="the `demo` extra (make test installs it)")

# The demo's data and evaluation settings, shrunk: 4 training prompts x 2 completions, 2 held-out prompts.
COMMON = [
    "--n_train_prompts", "4", "--n_eval_prompts", "2", "--num_generations", "2", "--max_new_tokens", "6",
    "--gen_batch_size", "16", "--threads", "1",
]  # fmt: skip
BETAS = (1.0, 0.1)


@pytest.fixture
def tiny_model_dir(tmp_path, gpt2_tokenizer):
    folder = tmp_path / "tiny-gpt2"
    make_tiny_gpt2().save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


def _direct_log_ratio(policy, prompt_ids, completion_ids) -> float:
    """`log pi_theta(y|x) - log pi_base(y|x)`, one unpadded sequence, token by token (adapters on, then off)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        adapted = torch.log_softmax(policy(ids).logits[0].float(), -1)
        with policy.disable_adapter():
            base = torch.log_softmax(policy(ids).logits[0].float(), -1)
    steps = [(len(prompt_ids) - 1 + k, token) for k, token in enumerate(completion_ids)]
    return sum(adapted[t, token].item() - base[t, token].item() for t, token in steps)


def test_gvpo_frontier_runs_end_to_end_as_a_script(tmp_path, tiny_model_dir):
    from peft import PeftModel

    out = tmp_path / "out"
    run(
        [sys.executable, "recipes/gvpo_frontier.py", "--model", str(tiny_model_dir), "--output_dir", str(out), *COMMON,
         "--lora_r", "4", "--epochs", "2", "--learning_rate", "1e-2", "--groups_per_step", "2", "--policy_samples", "2",
         "--betas", *map(str, BETAS)],
        timeout=300,
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("base sampling", ""),
        ("best-of-N", "N=2"),
        ("best-of-N", "N=4"),
        ("best-of-N", "N=8"),
        ("best-of-N", "N=16"),
        ("GVPO", "beta=1"),
        ("GVPO", "beta=0.1"),
    ]

    # The base and best-of-N rows are the demo's (its base policy is the pretrained one with --lora_r 0): same
    # samples, same rewards; only the wall time differs.
    reference = demo.run(
        demo.parse_args(
            [
                "--model",
                str(tiny_model_dir),
                "--output_dir",
                str(tmp_path / "demo"),
                *COMMON,
                "--lora_r",
                "0",
                "--epochs",
                "1",
                "--train_batch_size",
                "4",
                "--tilted_samples",
                "1",
                "--betas",
                "1.0",
            ]
        )  # fmt: skip
    )
    untimed = lambda row: {k: v for k, v in row.items() if k != "seconds_per_output"}  # noqa: E731
    assert [untimed(r) for r in rows[:5]] == [untimed(r) for r in reference["rows"][:5]]
    assert results["train_reward_mean"] == pytest.approx(reference["train_reward_mean"])

    policies = results["policies"]
    assert [p["beta"] for p in policies] == list(BETAS)
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for row, policy in zip(rows[5:], policies, strict=True):
        samples = policy["samples"]
        assert row["n"] == len(samples) == 2 * 2 and row["samples_per_output"] == 1
        assert row["train_seconds"] > 0 and row["seconds_per_output"] > 0
        assert len(policy["train_log"]) == 2 * 2  # 2 epochs of 4 groups, 2 per step
        assert all(math.isfinite(entry["loss"]) for entry in policy["train_log"])
        assert 0.0 <= row["distinct_2"] <= 1.0 and row["perplexity"] > 1.0
        texts = [s["text"] for s in samples]
        rewards = tasks.sentiment_reward(prompts=[s["prompt"] for s in samples], completions=texts)
        assert [s["reward"] for s in samples] == pytest.approx(rewards)
        assert row["reward"] == pytest.approx(sum(rewards) / len(rewards))
        # The KL: the mean over the policy's samples of log pi_theta - log pi_base, recomputed from the saved adapters.
        trained = PeftModel.from_pretrained(base_model, policy["adapters_dir"]).eval()
        direct = [_direct_log_ratio(trained, s["prompt_ids"], s["completion_ids"]) for s in samples]
        base_model = trained.unload()  # the same base weights for the next policy's adapters
        assert max(abs(d) for d in direct) > 1e-2  # the policy moved: an estimate stuck at 0 would not pass
        assert [s["log_ratio"] for s in samples] == pytest.approx(direct, abs=1e-4)
        assert row["kl"] == pytest.approx(sum(direct) / len(direct), abs=1e-4)

    comparison = results["vs_best_of_n_at_equal_kl"]
    assert [(c["method"], c["setting"]) for c in comparison] == [("GVPO", "beta=1"), ("GVPO", "beta=0.1")]
    assert [c["kl"] for c in comparison] == [r["kl"] for r in rows[5:]]
    md = (out / "results.md").read_text()
    assert "| GVPO | beta=0.1 |" in md and "training s |" in md
    assert (out / "frontier.png").stat().st_size > 0


def test_every_policy_starts_from_the_given_adapters_which_are_restored(gpt2_tokenizer):
    from datasets import Dataset
    from peft import LoraConfig

    from recipes import gvpo_frontier
    from trl_qhead import AutoModelForCausalLMWithQHead

    lora = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    model = AutoModelForCausalLMWithQHead.from_pretrained(make_tiny_gpt2(), peft_config=lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
    prompt = gpt2_tokenizer("A fine day").input_ids
    scored = Dataset.from_list(  # two prompts x two completions, generate_and_score's columns
        [
            {"prompt": f"p{g}", "input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * 3,
             "reward": reward}
            for g in range(2)
            for completion, reward in (([1049, 1110, 13], 1.0), ([2089, 1110, 13], -1.0))
        ]
    )  # fmt: skip
    kwargs = dict(num_generations=2, learning_rate=1e-2, groups_per_step=1, policy_samples=2, max_new_tokens=4)
    first, second = gvpo_frontier.gvpo_policies(model, gpt2_tokenizer, scored, ["It was"], betas=(0.5, 0.5), **kwargs)
    assert first.samples.completion_ids == second.samples.completion_ids  # same start, same training, same seed
    assert first.log_ratios == pytest.approx(second.log_ratios, abs=1e-6)
    assert max(abs(r) for r in first.log_ratios) > 1e-3  # it trained
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name
    with pytest.raises(ValueError, match="LoRA adapters"):
        gvpo_frontier.gvpo_policies(
            AutoModelForCausalLMWithQHead.from_pretrained(make_tiny_gpt2()),
            gpt2_tokenizer,
            scored,
            ["It was"],
            **kwargs,
        )
