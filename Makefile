# Every target sets up .venv itself from nothing; the stamp re-installs when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-cpu test-cudasim demo bench gpu-check lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,demo,bench,lint,mpi]"
	touch $(STAMP)

test: test-cpu test-cudasim

# GPUBACKPROP_REQUIRE_*: the CUDA compile check and the multi-process tests fail, rather than skip,
# without NVVM/ptxas or mpiexec (both installed above).
test-cpu: $(STAMP)
	GPUBACKPROP_REQUIRE_PTXAS=1 GPUBACKPROP_REQUIRE_MPI=1 $(PY) -m pytest -q -m "not cudasim" tests

# Numba's CUDA simulator must be switched on before Numba is imported: its own process.
test-cudasim: $(STAMP)
	NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest -q -m cudasim tests

demo: $(STAMP)
	$(PY) -m gpubackprop.demo

bench: $(STAMP)
	$(PY) -m pip install --quiet torch==2.13.0 || echo "PyTorch not installed: its rows will say so"
	$(PY) -m bench
	$(PY) -m bench.mpi_scaling

# On a machine with an NVIDIA GPU: every test on the device, the demo on cuda, a host-sync count,
# and the benchmarks (against PyTorch CUDA if it is installed); results in bench/results/gpu-check-<gpu>.json and .md.
gpu-check: $(STAMP)
	$(PY) -m pip install --quiet -e ".[gpu,test,bench]"
	$(PY) -m bench.gpu_check

lint: $(STAMP)
	$(VENV)/bin/ruff check gpubackprop kernels tests bench examples

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
