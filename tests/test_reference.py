"""`trl_qhead.reference`: reference log-probs (chunked, left padding) and the adapter-free base of a PEFT model."""

import torch

from tests.test_lora import (
    outputs_of,
    trained,  # noqa: F401 (fixtures)
)
from tests.test_losses import grid_of, padded_batch, tiny_qhead_model
from trl_qhead import AutoModelForCausalLMWithQHead
from trl_qhead.reference import reference_logprobs


def test_reference_logprobs_match_the_full_logits_with_left_padding():
    model = tiny_qhead_model()
    input_ids, attention_mask, labels, _ = padded_batch("left")
    action_mask, actions, _, _ = grid_of(input_ids, attention_mask, labels, None)
    chunked = reference_logprobs(model.pretrained_model, input_ids, attention_mask, actions, action_mask, chunk_size=3)
    logits = model(input_ids, attention_mask).logits  # the wrapper's positions: counted over real tokens
    dense = torch.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0]
    torch.testing.assert_close(chunked, dense * action_mask, rtol=1e-5, atol=1e-5)


def test_reference_rewards_use_the_adapter_disabled_base(trained, gpt2_tokenizer):
    model, trainer = trained["model"], trained["trainer"]
    assert trainer.ref_model is None  # no second copy of the network
    model.train()  # as in training: the reference pass must still be the deterministic base
    # Left padding: the reference pass must use the same positions as the policy pass.
    gpt2_tokenizer.padding_side = "left"
    batch = gpt2_tokenizer(["the big dog ran under the tree.", "a cat sat."], return_tensors="pt", padding=True)
    gpt2_tokenizer.padding_side = "right"
    ids, mask = batch["input_ids"], batch["attention_mask"]
    actions = torch.zeros_like(ids)
    actions[:, :-1] = ids[:, 1:]
    policy_logits, _ = outputs_of(model, batch)

    reference = trainer._reference_logprobs(model, ids, mask, actions)

    base = AutoModelForCausalLMWithQHead.from_pretrained(str(trained["base_dir"])).eval()
    expected = reference_logprobs(base, ids, mask, actions)
    real = (mask[:, :-1] * mask[:, 1:]).bool()  # positions holding an action
    torch.testing.assert_close(reference[:, :-1][real], expected[:, :-1][real], rtol=1e-5, atol=1e-5)
    model.eval()
    policy = reference_logprobs(model, ids, mask, actions)
    assert (policy - expected)[:, :-1][real].abs().max() > 1e-3  # the adapters matter: this compares something
    torch.testing.assert_close(outputs_of(model, batch)[0], policy_logits, rtol=0, atol=0)  # adapters back on
