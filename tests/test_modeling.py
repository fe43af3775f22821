"""AutoModelForCausalLMWithQHead: shapes, init, what the heads read, save/load round trips, generate, bad input."""

import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import make_tiny_gpt2, make_tiny_llama
from trl_qhead import AutoModelForCausalLMWithQHead


def _gpt2_lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)


@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama])
def test_forward_shapes_and_the_hidden_state_both_heads_read(make):
    backbone = make().eval()
    model = AutoModelForCausalLMWithQHead(backbone, q_head_init="normal")
    input_ids = torch.randint(0, 500, (2, 6))
    out = model(input_ids, return_q=True)
    vocab = backbone.config.vocab_size
    assert out.logits.shape == out.q_values.shape == (2, 6, vocab)
    assert model.q_head.weight.dtype == torch.float32
    # The hidden state we read is exactly the one the LM head reads: the Q head sees what the policy sees.
    torch.testing.assert_close(backbone.get_output_embeddings()(out.hidden_states), out.logits)
    torch.testing.assert_close(out.q_values, out.hidden_states @ model.q_head.weight.T + model.q_head.bias)
    torch.testing.assert_close(out.logits, backbone(input_ids).logits)


def test_zero_init_changes_nothing_and_other_inits_do(tiny_gpt2):
    model = AutoModelForCausalLMWithQHead(tiny_gpt2)
    q = model(torch.tensor([[1, 2, 3]]), return_q=True).q_values
    assert torch.count_nonzero(q) == 0
    model.reset_q_head("normal")
    assert model.q_head.weight.std() > 0
    model.reset_q_head("lm_head")
    torch.testing.assert_close(model.q_head.weight, tiny_gpt2.lm_head.weight)
    with pytest.raises(ValueError, match="q_head_init"):
        AutoModelForCausalLMWithQHead(tiny_gpt2, q_head_init="xavier")


def test_rejects_what_is_not_a_causal_lm():
    with pytest.raises(TypeError, match="pretrained_model"):
        AutoModelForCausalLMWithQHead(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="pretrained_model_name_or_path"):
        AutoModelForCausalLMWithQHead.from_pretrained(42)


def _randomise(model):
    model.reset_q_head("normal")
    with torch.no_grad():
        model.q_head.bias.normal_()


@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama])
def test_save_and_load_round_trip_bit_exactly(tmp_path, make):
    model = AutoModelForCausalLMWithQHead(make().eval())
    _randomise(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "q_head.safetensors").is_file() and (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "q_head_config.json").read_text())["vocab_size"] == model.vocab_size
    # The backbone folder is an ordinary transformers checkpoint.
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), type(model.pretrained_model))

    loaded = AutoModelForCausalLMWithQHead.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    input_ids = torch.randint(0, 500, (2, 5))
    a, b = model(input_ids, return_q=True), loaded(input_ids, return_q=True)
    assert torch.equal(a.q_values, b.q_values) and torch.equal(a.logits, b.logits)


def test_peft_save_holds_adapters_and_q_head_only(tmp_path, tiny_gpt2):
    tiny_gpt2.save_pretrained(tmp_path / "base")  # the adapter config records this path as its base model
    model = AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "base"), peft_config=_gpt2_lora())
    tmp_path = tmp_path / "adapters"
    _randomise(model)
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    adapter_keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert adapter_keys and all("lora_" in k for k in adapter_keys)

    loaded = AutoModelForCausalLMWithQHead.from_pretrained(tmp_path)
    assert loaded.is_peft_model
    input_ids = torch.randint(0, 500, (2, 5))
    a, b = model.eval()(input_ids, return_q=True), loaded.eval()(input_ids, return_q=True)
    assert torch.equal(a.q_values, b.q_values) and torch.equal(a.logits, b.logits)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("q_head") for n in trainable)


def test_loading_a_q_head_of_another_shape_fails_clearly(tmp_path, tiny_gpt2):
    AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="shape"):
        AutoModelForCausalLMWithQHead(tiny_gpt2).load_q_head(tmp_path)


def test_generate_is_the_backbones(tiny_gpt2):
    model = AutoModelForCausalLMWithQHead(tiny_gpt2.eval())
    prompt = torch.tensor([[464, 3797, 3332]])
    ours = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    theirs = tiny_gpt2.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs) and ours.shape == (1, 9)


@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama])
def test_the_kv_cache_comes_back_and_continues_the_sequence(make):
    # transformers 5.24 renamed `past_key_values` to `cache` (trl_qhead.compat bridges both): a forward must still
    # return the backbone's cache, and handing it back must give the logits of the full sequence.
    from trl_qhead.compat import cache_kwargs

    model = AutoModelForCausalLMWithQHead(make().eval(), q_head_init="normal")
    input_ids = torch.randint(0, 500, (2, 7))
    full = model(input_ids, return_q=True)
    prefix = model(input_ids[:, :5], use_cache=True)
    assert prefix.cache is not None
    rest = model(
        input_ids[:, 5:], attention_mask=torch.ones_like(input_ids), return_q=True, **cache_kwargs(prefix.cache)
    )
    torch.testing.assert_close(rest.logits, full.logits[:, 5:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rest.q_values, full.q_values[:, 5:], rtol=1e-4, atol=1e-5)
