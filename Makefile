# `make serve` and `make test` work on a fresh machine: each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export JAXEMBED_CACHE ?= $(CURDIR)/.cache
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?=

.PHONY: serve test venv dev chromium compiler lint bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The runtime install; stamped so repeated runs are instant.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q -e .
	touch $@

# torch is pinned to the CPU wheel first: a bare `torch` would pull several GB of CUDA.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

# The playground's browser tests drive the system's Chromium (Debian's package); nothing downloads
# a browser at test time. Installed when missing and this is root on Debian; otherwise those tests
# say what to install (and fail under CI).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "note: no Chromium; install Debian's 'chromium' package for the playground tests"; fi

# jaxembed.kernels compiles its CPU kernels with the system's C++ compiler on first use (and keeps
# XLA's ops where there is none); the suite expects them wherever the CPU has AVX512-BF16.
compiler:
	@command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++; \
	else echo "note: no C++ compiler; attention and bfloat16 decoding fall back to XLA's slower ops"; fi

serve: $(VENV)/.installed
	$(BIN)/jaxembed serve --host $(HOST) --port $(PORT) $(if $(MODEL),--model $(MODEL),)

test: $(VENV)/.installed-dev chromium compiler
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

bench: $(VENV)/.installed-dev
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
