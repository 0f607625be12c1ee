# Two commands on a fresh machine: `make serve` and `make test` (and `make bench` to measure).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
CONFIG ?=
BENCH_ARGS ?=

.PHONY: serve test bench install install-test install-bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-bench: $(VENV)/.installed-bench

serve: $(VENV)/.installed
	$(BIN)/trioproxy serve --host $(HOST) --port $(PORT) $(if $(CONFIG),--config $(CONFIG))

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

# Direct vs trioproxy, side by side; e.g. `make bench BENCH_ARGS="--quick"` or "--find-max".
bench: $(VENV)/.installed-bench
	$(BIN)/trioproxy bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
