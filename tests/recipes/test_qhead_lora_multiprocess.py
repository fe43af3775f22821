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
import re
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
