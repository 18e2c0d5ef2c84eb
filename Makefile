# The two commands: `make demo` and `make test`. Each sets up everything it needs from nothing.
# `make check` is the inner loop: `make test` without the timelimit, kill and bench tiers.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_DONE := $(VENV)/.stampbatch-pip
INSTALLED := $(VENV)/.stampbatch-installed
DEMO_DIR ?= demo-output
export TF_CPP_MIN_LOG_LEVEL ?= 2
export TF_ENABLE_ONEDNN_OPTS ?= 1
# pytest-xdist: 3 workers on the 2-core machine. The tests that submit Slurm jobs form one
# xdist group, run first by one worker (they mostly wait on Slurm's --time=2 limits and
# requeues) while the other two run the CPU-bound tests; tests sharing a trained run or a Dask
# cluster form groups too, so it is built once. tests/conftest.py sets the groups and their
# order (--no-loadscope-reorder keeps it) and (_GroupIds) makes them hold under pytest 9,
# whose Node.nodeid no longer reads the tag xdist 3.8 sets.
# PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 3
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder)
CHECK_MARKERS := not timelimit and not kill and not bench

.PHONY: demo test check test-setup system-setup lint slurm-up slurm-down test-tools bench clean

$(PIP_DONE): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# No pip self-upgrade first: Python 3.11's own pip installs editable pyproject builds.
	@# --no-compile: pip compiles one file at a time (~45 of its ~105 s here); the bytecode
	@# is compiled on every core below, beside ruff and mypy (`make -j2 test-setup lint`).
	$(PY) -m pip install --quiet --no-compile -e '.[test,slurm]'
	@touch $@

# Bytecode for the dependencies and the package (an editable install leaves it uncompiled):
# where it is never written at import (PYTHONDONTWRITEBYTECODE, read-only venvs), every
# process would otherwise recompile what it imports, TensorFlow included (16 s, not 7).
# The dependencies' own test suites (a quarter of their source) are never imported: skipped.
$(INSTALLED): $(PIP_DONE)
	$(PY) -m compileall -q -j 0 -x '/site-packages/.*/tests/' $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') stampbatch >/dev/null
	@touch $@

# A real single-node Slurm (root + apt needed). Outside CI a failure only warns: the tests
# that need Slurm then fail with the reason; in CI (CI=true) it stops the run at once.
slurm-up:
	@if [ "$$(id -u)" = 0 ]; then \
		bash tests/slurm/up.sh || { [ "$${CI:-}" != true ] || exit 1; echo "warning: Slurm did not start; Slurm tests will fail" >&2; }; \
	else echo "warning: not root, cannot start the local Slurm; Slurm tests will fail" >&2; fi

slurm-down:
	bash tests/slurm/down.sh

# strace: the kill tests (scorer write pass, trainer checkpoints) inject SIGKILL at exact syscalls.
test-tools:
	@command -v strace >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			{ apt-get install -y -qq --no-install-recommends strace >/dev/null 2>&1 || \
			  { apt-get update -qq && apt-get install -y -qq --no-install-recommends strace >/dev/null; }; }; \
		elif [ "$${CI:-}" = true ]; then echo "error: strace missing and cannot be installed" >&2; exit 1; \
		else echo "warning: strace missing and cannot be installed; the kill tests will fail" >&2; fi; }

# mypy: the whole package, strict on the public API's modules ([tool.mypy] in pyproject.toml).
lint: $(PIP_DONE)
	$(VENV)/bin/ruff check stampbatch tests benchmarks tools
	$(VENV)/bin/mypy

# The machine's set-up (apt: Slurm, then strace; one apt at a time) beside the venv's pip
# install: `make -j2 test-setup lint` runs the two at once, then ruff.
system-setup:
	@$(MAKE) --no-print-directory slurm-up
	@$(MAKE) --no-print-directory test-tools

test-setup: $(INSTALLED) system-setup

test:
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-setup lint
	$(PY) -m pytest $(XDIST)

check:
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-setup lint
	$(PY) -m pytest $(XDIST) -m "$(CHECK_MARKERS)"

demo: $(INSTALLED) slurm-up
	$(PY) -m stampbatch.demo --out $(DEMO_DIR)

bench: $(INSTALLED)
	$(PY) benchmarks/bench_preprocess.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
