# gradzoo: `make demo` and `make test` work on a fresh machine with Python >= 3.10 (they create .venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-models bench-extras clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## train configs/quickstart.yaml and write reports/quickstart/index.html
	$(BIN)/ablate run configs/quickstart.yaml --out runs --report reports/quickstart

JOBS ?= 2  # pytest-xdist workers: TensorFlow tests are mostly single-threaded Python, so 2 on 2 cores ~halves the time

test: $(STAMP)  ## the default suite (< 10 min on 2 cores), one test file per worker
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile

test-slow: $(STAMP)  ## only the long tests
	$(BIN)/python -m pytest -m slow -n $(JOBS) --dist loadfile

bench: $(STAMP)  ## capture-overhead benchmark: median step-time ratio probe / plain fit (table + JSON)
	$(BIN)/python benchmarks/capture_overhead.py --pairs 5 --json reports/capture_overhead.json

bench-extras: $(STAMP)  ## opt-in instruments (histograms, per-example, curvature, ...) and spe-16 variants on the MLP
	$(BIN)/python benchmarks/capture_overhead.py --pairs 5 --group extras --json reports/capture_overhead_extras.json

bench-models: $(STAMP)  ## capture cost on an LSTM, a Pre-LN transformer and MobileNetV2 (~20 min on 2 cores)
	$(BIN)/python benchmarks/capture_overhead.py --pairs 5 --group models --json reports/capture_overhead_models.json

clean:
	rm -rf runs reports/*/ .pytest_cache build *.egg-info
