"""Triton kernels of zokern (installed as zokern.kernels)."""
