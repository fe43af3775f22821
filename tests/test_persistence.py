"""`trl_qhead.persistence`: the atomic save and what it records, the checks a load makes (including sizes: a
truncated tensor file is an error naming it), Hub resolution, and the trainer's checkpoint markers."""

import json
import os
import re

import pytest
import torch

from tests.conftest import make_tiny_gpt2
from tests.hub_fakes import hub_repo
from trl_qhead import AutoModelForCausalLMWithQHead
from trl_qhead.persistence import (
    CHECKPOINT_COMPLETE_NAME,
    Q_HEAD_CONFIG_NAME,
    Q_HEAD_WEIGHTS_NAME,
    check_model_source,
    checkpoint_problem,
    last_complete_checkpoint,
    mark_checkpoint_complete,
    read_q_head_config,
    resolve_q_head,
    save_q_head_folder,
)


def _save(folder, backbone_files: dict[str, bytes], tensors=None, **config):
    def write_backbone(staging):
        for name, data in backbone_files.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)

    tensors = tensors if tensors is not None else {"bias": torch.arange(3.0)}
    save_q_head_folder(folder, write_backbone, tensors, {"hidden_size": 2, "vocab_size": 3, **config})


def test_save_records_files_and_tensor_sizes_and_replaces_a_previous_save(tmp_path):
    folder = tmp_path / "ckpt"
    _save(folder, {"model.safetensors": b"x" * 10, "adapter_model.safetensors": b"y" * 5, "README.md": b"card"})
    config = read_q_head_config(folder)
    assert config["files"] == sorted(
        ["model.safetensors", "adapter_model.safetensors", "README.md", Q_HEAD_WEIGHTS_NAME, Q_HEAD_CONFIG_NAME]
    )
    sizes = config["file_sizes"]
    assert sizes["model.safetensors"] == 10 and sizes["adapter_model.safetensors"] == 5
    assert "README.md" not in sizes  # a model card may be rewritten after the save (the trainer's)
    assert sizes[Q_HEAD_WEIGHTS_NAME] == os.path.getsize(folder / Q_HEAD_WEIGHTS_NAME)
    # a second save over it: the previous save's files it does not write again are removed, the rest replaced
    _save(folder, {"model.safetensors": b"z" * 7}, tensors={"bias": torch.ones(3)})
    assert not (folder / "adapter_model.safetensors").exists()
    assert read_q_head_config(folder)["file_sizes"]["model.safetensors"] == 7
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".ckpt.tmp")]  # no staging left


def test_a_truncated_or_missing_tensor_file_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "ckpt"
    _save(folder, {"model.safetensors": b"x" * 10})
    (folder / "model.safetensors").write_bytes(b"x" * 4)
    with pytest.raises(ValueError, match=r"model\.safetensors has 4 bytes, but 10 were written"):
        read_q_head_config(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        read_q_head_config(folder)
    config = json.loads((folder / Q_HEAD_CONFIG_NAME).read_text())
    config["file_sizes"] = ["not", "a", "map"]
    config["files"] = []
    (folder / Q_HEAD_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="file_sizes"):
        read_q_head_config(folder)


def test_a_folder_saved_before_sizes_were_recorded_still_loads(tmp_path):
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=64), q_head_init="normal")
    model.save_pretrained(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / Q_HEAD_CONFIG_NAME
    config = json.loads(config_path.read_text())
    del config["file_sizes"]
    config_path.write_text(json.dumps(config))
    loaded = AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "ckpt"))
    assert torch.equal(loaded.q_head.weight, model.q_head.weight)


def test_resolve_q_head_in_a_folder_and_a_hub_repo(tmp_path, monkeypatch):
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=64))
    model.save_pretrained(tmp_path / "ckpt")
    make_tiny_gpt2(vocab_size=64).save_pretrained(tmp_path / "plain")
    folder, config = resolve_q_head(tmp_path / "ckpt", {})
    assert folder == str(tmp_path / "ckpt") and config["q_head_type"] == "dense"
    assert resolve_q_head(tmp_path / "plain", {}) == (None, None)
    cache = tmp_path / "hub"
    hub_repo(cache, "me/ckpt", tmp_path / "ckpt")
    hub_repo(cache, "me/plain", tmp_path / "plain")
    folder, config = resolve_q_head("me/ckpt", {"cache_dir": str(cache)})
    assert os.path.isfile(os.path.join(folder, Q_HEAD_WEIGHTS_NAME)) and config["vocab_size"] == 64
    assert resolve_q_head("me/plain", {"cache_dir": str(cache)}) == (None, None)
    # a truncated file in the repo is found as in a folder
    snapshot = next((cache / "models--me--ckpt" / "snapshots").iterdir())
    data = (snapshot / "model.safetensors").read_bytes()
    (snapshot / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        resolve_q_head("me/ckpt", {"cache_dir": str(cache)})


def test_checkpoint_markers(tmp_path):
    out = tmp_path / "out"
    for step in (2, 4, 6):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "optimizer.pt").write_bytes(b"o" * step)
        (folder / "sub").mkdir()
        (folder / "sub" / "rng.pth").write_bytes(b"r")
        if step < 6:  # checkpoint-6 was killed before its marker
            mark_checkpoint_complete(str(folder), step)
    marker = json.loads((out / "checkpoint-4" / CHECKPOINT_COMPLETE_NAME).read_text())
    assert marker == {"global_step": 4, "files": {"optimizer.pt": 4, "sub/rng.pth": 1}}
    assert checkpoint_problem(out / "checkpoint-4") is None
    assert "no checkpoint_complete.json" in checkpoint_problem(out / "checkpoint-6")
    assert last_complete_checkpoint(out) == str(out / "checkpoint-4")
    (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"o")  # replaced after the marker
    assert checkpoint_problem(out / "checkpoint-4") == "optimizer.pt has 1 bytes, 4 were written"
    (out / "checkpoint-2" / "sub" / "rng.pth").unlink()
    assert checkpoint_problem(out / "checkpoint-2") == "sub/rng.pth is missing"
    with pytest.raises(ValueError, match="No complete checkpoint"):
        last_complete_checkpoint(out)
    (out / "checkpoint-2" / CHECKPOINT_COMPLETE_NAME).write_text("{")
    assert "damaged" in checkpoint_problem(out / "checkpoint-2")


@pytest.mark.parametrize("missing", ["/no/such/model", "./no-such-model", "~/no-such-model", "no such model"])
def test_from_pretrained_names_a_missing_folder(tmp_path, missing):
    """A path that does not exist is named as such before anything loads (not sent to the Hub, whose "Repo id must be
    in the form" names neither the path nor the problem); repo ids and folders pass."""
    with pytest.raises(FileNotFoundError, match=f"{re.escape(repr(missing))}: no such folder"):
        AutoModelForCausalLMWithQHead.from_pretrained(missing)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="a file, not a model's folder"):
        AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "model.safetensors"))
    check_model_source(str(tmp_path))
    check_model_source("gpt2")
    check_model_source("HuggingFaceTB/SmolLM2-135M")
