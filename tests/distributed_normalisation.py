"""One optimizer step of `QHeadTrainer` with `reward_normalization="batch"` on every process of a
`torch.distributed.run` launch (gloo, no GPUs): 2 micro-batches of 1 row per process, the 4 rows of
`tests/test_hostile_rewards.py::train_one_step`. Rank 0 writes the logged loss and the Q head's gradients (all-reduced)
to `$NORMALISATION_OUT`. Test instrumentation only."""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from recipes.offline_assets import gpt2_tokenizer_dir  # noqa: E402
from tests.test_hostile_rewards import length_bonus, train_one_step  # noqa: E402

torch.set_num_threads(1)

assert int(os.environ["WORLD_SIZE"]) == 2
tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
tokenizer.pad_token = tokenizer.eos_token
with tempfile.TemporaryDirectory() as folder:
    loss, grads, trainer = train_one_step(folder, tokenizer, "batch", 1, 2, [length_bonus])
assert trainer.accelerator.num_processes == 2, trainer.accelerator.state
if trainer.accelerator.is_main_process:
    torch.save(
        {"loss": loss, "grads": {k: v for k, v in grads.items() if k.startswith("q_head")}},
        os.environ["NORMALISATION_OUT"],
    )
# Tear the gloo group down before the interpreter exits (see tests/distributed_rollouts.py).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
