"""Device helpers shared by the CUDA kernels.

NVVM contracts ``a * b + c`` into one fused multiply-add. Where the reference rounds the product
first and the formula can cancel (the optimizers, gelu, tanh'), ``mul`` keeps the product rounded
on its own (an fma with a -0.0 addend, which NVVM cannot fuse further), so the GPU rounds as the
reference does.
"""

from gpubackprop.kernels.cuda.launch import cuda, device_function


@device_function
def mul(x, y, nz):
    """x * y rounded on its own: NVVM cannot contract it into a following add (nz is -0.0)."""
    return cuda.fma(x, y, nz)


@device_function
def unravel_nchw(idx, C, H, W):
    """(n, c, h, w) of the flat row-major index ``idx`` into an (N, C, H, W) array."""
    q = idx // W
    w = idx - q * W
    p = q // H
    h = q - p * H
    n = p // C
    return n, p - n * C, h, w


# Integer min/max for index bounds. Python's builtins are typed differently across Numba's CUDA
# targets (numba's own numba.cuda rejected min(int, int) in a kernel: "Signature mismatch: 2
# argument types given"; it is the target numba falls back to when numba-cuda is not loaded), so
# the kernels use these.
@device_function
def imin(a, b):
    return a if a < b else b


@device_function
def imax(a, b):
    return a if a > b else b


@device_function
def tree_sum(a, tid, nt):
    """a[0] = Σ a[:nt] (nt a power of two) in a fixed order; every thread has written its a[tid]."""
    cuda.syncthreads()
    half = nt // 2
    while half > 0:
        if tid < half:
            a[tid] += a[tid + half]
        cuda.syncthreads()
        half //= 2


@device_function
def tree_max(a, tid, nt):
    """a[0] = max a[:nt] (nt a power of two), NaN if any is NaN; every thread has written its a[tid]."""
    cuda.syncthreads()
    half = nt // 2
    while half > 0:
        if tid < half:
            v = a[tid + half]
            if v > a[tid] or v != v:
                a[tid] = v
        cuda.syncthreads()
        half //= 2


@device_function
def tree_sum2(a, b, tid, nt):
    """tree_sum of two arrays with the same barriers."""
    cuda.syncthreads()
    half = nt // 2
    while half > 0:
        if tid < half:
            a[tid] += a[tid + half]
            b[tid] += b[tid + half]
        cuda.syncthreads()
        half //= 2
