"""Generation cost of Q-tilted decoding, as ratios to plain `generate` measured in the same run.

A GPT-2-small-shaped model (12 layers, 768 wide, 12 heads, 50257 tokens; random init, fp32) with a random Q head
(nonzero bias) generates greedily from a batch of prompts, with a fixed number of new tokens (EOS disabled), KV cache
on. Rows:

- `plain`: `model.generate(...)`.
- `processor`: with `QTiltLogitsProcessor(model, beta)` (exact KL recorded: the default).
- `processor, no KL`: `record_kl=False`.
- `processor, top_k=50`: the tilt restricted to the base model's top 50 tokens (Q gathered for those only).
- `folded`: `fold_tilt(model, beta)`, an ordinary GPT-2 with the tilt in its LM head.

Runs are interleaved (one of each per round, alternating the order) so that load on the machine hits all rows alike;
after a warm-up round the table shows the median time per token and the median of the per-round ratios to `plain`,
for wall-clock time and for this process's CPU time (`time.process_time`). On a shared machine pass `--threads 1`
and read the CPU columns: OpenMP threads competing with other processes for cores slow every row tenfold, and
wall-clock time swings with the neighbours' load while one thread's CPU time does not. It also checks that the processor and the folded model generate the same
tokens.

    python recipes/benchmark_generation.py                    # CPU, batch 4, 32-token prompts, 64 new tokens
    python recipes/benchmark_generation.py --device cuda --batch 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trl_qhead import AutoModelForCausalLMWithQHead, QTiltLogitsProcessor, fold_tilt  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (one run of every row each)")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default="benchmark_generation.json", help="where to write the results")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(device: str, seed: int) -> AutoModelForCausalLMWithQHead:
    torch.manual_seed(seed)
    backbone = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)).eval()
    backbone.generation_config.eos_token_id = None  # every run generates exactly `new_tokens` tokens
    backbone.generation_config.pad_token_id = 0
    model = AutoModelForCausalLMWithQHead(backbone, q_head_init="normal").to(device)
    with torch.no_grad():
        model.q_head.bias.normal_(0.0, 1.0)
    return model


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.device, args.seed)
    folded = fold_tilt(model, args.beta)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, 50257, (args.batch, args.prompt_length), generator=generator).to(args.device)
    attention_mask = torch.ones_like(input_ids)
    gen_kwargs = {"max_new_tokens": args.new_tokens, "do_sample": False, "attention_mask": attention_mask}

    processors = {
        "processor": QTiltLogitsProcessor(model, args.beta),
        "processor, no KL": QTiltLogitsProcessor(model, args.beta, record_kl=False),
        "processor, top_k=50": QTiltLogitsProcessor(model, args.beta, top_k=50),
    }
    runs = {"plain": lambda: model.generate(input_ids, **gen_kwargs)}
    for name, processor in processors.items():
        runs[name] = lambda p=processor: model.generate(input_ids, logits_processor=[p], **gen_kwargs)
    runs["folded"] = lambda: folded.generate(input_ids, **gen_kwargs)

    outputs = {name: run() for name, run in runs.items()}  # warm-up round
    same_tokens = torch.equal(outputs["processor"], outputs["folded"])
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    cuda = args.device.startswith("cuda")
    for round_ in range(args.rounds):
        # every other round runs the rows in reverse, so that no row always follows the same neighbour
        for name, run in list(runs.items())[:: 1 if round_ % 2 == 0 else -1]:
            if cuda:
                torch.cuda.synchronize()
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            run()
            if cuda:
                torch.cuda.synchronize()
            wall[name].append((time.perf_counter() - start_wall) / args.new_tokens)
            cpu[name].append((time.process_time() - start_cpu) / args.new_tokens)

    def summary(times: dict[str, list[float]]) -> dict[str, dict]:
        # Ratios are taken within each round (its rows ran seconds apart, under the same load), then the median over
        # rounds: steadier than a ratio of medians on a shared machine.
        return {
            name: {
                "s_per_token": statistics.median(t),
                "ratio": statistics.median(a / b for a, b in zip(t, times["plain"], strict=True)),
                "all": t,
            }
            for name, t in times.items()
        }

    results = {
        "setup": {
            "model": "GPT-2-small shapes (12 x 768, 12 heads, |V| = 50257), random init, fp32",
            "device": args.device,
            "threads": torch.get_num_threads(),
            "batch": args.batch,
            "prompt_length": args.prompt_length,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "beta": args.beta,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        },
        "processor_equals_folded_greedy": same_tokens,
        "wall": summary(wall),
        "cpu": summary(cpu),
    }
    print(
        f"GPT-2-small shapes, {args.device}, fp32, batch {args.batch}, prompt {args.prompt_length}, "
        f"{args.new_tokens} new tokens, {torch.get_num_threads()} thread(s); medians over {args.rounds} interleaved "
        "rounds; ratio = median of the per-round ratios to plain"
    )
    print()
    print("| generation | wall s / token | wall ratio | CPU s / token | CPU ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in runs:
        w, c = results["wall"][name], results["cpu"][name]
        print(f"| {name} | {w['s_per_token']:.4f} | {w['ratio']:.3f}x | {c['s_per_token']:.4f} | {c['ratio']:.3f}x |")
    print()
    print(f"processor and folded model generate the same tokens: {same_tokens}")
    Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
