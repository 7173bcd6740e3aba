# fluxrig — the README's two commands are `make demo` and `make test`; both set everything up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest

.PHONY: all install build demo demo-standalone test test-tools test-compiled test-pure bench binary binary-mixer footprint clean firmware-test firmware-clean help

all: build

help:
	@echo "make demo          Mixer (API 8090, Snake 4222) + a local Rack: tcp-echo on 9000, ISO 8583 authorizer on 8583"
	@echo "make demo-standalone  the Rack alone with tcp-echo on 127.0.0.1:9000"
	@echo "make test          install everything, build the Cython twins, run the suite compiled then pure"
	@echo "make bench         run the benchmarks (JSON lines)"
	@echo "make binary        build dist/fluxrig (PyInstaller, one file, accelerated build required)"
	@echo "make firmware-test build and smoke-test the Rack for arm64/armhf under QEMU (slow, cached)"

$(STAMP): pyproject.toml setup.py $(wildcard mixer/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel "Cython>=3.0"
	FLUXRIG_REQUIRE_EXTENSIONS=1 $(BIN)/pip install -q --no-build-isolation -e '.[test,speed,binary]'
	$(BIN)/pip install -q --no-build-isolation -e 'mixer[test]'
	touch $(STAMP)

install: $(STAMP)

# The accelerated build is required here: a failed compile stops the build.
build: $(STAMP)
	FLUXRIG_REQUIRE_EXTENSIONS=1 $(BIN)/python setup.py -q build_ext --inplace
	FLUXRIG_REQUIRE_ACCELERATED=1 $(BIN)/fluxrig version

# The Standard tier: a Mixer (API 8090, Snake 4222) and a local Rack running tcp-echo (9000) and
# the ISO 8583 authorizer (8583); it prints the API token and what to try.
demo: build
	$(BIN)/fluxrig-mixer up --state-dir ./data/demo

# The Rack alone, no Mixer: tcp-echo on 127.0.0.1:9000.
demo-standalone: build
	FLUXRIG_BASE_STATE_DIR=./data/standalone $(BIN)/fluxrig run --scenario scenarios/tcp-echo.yaml

test: build test-tools test-compiled test-pure

# systemd-analyze for the unit-file tests (Debian's systemd package when missing)
test-tools:
	systemd/install-test-tools.sh

# Rack suites, then the Mixer suites in a fresh interpreter: the Mixer end-to-end tests run a
# Mixer in-process and must not share it with threads other suites leave behind.
test-compiled:
	FLUXRIG_REQUIRE_ACCELERATED=1 $(PYTEST) -q -p no:cacheprovider -m "not mixer"
	FLUXRIG_REQUIRE_ACCELERATED=1 $(PYTEST) -q -p no:cacheprovider -m mixer

# The backend-sensitive suites again with the pure-Python originals.
test-pure:
	FLUXRIG_PURE_PYTHON=1 $(PYTEST) -q -p no:cacheprovider -m "not slow and not binary and not mixer"

bench: build
	$(BIN)/python bench/pipeline.py --json
	$(BIN)/python bench/framing.py --json
	$(BIN)/python bench/iso8583_codec.py --json
	$(BIN)/python bench/iso8583_e2e.py --json
	$(BIN)/python bench/reload.py --json
	$(BIN)/python bench/wal.py --json
	$(BIN)/python bench/outage.py --json
	$(BIN)/python bench/guaranteed_lane.py --json
	$(BIN)/python bench/telemetry_ingest.py --json
	$(BIN)/python bench/fleet.py --json

binary: build
	FLUXRIG_REQUIRE_EXTENSIONS=1 PYTHON=$(BIN)/python packaging/build.sh fluxrig

binary-mixer: build
	FLUXRIG_REQUIRE_EXTENSIONS=1 PYTHON=$(BIN)/python packaging/build.sh fluxrig-mixer

footprint: binary
	$(BIN)/python bench/footprint.py --json

# arm64 + armhf Rack builds in cached Debian rootfs under QEMU user mode (slow; not in `make test`)
firmware-test: install
	firmware-tests/run.sh

firmware-clean:
	firmware-tests/clean.sh

clean:
	rm -rf build dist *.egg-info fluxrig/_speedups/*.so fluxrig/_speedups/*.c .pytest_cache
