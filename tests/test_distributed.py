"""Data-parallel training: 2 ranks with batch B/2 each against 1 process with batch B.

The multi-process tests launch ``mpiexec -n 2`` (MPICH from the ``mpi`` extra) on
tests/mpi_worker.py, with one BLAS thread per rank and a timeout, so a hang fails the test.
"""

import os
import shutil
import subprocess
import sys
import time

import mpi_worker
import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backend import cupy_module, has_cupy_gpu
from gpubackprop.distributed import (
    LAUNCHER_PREFIXES,
    LAUNCHER_VARIABLES,
    Communicator,
    communicator,
    shard_bounds,
)

HERE = os.path.dirname(os.path.abspath(__file__))

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep +
                       os.environ.get("PATH", ""))
# make test installs the mpi extra and sets GPUBACKPROP_REQUIRE_MPI=1: there a missing mpiexec fails.
needs_mpi = pytest.mark.skipif(MPIEXEC is None and os.environ.get("GPUBACKPROP_REQUIRE_MPI") != "1",
                               reason="needs mpiexec (pip install 'gpubackprop[mpi]')")
TIMEOUT = 120


def mpiexec(out, *args, ranks=2, **environ):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1", **environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    t0 = time.perf_counter()
    done = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable,
                           os.path.join(HERE, "mpi_worker.py"), str(out), *map(str, args)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)
    return done, time.perf_counter() - t0


def single_process(mode, epochs=mpi_worker.EPOCHS, device="cpu"):
    X, y = mpi_worker.data(mode)
    model = mpi_worker.model_for(mode, device)
    hist = gb.fit(model, gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.1, momentum=0.9), X, y,
                  epochs=epochs, batch_size=mpi_worker.BATCH, progress=False)
    return hist, model.get_params()


def test_shards_cover_the_batch_in_order():
    for n, size in [(16, 2), (5, 2), (1, 2), (7, 3)]:
        pieces = [shard_bounds(10, 10 + n, r, size) for r in range(size)]
        assert pieces[0][0] == 10 and pieces[-1][1] == 10 + n
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))
        sizes = [hi - lo for lo, hi in pieces]
        assert max(sizes) - min(sizes) <= 1


def test_single_communicator_and_bad_names():
    c = communicator("single")
    assert isinstance(c, Communicator) and (c.rank, c.size, c.is_root) == (0, 1, True)
    a = np.arange(3.0)
    assert c.allreduce_sum(a) is a and c.broadcast(a) is a
    with pytest.raises(ValueError, match=r"communicator: expected one of \('single', 'mpi', "
                                         r"'nccl'\), got 'gloo'"):
        communicator("gloo")


def test_fit_with_the_single_communicator_is_plain_fit():
    h1, p1 = single_process("mlp")
    X, y = mpi_worker.data("mlp")
    model = mpi_worker.model_for("mlp")
    h2 = gb.fit(model, gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.1, momentum=0.9), X, y,
                epochs=mpi_worker.EPOCHS, batch_size=mpi_worker.BATCH, progress=False,
                comm="single")
    assert h1 == h2
    for k, v in model.get_params().items():
        np.testing.assert_array_equal(v, p1[k])


def assert_ranks_equal_one_process(out, mode, device="cpu"):
    """Both ranks' parameters bitwise equal, and equal to one process's with the whole batch."""
    r0, r1 = (np.load(out / f"{mode}-rank{r}.npz") for r in (0, 1))
    hist, expected = single_process(mode, device=device)
    np.testing.assert_allclose(r0["loss"], hist["loss"], rtol=1e-12)
    for k, v in expected.items():
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=f"{k}: ranks differ")
        np.testing.assert_allclose(r0[k], v, rtol=1e-12, atol=1e-13, err_msg=k)


def gpu_count():
    return cupy_module().cuda.runtime.getDeviceCount() if has_cupy_gpu() else 0


@needs_mpi
@pytest.mark.parametrize("mode", ["mlp", "cnn", "graph"])
def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path, mode):
    done, _ = mpiexec(tmp_path, mode)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_ranks_equal_one_process(tmp_path, mode)


@needs_mpi
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["mlp", "cnn"])
def test_two_ranks_on_the_gpu_through_mpi_equal_one_process(tmp_path, mode):
    # CuPy gradients cross MPI through a host copy (the MPI from the extra is not CUDA-aware);
    # both ranks may share one GPU.
    done, _ = mpiexec(tmp_path, mode, GB_DEVICE="cuda", GB_COMM="mpi")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_ranks_equal_one_process(tmp_path, mode, "cuda")


@needs_mpi
@pytest.mark.gpu
@pytest.mark.parametrize("comm", ["mpi", "nccl"])
def test_collectives_on_device_arrays(tmp_path, comm):
    # NCCL takes one GPU per rank: on a one-GPU machine its collectives run on a single rank.
    ranks = 2 if comm == "mpi" else min(2, gpu_count())
    done, _ = mpiexec(tmp_path, "collectives", ranks=ranks, GB_COMM=comm)
    assert done.returncode == 0, done.stderr[-3000:]
    for r in range(ranks):
        assert (tmp_path / f"collectives-rank{r}.ok").read_text().startswith(
            f"{'NCCL' if comm == 'nccl' else 'MPI'}Communicator(rank={r}, size={ranks})")


@needs_mpi
@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 2, reason="NCCL data-parallel training needs two GPUs")
@pytest.mark.parametrize("mode", ["mlp", "cnn"])
def test_two_ranks_over_nccl_equal_one_process(tmp_path, mode):
    done, _ = mpiexec(tmp_path, mode, GB_DEVICE="cuda", GB_COMM="nccl")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_ranks_equal_one_process(tmp_path, mode, "cuda")


@needs_mpi
def test_a_killed_two_rank_run_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    part = tmp_path / "part"
    full.mkdir()
    part.mkdir()
    done, _ = mpiexec(full, "mlp")
    assert done.returncode == 0, done.stderr[-3000:]
    killed, _ = mpiexec(part, "mlp", 7)  # dies at step 7, after the checkpoint of step 6
    assert killed.returncode != 0
    assert (part / "run.npz").exists() and not (part / "mlp-rank0.npz").exists()
    done, _ = mpiexec(part, "resume")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = np.load(full / "mlp-rank0.npz"), np.load(part / "resume-rank0.npz")
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@needs_mpi
def test_a_failing_rank_ends_the_job_with_a_clear_error(tmp_path):
    done, seconds = mpiexec(tmp_path, "bad-data")
    assert done.returncode != 0
    assert "X: " in done.stderr and "rank 1 failed; aborting all 2 ranks" in done.stderr
    assert seconds < TIMEOUT


def _cli(cwd, *args, ranks=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    cmd = [sys.executable, "-m", "gpubackprop", "train", *map(str, args)]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=env)


@needs_mpi
def test_the_command_line_under_mpiexec_trains_like_one_process(tmp_path):
    from gpubackprop.checkpoint import load_checkpoint

    common = ["--dataset", "digits", "--epochs", "2", "--dtype", "float64", "--batch-size", "64",
              "--quiet"]
    one = _cli(tmp_path, *common, "--checkpoint", "one.npz")
    two = _cli(tmp_path, *common, "--comm", "mpi", "--checkpoint", "two.npz",
               "--metrics-json", "two.json", ranks=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("test accuracy") == 1  # rank 0 alone reports
    assert (tmp_path / "two.json").exists()
    a, b = load_checkpoint(tmp_path / "one.npz").params, load_checkpoint(tmp_path / "two.npz").params
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-12, atol=1e-13, err_msg=k)


@needs_mpi
def test_a_bad_argument_under_mpiexec_ends_every_rank(tmp_path):
    done = _cli(tmp_path, "--dataset", "npz:missing.npz", "--comm", "mpi", ranks=2)
    assert done.returncode != 0
    assert "error: " in done.stderr and "missing.npz" in done.stderr


def test_launched_by_mpi_reads_the_launchers_environment():
    from gpubackprop.distributed import launched_by_mpi

    assert not launched_by_mpi({"PATH": "/usr/bin", "HOME": "/root", "OMP_NUM_THREADS": "1"})
    for env in ({"PMI_RANK": "0", "PMI_SIZE": "1", "PMI_FD": "9"},  # MPICH's hydra and gforker
                {"OMPI_COMM_WORLD_SIZE": "2"}, {"PMIX_RANK": "0"},  # Open MPI
                {"HYDI_CONTROL_FD": "7"}, {"MPI_LOCALNRANKS": "1"}):
        assert launched_by_mpi(env), env


def _python(code, ranks=None):
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES and not k.startswith(LAUNCHER_PREFIXES)}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    cmd = [sys.executable, "-c", code]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)


@needs_mpi
def test_mpi_without_a_launcher_is_an_error_and_under_mpiexec_n_1_is_not(tmp_path):
    code = ("from gpubackprop.distributed import launched_by_mpi, require_launcher\n"
            "print('launched', launched_by_mpi())\n"
            "require_launcher('mpi', command='mpiexec -n N python train.py')\n"
            "print('allowed')\n")
    alone = _python(code)
    assert alone.returncode != 0 and "launched False" in alone.stdout
    assert "ValueError: comm: 'mpi' trains data-parallel across processes started by an MPI " \
           "launcher, but this process was not started by one" in alone.stderr
    assert "start it with 'mpiexec -n N python train.py'" in alone.stderr
    one = _python(code, ranks=1)  # what MPICH's mpiexec really sets is recognised
    assert one.returncode == 0 and "launched True" in one.stdout and "allowed" in one.stdout, \
        one.stderr[-2000:]
    done = _cli(tmp_path, "--dataset", "digits", "--epochs", "1", "--layers", "8", "--device",
                "cpu", "--comm", "mpi", "--quiet", ranks=1)
    assert done.returncode == 0 and "test accuracy" in done.stdout, done.stderr[-2000:]
