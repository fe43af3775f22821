"""The completions table of TRL's `GRPOTrainer` (`log_completions`), for the samples reward functions score.

TRL keeps the prompts, completions and rewards of its latest generation batch, with the columns reward functions add
through their `log_extra(column, values)` keyword, and at every log prints a sample with `rich`, writes the table to
`output_dir/completions/completions_<step>.parquet` and logs it to wandb / trackio (`GRPOTrainer.log`). `CompletionLog`
does the same for `QHeadTrainer` (`QHeadConfig.log_completions`): its rows are the samples of the latest optimizer step
that the reward functions scored (gathered from every process), with one column per reward function and one per
`log_extra` column.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

COMPLETIONS_FOLDER = "completions"


class CompletionLog:
    """The latest `maxlen` scored samples, as rows `{"prompt", "completion", <reward name>..., <extra column>...}`.

    Args:
        maxlen: rows kept (TRL keeps one generation batch; `QHeadTrainer` one optimizer step's rows).
    """

    def __init__(self, maxlen: int | None = None):
        self.rows: deque[dict[str, Any]] = deque(maxlen=maxlen)

    def add(self, prompts: list, completions: list, rewards: dict[str, list], extra: dict[str, list]) -> None:
        """Append one row per sample; `rewards` and `extra` hold one list per column, aligned with `prompts`."""
        for b, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            row = {"prompt": prompt, "completion": completion}
            row.update({name: values[b] for name, values in rewards.items()})
            row.update({name: values[b] for name, values in extra.items()})
            self.rows.append(row)

    def columns(self, exclude: tuple[str, ...] = ()) -> dict[str, list]:
        """`{column: values}` over the kept rows (`None` where a row lacks the column), in first-seen order."""
        names = list(dict.fromkeys(name for row in self.rows for name in row if name not in exclude))
        return {name: [row.get(name) for row in self.rows] for name in names}

    def write(
        self,
        step: int,
        output_dir: str,
        reward_names: list[str],
        report_to: list[str] | None = None,
        num_to_print: int | None = None,
    ) -> None:
        """What `GRPOTrainer.log` does with its table (main process only): print a sample with `rich` when installed,
        write `output_dir/completions/completions_<step:05d>.parquet`, and log it to wandb / trackio when they are in
        `report_to`. Nothing without rows."""
        if not self.rows:
            return
        from datasets import Dataset
        from transformers.utils import is_rich_available

        columns = self.columns()
        rewards = {name: columns.pop(name) for name in reward_names if name in columns}
        prompts, completions = columns.pop("prompt"), columns.pop("completion")
        if is_rich_available():
            from trl.trainer.utils import print_prompt_completions_sample

            print_prompt_completions_sample(prompts, completions, rewards, None, step, num_to_print, extra=columns)
        table = Dataset.from_dict(
            {"step": [step] * len(prompts), "prompt": prompts, "completion": completions, **rewards, **columns}
        )
        folder = os.path.join(output_dir, COMPLETIONS_FOLDER)
        os.makedirs(folder, exist_ok=True)
        table.to_parquet(os.path.join(folder, f"completions_{step:05d}.parquet"))
        backends = _logging_backends(report_to or [])
        if backends:
            frame = table.to_pandas()
            for backend in backends:
                backend.log({"completions": backend.Table(dataframe=frame)})


def _logging_backends(report_to: list[str]) -> list:
    """The wandb / trackio modules among `report_to` (transformers' integrations: installed by whoever reports to
    them, and imported by name for that reason), as `GRPOTrainer.log` picks them; wandb only with a run."""
    import importlib

    backends = [importlib.import_module(name) for name in ("wandb", "trackio") if name in report_to]
    return [b for b in backends if b.__name__ != "wandb" or b.run is not None]
