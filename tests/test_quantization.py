"""4-bit (bitsandbytes) on CPU: the LM head and the Q head stay unquantised fp32, QLoRA trains adapters and the Q head
only, train -> generate with the tilt -> train works (the bitsandbytes CPU repacking pitfall), an adapter checkpoint
reloads onto a 4-bit base, and a missing bitsandbytes or a quantised model without adapters fail clearly."""

import sys

import bitsandbytes as bnb  # the `quant` extra, which `make test` installs
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tests.recipe_assets import recipe_args, run_in_process, save_tiny_gpt2, write_corpus
from trl_qhead import AutoModelForCausalLMWithQHead, DenseQHead, QHeadConfig, QHeadTrainer, QTiltLogitsProcessor

LORA = dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, r=4, lora_alpha=8, lora_dropout=0.0)
# A user-chosen skip list that does not name the LM head: transformers would then quantise it.
SKIP_NOTHING_USEFUL = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["not_a_module"])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    # bitsandbytes packs 4-bit weights in blocks: hidden sizes of 64 are safe.
    return save_tiny_gpt2(tmp_path_factory.mktemp("q4") / "base", n_embd=64)


def _linear4bit_names(model) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def test_4bit_keeps_the_lm_head_and_q_head_unquantised(base_dir):
    plain = AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=SKIP_NOTHING_USEFUL)
    assert "lm_head" in _linear4bit_names(plain)  # what the wrapper protects against

    model = AutoModelForCausalLMWithQHead.from_pretrained(
        str(base_dir), quantization_config=SKIP_NOTHING_USEFUL, peft_config=LoraConfig(**LORA)
    )
    base = model.base_model
    assert model.is_loaded_in_4bit
    assert _linear4bit_names(base) and not any(name.endswith("lm_head") for name in _linear4bit_names(base))
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32
    assert base.lm_head.weight is base.transformer.wte.weight  # still tied
    assert type(model.q_head) is DenseQHead and model.q_head.weight.dtype == torch.float32  # not a Linear4bit
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("q_head.") for name in trainable)
    assert {"q_head.weight", "q_head.bias"} <= trainable
    # The CPU fix of trl_qhead.quantization is on every 4-bit layer.
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)


def _tilted_greedy(model, input_ids, beta: float, steps: int) -> torch.Tensor:
    """Greedy decoding from `logits + Q / beta`, one full forward per token (a slow, obvious reference loop)."""
    ids = input_ids
    for _ in range(steps):
        out = model(ids, torch.ones_like(ids), return_q=True)
        scores = out.logits[:, -1].float() + out.q_values[:, -1] / beta
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=-1)
    return ids


def test_4bit_train_generate_train_on_cpu(base_dir, gpt2_tokenizer, tmp_path):
    model = AutoModelForCausalLMWithQHead.from_pretrained(
        str(base_dir), quantization_config=BitsAndBytesConfig(load_in_4bit=True), peft_config=LoraConfig(**LORA)
    )
    texts = [f"a small dog number {i} ran under the big tree." for i in range(8)]
    args = QHeadConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=16,
        use_lm_rewards=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = QHeadTrainer(
        model, args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=gpt2_tokenizer
    )
    trainer.train()

    # Inference passes: transformers' generate, then the Q-tilted policy (no grad, eval mode: what used to repack).
    model.eval()
    prompt = gpt2_tokenizer(["the cat"], return_tensors="pt")
    with torch.no_grad():
        plain = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=gpt2_tokenizer.eos_token_id)
        tilted = _tilted_greedy(model, prompt["input_ids"], beta=1e-3, steps=4)
        with QTiltLogitsProcessor(model, beta=1e-3) as processor:
            generated = model.generate(
                **prompt, max_new_tokens=4, do_sample=False, logits_processor=[processor], pad_token_id=0
            )
    assert torch.equal(generated, tilted)  # the processor inside generate matches the slow reference loop
    assert plain.shape == tilted.shape == (1, prompt["input_ids"].shape[1] + 4)
    assert not torch.equal(plain, tilted)  # a small beta lets the trained Q head choose the tokens

    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters() if "lora_B" in name)

    # The adapters + Q head checkpoint reloads onto a freshly quantised base with identical outputs.
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForCausalLMWithQHead.from_pretrained(
        str(tmp_path / "ckpt"), quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    ).eval()
    assert reloaded.is_loaded_in_4bit and reloaded.is_peft_model
    with torch.no_grad():
        a, b = model(tilted, return_q=True), reloaded(tilted, return_q=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    torch.testing.assert_close(b.q_values, a.q_values, rtol=0, atol=0)


def test_quantised_model_without_adapters_is_rejected(base_dir, gpt2_tokenizer, tmp_path):
    model = AutoModelForCausalLMWithQHead.from_pretrained(
        str(base_dir), quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    )
    args = QHeadConfig(output_dir=str(tmp_path), max_steps=1, report_to=[])
    with pytest.raises(ValueError, match="peft_config"):
        QHeadTrainer(
            model, args, train_dataset=Dataset.from_dict({"text": ["a b c"]}), processing_class=gpt2_tokenizer
        )


def test_without_bitsandbytes_4bit_fails_clearly(base_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ImportError, match=r"trl-qhead\[quant\]"):
        AutoModelForCausalLMWithQHead.from_pretrained(
            str(base_dir), quantization_config=BitsAndBytesConfig(load_in_4bit=True)
        )
    # The same message from the recipe's --load_in_4bit.
    args = recipe_args(base_dir, write_corpus(tmp_path / "corpus.txt"), tmp_path / "out", steps=1, load_in_4bit="true")
    with pytest.raises(ImportError, match=r"trl-qhead\[quant\]"):
        run_in_process(args)
