"""`generate_and_score` with per-prompt seeds: the dataset does not depend on `batch_size`, and 2 processes (each
sampling and scoring its share of the prompts) return exactly the dataset of 1 process, every sample scored once."""

import json
import socket
import sys
from collections import Counter

import pytest
import torch

from tests.recipe_assets import run
from tests.rollout_assets import PROMPTS, ROLLOUT_KWARGS, make_model_and_tokenizer, rows_of
from trl_qhead import generate_and_score


def length_reward(prompts, completions, **kwargs):
    return [float(len(completion)) for completion in completions]


def test_seeded_generate_and_score_does_not_depend_on_the_batch_size():
    model, tokenizer = make_model_and_tokenizer()
    kwargs = {**ROLLOUT_KWARGS, "batch_size": 1}
    one_by_one = rows_of(generate_and_score(model, tokenizer, PROMPTS, length_reward, **kwargs))
    batched = rows_of(generate_and_score(model, tokenizer, PROMPTS, length_reward, **{**kwargs, "batch_size": 4}))
    assert one_by_one == batched
    # Sampled, not constant: the seeds give different completions across prompts and within a prompt.
    assert len({row["completion"] for row in one_by_one}) > len(PROMPTS)
    # The caller's RNG stream is left as it was.
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    generate_and_score(model, tokenizer, PROMPTS, None, **kwargs)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_two_processes_return_the_one_process_dataset(tmp_path):
    out, scored = tmp_path / "rows.json", tmp_path / "scored.tsv"
    with socket.socket() as sock:  # torchrun's static rendezvous needs a real port on both ranks
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    run(
        [*launch, "tests/distributed_rollouts.py"],
        timeout=120,
        ROLLOUT_OUT=str(out),
        ROLLOUT_SCORED=str(scored),
        OMP_NUM_THREADS="1",
    )
    two = json.loads(out.read_text())

    model, tokenizer = make_model_and_tokenizer()
    one = rows_of(generate_and_score(model, tokenizer, PROMPTS, length_reward, **ROLLOUT_KWARGS))
    assert two == one  # identical: ids, completions, rewards, `done`, extra columns, order

    # Each sample was scored once, by the process that sampled it: rank 0 the first 3 prompts, rank 1 the last 2.
    lines = [line.split("\t") for line in scored.read_text().splitlines()]
    n = ROLLOUT_KWARGS["num_generations"]
    assert len(lines) == len(one) == len(PROMPTS) * n
    assert Counter(rank for rank, _, _ in lines) == {"0": 3 * n, "1": 2 * n}
    by_rank = {rank: sorted((json.loads(p), json.loads(c)) for r, p, c in lines if r == rank) for rank in "01"}
    samples = [(row["prompt"], row["completion"]) for row in one]
    assert by_rank == {"0": sorted(samples[: 3 * n]), "1": sorted(samples[3 * n :])}
