# Set-up and everyday commands. `make run` and `make test` are all a new machine needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
# Arguments for `make bench`: rows per stage and repetitions of each measurement.
ROWS ?= 1000000
TRAIN_ROWS ?= 300000
REPEATS ?= 3
PYTEST_ARGS ?=
# Test processes (pytest-xdist; a test file stays in one process): 0 runs them in this one.
TEST_WORKERS ?= 2

# Spark's Python workers must use the project's interpreter, and Spark reads
# conf/log4j2.properties (warnings only) from SPARK_CONF_DIR.
export PYSPARK_PYTHON := $(abspath $(PY))
export SPARK_CONF_DIR := $(abspath conf)
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Local mode needs no network address: stay on loopback.
export SPARK_LOCAL_IP ?= 127.0.0.1
SUBMIT := $(VENV)/bin/spark-submit --master "local[*]"

.PHONY: run test test-fast bench lint format conf clean check-python check-java

check-python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  echo "error: Python 3.10 or newer is required ($(PYTHON) is $$($(PYTHON) --version 2>&1 || echo missing)); install it, or run make PYTHON=python3.11 ..." >&2; exit 1; }

$(VENV)/.installed: pyproject.toml | check-python
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train]'
	@touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

check-java: $(VENV)/.installed
	@$(PY) -m pipeline.session

## run: the whole pipeline on the embedded 6,000-digit sample, in Spark local mode
run: $(VENV)/.installed check-java
	$(SUBMIT) jobs/ingest.py --input "$$($(PY) -m pipeline.sample)" --output $(OUT)/features \
	  --set ingest.split.enabled=true
	$(SUBMIT) jobs/train.py --input $(OUT)/features --model-dir $(OUT)/model --fresh
	$(SUBMIT) jobs/score.py --input $(OUT)/features/split=test --model-dir $(OUT)/model \
	  --output $(OUT)/predictions
	$(SUBMIT) jobs/explain.py --input $(OUT)/features/split=test --model-dir $(OUT)/model \
	  --output $(OUT)/explanations
	@echo
	@echo "features:    $(OUT)/features     (_report.json, _rejected/)"
	@echo "model:       $(OUT)/model        (model.keras, model.onnx, metadata.json, model_card.md, history.png, first_layer.png)"
	@echo "predictions: $(OUT)/predictions  (_report.json, _report.md, _confusion_matrix.png, _confidence_histogram.png, _calibration.png, _drift.png)"
	@echo "explanations: $(OUT)/explanations (_report.json, _class_attributions.png, _errors.png, _first_layer.png)"

## test: the test suite (the slow subprocess and multi-process tests included)
test: $(VENV)/.installed-dev check-java
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

## test-fast: the tests without the slow ones
test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

## bench: every stage against its baselines in one run (ROWS, REPEATS); writes benchmarks/results/
bench: $(VENV)/.installed-dev check-java
	$(PY) benchmarks/run.py --rows $(ROWS) --train-rows $(TRAIN_ROWS) --repeats $(REPEATS)
	@echo "results: benchmarks/results/latest.md, benchmarks/results/latest.json"

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check pipeline jobs tests benchmarks
	$(VENV)/bin/ruff format --check pipeline jobs tests benchmarks

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format pipeline jobs tests benchmarks
	$(VENV)/bin/ruff check --fix pipeline jobs tests benchmarks

## conf: regenerate conf/base.yaml from the config schema
conf: $(VENV)/.installed
	$(PY) -m pipeline.config > conf/base.yaml

## clean: outputs, MLflow tracking data (mlflow.db, mlartifacts/, mlruns/) and benchmark data
clean:
	rm -rf $(OUT) spark-warehouse metastore_db derby.log .pytest_cache \
	  mlflow.db mlartifacts mlruns benchmarks/data
