"""LoRA: only the adapters and the Q head train; a checkpoint holds exactly those and reloads bit-exactly; reference
rewards come from the same network with its adapters disabled; `merge_and_unload` gives a plain model with the Q head;
a gathered full state dict (FSDP / DeepSpeed saving) is split correctly between backbone and Q head."""

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file

from tests.recipe_assets import save_tiny_gpt2
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer

GPT2_LORA = dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, r=4, lora_alpha=8)
STEPS = 3


def _is_trainable_name(name: str) -> bool:
    return "lora_" in name or name.startswith("q_head.")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gpt2_tokenizer):
    """A tiny GPT-2 base on disk, wrapped with LoRA, trained 3 steps with reference rewards; returns the pieces."""
    root = tmp_path_factory.mktemp("lora")
    base_dir = save_tiny_gpt2(root / "base")
    model = AutoModelForCausalLMWithQHead.from_pretrained(
        str(base_dir), peft_config=LoraConfig(lora_dropout=0.0, **GPT2_LORA)
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    texts = [f"the cat number {i} sat on the red mat and then ran." for i in range(12)]
    args = QHeadConfig(
        output_dir=str(root / "out"),
        max_steps=STEPS,
        save_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=16,
        use_lm_rewards=True,
        gae_lambda=0.95,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = QHeadTrainer(
        model, args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=gpt2_tokenizer
    )
    trainer.train()
    model.eval()
    batch = gpt2_tokenizer(["the big dog ran under the tree.", "a cat sat."], return_tensors="pt", padding=True)
    checkpoint = root / "out" / f"checkpoint-{STEPS}"
    return dict(model=model, trainer=trainer, before=before, base_dir=base_dir, checkpoint=checkpoint, batch=batch)


def outputs_of(model, batch):
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], return_q=True)
    return out.logits, out.q_values


def test_only_adapters_and_q_head_train(trained):
    model, before = trained["model"], trained["before"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name in before if _is_trainable_name(name)}
    assert {"q_head.weight", "q_head.bias"} <= trainable and any("lora_B" in name for name in trainable)

    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed, "training changed nothing"
    assert all(_is_trainable_name(name) for name in changed), sorted(changed - trainable)
    assert {"q_head.weight", "q_head.bias"} <= changed
    assert all(name in changed for name in trainable if "lora_B" in name)


def test_checkpoint_holds_adapters_and_q_head_only(trained):
    checkpoint = trained["checkpoint"]
    assert not (checkpoint / "model.safetensors").exists()
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    n_adapter = sum(p.numel() for name, p in trained["model"].named_parameters() if "lora_" in name)
    assert sum(t.numel() for t in adapter.values()) == n_adapter
    assert set(load_file(checkpoint / "q_head.safetensors")) == {"weight", "bias"}
    assert json.loads((checkpoint / "q_head_config.json").read_text())["peft"] is True


def test_checkpoint_reloads_to_identical_q_values_and_logits(trained):
    reloaded = AutoModelForCausalLMWithQHead.from_pretrained(str(trained["checkpoint"])).eval()
    assert reloaded.is_peft_model
    logits, q = outputs_of(trained["model"], trained["batch"])
    logits_2, q_2 = outputs_of(reloaded, trained["batch"])
    assert q.abs().max() > 0  # the Q head was trained away from its zero init
    torch.testing.assert_close(logits_2, logits, rtol=0, atol=0)
    torch.testing.assert_close(q_2, q, rtol=0, atol=0)


def test_merge_and_unload_keeps_the_q_head(trained, tmp_path):
    peft_model = AutoModelForCausalLMWithQHead.from_pretrained(str(trained["checkpoint"])).eval()
    logits, q = outputs_of(peft_model, trained["batch"])
    q_head = peft_model.q_head

    merged = peft_model.merge_and_unload()

    assert not merged.is_peft_model and merged.q_head is q_head
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    logits_m, q_m = outputs_of(merged, trained["batch"])
    torch.testing.assert_close(logits_m, logits, rtol=1e-4, atol=1e-4)  # merged weights: another summation order
    torch.testing.assert_close(q_m, q, rtol=1e-4, atol=1e-4)

    merged.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_model.safetensors").exists()
    reloaded = AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "merged")).eval()
    assert not reloaded.is_peft_model
    logits_r, q_r = outputs_of(reloaded, trained["batch"])
    torch.testing.assert_close(logits_r, logits_m, rtol=0, atol=0)
    torch.testing.assert_close(q_r, q_m, rtol=0, atol=0)


def test_merge_and_unload_needs_adapters(tiny_gpt2):
    with pytest.raises(ValueError, match="PEFT"):
        AutoModelForCausalLMWithQHead(tiny_gpt2).merge_and_unload()


def test_save_pretrained_splits_a_gathered_state_dict(trained, tmp_path):
    """What `Trainer.save_model` hands `_save` under FSDP (FULL_STATE_DICT) or DeepSpeed: the whole model's state."""
    model = trained["model"]
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lora_key = next(name for name in state if "lora_B" in name)
    state["q_head.bias"] += 1.0  # differs from the live module: the file must come from the state dict
    state[lora_key] += 1.0

    model.save_pretrained(tmp_path / "gathered", state_dict=state)
    model.save_pretrained(tmp_path / "plain")

    q_saved = load_file(tmp_path / "gathered" / "q_head.safetensors")
    torch.testing.assert_close(q_saved["bias"], state["q_head.bias"], rtol=0, atol=0)
    torch.testing.assert_close(q_saved["weight"], model.q_head.weight.detach(), rtol=0, atol=0)
    adapter, plain = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("gathered", "plain"))
    assert adapter.keys() == plain.keys()
    saved_key = lora_key.removeprefix("pretrained_model.").replace(".default.", ".")  # PEFT's adapter-file naming
    assert [key for key in adapter if not torch.equal(adapter[key], plain[key])] == [saved_key]
    torch.testing.assert_close(adapter[saved_key], state[lora_key], rtol=0, atol=0)


def test_only_the_main_process_writes(trained, tmp_path):
    trained["model"].save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not (tmp_path / "other_rank").exists()
