# The two commands of the README, each setting itself up on a fresh machine:
#   make test    the test suite
#   make bench   the main job: the pytest-benchmark suite of bench/, saved under bench/results/, then its
#                summary table, rows (JSON) and plot (PNG) beside the saved run (bench/README.md)
#   make bench BENCH_COMPARE=0001   the same, compared with saved run 0001: fails when a benchmark's
#                fastest round is more than BENCH_THRESHOLD slower (default 200%, for shared machines:
#                see bench/README.md; 10% suits a dedicated one)
# Both create .venv when it is missing (torch, triton and this package with its test and bench extras),
# and reuse it when it is there; edits to setup.py, pyproject.toml or csrc/ rebuild the package.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.recap-kernels-installed
CSRC := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)
BENCH_ARGS ?=
BENCH_RESULTS ?= bench/results
BENCH_COMPARE ?=
BENCH_THRESHOLD ?= 200%

.PHONY: test bench info install clean

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pytest bench -p no:cacheprovider --benchmark-autosave --benchmark-storage=file://$(BENCH_RESULTS) \
	  --benchmark-columns=median,iqr,rounds --benchmark-sort=name \
	  $(if $(BENCH_COMPARE),--benchmark-compare=$(BENCH_COMPARE) --benchmark-compare-fail=min:$(BENCH_THRESHOLD)) \
	  $(BENCH_ARGS)
	$(PY) -m recap_kernels.bench.report $(BENCH_RESULTS)

info: $(STAMP)
	$(PY) -m recap_kernels info

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch (with triton) first: the package builds against it, without build isolation.
$(STAMP): $(PY) pyproject.toml setup.py $(CSRC)
	$(PY) -m pip install torch setuptools wheel ninja packaging
	$(PY) -m pip install --no-build-isolation -e '.[test,bench]'
	touch $@

clean:
	rm -rf build dist *.egg-info recap_kernels/_C*.so recap_kernels/_build_info.json
