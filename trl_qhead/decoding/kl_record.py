"""`SequenceKLRecord`: the exact KL a logits processor adds, summed per sequence over one `generate` call.

`generate` calls its logits processors once per step with every row's ids so far, and beam search reorders the rows
between steps; a sequence's record must follow it, and stop at its stop token (EOS or pad: `generate` pads a finished
row, and the padding steps are not the model's choices). Both `QTiltLogitsProcessor` and
`TokenExclusionLogitsProcessor` keep their KL this way, through their common base `KLRecordingProcessor`.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class SequenceKLRecord:
    """Per-row KL of the steps up to and including each row's stop token.

    Args:
        stop_ids: the ids after which a row is finished (its later steps add nothing).
    """

    def __init__(self, stop_ids: list[int]):
        self.stop_ids = torch.tensor([int(t) for t in stop_ids], dtype=torch.long)
        self.reset()

    def reset(self) -> None:
        """Forget the running record: the next step starts a new generation."""
        self._prev_ids: torch.Tensor | None = None
        self.kl: torch.Tensor | None = None  # [rows] nats, fp32
        self.finished: torch.Tensor | None = None  # [rows] bool

    def step(self, input_ids: torch.LongTensor) -> torch.LongTensor | None:
        """Match this step's rows (`[rows, T]`) to the last step's and carry their records over.

        Returns each row's parent row of the last step (`[rows]`), or `None` when `input_ids` do not continue the last
        step's sequences: a new generation, whose record starts at zero.
        """
        prev, parent = self._prev_ids, None
        if prev is not None and input_ids.shape[1] == prev.shape[1] + 1:
            prefix = input_ids[:, :-1]
            if prefix.shape == prev.shape and torch.equal(prefix, prev):
                parent = torch.arange(input_ids.shape[0], device=input_ids.device)
            else:
                same = (prefix[:, None, :] == prev[None, :, :]).all(-1)  # [rows, previous rows]
                if bool(same.any(-1).all()):
                    parent = same.int().argmax(-1)
        rows, device = input_ids.shape[0], input_ids.device
        if parent is None:
            self.kl = torch.zeros(rows, dtype=torch.float32, device=device)
            self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        else:
            stop = self.stop_ids.to(device)
            self.kl = self.kl.to(device)[parent]
            self.finished = self.finished.to(device)[parent] | torch.isin(input_ids[:, -1], stop)
        self._prev_ids = input_ids.clone()
        return parent

    def add(self, step_kl: torch.Tensor) -> None:
        """Add this step's `[rows]` KL to the rows that are not finished."""
        counted = ~self.finished.to(step_kl.device)
        self.kl = self.kl.to(step_kl.device) + torch.where(counted, step_kl, torch.zeros_like(step_kl))


class KLRecordingProcessor(LogitsProcessor):
    """Base of the logits processors that keep the exact KL they add per sequence in a `SequenceKLRecord`.

    A subclass sets `self._record` in its `__init__` and calls `self._record.step(input_ids)` then
    `self._record.add(step_kl)` in `__call__`; `reset` and `kl` are the same for every such processor.
    """

    _record: SequenceKLRecord

    def reset(self) -> None:
        """Forget the running record: the next call starts a new generation."""
        self._record.reset()

    @property
    def kl(self) -> torch.Tensor | None:
        """`[rows]` the exact KL (nats) this processor added to each sequence of the last generation, or None before
        any step."""
        return None if self._record.kl is None else self._record.kl.clone()
