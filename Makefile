# mflux-server: every target works from a fresh clone; the first one run creates .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The mflux release the engine and tests/contract are checked against, and the MLX it pins.
MFLUX_VERSION := 0.24.0
MLX_VERSION := 0.32.2
# What mflux imports at run time for FLUX.1 text-to-image, and OpenCV for the ControlNet's Canny map (headless:
# no GUI libraries). On Linux we install these instead of mflux's own metadata, which pulls CUDA PyTorch
# (gigabytes) that nothing here uses.
MFLUX_RUNTIME := "tqdm>=4.66.5,<5" "huggingface-hub>=1.1.6,<2" "platformdirs>=4,<5" "numpy>=2.0.1,<3" \
	"piexif>=1.1.3,<2" "toml>=0.10.2,<1" "transformers>=5.5,<6" "safetensors>=0.4.4,<1" \
	"sentencepiece>=0.2.1,<1" "regex>=2024.11.6" "pyyaml>=6,<7" "requests>=2.33" "filelock>=3.20.1" \
	"fsspec>=2026.6.0" "opencv-python-headless>=4.10,<6"
ARGS ?=
# Which MLX backend `make install` puts in on Linux: auto (CUDA where nvidia-smi sees a GPU, else CPU), cpu or
# cuda; and the extras beside the server (the container image installs none: no test or benchmark tools).
MLX_FLAVOUR ?= auto
EXTRAS ?= test,bench

.PHONY: help install run test test-fast test-engine engine-check lint bench fuzz clean browser postgres openblas containers

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: setup.cfg pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install --quiet -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	@if [ "$$(uname -s)" = Darwin ]; then \
		echo "installing mflux $(MFLUX_VERSION) for macOS"; \
		$(BIN)/pip install --quiet "mflux==$(MFLUX_VERSION)"; \
	else \
		case "$(MLX_FLAVOUR)" in \
			cuda) mlx="mlx[cuda13]==$(MLX_VERSION)";; cpu) mlx="mlx[cpu]==$(MLX_VERSION)";; \
			auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
				mlx="mlx[cuda13]==$(MLX_VERSION)"; else mlx="mlx[cpu]==$(MLX_VERSION)"; fi;; \
			*) echo "MLX_FLAVOUR must be auto, cpu or cuda, not $(MLX_FLAVOUR)" >&2; exit 2;; \
		esac; \
		echo "installing mflux $(MFLUX_VERSION) without its PyTorch dependency, with $$mlx"; \
		$(BIN)/pip install --quiet "$$mlx" $(MFLUX_RUNTIME) && \
		$(BIN)/pip install --quiet --no-deps "mflux==$(MFLUX_VERSION)"; \
	fi
	touch $@

install: $(VENV)/.installed ## create .venv and install the server, mflux and the test tools

run: install ## start the API and one worker; Ctrl-C stops both
	@trap 'kill -TERM $$api $$worker 2>/dev/null; wait' INT TERM; \
	$(BIN)/mflux-worker $(ARGS) & worker=$$!; \
	$(BIN)/mflux-server & api=$$!; \
	wait

test: install browser postgres openblas containers ## run every test: tests/fast, tests/engine (mflux's own code) and tests/process (real processes)
	$(BIN)/python -m pytest -q $(ARGS)

browser: ## Debian's chromium for the web UI tests (Playwright cannot download its own browser here)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	echo "WARNING: chromium could not be installed: the web UI tests will skip (they fail under CI=true)"

postgres: ## Debian's PostgreSQL server binaries, which the PostgreSQL store tests start a throwaway server from
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	echo "WARNING: PostgreSQL could not be installed: the PostgreSQL store tests will skip (they fail under CI=true)"

# Three workers on two cores: a third of the tier waits (sleeps, PostgreSQL, subprocesses). Plugins are loaded by
# name: hypothesis's and schemathesis's (the fuzz tests', in tests/process) took a second of every worker's start.
test-fast: install ## run the in-process tests only (tests/fast, under 15 seconds)
	@# PYTHONDONTWRITEBYTECODE= : pytest keeps its rewritten test modules, and Python its compiled ones, between runs
	PYTHONDONTWRITEBYTECODE= PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(BIN)/python -m pytest -q -p xdist -n 3 tests/fast $(ARGS)

test-engine: install ## every served model through mflux's own classes, networks stood in for (tests/engine, < 1 minute)
	$(BIN)/python -m pytest -q tests/engine $(ARGS)

containers: ## Debian's podman, runc and debootstrap, which the container test builds and runs the image with
	@{ command -v podman && command -v runc && { command -v debootstrap || ls /usr/sbin/debootstrap; }; } >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null; } || \
	echo "WARNING: podman could not be installed: the container test will skip (it fails under CI=true)"

openblas: ## Debian's OpenBLAS, which the real-network tests preload under MLX's CPU backend (its bundled BLAS is ~50x slower)
	@ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1 || [ "$$(uname -s)" != Linux ] || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null; } || \
	echo "WARNING: OpenBLAS could not be installed: the real-network tests run on MLX's reference BLAS (they fail under CI=true)"

lint: install ## check style with ruff and types with mypy (product code)
	$(BIN)/pip install --quiet "ruff>=0.6" "mypy>=1.11"
	$(BIN)/ruff check --isolated --line-length 130 --select E,F,W,I,UP,B \
		--config "lint.isort.known-first-party=['mflux_server','bench','tests']" mflux_server worker tests bench
	rm -rf build/typecheck build/lib && $(BIN)/pip install --quiet --no-deps --no-build-isolation --target build/typecheck .
	cd build/typecheck && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/setup.cfg -p mflux_server

bench: install ## run the benchmarks and write docs/benchmarks.md
	@command -v wrk >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y -q wrk >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }; }; } || \
		echo "wrk is not installed: benchmark 3 falls back to Python clients, which understate the server"
	$(BIN)/python -m bench $(ARGS)

engine-check: install openblas ## every served family through the real worker, random weights; writes docs/engine-check.md
	$(BIN)/python -m bench.engine_check $(ARGS)

fuzz: install ## a long schemathesis run over every operation of the spec (about 20,000 cases; ARGS='--examples N')
	$(BIN)/python -m tests.fuzzing $(ARGS)

clean: ## remove .venv and caches
	rm -rf $(VENV) build *.egg-info .pytest_cache bench/out
