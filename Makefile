# The project's commands. `make lint` and `make test` are what CI runs (.ci/run).
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
VENV := .tools/venv
FUNCTIONS := ingest generator stream sweeper

.PHONY: help tools functions dev test lint fmt check-toolchain bench-turn

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

check-toolchain:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
	@command -v python3 >/dev/null || { echo "python3 not found: it runs the pinned local tools" >&2; exit 1; }

# The pinned Python tools (cargo-lambda, moto) in a project-local venv; reinstalled when the pins change.
$(VENV)/.installed: infra/requirements.txt
	@echo "==> installing the local tools into $(VENV) (cargo-lambda, moto)"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r infra/requirements.txt
	touch $@

tools: check-toolchain $(VENV)/.installed ## Install the pinned local tools (cargo-lambda, moto)

# `cargo lambda watch` builds each function lazily with its own feature set; building each one
# here, one at a time, means the first request does not wait for a compile.
functions: check-toolchain ## Build every function the way cargo lambda watch runs it
	@for f in $(FUNCTIONS); do echo "==> building $$f"; $(CARGO) build --locked -p $$f --bin $$f || exit 1; done

dev: tools functions ## Run the whole stack locally at http://127.0.0.1:9000 (Ctrl-C stops it)
	$(CARGO) run --locked -q -p chat-local --bin chat-local

test: tools functions ## Run every test: unit, store laws, and end to end through cargo lambda watch
	@mkdir -p target
	set -o pipefail; $(CARGO) test --workspace --locked 2>&1 | tee target/test-output.log
	@infra/test-summary.sh target/test-output.log

bench-turn: check-toolchain ## Capacity units and relay lag of 500-token turns at two flush settings
	$(CARGO) run --locked -q -p chat-local --bin bench-turn

lint: check-toolchain ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all
