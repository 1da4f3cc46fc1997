# The README's two commands: `make run` and `make test`. Each creates .venv if it is missing and installs what it
# needs from pyproject.toml, so they work on a fresh machine with nothing installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# pytest-xdist workers; each worker gets its own 8 fake CPU devices (tests/conftest.py).
WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: run report test test-fast lint bench install-dev install-train install-bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-train: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[train]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@ $(VENV)/.installed-train

# torch is pinned first so the bench extra's range is satisfied by the CPU build this kind of machine carries.
# LibMTL imports torchvision (no CPU build here) only at package level; bench_mtl.py loads LibMTL.weighting alone,
# so it is installed without its dependencies.
$(VENV)/.installed-bench: pyproject.toml | $(PY)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m pip install -q --no-deps "LibMTL>=1.1.5"
	touch $@ $(VENV)/.installed-dev $(VENV)/.installed-train

install-train: $(VENV)/.installed-train
install-dev: $(VENV)/.installed-dev
install-bench: $(VENV)/.installed-bench

# The default training run (configs/train.yaml): a few minutes on a 2-core CPU; extra Hydra overrides via ARGS=.
run: $(VENV)/.installed-train
	$(PY) scripts/train.py $(ARGS)

report: $(VENV)/.installed-train
	$(PY) scripts/stats_report.py

# Exit status 5 is pytest's "no tests collected"; it is not a failure of the suite.
test: $(VENV)/.installed-dev
	$(PY) -m pytest -n $(WORKERS) $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -n $(WORKERS) -m "not slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check corrjax scripts tests
	$(BIN)/ruff format --check corrjax scripts tests

bench: $(VENV)/.installed-bench
	for s in scripts/bench_*.py; do $(PY) $$s || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
