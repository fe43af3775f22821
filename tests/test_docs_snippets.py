"""Every ```python block of README.md and of docs/ (every .md below it) runs, offline, with tiny models, so that no
snippet can rot. The conventions (docs/development.md, "Snippets"):

- The blocks of one file run in order in one fresh namespace, as a notebook runs its cells: a block may use what an
  earlier block of the same file defined. Each file runs in a scratch folder of its own that holds `corpus.txt` (a
  few lines of text), with a time limit.
- `<!-- snippet: tiny-gpt2 -->` on the line before a block: the block names the model "gpt2" for its readers, and
  the test runs it with the string "gpt2" replaced by the path of a tiny GPT-2 saved in the scratch folder (2 layers,
  64 wide, GPT-2's vocabulary and its real tokenizer, which has no pad token, as the Hub's has none).
- `<!-- snippet: skip REASON -->` on the line before a block: the block is not run (it needs the Hub, a reward model
  by name or a GPU); the reason is required.

The blocks run in this process (a fresh interpreter would spend most of the time budget importing torch), each
file in a namespace of its own.
"""

import re
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from recipes.offline_assets import gpt2_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- snippet: (?P<kind>tiny-gpt2|skip)(?P<reason>[^>]*?)\s*-->$")
FILE_SECONDS = 300  # per file, generous for a loaded machine: the whole test takes about a minute on an idle one
CORPUS = "\n".join(
    [
        "The movie was long, but the ending made it worth every minute.",
        "I walked along the coast until the light was gone.",
        "The museum's new exhibition is small and very good.",
        "This vacuum cleaner is loud and the battery does not last.",
    ]
)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """`(line, source, marker)` for each ```python block of a Markdown file; `marker` is the snippet comment's kind."""
    lines = path.read_text().split("\n")
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            start = index + 1
            end = start
            while lines[end].strip() != "```":
                end += 1
            previous = lines[index - 1].strip() if index else ""
            match = MARKER.match(previous)
            marker = None
            if match:
                marker = match["kind"]
                if marker == "skip" and not match["reason"].strip():
                    raise ValueError(f"{path}:{index}: `<!-- snippet: skip -->` needs a reason.")
            elif previous.startswith("<!-- snippet"):
                raise ValueError(f"{path}:{index}: unknown snippet marker {previous!r}.")
            blocks.append((start + 1, "\n".join(lines[start:end]), marker))
            index = end
        index += 1
    return blocks


FILES = [path for path in markdown_files() if python_blocks(path)]


def save_tiny_gpt2(folder: Path) -> str:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_layer=2, n_embd=64, n_head=2, n_positions=512)
    GPT2LMHeadModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gpt2_tokenizer_dir()).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    return save_tiny_gpt2(tmp_path_factory.mktemp("hub") / "tiny-gpt2")


def run_blocks(path: Path, blocks, tiny_dir: str) -> None:
    namespace = {"__name__": "__main__"}
    for line, source, marker in blocks:
        if marker == "skip":
            continue
        if marker == "tiny-gpt2":
            source = source.replace('"gpt2"', repr(tiny_dir))
        try:
            exec(compile(source, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"The ```python block at {path.relative_to(ROOT)}:{line} failed: {error!r}"
            ) from error


def _timeout(signum, frame):
    raise TimeoutError(f"a file's snippets ran past {FILE_SECONDS} s")


@pytest.mark.parametrize("path", FILES, ids=[str(path.relative_to(ROOT)) for path in FILES])
def test_python_blocks_run(path, tiny_gpt2_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    (tmp_path / "corpus.txt").write_text(CORPUS + "\n")
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(FILE_SECONDS)
    threads = torch.get_num_threads()
    try:
        run_blocks(path, python_blocks(path), tiny_gpt2_dir)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        torch.set_num_threads(threads)


def test_the_readme_and_every_docs_page_are_searched():
    # The pages that hold the Python examples must be found (a moved docs folder would silently test nothing).
    names = {str(path.relative_to(ROOT)) for path in FILES}
    assert "README.md" in names and "docs/getting_started.md" in names and "docs/decoding.md" in names


def test_markers_are_parsed(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\na = 1\n```\n<!-- snippet: tiny-gpt2 -->\n```python\nb = 'gpt2'\n```\n"
        "<!-- snippet: skip needs the Hub -->\n```python\nc = 3\n```\n```bash\nls\n```\n"
    )
    assert python_blocks(page) == [(2, "a = 1", None), (6, "b = 'gpt2'", "tiny-gpt2"), (10, "c = 3", "skip")]
    page.write_text("<!-- snippet: skip -->\n```python\nc = 3\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        python_blocks(page)
    page.write_text("<!-- snippet: tiny -->\n```python\nc = 3\n```\n")
    with pytest.raises(ValueError, match="unknown snippet marker"):
        python_blocks(page)
