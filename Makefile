# `make test` and `make demo` work from a clean clone: they create .venv if it is missing, install the CPU
# build of torch first (so that pip never pulls a multi-GB CUDA build), then the project with its test extras.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.safetext-installed

.PHONY: install test lint demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# open_clip ships OpenAI's CLIP BPE vocabulary, from which the real CLIP tokenizer is derived offline.
	# --no-deps: its torchvision requirement would replace the CPU torch build, and only the data file is read.
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

demo: $(STAMP)
	$(VENV)/bin/safetext demo --out demo-output

clean:
	rm -rf demo-output .pytest_cache
