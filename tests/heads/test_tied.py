"""The tied Q head, `Q(s, .) = W_lm (U h) + b` (`q_head_type="tied"`): everything agrees with the dense head whose
`W_q = W_lm U` (gather, full Q, V, chunked V, loss, gradients by the chain rule), the LM head is never trained through
the Q loss, save / load (small file, bit-exact, refuses another LM head), fold vs processor (including the in-head
tilt without a KL record), rerank, LoRA, 4-bit, the trainer, parameter counts and hostile input."""

import copy
import os

import bitsandbytes as bnb  # the `quant` extra, which `make test` installs
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel, GPT2Model

import trl_qhead.decoding.sources as sources
from tests.conftest import make_tiny_gpt2, make_tiny_llama
from tests.recipe_assets import save_tiny_gpt2
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer, QTiltLogitsProcessor, fold_tilt, rerank
from trl_qhead.heads.tied import TiedQHead, lm_head_weight
from trl_qhead.losses import qhead_loss

GPT2_LORA = dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, r=4, lora_alpha=8, lora_dropout=0.0)


def _tied(backbone, rank=None, seed=1, bias=True, scale=1.0):
    model = AutoModelForCausalLMWithQHead(backbone, q_head_type="tied", q_head_rank=rank)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.q_head.named_parameters():
            if name != "bias":
                p.normal_(0.0, scale / p.shape[-1] ** 0.5)
            elif bias:
                p.normal_(0.0, 0.5)
    return model


def _gpt2(hidden):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=hidden, n_head=2, n_positions=32))


def _dense_twin(model):
    """A dense head on the same backbone with `W_q = W_lm U` and the same bias: the same Q everywhere."""
    dense = AutoModelForCausalLMWithQHead(model.pretrained_model)
    with torch.no_grad():
        dense.q_head.weight.copy_(model.q_head.effective_weight())
        dense.q_head.bias.copy_(model.q_head.bias)
    return dense


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    actions = torch.roll(ids, -1, dims=1)
    action_mask = mask.bool() & torch.roll(mask.bool(), -1, dims=1)
    action_mask[:, -1] = False
    returns = torch.randn(ids.shape, generator=g)
    return ids, mask, actions, action_mask, returns


@pytest.mark.parametrize("rank", [None, 4])
@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama])
def test_tied_equals_its_dense_twin_everywhere(make, rank):
    tied = _tied(make().eval(), rank)
    dense = _dense_twin(tied)
    vocab = tied.vocab_size
    ids, mask, actions, action_mask, returns = _batch(vocab)
    every = mask.bool()
    outs = {}
    for name, model in (("tied", tied), ("dense", dense)):
        full = model(ids, mask, return_q=True, actions=actions, value_mask=every)
        chunked = model(ids, mask, actions=actions, value_mask=every, logprob_mask=action_mask, value_chunk_size=3)
        loss, _ = qhead_loss(chunked.action_logprobs, chunked.action_q, returns, action_mask, q_weight=1.0)
        model.zero_grad()
        model.pretrained_model.zero_grad()
        loss.backward()
        params = dict(model.q_head.named_parameters())
        outs[name] = dict(
            full=full,
            chunked=chunked,
            loss=loss.detach(),
            grads={k: p.grad.clone() for k, p in params.items()},
            backbone={k: p.grad.clone() for k, p in model.pretrained_model.named_parameters() if p.grad is not None},
        )
    t, d = outs["tied"], outs["dense"]
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t["full"].q_values, d["full"].q_values, **close)
    torch.testing.assert_close(t["full"].action_q, d["full"].action_q, **close)
    torch.testing.assert_close(t["full"].action_q, t["full"].q_values.gather(-1, actions[..., None])[..., 0], **close)
    torch.testing.assert_close(t["full"].state_values, d["full"].state_values, **close)
    expected_v = (torch.softmax(t["full"].logits.float(), -1) * t["full"].q_values).sum(-1)
    torch.testing.assert_close(t["full"].state_values, torch.where(every, expected_v, 0.0), **close)
    torch.testing.assert_close(t["chunked"].state_values, d["chunked"].state_values, **close)
    torch.testing.assert_close(t["chunked"].state_values, t["full"].state_values, **close)
    torch.testing.assert_close(t["chunked"].action_q, d["chunked"].action_q, **close)
    torch.testing.assert_close(t["loss"], d["loss"], **close)
    # Chain rule: dL/dU = W_lm^T dL/dW_q (U = A B: dL/dA = dL/dU B^T, dL/dB = A^T dL/dU); dL/db the same.
    w_lm = tied.q_head.lm_weight().float()
    grad_u = w_lm.T @ d["grads"]["weight"]
    if rank is None:
        torch.testing.assert_close(t["grads"]["u"], grad_u, rtol=1e-4, atol=1e-6)
    else:
        torch.testing.assert_close(t["grads"]["u_left"], grad_u @ tied.q_head.u_right.T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(t["grads"]["u_right"], tied.q_head.u_left.T @ grad_u, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t["grads"]["bias"], d["grads"]["bias"], **close)
    # The backbone (LM head included) gets the same gradient: the head's read of W_lm adds none.
    assert t["backbone"].keys() == d["backbone"].keys()
    for k in t["backbone"]:
        torch.testing.assert_close(t["backbone"][k], d["backbone"][k], rtol=1e-4, atol=1e-6)


def test_the_q_loss_never_reaches_the_lm_head(tiny_llama):
    model = _tied(tiny_llama.eval())
    ids, mask, actions, action_mask, returns = _batch(model.vocab_size)
    out = model(ids, mask, actions=actions)
    ((out.action_q - returns) ** 2 * action_mask).sum().backward()  # the Q loss alone
    assert model.pretrained_model.lm_head.weight.grad is None  # untied Llama: only the head could have reached it
    assert model.q_head.u.grad.abs().sum() > 0 and model.q_head.bias.grad.abs().sum() > 0
    assert {name for name, _ in model.q_head.named_parameters()} == {"u", "bias"}  # W_lm is not the head's


def test_zero_init_tilts_nothing_and_inits():
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(), q_head_type="tied", q_head_rank=4)
    q = model(torch.tensor([[1, 2, 3]]), return_q=True).q_values
    assert torch.count_nonzero(q) == 0
    assert model.q_head.u_right.abs().sum() > 0  # so that A gets gradients
    full = AutoModelForCausalLMWithQHead(make_tiny_gpt2().eval(), q_head_type="tied", q_head_init="lm_head")
    out = full(torch.tensor([[1, 2, 3]]), return_q=True)
    torch.testing.assert_close(out.q_values, out.logits)  # U = I: Q starts as the (bias-free) logits
    full.reset_q_head("normal")
    assert full.q_head.u.std() > 0 and torch.count_nonzero(full.q_head.bias) == 0


def test_parameter_count_and_file_size(tmp_path):
    vocab, hidden = 50257, 64
    dense = AutoModelForCausalLMWithQHead(_gpt2(hidden))
    tied = AutoModelForCausalLMWithQHead(_gpt2(hidden), q_head_type="tied")
    low = AutoModelForCausalLMWithQHead(_gpt2(hidden), q_head_type="tied", q_head_rank=8)
    n_dense = sum(p.numel() for p in dense.q_head.parameters())
    n_tied = sum(p.numel() for p in tied.q_head.parameters())
    n_low = sum(p.numel() for p in low.q_head.parameters())
    assert n_dense == vocab * hidden + vocab
    assert n_tied == hidden * hidden + vocab and n_low == 2 * hidden * 8 + vocab
    assert tied.q_head.u.numel() * vocab // hidden == dense.q_head.weight.numel()  # |V| / H times fewer weights
    sizes = {}
    for name, model in (("dense", dense), ("tied", tied), ("low", low)):
        model.save_pretrained(tmp_path / name)
        sizes[name] = os.path.getsize(tmp_path / name / "q_head.safetensors")
    assert sizes["dense"] > 12_000_000  # |V| x H fp32
    assert sizes["tied"] < 4 * (hidden * hidden + vocab) + 1_000  # U and b only, never W_lm
    assert sizes["low"] < sizes["tied"]


@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama])
def test_save_load_round_trip_bit_exact(tmp_path, make, rank):
    model = _tied(make().eval(), rank)
    model.save_pretrained(tmp_path)
    import json

    config = json.loads((tmp_path / "q_head_config.json").read_text())
    assert config["q_head_type"] == "tied" and config["q_head_rank"] == rank
    loaded = AutoModelForCausalLMWithQHead.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.q_head, TiedQHead) and loaded.q_head_rank == rank
    ids = torch.randint(0, 500, (2, 5))
    a, b = model(ids, return_q=True), loaded(ids, return_q=True)
    torch.testing.assert_close(b.q_values, a.q_values, rtol=0, atol=0)
    for name, p in model.q_head.state_dict().items():
        assert torch.equal(loaded.q_head.state_dict()[name], p)
    # An explicit matching type is fine; a contradicting one is not.
    AutoModelForCausalLMWithQHead.from_pretrained(tmp_path, q_head_type="tied", q_head_rank=rank)
    with pytest.raises(ValueError, match="q_head_type='tied'"):
        AutoModelForCausalLMWithQHead.from_pretrained(tmp_path, q_head_type="dense")


def test_lora_round_trip_and_merge(tmp_path):
    model = AutoModelForCausalLMWithQHead.from_pretrained(
        str(save_tiny_gpt2(tmp_path / "base")), peft_config=LoraConfig(**GPT2_LORA), q_head_type="tied", q_head_rank=4
    )
    with torch.no_grad():
        model.q_head.u_left.normal_()
        model.q_head.bias.normal_()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert not os.path.exists(tmp_path / "ckpt" / "model.safetensors")  # adapters only
    loaded = AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert loaded.is_peft_model and loaded.q_head_type == "tied"
    ids = torch.randint(0, 500, (1, 6))
    a = model(ids, return_q=True)
    torch.testing.assert_close(loaded(ids, return_q=True).q_values, a.q_values, rtol=0, atol=0)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not merged.is_peft_model
    torch.testing.assert_close(merged(ids, return_q=True).q_values, a.q_values, rtol=1e-5, atol=1e-5)


def test_lora_adapted_lm_head_reads_the_merged_weight(tiny_llama):
    lora = LoraConfig(target_modules=["q_proj", "v_proj", "lm_head"], r=4, lora_alpha=8, lora_dropout=0.0)
    model = AutoModelForCausalLMWithQHead.from_pretrained(tiny_llama, peft_config=lora, q_head_type="tied")
    with torch.no_grad():
        model.q_head.u.normal_(0, 0.2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    head = model.get_output_embeddings()
    merged = head.get_base_layer().weight + head.get_delta_weight("default")
    assert not torch.equal(merged, head.get_base_layer().weight)
    torch.testing.assert_close(model.q_head.lm_weight(), merged.detach())
    ids = torch.randint(0, 500, (2, 5))
    out = model(ids, return_q=True)
    expected = out.hidden_states @ model.q_head.u.T @ merged.detach().T + model.q_head.bias
    torch.testing.assert_close(out.q_values, expected, rtol=1e-5, atol=1e-5)
    # LoRA-adapted heads are not plain: the chunked path falls back to full logits, with the same V.
    a = model(ids, actions=ids, value_mask=torch.ones_like(ids), logprob_mask=torch.ones_like(ids))
    b = model(ids, actions=ids, value_mask=torch.ones_like(ids))
    torch.testing.assert_close(a.state_values, b.state_values)
    # The folded model carries the merged head too.
    folded = fold_tilt(model, 0.7)
    torch.testing.assert_close(folded(ids).logits, out.logits + out.q_values / 0.7, rtol=1e-4, atol=1e-4)


def test_checkpoint_onto_another_lm_head_fails(tmp_path):
    _tied(make_tiny_gpt2()).save_pretrained(tmp_path / "tied")
    AutoModelForCausalLMWithQHead(make_tiny_gpt2()).save_pretrained(tmp_path / "dense")
    other_vocab = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=1000), q_head_type="tied")
    with pytest.raises(ValueError, match="LM head"):
        other_vocab.load_q_head(tmp_path / "tied")
    other_weights = AutoModelForCausalLMWithQHead(make_tiny_gpt2(seed=5), q_head_type="tied")
    with pytest.raises(ValueError, match="another LM head"):
        other_weights.load_q_head(tmp_path / "tied")
    same_in_bf16 = AutoModelForCausalLMWithQHead(make_tiny_gpt2().to(torch.bfloat16), q_head_type="tied")
    same_in_bf16.load_q_head(tmp_path / "tied")  # a dtype change is not another LM head
    with pytest.raises(ValueError, match="q_head_type='dense'"):
        other_weights.load_q_head(tmp_path / "dense")
    with pytest.raises(ValueError, match="q_head_type='tied'"):
        AutoModelForCausalLMWithQHead(make_tiny_gpt2()).load_q_head(tmp_path / "tied")


def _greedy(model, ids, processor=None, steps=10):
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps, pad_token_id=0)
    return model.generate(ids, logits_processor=[processor] if processor else None, **kwargs)


@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama])
def test_fold_processor_and_in_head_tilt_agree(make, monkeypatch):
    is_gpt2 = make is make_tiny_gpt2
    model = _tied(make().eval(), bias=is_gpt2, scale=40.0)  # Llama's bias-free head cannot fold a bias
    ids = torch.randint(0, 500, (3, 4))
    beta = 0.5
    base = _greedy(model, ids)
    with QTiltLogitsProcessor(model, beta) as processor:
        with_kl = _greedy(model, ids, processor)
    assert not torch.equal(with_kl, base) and bool((processor.kl > 0).all())
    calls = []
    original = sources.QHeadSource.__call__
    monkeypatch.setattr(sources.QHeadSource, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    with QTiltLogitsProcessor(model, beta, record_kl=False) as processor:
        assert processor._head_tilt
        in_head = _greedy(model, ids, processor)
        assert len(calls) == 1  # only the first step computes Q over the vocabulary; the others tilt in the LM head
        again = _greedy(model, ids, processor)  # a second generate with the same processor
        with torch.no_grad():  # a forward outside generate, hooks still on: not tilted
            untouched = model(ids[:, -1:]).logits
    folded = fold_tilt(model, beta)
    assert torch.equal(in_head, with_kl) and torch.equal(again, with_kl)
    assert torch.equal(_greedy(folded, ids), with_kl)
    with torch.no_grad():
        out = model(with_kl, return_q=True)
        torch.testing.assert_close(folded(with_kl).logits, out.logits + out.q_values / beta, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(untouched, model(ids[:, -1:]).logits, rtol=0, atol=0)


def test_in_head_tilt_matches_the_processor_scores_step_by_step():
    model = _tied(make_tiny_gpt2().eval(), scale=40.0)
    ids = torch.randint(0, 500, (2, 3))
    kwargs = dict(do_sample=False, max_new_tokens=6, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with QTiltLogitsProcessor(model, 0.3) as slow, QTiltLogitsProcessor(model, 0.3, record_kl=False) as fast:
        a = model.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=[slow], **kwargs)
        slow.remove()
        b = model.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=[fast], **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


def test_top_k_and_rerank_equal_the_dense_twin():
    tied = _tied(make_tiny_gpt2().eval(), scale=40.0)
    dense = _dense_twin(tied)
    ids = torch.randint(0, 500, (2, 4))
    outs = []
    for model in (tied, dense):
        with QTiltLogitsProcessor(model, 0.5, top_k=20) as processor:
            outs.append((_greedy(model, ids, processor), processor.kl))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4)
    samples = torch.randint(1, 500, (6, 8))
    a = rerank(tied, samples, 3, prompt_length=3, eos_token_id=None, pad_token_id=None)
    b = rerank(dense, samples, 3, prompt_length=3, eos_token_id=None, pad_token_id=None)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.indices, b.indices)


def test_trainer_fits_the_q_head_and_leaves_the_lm_head(tmp_path, gpt2_tokenizer):
    model = AutoModelForCausalLMWithQHead.from_pretrained(
        make_tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        peft_config=LoraConfig(**GPT2_LORA),
        q_head_type="tied",
    )
    lm_head = model.get_output_embeddings().weight.detach().clone()
    texts = ["The cat sat on the mat and looked at the door.", "A dog ran across the park to find a ball."] * 12
    config = QHeadConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        q_head_learning_rate=0.2,
        max_steps=12,  # the Q loss falls by a third by then (measured: last 5 steps / first 5 = 0.64)
        logging_steps=1,
        max_length=32,
        use_lm_rewards=True,
        gamma=0.5,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    trainer = QHeadTrainer(
        model, config, train_dataset=Dataset.from_dict({"text": texts}), processing_class=gpt2_tokenizer
    )
    trainer.train()
    loss_q = [entry["loss_q"] for entry in trainer.state.log_history if "loss_q" in entry]
    assert sum(loss_q[-5:]) < 0.8 * sum(loss_q[:5])
    assert torch.equal(model.get_output_embeddings().weight, lm_head)  # frozen under LoRA, untouched by the Q loss
    assert model.q_head.u.abs().sum() > 0 and model.q_head.bias.abs().sum() > 0
    groups = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert groups[id(model.q_head.u)] == groups[id(model.q_head.bias)] == 0.2


@pytest.mark.parametrize("rank", [None, 3])
def test_soft_targets_equal_the_dense_twin_through_the_trainer(tmp_path, gpt2_tokenizer, rank):
    """`q_target="soft"` with lambda-returns (V* read at every state): the tied head's loss is its dense twin's."""
    tied = _tied(make_tiny_gpt2().eval(), rank)
    dense = _dense_twin(tied)
    texts = ["The cat sat on the mat.", "A dog ran across the park."]
    config = dict(
        per_device_train_batch_size=2, max_length=16, use_lm_rewards=True, gamma=1.0, gae_lambda=0.5,
        q_target="soft", target_beta=0.3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    losses = []
    for name, model in (("tied", tied), ("dense", dense)):
        args = QHeadConfig(output_dir=str(tmp_path / name), **config)
        trainer = QHeadTrainer(
            model, args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=gpt2_tokenizer
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        losses.append(trainer.compute_loss(model, batch))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("tied4") / "base", n_embd=64)


def test_4bit_backbone(base_dir, tmp_path):
    model = AutoModelForCausalLMWithQHead.from_pretrained(
        str(base_dir),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True),
        peft_config=LoraConfig(**GPT2_LORA),
        q_head_type="tied",
        q_head_rank=8,
    )
    assert model.is_loaded_in_4bit and type(model.get_output_embeddings()) is torch.nn.Linear
    with torch.no_grad():
        model.q_head.u_left.normal_()
        model.q_head.bias.normal_()
    model.eval()
    ids = torch.randint(0, 500, (2, 6))
    with torch.no_grad():
        full = model(ids, return_q=True, actions=ids, value_mask=torch.ones_like(ids))
        chunked = model(ids, actions=ids, value_mask=torch.ones_like(ids), logprob_mask=torch.ones_like(ids))
    torch.testing.assert_close(full.action_q, full.q_values.gather(-1, ids[..., None])[..., 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.state_values, full.state_values, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForCausalLMWithQHead.from_pretrained(
        str(tmp_path / "ckpt"), quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, return_q=True).q_values, full.q_values, rtol=0, atol=0)


def test_4bit_lm_head_is_dequantised(tmp_path):
    # A model loaded outside trl_qhead with its LM head quantised: the tied head reads the dequantised weight.
    untied = save_tiny_gpt2(tmp_path / "untied", n_embd=64, tie_word_embeddings=False)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(untied), quantization_config=BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["none"])
    )
    head = quantised.get_output_embeddings()
    assert isinstance(head, bnb.nn.Linear4bit)
    model = AutoModelForCausalLMWithQHead(quantised, q_head_type="tied")
    with torch.no_grad():
        model.q_head.u.normal_(0, 0.1)
    weight = bnb.functional.dequantize_4bit(head.weight.data, head.weight.quant_state)
    assert model.q_head.lm_weight() is model.q_head.lm_weight()  # dequantised once
    model.eval()
    ids = torch.randint(0, 500, (1, 5))
    with torch.no_grad():
        out = model(ids, return_q=True)
    torch.testing.assert_close(out.logits, out.hidden_states @ weight.float().T)  # what the LM head multiplies by
    expected = (out.hidden_states.float() @ model.q_head.u.T) @ weight.float().T
    torch.testing.assert_close(out.q_values, expected, rtol=1e-5, atol=1e-5)


def test_hostile_input(tiny_gpt2, tmp_path):
    for rank in (0, 33, 2.5, True, "4"):
        with pytest.raises(ValueError, match="q_head_rank"):
            AutoModelForCausalLMWithQHead(tiny_gpt2, q_head_type="tied", q_head_rank=rank)
    with pytest.raises(ValueError, match="q_head_rank"):
        AutoModelForCausalLMWithQHead(tiny_gpt2, q_head_rank=4)  # dense has no rank
    with pytest.raises(ValueError, match="q_head_type"):
        AutoModelForCausalLMWithQHead(tiny_gpt2, q_head_type="tide")
    with pytest.raises(ValueError, match="q_head_type"):
        AutoModelForCausalLMWithQHead.from_pretrained(tiny_gpt2, q_head_type="Tied")
    with pytest.raises(ValueError, match="full-rank"):
        AutoModelForCausalLMWithQHead(tiny_gpt2, q_head_type="tied", q_head_rank=4, q_head_init="lm_head")
    folder = save_tiny_gpt2(tmp_path / "base")
    for typo in ("q_head_typ", "q_head_ranks", "peft_confg", "q_head_inti", "is_trainble"):
        with pytest.raises(TypeError, match=typo):
            AutoModelForCausalLMWithQHead.from_pretrained(str(folder), **{typo: "tied"})
    AutoModelForCausalLMWithQHead.from_pretrained(str(folder), n_positions=64)  # a backbone config override is fine
    with pytest.raises(TypeError, match="already loaded"):
        AutoModelForCausalLMWithQHead.from_pretrained(tiny_gpt2, dtype=torch.bfloat16)
    # A transformer without an LM head has nothing to tie to.
    with pytest.raises(TypeError, match="LM head|pretrained_model"):
        AutoModelForCausalLMWithQHead(GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2)), q_head_type="tied")
    # An LM head whose weight the tied head cannot read (8-bit integers, say) fails clearly.
    with pytest.raises(TypeError, match="q_head_type='dense'"):
        lm_head_weight(_Int8Head())
    unbound = TiedQHead(32, 100)
    with pytest.raises(RuntimeError, match="bind"):
        unbound(torch.zeros(1, 32))


class _Int8Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(10, 4, dtype=torch.int8), requires_grad=False)


def test_damaged_tied_files_and_tiny_beta(tmp_path):
    from safetensors.torch import save_file

    model = _tied(make_tiny_gpt2().eval(), rank=2)
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "q_head.safetensors"
    save_file({"bias": model.q_head.bias.detach().clone(), "u": torch.zeros(32, 32)}, str(path))  # a full-rank U
    with pytest.raises(ValueError, match="u_left"):
        model.load_q_head(tmp_path / "ckpt")
    state = {k: v.detach().clone() for k, v in model.q_head.state_dict().items()}
    state["u_left"][0, 0] = float("nan")
    save_file(state, str(path))
    with pytest.raises(ValueError, match="NaN"):
        model.load_q_head(tmp_path / "ckpt")
    # A tiny beta would overflow h + U h / beta: the processor keeps its own overflow-free tilt.
    with QTiltLogitsProcessor(model, 1e-30, record_kl=False) as processor:
        assert not processor._head_tilt
        out = _greedy(model, torch.randint(0, 500, (2, 3)), processor, steps=3)
    assert out.shape == (2, 6)


# ---- issue 27: the whole LM head, the Hub, truncated files, resizing ------------------------------------------------


def test_load_refuses_an_lm_head_that_differs_outside_the_old_probe(tmp_path):
    model = _tied(make_tiny_llama(vocab_size=512))
    model.save_pretrained(tmp_path / "tied")
    other = AutoModelForCausalLMWithQHead(make_tiny_llama(vocab_size=512), q_head_type="tied")
    with torch.no_grad():  # row 1 is none of the 8 rows the old probe read (0, 73, 146, ...)
        other.get_output_embeddings().weight[1] += 0.5
    with pytest.raises(ValueError, match=r"another LM head.*q_head_config\.json"):
        other.load_q_head(tmp_path / "tied")
    same = AutoModelForCausalLMWithQHead(make_tiny_llama(vocab_size=512), q_head_type="tied")
    same.load_q_head(tmp_path / "tied")
    assert torch.equal(same.q_head.u, model.q_head.u)


def test_a_folder_saved_with_only_the_old_probe_is_still_checked(tmp_path):
    import json

    from trl_qhead.heads.tied import lm_head_probe

    model = _tied(make_tiny_gpt2())
    model.save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "q_head_config.json"
    config = json.loads(config_path.read_text())
    del config["lm_head_sha256"]
    config["lm_head_probe"] = lm_head_probe(model.q_head.lm_weight())  # what saves before the hash wrote
    config_path.write_text(json.dumps(config))
    AutoModelForCausalLMWithQHead(make_tiny_gpt2(), q_head_type="tied").load_q_head(tmp_path / "old")
    with pytest.raises(ValueError, match="another LM head"):
        AutoModelForCausalLMWithQHead(make_tiny_gpt2(seed=5), q_head_type="tied").load_q_head(tmp_path / "old")


def test_tied_head_from_a_hub_repo(tmp_path, monkeypatch):
    from tests.hub_fakes import hub_repo, use_hub_cache

    cache = tmp_path / "hub"
    use_hub_cache(monkeypatch, cache)
    make_tiny_gpt2(vocab_size=128).save_pretrained(tmp_path / "plain")
    hub_repo(cache, "me/plain", tmp_path / "plain")
    # a plain repo with q_head_type / q_head_rank: a fresh tied head of that rank (both used to be dropped)
    fresh = AutoModelForCausalLMWithQHead.from_pretrained("me/plain", q_head_type="tied", q_head_rank=4)
    assert fresh.q_head_type == "tied" and fresh.q_head_rank == 4 and isinstance(fresh.q_head, TiedQHead)
    # a saved tied head comes back from the Hub, with or without naming its type
    trained = _tied(make_tiny_gpt2(vocab_size=128), rank=4)
    trained.save_pretrained(tmp_path / "tied")
    hub_repo(cache, "me/tied", tmp_path / "tied")
    for kwargs in ({}, {"q_head_type": "tied", "q_head_rank": 4}):
        loaded = AutoModelForCausalLMWithQHead.from_pretrained("me/tied", **kwargs)
        assert loaded.q_head_type == "tied" and loaded.q_head_rank == 4
        for name, tensor in trained.q_head.state_dict().items():
            assert torch.equal(loaded.q_head.state_dict()[name], tensor), name
        ids = torch.tensor([[1, 2, 3]])
        torch.testing.assert_close(
            loaded.eval()(ids, return_q=True).q_values, trained.eval()(ids, return_q=True).q_values
        )
    with pytest.raises(ValueError, match="q_head_type='tied'"):
        AutoModelForCausalLMWithQHead.from_pretrained("me/tied", q_head_type="dense")


@pytest.mark.parametrize("name", ["model.safetensors", "q_head.safetensors"])
def test_a_truncated_file_is_an_error_naming_it(tmp_path, name):
    _tied(make_tiny_gpt2(vocab_size=128)).save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{name}.*(truncated|damaged)"):
        AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("rank", [None, 4])
def test_resize_token_embeddings_resizes_the_tied_head(rank):
    model = _tied(make_tiny_gpt2(vocab_size=100), rank=rank).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids, return_q=True).q_values
    model.resize_token_embeddings(110)
    assert model.q_head.vocab_size == model.vocab_size == 110 and model.q_head.bias.shape == (110,)
    with torch.no_grad():
        out = model(ids, return_q=True)
    torch.testing.assert_close(out.q_values[..., :100], before)  # the old tokens keep their Q
    # a new token's Q is its new LM-head row read through U, with a zero bias
    weight = model.get_output_embeddings().weight
    expected = model.q_head.project(out.hidden_states) @ weight[100:].float().T
    torch.testing.assert_close(out.q_values[..., 100:], expected)
    actions = torch.tensor([[105, 2, 107, 4]])
    torch.testing.assert_close(
        model(ids, actions=actions).action_q, out.q_values.gather(-1, actions[..., None])[..., 0]
    )
    # resizing the backbone alone leaves the Q head behind: a clear error naming what to do
    model.pretrained_model.resize_token_embeddings(120)
    with pytest.raises(ValueError, match=r"resize_token_embeddings"):
        model(ids, return_q=True)
