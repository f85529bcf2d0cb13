"""Kernels: the numpy reference (the specification) and the Triton GPU kernels."""
