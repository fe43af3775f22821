"""Offline stand-ins for the Hugging Face Hub: a repo is a folder in huggingface_hub's cache layout, uploads are
recorded (`HfApi.create_repo` / `upload_folder` monkeypatched)."""

import os
import shutil
from concurrent.futures import Future
from pathlib import Path

from huggingface_hub import HfApi


def hub_repo(cache: Path, repo_id: str, folder: Path, revision: str = "main", commit: str = "a" * 40) -> None:
    """Put `folder` in huggingface_hub's cache layout as `repo_id` at `revision` (what a download would leave)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


class FakeHub:
    """Records `HfApi.create_repo` / `upload_folder` calls and a copy of each uploaded folder."""

    def __init__(self, monkeypatch, tmp_path):
        self.uploads, self.root = [], tmp_path / "uploaded"
        hub = self

        class RepoUrl(str):
            repo_id = None

        def create_repo(api, repo_id, **kwargs):
            url = RepoUrl(f"https://huggingface.co/{repo_id}")
            url.repo_id = repo_id
            return url

        def upload_folder(api, *, repo_id, folder_path, **kwargs):
            target = hub.root / str(len(hub.uploads))
            shutil.copytree(folder_path, target, ignore=shutil.ignore_patterns(*kwargs.get("ignore_patterns") or []))
            hub.uploads.append({"repo_id": repo_id, "files": sorted(os.listdir(target)), "dir": target, **kwargs})
            result = f"https://huggingface.co/{repo_id}/commit/0"
            if kwargs.get("run_as_future"):  # the Trainer's checkpoint pushes
                future = Future()
                future.set_result(result)
                return future
            return result

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def use_hub_cache(monkeypatch, cache: Path) -> None:
    """Make every loader (huggingface_hub, PEFT's base-model load by name) read `cache`."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
