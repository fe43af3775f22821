"""`generate_and_score` on every process of a `torch.distributed.run` launch (gloo, `no GPUs): the
tiny GPT-2 and prompts of `tests/recipes/test_distributed_rollouts.py`, per-prompt seeds. Rank 0 writes the dataset
to `$ROLLOUT_OUT`; every call of the reward function appends `rank<TAB>prompt<TAB>completion` lines to
`$ROLLOUT_SCORED`. Test instrumentation only."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402

from tests.rollout_assets import PROMPTS, ROLLOUT_KWARGS, make_model_and_tokenizer, rows_of  # noqa: E402
from trl_qhead import generate_and_score  # noqa: E402

torch.set_num_threads(1)


def logged_length_reward(prompts, completions, **kwargs):
    with open(os.environ["ROLLOUT_SCORED"], "a") as log:
        for prompt, completion in zip(prompts, completions, strict=True):
            log.write(f"{os.environ.get('RANK', '0')}\t{json.dumps(prompt)}\t{json.dumps(completion)}\n")
    return [float(len(completion)) for completion in completions]


logged_length_reward.__name__ = "length_reward"  # the reward column's name, as in the 1-process run


state = PartialState(cpu=True)  # the process group (gloo); generate_and_score reads this state
assert state.num_processes == int(os.environ["WORLD_SIZE"]) > 1, state
model, tokenizer = make_model_and_tokenizer()
data = generate_and_score(model, tokenizer, PROMPTS, logged_length_reward, **ROLLOUT_KWARGS)
rows = rows_of(data)
# Every process holds the whole dataset.
gathered = [None] * state.num_processes
torch.distributed.all_gather_object(gathered, rows)
assert all(other == rows for other in gathered), "the processes returned different datasets"
if state.is_main_process:
    Path(os.environ["ROLLOUT_OUT"]).write_text(json.dumps(rows))
# Tear the gloo group down before the interpreter exits: left to exit-time destructors, a rank can abort ("terminate
# called without an active exception", SIGABRT), which failed this test once under load.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
