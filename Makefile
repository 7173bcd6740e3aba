# fluxrig — the README's two commands are `make demo` and `make test`; both set everything up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest

.PHONY: all install build demo demo-cluster test-cluster-chaos demo-standalone test test-tools test-compiled test-pure test-long test-archive lint bench binary binary-mixer footprint clean firmware-test firmware-clean help image image-test deb chaos-test test-console-perf

all: build

help:
	@echo "make demo          Mixer (API 8090, Snake 4222) + a local Rack: tcp-echo on 9000, ISO 8583 authorizer on 8583"
	@echo "make demo-standalone  the Rack alone with tcp-echo on 127.0.0.1:9000"
	@echo "make demo-cluster  three Mixer nodes as one cluster (APIs 8090-8092, Snakes 4222-4224) + a local Rack"
	@echo "make test-cluster-chaos  randomized kill -9 / SIGSTOP runs on a 3-node cluster (slow; one JSON line)"
	@echo "make test          install everything, build the Cython twins, run the suite compiled then pure"
	@echo "make test-long     the end-to-end failure and load runs over 8 s each (outages, SIGKILLs, clusters; ~10 min)"
	@echo "make lint          ruff format --check and ruff check (part of make test)"
	@echo "make bench         run the benchmarks (JSON lines)"
	@echo "make binary        build dist/fluxrig (PyInstaller, one file, accelerated build required)"
	@echo "make firmware-test build and smoke-test the Rack for arm64/armhf under QEMU (slow, cached)"
	@echo "make image         OCI images of the Rack and the Mixer in build/images/ (no daemon, reproducible)"
	@echo "make image-test    the image and package suites (slow: frozen builds, podman, dpkg; not in make test)"
	@echo "make deb           Debian packages fluxrig_<v>_<arch>.deb and fluxrig-mixer_<v>_amd64.deb in build/packages/"

$(STAMP): pyproject.toml setup.py $(wildcard mixer/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel "Cython>=3.0"
	FLUXRIG_REQUIRE_ACCELERATED=1 $(BIN)/pip install -q --no-build-isolation -e '.[test,speed,binary]'
	$(BIN)/pip install -q --no-build-isolation -e 'mixer[test]'
	touch $(STAMP)

install: $(STAMP)

# The accelerated build is required here: a failed compile stops the build.
build: $(STAMP)
	FLUXRIG_REQUIRE_ACCELERATED=1 $(BIN)/python setup.py -q build_ext --inplace
	FLUXRIG_REQUIRE_ACCELERATED=1 $(BIN)/fluxrig version

# The Standard tier: a Mixer (API 8090, Snake 4222) and a local Rack running tcp-echo (9000) and
# the ISO 8583 authorizer (8583); it prints the API token and what to try.
demo: build
	$(BIN)/fluxrig-mixer up --state-dir ./data/demo

# The Institutional tier on one machine (issue 14): three Mixer nodes routed into one cluster
# (APIs 8090-8092, Snakes 4222-4224, routes 6222-6224, loopback), R3 streams and a local Rack;
# it prints every node's addresses and how to kill one and watch the others carry on.
demo-cluster: build
	$(BIN)/fluxrig-mixer up --cluster 3 --state-dir ./data/demo-cluster

# The cluster's randomized failure runs (kill -9 / SIGSTOP of whole nodes under guaranteed
# traffic; tests/test_cluster_chaos.py), one JSON line; CLUSTER_CHAOS_RUNS=N (default 10).
test-cluster-chaos: build
	FLUXRIG_REQUIRE_ACCELERATED=1 $(PYTEST) -q -p no:cacheprovider -s -m cluster_chaos

# The Rack alone, no Mixer: tcp-echo on 127.0.0.1:9000.
demo-standalone: build
	FLUXRIG_BASE_STATE_DIR=./data/standalone $(BIN)/fluxrig run --scenario scenarios/tcp-echo.yaml

test: build lint test-tools test-compiled test-pure

# The house style (line length 120, config in pyproject.toml): formatted, and lint-clean.
lint: $(STAMP)
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .

# systemd-analyze for the unit-file tests (Debian's systemd package when missing)
test-tools:
	systemd/install-test-tools.sh

# Rack suites, then the Mixer suites in a fresh interpreter: the Mixer end-to-end tests run a
# Mixer in-process and must not share it with threads other suites leave behind.
test-compiled:
	FLUXRIG_REQUIRE_ACCELERATED=1 $(PYTEST) -q -p no:cacheprovider -m "not mixer and not image and not chaos and not soak and not long"
	FLUXRIG_REQUIRE_ACCELERATED=1 $(PYTEST) -q -p no:cacheprovider -m "mixer and not soak and not console_perf and not chaos and not long"

# The suites of code with a Cython twin (marker `backend`, tests/conftest.py) again with the
# pure-Python originals: the differential tests compare both backends in either pass.
test-pure:
	FLUXRIG_PURE_PYTHON=1 $(PYTEST) -q -p no:cacheprovider -m "backend and not slow and not binary and not mixer and not image and not chaos and not long"

# End-to-end failure and load runs over 8 s each (tests/conftest.py LONG_TESTS): not in `make test`.
test-long: build test-tools
	FLUXRIG_REQUIRE_ACCELERATED=1 $(PYTEST) -q -p no:cacheprovider -m "long and not mixer"
	FLUXRIG_REQUIRE_ACCELERATED=1 $(PYTEST) -q -p no:cacheprovider -m "long and mixer"

# The ClickHouse archive's long runs (issue 15): 20 SIGKILLs between insert and ack, a 60 s outage;
# then the archive against the current ClickHouse engine (chdb-core, installed here: ~0.5 GB).
test-archive: build test-tools
	$(BIN)/pip install -q --no-build-isolation -e 'mixer[archive-compat]'
	FLUXRIG_REQUIRE_ACCELERATED=1 $(PYTEST) -q -p no:cacheprovider -s -m soak
	FLUXRIG_REQUIRE_ACCELERATED=1 $(PYTEST) -q -p no:cacheprovider tests/test_mixer_clickhouse_current.py

# The web console with 500 Racks in headless Chromium: every page under 1 s, 1280x800 and 420 px.
test-console-perf: build test-tools
	FLUXRIG_REQUIRE_ACCELERATED=1 $(PYTEST) -q -p no:cacheprovider -s -m console_perf

bench: build
	$(BIN)/python bench/pipeline.py --json
	$(BIN)/python bench/framing.py --json
	$(BIN)/python bench/iso8583_codec.py --json
	$(BIN)/python bench/iso8583_e2e.py --json
	$(BIN)/python bench/reload.py --json
	$(BIN)/python bench/reload.py --rebuild-io --json
	$(BIN)/python bench/wal.py --json
	$(BIN)/python bench/outage.py --json
	$(BIN)/python bench/guaranteed_lane.py --json
	$(BIN)/python bench/telemetry_ingest.py --json
	$(BIN)/python bench/fleet.py --json

binary: build
	FLUXRIG_REQUIRE_ACCELERATED=1 PYTHON=$(BIN)/python packaging/build.sh fluxrig

binary-mixer: build
	FLUXRIG_REQUIRE_ACCELERATED=1 PYTHON=$(BIN)/python packaging/build.sh fluxrig-mixer

footprint: binary
	$(BIN)/python bench/footprint.py --json

# arm64 + armhf Rack builds in cached Debian rootfs under QEMU user mode (slow; not in `make test`)
firmware-test: install
	firmware-tests/run.sh

firmware-clean:
	firmware-tests/clean.sh

# Long crash and failure runs (the switch SIGKILLed 20 times under load, ...): minutes each.
chaos-test: build
	FLUXRIG_REQUIRE_ACCELERATED=1 $(PYTEST) -q -p no:cacheprovider -m chaos

# --- distribution (packaging/README.md): images and Debian packages ------------------------------
# Frozen builds are kept per source hash under build/frozen/ (packaging/frozen.py): built once,
# reused by image, deb and image-test. Times are the commit's (SOURCE_DATE_EPOCH): reproducible.
DIST_EPOCH = SOURCE_DATE_EPOCH=$${SOURCE_DATE_EPOCH:-$$(git log -1 --format=%ct)}

image: build
	$(DIST_EPOCH) $(BIN)/python packaging/image.py

image-test: build test-tools
	packaging/install-dist-tools.sh
	$(DIST_EPOCH) FLUXRIG_REQUIRE_ACCELERATED=1 $(PYTEST) -q -p no:cacheprovider -s -m image

# amd64 from the host's frozen builds; arm64/armhf Racks when `make firmware-test` left them.
deb: build
	packaging/install-dist-tools.sh
	$(DIST_EPOCH) $(BIN)/python packaging/deb.py

clean:
	rm -rf build dist *.egg-info fluxrig/*/*_c.*.so fluxrig/*/*_c.c .pytest_cache
