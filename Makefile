# The single entry point for building, running, testing and benchmarking; CI runs `make test` via .ci/run.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3
# Setup in three steps, each redone only when its inputs change: the locked dependencies `make run` needs, the
# locked extras `make test` needs, and the project itself (the Rust extension, rebuilt incrementally by cargo
# when a Rust or Python-packaging file changes, without touching the installed dependencies).
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
STAMP := $(VENV)/.project-installed
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check
# The minimum declared versions (floor.lock), in a virtual environment of their own for `make floor-test`.
FLOOR_VENV := .venv-floor

HOST ?= 127.0.0.1
PORT ?= 7500
KEYS ?= keys
WORKERS ?= 1
BENCH_SECONDS ?= 5
# Rounds of the load harness: each figure is the median of this many interleaved measurements.
BENCH_ROUNDS ?= 3
SOAK_MINUTES ?= 3
# Fuzzing: seconds per fuzzer within `make test`, and for `make fuzz`.
FUZZ_SMOKE_SECONDS ?= 20
FUZZ_SECONDS ?= 600
CARGO_FUZZ_VERSION := 0.13.2
FUZZ_CRATE := rust/tang-p521/fuzz
# libFuzzer and AddressSanitizer need nightly flags; this machine has only the stable toolchain, which accepts
# them when told it is bootstrapping itself.
CARGO_FUZZ := RUSTC_BOOTSTRAP=1 cargo fuzz

# Debian packages the interop tests and benchmarks drive: the real client (with its LUKS workflows), the jose
# oracle, the reference server and the tools around it; cryptsetup works on LUKS images in plain files, and
# systemd's socket-activation and analysis tools work without systemd running.
DEBIAN_PACKAGES := clevis clevis-luks cryptsetup-bin luksmeta jose tang socat curl wrk openssl prometheus haproxy \
	systemd

SOURCES := pyproject.toml Cargo.toml Cargo.lock $(wildcard rust/*/Cargo.toml) \
	$(shell find rust python -name '*.rs' -o -name '*.pyi' 2>/dev/null)

# `make dist`: the sdist and one manylinux wheel for every CPython >= 3.11 (abi3). zig links against glibc 2.28's
# symbols (RHEL 8 and later) whatever the build host has; its own target directory keeps the editable build's
# objects (gcc) from being rebuilt each time.
DIST ?= dist
WHEEL_TAG := manylinux_2_28

.PHONY: help prerequisites run test floor-test lock dist lint cargo-llvm-cov bench profile capacity soak overload fuzz fuzz-smoke cargo-fuzz debian-packages rust-test python-test clean

help:
	@echo "make run    serve the Tang protocol on $(HOST):$(PORT) from ./$(KEYS) (keys generated on first start)"
	@echo "make test   install everything needed, then run the Rust and Python tests and the linters"
	@echo "make dist   build the sdist and a $(WHEEL_TAG) abi3 wheel into ./$(DIST), checked by auditwheel"
	@echo "make lint   ruff, mypy --strict, stubtest, cargo clippy -D warnings, cargo fmt --check"
	@echo "make bench  P-521 candidates against openssl speed, micro benchmarks, and the wrk load harness"
	@echo "make capacity  throughput and latency by workers and offered load: bench/results/capacity/report.md"
	@echo "make soak   a bounded long run reporting worker memory at start and end (SOAK_MINUTES=3)"
	@echo "make overload  /rec at 2x saturation, open loop, with and without backpressure"
	@echo "make fuzz   cargo fuzz on the P-521 API and the raw-socket fuzzer, FUZZ_SECONDS=600 each"

# One clear line per missing tool instead of a build error screen (no root needed for `make run`).
prerequisites:
	@bash tools/check-prerequisites $(PYTHON)

$(RUNTIME_STAMP): requirements/runtime.lock requirements/build.lock | prerequisites
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --require-hashes -r requirements/runtime.lock -r requirements/build.lock
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements/dev.lock
	$(PIP_INSTALL) --require-hashes -r requirements/dev.lock
	touch $@

# --no-deps: the dependencies come from the lock only; --no-build-isolation: the locked maturin builds (its build
# hook runs `maturin` from PATH, hence the venv first), and cargo reuses ./target, so a change to one Rust file
# recompiles that crate, not the environment.
$(STAMP): $(RUNTIME_STAMP) $(SOURCES)
	PATH="$(abspath $(BIN)):$$PATH" $(PIP_INSTALL) --no-deps --no-build-isolation -e .
	touch $@

run: $(STAMP)
	$(BIN)/tang-server serve --keys-dir $(KEYS) --host $(HOST) --port $(PORT) --workers $(WORKERS)

debian-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

# The Rust tests, instrumented: cargo llvm-cov runs `cargo test --workspace` and reports line coverage.
CARGO_LLVM_COV_VERSION := 0.9.1
cargo-llvm-cov:
	@cargo llvm-cov --version >/dev/null 2>&1 || { rustup component add llvm-tools-preview && \
		cargo install --locked cargo-llvm-cov --version $(CARGO_LLVM_COV_VERSION); }

rust-test: cargo-llvm-cov
	cargo llvm-cov --workspace --locked --summary-only

# The Python tests, with the coverage of python/tang_server over every process they start, and the lines no test
# runs listed (no threshold: the list is for readers; README, "How it is tested").
python-test: $(DEV_STAMP) $(STAMP) debian-packages
	tools/coverage

# The Python tests against the minimum version of every runtime dependency pyproject.toml declares (CI runs it).
$(FLOOR_VENV)/.installed: requirements/floor.lock $(SOURCES) | prerequisites
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install --quiet --disable-pip-version-check --require-hashes -r requirements/floor.lock
	$(FLOOR_VENV)/bin/pip check
	PATH="$(abspath $(FLOOR_VENV))/bin:$$PATH" $(FLOOR_VENV)/bin/pip install --quiet --disable-pip-version-check \
		--no-deps --no-build-isolation -e .
	touch $@

floor-test: $(FLOOR_VENV)/.installed debian-packages
	$(FLOOR_VENV)/bin/python requirements/floors.py --check pyproject.toml
	$(FLOOR_VENV)/bin/pytest -p no:cacheprovider

# Regenerate the locks after changing a dependency in pyproject.toml or requirements/*.in (needs the network).
UV_VERSION := 0.13.9
lock:
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION) packaging
	cd requirements && ../$(VENV)-lock/bin/python floors.py ../pyproject.toml > floors.txt
	cd requirements && for args in "runtime.lock ../pyproject.toml" "build.lock build.in" \
		"dev.lock ../pyproject.toml dev.in --all-extras -c runtime.lock" \
		"floor.lock ../pyproject.toml dev.in --all-extras --override floors.txt"; do \
		set -- $$args; out=$$1; shift; \
		../$(VENV)-lock/bin/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
			--custom-compile-command "make lock" "$$@" -o $$out || exit 1; \
	done
	rm -rf $(VENV)-lock requirements/floors.txt

dist: $(DEV_STAMP)
	rm -rf $(DIST)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/maturin sdist --out $(DIST)
	PATH="$(abspath $(BIN)):$$PATH" CARGO_TARGET_DIR=target/dist $(BIN)/maturin build --release --locked --zig \
		--compatibility $(WHEEL_TAG) --out $(DIST)
	$(BIN)/auditwheel show $(DIST)/*.whl

test: debian-packages $(DEV_STAMP) $(STAMP) rust-test python-test fuzz-smoke lint

lint: $(DEV_STAMP) $(STAMP)
	$(BIN)/ruff check python tests bench requirements
	$(BIN)/ruff format --check python tests bench requirements
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

fuzz: cargo-fuzz $(DEV_STAMP) $(STAMP) debian-packages
	cd $(FUZZ_CRATE) && $(CARGO_FUZZ) run exchange -- -max_total_time=$(FUZZ_SECONDS)
	TANG_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/pytest tests/test_http_fuzz.py -s -o timeout=0

bench: $(DEV_STAMP) $(STAMP) debian-packages
	cargo run --release --quiet --manifest-path bench/p521-candidates/Cargo.toml
	openssl speed -seconds 3 ecdhp521 2>/dev/null | tail -2
	cargo build --release --quiet -p tang-p521 --example mul_rate
	$(BIN)/pytest bench --benchmark-only --benchmark-columns=min,median,mean,ops
	cd bench && ../$(BIN)/python load.py --seconds $(BENCH_SECONDS) --rounds $(BENCH_ROUNDS) --workers $(WORKERS) \
		--peers reference,tangy,constant --variant nolog=--no-access-log

profile: $(DEV_STAMP) $(STAMP) debian-packages
	cd bench && ../$(BIN)/python profile.py

capacity: $(DEV_STAMP) $(STAMP) debian-packages
	cargo build --release --quiet -p tang-p521 --example mul_rate
	cd bench && ../$(BIN)/python capacity.py --seconds $(BENCH_SECONDS)

soak: $(DEV_STAMP) $(STAMP) debian-packages
	cd bench && ../$(BIN)/python soak.py --minutes $(SOAK_MINUTES) --workers $(WORKERS)

overload: $(DEV_STAMP) $(STAMP) debian-packages
	cd bench && ../$(BIN)/python overload.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) target bench/p521-candidates/target $(FUZZ_CRATE)/target
