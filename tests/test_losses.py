"""The efficient loss equals the naive dense computation (full logits, full Q values, dense log-softmax): the same
loss and the same gradient for every parameter.

Efficient means: `Q(s_t, a_t)` gathered from the rows `W_q[a_t]`, `V` only where the targets need it, and (the training
path) `log pi` and `V` from the hidden states a chunk of positions at a time, recomputed in the backward, so that no
`[B, T, |V|]` logits exist. Covered: padding on both sides, nonzero rewards, episode ends, every return estimator, chunks
that do and do not divide the batch, an LM head with a bias, heads that fall back to full logits, and the trainer's own
`compute_loss`."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch import nn

from tests.conftest import make_tiny_gpt2
from tests.oracles import dense_qhead_loss
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer
from trl_qhead.backbone import plain_lm_head
from trl_qhead.losses import qhead_loss
from trl_qhead.mdp import action_mask_from_labels, bootstrap_mask, episode_dones, next_tokens
from trl_qhead.returns import compute_returns

EOS = 7


def padded_batch(padding_side: str, vocab: int = 60, seed: int = 0):
    """Rows of different lengths, one with an EOS inside and one ending with EOS, padded with EOS on one side."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [11, 8, 5, 2]
    rows = [torch.randint(10, vocab, (n,), generator=gen) for n in lengths]
    rows[0][5] = EOS
    rows[1][-1] = EOS
    width = max(lengths)
    input_ids = torch.full((len(rows), width), EOS)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    rewards = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        input_ids[i, span] = row
        attention_mask[i, span] = 1
        rewards[i, span] = torch.randn(len(row), generator=gen)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels, rewards


def tiny_qhead_model(lm_bias: bool = False):
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=64), q_head_init="normal").eval()  # no dropout
    with torch.no_grad():
        model.q_head.bias.normal_(0, 0.5)
    if lm_bias:  # GPT-2 ties its head without a bias; give it an untied head with one to cover the bias gradient
        backbone = model.pretrained_model
        backbone.config.tie_word_embeddings = False
        head = nn.Linear(32, 64, bias=True)
        head.weight.data.copy_(backbone.lm_head.weight.data)
        head.bias.data.normal_(0, 0.3)
        backbone.lm_head = head
    return model


def grid_of(input_ids, attention_mask, labels, lam):
    action_mask = action_mask_from_labels(labels, attention_mask)
    actions = next_tokens(input_ids)
    monte_carlo = lam is None or lam == 1
    value_mask = bootstrap_mask(action_mask) if monte_carlo else attention_mask.bool()
    return action_mask, actions, value_mask, episode_dones(actions, action_mask, EOS)


def efficient_loss(model, input_ids, attention_mask, labels, rewards, *, lam, chunk, gamma=0.9, chunked_lm=True):
    """`chunked_lm=False` is the model's plain forward (full logits for `L_LM`, gathered `Q`, `V` where needed)."""
    action_mask, actions, value_mask, dones = grid_of(input_ids, attention_mask, labels, lam)
    out = model(
        input_ids, attention_mask, actions=actions, value_mask=value_mask,
        logprob_mask=action_mask if chunked_lm else None, value_chunk_size=chunk,
    )  # fmt: skip
    fused = chunked_lm and plain_lm_head(model.pretrained_model) is not None
    assert (out.logits is None) == fused, "the training path builds no [B, T, |V|] logits unless it falls back"
    action_logprobs = out.action_logprobs
    if action_logprobs is None:  # the plain forward: log pi(a_t|s_t) from its full logits
        action_logprobs = torch.log_softmax(out.logits.float(), -1).gather(-1, actions[..., None])[..., 0]
    returns = compute_returns(rewards, out.state_values, action_mask, gamma=gamma, gae_lambda=lam, dones=dones)
    loss, _ = qhead_loss(action_logprobs, out.action_q, returns, action_mask, q_weight=0.7)
    return loss


def dense_loss(model, input_ids, attention_mask, labels, rewards, *, lam, gamma=0.9):
    action_mask, actions, _, dones = grid_of(input_ids, attention_mask, labels, lam)
    out = model(input_ids, attention_mask, return_q=True)
    return dense_qhead_loss(
        out.logits, out.q_values, actions, action_mask, rewards, dones, gamma=gamma, gae_lambda=lam, q_weight=0.7
    )


def assert_same_loss_and_grads(model, loss_fast, loss_dense, rtol=1e-5, atol=1e-6):
    names, params = zip(*((n, p) for n, p in model.named_parameters() if p.requires_grad), strict=True)
    grads_fast = torch.autograd.grad(loss_fast, params, allow_unused=True)
    grads_dense = torch.autograd.grad(loss_dense, params, allow_unused=True)
    torch.testing.assert_close(loss_fast, loss_dense, rtol=rtol, atol=atol)
    for name, g_fast, g_dense in zip(names, grads_fast, grads_dense, strict=True):
        assert (g_fast is None) == (g_dense is None), name
        if g_fast is not None:
            torch.testing.assert_close(g_fast, g_dense, rtol=rtol * 10, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    return dict(zip(names, grads_fast, strict=True))


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("lam", [None, 0.0, 0.95])
@pytest.mark.parametrize("chunk", [3, 256])
@pytest.mark.parametrize("chunked_lm", [True, False])
def test_efficient_loss_and_gradients_equal_dense(padding_side, lam, chunk, chunked_lm):
    model = tiny_qhead_model()
    batch = padded_batch(padding_side)
    loss_fast = efficient_loss(model, *batch, lam=lam, chunk=chunk, chunked_lm=chunked_lm)
    grads = assert_same_loss_and_grads(model, loss_fast, dense_loss(model, *batch, lam=lam))
    assert grads["q_head.weight"].abs().sum() > 0 and grads["pretrained_model.transformer.wte.weight"].abs().sum() > 0


@pytest.mark.parametrize("lam", [None, 0.5])
def test_chunked_path_with_an_lm_head_bias(lam):
    model = tiny_qhead_model(lm_bias=True)
    batch = padded_batch("right")
    grads = assert_same_loss_and_grads(
        model, efficient_loss(model, *batch, lam=lam, chunk=4), dense_loss(model, *batch, lam=lam)
    )
    assert grads["pretrained_model.lm_head.bias"].abs().sum() > 0


def test_chunked_path_under_bf16_autocast_stays_close_to_fp32_dense():
    model = tiny_qhead_model()
    batch = padded_batch("left")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fast = efficient_loss(model, *batch, lam=0.95, chunk=5)
    loss_dense = dense_loss(model, *batch, lam=0.95)
    torch.testing.assert_close(loss_fast, loss_dense, rtol=3e-2, atol=3e-2)
    grad_fast = torch.autograd.grad(loss_fast, model.q_head.weight)[0]
    grad_dense = torch.autograd.grad(loss_dense, model.q_head.weight)[0]
    assert torch.nn.functional.cosine_similarity(grad_fast.flatten(), grad_dense.flatten(), dim=0) > 0.99


def test_heads_that_are_not_a_plain_linear_map_fall_back_to_full_logits():
    model = tiny_qhead_model()
    assert plain_lm_head(model.pretrained_model) is model.pretrained_model.lm_head
    model.pretrained_model.config.final_logit_softcapping = 30.0
    assert plain_lm_head(model.pretrained_model) is None
    model.pretrained_model.config.final_logit_softcapping = None
    lora = LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False)
    peft_model = AutoModelForCausalLMWithQHead(get_peft_model(make_tiny_gpt2(vocab_size=64), lora)).eval()
    assert plain_lm_head(peft_model.pretrained_model) is None
    batch = padded_batch("right")
    assert_same_loss_and_grads(
        peft_model,
        efficient_loss(peft_model, *batch, lam=0.0, chunk=4),
        dense_loss(peft_model, *batch, lam=0.0),
    )


@pytest.mark.parametrize("lam", [None, 0.95])
def test_trainer_compute_loss_equals_dense(gpt2_tokenizer, lam):
    """The loss `QHeadTrainer` trains on (data rewards, EOS episode ends) and its gradients equal the dense reference."""
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(), q_head_init="normal")
    with torch.no_grad():
        model.q_head.bias.normal_(0, 0.5)
    eos = gpt2_tokenizer.eos_token_id
    rows = [[5, 9, 11, eos, 40, 41, 42], [3, 4, 5, 6, eos], [8, 9, 10]]
    data = Dataset.from_dict(
        {"input_ids": rows, "rewards": [[float(i % 3) - 0.5 for i in range(len(r))] for r in rows]}
    )
    args = QHeadConfig(
        output_dir="/tmp/unused", gamma=0.9, gae_lambda=lam, q_weight=0.7, value_chunk_size=4, report_to=[],
        use_cpu=True, max_length=16,
    )  # fmt: skip
    trainer = QHeadTrainer(model, args, train_dataset=data, processing_class=gpt2_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model.eval()  # no dropout, so both computations see the same network
    loss_fast = trainer.compute_loss(model, batch)
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    actions = next_tokens(batch["input_ids"])
    out = model(batch["input_ids"], batch["attention_mask"], return_q=True)
    rewards = torch.zeros_like(batch["rewards"])
    rewards[:, :-1] = batch["rewards"][:, 1:]
    loss_dense = dense_qhead_loss(
        out.logits, out.q_values, actions, action_mask, rewards,
        # Unpacked rows are one episode each: row 0's mid-row EOS does not end it, its last action ends it.
        episode_dones(actions, action_mask, eos, one_episode_per_row=True),
        gamma=0.9, gae_lambda=lam, q_weight=0.7,
    )  # fmt: skip
    assert_same_loss_and_grads(model, loss_fast, loss_dense)


def test_left_and_right_padding_give_the_same_loss():
    model = tiny_qhead_model()
    left = efficient_loss(model, *padded_batch("left"), lam=0.5, chunk=4)
    right = efficient_loss(model, *padded_batch("right"), lam=0.5, chunk=4)
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)


def test_candidate_target_sq_is_the_loss_of_a_head_that_predicts_zero():
    torch.manual_seed(0)
    B, T, k = 2, 5, 3
    action_mask = torch.ones(B, T, dtype=torch.bool)
    targets = torch.randn(B, T, k)
    pairs = torch.rand(B, T, k) > 0.4
    common = dict(q_weight=1.0, candidate_targets=targets, candidate_mask=pairs)
    zeros = (torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T), action_mask)
    _, stats = qhead_loss(*zeros, candidate_q=torch.zeros(B, T, k), **common)
    expected = (targets[pairs] ** 2).mean()
    torch.testing.assert_close(stats["candidate_target_sq"], expected)
    torch.testing.assert_close(stats["loss_candidates"], expected)  # predicting 0: nothing of the labels reproduced
    _, stats = qhead_loss(*zeros, candidate_q=targets.clone(), **common)
    assert stats["loss_candidates"].item() == 0.0  # the labels exactly: all of them
    torch.testing.assert_close(stats["candidate_target_sq"], expected)  # the targets' moment, whatever Q predicts
