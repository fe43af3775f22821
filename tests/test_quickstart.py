"""The Python blocks of docs/quickstart.md and docs/tasks.md run as they are, offline, from the repository root."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "docs" / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page", ["quickstart.md", "tasks.md"])
def test_every_python_block_runs(page, tmp_path, monkeypatch, capsys):
    blocks = _blocks(page)
    assert blocks, page
    monkeypatch.chdir(tmp_path)  # what a block writes (the trainer's output_dir) lands here
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), {"__name__": "__docs__"})
    if page == "quickstart.md":
        assert "tensor([" in capsys.readouterr().out  # it printed the samples and their KL
