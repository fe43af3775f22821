"""`trl_qhead.evaluation`: best-of-N, distinct-n, likelihood, policy drift and the frontier comparison, against
obvious references."""

import math

import pytest
import torch

from tests.conftest import make_tiny_gpt2
from trl_qhead import evaluation
from trl_qhead.rollouts import Samples


def test_best_of_n_kl_formula():
    assert evaluation.best_of_n_kl(1) == 0.0
    assert evaluation.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert evaluation.best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)


def test_best_of_n_indices_pick_the_max_of_disjoint_groups():
    rewards = [0.1, 0.5, -0.2, 0.3, 0.0, 0.0, 0.9, -1.0]  # two prompts, four samples each
    assert evaluation.best_of_n_indices(rewards, 4, 1) == list(range(8))
    assert evaluation.best_of_n_indices(rewards, 4, 2) == [1, 3, 4, 6]  # ties keep the first
    assert evaluation.best_of_n_indices(rewards, 4, 4) == [1, 6]
    with pytest.raises(ValueError, match="must divide"):
        evaluation.best_of_n_indices(rewards, 4, 3)


def test_best_of_n_mean_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(5 * 16, generator=g).tolist()
    for n in (2, 4, 8, 16):
        chosen = evaluation.best_of_n_indices(rewards, 16, n)
        groups = [rewards[i : i + n] for i in range(0, len(rewards), n)]
        assert [rewards[i] for i in chosen] == [max(group) for group in groups]


def test_distinct_2():
    assert evaluation.distinct_n(["a b c", "a b d"]) == pytest.approx(3 / 4)  # bigrams: ab bc ab bd
    assert evaluation.distinct_n(["great great great great"]) == pytest.approx(1 / 3)
    assert evaluation.distinct_n(["one", ""]) == 0.0
    # sets of one completion per prompt: prompt-major texts of 2 prompts x 2 samples
    texts = ["a b", "a b", "c d", "c d"]
    assert evaluation.distinct_n_per_prompt_set(texts, 2) == pytest.approx(1.0)  # each set is {"a b", "c d"}


def test_completion_nll_matches_per_sequence_reference(tiny_gpt2):
    tiny_gpt2.eval()
    prompts, completions = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    nlls, counts = evaluation.completion_nll(tiny_gpt2, prompts, completions, pad_token_id=0, batch_size=2)
    expected = []
    for p, c in zip(prompts, completions, strict=True):  # one unpadded sequence at a time
        logp = torch.log_softmax(tiny_gpt2(torch.tensor([p + c])).logits[0].float(), -1)
        expected.append(-sum(logp[len(p) - 1 + k, tok].item() for k, tok in enumerate(c)))
    assert counts == [2, 3]
    assert nlls == pytest.approx(expected, rel=1e-5)
    assert evaluation.perplexity(nlls, counts) == pytest.approx(math.exp(sum(expected) / 5), rel=1e-5)


def test_frontier_comparison_interpolates_best_of_n():
    def row(method, setting, kl, reward):
        return evaluation.FrontierRow(method, setting, reward, 0.0, kl, 1, 0.0, 1.0, 10.0, 1)

    rows = [
        row("base sampling", "", 0.0, 0.1),
        row("best-of-N", "N=2", evaluation.best_of_n_kl(2), 0.3),
        row("best-of-N", "N=4", evaluation.best_of_n_kl(4), 0.5),
        row("Q-tilted", "beta=1", evaluation.best_of_n_kl(2) / 2, 0.25),
        row("Q-tilted", "beta=0.1", 5.0, 0.9),
    ]
    inside, beyond = evaluation.frontier_comparison(rows)
    assert inside["best_of_n_at_kl"] == pytest.approx(0.2) and inside["difference"] == pytest.approx(0.05)
    assert beyond["best_of_n_at_kl"] is None and beyond["difference"] is None


def test_policy_drift_kl_is_zero_without_drift_and_matches_a_direct_sum(gpt2_tokenizer):
    from peft import LoraConfig

    from trl_qhead import AutoModelForCausalLMWithQHead

    lora = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=True)
    model = AutoModelForCausalLMWithQHead.from_pretrained(make_tiny_gpt2(), peft_config=lora).eval()
    prompts, completions = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    assert evaluation.policy_drift_kl(model, prompts, completions, pad_token_id=0) == pytest.approx(0.0, abs=1e-6)
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
    drift = evaluation.policy_drift_kl(model, prompts, completions, pad_token_id=0, batch_size=2)
    assert drift > 0.0
    assert drift == pytest.approx(expected / 2, rel=1e-4)


def test_policy_log_ratios_are_zero_without_drift_and_match_a_direct_sum():
    from peft import LoraConfig

    from trl_qhead import AutoModelForCausalLMWithQHead

    lora = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=True)
    backbone = AutoModelForCausalLMWithQHead.from_pretrained(make_tiny_gpt2(), peft_config=lora).pretrained_model
    prompts, completions = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    assert evaluation.policy_log_ratios(backbone, prompts, completions, pad_token_id=0) == pytest.approx([0.0, 0.0])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    backbone.train()  # dropout on: the ratios must still be computed without it, and the mode given back
    expected = []
    backbone.eval()
    with torch.no_grad():
        for p, c in zip(prompts, completions, strict=True):  # one unpadded sequence at a time, token by token
            ids = torch.tensor([p + c])
            adapted = torch.log_softmax(backbone(ids).logits[0].float(), -1)
            with backbone.disable_adapter():
                pretrained = torch.log_softmax(backbone(ids).logits[0].float(), -1)
            expected.append(
                sum((adapted[len(p) - 1 + k, t] - pretrained[len(p) - 1 + k, t]).item() for k, t in enumerate(c))
            )
    backbone.train()
    ratios = evaluation.policy_log_ratios(backbone, prompts, completions, pad_token_id=0, batch_size=2)
    assert backbone.training
    assert min(abs(r) for r in expected) > 1e-3  # the adapters moved the policy: a zero would not pass
    assert ratios == pytest.approx(expected, abs=1e-4)  # differences of float32 sums of ~10-nat log-probs


def _row(method, setting, kl, reward, train_seconds=None):
    return evaluation.FrontierRow(method, setting, reward, 0.0, kl, 1, 0.0, 1.0, 10.0, 1, train_seconds)


def test_frontier_comparison_covers_every_method_beside_best_of_n():
    rows = [
        _row("base sampling", "", 0.0, 0.1),
        _row("best-of-N", "N=2", 0.5, 0.3),
        _row("best-of-N", "N=4", 1.0, 0.5),
        _row("Q-tilted", "beta=1", 0.5, 0.2),
        _row("GVPO", "beta=0.5", 0.25, 0.15, train_seconds=12.0),
        _row("GVPO", "beta=0.1", 1.0, 0.6, train_seconds=12.0),
    ]
    comparison = evaluation.frontier_comparison(rows)
    assert [(c["method"], c["setting"]) for c in comparison] == [
        ("Q-tilted", "beta=1"),
        ("GVPO", "beta=0.5"),
        ("GVPO", "beta=0.1"),
    ]
    assert [c["best_of_n_at_kl"] for c in comparison] == pytest.approx([0.3, 0.2, 0.5])
    assert [c["gain_ratio"] for c in comparison] == pytest.approx([0.5, 0.5, 1.25])
    assert evaluation.mean_gain_ratio(comparison, (0.2, 1.5), method="GVPO") == pytest.approx((0.5 + 1.25) / 2)
    assert evaluation.mean_gain_ratio(comparison, (0.2, 1.5), method="Q-tilted") == pytest.approx(0.5)
    assert evaluation.mean_gain_ratio(comparison, (0.2, 1.5)) == pytest.approx((0.5 + 0.5 + 1.25) / 3)


def test_markdown_table_shows_training_seconds_only_when_a_row_has_them():
    plain = evaluation.markdown_table([_row("base sampling", "", 0.0, 0.1)])
    assert "training s" not in plain and plain.splitlines()[2].endswith("| 1 |")
    table = evaluation.markdown_table([_row("base sampling", "", 0.0, 0.1), _row("GVPO", "beta=1", 0.5, 0.2, 123.4)])
    header, rule, base, gvpo = table.splitlines()
    assert header.endswith("| training s |") and rule.count("---") == 10
    assert base.endswith("| 1 |  |") and gvpo.endswith("| 1 | 123 |")
    assert all(line.count("|") == 11 for line in (header, rule, base, gvpo))


def _scored_samples(rewards_per_prompt, nll=None, n_tokens=None) -> Samples:
    n = len(rewards_per_prompt[0])
    rewards = [r for prompt in rewards_per_prompt for r in prompt]
    count = len(rewards)
    return Samples(
        prompts=[f"p{i}" for i in range(len(rewards_per_prompt))],
        num_samples=n,
        prompt_ids=[[1]] * len(rewards_per_prompt),
        completion_ids=[[2]] * count,
        texts=["x"] * count,
        rewards=rewards,
        nll=nll or [],
        n_tokens=n_tokens or [],
    )


def test_kl_optimal_rows_equal_the_exact_tilt_of_a_distribution_the_samples_reproduce():
    # Each prompt's 10 samples hold its outcomes in exact proportion (0.5 / 0.3 / 0.2), so the estimate must equal
    # pi*_beta = pi exp(R / beta) / Z computed over the outcomes themselves.
    outcomes = [([0.5, 0.3, 0.2], [0.0, 1.0, -1.0]), ([0.5, 0.3, 0.2], [0.2, -0.4, 0.9])]
    samples = _scored_samples(
        [[r for p, r in zip(*outcome, strict=True) for _ in range(round(10 * p))] for outcome in outcomes]
    )
    betas = [2.0, 0.5, 0.1]
    rows = evaluation.kl_optimal_rows(samples, betas)
    for row, beta in zip(rows, betas, strict=True):
        rewards, kls = [], []
        for probs, values in outcomes:
            z = sum(p * math.exp(v / beta) for p, v in zip(probs, values, strict=True))
            star = [p * math.exp(v / beta) / z for p, v in zip(probs, values, strict=True)]
            rewards.append(sum(s * v for s, v in zip(star, values, strict=True)))
            kls.append(sum(s * math.log(s / p) for s, p in zip(star, probs, strict=True)))
        assert row.method == evaluation.KL_OPTIMAL and row.setting == f"beta={beta:g}"
        assert row.reward == pytest.approx(sum(rewards) / 2, abs=1e-12)
        assert row.kl == pytest.approx(sum(kls) / 2, abs=1e-12)
        assert row.samples_per_output == 10 and row.n == 20 and row.distinct_2 is None and row.perplexity is None


def test_kl_optimal_rows_weigh_the_perplexity_and_reduce_to_base_sampling_at_large_beta():
    samples = _scored_samples([[0.0, 1.0], [0.5, 0.5]], nll=[2.0, 6.0, 3.0, 3.0], n_tokens=[2, 3, 1, 1])
    hot, cold = evaluation.kl_optimal_rows(samples, [1e6, 1e-3])
    assert hot.kl == pytest.approx(0.0, abs=1e-9) and hot.reward == pytest.approx(0.5)
    assert hot.perplexity == pytest.approx(math.exp(14.0 / 7.0), rel=1e-6)
    # beta -> 0 picks the best sample of the first prompt (KL log 2) and keeps the tie of the second (KL 0)
    assert cold.reward == pytest.approx((1.0 + 0.5) / 2) and cold.kl == pytest.approx(math.log(2) / 2)
    assert cold.perplexity == pytest.approx(math.exp((6.0 + 0.5 * 3.0 + 0.5 * 3.0) / (3 + 0.5 + 0.5)), rel=1e-6)
    assert "| - |" in evaluation.markdown_table([cold])


def test_kl_optimal_rows_refuse_unscored_samples_and_bad_betas():
    samples = _scored_samples([[0.0, 1.0]])
    with pytest.raises(ValueError, match="betas"):
        evaluation.kl_optimal_rows(samples, [0.5, 0.0])
    samples.rewards = [0.0, float("nan")]
    with pytest.raises(ValueError, match=r"`base.rewards\[1\]` is nan"):
        evaluation.kl_optimal_rows(samples, [0.5])
    samples.rewards = [0.0]
    with pytest.raises(ValueError, match="1 rewards for 2 samples"):
        evaluation.kl_optimal_rows(samples, [0.5])
    samples.rewards = []
    with pytest.raises(ValueError, match="no rewards"):
        evaluation.kl_optimal_rows(samples, [0.5])
