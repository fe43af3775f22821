"""`recipes/launch.py`: reading the process count off an `accelerate launch` command line, and setting up a
`torchrun`-style world on a machine without GPUs. (The full `accelerate launch --cpu` path runs in
tests/recipes/test_qhead_lora_multiprocess.py.)"""

import os
import sys

import pytest

from recipes.launch import ensure_cpu_processes, requested_num_processes


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            [
                "/venv/bin/python",
                "/venv/bin/accelerate",
                "launch",
                "--num_processes",
                "2",
                "--cpu",
                "t.py",
                "--steps",
                "3",
            ],
            2,
        ),
        (["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes=3", "t.py"], 3),
        (["/venv/bin/python", "/venv/bin/accelerate-launch", "--cpu", "--num_processes", "4", "t.py"], 4),
        (["python", "-m", "accelerate.commands.launch", "--num_processes", "5", "--cpu", "t.py", "launch"], 5),
        (["python", "train.py", "launch", "--num_processes", "2"], None),  # not accelerate
        (["bash"], None),
    ],
)
def test_requested_num_processes(argv, expected):
    assert requested_num_processes(argv) == expected


def test_requested_num_processes_from_a_config_file(tmp_path):
    config = tmp_path / "cpu.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 3\nuse_cpu: true\n"
    )
    argv = ["python", "/venv/bin/accelerate", "launch", "--config_file", str(config), "--cpu", "t.py"]
    assert requested_num_processes(argv) == 3


def test_torchrun_world_without_gpus_uses_the_cpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    ensure_cpu_processes()
    assert os.environ["ACCELERATE_USE_CPU"] == "true"


def test_single_process_runs_are_left_alone(monkeypatch):
    for name in ("WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    for cpu_flag in (None, "True"):  # plain `python`, then `accelerate launch --cpu` with one process (no MASTER_ADDR)
        if cpu_flag:
            monkeypatch.setenv("ACCELERATE_USE_CPU", cpu_flag)
        before = dict(os.environ)
        ensure_cpu_processes()  # would replace this process if it decided to relaunch
        assert dict(os.environ) == before


def test_fsdp_without_gpus_is_refused_unless_asked_for(monkeypatch):
    # accelerate would silently train DDP (accelerate/state.py: FSDP only for GPU-like device types).
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("TRL_QHEAD_CPU_FSDP", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(RuntimeError, match="silently run DDP"):
        ensure_cpu_processes()


def test_deepspeed_without_gpus_gets_gloo_and_keeps_deepspeed(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["qhead_lora.py", "--max_steps", "1"])
    ensure_cpu_processes()
    assert "ACCELERATE_USE_CPU" not in os.environ  # with it, accelerate would drop DeepSpeed for DDP
    assert sys.argv[-2:] == ["--ddp_backend", "gloo"]


def test_a_multi_process_launch_without_cpu_on_a_machine_without_gpus_is_refused_with_the_fix(monkeypatch):
    # What `accelerate launch --num_processes 4 -m trl_qhead.cli train` leaves a lone process without GPUs: the simple
    # launcher's MASTER_ADDR (set for the 4 processes asked for), ACCELERATE_USE_CPU=False, no LOCAL_RANK.
    import psutil

    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    launcher = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "4", "-m", "trl_qhead.cli"]
    monkeypatch.setattr(psutil.Process, "cmdline", lambda self: [*launcher, "train"])
    with pytest.raises(RuntimeError, match=r"accelerate launch --cpu --num_processes 4"):
        ensure_cpu_processes()
    monkeypatch.setattr(psutil.Process, "cmdline", lambda self: ["bash"])  # not accelerate: left alone
    ensure_cpu_processes()
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # with GPUs accelerate's own launch decides
    monkeypatch.setattr(psutil.Process, "cmdline", lambda self: [*launcher, "train"])
    ensure_cpu_processes()
