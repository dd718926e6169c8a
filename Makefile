# The disposition service. `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
BUILD := build
GEN := $(BUILD)/gen
DEPS := $(BUILD)/proto-deps
DESCRIPTOR := $(BUILD)/disposition.pb
BUF := $(BUILD)/node/node_modules/.bin/buf
PROTOS := $(shell find proto -name '*.proto' | sort)
STAMP := $(VENV)/.installed

export HTTP_PORT ?= 8080
export GRPC_PORT ?= 50051
export ENVOY_ADMIN_PORT ?= 9901

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The generated package is mapped into build/gen (see pyproject.toml); it must exist to install.
	mkdir -p $(GEN)/disposition/v1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

.PHONY: install
install: $(STAMP) gen ## Create .venv and install the service and its tools

$(DEPS)/.copied: $(STAMP) Makefile
	mkdir -p $(DEPS)/google/api $(DEPS)/google/rpc
	site=$$($(PY) -c 'import google.api, os; print(os.path.dirname(os.path.dirname(google.api.__path__[0])))'); \
	cp $$site/google/api/annotations.proto $$site/google/api/http.proto \
	  $$site/google/api/field_behavior.proto $(DEPS)/google/api/; \
	cp $$site/google/rpc/status.proto $$site/google/rpc/error_details.proto $(DEPS)/google/rpc/
	touch $@

$(GEN)/.generated: $(PROTOS) $(DEPS)/.copied
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iproto -I$(DEPS) --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTOS)
	find $(GEN) -type d -exec touch {}/__init__.py \;
	rm -f $(GEN)/__init__.py
	$(PY) -m grpc_tools.protoc -Iproto -I$(DEPS) --include_imports --include_source_info \
	  --descriptor_set_out=$(DESCRIPTOR) $(PROTOS) google/rpc/status.proto google/rpc/error_details.proto
	touch $@

$(BUILD)/openapi.json: $(GEN)/.generated gateway/openapi.py server/errors.py
	$(PY) -m gateway.openapi --descriptor $(DESCRIPTOR) --out $@

# Envoy's Lua filter with the error vocabulary of server/errors.py rendered in.
$(BUILD)/envelope.lua: $(GEN)/.generated gateway/envelope.lua gateway/vocabulary.py server/errors.py
	$(PY) -m gateway.vocabulary --out $@

# The docs page (GET /docs): Swagger UI (npm, pinned) with our page and initializer, in build/docs/
# (the files envoy.yaml serves; gateway/envoy_config.py's DOCS_FILES).
SWAGGER_UI_VERSION := 5.36.0
SWAGGER_UI := $(BUILD)/node/node_modules/swagger-ui-dist
DOCS := $(BUILD)/docs

$(BUILD)/node/swagger-ui-dist@$(SWAGGER_UI_VERSION):
	npm install --silent --no-audit --no-fund --save-exact --prefix $(BUILD)/node swagger-ui-dist@$(SWAGGER_UI_VERSION)
	touch $@

$(DOCS)/.built: $(BUILD)/node/swagger-ui-dist@$(SWAGGER_UI_VERSION) $(wildcard gateway/docs_page/*)
	rm -rf $(DOCS) && mkdir -p $(DOCS)
	cp gateway/docs_page/index.html gateway/docs_page/swagger-initializer.js $(DOCS)/
	cp $(SWAGGER_UI)/swagger-ui-bundle.js $(SWAGGER_UI)/swagger-ui.css $(SWAGGER_UI)/favicon-32x32.png $(DOCS)/
	touch $@

.PHONY: gen
gen: $(GEN)/.generated $(BUILD)/openapi.json $(BUILD)/envelope.lua $(DOCS)/.built ## Generate code, Envoy's descriptor set, build/openapi.json, the Lua filter and the docs page

$(BUF):
	npm install --silent --no-audit --no-fund --prefix $(BUILD)/node @bufbuild/buf@1.75.0

.PHONY: run
run: install ## Set up everything and serve: SQLite in VAR_DIR (var/), demo partner, Envoy on $HTTP_HOST:$HTTP_PORT (admin $ENVOY_ADMIN_PORT), gRPC on $GRPC_PORT
	$(PY) -m devstack.run

.PHONY: run-cluster
run-cluster: install ## REPLICAS (2) servers behind one Envoy on PostgreSQL ($DATABASE_URL) + Redis ($REDIS_URL)
	$(PY) -m devstack.cluster

.PHONY: migrate
migrate: install ## Upgrade the database named by DATABASE_URL to the current schema (Alembic)
	$(BIN)/disposition-admin migrate

.PHONY: test
test: install debian-tools ## Set up everything and run the whole test suite (unit, grpc_api, rest, system)
	$(BIN)/pytest

.PHONY: test-fast
test-fast: install ## The unit layer only (tests/unit: no server, no Envoy), in seconds
	$(BIN)/pytest -q tests/unit

.PHONY: lint
lint: install debian-tools $(BUF) ## ruff, mypy (strict: server/, gateway/, devstack/, test support), luacheck, buf lint
	$(BIN)/ruff check server gateway devstack tests
	$(BIN)/ruff format --check server gateway devstack tests
	$(BIN)/mypy
	luacheck --no-color gateway/envelope.lua $(BUILD)/envelope.lua
	$(BUF) lint

# Tools the tests and lint use from Debian's packages (root and apt needed); without them the
# tests that need them skip, saying so, and `make lint` fails.
DEBIAN_TOOLS := luacheck:lua-check promtool:prometheus chromium:chromium
.PHONY: debian-tools
debian-tools:
	@missing=""; for pair in $(DEBIAN_TOOLS); do command -v $${pair%%:*} >/dev/null || \
	  missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing from Debian's packages"; \
	  { apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; } || \
	  echo "could not install$$missing: the tests that need them will skip"; fi

.PHONY: breaking
breaking: install $(BUF) ## buf breaking against a git ref (AGAINST=main by default)
	rm -rf $(BUILD)/against && mkdir -p $(BUILD)/against/$(BUILD)
	git archive $(or $(AGAINST),main) proto buf.yaml | tar -x -C $(BUILD)/against
	cp -r $(DEPS) $(BUILD)/against/$(BUILD)/
	cd $(BUILD)/against && $(abspath $(BUF)) build -o ../against.binpb
	$(BUF) build -o $(BUILD)/current.binpb
	$(BUF) breaking $(BUILD)/current.binpb --against $(BUILD)/against.binpb

BENCH_TOOLS := wrk h2load
.PHONY: bench
bench: install ## Benchmark: load vs ceiling, engines, feed, counters, reports, scale, webhooks (BENCH_ARGS=--help)
	@for tool in $(BENCH_TOOLS); do command -v $$tool >/dev/null || { \
	  echo "installing wrk and nghttp2-client (h2load) from Debian's packages"; \
	  apt-get update -qq && apt-get install -y -qq wrk nghttp2-client >/dev/null; break; }; done
	$(PY) -m tests.bench.run_bench $(BENCH_ARGS)

.PHONY: crash-test
crash-test: install ## SIGKILL the server and Envoy under writes (20 times each, SQLite and PostgreSQL)
	$(PY) -m tests.system.crash_safety $(CRASH_ARGS)

.PHONY: fuzz
fuzz: install ## Fuzz every REST operation from the OpenAPI document (400 requests each; FUZZ_EXAMPLES), then schemathesis --checks all
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-400} FUZZ_ALL_EXAMPLES=$${FUZZ_ALL_EXAMPLES:-100} \
	  FUZZ_SEED=$${FUZZ_SEED:-$$RANDOM} $(BIN)/pytest -p no:cacheprovider -s tests/rest/test_fuzz.py tests/rest/test_schemathesis.py

.PHONY: clean
clean: ## Remove generated code and build tools (keeps .venv and var/)
	rm -rf $(BUILD)
