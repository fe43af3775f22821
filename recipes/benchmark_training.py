"""What the Q head costs on top of plain LM training: seconds per optimizer step and peak memory, one run, one process.

Rows (the same GPT-2-small-shaped model, random init from the same seed, the same token rows in the same order, the
same batch, precision, gradient checkpointing, optimizer and `max_grad_norm`):

- `a`: TRL's `SFTTrainer` on `L_LM` alone: what a user would otherwise run (the baseline of `b`, `c` and `e`).
- `b`: `QHeadTrainer`, Monte Carlo returns (`gae_lambda=None`), zero rewards.
- `c`: `QHeadTrainer`, `gae_lambda=0.95` (needs `V(s)` at every position).
- `a-lora`: `SFTTrainer` with a LoRA config (the baseline of `d`).
- `d`: `QHeadTrainer` with the same LoRA config and `use_lm_rewards=True`: the reference log-probs come from the same
  network with its adapters disabled (no second model copy).
- `e`: the naive dense Q head (full `[B, T, |V|]` Q values, dense back-propagation through
  `tests/oracles.py::dense_qhead_loss`), kept as a reference row only.
- `lm` (optional, not in the default rows): `L_LM` alone through trl-qhead's chunked LM loss, the Q head present but
  untrained: `b` against `lm` is the Q head's own cost, free of the difference between the two LM-loss kernels.

Every row above uses the default (dense) Q head. The rows below, none in the default rows, cover the other head types
(docs/heads.md, docs/context_heads.md), on the same model, data, batch and precision:

- `lm-tied`: `lm` with the tied head (`q_head_type="tied"`) present but untrained (the baseline of `b-tied`). Its
  baseline is `a`; it holds no dense head's `|V| x H` weights, so it is the plain LM step of trl-qhead's loss.
- `b-tied`: `b` with the tied head: `L_LM + L_Q`, the policy and the head's `U` and bias training. Against `lm-tied`
  it is the tied head's own training cost (an `H x H` product per position and a `|V|` bias; the same chunked LM
  pass reads `V`), free of the kernels' difference and of any head's weights.
- `tied-only`: the tied head trained alone on the frozen policy (`QHeadConfig(q_head_only=True)`, `make demo`'s
  configuration): `L_Q` only, the policy in eval mode without gradient. Baseline `a`: instead of a Q head a user
  would fine-tune the policy itself (SFT on its best samples), one LM training step of the same policy per batch.
- `adapter`: the adapter head (`q_head_type="adapter"`): a LoRA adapter (r `--lora_r`, on every block's `c_attn`,
  `c_proj`, `c_fc`) on the policy's trunk is the Q network, with the tied output on the adapted state; `q_head_only`,
  the policy frozen (its log-probs run with the adapter off). Baseline `a`, as for `tied-only`. It trains without
  gradient checkpointing whatever `--gradient_checkpointing` says (the head refuses it: the recomputed blocks would
  run with the adapter off); compare it with rows run with `--gradient_checkpointing false`.
- `q_model`: the Q-model head (`q_head_type="q_model"`): a separate GPT-2 of half the policy's depth and width
  (`--q_model_layers`, `--q_model_embd`), random init, trained fully (trunk, embeddings and the tied output) on
  `L_Q` alone; the policy frozen. Baseline `a`, as for `tied-only`.
Context heads (`adapter`, `q_model`) always train on the Q loss alone with the policy frozen (`QHeadTrainer` sets
`q_head_only` for them); the three frozen-policy rows set `q_head_only=True`, so they train at its default learning
rates. Rewards are zero and returns Monte Carlo in every `QHeadTrainer` row.

Timing: a `TrainerCallback` takes a timestamp at `on_step_begin` and `on_step_end` of every optimizer step (forward,
backward, gradient clipping, optimizer step, zero-grad, the trainers' own metric bookkeeping; on CUDA after a
synchronize). It also takes the process's CPU time over the same span (`cpu s/step`, all threads): on a CPU shared with
other work it is the steadier figure of the two. The first `--warmup` steps of each run are dropped. Every row runs `--rounds` times, the order of the rows
reversed every other round so that slow drift of the machine does not favour one row; a row's figure is the median of
all its timed steps over all rounds.

Memory, CPU: a separate sampler process reads this process's resident set size (`/proc/<pid>/statm`) every
millisecond (a thread would compete for the GIL with the training loop and slow the rows that run more Python code). The
RSS high-water mark of the kernel never goes down, so it cannot compare rows in one process; instead, before each run
everything of the previous run is freed (`gc.collect()`, `malloc_trim`) and the run's figures are increases over the
RSS at its own start:
- `peak`: highest RSS during the run minus RSS before the model was built: what the run holds at its worst (weights,
  gradients, optimizer state, activations, logits-sized buffers).
- `step`: the largest increase within one timed step over the RSS at that step's start (the model and optimizer state
  are resident by then): the working memory of a step (gradients, activations, logits-sized buffers).
Memory, CUDA: the same two figures from `torch.cuda.max_memory_allocated` (reset at the same points).
Each figure is the median over the rounds.

Usage (the tables of docs/benchmarks.md):
    python recipes/benchmark_training.py --threads 1 --dtype fp32 --rows a,b,c,e,lm,a-lora,d --json bench_fp32.json
    python recipes/benchmark_training.py --threads 1 --dtype bf16 --rows a,b,c,e,lm,a-lora,d --json bench_bf16.json
    python recipes/benchmark_training.py --threads 1 --batch_size 1 --seq_len 1024 --rounds 1 --rows a,b,e,lm
    python recipes/benchmark_training.py --threads 1 --batch_size 1 --seq_len 2048 --rounds 1 --rows a,b,e,lm
    python recipes/benchmark_training.py --threads 1 --gradient_checkpointing false --n_layer 6 --n_embd 384 \
        --n_head 6 --seq_len 128 --steps 3 --warmup 1 --rounds 4 --rows a,lm,b,lm-tied,b-tied,tied-only,adapter,q_model
Quick smoke run: `--n_layer 2 --n_embd 64 --n_head 2 --steps 2 --warmup 1 --rounds 1`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `python recipes/benchmark_training.py` from a checkout: recipes.* importable
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this repo's package, and the test oracles (row `e`)

from tests.oracles import action_rewards, dense_qhead_loss  # noqa: E402
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer  # noqa: E402
from trl_qhead.mdp import action_mask_from_labels, episode_dones, next_tokens  # noqa: E402

ROWS = {
    "a": ("SFTTrainer, L_LM only", "a"),
    "b": ("QHeadTrainer, Monte Carlo, zero rewards", "a"),
    "c": ("QHeadTrainer, GAE lam=0.95", "a"),
    "a-lora": ("SFTTrainer + LoRA, L_LM only", "a-lora"),
    "d": ("QHeadTrainer + LoRA, reference log-prob rewards", "a-lora"),
    "e": ("naive dense Q head (reference only)", "a"),
    "lm": ("trl-qhead chunked L_LM alone, Q head untrained", "a"),
    "lm-tied": ("trl-qhead chunked L_LM alone, tied head untrained", "a"),
    "b-tied": ("QHeadTrainer, tied head, Monte Carlo, zero rewards", "lm-tied"),
    "tied-only": ("tied head alone on the frozen policy (q_head_only)", "a"),
    "adapter": ("adapter head (LoRA on the trunk), Q loss alone, no checkpointing", "a"),
    "q_model": ("q_model head (half-size GPT-2, fully trained), Q loss alone", "a"),
}
# The Q head type of each QHeadTrainer row (the rest use the default, dense).
HEAD_TYPES = {"lm-tied": "tied", "b-tied": "tied", "tied-only": "tied", "adapter": "adapter", "q_model": "q_model"}
# Rows that train the Q head alone on the frozen policy (`q_head_only=True`).
Q_HEAD_ONLY_ROWS = ("tied-only", "adapter", "q_model")
# How each row handles buffers that scale with T x |V| (what it allocates, by construction of its code path).
LOGITS_BUFFERS = {
    "a": "chunked (TRL fused LM head)",
    "a-lora": "chunked (TRL fused LM head)",
    "b": "chunked",
    "c": "chunked",
    "d": "chunked",
    "e": "dense [B,T,V] logits and Q",
    "lm": "chunked",
    "lm-tied": "chunked",
    "b-tied": "chunked",
    "tied-only": "chunked",
    "adapter": "chunked",
    "q_model": "chunked",
}


class DenseQHeadTrainer(QHeadTrainer):
    """Row `e`: the obvious implementation, full `[B, T, |V|]` Q values back-propagated densely."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        action_mask = action_mask_from_labels(inputs["labels"], attention_mask)
        actions = next_tokens(input_ids)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, return_q=True)
        dones = episode_dones(actions, action_mask, self.eos_token_id)
        loss = dense_qhead_loss(
            outputs.logits, outputs.q_values, actions, action_mask, action_rewards(inputs), dones,
            gamma=self.args.gamma, gae_lambda=self.args.gae_lambda, q_weight=self.args.q_weight,
        )  # fmt: skip
        return (loss, outputs) if return_outputs else loss


class LMOnlyTrainer(QHeadTrainer):
    """Row `lm`: `L_LM` through the same chunked path as `QHeadTrainer`, without the Q loss (the Q head gets no
    gradient, so the optimizer keeps no state for it)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        action_mask = action_mask_from_labels(inputs["labels"], attention_mask)
        outputs = model(
            input_ids=input_ids, attention_mask=attention_mask, actions=next_tokens(input_ids),
            logprob_mask=action_mask, value_chunk_size=self.args.value_chunk_size, use_cache=False,
        )  # fmt: skip
        denominator = num_items_in_batch if num_items_in_batch is not None else action_mask.sum().clamp(min=1)
        loss = -outputs.action_logprobs.sum() / denominator
        return (loss, outputs) if return_outputs else loss


# ---- measurement ------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    try:  # glibc keeps freed small blocks mapped; hand them back so the next run starts from a clean RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# Runs in its own process, so that sampling never takes this process's GIL (a sampler thread would delay the training
# loop's Python code, and more so for rows that run more of it, whenever the machine is busy).
_SAMPLER = """
import mmap, os, sys, time
pid, path, interval = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
page = os.sysconf("SC_PAGE_SIZE")
with open(path, "r+b") as f:
    peak = mmap.mmap(f.fileno(), 8)
statm = os.open(f"/proc/{pid}/statm", os.O_RDONLY)
while True:
    try:
        rss = int(os.pread(statm, 128, 0).split()[1]) * page
    except (OSError, IndexError, ValueError):
        break
    if rss == 0:  # the process has exited (a zombie reads as 0 until its parent reaps it)
        break
    if rss > int.from_bytes(peak[:8], "little"):
        peak[:8] = rss.to_bytes(8, "little")
    time.sleep(interval)
"""


class MemoryMeter:
    """Peak memory since `reset()`: RSS sampled by a separate process on CPU, `max_memory_allocated` on CUDA."""

    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device = device
        self._process = None
        if device.type == "cpu":
            self._file = tempfile.NamedTemporaryFile(
                prefix="rss-peak-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
            )
            self._file.write(b"\0" * 8)
            self._file.flush()
            self._peak = mmap.mmap(self._file.fileno(), 8)
            command = [sys.executable, "-c", _SAMPLER, str(os.getpid()), self._file.name, str(interval_s)]
            # No inherited stdout/stderr: should this process die first, a caller reading its pipes must not wait on
            # the sampler.
            self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _read(self) -> int:
        return int.from_bytes(self._peak[:8], "little")

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else _rss_bytes()

    def reset(self) -> int:
        """Start a new peak from now; returns the current level."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self.current()
        level = self.current()
        self._peak[:8] = level.to_bytes(8, "little")
        return level

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return max(self._read(), _rss_bytes())

    def close(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            self._file.close()


class StepMeter(TrainerCallback):
    """Wall time and working memory of every optimizer step; keeps the run's peak in `run_peak`."""

    def __init__(self, meter: MemoryMeter, device: torch.device):
        self.meter, self.device = meter, device
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.step_memory: list[int] = []
        self.run_peak = 0
        self._t0 = self._cpu0 = self._level = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.run_peak = max(self.run_peak, self.meter.peak())
        self._level = self.meter.reset()
        self._cpu0 = time.process_time()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)
        self.cpu_times.append(time.process_time() - self._cpu0)
        peak = self.meter.peak()
        self.run_peak = max(self.run_peak, peak)
        self.step_memory.append(peak - self._level)


# ---- one run ------------------------------------------------------------------------------------------------------------


def _model_config(args) -> GPT2Config:
    return GPT2Config(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_positions=max(1024, args.seq_len),
        vocab_size=50257,
    )


def _lora_config(args) -> LoraConfig:
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,  # GPT-2's projections are Conv1D
        task_type="CAUSAL_LM",
    )


def _q_model(args) -> GPT2LMHeadModel:
    """Row `q_model`'s Q model: a GPT-2 of half the policy's depth and width by default, random init (its own seed)."""
    torch.manual_seed(args.seed + 1)
    config = GPT2Config(
        n_layer=args.q_model_layers or max(1, args.n_layer // 2),
        n_embd=args.q_model_embd or args.n_embd // 2,
        n_head=args.n_head,
        n_positions=max(1024, args.seq_len),
        vocab_size=50257,
    )
    return GPT2LMHeadModel(config)


def _q_head_model(row: str, args, backbone: GPT2LMHeadModel) -> AutoModelForCausalLMWithQHead:
    """The policy with the row's Q head (see the module docstring)."""
    head_type = HEAD_TYPES.get(row)
    if head_type is None:
        return AutoModelForCausalLMWithQHead(backbone)
    if head_type == "adapter":  # the Q network is the trunk with this adapter on
        return AutoModelForCausalLMWithQHead(get_peft_model(backbone, _lora_config(args)), q_head_type="adapter")
    if head_type == "q_model":
        return AutoModelForCausalLMWithQHead(
            backbone, q_head_type="q_model", q_head_options={"q_model": _q_model(args)}
        )
    return AutoModelForCausalLMWithQHead(backbone, q_head_type=head_type)


def _common_args(args, device: torch.device, output_dir: str, n_steps: int) -> dict:
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": n_steps,
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "optim": "adamw_torch_fused",  # transformers' default
        "max_grad_norm": 1.0,
        "gradient_checkpointing": args.gradient_checkpointing,
        "bf16": args.dtype == "bf16",
        "fp16": False,
        "use_cpu": device.type == "cpu",
        "report_to": [],
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 10**6,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": args.seed,
        "data_seed": args.seed,
        "max_length": args.seq_len,
    }


def run_row(row: str, args, dataset: Dataset, tokenizer, device: torch.device, meter: MemoryMeter) -> dict:
    _free_memory(device)
    start_level = meter.reset()
    n_steps = args.warmup + args.steps
    lora = row in ("a-lora", "d")
    with tempfile.TemporaryDirectory() as output_dir:
        common = _common_args(args, device, output_dir, n_steps)
        if row == "adapter":  # the adapter head cannot train with activation checkpointing (module docstring)
            common["gradient_checkpointing"] = False
        torch.manual_seed(args.seed)
        backbone = GPT2LMHeadModel(_model_config(args))  # the same random init for every row
        step_meter = StepMeter(meter, device)
        if row in ("a", "a-lora"):
            trainer_cls, model = SFTTrainer, backbone
            config = SFTConfig(**common, packing=False, dataset_num_proc=None)
        else:
            trainer_cls = {"e": DenseQHeadTrainer, "lm": LMOnlyTrainer, "lm-tied": LMOnlyTrainer}.get(
                row, QHeadTrainer
            )
            model = _q_head_model(row, args, backbone)
            config = QHeadConfig(
                **common,
                gamma=0.99,
                q_weight=1.0,
                gae_lambda=0.95 if row == "c" else None,
                use_lm_rewards=row == "d",
                q_head_only=row in Q_HEAD_ONLY_ROWS,
            )
        trainer = trainer_cls(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=_lora_config(args) if lora else None,
            callbacks=[step_meter],
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
        run_peak = max(step_meter.run_peak, meter.peak())
        del trainer, model, backbone, config
    _free_memory(device)
    timed = args.warmup
    return {
        "row": row,
        "step_times_s": step_meter.times[timed:],
        "step_cpu_s": step_meter.cpu_times[timed:],
        "start_bytes": start_level,
        "peak_bytes": run_peak - start_level,
        "step_bytes": max(step_meter.step_memory[timed:]),
        "trainable_params": trainable,
    }


# ---- table --------------------------------------------------------------------------------------------------------------


def summarise(runs: list[dict], rows: list[str]) -> dict[str, dict]:
    summary = {}
    for row in rows:
        mine = [r for r in runs if r["row"] == row]
        summary[row] = {
            "description": ROWS[row][0],
            "baseline": ROWS[row][1],
            "seconds_per_step": statistics.median(t for r in mine for t in r["step_times_s"]),
            "cpu_seconds_per_step": statistics.median(t for r in mine for t in r["step_cpu_s"]),
            "peak_bytes": statistics.median(r["peak_bytes"] for r in mine),
            "step_bytes": statistics.median(r["step_bytes"] for r in mine),
            "trainable_params": mine[0]["trainable_params"],
            "logits_buffers": LOGITS_BUFFERS[row],
            "n_steps_timed": sum(len(r["step_times_s"]) for r in mine),
        }
    for entry in summary.values():
        base = summary.get(entry["baseline"])
        for key, ratio in (
            ("seconds_per_step", "time_ratio"),
            ("cpu_seconds_per_step", "cpu_ratio"),
            ("peak_bytes", "peak_ratio"),
            ("step_bytes", "step_ratio"),
        ):
            # None ("-" in the table) without a baseline row, or where the baseline measured 0: on CPU a tiny
            # model's step may leave the sampled RSS where it was
            entry[ratio] = entry[key] / base[key] if base and base[key] else None
    return summary


def markdown_table(summary: dict[str, dict], show_cpu: bool = True) -> str:
    def ratio(x):
        return "-" if x is None else f"{x:.2f}x"

    head = "| row | what | s/step | time vs base |"
    rule = "| --- | --- | ---: | ---: |"
    if show_cpu:
        head += " cpu s/step | cpu vs base |"
        rule += " ---: | ---: |"
    head += " peak MiB | peak vs base | step MiB | step vs base | base | T x V buffers |"
    rule += " ---: | ---: | ---: | ---: | --- | --- |"
    lines = [head, rule]
    for row, e in summary.items():
        line = f"| {row} | {e['description']} | {e['seconds_per_step']:.2f} | {ratio(e['time_ratio'])} |"
        if show_cpu:
            line += f" {e['cpu_seconds_per_step']:.2f} | {ratio(e['cpu_ratio'])} |"
        line += (
            f" {e['peak_bytes'] / 2**20:.0f} | {ratio(e['peak_ratio'])} | {e['step_bytes'] / 2**20:.0f} "
            f"| {ratio(e['step_ratio'])} | {e['baseline']} | {e['logits_buffers']} |"
        )
        lines.append(line)
    return "\n".join(lines)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 is autocast (weights fp32).")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto.")
    parser.add_argument("--rows", default="a,b,c,e,a-lora,d", help=f"comma-separated, among {list(ROWS)}.")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run.")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps at the start of each run.")
    parser.add_argument("--rounds", type=int, default=2, help="runs per row; the row order reverses every round.")
    parser.add_argument("--gradient_checkpointing", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--lora_r", type=int, default=16, help="rows a-lora, d and adapter.")
    parser.add_argument("--q_model_layers", type=int, default=None, help="row q_model; default: half of --n_layer.")
    parser.add_argument("--q_model_embd", type=int, default=None, help="row q_model; default: half of --n_embd.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--json", default=None, help="write all figures and per-step times here.")
    args = parser.parse_args(argv)

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose among {list(ROWS)}")
    for row in rows:  # a ratio needs its baseline in the same run
        if ROWS[row][1] not in rows:
            parser.error(f"row {row} is compared with row {ROWS[row][1]}: add it to --rows")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    warnings.filterwarnings("ignore")

    from recipes.offline_assets import gpt2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
    tokenizer.pad_token = tokenizer.eos_token
    n_rows = args.batch_size * (args.warmup + args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    # Random tokens without EOS: every row is a full-length, unpadded training sequence for every trainer.
    ids = torch.randint(0, tokenizer.eos_token_id, (n_rows, args.seq_len), generator=gen)
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})

    load_before = os.getloadavg()
    meter = MemoryMeter(device)
    runs = []
    try:
        for round_index in range(args.rounds):
            order = rows if round_index % 2 == 0 else rows[::-1]
            for row in order:
                result = run_row(row, args, dataset, tokenizer, device, meter)
                result["round"] = round_index
                runs.append(result)
                print(
                    f"round {round_index} row {row}: {statistics.median(result['step_times_s']):.3f} s/step, "
                    f"peak {result['peak_bytes'] / 2**20:.0f} MiB, step {result['step_bytes'] / 2**20:.0f} MiB",
                    flush=True,
                )
    finally:
        meter.close()

    summary = summarise(runs, rows)
    setup = (
        f"GPT-2-small shape (n_layer={args.n_layer}, n_embd={args.n_embd}, |V|=50257), random init; batch "
        f"{args.batch_size} x {args.seq_len} tokens; {args.dtype}"
        f"{' autocast' if args.dtype == 'bf16' else ''}; gradient checkpointing {args.gradient_checkpointing}; "
        f"AdamW (fused); {args.steps} timed steps after {args.warmup} warm-up, {args.rounds} rounds; "
        f"{device.type}: {machine_description(device)}; load average {load_before[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    table = markdown_table(summary, show_cpu=device.type == "cpu")
    print("\n" + setup + "\n\n" + table)
    result = {"setup": setup, "args": vars(args), "summary": summary, "runs": runs, "table": table}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
