# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= dev,faces,phones,sweep,export,wandb,scale,field,app
PYTEST_ARGS ?=
# pytest-xdist processes (auto: one per core); the tests run their tiny nets on one thread each
TEST_WORKERS ?= auto

.PHONY: setup system-deps demo test test-all lint format clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip
	$(BIN)/pip install --disable-pip-version-check -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

# espeak-ng (speech for the synthetic corpus) is a system library; chromium + chromium-driver run tsd-app's browser
# tests (skipped without them). apt-get what is missing when we are root.
system-deps:
	@missing=""; \
	ldconfig -p 2>/dev/null | grep -q libespeak-ng.so || missing=" espeak-ng"; \
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || missing="$$missing chromium chromium-driver"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing$$missing with apt-get"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
		|| { echo "error: apt-get install$$missing failed"; exit 1; }; \
	elif [ "$${missing# espeak-ng}" != "$$missing" ]; then \
		echo "error: espeak-ng is missing. Install it (Debian/Ubuntu: sudo apt-get install espeak-ng;" \
		     "macOS: brew install espeak-ng), then run make again."; exit 1; \
	else \
		echo "note: chromium or chromedriver is missing, so tsd-app's browser tests will be skipped" \
		     "(Debian/Ubuntu: sudo apt-get install chromium chromium-driver)"; \
	fi

demo: setup
	$(BIN)/tsd-pipeline experiment=quickstart

test: setup
	$(BIN)/pytest -q -n $(TEST_WORKERS) -m "not slow and not gpu" --timeout=900 $(PYTEST_ARGS)

test-all: setup
	$(BIN)/pytest -q -n $(TEST_WORKERS) --timeout=3600 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: setup
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests
