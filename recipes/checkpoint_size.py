# Copyright the trl-qhead authors. Licensed under the Apache License, Version 2.0.
"""Size on disk of a LoRA + Q head checkpoint against the full model, at GPT-2 small's real shapes.

The weights are random (no model hub here) but the shapes, hence the file sizes, are GPT-2's: 12 layers, 768 hidden,
50257 tokens, LoRA r=16 on `c_attn`, `c_proj`, `c_fc` as `recipes/configs/qhead_lora.yaml` sets it. Prints a table:

    python recipes/checkpoint_size.py [--r 16] [--n_layer 12]

(`--n_layer 1` is a quick smoke run; the table in docs/training_at_scale.md uses the default, GPT-2 small's 12 blocks.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import GPT2Config, GPT2LMHeadModel

from trl_qhead import AutoModelForCausalLMWithQHead


def folder_size(folder: Path, names: tuple[str, ...]) -> int:
    return sum(os.path.getsize(folder / name) for name in names if (folder / name).is_file())


def main(r: int, n_layer: int = 12) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = GPT2LMHeadModel(GPT2Config(n_layer=n_layer))
        n_full = sum(p.numel() for p in base.parameters())  # before PEFT injects its layers into `base`
        base.save_pretrained(tmp / "full")  # what a full fine-tune would save (fp32, tied embeddings stored once)
        lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
        model = AutoModelForCausalLMWithQHead.from_pretrained(base, peft_config=lora)
        model.save_pretrained(tmp / "lora")

        full = folder_size(tmp / "full", ("model.safetensors",))
        adapters = folder_size(tmp / "lora", ("adapter_model.safetensors",))
        q_head = folder_size(tmp / "lora", ("q_head.safetensors",))
        n_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        n_q = sum(p.numel() for p in model.q_head.parameters())
        tied = AutoModelForCausalLMWithQHead(model.pretrained_model, q_head_type="tied")  # U (H x H) and b only
        tied.save_pretrained(tmp / "tied")
        tied_q_head = folder_size(tmp / "tied", ("q_head.safetensors",))
        n_tied = sum(p.numel() for p in tied.q_head.parameters())

    mb = 1024**2
    print(f"GPT-2 small shapes ({n_layer} blocks), LoRA r={r} on c_attn/c_proj/c_fc, fp32 files\n")
    print("| file | parameters | size (MiB) | vs full model |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| full model (`model.safetensors`) | {n_full:,} | {full / mb:.1f} | 1.000 |")
    print(
        f"| LoRA adapters (`adapter_model.safetensors`) | {n_adapter:,} | {adapters / mb:.1f} | {adapters / full:.3f} |"
    )
    print(f"| Q head (`q_head.safetensors`) | {n_q:,} | {q_head / mb:.1f} | {q_head / full:.3f} |")
    total = adapters + q_head
    print(f"| checkpoint = adapters + Q head | {n_adapter + n_q:,} | {total / mb:.1f} | {total / full:.3f} |")
    print(f"| tied Q head (`q_head_type='tied'`) | {n_tied:,} | {tied_q_head / mb:.1f} | {tied_q_head / full:.3f} |")
    total = adapters + tied_q_head
    print(f"| checkpoint = adapters + tied Q head | {n_adapter + n_tied:,} | {total / mb:.1f} | {total / full:.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--n_layer", type=int, default=12, help="transformer blocks (GPT-2 small has 12)")
    args = parser.parse_args()
    main(args.r, args.n_layer)
