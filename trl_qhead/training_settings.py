"""The reward and return settings a Q head was trained with, saved beside it (`qhead_training_settings.json`).

`Q(s, a)` regresses on returns that these `QHeadConfig` fields define (which rewards, how they are scaled, clipped and
normalised, the discount and the lambda of the returns, the target): a loss of the head computed later (`trl-qhead
eval`) is only comparable with the training loss under the same settings. `QHeadTrainer` writes them at every save
(`save_training_settings`); `trl-qhead eval` reads them back (`load_training_settings`) for every field the command line
and `--config` leave unset (`apply_training_settings`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

TRAINING_SETTINGS_NAME = "qhead_training_settings.json"

# The `QHeadConfig` fields that define the rewards, the returns and the Q-head targets.
SETTING_FIELDS = (
    "gamma",
    "gae_lambda",
    "q_weight",
    "q_target",
    "target_beta",
    "candidate_weight",
    "use_lm_rewards",
    "lm_reward_coef",
    "reward_weights",
    "reward_scale",
    "reward_clip",
    "reward_normalization",
    "completion_only_loss",
)


def training_settings(args, reward_function_names: list[str] | None = None) -> dict[str, Any]:
    """`{field: value}` of `SETTING_FIELDS` in `args` (a `QHeadConfig`), plus `reward_functions`: the names of the
    trainer's reward functions and models (`[]` without any), which a later evaluation must supply itself."""
    settings = {name: getattr(args, name) for name in SETTING_FIELDS}
    settings["reward_functions"] = list(reward_function_names or [])
    return settings


def save_training_settings(output_dir: str | os.PathLike, args, reward_function_names: list[str] | None = None) -> str:
    """Write `training_settings(args, reward_function_names)` to `output_dir/qhead_training_settings.json`; returns
    the path."""
    path = os.path.join(output_dir, TRAINING_SETTINGS_NAME)
    with open(path, "w") as f:
        json.dump(training_settings(args, reward_function_names), f, indent=2)
    return path


def load_training_settings(path_or_repo_id: str | os.PathLike, **hub_kwargs) -> dict[str, Any] | None:
    """The settings saved in a model folder or Hub repo, or `None` when it has none (saved by an older trl-qhead, or
    not by `QHeadTrainer`). `hub_kwargs` (`revision`, `token`, ...) are those of `from_pretrained`."""
    from .hub import resolve_file

    path = resolve_file(path_or_repo_id, TRAINING_SETTINGS_NAME, hub_kwargs)
    if path is None:
        return None
    with open(path) as f:
        settings = json.load(f)
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must hold a JSON object of QHeadConfig fields, got {type(settings).__name__}.")
    return settings


def apply_training_settings(args, settings: dict[str, Any], explicit: set[str] | frozenset[str] = frozenset()):
    """A copy of `args` (a `QHeadConfig`) with the saved `settings`, except the fields named in `explicit` (set on
    the command line or in a config file: those win). Returns `(args, applied)`, `applied` the fields taken from
    `settings`. The copy is checked by `QHeadConfig.__post_init__` like any config."""
    applied = {
        name: value
        for name, value in settings.items()
        if name in SETTING_FIELDS and name not in explicit and getattr(args, name) != value
    }
    if not applied:
        return args, {}
    return dataclasses.replace(args, **applied), applied
