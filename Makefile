# cqdino: one-command set-up and tests. `make test` installs whatever is missing first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')
PY_SRC := $(wildcard cqdino configs projects tests tools benchmarks)
PYTEST_ARGS ?=
# pytest-xdist workers (one per core of the 2-core CI machine; each test file stays on one
# worker, so module fixtures are built once). PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: install test test-fast test-cuda lint format demo clean

install: $(VENV)/.ext-stamp

# Python, torch, the pinned dependencies and detectron2 (see tools/install_detectron2.py;
# DETECTRON2_PATH=/path/to/detectron2 installs an official checkout instead).
$(VENV)/.deps-stamp: requirements.txt requirements-dev.txt tools/install_detectron2.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/python tools/install_detectron2.py
	touch $@

# cqdino itself; builds cqdino._C (with CUDA when a toolkit is found or FORCE_CUDA=1).
$(VENV)/.ext-stamp: $(VENV)/.deps-stamp setup.py $(CSRC)
	$(PIP) install --no-build-isolation --no-deps -e .
	$(BIN)/python -m cqdino.env
	touch $@

lint: $(VENV)/.deps-stamp
	$(BIN)/black --check --quiet $(PY_SRC) setup.py
	$(BIN)/isort --check-only --quiet $(PY_SRC) setup.py
	$(BIN)/flake8 $(PY_SRC) setup.py
	$(BIN)/clang-format --dry-run --Werror $(CSRC)

format: $(VENV)/.deps-stamp
	$(BIN)/black --quiet $(PY_SRC) setup.py
	$(BIN)/isort --quiet $(PY_SRC) setup.py
	$(BIN)/clang-format -i $(CSRC)

# Every test but the GPU ones (slow ones included).
test: install lint
	$(BIN)/python -m pytest -m "not cuda" $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not cuda and not slow" $(XDIST) $(PYTEST_ARGS)

test-cuda: install
	$(BIN)/python -m pytest -m cuda $(PYTEST_ARGS)

# The main job on the embedded default: synthetic data (if absent), CPU training with
# configs/demo.py through projects/train_net.py, AP table, curves and drawn detections.
# DEMO_ARGS="--num-gpus 2" or config overrides pass through.
DEMO_ARGS ?=
demo: install
	$(BIN)/python tools/run_demo.py $(DEMO_ARGS)

clean:
	rm -rf build *.egg-info cqdino/*.so $(VENV)/.ext-stamp
