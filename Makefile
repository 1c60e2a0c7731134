# The project's commands. `make lint` and `make test` are what CI runs (.ci/run).
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
VENV := .tools/venv
FUNCTIONS := ingest generator stream sweeper

.PHONY: help tools node-tools browser functions dev test test-build test-infra lint fmt-check fmt check-toolchain check-arm64 bench-turn bench-cancel bench-prompt bench-load bench-cpu bench-sweep bench-coldstart validate build sam-build preflight deploy

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

check-toolchain:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
	@command -v python3 >/dev/null || { echo "python3 not found: it runs the pinned local tools" >&2; exit 1; }
	@command -v ps >/dev/null || { echo "ps not found: the local stack stops its processes with it (Debian: apt-get install procps)" >&2; exit 1; }

# The pinned Python tools (cargo-lambda, moto, cfn-lint, SAM CLI) in a project-local venv;
# reinstalled when the pins change.
$(VENV)/.installed: infra/requirements.txt
	@echo "==> installing the local tools into $(VENV) (cargo-lambda, moto, cfn-lint, SAM CLI)"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r infra/requirements.txt
	touch $@

tools: check-toolchain $(VENV)/.installed ## Install the pinned local tools (cargo-lambda, moto, cfn-lint, SAM CLI)

# The Durable Streams client the end-to-end tests read a turn's log with, at the version and
# hashes package-lock.json pins (npm ci: exactly those, never an upgrade).
DURABLE_CLIENT := infra/local/durable-client
node-tools: $(DURABLE_CLIENT)/node_modules/.installed ## Install the pinned npm packages the tests use
$(DURABLE_CLIENT)/node_modules/.installed: $(DURABLE_CLIENT)/package.json $(DURABLE_CLIENT)/package-lock.json
	cd $(DURABLE_CLIENT) && npm ci --no-audit --no-fund
	touch $@

# Headless Chromium and its WebDriver from Debian's packages, for the chat page's browser tests;
# installed once (apt-get, as root or through sudo), then found at these paths.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser: ## Install Debian's chromium and chromium-driver (the browser tests drive them)
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then :; else \
	  echo "==> installing chromium and chromium-driver from Debian's packages"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; fi
	@$(CHROMIUM) --version && $(CHROMEDRIVER) --version

# `cargo lambda watch` builds each function lazily (`cargo run --manifest-path Cargo.toml --bin F`,
# features unified across the workspace); building each one exactly that way
# here, one at a time, means the first request does not wait for a compile.
functions: check-toolchain ## Build every function the way cargo lambda watch runs it
	@for f in $(FUNCTIONS); do echo "==> building $$f"; $(CARGO) build --locked --manifest-path Cargo.toml --bin $$f || exit 1; done

dev: tools functions ## Run the whole stack locally at http://127.0.0.1:9000 (Ctrl-C stops it)
	$(CARGO) run --locked -q -p chat-local --bin chat-local

# SAM CLI sends no telemetry from here (nor from make build or make deploy).
NO_TELEMETRY := SAM_CLI_TELEMETRY=0

validate: tools ## Lint template.yaml with cfn-lint and sam validate --lint (part of make test)
	$(VENV)/bin/cfn-lint template.yaml
	$(NO_TELEMETRY) $(VENV)/bin/sam validate --lint --template template.yaml --region us-east-1

test-infra: tools ## Unit tests of the deploy preflight, without AWS (part of make test)
	cd infra && ../$(VENV)/bin/python -m unittest test_preflight

# `LINT=1` (CI): the test build is also clippy's run. clippy's driver compiles the workspace's own
# crates, every target `make lint` checks, with warnings denied; the dependencies are compiled once
# for both (`cargo clippy` on its own checks every dependency again: five minutes of a fresh CI run
# on two cores). The driver's own artifacts sit beside the plain ones, so neither rebuilds the
# other, and the local stack keeps these variables from the functions' builds.
ifneq ($(LINT),)
TEST_LINT := RUSTC_WORKSPACE_WRAPPER="$$(command -v clippy-driver)" CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
endif

test-build: check-toolchain ## Compile every test (with LINT=1, clippy's lints too, warnings denied)
	@[ -z "$(LINT)" ] || command -v clippy-driver >/dev/null || { echo "clippy-driver not found: rustup component add clippy" >&2; exit 1; }
	$(TEST_LINT) $(CARGO) test --workspace --locked --no-run

# Tests at once within each test binary (cargo test's default is one per core). Most end-to-end
# tests wait on turns, leases, sweeps and the browser rather than on the CPU: eight at a time run
# the end-to-end binary in about half the time of two, on two cores.
RUST_TEST_THREADS ?= 8
test: tools browser node-tools test-build functions validate test-infra ## Run every test: unit, store laws, template drift, end to end through cargo lambda watch, the page in Chromium
	@mkdir -p target
	set -o pipefail; $(TEST_LINT) RUST_TEST_THREADS=$(RUST_TEST_THREADS) $(CARGO) test --workspace --locked 2>&1 | tee target/test-output.log
	@infra/test-summary.sh target/test-output.log

DEPLOY_VENV := .tools/deploy-venv
$(DEPLOY_VENV)/.installed: infra/requirements-deploy.txt
	@echo "==> installing the build and deploy tools into $(DEPLOY_VENV) (cargo-lambda, zig, SAM CLI)"
	python3 -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install --quiet --disable-pip-version-check -r infra/requirements-deploy.txt
	touch $@

# The arm64 standard library, which cargo-lambda links the functions against. Checked first, as
# cargo-lambda would otherwise try to install it itself, in the middle of the build.
check-arm64:
	@test -d "$$(rustc --print sysroot)/lib/rustlib/aarch64-unknown-linux-gnu" || { \
	  echo "the aarch64-unknown-linux-gnu standard library is missing: rustup target add aarch64-unknown-linux-gnu" >&2; exit 1; }

# Release builds for Lambda (arm64, provided.al2023), zipped; prints each binary's and zip's size
# and fails when a zip is over 5 MiB (MAX_ZIP_MIB).
build: check-toolchain check-arm64 $(DEPLOY_VENV)/.installed ## Build arm64 release zips of every function into target/lambda
	PATH="$(CURDIR)/$(DEPLOY_VENV)/bin:$$PATH" AWS_LC_SYS_NO_JITTER_ENTROPY=1 \
	  $(DEPLOY_VENV)/bin/cargo-lambda lambda build --release --arm64 --output-format zip $(addprefix --bin ,$(FUNCTIONS))
	@python3 infra/zip_sizes.py $(FUNCTIONS)

# What sam deploy uploads: sam build's .aws-sam/build, with the same size check.
sam-build: check-toolchain check-arm64 $(DEPLOY_VENV)/.installed ## sam build (arm64 release binaries into .aws-sam/build), with make build's zip check
	PATH="$(CURDIR)/$(DEPLOY_VENV)/bin:$$PATH" AWS_LC_SYS_NO_JITTER_ENTROPY=1 $(NO_TELEMETRY) $(DEPLOY_VENV)/bin/sam build
	@python3 infra/zip_sizes.py --sam $(FUNCTIONS)

# The samconfig.toml environment that make deploy deploys: default or prod.
ENV ?= default

preflight: $(DEPLOY_VENV)/.installed ## Check that your AWS account can hold ENV's reserved concurrency (make deploy runs it first)
	$(DEPLOY_VENV)/bin/python infra/preflight.py --env $(ENV)

deploy: preflight sam-build ## The preflight, sam build and its checks, then sam deploy of ENV (default or prod; samconfig.toml) to your AWS account
	$(NO_TELEMETRY) $(DEPLOY_VENV)/bin/sam deploy --config-env $(ENV)

# The functions' metric lines (EMF JSON) go to stdout too: the tables are what is left.
bench-turn: check-toolchain ## Capacity units, relay lag and dollars per million 500-token turns at each flush and memory setting (CPU quotas need root and cgroup v1)
	set -o pipefail; $(CARGO) run --locked -q -p chat-local --bin bench-turn | grep -v '^{"'

# The generator's metric lines (EMF JSON) go to stdout too: the table is what is left.
bench-cancel: check-toolchain ## How soon a cancel closes the model's stream (before the first token, mid-reply, in a tool step) and the usage a stopped turn reports
	set -o pipefail; $(CARGO) run --locked -q -p chat-local --bin bench-cancel | grep -v '^{"'

bench-load: tools functions ## Many conversations at once through the local stack, then a 5,000-turn soak: errors, turns/s, TTFT, CPU per turn, laws checked
	$(CARGO) run --locked -q -p chat-local --bin bench-load

bench-cpu: tools functions ## Where a turn's CPU goes: per process and per emulator operation, 20 conversations
	BENCH_LEVELS=$${BENCH_LEVELS:-20x10} $(CARGO) run --locked -q -p chat-local --bin bench-load

bench-sweep: tools ## The sweeper at scale: 10,000 idle sessions expired and their summaries queued; a sweep with nothing due
	$(CARGO) run --locked -q -p chat-local --bin bench-sweep

# Release builds (the deployed profile, for this machine) of every function and of a hello-world
# yardstick, then each started cold behind a loopback Lambda Runtime API.
bench-coldstart: check-toolchain ## Init, first invocation and peak memory of every function beside a hello world, and a cold generator's first token
	$(CARGO) build --locked --release $(addprefix --bin ,$(FUNCTIONS)) --bin hello-lambda
	$(CARGO) run --locked -q -p chat-local --bin bench-coldstart

bench-prompt: check-toolchain ## Prompt-building time for histories of several sizes; what a prompt cache serves over 10 turns
	$(CARGO) run --locked -q -p chat-local --bin bench-prompt

fmt-check: ## cargo fmt --check (part of make lint)
	$(CARGO) fmt --all -- --check

lint: check-toolchain fmt-check ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all
