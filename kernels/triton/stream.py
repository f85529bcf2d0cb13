"""The counter-based random stream of :mod:`sampling.stream`, as Triton device functions.

Native wrapping ``uint32`` arithmetic gives exactly the int64-masked words of the numpy
definition (both multipliers and ``GOLDEN`` are below 2**31), so every function here is
bit-identical to its numpy twin; ``tests/test_triton_interpret.py`` checks that.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sampling import stream as _spec

# Module-level ints are read as constants inside @triton.jit functions.
MUL1 = tl.constexpr(_spec.MUL1)
MUL2 = tl.constexpr(_spec.MUL2)
GOLDEN = tl.constexpr(_spec.GOLDEN)
SALT = tl.constexpr(_spec.SALT)
UNSEEDED = tl.constexpr(_spec.UNSEEDED)
BLOCK_SALT = tl.constexpr(_spec.BLOCK_SALT)
BLOCK = tl.constexpr(_spec.BLOCK)


@triton.jit
def mix32(x):
    """The two-round multiply-xorshift finaliser on uint32 tensors."""
    x = x ^ (x >> 16)
    x = x * tl.full([], MUL1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], MUL2, tl.uint32)
    return x ^ (x >> 15)


@triton.jit
def row_key(seed_lo, seed_hi, position):
    """Key of a seeded row; arguments are uint32 (the low words of seed and position)."""
    k = mix32(seed_lo ^ tl.full([], SALT, tl.uint32))
    k = mix32(k ^ seed_hi)
    return mix32(k ^ position)


@triton.jit
def unseeded_key(sampler_lo, sampler_hi, call, row):
    """Key of a row without a seed: the sampler's seed, its call counter and the row index."""
    base = row_key(sampler_lo, sampler_hi, call)
    return mix32(base ^ (row ^ tl.full([], UNSEEDED, tl.uint32)))


@triton.jit
def block_key(key):
    """The block stream's key of a row key (two-level choice of untruncated rows)."""
    return mix32(key ^ tl.full([], BLOCK_SALT, tl.uint32))


@triton.jit
def token_bits(key, token):
    """32-bit hash of (row key, token id), both uint32."""
    return mix32(key ^ (token * tl.full([], GOLDEN, tl.uint32)))


@triton.jit
def gumbel64(key, token):
    """Gumbel noise in float64 (the reference precision), for the few candidates of a row."""
    h = token_bits(key, token.to(tl.uint32))
    u = ((h >> 9) * 2 + 1).to(tl.int32).to(tl.float64) * 5.9604644775390625e-08
    return -tl.log(-tl.log(u))
