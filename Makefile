# The README's two commands: `make demo` and `make test`. Both run the idempotent setup first.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean-venv

setup:
	@bash scripts/setup.sh

demo: setup
	@$(VENV)/bin/geometryd demo

test: setup
	@HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

# ruff (lint + import order, pyproject.toml [tool.ruff]) and mypy (daemon/, moge_sidecar/; [tool.mypy])
lint: setup
	@$(PY) -m ruff check .
	@$(PY) -m ruff check --select I .
	@$(PY) -m mypy

bench: setup
	@$(VENV)/bin/geometryd bench

clean-venv:
	rm -rf $(VENV)
