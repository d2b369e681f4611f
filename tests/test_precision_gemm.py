"""The mixed-precision GEMM (kernels/cuda/gemm16.py): nvmath-python's GemmEx bindings and enum
values it relies on, the 16-bit operand copies in their own layouts run through the column-major
mapping (a NumPy model of cuBLAS), and, on a real GPU (marked gpu), GemmEx against the float32
GEMM of the same 16-bit values and a bf16/fp16 training step against the CPU emulation."""

import inspect

import numpy as np
import pytest

from gpubackprop import precision as P
from gpubackprop.backend import has_cupy_gpu, is_cudasim

if is_cudasim():
    pytest.skip("the simulator replaces numba.cuda: this file runs in the non-simulator process",
                allow_module_level=True)

from gpubackprop.kernels.cuda import cublas, gemm16  # noqa: E402


def test_nvmath_bindings_and_enum_values():
    nvmath = pytest.importorskip("nvmath")
    from nvmath.bindings import cublas as nv

    for name, count in gemm16.BINDINGS.items():
        f = getattr(nv, name)
        params = inspect.signature(f).parameters if not f.__doc__ else \
            f.__doc__.split("(", 1)[1].split(")", 1)[0].split(",")
        assert len(params) == count, name
    assert int(nvmath.CudaDataType.CUDA_R_16F) == gemm16.CUDA_R_16F
    assert int(nvmath.CudaDataType.CUDA_R_16BF) == gemm16.CUDA_R_16BF
    assert int(nvmath.CudaDataType.CUDA_R_32F) == gemm16.CUDA_R_32F
    assert int(nv.ComputeType.COMPUTE_32F) == gemm16.CUBLAS_COMPUTE_32F
    assert int(nv.GemmAlgo.DEFAULT) == gemm16.CUBLAS_GEMM_DEFAULT


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("shapes", [((9, 6), (4, 6), "a @ b.T"), ((9, 4), (9, 6), "a.T @ b"),
                                    ((9, 4), (4, 6), "a @ b"), ((3, 2, 5, 7), (3, 2, 7, 4), "a @ b")])
def test_16bit_copies_keep_their_layout_and_the_mapped_gemm_is_exact(precision, shapes):
    from gpubackprop.kernels.cpu import CpuOps

    ops = CpuOps(np)
    rng = np.random.default_rng(0)
    a_shape, b_shape, form = shapes
    A = P.rounded(np, rng.normal(size=a_shape).astype(np.float32), precision)
    B = P.rounded(np, rng.normal(size=b_shape).astype(np.float32), precision)
    a = A.T if form.startswith("a.T") else A
    b = B.T if form.endswith("b.T") else B
    bufs = {}

    def scratch(shape):
        return bufs.setdefault(tuple(shape), np.empty(shape, P.storage_dtype(precision)))

    a16, b16 = (gemm16.as16(np, ops, x, precision, scratch) for x in (a, b))
    for x, x16 in ((a, a16), (b, b16)):
        assert x16.shape == x.shape
        assert x16.flags.c_contiguous == x.flags.c_contiguous  # a transposed view stays one
        np.testing.assert_array_equal(P.from_storage(np, np.ascontiguousarray(x16), precision), x)
    out = np.full(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                  np.nan)
    calls = cublas.gemm_calls(a16.shape, cublas.element_strides(a16), b16.shape,
                              cublas.element_strides(b16), out.shape, cublas.element_strides(out))
    wide = {id(x16): P.from_storage(np, x16.base if x16.base is not None else x16,
                                    precision).astype(np.float64).ravel() for x16 in (a16, b16)}
    for c in calls:
        cublas.emulate(c, wide[id(b16)], wide[id(a16)], out.reshape(-1))
    # Products of 16-bit values are exact in float32 and float64: only the sums round.
    np.testing.assert_allclose(out, np.matmul(a.astype(np.float64), b.astype(np.float64)),
                               rtol=1e-12, atol=1e-12)


gpu = pytest.mark.skipif(not has_cupy_gpu(), reason="needs a CUDA GPU with CuPy")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gemmex_equals_float32_gemm_of_the_16bit_values(precision):
    import cupy as cp

    import gpubackprop as gb

    model = gb.Sequential([gb.Dense(64, 32)], device="cuda", precision=precision)
    be = model.backend
    pytest.importorskip("nvmath")
    assert isinstance(be.matmul16, gemm16.Matmul16)
    rng = np.random.default_rng(1)
    for a_shape, b_shape, tb in [((256, 64), (32, 64), True), ((32, 256), (256, 64), False),
                                 ((256, 32), (32, 64), False), ((4, 3, 33, 17), (4, 3, 17, 9), False)]:
        A = P.rounded(np, rng.normal(size=a_shape).astype(np.float32), precision)
        B = P.rounded(np, rng.normal(size=b_shape).astype(np.float32), precision)
        a, b = cp.asarray(A), cp.asarray(B)
        got = be.matmul16(a, b.swapaxes(-1, -2) if tb else b)
        want = np.matmul(A.astype(np.float64), (B.swapaxes(-1, -2) if tb else B).astype(np.float64))
        np.testing.assert_allclose(cp.asnumpy(got), want, rtol=1e-5, atol=1e-5)
        # 16-bit storage operands as they are, and a 16-bit C: the float32 result rounded once
        # (to nearest even; a sum order apart, one 16-bit unit at most)
        a16, b16 = cp.asarray(P.to_storage(np, A, precision)), cp.asarray(P.to_storage(np, B,
                                                                                        precision))
        b16 = b16.swapaxes(-1, -2) if tb else b16
        np.testing.assert_array_equal(cp.asnumpy(be.matmul16(a16, b16)), cp.asnumpy(got))
        c16 = cp.empty(got.shape, P.storage_dtype(precision))
        assert be.matmul16(a16, b16, out=c16) is c16
        ulp = 2.0**-10 if precision == "fp16" else 2.0**-7
        np.testing.assert_allclose(P.from_storage(np, cp.asnumpy(c16), precision),
                                   P.rounded(np, cp.asnumpy(got), precision), rtol=ulp, atol=1e-6)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_training_step_matches_the_cpu_emulation(precision):
    import gpubackprop as gb

    X = np.random.default_rng(2).normal(size=(64, 20))
    y = np.arange(64) % 5
    params = []
    for device in ("cpu", "cuda"):
        model = gb.Sequential([gb.Dense(20, 32, activation="relu"), gb.Dense(32, 5)],
                              device=device, seed=3, precision=precision)
        opt = gb.SGD(lr=0.1, momentum=0.9)
        for _ in range(3):
            gb.train_step(model, gb.SoftmaxCrossEntropy(), opt, X, y)
        params.append(model.get_params())
    ulp = 2.0**-10 if precision == "fp16" else 2.0**-7
    for k in params[0]:  # GEMM sums in another order can move a 16-bit rounding by one unit
        np.testing.assert_allclose(params[1][k], params[0][k], rtol=4 * ulp, atol=1e-3)


# ---- Matmul16 end to end on the CPU: test_cublas_mapping's fake CuPy (NumPy memory) and fake
# bindings, with GemmEx reading 16-bit memory and writing float32 ---------------------------------
def _fakes():
    import ctypes

    from test_cublas_mapping import FAKE_CASES, _dev, _FakeBindings, _FakeCupy, _flat

    class Fake16(_FakeBindings):
        def _values16(self, ptr, extent, t):
            bits = np.ctypeslib.as_array((ctypes.c_uint16 * extent).from_address(ptr))
            if t == gemm16.CUDA_R_16F:
                return bits.view(np.float16).astype(np.float64)
            assert t == gemm16.CUDA_R_16BF
            return P.bf16_values(np, bits).astype(np.float64)

        def gemm_strided_batched_ex(self, h, ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb,
                                    sb, beta, C, ct, ldc, sc, batch, compute, algo):
            assert at == bt and ct in (gemm16.CUDA_R_32F, at)  # float32 C, or 16-bit as A, B
            assert compute == gemm16.CUBLAS_COMPUTE_32F and algo == gemm16.CUBLAS_GEMM_DEFAULT
            assert ctypes.c_float.from_address(alpha).value == 1
            assert ctypes.c_float.from_address(beta).value == 0
            ext_a = ((m - 1) + (k - 1) * lda if ta == cublas.OP_N else (k - 1) + (m - 1) * lda) + 1
            ext_b = ((k - 1) + (n - 1) * ldb if tb == cublas.OP_N else (n - 1) + (k - 1) * ldb) + 1
            ext_c = (m - 1) + (n - 1) * ldc + 1
            last = batch - 1
            call = cublas.GemmCall(ta, tb, m, n, k, lda, ldb, ldc, 0, 0, 0, batch, sa, sb, sc)
            a16, b16 = self._values16(A, ext_a + last * sa, at), self._values16(B, ext_b + last * sb, bt)
            if ct == gemm16.CUDA_R_32F:
                cublas.emulate(call, a16, b16, _flat(C, np.float32, ext_c + last * sc))
            else:  # the float32 accumulator rounded once into 16-bit C
                n_c = ext_c + last * sc
                c = self._values16(C, n_c, ct)
                cublas.emulate(call, a16, b16, c)
                bits = np.ctypeslib.as_array((ctypes.c_uint16 * n_c).from_address(C))
                store = P.to_storage(np, c.astype(np.float32), "fp16" if ct == gemm16.CUDA_R_16F
                                     else "bf16")
                bits[:] = store.view(np.uint16)
            self.log.append(("gemm_ex", h, batch, at, ct))

        def gemm_ex(self, h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc,
                    compute, algo):
            self.gemm_strided_batched_ex(h, ta, tb, m, n, k, alpha, A, at, lda, 0, B, bt, ldb, 0,
                                         beta, C, ct, ldc, 0, 1, compute, algo)

    return FAKE_CASES, _dev, Fake16, _FakeCupy


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_matmul16_end_to_end_on_fake_bindings(precision):
    from gpubackprop.kernels.cpu import CpuOps

    cases, dev, Fake16, FakeCupy = _fakes()
    rng = np.random.default_rng(7)
    for a_shape, b_shape, ta, tb in cases:
        cp, c = FakeCupy(), Fake16()
        mm = gemm16.Matmul16(cp, c, CpuOps(np), precision)
        # float32 operands holding 16-bit values (small integers over 8: exact in both formats)
        a, b = dev(rng, a_shape, np.float32, ta) / 8, dev(rng, b_shape, np.float32, tb) / 8
        out = cp.empty(np.matmul(np.asarray(a), np.asarray(b)).shape, np.float32)
        assert mm(a, b, out) is out
        np.testing.assert_array_equal(out, np.matmul(np.asarray(a, np.float64),
                                                     np.asarray(b, np.float64)))
        assert cp.matmul_calls == 0
        assert {e[3] for e in c.log if e[0] == "gemm_ex"} == {gemm16.TYPE16[precision]}
    mm(dev(rng, (3, 4), np.float64, False), dev(rng, (4, 2), np.float64, False))  # not float32
    assert cp.matmul_calls == 1


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_matmul16_reads_16_bit_storage_as_it_is_and_writes_16_bit_c(precision):
    """The CUDA set's Dense hands GemmEx 16-bit storage (X₁₆, the weight copy's transposed view
    W₁₆ᵀ, Δ₁₆ᵀ): no cast kernel for them; C float32 (Z, BP3) or 16-bit (BP2 to a 16-bit Dense)."""
    from gpubackprop.kernels.cpu import CpuOps

    cases, dev, Fake16, FakeCupy = _fakes()
    rng = np.random.default_rng(9)
    st = P.storage_dtype(precision)

    class CountingOps(CpuOps):
        casts = 0

        def cast16(self, X, H, precision):
            CountingOps.casts += 1
            return super().cast16(X, H, precision)

    for a_shape, b_shape, ta, tb in cases[:4]:  # the 2-D ones: Dense's GEMMs
        cp, c = FakeCupy(), Fake16()
        mm = gemm16.Matmul16(cp, c, CountingOps(np), precision)
        a, b = dev(rng, a_shape, np.float32, ta) / 8, dev(rng, b_shape, np.float32, tb) / 8
        want = np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64))
        a16 = P.to_storage(np, np.asarray(a), precision)  # 16-bit storage in a's layout
        b16 = P.to_storage(np, np.asarray(b), precision)
        a16 = (a16.T.copy().T if ta else a16).view(type(a))
        b16 = (b16.T.copy().T if tb else b16).view(type(b))
        CountingOps.casts = 0
        out = cp.empty(want.shape, np.float32)
        assert mm(a16, b16, out) is out
        np.testing.assert_array_equal(out, want)
        assert CountingOps.casts == 0
        mm(a16, b, out)  # a 16-bit and a float32 operand (inference: X float32, W₁₆ᵀ)
        np.testing.assert_array_equal(out, want)
        assert CountingOps.casts == 1
        out16 = cp.empty(want.shape, st)
        assert mm(a16, b16, out16) is out16
        np.testing.assert_array_equal(P.from_storage(np, np.asarray(out16), precision), want)
        assert [e[4] for e in c.log if e[0] == "gemm_ex"] == \
            [gemm16.CUDA_R_32F] * 2 + [gemm16.TYPE16[precision]]
        assert cp.matmul_calls == 0
