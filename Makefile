# `make run`: set up .venv (once) and run the whole pipeline on the embedded default dataset.
# `make test`: set up .venv (once) and run the test suite. Both are safe to run again.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.segflow-installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PREFECT_HOME ?= $(abspath .prefect)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# The ephemeral Prefect server creates its database on first start: longer than Prefect's 20 s on two cores.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export GX_ANALYTICS_ENABLED ?= false
export NO_ALBUMENTATIONS_UPDATE ?= 1
export DO_NOT_TRACK ?= 1

.PHONY: setup run test lint clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	# torch first: it is the big one, and the rest resolves against it.
	$(PYTHON) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -q -r requirements.lock
	$(PYTHON) -m pip install -q --no-deps -e .
	touch $(STAMP)

run: setup
	$(PYTHON) pipelines/training_pipeline.py

test: setup
	$(PYTHON) -m pytest -q -n 2 --dist loadgroup --durations=15

lint: setup
	$(VENV)/bin/ruff check src tests pipelines benchmarks

# The results kept in git (metrics/, plots/, leaderboard/, registry/decision.json) stay: `git checkout` restores them.
clean:
	rm -rf data models evaluation registry/registrations.jsonl mlflow.db mlartifacts .prefect .segflow dvc_plots
