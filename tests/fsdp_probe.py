"""`tests/audit_writes.py` plus a record of how each process holds the Q head: at every save, each rank appends
`rank<TAB>type<TAB>placements<TAB>local rows<TAB>local numel` of `q_head.weight` to `$QHEAD_PROBE_LOG`. Test instrumentation only:
`python tests/fsdp_probe.py <recipe arguments>`."""

import os
import runpy
import sys

import audit_writes  # noqa: F401  (its file-write patches, before anything imports safetensors' save_file)

import trl_qhead.trainer as trainer_module

_save_model = trainer_module.QHeadTrainer.save_model


def _probed_save_model(self, *args, **kwargs):
    weight = self.accelerator.unwrap_model(self.model).q_head.weight
    placements = getattr(weight, "placements", None)
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    local = getattr(weight, "ds_tensor", local)  # DeepSpeed ZeRO-3: this process's flat partition
    with open(os.environ["QHEAD_PROBE_LOG"], "a") as log:
        log.write(
            f"{os.environ.get('RANK', '0')}\t{type(weight).__name__}\t{placements}\t{local.shape[0]}\t{local.numel()}\n"
        )
    return _save_model(self, *args, **kwargs)


trainer_module.QHeadTrainer.save_model = _probed_save_model
sys.argv = [str(audit_writes.RECIPE), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
