"""Generation cost of Q-tilted decoding, as ratios to plain `generate` measured in the same run.

A GPT-2-small-shaped model (12 layers, 768 wide, 12 heads, 50257 tokens; random init, fp32) with a random Q head
(nonzero bias) generates greedily from a batch of prompts, with a fixed number of new tokens (EOS disabled), KV cache
on. Rows:

- `plain`: `model.generate(...)`.
- `processor`: with `QTiltLogitsProcessor(model, beta)` (exact KL recorded: the default).
- `processor, no KL`: `record_kl=False`.
- `processor, top_k=50`: the tilt restricted to the base model's top 50 tokens (Q gathered for those only).
- `folded`: `fold_tilt(model, beta)`, an ordinary GPT-2 with the tilt in its LM head.

`--q_head_type tied` measures a tied Q head (`Q = W_lm (U h) + b`, random U and bias) instead; `both` adds the tied
rows (`tied: ...`) to the dense ones, on the same backbone in the same run. With a tied head, `processor, no KL` tilts
inside the LM head (an H x H product per token). `--n_layer`, `--n_embd`, `--n_head` change the model's shape.
`--context_heads` adds the context-reading heads (docs/context_heads.md), tied output, random U and bias:
`adapter: processor` (a LoRA adapter, r 16 on every block's projections, on a copy of the backbone: the whole trunk
runs again on each new token, KV-cached) and `q_model: processor` (a separate GPT-2 of `--q_model_layers` x
`--q_model_embd`, default half the policy's depth and width, KV-cached).

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
    parser.add_argument("--q_head_type", choices=("dense", "tied", "both"), default="dense")
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--context_heads", action="store_true", help="add the adapter and q_model heads' rows")
    parser.add_argument("--q_model_layers", type=int, default=None, help="default: half the policy's layers")
    parser.add_argument("--q_model_embd", type=int, default=None, help="default: half the policy's width")
    return parser.parse_args(argv)


def build_model(device: str, seed: int, n_layer=12, n_embd=768, n_head=12, backbone=None, q_head_type="dense"):
    torch.manual_seed(seed)
    if backbone is None:
        config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=50257)
        backbone = GPT2LMHeadModel(config).eval()
        backbone.generation_config.eos_token_id = None  # every run generates exactly `new_tokens` tokens
        backbone.generation_config.pad_token_id = 0
    model = AutoModelForCausalLMWithQHead(backbone, q_head_init="normal", q_head_type=q_head_type).to(device)
    with torch.no_grad():
        model.q_head.bias.normal_(0.0, 1.0)
        if q_head_type == "tied":  # W_lm U then has entries of W_lm's size, as the dense head's normal init
            model.q_head.u.normal_(0.0, model.q_head.hidden_size**-0.5)
    return model


def build_context_models(model, args) -> dict:
    """The adapter head on a copy of `model`'s backbone and the q_model head on it, random tied outputs."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed + 1)
    lora = LoraConfig(r=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    adapted = get_peft_model(copy.deepcopy(model.pretrained_model), lora)
    q_config = GPT2Config(
        n_layer=args.q_model_layers or max(1, args.n_layer // 2),
        n_embd=args.q_model_embd or args.n_embd // 2,
        n_head=args.n_head,
        vocab_size=50257,
    )
    models = {
        "adapter": AutoModelForCausalLMWithQHead(adapted, q_head_type="adapter"),
        "q_model": AutoModelForCausalLMWithQHead(
            model.pretrained_model, q_head_type="q_model", q_head_options={"q_model": GPT2LMHeadModel(q_config)}
        ),
    }
    for head in models.values():
        with torch.no_grad():
            head.q_head.bias.normal_(0.0, 1.0)
            head.q_head.output.u.normal_(0.0, head.q_head.hidden_size**-0.5)
        head.to(args.device).eval()
    return models


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
    first = "tied" if args.q_head_type == "tied" else "dense"
    model = build_model(args.device, args.seed, q_head_type=first, **shape)
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
    if args.q_head_type == "both":
        tied = build_model(args.device, args.seed, backbone=model.pretrained_model, q_head_type="tied")
        tied_folded = fold_tilt(tied, args.beta)
        for name, processor in {
            "tied: processor": QTiltLogitsProcessor(tied, args.beta),
            "tied: processor, no KL": QTiltLogitsProcessor(tied, args.beta, record_kl=False),
            "tied: processor, top_k=50": QTiltLogitsProcessor(tied, args.beta, top_k=50),
        }.items():
            processors[name] = processor
            runs[name] = lambda p=processor: model.generate(input_ids, logits_processor=[p], **gen_kwargs)
        runs["tied: folded"] = lambda: tied_folded.generate(input_ids, **gen_kwargs)

    if args.context_heads:
        for kind, context_model in build_context_models(model, args).items():
            processor = QTiltLogitsProcessor(context_model, args.beta)
            processors[f"{kind}: processor"] = processor
            runs[f"{kind}: processor"] = lambda m=context_model, p=processor: m.generate(
                input_ids, logits_processor=[p], **gen_kwargs
            )

    outputs = {name: run() for name, run in runs.items()}  # warm-up round
    same_tokens = torch.equal(outputs["processor"], outputs["folded"])
    if args.q_head_type == "both":
        same_tokens = same_tokens and torch.equal(outputs["tied: processor"], outputs["tied: folded"])
        same_tokens = same_tokens and torch.equal(outputs["tied: processor"], outputs["tied: processor, no KL"])
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
            "model": f"GPT-2 ({args.n_layer} x {args.n_embd}, {args.n_head} heads, |V| = 50257), random init, fp32",
            "q_head_type": args.q_head_type,
            "context_heads": args.context_heads,
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
        f"GPT-2 {args.n_layer} x {args.n_embd}, Q head {args.q_head_type}, {args.device}, fp32, batch {args.batch}, prompt {args.prompt_length}, "
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
