"""GVPO (trl_qhead/gvpo.py): the loss and its gradient, convergence to pi_ref exp(R/beta)/Z on a bandit, the trainer
end to end on a tiny GPT-2 (full and LoRA), the offline group path and config validation."""

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tests.conftest import make_tiny_gpt2
from trl_qhead import generate_and_score
from trl_qhead.gvpo import (
    GVPOConfig,
    GVPOTrainer,
    group_rows,
    gvpo_loss,
    gvpo_loss_on_groups,
    sequence_logprobs,
)

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
GPT2_LORA = dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, r=4, lora_alpha=8, lora_dropout=0.0)


def direct_seq_logp(model, ids: list[int], prompt_len: int) -> torch.Tensor:
    """log pi(completion | prompt) of one unpadded sequence, position by position (no masks, no batching)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    total = logits.new_zeros(())
    for t in range(prompt_len, len(ids)):
        total = total + torch.log_softmax(logits[t - 1], dim=-1)[ids[t]]
    return total


def direct_weights(logps, ref_logps, rewards, beta):
    """w_i = (R_i - mean R) - beta (Delta_i - mean Delta) per group, with python loops over the valid members."""
    weights = []
    for lp, rp, rw in zip(logps, ref_logps, rewards, strict=True):
        idx = [i for i, r in enumerate(rw) if r is not None]
        mean_r = sum(rw[i] for i in idx) / len(idx)
        mean_d = sum(float((lp[i] - rp[i]).detach()) for i in idx) / len(idx)
        weights.append(
            [
                (rw[i] - mean_r) - beta * (float((lp[i] - rp[i]).detach()) - mean_d) if i in idx else 0.0
                for i in range(len(rw))
            ]
        )
    return weights


# ---------------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------------


def test_loss_is_half_the_unbiased_variance_of_the_residual():
    torch.manual_seed(0)
    logps, ref, rewards = torch.randn(5, 4) * 3, torch.randn(5, 4) * 3, torch.randn(5, 4)
    beta = 0.3
    out = gvpo_loss(logps, ref, rewards, beta)
    residual = beta * (logps - ref) - rewards
    expected = torch.stack([0.5 * torch.var(residual[g], unbiased=True) for g in range(5)]).mean()
    torch.testing.assert_close(out.loss, expected)
    assert out.num_groups.item() == 5
    torch.testing.assert_close(out.weights.sum(1), torch.zeros(5), atol=1e-5, rtol=0)  # zero-sum weights


def test_loss_leaves_out_nan_rewards_and_masked_members():
    torch.manual_seed(1)
    logps, ref, rewards = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    rewards[0, 1] = math.nan
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = False
    mask[2, 1:] = False  # one valid member: the group does not count
    out = gvpo_loss(logps, ref, rewards, 0.5, mask=mask)
    residual = 0.5 * (logps - ref) - rewards
    keep0, keep1 = [0, 2, 3], [0, 1, 3]
    expected = 0.5 * (torch.var(residual[0, keep0]) + torch.var(residual[1, keep1])) / 2
    torch.testing.assert_close(out.loss, expected)
    assert out.num_groups.item() == 2 and not out.mask[0, 1] and not out.mask[1, 2]
    assert out.weights[2].abs().sum() == 0 and out.weights[0, 1] == 0


def test_gradient_is_the_weighted_logprob_form_on_a_tiny_model():
    """grad of the loss == grad of -(1/G) sum_g beta/(n_g-1) sum_i w_i log pi(y_i), w from an independent formula."""
    beta, k = 0.7, 4
    model = make_tiny_gpt2(vocab_size=64, seed=0, **NO_DROPOUT)
    ref = make_tiny_gpt2(vocab_size=64, seed=1, **NO_DROPOUT)
    g = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7], [9, 10]]
    groups, rewards = [], []
    for p, prompt in enumerate(prompts):
        group = []
        for i in range(k):
            completion = torch.randint(0, 64, (2 + (i + p) % 3,), generator=g).tolist()
            reward = None if (p, i) == (1, 2) else float(torch.randn((), generator=g))
            group.append(
                {
                    "prompt": str(prompt),
                    "input_ids": prompt + completion,
                    "completion_mask": [0] * len(prompt) + [1] * len(completion),
                    "reward": reward,
                }
            )
        groups.append(group)
        rewards.append([row["reward"] for row in group])

    model.zero_grad()
    out = gvpo_loss_on_groups(model, groups, beta, ref_model=ref)
    out.loss.backward()
    grad_loss = {n: p.grad.clone() for n, p in model.named_parameters()}

    # Independent: sequence log-probs position by position, weights by loops, then the weighted log-prob surrogate.
    logps = [
        [direct_seq_logp(model, row["input_ids"], len(prompts[gi])) for row in grp] for gi, grp in enumerate(groups)
    ]
    with torch.no_grad():
        ref_logps = [
            [direct_seq_logp(ref, row["input_ids"], len(prompts[gi])) for row in grp] for gi, grp in enumerate(groups)
        ]
    w = direct_weights(logps, ref_logps, rewards, beta)
    torch.testing.assert_close(out.weights, torch.tensor(w), atol=1e-4, rtol=1e-4)
    surrogate = 0.0
    for gi in range(len(groups)):
        n_valid = sum(r is not None for r in rewards[gi])
        surrogate = surrogate - beta / (n_valid - 1) * sum(w[gi][i] * logps[gi][i] for i in range(k))
    surrogate = surrogate / len(groups)
    model.zero_grad()
    surrogate.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grad_loss[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert sum(p.abs().sum() for p in grad_loss.values()) > 0


def test_sequence_logprobs_ignore_padding_side():
    model = make_tiny_gpt2(vocab_size=64, seed=2, **NO_DROPOUT).eval()
    rows = [([1, 2, 3, 4, 5], 2), ([7, 8, 9], 1)]
    direct = torch.stack([direct_seq_logp(model, ids, p) for ids, p in rows]).detach()
    width = 5
    for side in ("right", "left"):
        ids, att, comp = [], [], []
        for seq, p in rows:
            pad = [0] * (width - len(seq))
            mask = [1] * len(seq)
            cmask = [0] * p + [1] * (len(seq) - p)
            if side == "right":
                ids.append(seq + pad), att.append(mask + pad), comp.append(cmask + pad)
            else:
                ids.append(pad + seq), att.append(pad + mask), comp.append(pad + cmask)
        got = sequence_logprobs(model, torch.tensor(ids), torch.tensor(att), torch.tensor(comp)).detach()
        torch.testing.assert_close(got, direct, atol=1e-5, rtol=1e-5, msg=side)


# ---------------------------------------------------------------------------------------------------------------------
# Convergence on a bandit: pi_theta = softmax(theta) over 6 "completions", fixed pi_ref, random R
# ---------------------------------------------------------------------------------------------------------------------


def _bandit(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(n, generator=g)
    rewards = 2 * torch.rand(n, generator=g) - 1
    return g, torch.log_softmax(ref_logits, 0), rewards


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_bandit_exact_groups_converge_to_the_kl_optimum(beta):
    """One group holding every completion once (the uniform sampling distribution, exactly): TV < 1e-4 (measured
    ~5e-8)."""
    _, ref_logp, rewards = _bandit()
    target = torch.softmax(ref_logp + rewards / beta, 0)
    theta = torch.zeros(6, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(1500):
        logp = torch.log_softmax(theta, 0)
        loss = gvpo_loss(logp[None], ref_logp[None], rewards[None], beta).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    tv = 0.5 * (torch.softmax(theta, 0) - target).abs().sum().item()
    assert tv < 1e-4, tv
    start_tv = 0.5 * (torch.full((6,), 1 / 6) - target).abs().sum().item()
    assert start_tv > 0.1  # the target is far from where we started


@pytest.mark.parametrize("sampler", ["on_policy", "reference", "uniform"])
def test_bandit_sampled_groups_converge_to_the_kl_optimum(sampler):
    """Groups of k=4 sampled with replacement, from the current policy, pi_ref or uniform (no importance weights):
    plain SGD reaches pi_ref exp(R/beta)/Z within total variation 1e-3 from 0.30 at the start (measured: below 1e-6;
    the gradient noise vanishes at the optimum, where beta Delta - R is the same for every completion)."""
    beta, k, num_groups = 0.5, 4, 32
    g, ref_logp, rewards = _bandit(seed=1)
    target = torch.softmax(ref_logp + rewards / beta, 0)
    theta = torch.zeros(6, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=1.0)
    for _ in range(1500):
        logp = torch.log_softmax(theta, 0)
        if sampler == "on_policy":
            probs = logp.detach().exp()
        elif sampler == "reference":
            probs = ref_logp.exp()
        else:
            probs = torch.full((6,), 1 / 6)
        idx = torch.multinomial(probs.expand(num_groups, 6), k, replacement=True, generator=g)
        loss = gvpo_loss(logp[idx], ref_logp[idx], rewards[idx], beta).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    tv = 0.5 * (torch.softmax(theta, 0) - target).abs().sum().item()
    assert tv < 1e-3, tv
    assert 0.5 * (torch.full((6,), 1 / 6) - target).abs().sum().item() > 0.25


# ---------------------------------------------------------------------------------------------------------------------
# Offline groups from generate_and_score
# ---------------------------------------------------------------------------------------------------------------------


def count_a(completions, **kwargs):
    return [float(c.count("a")) for c in completions]


def test_offline_groups_from_generate_and_score_with_lora_reference(gpt2_tokenizer):
    base = make_tiny_gpt2(seed=3, **NO_DROPOUT)
    model = get_peft_model(base, LoraConfig(**GPT2_LORA))
    prompts = Dataset.from_dict({"prompt": ["The cat", "Once upon a time"]})
    data = generate_and_score(
        model, gpt2_tokenizer, prompts, count_a, num_generations=4, max_new_tokens=6, show_progress=False
    )
    groups = group_rows(data, 4)
    assert len(groups) == 2 and all(len({row["prompt"] for row in grp}) == 1 for grp in groups)
    out = gvpo_loss_on_groups(model, groups, beta=0.2, pad_token_id=gpt2_tokenizer.pad_token_id)
    # Fresh LoRA adapters (B = 0): the policy is the reference, Delta = 0, the loss is half the reward variance.
    torch.testing.assert_close(out.log_ratio, torch.zeros(2, 4), atol=1e-5, rtol=0)
    rewards = torch.tensor([[row["reward"] for row in grp] for grp in groups])
    torch.testing.assert_close(out.loss, (0.5 * rewards.var(dim=1)).mean(), atol=1e-5, rtol=1e-5)
    out.loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert all(torch.isfinite(grad).all() for grad in lora_grads if grad is not None)
    assert len(group_rows([data[0], data[1], data[4], data[5]], 2)) == 2
    with pytest.raises(ValueError, match="mixes prompts"):
        group_rows([data[0], data[4]], 2)
    with pytest.raises(ValueError, match="ref_model"):
        gvpo_loss_on_groups(make_tiny_gpt2(seed=3), groups, beta=0.2)


def test_offline_groups_take_the_librarys_own_peft_model(gpt2_tokenizer):
    # AutoModelForCausalLMWithQHead wraps the PEFT model: the loss reads its backbone (reference = adapters disabled),
    # the same numbers as passing `model.pretrained_model`; `group_rows` is importable from the package.
    from trl_qhead import AutoModelForCausalLMWithQHead
    from trl_qhead import group_rows as exported_group_rows

    assert exported_group_rows is group_rows
    model = AutoModelForCausalLMWithQHead(
        get_peft_model(make_tiny_gpt2(seed=3, **NO_DROPOUT), LoraConfig(**GPT2_LORA))
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # adapters that move the policy: Delta != 0
    prompts = Dataset.from_dict({"prompt": ["The cat", "Once upon a time"]})
    data = generate_and_score(
        model, gpt2_tokenizer, prompts, count_a, num_generations=2, max_new_tokens=4, show_progress=False
    )
    groups = exported_group_rows(data, 2)
    wrapped = gvpo_loss_on_groups(model, groups, beta=0.2, pad_token_id=gpt2_tokenizer.pad_token_id)
    backbone = gvpo_loss_on_groups(model.pretrained_model, groups, beta=0.2, pad_token_id=gpt2_tokenizer.pad_token_id)
    assert wrapped.log_ratio.abs().max() > 1e-3
    torch.testing.assert_close(wrapped.loss, backbone.loss)
    torch.testing.assert_close(wrapped.log_ratio, backbone.log_ratio)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """GRPOTrainer builds the reference of a non-PEFT model from its name or path, so the tiny model is saved."""
    path = tmp_path_factory.mktemp("gvpo") / "tiny-gpt2"
    make_tiny_gpt2(seed=4).save_pretrained(path)
    return path


def _args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        beta=0.1,
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        disable_dropout=True,
        gradient_checkpointing=False,
    )
    kwargs.update(overrides)
    return GVPOConfig(**kwargs)


PROMPTS = Dataset.from_dict({"prompt": ["The cat", "Once upon a time", "Hello", "A"]})


def _check_logs(trainer, steps):
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == steps
    for h in logs:
        for key in ("loss", "gvpo/loss", "gvpo/log_ratio_mean", "gvpo/weight_abs_mean", "gvpo/residual_std"):
            assert key in h and math.isfinite(h[key]), (key, h)
        assert h["loss"] >= 0 and math.isfinite(h.get("reward", 0.0))  # reward: logged on generation steps
    assert "reward" in logs[0]
    assert abs(logs[0]["gvpo/log_ratio_mean"]) < 1e-4  # the first step's policy is the reference
    return logs


def test_trainer_end_to_end_full_model(tmp_path, tiny_gpt2_dir, gpt2_tokenizer):
    """Two generation rounds of 2 prompts x 4 completions, each split into 2 micro-batches of one group
    (steps_per_generation=2, so the second micro-batch trains on samples of the previous policy)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(
        tmp_path,
        steps_per_generation=2,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        per_device_eval_batch_size=4,
    )
    trainer = GVPOTrainer(
        model, count_a, args, train_dataset=PROMPTS, eval_dataset=PROMPTS.select([0]), processing_class=gpt2_tokenizer
    )
    assert trainer.ref_model is not None
    trainer.train()
    _check_logs(trainer, 4)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 1 and math.isfinite(evals[0]["eval_loss"]) and "eval_gvpo/residual_std" in evals[0]
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    ref = trainer.ref_model
    assert all(torch.equal(before[n], p) for n, p in ref.named_parameters())


def test_trainer_end_to_end_lora_uses_disabled_adapters_as_reference(tmp_path, tiny_gpt2_dir, gpt2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    trainer = GVPOTrainer(
        model,
        count_a,
        args,
        train_dataset=PROMPTS,
        processing_class=gpt2_tokenizer,
        peft_config=LoraConfig(**GPT2_LORA),
    )
    assert trainer.ref_model is None  # the reference is the same network with its adapters disabled
    trainer.train()
    logs = _check_logs(trainer, 2)
    assert logs[1]["gvpo/implicit_reward_std"] > 0  # the adapters moved the policy away from the reference
    params = dict(trainer.model.named_parameters())
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in params.items())
    frozen = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in params.items() if "lora_" not in n
    }
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[name].detach(), value) for name, value in base.items())


def test_trainer_loss_matches_the_direct_formula(tmp_path, tiny_gpt2_dir, gpt2_tokenizer):
    """`_compute_loss` on a hand-built batch (right-padded completions of unequal lengths, one unscorable): loss and
    gradient equal `gvpo_loss` on sequence log-probs computed position by position. (Prompts of equal length: GPT-2
    does not derive positions from the attention mask, so a left-padded prompt shifts positions, for the policy and
    the reference alike, as in GRPOTrainer.)"""
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    trainer = GVPOTrainer(
        model, count_a, _args(tmp_path, beta=0.3), train_dataset=PROMPTS, processing_class=gpt2_tokenizer
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    pad = gpt2_tokenizer.pad_token_id
    prompts = [[464, 3797, 318], [7454, 2402, 257]]
    completions = [[11, 12, 13], [14, 15], [16], [17, 18, 19], [20, 21], [22, 23, 24], [25], [26, 27]]
    rewards = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5, 0.5, math.nan, 3.0])
    rows = [(prompts[i // 4], c) for i, c in enumerate(completions)]
    p_width, c_width = 3, 3
    inputs = {
        "prompt_ids": torch.tensor([[pad] * (p_width - len(p)) + p for p, _ in rows]),
        "prompt_mask": torch.tensor([[0] * (p_width - len(p)) + [1] * len(p) for p, _ in rows]),
        "completion_ids": torch.tensor([c + [pad] * (c_width - len(c)) for _, c in rows]),
        "completion_mask": torch.tensor([[1] * len(c) + [0] * (c_width - len(c)) for _, c in rows]),
        "gvpo_rewards": rewards,
    }
    ref = trainer.ref_model
    with torch.no_grad():
        ref_direct = torch.stack([direct_seq_logp(ref, p + c, len(p)) for p, c in rows])
    # The trainer reads per-token reference log-probs; any split over the tokens works, the loss sums them.
    inputs["ref_per_token_logps"] = (ref_direct / inputs["completion_mask"].sum(-1))[:, None] * inputs[
        "completion_mask"
    ]
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    direct = torch.stack([direct_seq_logp(trainer.model, p + c, len(p)) for p, c in rows])
    expected = gvpo_loss(direct.view(2, 4), ref_direct.view(2, 4), rewards.view(2, 4), 0.3).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for name, param in trainer.model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)
    # A batch whose rows do not come in groups of one prompt is refused.
    swapped = {key: value[[0, 4, 1, 2, 3, 5, 6, 7]] for key, value in inputs.items()}
    with pytest.raises(RuntimeError, match="mix prompts"):
        trainer._compute_loss(trainer.model, swapped)


# ---------------------------------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"beta": math.nan}, "beta"),
        ({"beta": math.inf}, "beta"),
        ({"num_generations": 1}, "num_generations"),
        ({"num_generations": 4, "per_device_train_batch_size": 6}, "per_device_train_batch_size"),
        ({"scale_rewards": "group"}, "scale_rewards"),
        ({"scale_rewards": True}, "scale_rewards"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation"),
        ({"entropy_coef": 0.01}, "entropy_coef"),
        ({"top_entropy_quantile": 0.5}, "top_entropy_quantile"),
        ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold"),
        ({"eval_strategy": "steps", "per_device_eval_batch_size": 6}, "per_device_eval_batch_size"),
    ],
)
def test_bad_config_raises_naming_the_field(tmp_path, overrides, field_name):
    kwargs = dict(
        output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, report_to=[], use_cpu=True
    )
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=f"`{field_name}`"):
        GVPOConfig(**kwargs)


def test_default_config_is_valid(tmp_path):
    args = GVPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert args.beta == 0.1 and args.scale_rewards == "none" and args.num_generations == 8
    with pytest.raises(TypeError, match="GVPOConfig"):
        from trl import GRPOConfig

        GVPOTrainer(make_tiny_gpt2(), count_a, GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True))
