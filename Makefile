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

# espeak-ng (speech for the synthetic corpus) is a system library: apt-get it when we are root, else stop with the fix.
# chromium + chromium-driver run tsd-app's browser tests: apt-get them too when we can; without them those tests skip.
APT := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
system-deps:
	@if ! ldconfig -p 2>/dev/null | grep -q libespeak-ng.so; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing espeak-ng with apt-get"; \
			(apt-get update -qq && $(APT) espeak-ng >/dev/null) || { echo "error: apt-get install espeak-ng failed"; exit 1; }; \
		else \
			echo "error: espeak-ng is missing. Install it (Debian/Ubuntu: sudo apt-get install espeak-ng;" \
			     "macOS: brew install espeak-ng), then run make again."; exit 1; \
		fi; \
	fi; \
	if ! { command -v chromium && command -v chromedriver; } >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing chromium and chromium-driver with apt-get (tsd-app's browser tests)"; \
			(apt-get update -qq && $(APT) chromium chromium-driver >/dev/null) \
			|| echo "note: apt-get install chromium chromium-driver failed: tsd-app's browser tests will be skipped"; \
		else \
			echo "note: without chromium and chromedriver tsd-app's browser tests are skipped" \
			     "(Debian/Ubuntu: sudo apt-get install chromium chromium-driver)"; \
		fi; \
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
