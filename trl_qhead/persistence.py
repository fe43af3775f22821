"""Q-head checkpoints on disk and on the Hub: the atomic save, the checks a load makes, and the trainer's checkpoint
markers (docs/DESIGN.md section 8). `AutoModelForCausalLMWithQHead` and `QHeadTrainer` keep thin methods that call
these functions.

A saved folder is the backbone's own folder (a full model, or only the LoRA adapters of a PEFT model) plus
`q_head.safetensors` (the head's state dict, fp32) and `q_head_config.json` (its shape, type, options, the LM-head
fingerprint of a tied head, and every file of the save with its size), written last: the commit marker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .durable_files import fsync_path, fsync_tree, relative_files
from .hub import resolve_file

logger = logging.get_logger(__name__)

Q_HEAD_WEIGHTS_NAME = "q_head.safetensors"
Q_HEAD_CONFIG_NAME = "q_head_config.json"
CHECKPOINT_COMPLETE_NAME = "checkpoint_complete.json"
_CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


# ---- saving -------------------------------------------------------------------------------------------------------------


def save_q_head_folder(
    save_directory: str | os.PathLike,
    save_backbone: Callable[[str], None],
    q_tensors: dict[str, torch.Tensor],
    q_config: dict,
) -> None:
    """Write a Q-head checkpoint atomically (see `AutoModelForCausalLMWithQHead.save_pretrained`).

    Args:
        save_directory: the folder to write.
        save_backbone: writes the backbone's files into the folder it is given (the staging folder).
        q_tensors: the Q head's tensors, saved in fp32 to `q_head.safetensors`.
        q_config: the head's entries of `q_head_config.json`; `files` (every file of the save) and `file_sizes`
            (the size of each tensor file) are added here.
    """
    target = os.path.abspath(os.fspath(save_directory))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        save_backbone(staging)
        tensors = {key: t.detach().to("cpu", torch.float32).contiguous() for key, t in q_tensors.items()}
        save_file(tensors, os.path.join(staging, Q_HEAD_WEIGHTS_NAME), metadata={"format": "pt"})
        written = relative_files(staging)
        # The tensor files' sizes: a truncated one is then an error naming it (a model card may be rewritten later).
        sizes = {key: os.path.getsize(os.path.join(staging, key)) for key in sorted(written) if _is_tensor_file(key)}
        files = sorted(written | {Q_HEAD_CONFIG_NAME})
        with open(os.path.join(staging, Q_HEAD_CONFIG_NAME), "w") as f:
            json.dump({**q_config, "files": files, "file_sizes": sizes}, f, indent=2)
        fsync_tree(staging)
        commit_folder(staging, target, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it was renamed into place


def _is_tensor_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt"))


def commit_folder(staging: str, target: str, files: list[str]) -> None:
    """Move a complete save from `staging` to `target`: one rename into a new or empty `target`; else
    `q_head_config.json` is the commit marker (removed first, moved in last)."""
    try:
        os.rename(staging, target)  # a new or empty `target`: one atomic step
        fsync_path(os.path.dirname(target))
        return
    except OSError:
        if not os.path.isdir(target):
            raise
    marker = os.path.join(target, Q_HEAD_CONFIG_NAME)
    previous_files = []
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                listed = json.load(f).get("files", [])
            previous_files = [name for name in listed if isinstance(name, str)]
        except (OSError, ValueError, AttributeError):
            pass
        os.remove(marker)  # from here on the folder refuses to load, until the new marker is in place
        fsync_path(target)
    order = [Q_HEAD_WEIGHTS_NAME] + [name for name in files if name not in (Q_HEAD_WEIGHTS_NAME, Q_HEAD_CONFIG_NAME)]
    for name in order:
        destination = os.path.join(target, name)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        os.replace(os.path.join(staging, name), destination)
    for name in set(previous_files) - set(files):  # e.g. adapter files of a PEFT save overwritten by a full model
        stale = os.path.normpath(os.path.join(target, name))
        if os.path.dirname(stale).startswith(target) and os.path.isfile(stale):
            os.remove(stale)
    fsync_path(target)
    os.replace(os.path.join(staging, Q_HEAD_CONFIG_NAME), marker)  # the commit
    fsync_path(target)


# ---- loading ------------------------------------------------------------------------------------------------------------


def read_q_head_config(directory: str | os.PathLike) -> dict | None:
    """The parsed `q_head_config.json` of a folder holding a complete Q-head save; `None` for a folder with neither
    Q-head file (a plain model). Anything in between is an interrupted or damaged save and raises, naming the file: a
    missing Q-head file, unreadable JSON, a bad shape entry, a listed file missing, or one whose size is not the size
    it was written with (truncated or replaced)."""
    weights = os.path.join(directory, Q_HEAD_WEIGHTS_NAME)
    config_path = os.path.join(directory, Q_HEAD_CONFIG_NAME)
    has_weights, has_config = os.path.isfile(weights), os.path.isfile(config_path)
    if not has_weights and not has_config:
        return None
    if not has_weights:
        raise FileNotFoundError(
            f"{directory} has {Q_HEAD_CONFIG_NAME} but no {Q_HEAD_WEIGHTS_NAME}: the checkpoint is incomplete (was "
            "its save killed before the Q head was written?). Use an earlier checkpoint."
        )
    if not has_config:
        raise FileNotFoundError(
            f"{directory} has {Q_HEAD_WEIGHTS_NAME} but no {Q_HEAD_CONFIG_NAME}, which `save_pretrained` writes "
            "last: the save was interrupted, so the folder may mix two checkpoints. Use an earlier checkpoint."
        )
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is not readable JSON ({error}): the file is damaged.") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}.")
    for key in ("hidden_size", "vocab_size"):
        if not isinstance(config.get(key), int) or isinstance(config.get(key), bool):
            raise ValueError(f"{config_path}: `{key}` must be an integer, got {config.get(key)!r}.")
    missing = [name for name in config.get("files", []) if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise FileNotFoundError(
            f"{directory} lacks {missing}, which its {Q_HEAD_CONFIG_NAME} lists: it is incomplete."
        )
    sizes = config.get("file_sizes") or {}
    if not isinstance(sizes, dict):
        raise ValueError(f"{config_path}: `file_sizes` must map file names to sizes, got {type(sizes).__name__}.")
    for name, size in sizes.items():
        if name == Q_HEAD_WEIGHTS_NAME:
            continue  # read and checked tensor by tensor when it is loaded (`read_q_head_tensors`), naming the file
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.path.getsize(path) != size:
            raise ValueError(
                f"{path} has {os.path.getsize(path)} bytes, but {size} were written ({config_path} records it): the "
                "file is truncated or was replaced. Use an earlier checkpoint, or copy the file again."
            )
    return config


def check_model_source(name: str | os.PathLike) -> None:
    """A `FileNotFoundError` naming `name` unless it is an existing folder or has the form of a Hub repo id (`name` or
    `owner/name`): a path that does not exist would otherwise reach the Hub as a malformed repo id ("Repo id must be
    in the form ..."), which names neither the path nor what is wrong with it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = os.fspath(name)
    if os.path.isdir(name):
        return
    looks_like_path = os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)
    try:
        validate_repo_id(name)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path:
        what = "a file, not a model's folder" if os.path.exists(name) else "no such folder"
        raise FileNotFoundError(
            f"{name!r}: {what} (and not a Hub repo id, which has the form 'name' or 'owner/name')."
        )


def resolve_q_head(path_or_repo_id: str | os.PathLike, kwargs: dict) -> tuple[str | None, dict | None]:
    """`(folder, q_head_config)` of the Q head saved in a local folder or a Hub repo, or `(None, None)` when it has
    none (a plain causal LM: a fresh head). A repo's `q_head.safetensors`, `q_head_config.json` and every file that
    config lists are fetched (`hub.resolve_file`), then checked as a folder's are (`read_q_head_config`)."""
    if os.path.isdir(path_or_repo_id):
        config = read_q_head_config(path_or_repo_id)
        return (os.fspath(path_or_repo_id), config) if config else (None, None)
    repo_id = str(path_or_repo_id)
    config_file = resolve_file(repo_id, Q_HEAD_CONFIG_NAME, kwargs)
    weights_file = resolve_file(repo_id, Q_HEAD_WEIGHTS_NAME, kwargs)
    if config_file is None and weights_file is None:
        return None, None
    where = f"{repo_id} (revision {kwargs.get('revision') or 'main'}; offline, a file may just not be in the cache)"
    if weights_file is None or config_file is None:
        has, lacks = (
            (Q_HEAD_CONFIG_NAME, Q_HEAD_WEIGHTS_NAME)
            if weights_file is None
            else (Q_HEAD_WEIGHTS_NAME, Q_HEAD_CONFIG_NAME)
        )
        raise FileNotFoundError(
            f"{where} has {has} but no {lacks}: refusing to return a model with a fresh Q head in place of the "
            "trained one."
        )
    try:
        with open(config_file) as f:
            listed = json.load(f).get("files", [])
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{config_file} (in {where}) is not a readable Q-head config ({error}).") from error
    # The files the save wrote: fetched too, so that the checks below see the same set as for a local folder.
    missing = [name for name in listed if resolve_file(repo_id, name, kwargs) is None]
    if missing:
        raise FileNotFoundError(f"{where} lacks {missing}, which its {Q_HEAD_CONFIG_NAME} lists: it is incomplete.")
    folder = os.path.dirname(weights_file)
    return folder, read_q_head_config(folder)


def read_q_head_tensors(
    directory: str | os.PathLike, expected: dict[str, tuple[int, ...]], device: str, what: str
) -> dict[str, torch.Tensor]:
    """The tensors of `directory/q_head.safetensors`, checked against a head's `expected` shapes: `ValueError` naming
    the file when it is not a readable safetensors file, holds other tensors, another dtype than float32, other
    shapes (`what` says which sizes may differ), or non-finite values."""
    path = os.path.join(directory, Q_HEAD_WEIGHTS_NAME)
    try:
        state = load_file(path, device=device)
    except Exception as error:  # safetensors raises its own error type for truncated or garbage files
        raise ValueError(
            f"{path} is not a readable safetensors file ({type(error).__name__}: {error}): the file is damaged "
            "or its save was interrupted."
        ) from error
    if set(state) != set(expected):
        raise ValueError(f"{path} holds the tensors {sorted(state)}; a Q head is exactly {sorted(expected)}.")
    for key, shape in expected.items():
        tensor = state[key]
        if tensor.dtype != torch.float32:
            raise ValueError(f"{path}: `{key}` is {tensor.dtype}; the Q head is saved in torch.float32.")
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"The Q head in {path} has `{key}` of shape {tuple(tensor.shape)}, this model needs {shape}: "
                f"was it saved from a model with another {what}?"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: `{key}` holds NaN or infinite values.")
    return state


def read_backbone_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A full backbone's tensors from `model.safetensors` or its sharded index, on the CPU."""
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"No model.safetensors (or its index) in {directory}.")
    with open(index_path) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    return {k: v for name in files for k, v in load_file(os.path.join(directory, name)).items()}


# ---- the trainer's checkpoints ------------------------------------------------------------------------------------------


def mark_checkpoint_complete(folder: str, global_step: int) -> None:
    """Write `checkpoint_complete.json` (every file of `folder` with its size) to a temporary name, fsync, rename."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    files.pop(CHECKPOINT_COMPLETE_NAME, None)
    fsync_tree(folder)
    temporary = os.path.join(folder, f".{CHECKPOINT_COMPLETE_NAME}.tmp")
    with open(temporary, "w") as f:
        json.dump({"global_step": global_step, "files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(folder, CHECKPOINT_COMPLETE_NAME))
    fsync_path(folder)


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why a `checkpoint-N` folder is not a complete checkpoint written by `QHeadTrainer`, or `None` when it is: its
    `checkpoint_complete.json` is there and every file it lists is there with the size it had when written."""
    marker = os.path.join(folder, CHECKPOINT_COMPLETE_NAME)
    if not os.path.isfile(marker):
        return f"it has no {CHECKPOINT_COMPLETE_NAME} (its save was interrupted, or another trainer wrote it)"
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
        listed = [(str(name), int(size)) for name, size in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"its {CHECKPOINT_COMPLETE_NAME} is damaged ({error})"
    for name, size in listed:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, {size} were written"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str:
    """The newest `checkpoint-N` folder of `output_dir` that `checkpoint_problem` finds complete (what
    `resume_from_checkpoint=True` resumes from); incomplete newer ones are skipped with a warning. Raises
    `ValueError` when there is none."""
    steps = {}
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = _CHECKPOINT_PATTERN.match(name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                steps[name] = int(match.group(1))
    skipped = []
    for name in sorted(steps, key=steps.get, reverse=True):
        path = os.path.join(output_dir, name)
        problem = checkpoint_problem(path)
        if problem is None:
            if skipped:
                logger.warning(f"Resuming from {name}, skipping incomplete checkpoints: {'; '.join(skipped)}.")
            return path
        skipped.append(f"{name}: {problem}")
    details = f": {'; '.join(skipped)}" if skipped else ""
    raise ValueError(
        f"No complete checkpoint in {output_dir} to resume from{details}. Pass a checkpoint's path as "
        "`resume_from_checkpoint` to resume from it anyway."
    )


def load_sharded_checkpoint(model: torch.nn.Module, directory: str) -> None:
    """Load a checkpoint of `AutoModelForCausalLMWithQHead.save_pretrained` (adapters or full backbone, and Q head)
    into an FSDP2-sharded model in place, on every process: each reads the full tensors and keeps its own shard
    (`set_model_state_dict` with `full_state_dict=True`). Parameters the checkpoint does not hold (a LoRA model's
    frozen base) keep their values; a tensor the model has no place for raises `ValueError`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    inner = model.module if hasattr(model, "module") and not hasattr(model, "checkpoint_state_dict") else model
    state = inner.checkpoint_state_dict(directory)
    result = set_model_state_dict(inner, state, options=StateDictOptions(full_state_dict=True, strict=False))
    if result.unexpected_keys:
        raise ValueError(f"{directory} holds tensors the model does not have: {sorted(result.unexpected_keys)[:5]}.")
