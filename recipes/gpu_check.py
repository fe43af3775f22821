# Copyright the trl-qhead authors. Licensed under the Apache License, Version 2.0.
"""Checks that only a CUDA machine can run: the library's CUDA paths, bf16, 4-bit QLoRA training and tilted
generation, both benchmarks with `--device cuda`, and the test suite with a GPU visible.

    python recipes/gpu_check.py                      # everything; a summary table and gpu_check.json
    python recipes/gpu_check.py --only kernel,qlora   # some checks (names below)
    python recipes/gpu_check.py --skip suite          # all but the test suite

Checks (each runs even when an earlier one fails; nothing is downloaded, the models are tiny random GPT-2s):

- `kernel`: the chunked LM-head kernel on CUDA, fp32 and under bf16 autocast (its `addmm(out_dtype=float32)` branch,
  CUDA only), against log-softmax of full logits: `log pi(a|s)` and `V(s)` and the gradients of the LM head and the
  Q head.
- `bf16`: `QHeadTrainer` with `bf16=True` for 3 steps on CUDA: finite losses, and step 1 within 2% of fp32.
- `qlora`: a 4-bit (bitsandbytes NF4) base with LoRA trains, generates with `QTiltLogitsProcessor` (equal to a slow
  reference loop of full forwards), trains again, and its adapters + Q head reload bit-exactly on a fresh 4-bit base.
- `benchmark_generation`, `benchmark_training`: the two benchmark scripts with `--device cuda` (short settings; their
  JSON next to this script's).
- `suite`: `pytest -q -m "not slow" tests` with the GPU visible.

Exit status: 0 when every check that ran passed, 1 when one failed, 2 when there is no CUDA device (nothing ran).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

NO_CUDA_EXIT = 2
CHECKS = ("kernel", "bf16", "qlora", "benchmark_generation", "benchmark_training", "suite")


def tiny_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    settings = dict(n_layer=2, n_embd=64, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(GPT2Config(**{**settings, **overrides}))


def tokenizer():
    from transformers import AutoTokenizer

    from recipes.offline_assets import gpt2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
    tok.pad_token = tok.eos_token
    return tok


TEXTS = [f"a small dog number {i} ran under the big tree and then sat on the mat." for i in range(16)]


def check_kernel(out_dir: Path) -> dict:
    from trl_qhead import AutoModelForCausalLMWithQHead

    figures = {}
    for dtype in (None, torch.bfloat16):
        model = AutoModelForCausalLMWithQHead(tiny_gpt2(), q_head_init="normal").cuda()
        ids = torch.randint(0, model.vocab_size, (4, 24), device="cuda")
        mask = torch.ones_like(ids, dtype=torch.bool)
        actions = torch.roll(ids, -1, dims=1)
        results = []
        for chunked in (True, False):
            model.zero_grad()
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                if chunked:
                    out = model(ids, actions=actions, logprob_mask=mask, value_mask=mask, value_chunk_size=16)
                    logprobs, values = out.action_logprobs, out.state_values
                else:
                    out = model(ids, return_q=True)
                    log_pi = out.logits.float().log_softmax(-1)
                    logprobs = log_pi.gather(-1, actions[..., None])[..., 0]
                    values = (log_pi.exp() * out.q_values.float()).sum(-1).detach()
                (
                    logprobs.sum() + (out.action_q if chunked else out.q_values.gather(-1, actions[..., None])).sum()
                ).backward()
            lm_grad = model.pretrained_model.get_output_embeddings().weight.grad.clone()
            results.append(
                (logprobs.detach().float(), values.float(), lm_grad.float(), model.q_head.weight.grad.clone())
            )
        (lp, v, g, gq), (lp_ref, v_ref, g_ref, gq_ref) = results
        tol = dict(rtol=1e-4, atol=1e-4) if dtype is None else dict(rtol=2e-2, atol=2e-2)
        for name, a, b in (
            ("logprobs", lp, lp_ref),
            ("values", v, v_ref),
            ("lm_grad", g, g_ref),
            ("q_grad", gq, gq_ref),
        ):
            torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name, dtype=dtype: f"{name} ({dtype}): {m}")
        figures[str(dtype or torch.float32)] = {"max_abs_logprob_diff": (lp - lp_ref).abs().max().item()}
    return figures


def _trainer(model, tok, out_dir: Path, **config):
    from datasets import Dataset

    from trl_qhead import QHeadConfig, QHeadTrainer

    args = QHeadConfig(
        output_dir=str(out_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_length=32,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        use_lm_rewards=True,
        seed=0,
        **config,
    )
    return QHeadTrainer(model, args, train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tok)


def check_bf16(out_dir: Path) -> dict:
    from trl_qhead import AutoModelForCausalLMWithQHead

    tok, losses = tokenizer(), {}
    for bf16 in (False, True):
        model = AutoModelForCausalLMWithQHead(tiny_gpt2(), q_head_init="normal")
        trainer = _trainer(model, tok, out_dir / f"bf16_{bf16}", bf16=bf16)
        assert trainer.args.device.type == "cuda", trainer.args.device
        trainer.train()
        losses[bf16] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(torch.isfinite(torch.tensor(losses[True]))), losses
    assert abs(losses[True][0] - losses[False][0]) <= 0.02 * abs(losses[False][0]), losses
    return {"fp32_losses": losses[False], "bf16_losses": losses[True]}


def check_qlora(out_dir: Path) -> dict:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from trl_qhead import AutoModelForCausalLMWithQHead, QTiltLogitsProcessor

    base = out_dir / "base"
    tiny_gpt2().save_pretrained(base)
    lora = LoraConfig(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, r=4, lora_alpha=8)
    q4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLMWithQHead.from_pretrained(
        str(base), quantization_config=q4, peft_config=lora, device_map={"": 0}
    )
    assert model.is_loaded_in_4bit and model.device.type == "cuda"
    tok = tokenizer()
    trainer = _trainer(model, tok, out_dir / "qlora", bf16=True)
    first = trainer.train().training_loss

    model.eval()
    prompt = tok(["the cat"], return_tensors="pt").to("cuda")
    with torch.no_grad():
        ids = prompt["input_ids"]
        for _ in range(4):  # the slow reference: greedy on logits + Q / beta, a full forward per token
            out = model(ids, torch.ones_like(ids), return_q=True)
            ids = torch.cat(
                [ids, (out.logits[:, -1].float() + out.q_values[:, -1] / 1e-3).argmax(-1, keepdim=True)], -1
            )
        with QTiltLogitsProcessor(model, beta=1e-3) as processor:
            generated = model.generate(
                **prompt,
                max_new_tokens=4,
                do_sample=False,
                logits_processor=[processor],
                pad_token_id=tok.eos_token_id,
            )
    assert torch.equal(generated, ids), (generated, ids)
    second = trainer.train().training_loss
    assert torch.isfinite(torch.tensor([first, second])).all()

    model.save_pretrained(out_dir / "ckpt")
    reloaded = AutoModelForCausalLMWithQHead.from_pretrained(
        str(out_dir / "ckpt"), quantization_config=q4, device_map={"": 0}
    ).eval()
    with torch.no_grad():
        a, b = model(ids, return_q=True), reloaded(ids, return_q=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    torch.testing.assert_close(b.q_values, a.q_values, rtol=0, atol=0)
    return {"loss_first_train": first, "loss_second_train": second, "tilted_tokens": generated[0].tolist()}


def _run(command: list[str], timeout: float) -> dict:
    began = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    tail = (result.stdout + result.stderr)[-3000:]
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{tail}")
    return {"seconds": round(time.perf_counter() - began, 1), "output_tail": tail[-1500:]}


def check_benchmark_generation(out_dir: Path) -> dict:
    json_path = out_dir / "benchmark_generation.json"
    command = [sys.executable, "recipes/benchmark_generation.py", "--device", "cuda", "--batch", "16", "--rounds", "4"]
    figures = _run([*command, "--json", str(json_path)], timeout=900)
    return {**figures, "json": str(json_path)}


def check_benchmark_training(out_dir: Path) -> dict:
    json_path = out_dir / "benchmark_training.json"
    command = [sys.executable, "recipes/benchmark_training.py", "--device", "cuda", "--rounds", "1", "--steps", "3"]
    figures = _run([*command, "--json", str(json_path)], timeout=900)
    return {**figures, "json": str(json_path)}


def check_suite(out_dir: Path) -> dict:
    return _run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", "tests"], timeout=1800
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help=f"comma-separated checks among {list(CHECKS)}")
    parser.add_argument("--skip", default="", help="comma-separated checks to leave out")
    parser.add_argument("--json", default="gpu_check.json", help="where to write the results")
    args = parser.parse_args(argv)
    chosen = [c for c in (args.only.split(",") if args.only else CHECKS) if c and c not in args.skip.split(",")]
    unknown = sorted(set(chosen) - set(CHECKS))
    if unknown:
        parser.error(f"unknown checks {unknown}; choose among {list(CHECKS)}")
    if not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): "
            f"nothing was checked. Run this on a machine with an NVIDIA GPU. Exit status {NO_CUDA_EXIT}.",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT

    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": {}}
    functions = {name: globals()[f"check_{name}"] for name in CHECKS}
    with tempfile.TemporaryDirectory() as scratch:
        for name in chosen:
            out_dir = Path(scratch) / name
            out_dir.mkdir()
            began = time.perf_counter()
            try:
                figures, status = functions[name](out_dir), "pass"
            except Exception as error:  # noqa: BLE001 (every check runs; the failure is reported)
                figures, status = (
                    {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()},
                    "FAIL",
                )
            seconds = time.perf_counter() - began
            report["checks"][name] = {"status": status, "seconds": round(seconds, 1), **figures}
            print(f"{name:<22} {status:<5} {seconds:7.1f} s", flush=True)
            if status == "FAIL":
                print(figures["trace"], file=sys.stderr)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    failed = [name for name, check in report["checks"].items() if check["status"] != "pass"]
    print(f"{len(chosen) - len(failed)}/{len(chosen)} checks passed on {report['device']}; details in {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
