# Two commands on a fresh machine: `make serve` and `make test` (and `make bench` to measure).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Where `make serve` listens, when given; else the config's [server] host and port (default 127.0.0.1:8000).
HOST   ?=
PORT   ?=
CONFIG ?=
BENCH_ARGS ?=
# The playground tests drive Debian's Chromium (never a browser build downloaded by a tool).
CHROMIUM := /usr/bin/chromium
# The CLIs the e2e tests drive, pinned, installed under .node/ (never globally): Claude Code,
# Codex, and the Vercel AI SDK (`ai` and its OpenAI provider).
CLAUDE_CODE_VERSION := 2.1.332
CODEX_VERSION := 0.171.0
AI_SDK_VERSIONS := ai@7.0.173 @ai-sdk/openai@4.0.118
NODE_DIR := .node

.PHONY: serve check test bench browser redis-server claude-code codex vercel-ai install install-test install-bench clean

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
	$(BIN)/trioproxy serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT)) $(if $(CONFIG),--config $(CONFIG))

# Static checks, run first by `make test`: ruff (lint, and the formatter's check; settings in
# pyproject.toml) on the code, the tests and the benchmarks, and mypy in strict mode on the package.
check: $(VENV)/.installed-test
	$(BIN)/ruff check trioproxy tests benchmarks
	$(BIN)/ruff format --check trioproxy tests benchmarks
	$(BIN)/mypy

test: check browser redis-server $(if $(shell command -v node),claude-code codex vercel-ai)
	$(BIN)/python -m pytest

# Installs Debian's chromium (about 10 s from a warm mirror) when it is missing and we are root;
# otherwise says how, and the playground tests fail with the same advice.
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing chromium for the playground tests"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
		else \
			echo "warning: $(CHROMIUM) is missing; install it (sudo apt-get install chromium) for the playground tests" >&2; \
		fi; \
	fi

# The shared-state tests start their own Debian redis-server (never a mock): installed the same
# way when it is missing and we are root; otherwise they fail saying how.
redis-server:
	@if ! command -v redis-server >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing redis-server for the shared-state tests"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; \
		else \
			echo "warning: redis-server is missing; install it (sudo apt-get install redis-server) for the shared-state tests" >&2; \
		fi; \
	fi

# Installs the pinned Claude Code CLI once (about 400 MB, its native binary); `make test` runs
# this when `node` exists, and tests/e2e/test_claude_code.py drives the CLI through trioproxy.
claude-code: $(NODE_DIR)/.installed-$(CLAUDE_CODE_VERSION)

$(NODE_DIR)/.installed-$(CLAUDE_CODE_VERSION):
	npm install --prefix $(NODE_DIR) --no-audit --no-fund --loglevel=error @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)
	$(NODE_DIR)/node_modules/.bin/claude --version >/dev/null
	touch $@

# Direct vs trioproxy, side by side; e.g. `make bench BENCH_ARGS="--quick"` or "--find-max".
bench: $(VENV)/.installed-bench
	$(BIN)/trioproxy bench $(BENCH_ARGS)

# Installs the pinned Codex CLI once (its native binary, about 420 MB); `make test` runs this
# when `node` exists, and tests/e2e/test_codex.py drives the CLI through trioproxy.
codex: $(NODE_DIR)/.installed-codex-$(CODEX_VERSION)

$(NODE_DIR)/.installed-codex-$(CODEX_VERSION):
	npm install --prefix $(NODE_DIR) --no-audit --no-fund --loglevel=error @openai/codex@$(CODEX_VERSION)
	$(NODE_DIR)/node_modules/.bin/codex --version >/dev/null
	touch $@

# The Vercel AI SDK for tests/e2e/test_vercel_ai.py (a few MB); `make test` runs this when `node` exists.
vercel-ai: $(NODE_DIR)/.installed-ai-sdk

$(NODE_DIR)/.installed-ai-sdk: Makefile
	npm install --prefix $(NODE_DIR) --no-audit --no-fund --loglevel=error $(AI_SDK_VERSIONS)
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache $(NODE_DIR)
