# clipmask: `make demo` runs the main job, `make test` runs every test. Each target does its
# own set-up (Python env with torch==2.11.0 for libtorch, build) first.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export CLIPMASK_PYTHON := $(VENV)/bin/python
export PYO3_PYTHON := $(VENV)/bin/python
BIN := target/release/clipmask

.PHONY: all venv build wheel test test-python lint demo bench gpu-check clean

all: build

venv:
	@bash scripts/setup-venv.sh

build: venv
	cargo build --release

# The Python wheel (dist/): maturin over crates/clipmask-py, against .venv's torch.
wheel: venv
	bash scripts/build-wheel.sh

test: venv
	@bash scripts/setup-system.sh
	cargo build --release
	cargo test --release -- --test-threads=1
	$(MAKE) test-python

# The wheel, installed into a fresh venv, against the binary (tests/wheel, pytest).
test-python: wheel
	bash scripts/test-wheel.sh

# Format, lints and docs, warnings as errors (CI runs it after the tests).
lint: venv
	cargo fmt --check
	cargo clippy --release --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps

demo: build
	bash scripts/demo.sh

# The benchmark programs are examples/ (never installed by `cargo install`).
bench: build
	cargo build --release --examples
	bash scripts/bench.sh

# The CUDA check of issue 16, for a device machine (scripts/gpu-check.sh; --dry-run on CPU).
gpu-check: build
	bash scripts/gpu-check.sh

clean:
	cargo clean
