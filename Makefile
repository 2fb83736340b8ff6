# Set-up and everyday commands. Every target creates the virtualenv itself, with
# torch pinned first: a package that needs torch would otherwise pull whatever
# build pip picks. PyPI's torch 2.13.0 for Linux is the CUDA build (several GB);
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU one. (Where
# pip is configured with a local wheel folder, as on the project's CI machines,
# the pin alone finds the CPU build there.) To change either in an existing
# .venv: make clean first.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
TORCH_INDEX ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Test processes (pytest-xdist): most tests wait on a server they started, so two keep two
# cores busy. Each module stays in one process (its servers are started once).
# PYTEST_WORKERS=0 runs the suite in this process alone.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: venv run test test-fast lint bench proto clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m tokenmill.engine.native  # the C++ CPU kernels, built once for this machine
	touch $@

venv: $(VENV)/.installed

## run: serve the embedded demo model (OpenAI HTTP on :8000, gRPC on :50051); ARGS= passes options
run: venv
	$(VENV)/bin/tokenmill serve $(ARGS)

## test: lint, then the whole test suite
test: venv
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(PYTEST)

## test-fast: the suite without tests marked slow
test-fast: venv
	$(PYTEST) -m "not slow"

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

bench: venv
	$(PY) benchmarks/offline_throughput.py

## proto: regenerate the gRPC code checked in next to src/tokenmill/protocol/generation.proto
proto: venv
	$(PY) -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src \
		src/tokenmill/protocol/generation.proto

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
