"""bitsandbytes' import-time kernel notice, held back until 4-bit loading is asked for.

Who imports bitsandbytes: not trl-qhead (`trl_qhead.quantization` imports it only when a 4/8-bit model is loaded),
but transformers, which imports PEFT with `TrainingArguments` (transformers/trainer_utils.py,
`from peft import PeftModel`), and PEFT, which imports bitsandbytes whenever it is installed (peft/helpers.py). So every
program that imports transformers' `Trainer` with PEFT and bitsandbytes installed imports bitsandbytes, 4-bit or not;
no import order on our side avoids it.

On a CPU with AVX512-BF16 that import logs a warning, "Failed to load CPU gemm_4bit_forward from kernels-community"
(bitsandbytes/backends/cpu/ops.py: it tries the `kernels` package's Hub kernel, absent or offline), through Python's
last-resort handler: one line on stderr at every `import trl_qhead`. The line only matters to 4-bit inference on a CPU,
so `hold()` (run by `trl_qhead/__init__.py` before anything imports transformers) keeps that one record back, and
`release()` (run by `trl_qhead.quantization` when a 4-bit model is loaded) logs it then. Every other bitsandbytes
message passes through untouched.
"""

from __future__ import annotations

import logging

LOGGER_NAME = "bitsandbytes.backends.cpu.ops"
NOTICE_PREFIX = "Failed to load CPU gemm_4bit_forward"


class HeldNotice(logging.Filter):
    """Drops the kernel notice from its logger and keeps it in `records`."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(NOTICE_PREFIX):
            self.records.append(record)
            return False
        return True


_HELD = HeldNotice()


def hold() -> None:
    """Hold the notice back (idempotent). Effective only when bitsandbytes has not been imported yet."""
    logger = logging.getLogger(LOGGER_NAME)
    if _HELD not in logger.filters:
        logger.addFilter(_HELD)


def release() -> None:
    """Stop holding, and log the held notice (if any) now: 4-bit loading is what it is about."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.removeFilter(_HELD)
    records, _HELD.records = _HELD.records, []
    for record in records:
        logger.handle(record)


hold()  # at import: `trl_qhead/__init__.py` imports this module before anything that imports transformers
