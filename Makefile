# The two commands of the README, each setting itself up on a fresh machine:
#   make test    the test suite           make bench   the main job (python -m recap_kernels bench)
# Both create .venv when it is missing (torch, triton and this package with its test extras),
# and reuse it when it is there; edits to setup.py, pyproject.toml or csrc/ rebuild the package.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.recap-kernels-installed
CSRC := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)
BENCH_ARGS ?=

.PHONY: test bench info install clean

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m recap_kernels bench $(BENCH_ARGS)

info: $(STAMP)
	$(PY) -m recap_kernels info

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch (with triton) first: the package builds against it, without build isolation.
$(STAMP): $(PY) pyproject.toml setup.py $(CSRC)
	$(PY) -m pip install torch setuptools wheel ninja packaging
	$(PY) -m pip install --no-build-isolation -e '.[test]'
	touch $@

clean:
	rm -rf build dist *.egg-info recap_kernels/_C*.so recap_kernels/_build_info.json
