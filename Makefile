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

.PHONY: setup up test fuzz gen gen-check gateway lint format typecheck breaking bench clean

setup: $(STAMP)

$(STAMP):
	tools/ensure-system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# Go builds the REST edge (gateway/) and grpcurl. tools/ensure-go.sh prints the machine's Go
# when it is new enough, else fetches Go from the Go module proxy into .venv/go (checksum pinned).
GO = $$(tools/ensure-go.sh)

# grpcurl, for the grpcurl recipes in docs/operators.md (tests/e2e/test_grpcurl_recipes.py),
# built from the Go module proxy into .venv/bin.
GRPCURL := $(BIN)/grpcurl
GRPCURL_VERSION := v1.9.4

$(GRPCURL): $(STAMP)
	GOBIN=$(CURDIR)/$(BIN) $(GO) install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

# The code generators of the REST edge, at the versions gateway/go.mod pins (its `tool` lines).
GATEWAY_PLUGINS := $(BIN)/.gateway-plugins-$(shell cksum gateway/go.mod | cut -d' ' -f1)

$(GATEWAY_PLUGINS): $(STAMP)
	cd gateway && GOBIN=$(CURDIR)/$(BIN) $$(../tools/ensure-go.sh) install tool
	rm -f $(BIN)/.gateway-plugins-*
	touch $@

# The REST edge (grpc-gateway): `llorch up` starts it; tests/e2e/test_gateway.py runs it.
GATEWAY := $(BIN)/llorch-gateway

$(GATEWAY): $(STAMP) gateway/go.mod gateway/go.sum $(shell find gateway -name '*.go' -o -name '*.json')
	cd gateway && $$(../tools/ensure-go.sh) build -o $(CURDIR)/$@ ./cmd/llorch-gateway

gateway: $(GATEWAY)

up: setup $(GATEWAY)
	$(BIN)/llorch up

# Python stubs into gen/ (tools/genproto.sh); Go code and the OpenAPI document of the REST edge
# into gateway/gen and gateway/openapi (buf.gen.yaml).
gen: setup $(GATEWAY_PLUGINS)
	PYTHON=$(BIN)/python tools/genproto.sh gen
	rm -rf gateway/gen gateway/openapi/llorch.swagger.json
	$(BIN)/buf generate

# Fails when gen/, gateway/gen or gateway/openapi is not what proto/ generates.
gen-check: setup $(GATEWAY_PLUGINS)
	rm -rf .gen-check && PYTHON=$(BIN)/python tools/genproto.sh .gen-check
	$(BIN)/buf generate -o .gen-check
	diff -r -x __pycache__ gen/llorch .gen-check/llorch \
	  && diff -r gateway/gen .gen-check/gateway/gen \
	  && diff gateway/openapi/llorch.swagger.json .gen-check/gateway/openapi/llorch.swagger.json \
	  || { echo "generated code is stale: run make gen" >&2; rm -rf .gen-check; exit 1; }
	rm -rf .gen-check

lint: setup
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd gateway && go=$$(../tools/ensure-go.sh) && $$go vet ./... \
	  && test -z "$$($$(dirname $$go)/gofmt -l edge cmd openapi)" || { echo "gateway/: go vet or gofmt -l failed" >&2; exit 1; }
	cd gateway && $$(../tools/ensure-go.sh) test ./...

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	cd gateway && $$(dirname $$(../tools/ensure-go.sh))/gofmt -w edge cmd openapi

typecheck: setup
	$(BIN)/mypy

breaking: setup
	BUF=$(BIN)/buf tools/breaking.sh

test: setup $(GRPCURL) $(GATEWAY) gen-check lint typecheck breaking
	$(BIN)/pytest -q

# The fuzz suite (tests/fuzz) with 20 times the requests per RPC `make test` sends, drawn from a
# new seed each run (FUZZ_SEED=<n> draws a failing run's requests again).
fuzz: setup
	seed=$${FUZZ_SEED:-$$RANDOM}; echo "FUZZ_SEED=$$seed"; \
	  FUZZ_EXAMPLES=800 FUZZ_SEED=$$seed $(BIN)/pytest -q --timeout 1800 tests/fuzz

bench: setup $(GATEWAY)
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/concurrency.py
	$(BIN)/python bench/engine_steps.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/placement.py
	$(BIN)/python bench/admission.py
	$(BIN)/python bench/prefix.py
	$(BIN)/python bench/prediction.py
	$(BIN)/python bench/reload.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/chaos.py

clean:
	rm -rf $(VENV) .gen-check .pytest_cache .mypy_cache .ruff_cache
