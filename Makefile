# Riffle: `make demo` and `make test` are the two commands (see README.md).
SHELL := /bin/bash
export RIFFLE_CACHE ?= $(HOME)/.cache/riffle
# Build artefacts live outside the clone, so a fresh clone on a warm machine builds fast.
export CARGO_TARGET_DIR ?= $(RIFFLE_CACHE)/target
CARGO ?= cargo

.PHONY: demo test test-unit test-e2e bench lint fmt deps build fuzz

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --all-targets

## The embedded demo: a generated clickstream through the whole dataflow, under a minute.
demo: deps
	$(CARGO) run -q -p riffle-runtime --bin riffle -- demo

## Everything: unit, property, exactly-once, backtest, then the test bed and end-to-end tests.
test: deps
	$(MAKE) test-unit
	$(MAKE) test-e2e

test-unit:
	$(CARGO) test -p riffle-runtime -p riffle-operator

test-e2e:
	e2e/testbed/testbed up
	set -o pipefail; eval "$$(e2e/testbed/testbed env)" && $(CARGO) test -p riffle-e2e; \
	  rc=$$?; e2e/testbed/testbed down; exit $$rc

## Criterion micro-benchmarks and the whole-pipeline benchmark (release build).
bench: deps
	$(CARGO) bench -p riffle-runtime --bench dataflow
	$(CARGO) run --release -p riffle-runtime --bin riffle -- bench

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

-include e2e/testbed.mk

## Coverage-guided fuzzing of the event decoders (nightly + cargo-fuzz; not part of `make test`).
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	cd runtime/fuzz && $(CARGO) +nightly fuzz run decode_event -- -max_total_time=$${FUZZ_SECONDS:-60}
