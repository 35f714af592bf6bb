# llama-orch — every command a developer or CI needs. `make up` and `make test` set up .venv
# (and the system build tools llama-cpp-python compiles with) on first use.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall when the dependency list changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# Portable CPU build of llama.cpp without the multimodal library (see docs/operators.md for CUDA).
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
export GRPC_VERBOSITY ?= ERROR

.PHONY: setup up test gen gen-check lint format typecheck breaking bench clean

setup: $(STAMP)

$(STAMP):
	tools/ensure-system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# grpcurl, for the grpcurl recipes in docs/operators.md (tests/e2e/test_grpcurl_recipes.py),
# built from the Go module proxy into .venv/bin. Without Go, the recipes test skips.
GRPCURL := $(BIN)/grpcurl
GRPCURL_VERSION := v1.9.4

$(GRPCURL): $(STAMP)
	@if command -v go >/dev/null; then \
	  GOBIN=$(CURDIR)/$(BIN) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION); \
	else \
	  echo "go is not installed: grpcurl is not built and the grpcurl recipes test skips" >&2; \
	fi

up: setup
	$(BIN)/llorch up

gen: setup
	PYTHON=$(BIN)/python tools/genproto.sh gen

# Fails when gen/ is not what proto/ generates.
gen-check: setup
	rm -rf .gen-check && PYTHON=$(BIN)/python tools/genproto.sh .gen-check
	diff -r -x __pycache__ gen/llorch .gen-check/llorch || { echo "gen/ is stale: run make gen" >&2; rm -rf .gen-check; exit 1; }
	rm -rf .gen-check

lint: setup
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: setup
	$(BIN)/mypy

breaking: setup
	BUF=$(BIN)/buf tools/breaking.sh

test: setup $(GRPCURL) gen-check lint typecheck breaking
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/placement.py
	$(BIN)/python bench/admission.py
	$(BIN)/python bench/prediction.py
	$(BIN)/python bench/reload.py

clean:
	rm -rf $(VENV) .gen-check .pytest_cache .mypy_cache .ruff_cache
