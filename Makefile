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
# Fuzzing: seconds per fuzzer within `make test`, and for `make fuzz`.
FUZZ_SMOKE_SECONDS ?= 20
FUZZ_SECONDS ?= 600
CARGO_FUZZ_VERSION := 0.13.2
FUZZ_CRATE := rust/tang-p521/fuzz
# libFuzzer and AddressSanitizer need nightly flags; this machine has only the stable toolchain, which accepts
# them when told it is bootstrapping itself.
CARGO_FUZZ := RUSTC_BOOTSTRAP=1 cargo fuzz

# Debian packages the interop tests and benchmarks drive: the real client, the jose oracle, the reference
# server and the tools around it.
DEBIAN_PACKAGES := clevis jose tang socat curl wrk openssl prometheus haproxy

SOURCES := pyproject.toml Cargo.toml Cargo.lock $(wildcard rust/*/Cargo.toml) \
	$(shell find rust python -name '*.rs' -o -name '*.pyi' 2>/dev/null)

.PHONY: help run test lint bench capacity soak overload fuzz fuzz-smoke cargo-fuzz debian-packages rust-test python-test clean

help:
	@echo "make run    serve the Tang protocol on $(HOST):$(PORT) from ./$(KEYS) (keys generated on first start)"
	@echo "make test   install everything needed, then run the Rust and Python tests and the linters"
	@echo "make lint   ruff, mypy --strict, stubtest, cargo clippy -D warnings, cargo fmt --check"
	@echo "make bench  P-521 candidates against openssl speed, micro benchmarks, and the wrk load harness"
	@echo "make capacity  throughput and latency by workers and offered load: bench/results/capacity/report.md"
	@echo "make soak   a bounded long run reporting worker memory at start and end (SOAK_MINUTES=3)"
	@echo "make overload  /rec at 2x saturation, open loop, with and without backpressure"
	@echo "make fuzz   cargo fuzz on the P-521 API and the raw-socket fuzzer, FUZZ_SECONDS=600 each"

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

test: debian-packages $(STAMP) rust-test python-test fuzz-smoke lint

lint: $(STAMP)
	$(BIN)/ruff check python tests bench
	$(BIN)/ruff format --check python tests bench
	$(BIN)/mypy
	$(BIN)/python -m mypy.stubtest tang_server._native
	cargo clippy --workspace --all-targets --locked -- -D warnings
	cargo fmt --all --check
	cargo clippy --manifest-path $(FUZZ_CRATE)/Cargo.toml --locked -- -D warnings
	cargo fmt --manifest-path $(FUZZ_CRATE)/Cargo.toml --check

cargo-fuzz:
	@cargo fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz --version $(CARGO_FUZZ_VERSION)

# The bounded run inside `make test` (the raw-socket fuzzer runs in pytest, TANG_FUZZ_SECONDS, default 10).
fuzz-smoke: cargo-fuzz
	cd $(FUZZ_CRATE) && $(CARGO_FUZZ) run exchange -- -max_total_time=$(FUZZ_SMOKE_SECONDS)

fuzz: cargo-fuzz $(STAMP) debian-packages
	cd $(FUZZ_CRATE) && $(CARGO_FUZZ) run exchange -- -max_total_time=$(FUZZ_SECONDS)
	TANG_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/pytest tests/test_http_fuzz.py -s -o timeout=0

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

overload: $(STAMP) debian-packages
	cd bench && ../$(BIN)/python overload.py

clean:
	rm -rf $(VENV) target bench/p521-candidates/target $(FUZZ_CRATE)/target
