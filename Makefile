# Two commands do all set-up on a fresh machine:
#   make run   - create .venv, install the pinned dependencies, train the seed recipe
#   make test  - the same set-up plus the dev tools, then the linter and every test
#
# torch is installed first and pinned: pip then takes the CPU wheel that lies on
# disk instead of resolving a multi-GB CUDA build for a looser requirement.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip --disable-pip-version-check -q
TORCH    := torch==2.13.0
# Where torch comes from. Empty: pip's configured indexes (here a local CPU wheel). With internet on Linux, PyPI's
# torch==2.13.0 is the multi-GB CUDA build; `make run TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU one.
TORCH_INDEX ?=
# The shared copy of MNIST on this project's machines; elsewhere the default cache.
DATA_DIR ?= $(firstword $(wildcard ../shared/datasets/mnist) $(HOME)/.cache/mnistrec/mnist)
RECIPE   ?= seed

export MNIST_DATA_DIR := $(abspath $(DATA_DIR))

# The model shipped in the package: the `best` recipe with a 5,000-image validation split (where its
# temperature is fitted), seed 42, one thread (bit-reproducible on one machine). ~20 min on 2 busy cores;
# an existing $(DEFAULT_RUN)/model.pth is reused. See docs/calibration.md for why this recipe.
DEFAULT_RUN ?= runs/default-model

.PHONY: run test lint setup dev browser data benchmarks bench-recipes default-model clean help

help:
	@echo "make run    set up .venv and train the '$(RECIPE)' recipe on $(DATA_DIR)"
	@echo "make test   set up .venv with the dev tools, run the linter and every test"
	@echo "make lint   ruff check on the whole tree (rules in pyproject.toml)"
	@echo "make benchmarks   run the benchmarks (minutes; writes benchmarks/results/*.json)"
	@echo "make bench-recipes   accuracy vs time of every training recipe (tens of minutes)"
	@echo "make default-model   train, calibrate and write src/mnistrec/default_model.pth and .onnx (~20 min)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e '.[serve,export]'
	@touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) install -e '.[serve,export,dev]'
	@touch $@

setup: $(VENV)/.installed

dev: $(VENV)/.dev-installed

data: setup
	@[ -f "$(DATA_DIR)/train-images-idx3-ubyte.gz" ] || [ -f "$(DATA_DIR)/train-images-idx3-ubyte" ] || \
		$(PY) -m mnistrec download --data-dir "$(DATA_DIR)"

run: setup data
	$(PY) -m mnistrec train --recipe $(RECIPE) --data-dir "$(DATA_DIR)" --out runs/$(RECIPE)

test: dev browser lint
	@# pytest exits 5 when it collected no test: that is a failure, never a pass.
	$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
		if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$status

lint: dev
	$(VENV)/bin/ruff check .

# The browser end-to-end test drives Debian's Chromium (no browser download of Playwright's own).
browser:
	@[ -x /usr/bin/chromium ] || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

benchmarks: dev
	$(PY) benchmarks/bench_seed_pipeline.py --data-dir "$(DATA_DIR)"
	$(PY) benchmarks/bench_robustness.py --data-dir "$(DATA_DIR)"
	$(PY) benchmarks/bench_inference.py

# Test accuracy against wall-clock for every recipe: long (tens of minutes on 2 cores).
bench-recipes: dev
	$(PY) benchmarks/bench_recipes.py --data-dir "$(DATA_DIR)" --recipes seed,ensemble --separate-fast --threads 2

# The shipped model was trained in float32, before `best` moved to bf16: --precision fp32 reproduces it bit for bit.
default-model: setup data
	@[ -f $(DEFAULT_RUN)/model.pth ] || $(PY) -m mnistrec train --recipe best --val-size 5000 --seed 42 --threads 1 \
		--precision fp32 --data-dir "$(DATA_DIR)" --out $(DEFAULT_RUN) --save '' --no-plots
	$(PY) tools/make_default_model.py $(DEFAULT_RUN)/model.pth --data-dir "$(DATA_DIR)"
	@# Shipped beside it so the default `auto` backend runs it on onnxruntime without exporting first.
	$(PY) -m mnistrec export src/mnistrec/default_model.pth --format onnx -o src/mnistrec/default_model.onnx

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
