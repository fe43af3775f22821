"""`q_head_type="q_model"`: a separate, smaller causal LM with the policy's tokenizer whose output is Q. The policy
is frozen and bit-identical after training; the Q model (fully, or through LoRA) and the output train; the cached
decode equals a full forward (sampling, beam search); save / load and the Hub round trip give the same Q; a Q model
with another vocabulary or tokenizer, and the combinations that cannot work, fail before any work."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from tests.conftest import make_tiny_gpt2, make_tiny_llama
from tests.heads.context_checks import (
    SMALL,
    VOCAB,
    assert_base_logits,
    check_4bit_policy,
    check_decode_equals_full_forward,
    check_rerank_scores,
    check_save_load_and_hub,
    effect_rows,
    prompts,
    snapshot,
    train,
)
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer, fold_tilt
from trl_qhead.heads import QContext
from trl_qhead.heads.q_model import QModelHead, check_same_vocabulary


def small_gpt2(vocab_size: int = VOCAB, seed: int = 7) -> GPT2LMHeadModel:
    """A smaller Q model than the policy (1 layer, width 16) with the policy's vocabulary."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_layer=1, n_embd=16, n_head=2, n_positions=128))


def q_model_model(output: str = "tied", trained: bool = True, q_model=None, policy=None, vocab_size: int = VOCAB):
    policy = make_tiny_gpt2(vocab_size=vocab_size) if policy is None else policy
    q_model = small_gpt2(vocab_size) if q_model is None else q_model
    model = AutoModelForCausalLMWithQHead(
        policy, q_head_type="q_model", q_head_options={"q_model": q_model, "output": output}
    )
    if trained:
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.q_head.output.parameters():
                p.normal_(0, 0.3)
    return model.eval()


def test_the_q_model_reads_the_context_and_starts_at_zero():
    fresh = q_model_model(trained=False)
    assert isinstance(fresh.q_head, QModelHead) and fresh.q_head.hidden_size == 16
    ids, mask = prompts()
    assert not fresh(ids, attention_mask=mask, return_q=True).q_values.any()  # U = 0: no tilt before training
    model = q_model_model()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # counted over real tokens, as `generate` counts them
    hq = model.q_head.q_model.transformer(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    q = model(ids, attention_mask=mask, return_q=True).q_values
    w = model.q_head.q_model.lm_head.weight
    expected = (model.q_head.output.u @ hq.unsqueeze(-1)).squeeze(-1) @ w.T + model.q_head.bias
    real = mask.bool()  # (padding positions hold no state)
    torch.testing.assert_close(q[real], expected[real])
    base = make_tiny_gpt2(vocab_size=VOCAB).eval()
    assert_base_logits(model, base)


def test_policy_frozen_q_model_gets_the_gradient():
    model = q_model_model().train()
    assert not any(p.requires_grad for p in model.pretrained_model.parameters())
    ids, mask = prompts()
    out = model(ids, attention_mask=mask, actions=torch.roll(ids, -1, 1), logprob_mask=mask.bool())
    assert not out.action_logprobs.requires_grad
    out.action_q.sum().backward()
    assert all(p.grad is None for p in model.pretrained_model.parameters())
    assert model.q_head.q_model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "labels, targets",
    [("effects", {}), ("mc", {}), ("mc", {"q_target": "soft", "target_beta": 1.0, "gae_lambda": 0.5})],
    ids=["effects", "mc", "mc-soft-lambda"],
)
def test_training_leaves_the_policy_bit_identical(tmp_path, gpt2_tokenizer, labels, targets):
    model = q_model_model(trained=False)
    policy_before = snapshot(model.pretrained_model)
    q_before = snapshot(model.q_head)
    trainer = train(model, gpt2_tokenizer, tmp_path, effect_rows(mc=labels == "mc"), logging_steps=1, **targets)
    logged = [e for e in trainer.state.log_history if "loss_q" in e]
    # no LM loss: the step's loss is q_weight * L_Q alone (the policy's L_LM, ~log |V| here, is logged, not added)
    cw = trainer.args.candidate_weight
    for e in logged:
        l_q = e["loss_q"] + cw * e.get("loss_candidates", 0.0) * e.get("candidates_per_action", 0.0)
        assert e["loss"] == pytest.approx(trainer.args.q_weight * l_q, rel=1e-3, abs=1e-6)
    assert logged and all(e["loss_lm"] > 1.0 for e in logged)
    after = model.pretrained_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in policy_before.items())
    now = model.q_head.state_dict()
    moved = {k for k, v in q_before.items() if not torch.equal(v, now[k])}
    assert "output.u" in moved and any(k.startswith("q_model.transformer.h.0") for k in moved)


def test_lora_q_model_trains_only_its_adapters(tmp_path, gpt2_tokenizer):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    model = q_model_model(trained=False, q_model=get_peft_model(small_gpt2(), lora))
    before = snapshot(model.q_head)
    train(model, gpt2_tokenizer, tmp_path, effect_rows())
    now = model.q_head.state_dict()
    moved = {k for k, v in before.items() if not torch.equal(v, now[k])}
    assert moved and all("lora_" in k or k.startswith("output.") for k in moved)
    assert any("lora_" in k for k in moved)


def test_q_head_learning_rates_reach_the_q_model(tmp_path, gpt2_tokenizer):
    model = q_model_model(trained=False)
    args = QHeadConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        reward_normalization=None,
        learning_rate=1e-4,
        q_head_learning_rate=1e-3,
        q_head_bias_learning_rate=5e-2,
    )
    trainer = QHeadTrainer(model, args, train_dataset=effect_rows(), processing_class=gpt2_tokenizer)
    rate = {id(p): group["lr"] for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert rate[id(model.q_head.bias)] == 5e-2 and rate[id(model.q_head.output.u)] == 1e-3
    trunk_params = list(model.q_head.q_model.parameters())
    assert all(rate[id(p)] == 1e-3 for p in trunk_params if p is not model.q_head.bias)
    assert not any(id(p) in rate for p in model.pretrained_model.parameters())  # the policy is not trained


@pytest.mark.parametrize("output", ["tied", "dense"])
def test_cached_decode_equals_full_forward_sampling(output):
    torch.manual_seed(0)
    check_decode_equals_full_forward(q_model_model(output, vocab_size=SMALL), do_sample=True)


def test_cached_decode_equals_full_forward_beam_search():
    model = q_model_model(vocab_size=SMALL)
    check_decode_equals_full_forward(model, num_beams=3, num_return_sequences=2, do_sample=False)


def test_a_llama_q_model_guides_a_gpt2_policy_with_rotary_positions():
    q_model = make_tiny_llama(vocab_size=SMALL, seed=3)
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):  # the same special ids as the policy
        setattr(q_model.config, name, getattr(make_tiny_gpt2(vocab_size=SMALL).config, name))
    torch.manual_seed(0)
    check_decode_equals_full_forward(q_model_model(q_model=q_model, vocab_size=SMALL), do_sample=True)


def test_rerank_scores_are_the_full_forward_q():
    check_rerank_scores(q_model_model(vocab_size=SMALL))


@pytest.mark.parametrize("lora", [False, True])
def test_save_load_and_hub_round_trip(tmp_path, monkeypatch, lora):
    q_model = small_gpt2()
    if lora:
        config = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
        q_model = get_peft_model(q_model, config)
    model = q_model_model(q_model=q_model)
    with torch.no_grad():  # a trained Q model: its weights are part of the save
        model.q_head.q_model.get_input_embeddings().weight.add_(0.01)
    loaded = check_save_load_and_hub(model, tmp_path, "me/q", monkeypatch)
    assert loaded.q_head.q_model.lm_head.weight is loaded.q_head.q_model.get_input_embeddings().weight  # still tied


def test_a_q_model_guides_a_4bit_policy(tmp_path, gpt2_tokenizer):
    pytest.importorskip("bitsandbytes")
    check_4bit_policy(tmp_path, gpt2_tokenizer, q_head_type="q_model", q_head_options={"q_model": small_gpt2()})


# ---- what cannot combine --------------------------------------------------------------------------------------------


def test_another_vocabulary_or_tokenizer_fails_before_any_work(gpt2_tokenizer):
    policy = make_tiny_gpt2(vocab_size=VOCAB)
    with pytest.raises(ValueError, match="50258 rows but the policy.s has 50257"):
        q_model_model(q_model=small_gpt2(vocab_size=VOCAB + 1))
    with pytest.raises(ValueError, match="eos_token_id"):
        q_model_model(q_model=make_tiny_llama(vocab_size=VOCAB))  # Llama's special ids are not GPT-2's
    other = copy.deepcopy(gpt2_tokenizer)
    other.add_tokens(["<not-in-gpt2>"])
    big_policy, big_q = make_tiny_gpt2(), small_gpt2(vocab_size=50257)
    with pytest.raises(ValueError, match="tokenizer differs"):
        check_same_vocabulary(big_policy, big_q, gpt2_tokenizer, other)
    check_same_vocabulary(big_policy, big_q, gpt2_tokenizer, copy.deepcopy(gpt2_tokenizer))
    with pytest.raises(ValueError, match="q_model="):
        AutoModelForCausalLMWithQHead(policy, q_head_type="q_model")
    peft_policy = get_peft_model(make_tiny_gpt2(vocab_size=VOCAB), LoraConfig(r=2, fan_in_fan_out=True))
    with pytest.raises(ValueError, match="merge them first"):
        q_model_model(policy=peft_policy)
    model = q_model_model()
    with pytest.raises(ValueError, match="cannot be folded"):
        fold_tilt(model, beta=1.0)
    with pytest.raises(ValueError, match="QContext"):
        model.q_head.features(torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match="shape"):
        model.q_head.features(torch.zeros(2, 4, 32), QContext(torch.zeros(2, 5, dtype=torch.long)))
