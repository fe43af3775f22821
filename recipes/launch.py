"""Several training processes (for `recipes/qhead_lora.py`) on a machine without GPUs, under `accelerate launch`.

accelerate 1.x has two pitfalls there, both silent:

- `accelerate launch --cpu --num_processes N script.py` starts ONE process unless an MPI hostfile is configured
  (huggingface/accelerate#2741): the script trains alone while the user believes N processes share the batch.
- `accelerate launch --multi_gpu --num_processes N` (or `torchrun`) starts N processes, but without GPUs and without
  `--use_cpu` / `ACCELERATE_USE_CPU` each one sets itself up as a separate single-process run: N independent trainings
  writing the same output folder.

`ensure_cpu_processes()`, called first thing by a training script, turns both into the intended N-process gloo run: in
the first case it replaces the lone process by `torch.distributed.run` with the process count read from the
`accelerate launch` command line that started it, in the second it sets `ACCELERATE_USE_CPU` so that
`TrainingArguments` initialises the gloo process group.
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

        if not torch.cuda.is_available() and not _flag("ACCELERATE_USE_CPU"):
            os.environ["ACCELERATE_USE_CPU"] = "true"  # else each process would train alone (module docstring)
        return
    # accelerate's simple launcher sets MASTER_ADDR only when asked for more than one process.
    if not (_flag("ACCELERATE_USE_CPU") and "MASTER_ADDR" in os.environ and "LOCAL_RANK" not in os.environ):
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
