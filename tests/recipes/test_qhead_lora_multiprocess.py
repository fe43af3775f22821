"""`accelerate launch --num_processes 2 --cpu recipes/qhead_lora.py` on this machine (gloo): it trains to completion
on two processes, each checkpoint file is written once (by rank 0), and the per-step losses (the loss, its logged
`loss_lm` and `loss_q` parts, the gradient norm) equal those of one process with the same global batch.

Tolerance: relative 1e-5 on `loss` and `grad_norm`. Both runs see the same rows in the same order (accelerate hands
global batch k to the processes as consecutive halves, and the seeded sampler permutes identically) and there is no
dropout, so they differ only in floating-point summation order: each process sums its own half of the token losses and
the gradients are all-reduced instead of summed in one pass, which moves fp32 sums of a few hundred terms by a few ulps
(measured: at most 1.2e-7 relative over the 8 steps, Adam updates included). 1e-5 leaves two orders of magnitude for
other CPUs and BLAS builds and stays far below what a real fault produces: rows are not packed, so the processes hold
different token counts, and normalising each process by its own count instead of the global one moves the loss by ~15%
(tried); dropping the `num_processes` factor halves the gradients.
"""

import json
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.recipe_assets import recipe_args, run, run_in_process, save_tiny_gpt2, write_corpus

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))  # the console script users run

STEPS, SAVE_EVERY, GLOBAL_BATCH = 8, 4, 4


def _final(path: str) -> Path:
    """Where a file lands: `save_pretrained` writes into a staging folder `.<name>.tmp-*` renamed to `<name>`."""
    return Path(re.sub(r"/\.([^/]+)\.tmp-[^/]+/", r"/\1/", path))


def _losses(output_dir: Path) -> dict[int, tuple[float, float, float, float]]:
    history = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    keys = ("loss", "grad_norm", "loss_lm", "loss_q")
    return {entry["step"]: tuple(entry[key] for key in keys) for entry in history if "loss" in entry}


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    model_dir, corpus = save_tiny_gpt2(tmp_path / "model"), write_corpus(tmp_path / "corpus.txt")
    # No packing: rows of different lengths give the processes different token counts, so a loss normalised per
    # process (instead of by the global count) would not match.
    common = dict(steps=STEPS, save_interval=SAVE_EVERY, gae_lambda=0.95, use_lm_rewards="true", seed=0, packing=None)

    two = tmp_path / "two"
    write_log = tmp_path / "writes.tsv"
    launch = [ACCELERATE, "launch", "--num_processes", "2", "--cpu"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    args = recipe_args(model_dir, corpus, two, per_device_train_batch_size=GLOBAL_BATCH // 2, **common)
    run([*launch, "tests/audit_writes.py", *args], timeout=240, QHEAD_WRITE_LOG=str(write_log))

    one = tmp_path / "one"
    args = recipe_args(model_dir, corpus, one, per_device_train_batch_size=GLOBAL_BATCH, **common)
    run_in_process(args)

    # Two processes really ran: each saved its own RNG state in every checkpoint.
    for step in (SAVE_EVERY, STEPS):
        assert (two / f"checkpoint-{step}" / "rng_state_0.pth").is_file()
        assert (two / f"checkpoint-{step}" / "rng_state_1.pth").is_file()

    # Each model and optimizer file was written exactly once, by rank 0.
    writes = [line.split("\t") for line in write_log.read_text().splitlines()]
    counts = Counter(_final(path).relative_to(two).as_posix() for _, path in writes)
    for folder in [f"checkpoint-{SAVE_EVERY}/", f"checkpoint-{STEPS}/", ""]:
        for name in ("adapter_model.safetensors", "q_head.safetensors"):
            assert counts[folder + name] == 1, (folder + name, counts)
    for folder in (f"checkpoint-{SAVE_EVERY}/", f"checkpoint-{STEPS}/"):
        assert counts[folder + "optimizer.pt"] == counts[folder + "scheduler.pt"] == 1
    writers = {rank for rank, path in writes if "rng_state" not in path}
    assert writers == {"0"}, writes

    losses_two, losses_one = _losses(two), _losses(one)
    assert sorted(losses_one) == sorted(losses_two) == list(range(1, STEPS + 1))
    for step in losses_one:
        # The logged loss parts are token-weighted over processes too, not means of per-process means.
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-5), step
    # The losses move from step to step, so the comparison is not between constants.
    assert len({round(loss[0], 3) for loss in losses_one.values()}) == STEPS


FSDP_CONFIG = "recipes/configs/accelerate/fsdp.yaml"
FSDP_STEPS = 4


@pytest.mark.slow
def test_fsdp2_on_two_processes_matches_one_process_and_resumes(tmp_path):
    """accelerate's FSDP2 path (`fsdp.yaml`: `fully_shard` per transformer block, then the root) on 2 gloo processes:
    per-step losses equal 1 process (rel 1e-5, the reasoning of the module docstring: FSDP's reduce-scatter averages
    gradients as DDP's all-reduce does); the Q head is sharded by vocabulary rows; each checkpoint file is written once,
    by rank 0, consolidated (adapters + q_head.safetensors + the gathered optimizer, no second full-model copy); a run
    resumed from checkpoint-2 logs the same steps 3 and 4 as the uninterrupted one.

    accelerate 1.15 would silently run DDP here (no GPUs): `TRL_QHEAD_CPU_FSDP=1` keeps FSDP (recipes/launch.py)."""
    model_dir, corpus = save_tiny_gpt2(tmp_path / "model"), write_corpus(tmp_path / "corpus.txt")
    common = dict(steps=FSDP_STEPS, save_interval=2, gae_lambda=0.95, use_lm_rewards="true", seed=0, packing=None)
    launch = [ACCELERATE, "launch", "--config_file", FSDP_CONFIG, "--num_processes", "2"]
    launch += ["--mixed_precision", "no", "--main_process_port", "0"]
    env = dict(TRL_QHEAD_CPU_FSDP="1")

    two, write_log, probe_log = tmp_path / "two", tmp_path / "writes.tsv", tmp_path / "probe.tsv"
    args = recipe_args(model_dir, corpus, two, per_device_train_batch_size=GLOBAL_BATCH // 2, **common)
    run(
        [*launch, "tests/fsdp_probe.py", *args],
        timeout=240,
        QHEAD_WRITE_LOG=str(write_log),
        QHEAD_PROBE_LOG=str(probe_log),
        **env,
    )
    # A second, resumed run writes elsewhere: copy checkpoint-2 there first.
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    args = recipe_args(model_dir, corpus, resumed, per_device_train_batch_size=GLOBAL_BATCH // 2, **common)
    run(
        [*launch, "recipes/qhead_lora.py", *args, "--resume_from_checkpoint", str(resumed / "checkpoint-2")],
        timeout=240,
        **env,
    )

    one = tmp_path / "one"
    run_in_process(recipe_args(model_dir, corpus, one, per_device_train_batch_size=GLOBAL_BATCH, **common))

    # The Q head is a DTensor sharded on its vocabulary rows (dim 0) across the two processes.
    probes = {line.split("\t")[0]: line.split("\t")[1:] for line in probe_log.read_text().splitlines()}
    assert sorted(probes) == ["0", "1"], probes
    assert all(kind == "DTensor" and "Shard(dim=0)" in placements for kind, placements, *_ in probes.values()), probes
    assert sum(int(rows) for _, _, rows, _ in probes.values()) == 50257

    writes = [line.split("\t") for line in write_log.read_text().splitlines()]
    counts = Counter(_final(path).relative_to(two).as_posix() for _, path in writes)
    for folder in ["checkpoint-2/", f"checkpoint-{FSDP_STEPS}/", ""]:
        for name in ("adapter_model.safetensors", "q_head.safetensors"):
            assert counts[folder + name] == 1, (folder + name, counts)
    for folder in ("checkpoint-2/", f"checkpoint-{FSDP_STEPS}/"):
        assert counts[folder + "optimizer.bin"] == counts[folder + "scheduler.pt"] == 1, counts
        assert not (two / folder / "pytorch_model_fsdp.bin").exists()
    assert {rank for rank, path in writes if "rng_state" not in path} == {"0"}, writes

    def losses(output_dir):
        history = json.loads((output_dir / f"checkpoint-{FSDP_STEPS}" / "trainer_state.json").read_text())
        keys = ("loss", "grad_norm", "loss_lm", "loss_q")
        return {e["step"]: tuple(e[k] for k in keys) for e in history["log_history"] if "loss" in e}

    losses_two, losses_one, losses_resumed = losses(two), losses(one), losses(resumed)
    assert sorted(losses_one) == sorted(losses_two) == sorted(losses_resumed) == list(range(1, FSDP_STEPS + 1))
    for step in losses_one:
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-5), step
        assert losses_resumed[step] == pytest.approx(losses_two[step], rel=1e-5), step
    assert len({round(loss[0], 3) for loss in losses_one.values()}) == FSDP_STEPS


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_two_processes_matches_one_process_and_resumes(tmp_path, stage):
    """DeepSpeed ZeRO-2 / ZeRO-3 (`deepspeed_zero{2,3}.yaml`, DeepSpeed's CPU accelerator on gloo; recipes/launch.py
    sets it up): per-step losses and `grad_norm` equal 1 process at rel 1e-5 on every step (the reasoning of the module
    docstring; measured: at most 1.3e-7); the adapters and the Q head are written once, by rank 0 (gathered from the
    partitions under ZeRO-3); a run resumed from checkpoint-2 (DeepSpeed's own `global_step2/`) logs the same steps 3
    and 4. Skipped where deepspeed is not installed, except under `make test-deepspeed`, which installs it and sets
    `TRL_QHEAD_REQUIRE_DEEPSPEED=1`.

    Steps 2-4 matter under ZeRO-3: when the recipe built a `from_config` model on the meta device to look at the
    module types, transformers ran it inside `deepspeed.zero.Init` (ZeRO-3 turns `is_deepspeed_zero3_enabled()` on),
    which initialises real weights from the global RNG on rank 0 after the seed was set. The LoRA `A` matrices then
    started from other random values than in the 1-process run; `B` is zero at the start, so step 1 agreed (grad_norm
    1.6e-7 apart) and the drift showed from step 2 (`loss_lm` 2.2e-4, `grad_norm` 1.6e-3 relative by step 4)."""
    _import_deepspeed()
    model_dir, corpus = save_tiny_gpt2(tmp_path / "model"), write_corpus(tmp_path / "corpus.txt")
    common = dict(steps=FSDP_STEPS, save_interval=2, gae_lambda=0.95, use_lm_rewards="true", seed=0, packing=None)
    config = tmp_path / "zero.yaml"
    config.write_text(
        Path(f"recipes/configs/accelerate/deepspeed_zero{stage}.yaml")
        .read_text()
        .replace("mixed_precision: bf16", "mixed_precision: 'no'")
    )  # bf16 on CPU is another test
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2"]
    launch += ["--main_process_port", str(_free_port())]

    two, write_log, probe_log = tmp_path / "two", tmp_path / "writes.tsv", tmp_path / "probe.tsv"
    args = recipe_args(model_dir, corpus, two, per_device_train_batch_size=GLOBAL_BATCH // 2, **common)
    run(
        [*launch, "tests/fsdp_probe.py", *args],
        timeout=300,
        QHEAD_WRITE_LOG=str(write_log),
        QHEAD_PROBE_LOG=str(probe_log),
    )
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    args = recipe_args(model_dir, corpus, resumed, per_device_train_batch_size=GLOBAL_BATCH // 2, **common)
    launch[-1] = str(_free_port())
    run(
        [*launch, "recipes/qhead_lora.py", *args, "--resume_from_checkpoint", str(resumed / "checkpoint-2")],
        timeout=300,
    )
    one = tmp_path / "one"
    run_in_process(recipe_args(model_dir, corpus, one, per_device_train_batch_size=GLOBAL_BATCH, **common))

    probes = {line.split("\t")[0]: line.split("\t")[1:] for line in probe_log.read_text().splitlines()}
    assert sorted(probes) == ["0", "1"], probes
    numel = [int(p[-1]) for p in probes.values()]
    # ZeRO-2 replicates parameters (it shards gradients and optimizer states); ZeRO-3 partitions them too.
    assert numel == ([50257 * 32] * 2 if stage == 2 else [50257 * 32 // 2] * 2), probes

    writes = [line.split("\t") for line in write_log.read_text().splitlines()]
    counts = Counter(_final(path).relative_to(two).as_posix() for _, path in writes)
    for folder in ["checkpoint-2/", f"checkpoint-{FSDP_STEPS}/", ""]:
        for name in ("adapter_model.safetensors", "q_head.safetensors"):
            assert counts[folder + name] == 1, (folder + name, counts)
    # DeepSpeed's own states (global_step*/) are one file per rank by design: its partitions, for resuming.
    assert {rank for rank, path in writes if "rng_state" not in path and "/global_step" not in path} == {"0"}, writes

    def losses(output_dir):
        history = json.loads((output_dir / f"checkpoint-{FSDP_STEPS}" / "trainer_state.json").read_text())
        keys = ("loss", "loss_lm", "loss_q", "grad_norm")
        return {e["step"]: tuple(e[k] for k in keys) for e in history["log_history"] if "loss" in e}

    losses_two, losses_one, losses_resumed = losses(two), losses(one), losses(resumed)
    assert sorted(losses_one) == sorted(losses_two) == sorted(losses_resumed) == list(range(1, FSDP_STEPS + 1))
    for step in losses_one:
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-5), (step, losses_two, losses_one)
        assert losses_resumed[step] == pytest.approx(losses_two[step], rel=1e-5), step
    assert len({round(loss[0], 3) for loss in losses_one.values()}) == FSDP_STEPS


def _import_deepspeed():
    """deepspeed, or a skip where it is not installed (it is not in constraints.txt); a failure instead under
    `make test-deepspeed` (`TRL_QHEAD_REQUIRE_DEEPSPEED=1`), whose tests must run."""
    if os.environ.get("TRL_QHEAD_REQUIRE_DEEPSPEED") == "1":
        import deepspeed

        return deepspeed
    return pytest.importorskip("deepspeed")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
