"""Run `recipes/qhead_lora.py` with its file writes audited: every `safetensors.torch.save_file` and `torch.save`
appends `rank<TAB>path` to the file named by `$QHEAD_WRITE_LOG`, so a test can check which process wrote each
checkpoint file and how often. Test instrumentation only: `python tests/audit_writes.py <recipe arguments>`."""

import os
import runpy
import sys
from pathlib import Path

import safetensors.torch
import torch

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "qhead_lora.py"


def _audited(save):
    def wrapper(obj, path, *args, **kwargs):
        with open(os.environ["QHEAD_WRITE_LOG"], "a") as log:
            log.write(f"{os.environ.get('RANK', '0')}\t{os.path.abspath(str(path))}\n")
        return save(obj, path, *args, **kwargs)

    return wrapper


# Patched before the recipe imports trl_qhead, PEFT and transformers, so their `from ... import save_file` see it.
safetensors.torch.save_file = _audited(safetensors.torch.save_file)
torch.save = _audited(torch.save)
if __name__ == "__main__":  # imported by tests/fsdp_probe.py for the patches alone
    sys.argv = [str(RECIPE), *sys.argv[1:]]
    runpy.run_path(str(RECIPE), run_name="__main__")
