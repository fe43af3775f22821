"""`q_head_type="adapter"`: a PEFT adapter on the policy's trunk, on only where Q is read. The policy's logits are the
base model's exactly; training moves the adapter and the output and leaves the policy bit-identical; the cached
decode equals a full forward (sampling, beam search); save / load and the Hub round trip give the same Q; 4-bit
base; every combination that cannot work fails before any work."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.conftest import make_tiny_gpt2
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
from trl_qhead.heads.adapter import AdapterQHead

LORA = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_dropout=0.0)


def adapter_model(output: str = "tied", trained: bool = True, base=None, vocab_size: int = VOCAB):
    """An adapter-head model; `trained`: a nonzero adapter and output, as after training. `vocab_size=SMALL`: a fast
    model for what needs no tokenizer."""
    base = make_tiny_gpt2(vocab_size=vocab_size) if base is None else base
    peft_model = get_peft_model(base, LoraConfig(**LORA, init_lora_weights=not trained))
    model = AutoModelForCausalLMWithQHead(peft_model, q_head_type="adapter", q_head_options={"output": output})
    if trained:
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.q_head.output.parameters():
                p.normal_(0, 0.3)
    return model.eval()


def test_policy_is_the_base_model_and_q_reads_the_adapted_trunk():
    model = adapter_model()
    base = make_tiny_gpt2(vocab_size=VOCAB).eval()
    assert isinstance(model.q_head, AdapterQHead)
    ids, mask = prompts()
    assert_base_logits(model, base)
    # the generation path too, and after PEFT's own `disable_adapter()` context (which switches adapters back on)
    with model.pretrained_model.disable_adapter():
        pass
    torch.testing.assert_close(
        model.pretrained_model(input_ids=ids).logits, base(input_ids=ids).logits, atol=0, rtol=0
    )
    # Q reads the trunk with the adapter on: not the base trunk's hidden state
    adapted = model.q_head.network_hidden(QContext(ids, mask))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    plain = base.transformer(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    assert not torch.allclose(adapted, plain, atol=1e-3)
    features = model.q_head.features(plain, QContext(ids, mask))
    torch.testing.assert_close(features, model.q_head.output.project(adapted))


def test_lm_loss_reaches_nothing_and_q_loss_reaches_the_adapter():
    model = adapter_model().train()
    ids, mask = prompts()
    actions = torch.roll(ids, -1, 1)
    out = model(ids, attention_mask=mask, actions=actions, logprob_mask=mask.bool())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("q_head.") for n in trainable)
    assert not out.action_logprobs.requires_grad  # the policy's log-probs: no trainable weight behind them
    grads = torch.autograd.grad(out.action_q.sum(), list(trainable.values()), allow_unused=True)
    reached = {n for (n, _), g in zip(trainable.items(), grads, strict=True) if g is not None and g.abs().sum() > 0}
    assert any("lora_" in n for n in reached) and any(n.startswith("q_head.output") for n in reached)


@pytest.mark.parametrize(("labels", "head_only"), [("effects", False), ("mc", False), ("effects", True)])
def test_training_leaves_the_policy_bit_identical(tmp_path, gpt2_tokenizer, labels, head_only):
    """`q_head_only=True` is the same switch for an adapter head: its adapter is the Q network, so it keeps training
    (not refused as a policy adapter would be)."""
    model = adapter_model(trained=False)
    policy_before = {k: v for k, v in snapshot(model.pretrained_model).items() if "lora_" not in k}
    q_before = {k: v for k, v in snapshot(model).items() if "lora_" in k or k.startswith("q_head.")}
    overrides = {"q_head_only": True, "q_head_learning_rate": 1e-2} if head_only else {}
    trainer = train(model, gpt2_tokenizer, tmp_path, effect_rows(mc=labels == "mc"), **overrides)
    assert trainer.q_head_only  # a context head trains on the Q loss alone whatever the config says
    after = model.pretrained_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in policy_before.items())
    now = model.state_dict()
    moved = [k for k, v in q_before.items() if not torch.equal(v, now[k])]
    assert any("lora_B" in k for k in moved) and "q_head.output.u" in moved
    assert_base_logits(model.eval(), make_tiny_gpt2(vocab_size=VOCAB).eval())


@pytest.mark.parametrize("output", ["tied", "dense"])
def test_cached_decode_equals_full_forward_sampling(output):
    torch.manual_seed(0)
    check_decode_equals_full_forward(adapter_model(output, vocab_size=SMALL), do_sample=True)


def test_cached_decode_equals_full_forward_beam_search():
    model = adapter_model(vocab_size=SMALL)
    check_decode_equals_full_forward(model, num_beams=3, num_return_sequences=2, do_sample=False)


def test_rerank_scores_are_the_full_forward_q():
    check_rerank_scores(adapter_model(vocab_size=SMALL))


def test_save_load_and_hub_round_trip(tmp_path, monkeypatch):
    make_tiny_gpt2(vocab_size=VOCAB).save_pretrained(tmp_path / "base")  # PEFT saves the base model's path
    from transformers import AutoModelForCausalLM

    check_save_load_and_hub(
        adapter_model(base=AutoModelForCausalLM.from_pretrained(tmp_path / "base")), tmp_path, "me/a", monkeypatch
    )


def test_4bit_base_trains_and_decodes(tmp_path, gpt2_tokenizer):
    pytest.importorskip("bitsandbytes")
    lora = LoraConfig(**dict(LORA, target_modules=["c_attn", "c_proj", "c_fc"]))
    check_4bit_policy(tmp_path, gpt2_tokenizer, peft_config=lora, q_head_type="adapter")


# ---- what cannot combine --------------------------------------------------------------------------------------------


def test_errors_before_any_work(tmp_path, gpt2_tokenizer):
    with pytest.raises(ValueError, match="peft_config"):
        AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=VOCAB), q_head_type="adapter")
    two = get_peft_model(make_tiny_gpt2(vocab_size=VOCAB), LoraConfig(**LORA))
    two.add_adapter("policy", LoraConfig(**LORA))
    with pytest.raises(ValueError, match="exactly one PEFT adapter"):
        AutoModelForCausalLMWithQHead(two, q_head_type="adapter")
    with pytest.raises(ValueError, match="q_head_output"):
        adapter_model(output="wide")
    model = adapter_model()
    with pytest.raises(ValueError, match="cannot be folded"):
        fold_tilt(model, beta=1.0)
    with pytest.raises(ValueError, match="merging it would change the policy"):
        model.merge_and_unload()
    # gradient checkpointing would recompute the adapted blocks with the adapter off
    model.train().gradient_checkpointing_enable()
    ids, mask = prompts()
    with pytest.raises(ValueError, match="checkpointing"):
        model(ids, attention_mask=mask, actions=ids, logprob_mask=mask.bool())
    model.gradient_checkpointing_disable()
    # a policy weight made trainable: the LM loss would train the policy
    model.pretrained_model.base_model.model.lm_head.weight.requires_grad_(True)
    args = QHeadConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, reward_normalization=None)
    with pytest.raises(ValueError, match="policy"):
        QHeadTrainer(model, args, train_dataset=effect_rows(), processing_class=gpt2_tokenizer)


def test_reward_lookahead_on_an_adapter_model_reads_the_base_policy(gpt2_tokenizer):
    """The one-step oracle composes with the adapter head's model: its top-k come from the policy's logits, which are
    the base model's (the Q network's adapter stays off), so it decodes exactly as on the base model."""
    from trl_qhead import QTiltLogitsProcessor
    from trl_qhead.decoding import RewardLookahead

    def reward(prompts, completions, **kwargs):
        return [float(text.count("a") - text.count("e")) for text in completions]

    ids, mask = prompts()
    results = []
    for model in (adapter_model(), make_tiny_gpt2(vocab_size=VOCAB).eval()):
        source = RewardLookahead(model, gpt2_tokenizer, reward, k=4)
        with QTiltLogitsProcessor(source, beta=0.5) as processor:
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                logits_processor=[processor],
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        results.append((out, processor.kl))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
