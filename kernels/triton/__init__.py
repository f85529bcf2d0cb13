"""Triton GPU kernels (imported only by the triton backend)."""
