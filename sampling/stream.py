"""The counter-based random stream: one definition, implemented bit-identically by every backend.

A draw never depends on batch size, batch order or the backend: the uniform number used for
token ``t`` of a row is a pure function of that row's seed, its stream position and ``t``.

Definition (all words are unsigned 32-bit, ``&`` masks to 32 bits after every product)::

    mix32(x)  = x ^= x >> 16;  x *= 0x21F0AAAD;  x ^= x >> 15;  x *= 0x735A2D97;  x ^= x >> 15
    row key   = mix32(mix32(mix32(seed_lo ^ SALT) ^ seed_hi) ^ position)
    token bits h = mix32(row_key ^ (t * GOLDEN))
    u         = (2 * (h >> 9) + 1) / 2**24          # odd multiples of 2**-24: exact in float32, 0 < u < 1
    E         = -log(u)                             # an Exp(1) variate
    G         = -log(E)                             # a Gumbel variate

``mix32`` is a two-round multiply-xorshift finaliser; its multipliers come from Chris Wellons'
hash-prospector search. Both multipliers (and ``GOLDEN``) are below 2**31, so every product of a
32-bit word with them fits in a signed 64-bit integer without overflow: frameworks without
unsigned 32-bit arithmetic (torch, MindSpore) compute the same bits in int64, and Triton uses
native wrapping uint32 arithmetic.

Choice rule of a truncated row (top-k, top-p or min-p active): among the surviving tokens ``S``,
the chosen token is ``argmax_{t in S} (z_t + G_t)`` (Gumbel-max, equivalently the exponential
race ``argmin E_t / p_t``), lowest id on exact ties, where ``z`` are the penalised,
temperature-scaled logits. This draws ``t`` with probability ``p_t = exp(z_t) / sum_S exp(z_s)``.

Choice rule of a row without truncation (every token survives): two levels. The ids are cut into
blocks of ``BLOCK`` = 4 (block ``j`` holds ids ``4j .. 4j + 3``; the last block may be shorter)::

    L_j       = log sum_{t in block j} exp(z_t)           # the block's log-mass
    block key = mix32(row_key ^ BLOCK_SALT)
    block bits c_j = mix32(block key ^ (j * GOLDEN))    # uniforms and G'_j from c_j as above
    J         = argmax_j (L_j + G'_j)                   # lowest j on exact ties
    token     = argmax_{t in block J} (z_t + G_t)       # lowest id on exact ties

The block is drawn with probability ``exp(L_J) / sum_j exp(L_j)`` (Gumbel-max over blocks) and
the token within it with ``exp(z_t - L_J)``: their product is ``p_t``, the same law as the
one-level rule, from independent streams. A GPU pass over the row then hashes one word per
block instead of one per token (the hash was most of the plain pass's arithmetic), and the
token's own noise only in the rare blocks that lead their part of the row.

``position`` is the number of valid ids in the row's ``output_ids`` (0 without them), so a
request's draws advance one step per generated token. Rows without a seed use the sampler's own
seed ``S`` and its call counter ``n``: ``row key = mix32(key(S_lo, S_hi, n) ^ (row ^ UNSEEDED))``.
"""

from __future__ import annotations

import numpy as np

MASK32 = 0xFFFFFFFF
MUL1 = 0x21F0AAAD
MUL2 = 0x735A2D97
GOLDEN = 0x61C88647  # 2**32 / phi, rounded to odd, below 2**31
SALT = 0x5EED5EED
UNSEEDED = 0x0DDBA11
#: Tokens per block of the two-level choice of rows without truncation, and its key's salt.
BLOCK = 4
BLOCK_SALT = 0x0B10C4ED
#: Odd multiples of 2**-24 need 24 significant bits: exact in float32.
U_SCALE = 2.0**-24
#: The largest seed accepted (seeds are unsigned 64-bit integers; -1 means "no seed").
MAX_SEED = 2**64 - 1


def mix32(x):
    """The 32-bit finaliser on int64 / uint64 / uint32 arrays (numpy, torch and MindSpore alike).

    Inputs must hold values in [0, 2**32); outputs do too.
    """
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    return x ^ (x >> 15)


def split_seed(seed: int) -> tuple[int, int]:
    """A seed in [0, 2**64) as its (low, high) 32-bit words."""
    return seed & MASK32, (seed >> 32) & MASK32


def row_keys(seed_lo, seed_hi, position):
    """The per-row key of a seeded row (int64 arrays holding 32-bit words)."""
    k = mix32(seed_lo ^ SALT)
    k = mix32(k ^ seed_hi)
    return mix32(k ^ (position & MASK32))


def unseeded_keys(sampler_seed: int, call: int, rows):
    """Keys of rows without a seed: the sampler's seed, its call counter and the row index."""
    lo, hi = split_seed(sampler_seed)
    base = row_keys(np.int64(lo), np.int64(hi), np.int64(call & MASK32))
    return mix32(base ^ (rows ^ UNSEEDED))


def token_bits(keys, token_ids):
    """32-bit hash of (row key, token id); ``keys`` [B, 1], ``token_ids`` broadcastable."""
    return mix32(keys ^ ((token_ids * GOLDEN) & MASK32))


def two_level_rows(params, vocab: int):
    """Rows that choose in two levels (normalised parameters: numpy arrays, or a backend's
    tensors of the same fields): not greedy, and no truncation (top-k off or >= V, top-p 1,
    min-p 0)."""
    k = params["top_k"]
    truncated = ((k > 0) & (k < vocab)) | (params["top_p"] < 1) | (params["min_p"] > 0)
    return ~params["greedy"] & ~truncated


def block_keys(keys):
    """The block stream's key of each row key (two-level choice of untruncated rows)."""
    return mix32(keys ^ BLOCK_SALT)


def uniforms(bits):
    """Uniforms in (0, 1), exactly representable in float32 (returned as float64)."""
    return ((bits >> 9) * 2 + 1).astype(np.float64) * U_SCALE


def gumbel(bits):
    """Gumbel noise ``-log(-log(u))`` in float64 (the reference precision)."""
    return -np.log(-np.log(uniforms(bits)))
