"""Kernel sets behind the backend ops: ``reference`` (plain xp), ``cpu`` (Numba CPU), ``cuda`` (Numba CUDA).

Nothing is imported here, so ``import gpubackprop`` never pays for Numba compilation; the backend
loads the set a model asks for on first use.
"""
