"""Several training processes (for `recipes/qhead_lora.py`) on a machine without GPUs, under `accelerate launch`.

accelerate 1.x has two pitfalls there, both silent:

- `accelerate launch --cpu --num_processes N script.py` starts ONE process unless an MPI hostfile is configured
  (huggingface/accelerate#2741): the script trains alone while the user believes N processes share the batch.
- `accelerate launch --multi_gpu --num_processes N` (or `torchrun`) starts N processes, but without GPUs and without
  `--use_cpu` / `ACCELERATE_USE_CPU` each one sets itself up as a separate single-process run: N independent trainings
  writing the same output folder.

A third one it refuses: `accelerate launch --num_processes N` with neither `--cpu` nor `--multi_gpu` starts ONE process
on a machine without GPUs (accelerate enables multi-GPU only when it finds several GPUs); see
`check_gpu_launch_without_gpus`.

`ensure_cpu_processes()`, called first thing by a training script, turns the first two into the intended N-process
gloo run: in the first case it replaces the lone process by `torch.distributed.run` with the process count read from
the `accelerate launch` command line that started it, in the second it sets `ACCELERATE_USE_CPU` so that
`TrainingArguments` initialises the gloo process group. The third raises a `RuntimeError` that says to add `--cpu`.
"""

from __future__ import annotations

import os
import socket
import sys

_MPI_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def requested_num_processes(launcher_argv: list[str]) -> int | None:
    """The number of processes an `accelerate launch` command line asks for (flags, then its config file).

    Args:
        launcher_argv: the launcher's argv, e.g. `["python", ".../accelerate", "launch", "--num_processes", "2", ...]`.

    Returns:
        The count, or `None` when `launcher_argv` is not an `accelerate launch` command.
    """
    names = [os.path.basename(arg) for arg in launcher_argv]
    # `accelerate launch ...`, `accelerate-launch ...` or `python -m accelerate.commands.launch ...`
    starts = [
        i + 1
        for i, name in enumerate(names[:4])
        if name in ("accelerate-launch", "accelerate.commands.launch")
        or (name == "launch" and any(n.startswith("accelerate") for n in names[:i]))
    ]
    if not starts:
        return None
    rest = launcher_argv[starts[0] :]
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(rest)
    if args.num_processes is not None:
        return int(args.num_processes)
    from accelerate.commands.config import default_config_file, load_config_from_file

    config_file = args.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
    if config_file is None:
        return 1
    return int(getattr(load_config_from_file(config_file), "num_processes", 1) or 1)


def ensure_cpu_processes() -> None:
    """Make a multi-process `accelerate launch` on a machine without GPUs really run its processes on gloo.

    Call it before parsing `TrainingArguments`. A no-op for single-process runs, GPU runs and MPI launches. See the
    module docstring for the two cases it handles. Raises a `RuntimeError` with the working command when it cannot
    tell how many processes were asked for.
    """
    if any(name in os.environ for name in _MPI_SIZE_VARIABLES):
        return  # mpirun set the world up
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        import torch

        if not torch.cuda.is_available() and _flag("ACCELERATE_USE_DEEPSPEED"):
            start_deepspeed_on_cpu()
        elif not torch.cuda.is_available() and not _flag("ACCELERATE_USE_CPU"):
            os.environ["ACCELERATE_USE_CPU"] = "true"  # else each process would train alone (module docstring)
        if not torch.cuda.is_available():
            check_sharding_on_cpu()
        return
    # accelerate's simple launcher sets MASTER_ADDR only when asked for more than one process.
    if "MASTER_ADDR" not in os.environ or "LOCAL_RANK" in os.environ:
        return
    if not _flag("ACCELERATE_USE_CPU"):
        check_gpu_launch_without_gpus()
        return
    try:
        import psutil

        num_processes = requested_num_processes(psutil.Process(os.getppid()).cmdline())
    except (Exception, SystemExit) as error:  # any failure here must end in the clear message below
        num_processes, reason = None, f" ({type(error).__name__}: {error})"
    else:
        reason = ""
    if num_processes is None:
        raise RuntimeError(
            "`accelerate launch --cpu` with several processes started a single one (accelerate needs an MPI hostfile "
            f"for multi-CPU runs) and the process count could not be read from its command line{reason}. Launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N script.py ...` instead."
        )
    if num_processes <= 1:
        return
    port = int(os.environ.get("MASTER_PORT", "29500"))
    if port == 0:  # `--main_process_port 0` means "any free port", which the simple launcher leaves to us
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={num_processes}",
        f"--master_addr={os.environ['MASTER_ADDR']}",
        f"--master_port={port}",
        "--no-python",
        # The exact command that started this process (interpreter options and `-m` included), once per rank.
        sys.executable,
        *sys.orig_argv[1:],
    ]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def check_gpu_launch_without_gpus() -> None:
    """`accelerate launch --num_processes N script.py` (no `--cpu`, no `--multi_gpu`) on a machine without GPUs.

    accelerate's launcher turns a multi-process request into a multi-GPU run only when it finds several GPUs
    (accelerate/commands/launch.py, `_validate_launch_command`); without any it starts the script once, through its
    simple launcher, which still sets `MASTER_ADDR` for the N processes asked for but `ACCELERATE_USE_CPU=False` and no
    `LOCAL_RANK` (accelerate/utils/launch.py, `prepare_simple_launcher_cmd_env`): one process trains alone
    (`PartialState().num_processes == 1`) while the user believes N share the batch. Raises a `RuntimeError` with the
    fix when the launching command asked for more than one process; nothing otherwise (or when it cannot tell).
    """
    import torch

    if torch.cuda.is_available():
        return
    try:
        import psutil

        requested = requested_num_processes(psutil.Process(os.getppid()).cmdline())
    except (Exception, SystemExit):  # not an accelerate command line we can read: nothing to say
        return
    if requested is None or requested <= 1:
        return
    raise RuntimeError(
        f"`accelerate launch` was asked for {requested} processes on a machine without GPUs, and accelerate starts a "
        "single one there unless told to use the CPU (it would train alone, silently). Add `--cpu`: "
        f"`accelerate launch --cpu --num_processes {requested} ...` (trl-qhead then starts {requested} gloo processes), "
        "or launch with `--num_processes 1`."
    )


CPU_SHARDING_FLAG = "TRL_QHEAD_CPU_FSDP"


def check_sharding_on_cpu() -> None:
    """FSDP under `accelerate launch` on a machine without GPUs: refuse, or (opt-in) really run FSDP on gloo.

    accelerate 1.x turns an FSDP run on CPU processes into DDP without a word: `AcceleratorState.__init__`
    (accelerate/state.py, the `elif self.distributed_type in [DistributedType.MULTI_GPU, ...]` branch, 1.15.0 lines
    986-1013) sets `DistributedType.FSDP` only for GPU-like device types, and `MULTI_CPU` is not among them. The
    model is then replicated, not sharded, and checkpoints are not gathered the FSDP way: not the run that was asked
    for. Unless `TRL_QHEAD_CPU_FSDP=1`, this raises a `RuntimeError` saying so. With it, accelerate's own FSDP code
    path runs on the gloo process group (`fully_shard` works on CPU): to debug FSDP runs without GPUs (the tests do).
    """
    if not _flag("ACCELERATE_USE_FSDP"):
        return
    if not _flag(CPU_SHARDING_FLAG):
        raise RuntimeError(
            "FSDP was asked for (ACCELERATE_USE_FSDP) on processes without GPUs, and accelerate would silently run DDP "
            "instead (accelerate/state.py: `DistributedType.FSDP` is only set for GPU-like device types, not "
            "MULTI_CPU). Set TRL_QHEAD_CPU_FSDP=1 to run FSDP on the gloo process group anyway (for debugging), or "
            "launch with `--cpu` / recipes/configs/accelerate/multi_gpu.yaml for a plain DDP run on CPUs."
        )
    enable_fsdp_on_cpu()


def enable_fsdp_on_cpu() -> None:
    """Make accelerate's `AcceleratorState` keep FSDP on CPU processes (`MULTI_CPU` becomes `FSDP` once an FSDP
    plugin is known), so that `Accelerator.prepare` shards with `fully_shard`, `get_state_dict` gathers a full state
    dict and `Trainer` takes its FSDP save and resume paths. Idempotent; see `check_sharding_on_cpu`."""
    from accelerate import state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__
    if getattr(init, "_fsdp_on_cpu", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # Every `AcceleratorState()` copies the process state (MULTI_CPU) back in: promote again each time.
        plugin = fsdp_plugin if fsdp_plugin is not None else getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    __init__._fsdp_on_cpu = True
    state.AcceleratorState.__init__ = __init__


def start_deepspeed_on_cpu() -> None:
    """Set up the process group of a DeepSpeed run on processes without GPUs (DeepSpeed's CPU accelerator, gloo).

    `ACCELERATE_USE_CPU` must stay unset: with it accelerate drops DeepSpeed without a word (accelerate/state.py,
    `elif os.environ.get("ACCELERATE_USE_DEEPSPEED", ...) == "true" and not cpu`, 1.15.0 line 974) and runs DDP.
    Without it and without a backend, accelerate finds no GPU backend and counts one process (state.py, "No backend
    == no distributed training", line 288) while DeepSpeed counts them all, and `deepspeed.initialize` fails with
    "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size". Initialising the process
    `--ddp_backend gloo` (added to this process's command line unless it names a backend; `TrainingArguments` resets
    any process state made before it, so the flag is the way in) gives both the same world.
    """
    if not any(arg == "--ddp_backend" or arg.startswith("--ddp_backend=") for arg in sys.argv):
        sys.argv += ["--ddp_backend", "gloo"]
