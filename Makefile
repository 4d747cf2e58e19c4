# The single entry point for building, running, testing and benchmarking; CI runs `make test` via .ci/run.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3
STAMP := $(VENV)/.installed

HOST ?= 127.0.0.1
PORT ?= 7500
KEYS ?= keys
WORKERS ?= 1
BENCH_SECONDS ?= 5
SOAK_MINUTES ?= 3

# Debian packages the interop tests and benchmarks drive: the real client, the jose oracle, the reference
# server and the tools around it.
DEBIAN_PACKAGES := clevis jose tang socat curl wrk openssl prometheus

SOURCES := pyproject.toml Cargo.toml Cargo.lock $(wildcard rust/*/Cargo.toml) \
	$(shell find rust python -name '*.rs' -o -name '*.pyi' 2>/dev/null)

.PHONY: help run test lint bench capacity soak debian-packages rust-test python-test clean

help:
	@echo "make run    serve the Tang protocol on $(HOST):$(PORT) from ./$(KEYS) (keys generated on first start)"
	@echo "make test   install everything needed, then run the Rust and Python tests and the linters"
	@echo "make lint   ruff, mypy --strict, stubtest, cargo clippy -D warnings, cargo fmt --check"
	@echo "make bench  P-521 candidates against openssl speed, micro benchmarks, and the wrk load harness"
	@echo "make capacity  throughput and latency by workers and offered load: bench/results/capacity/report.md"
	@echo "make soak   a bounded long run reporting worker memory at start and end (SOAK_MINUTES=3)"

$(STAMP): $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint,bench,kubernetes]'
	touch $@

run: $(STAMP)
	$(BIN)/tang-server serve --keys-dir $(KEYS) --host $(HOST) --port $(PORT) --workers $(WORKERS)

debian-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

rust-test:
	cargo test --workspace --locked

python-test: $(STAMP) debian-packages
	$(BIN)/pytest

test: debian-packages $(STAMP) rust-test python-test lint

lint: $(STAMP)
	$(BIN)/ruff check python tests bench
	$(BIN)/ruff format --check python tests bench
	$(BIN)/mypy
	$(BIN)/python -m mypy.stubtest tang_server._native
	cargo clippy --workspace --all-targets --locked -- -D warnings
	cargo fmt --all --check

bench: $(STAMP) debian-packages
	cargo run --release --quiet --manifest-path bench/p521-candidates/Cargo.toml
	openssl speed -seconds 3 ecdhp521 2>/dev/null | tail -2
	cargo build --release --quiet -p tang-p521 --example mul_rate
	$(BIN)/pytest bench --benchmark-only --benchmark-columns=min,median,mean,ops
	cd bench && ../$(BIN)/python load.py --seconds $(BENCH_SECONDS) --workers $(WORKERS)

capacity: $(STAMP) debian-packages
	cargo build --release --quiet -p tang-p521 --example mul_rate
	cd bench && ../$(BIN)/python capacity.py --seconds $(BENCH_SECONDS)

soak: $(STAMP) debian-packages
	cd bench && ../$(BIN)/python soak.py --minutes $(SOAK_MINUTES) --workers $(WORKERS)

clean:
	rm -rf $(VENV) target bench/p521-candidates/target
