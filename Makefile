# Riffle: `make demo` and `make test` are the two commands (see README.md).
SHELL := /bin/bash
export RIFFLE_CACHE ?= $(HOME)/.cache/riffle
# Build artefacts live outside the clone, so a fresh clone on a warm machine builds fast.
export CARGO_TARGET_DIR ?= $(RIFFLE_CACHE)/target
CARGO ?= cargo

.PHONY: demo test bench chaos lint fmt deps build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --all-targets

# Always select the whole workspace: cargo unifies dependency features over the selected
# packages, so `-p` would build RocksDB & co. a second time with another feature set.
RIFFLE := $(CARGO_TARGET_DIR)/debug/riffle

## The embedded demo: a generated clickstream through the whole dataflow, under a minute.
demo: deps
	$(CARGO) build -q --workspace --bin riffle
	$(RIFFLE) demo

## Everything: unit, property, exactly-once, backtest, and the end-to-end suite on the test bed.
test: deps
	$(CARGO) test --workspace --no-run
	e2e/testbed/testbed up
	eval "$$(e2e/testbed/testbed env)" && $(CARGO) test --workspace --no-fail-fast; \
	  rc=$$?; e2e/testbed/testbed down; exit $$rc

## The test bed for interactive use and the README's walkthrough: the binaries, the test bed,
## and one node (riffle-node) running the riffle-runtime and riffle-operator images.
.PHONY: testbed
testbed: deps
	$(CARGO) build --workspace --bins
	e2e/testbed/testbed up
	e2e/testbed/testbed node-up

## Criterion micro-benchmarks and the whole-pipeline benchmark (release build).
bench: deps
	$(CARGO) bench --workspace --bench dataflow
	$(CARGO) build --release --workspace --bin riffle
	$(CARGO_TARGET_DIR)/release/riffle bench

## The distributed runtime with Kafka in the loop on the test bed (release build): throughput,
## end-to-end latency, checkpoint cost, recovery after a SIGKILL.
.PHONY: bench-kafka
bench-kafka: deps
	$(CARGO) build --release --workspace --bin riffle
	e2e/testbed/testbed up
	eval "$$(e2e/testbed/testbed env)" && $(CARGO_TARGET_DIR)/release/riffle bench-kafka

## Riffle vs Apache Flink side by side on the test bed (bench/flink/README.md): one generated
## input, both engines alternately for ROUNDS rounds (default 3); writes bench/results/. Not
## part of `make test`. Starts the test bed only if it is down.
.PHONY: bench-flink
bench-flink: deps
	$(CARGO) build --release --workspace --bin riffle
	cd bench/flink && (mvn -B -q -o package || mvn -B -q package)
	bench/flink/run $(BENCH_FLINK_ARGS)

## The full-size chaos test of the distributed runtime (1 M events, 24 SIGKILLs) on the test
## bed; `make test` runs a smaller one.
chaos: deps
	$(CARGO) test --workspace --no-run
	e2e/testbed/testbed up
	eval "$$(e2e/testbed/testbed env)" && RIFFLE_CHAOS_FULL=1 \
	  $(CARGO) test --workspace --test distributed chaos -- --nocapture

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Regenerate crds/ from operator/src/crd.rs, and the Helm chart's copy (tests fail while
## either is stale).
.PHONY: crds
crds:
	$(CARGO) build -q --workspace --bin crdgen
	$(CARGO_TARGET_DIR)/debug/crdgen
	cp crds/streamjob.yaml charts/riffle-operator/files/crds/streamjob.yaml

-include e2e/testbed.mk

