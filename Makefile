# Every target sets up .venv itself from nothing, with only the extras it needs: `make demo` the
# package and the demo extra (NumPy, Numba, scikit-learn), `make test` the test and mpi extras
# (numba-cuda's NVVM/ptxas wheels, mpiexec). One stamp per set, so one target does not reinstall
# another's; a stamp re-installs when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# -qq: errors only. With one -q setuptools still prints its notice about editable installs of a
# package-dir mapping (kernels/ -> gpubackprop.kernels), which the fixed layout needs.
PIP_QUIET := -qq
VENV_STAMP := $(VENV)/.created
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
LINT_STAMP := $(VENV)/.installed-lint

.PHONY: test test-cpu test-cudasim demo bench gpu-check lint clean

$(VENV_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(DEMO_STAMP): pyproject.toml | $(VENV_STAMP)
	$(PY) -m pip install $(PIP_QUIET) -e ".[demo]"
	touch $@

$(TEST_STAMP): pyproject.toml | $(VENV_STAMP)
	$(PY) -m pip install $(PIP_QUIET) -e ".[test,mpi]"
	touch $@

# bench.mpi_scaling runs under mpiexec.
$(BENCH_STAMP): pyproject.toml | $(VENV_STAMP)
	$(PY) -m pip install $(PIP_QUIET) -e ".[bench,mpi]"
	touch $@

$(LINT_STAMP): pyproject.toml | $(VENV_STAMP)
	$(PY) -m pip install $(PIP_QUIET) -e ".[lint]"
	touch $@

test: test-cpu test-cudasim

# GPUBACKPROP_REQUIRE_*: the CUDA compile check and the multi-process tests fail, rather than skip,
# without NVVM/ptxas or mpiexec (both installed above).
test-cpu: $(TEST_STAMP)
	GPUBACKPROP_REQUIRE_PTXAS=1 GPUBACKPROP_REQUIRE_MPI=1 $(PY) -m pytest -q -m "not cudasim" tests

# Numba's CUDA simulator must be switched on before Numba is imported: its own process.
test-cudasim: $(TEST_STAMP)
	NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest -q -m cudasim tests

demo: $(DEMO_STAMP)
	$(PY) -m gpubackprop.demo

bench: $(BENCH_STAMP)
	$(PY) -m pip install --quiet torch==2.13.0 || echo "PyTorch not installed: its rows will say so"
	$(PY) -m bench
	$(PY) -m bench.mpi_scaling

# On a machine with an NVIDIA GPU: every test on the device, the demo on cuda, a host-sync count,
# and the benchmarks (against PyTorch CUDA if it is installed); results in bench/results/gpu-check-<gpu>.json and .md.
gpu-check: $(TEST_STAMP)
	$(PY) -m pip install $(PIP_QUIET) -e ".[gpu,test,bench,mpi]"
	$(PY) -m bench.gpu_check

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check gpubackprop kernels tests bench examples

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
