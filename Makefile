# fraudstream: the two commands a newcomer needs are `make demo` and `make test`.
# Everything heavy (libtorch, the test broker and S3 store, cargo's target
# directory) is cached per machine under $(FRAUDSTREAM_CACHE).
SHELL := /bin/bash
export FRAUDSTREAM_CACHE ?= $(HOME)/.cache/fraudstream
LIBTORCH_VARIANT ?= cpu
export LIBTORCH := $(FRAUDSTREAM_CACHE)/libtorch-$(LIBTORCH_VARIANT)
export CARGO_TARGET_DIR ?= $(FRAUDSTREAM_CACHE)/target
CARGO_FEATURES := $(if $(filter cuda,$(LIBTORCH_VARIANT)),--features cuda,)
BIN := $(CARGO_TARGET_DIR)/release

.PHONY: demo test build libtorch services-start services-stop lint bench faults

## demo: build, then run the whole pipeline in one process on embedded defaults
demo: build
	$(BIN)/fraudstream demo

## test: libtorch + broker + S3 store, fmt, clippy, every test; services stopped at the end
test: libtorch
	scripts/test

## build: release binaries `fraudstream` and `fraudstream-trainer`
build: libtorch
	cargo build --release --workspace $(CARGO_FEATURES)

libtorch:
	@scripts/setup-libtorch $(if $(filter cuda,$(LIBTORCH_VARIANT)),--cuda,) >/dev/null

services-start:
	scripts/test-services start

services-stop:
	scripts/test-services stop

lint: libtorch
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets $(CARGO_FEATURES) -- -D warnings

## bench: side-by-side benchmarks against the real broker; writes docs/benchmarks.md
bench: libtorch
	scripts/bench

## faults: only the fault-injection suites (also part of `make test`)
faults: libtorch
	scripts/test faults
