# The README's two commands: `make demo` and `make test`. Both run the idempotent setup first.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean-venv

setup:
	@bash scripts/setup.sh

demo: setup
	@$(VENV)/bin/geometryd demo

test: setup
	@HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	@$(VENV)/bin/geometryd bench

clean-venv:
	rm -rf $(VENV)
