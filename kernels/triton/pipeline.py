"""Fused Triton kernels for the whole sampling pipeline of :mod:`sampling.kernels.reference`.

A call is a fixed sequence of launches whose grids depend only on ``B``, ``V`` and host-side
flags, with no device-to-host synchronisation, so it can be captured in a CUDA graph (on sm_90+
chained by programmatic dependent launch: :func:`_gdc_wait`, :func:`_gdc_done`):

``prep`` (grid B; only with penalties or truncated rows, otherwise the scan derives the keys)
    Stream position and key of each row; a compact penalty table built from the history ids in
    O(B*(V/32 + L)): a bitmask of penalised tokens, the prefix of its words' set bits, and the
    penalised values at each token's rank among them; for truncated rows a *pivot* ``theta``: a
    guess of a lower bound of the truncation threshold, from a strided sample of the row (4096
    values in runs of 8: a cut near the j-th largest run maximum, j chosen so the row holds a
    few hundred values above it), and for min-p rows the proven bound
    ``max(sample) + log(min_p)``.
``scan`` (persistent, one warp per program; the one read of the logits)
    Work items are (row, chunk). Each computes the penalised values ``y`` (z = y / T) once:
    flags for NaN / +inf / no finite value, the chunk max, the log-sum-exp ("others" against a
    running max) when needed, the Gumbel-max argmax for rows without truncation (the noise's
    logs are skipped wherever they cannot change the winner), and for truncated rows every
    element with ``z >= theta`` (exactly: ``y >= yth``) is appended to the item's private
    candidate slots (no atomics in the loop); at the end of the item one atomic reserves room in
    the row's candidate list and the slots are copied there, divided by T.
``finish`` (grid B)
    Verifies the pivot: the candidates hold every survivor if at least k of them were found
    (then the k-th largest value is >= theta) or theta is below the min-p cut of the row's true
    max. Then exact top-k / top-p / min-p on the candidates by bisection over float keys (no
    sort), float64 Gumbel-max over survivors, log-probabilities. Masses are summed as integers
    (fixed point, 2**-40), so the result does not depend on the order in which chunks appended
    their candidates. Rows the pivot does not cover (top-p alone, a guess above the k-th value,
    more candidates than slots) take the exact fallback in the same program: a radix select over
    the full row (16 bins a pass), then one sampling pass. The choice of path depends only on
    the data, never on timing, so identical calls give identical bits.

Batches whose rows all truncate, with "sampling" log-probabilities, no top-n and penalties that
only lower values (``launch.Config.cand``) take the penalties off the scan: the prep builds the
bitmask alone (from the request cache: none; it keeps a bitmask of the table's ids, with counts
per 256 ids, across calls, :func:`_table_aux_build`), the pivot and the scan read the raw
logits, and the finish penalises the candidates (:func:`_cand_penalties`). The raw candidates
hold every token whose penalised value passes the threshold, so the result is the same, bit for
bit (bench/NOTES.md, v27, v30).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import stream as rs

INT32_MAX = tl.constexpr(2147483647)
INT32_MIN = tl.constexpr(-2147483648)

#: Host-side codes; the kernels use the same numbers as literals.
MODES = {"sampling": 0, "processed": 1, "raw": 2}
STATUS_DONE = 0  # row finished
STATUS_INVALID = 1  # NaN / +inf after penalties and temperature, or no finite value
STATUS_FALLBACK = 2  # candidate set unbounded or overflowed: finished by the exact fallback


# ----------------------------------------------------------------------------- helpers


LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)
#: okey(-inf): the initial value of the row-level running maxima kept as int32 keys.
KEY_NEG_INF = tl.constexpr(-2139095041)


@triton.jit
def _gdc_wait(PDL: tl.constexpr):
    """Kernel entry under programmatic dependent launch (PDL, sm_90+): wait until the previous
    kernel in the stream has completed and its writes are visible, before this program touches
    any memory."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _gdc_done(PDL: tl.constexpr):
    """Kernel end under PDL: the next kernel may launch once every program got here, so its
    launch overlaps this kernel's last programs. (Letting it launch at entry instead made its
    waiting programs take SM resources from a long prep: S3 181 -> 190 us at B = 256.)"""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _okey(z):
    """float32 -> int32 key with the same order (-0.0 folded onto +0.0, as comparisons do)."""
    b = z.to(tl.int32, bitcast=True)
    b = tl.where(b == INT32_MIN, 0, b)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _ofloat(key):
    """Inverse of :func:`_okey`."""
    b = key ^ ((key >> 31) & 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _cut(lo, hi, q, i: tl.constexpr, NC: tl.constexpr):
    """The i-th of NC cuts splitting [lo, hi] (q = hi - lo + 1 >= 2 keys) into NC + 1 parts
    (i = 1..NC; all > lo and <= hi)."""
    return tl.minimum(lo + (i * q + NC) // (NC + 1), hi)


@triton.jit
def _key_search(keys, valid, j, band, lo, hi, NC: tl.constexpr, GAP: tl.constexpr):
    """A key t with j <= #{valid keys >= t} <= band, given int64 bounds lo <= (the j-th largest
    valid key) <= hi; the j-th largest itself when ties leave no key in the band (band = j: the
    exact j-th largest). Each step cuts [lo, hi] at NC points (NC + 1 parts) and counts the keys
    above every cut in one block-wide int32 sum, the counts packed in 31 // NC-bit fields, so a
    step narrows the range (NC + 1)-fold for the price of one reduction and NC compares per key;
    it stops as soon as a count lands in the band.

    When ties straddle j, no count lands in the band and the range narrows down to one key.
    GAP > 0 (keys of 2-byte logits: their distinct values lie >= ~GAP keys apart) snaps the
    bounds once, when the range first gets narrower than GAP, to the keys present: lo to the
    lowest key >= lo, hi to the highest <= hi (both still bound the j-th largest, and the
    counts above them do not change). A range with one key left then closes at once: on bf16
    randn rows the reductions per search fall from 9.0 to 5.2 (3 cuts, ~60 keys) and from 18.5
    to 8.8 (1 cut, ~520 keys). GAP only chooses when to snap; the result is the same for any
    GAP (bench/NOTES.md, v24)."""
    F: tl.constexpr = 31 // NC
    tl.static_assert(keys.numel < (1 << F))
    snapped = tl.zeros([], tl.int32)
    while lo < hi:
        q = hi - lo + 1
        packed = tl.zeros(keys.shape, tl.int32)
        for i in tl.static_range(1, NC + 1):
            packed += tl.where(valid & (keys >= _cut(lo, hi, q, i, NC).to(tl.int32)), 1 << ((i - 1) * F), 0)
        packed = tl.sum(packed)
        # the highest cut with >= j keys above it (lo has >= j; the keys above hi number < j);
        # equal cuts have equal counts, so the chosen cut's successor lies above it
        nlo = lo
        nhi = _cut(lo, hi, q, 1, NC) - 1
        cnt = band + 1
        for i in tl.static_range(1, NC + 1):
            c = (packed >> ((i - 1) * F)) & ((1 << F) - 1)
            t = _cut(lo, hi, q, i, NC)
            if i < NC:
                up = _cut(lo, hi, q, i + 1, NC) - 1
            else:
                up = hi
            nlo = tl.where(c >= j, t, nlo)
            nhi = tl.where(c >= j, up, nhi)
            cnt = tl.where(c >= j, c, cnt)
        lo = nlo
        hi = tl.where(cnt <= band, nlo, nhi)
        if GAP > 0:
            if (snapped == 0) & (hi - lo < GAP):
                lo = tl.min(tl.where(valid & (keys >= lo.to(tl.int32)), keys, INT32_MAX)).to(tl.int64)
                hi = tl.max(tl.where(valid & (keys <= hi.to(tl.int32)), keys, INT32_MIN)).to(tl.int64)
                snapped = 1
    return lo.to(tl.int32)


#: Masses are summed as integers in units of 2**-40 (each term <= 1, at most 2**23 terms),
#: so sums are exact and independent of the order of the terms.
FIX = tl.constexpr(1099511627776.0)


@triton.jit
def _fix(w):
    """float64 mass in [0, 1] -> int64 fixed point (round to nearest)."""
    return (w * FIX + 0.5).to(tl.int64)


@triton.jit
def _recip(T, FAST: tl.constexpr):
    """Per-row reciprocal for :func:`_div`: rcp.approx refined by one Newton step, exactly the
    first half of the fast path that ``div.rn.f32`` compiles to (hoisted out of the loop)."""
    if FAST:
        y0 = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [T], dtype=tl.float32,
                                       is_pure=True, pack=1)
        return tl.fma(y0, tl.fma(y0, -T, 1.0), y0)
    return T


@triton.jit
def _div(z, T, Y, FAST: tl.constexpr):
    """z / T correctly rounded (numpy's float32 division), bit for bit.

    FAST replays the second half of the fast path of ``div.rn.f32`` (q = z*y, r = z - q*T,
    q + r*y) with the reciprocal ``Y`` computed once per row; lanes outside the range where that
    path is exact (|z| < 2**-100, |z| > 2**100, inf, NaN) branch to the full ``div.rn.f32``
(a warp skips that branch unless one of its lanes needs it). The host only sets FAST when
    every temperature is in [2**-20, 2**20].
    """
    if FAST:
        return tl.inline_asm_elementwise(
            """{
            .reg .f32 q, r, a;
            .reg .pred p, p2;
            mul.rn.f32 q, $1, $3;
            neg.f32 a, $2;
            fma.rn.f32 r, q, a, $1;
            fma.rn.f32 $0, $3, r, q;
            abs.f32 a, $1;
            setp.ltu.f32 p, a, 0f0D800000;
            setp.gtu.f32 p2, a, 0f71800000;
            or.pred p, p, p2;
            @!p bra DIVOK${:uid};
            div.rn.f32 $0, $1, $2;
            DIVOK${:uid}:
            }""",
            "=f,f,f,f", [z, T, Y], dtype=tl.float32, is_pure=True, pack=1)
    return tl.math.div_rn(z, T)


@triton.jit
def _lg2(x, FAST: tl.constexpr):
    """log2 on the MUFU (absolute error ~2**-22.6) on the GPU; exact-ish elsewhere."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.log2(x)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _lane_max(y, TILE: tl.constexpr, VEC: tl.constexpr):
    """Each lane's NaN-propagating max over its own elements of a one-warp tile, as [32]. When
    the rows are 16-byte aligned, the tile's layout gives lane l the VEC-element vectors l,
    l + 32, ..., so the reshape moves no data and the maxima take no shuffle: a vote (a REDUX)
    over these 32 values replaces a compare per element and a reduction of all TILE of them.
    (Any other layout gives the same values through a layout conversion, only slower.)"""
    R: tl.constexpr = TILE // (32 * VEC)
    return tl.reduce(tl.reduce(tl.reshape(y, [R, 32, VEC]), 2, _max_nan), 0, _max_nan)


@triton.jit
def _u_mantissa(key, offs):
    """The top 23 bits m of each token's hash (the stream's uniform is u = (2m+1) 2**-24)."""
    return rs.token_bits(key, offs.to(tl.uint32)) >> 9


@triton.jit
def _beat_margin(m, e, cb):
    """> 0 for a superset of the tokens with v = 1 - u < e * cb (the test of
    :func:`_gumbel_key`), from m alone: with f = 1 + m 2**-23 (m's bits as a float in [1, 2)),
    v = 2 - 2**-24 - f exactly, so the test is e * cb > 2 - 2**-24 - f. The margin returned is
    e * cb - (C - f) with C = 2 - 2**-22 (f - C is exact, and one rounding keeps the sign): the
    extra 3 * 2**-24 exceeds the rounding of the product e * cb, so every token that passes the
    test has a positive margin."""
    f = (m | tl.full([], 0x3F800000, tl.uint32)).to(tl.float32, bitcast=True)
    return tl.fma(e, cb, f - 1.9999997615814209)


@triton.jit
def _vote_bits(d, FAST: tl.constexpr):
    """The largest of d's float32 bit patterns read as int32, over the whole tensor (an integer
    reduction: one REDUX across the warp). It is >= 0 iff some element has its sign bit clear
    (d >= +0, or a NaN) and > 0 iff some element is > +0 (or a NaN): a NaN votes yes. The GPU's
    arithmetic returns the canonical NaN, sign clear; elsewhere (the interpreter's numpy: -inf -
    -inf has the sign set on x86) NaNs are made positive first."""
    if not FAST:
        d = tl.where(d == d, d, float("inf"))
    return tl.max(d.to(tl.int32, bitcast=True))


@triton.jit
def _uv(key, offs):
    """The stream's uniform u = (2m+1) 2**-24 and v = 1 - u, both exact, from the top 23 bits m
    of the token's hash (bit tricks instead of an int-to-float conversion)."""
    return _uv_m(_u_mantissa(key, offs))


@triton.jit
def _uv_m(m):
    """:func:`_uv` from the mantissa bits m of :func:`_u_mantissa`."""
    one = tl.full([], 0x3F800000, tl.uint32)
    u = ((m | one).to(tl.float32, bitcast=True) - 1.0) + 5.9604644775390625e-08
    v = (((0x7FFFFF - m) | one).to(tl.float32, bitcast=True) - 1.0) + 5.9604644775390625e-08
    return u, v


@triton.jit
def _gumbel_uv(u, v, FAST: tl.constexpr):
    """Gumbel noise -log(-log(u)) in float32 (error a few 1e-7 absolute).

    E = -log(u) takes a short series in v where u is near 1 (there a log of u would lose the
    relative accuracy of E, and those tokens carry the largest Gumbel values); the MUFU log
    elsewhere.
    """
    ser = tl.fma(v, 0.16666666666666666, 0.2)
    ser = tl.fma(v, ser, 0.25)
    ser = tl.fma(v, ser, 0.3333333333333333)
    ser = tl.fma(v, ser, 0.5)
    ser = tl.fma(v, ser, 1.0)
    E = tl.where(v < 0.0625, v * ser, _lg2(u, FAST) * -LN2)
    return _lg2(E, FAST) * -LN2


@triton.jit
def _gumbel(key, offs, FAST: tl.constexpr):
    u, v = _uv(key, offs)
    return _gumbel_uv(u, v, FAST)


@triton.jit
def _gumbel_key(z, u, v, thr, FAST: tl.constexpr):
    """z + Gumbel where v < thr, else -inf.

    Since G <= -log(v), a token with v >= exp(z - best) cannot beat ``best``; the caller passes
    thr = exp(z - best) (with slack). On the GPU the logs are branched around, so a warp whose
    lanes all fail the test (nearly every warp after the first tiles) skips them."""
    if FAST:
        return tl.inline_asm_elementwise(
            """{
            .reg .f32 s, e, g;
            .reg .pred p, q;
            mov.f32 $0, 0fFF800000;
            setp.lt.f32 p, $3, $4;
            @!p bra GSKIP${:uid};
            fma.rn.f32 s, $3, 0f3E2AAAAB, 0f3E4CCCCD;
            fma.rn.f32 s, $3, s, 0f3E800000;
            fma.rn.f32 s, $3, s, 0f3EAAAAAB;
            fma.rn.f32 s, $3, s, 0f3F000000;
            fma.rn.f32 s, $3, s, 0f3F800000;
            mul.rn.f32 s, $3, s;
            lg2.approx.f32 e, $2;
            mul.rn.f32 e, e, 0fBF317218;
            setp.lt.f32 q, $3, 0f3D800000;
            selp.f32 e, s, e, q;
            lg2.approx.f32 g, e;
            mul.rn.f32 g, g, 0fBF317218;
            add.rn.f32 $0, $1, g;
            GSKIP${:uid}:
            }""",
            "=f,f,f,f,f", [z, u, v, thr], dtype=tl.float32, is_pure=True, pack=1)
    return tl.where(v < thr, z + _gumbel_uv(u, v, FAST), float("-inf"))


@triton.jit
def _pack_candidate(y, t, FAST: tl.constexpr):
    """A candidate as one int64: its value's float32 bits low, its token id high (one 8-byte
    store per candidate: cheaper than two 4-byte stores, bench/NOTES.md v11)."""
    if FAST:
        return tl.inline_asm_elementwise("mov.b64 $0, {$1, $2};", "=l,r,r", [y.to(tl.int32, bitcast=True), t],
                                         dtype=tl.int64, is_pure=True, pack=1)
    return (t.to(tl.int64) << 32) | (y.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _store_candidate(ptr, packed, keep, FAST: tl.constexpr):
    """*ptr = packed where keep, in the tile's own layout. The slots are scattered (a counter
    per tile position), so tl.store's coalescing gives them one element per lane, and the tile
    was read from shared memory a second time in that layout (with the penalty bits) on every
    tile, emitting or not (bench/NOTES.md, v16). An inline PTX store is elementwise: no layout
    of its own (on the GPU; tl.store elsewhere)."""
    if FAST:
        tl.inline_asm_elementwise(
            """{
            .reg .pred p;
            setp.ne.s32 p, $3, 0;
            @p st.global.b64 [$1], $2;
            mov.b32 $0, 0;
            }""",
            "=r,l,l,r", [ptr, packed, keep.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(ptr, packed, mask=keep)


@triton.jit
def _block_update(z, offs, hb, thr, rk, kb, ki, kb_row, TILE: tl.constexpr, FAST: tl.constexpr):
    """The two-level choice (:mod:`sampling.stream`) on one tile: each block of rs.BLOCK tokens
    whose noise could lift it above the best block so far (v < thr, as :func:`_gumbel_key`) gets
    its key L + G' (L its log-mass); a block that beats its slot's best also picks its token by
    the tokens' own Gumbel-max (lowest id on ties). ``hb``: the blocks' uniform bits; ``kb``,
    ``ki``: per block slot, the best block key and its token. Runs only in the rare tiles that
    pass the caller's vote."""
    NB: tl.constexpr = TILE // rs.BLOCK
    z2 = tl.reshape(z, [NB, rs.BLOCK])
    bm = tl.max(z2, 1)
    bs = tl.where(bm == float("-inf"), 0.0, bm)
    mass = bm + _lg2(tl.sum(tl.exp2((z2 - bs[:, None]) * LOG2E), 1), FAST) * LN2
    u, v = _uv_m(hb)
    key = _gumbel_key(mass, u, v, thr, FAST)
    better = key > kb
    if tl.max(better.to(tl.int32)) > 0:
        tu, tv = _uv(rk, offs)
        t2 = tl.reshape(z + _gumbel_uv(tu, tv, FAST), [NB, rs.BLOCK])
        tb = tl.max(t2, 1)
        tid = tl.min(tl.where(t2 == tb[:, None], tl.reshape(offs, [NB, rs.BLOCK]), INT32_MAX), 1)
        kb = tl.where(better, key, kb)
        ki = tl.where(better, tid, ki)
    return kb, ki, tl.maximum(kb_row, tl.max(key))


@triton.jit
def _ids(row_ptr, i0, lanes, L, V):
    """History ids i0 + lanes of a row of length L >= 1: (positions, in-range flags, ids as int32
    with 0 where not in range). Padding, garbage and int64 extremes are simply out of range. The
    load takes no mask (positions past L read the row's last id, then drop out): masked, each
    element held a predicate, and ptxas issued a thread's loads one after another (v17)."""
    i = i0 + lanes
    t = tl.load(row_ptr + tl.minimum(i, L - 1))
    ok = (t >= 0) & (t < V) & (i < L)
    return i, ok, tl.where(ok, t, 0).to(tl.int32)


@triton.jit
def _bit(word, t):
    """Bit t % 32 of a bitmask word, as a boolean."""
    return ((word >> (t & 31)) & 1) != 0


@triton.jit
def _set_bits(bits_row, ts, ok):
    tl.atomic_or(bits_row + (ts >> 5), tl.full(ts.shape, 1, tl.int32) << (ts & 31), mask=ok, sem="relaxed")


@triton.jit
def _minp_cut(m, mp):
    """A value below which no token survives min-p given the row max m: m + log(min_p), minus a
    margin that only admits a few extra candidates for rounding, never drops one."""
    lmp = tl.log(tl.maximum(mp, 1e-30))
    return m + lmp - (tl.abs(m) + tl.abs(lmp) + 1.0) * 1e-5


@triton.jit
def _y_threshold(th, T, Y, FAST: tl.constexpr):
    """The smallest float32 y with y / T (correctly rounded) >= th: rounded division is
    monotone, so ``y >= _y_threshold(th)`` is exactly ``y / T >= th``. th * T is within two
    ulps of it; the steps walk the float32 keys to the boundary."""
    ky = _okey(th * T)
    for _ in range(4):
        ky = tl.where(_div(_ofloat(ky), T, Y, FAST) < th, ky + 1, ky)
    for _ in range(4):
        ky = tl.where(_div(_ofloat(ky - 1), T, Y, FAST) >= th, ky - 1, ky)
    return tl.where((th > float("-inf")) & (th < float("inf")), _ofloat(ky), th)


@triton.jit
def _popc(x, FAST: tl.constexpr):
    """Set bits of each uint32 word."""
    if FAST:
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _rank(word, pre, t, FAST: tl.constexpr):
    """Slot of penalised token t in its row's compact table: the penalised tokens below it (the
    prefix of its 32-bit bitmask word plus the set bits of the word below bit t)."""
    below = (tl.full(t.shape, 1, tl.uint32) << (t & 31).to(tl.uint32)) - 1
    return pre + _popc(word.to(tl.uint32) & below, FAST)


@triton.jit
def _aux_column(aux_row, W, t, word, FAST: tl.constexpr):
    """Column of id t (>= 0) in its cache-table row (the row's ids below t), from the bitmask
    kept with the table (:func:`_table_aux_build`; ``word``: t's word of it): the count kept for
    t's group of 8 words (256 ids), plus the set bits of the group's words before t's (one
    32-byte sector, the word's own) and of t's word below bit t. Loads take no mask (a word
    after t's reads t's word, and counts nothing)."""
    w = t >> 5
    g8 = (t >> 8) << 3
    c = tl.load(aux_row + W + (t >> 8))
    for j in tl.static_range(7):
        c += tl.where(g8 + j < w, _popc(tl.load(aux_row + tl.minimum(g8 + j, w)).to(tl.uint32), FAST), 0)
    return _rank(word, c, t, FAST)


@triton.jit
def _pen_words(pen_row, offs, mask, W, CM: tl.constexpr):
    """The bitmask word and its prefix for each token (see :func:`_prep_kernel`). CM, the loads'
    cache modifier: "" (default caching), or ".cg" (L2 only) in the prep, which builds the table
    with atomics in the same launch. (An explicit argument: Triton 3.6 rejects a str default.)"""
    word = tl.load(pen_row + (offs >> 5), mask=mask, other=0, cache_modifier=CM)
    pre = tl.load(pen_row + W + (offs >> 5), mask=mask, other=0, cache_modifier=CM)
    return word, pre


@triton.jit
def _pen_words_tile(pen_row, o0, end, TILE: tl.constexpr, G: tl.constexpr):
    """The bitmask words of the tile o0 + [0, TILE) (o0 a multiple of 32): G consecutive tokens
    (G <= 32, the lanes' vector width) share a word, so each group of G loads it once, broadcast
    to the G (the layout of [TILE // G, G] matches the tile's G-element vectors per lane: one
    load per vector)."""
    q = o0 + G * tl.arange(0, TILE // G)
    word = tl.load(pen_row + (q >> 5), mask=q < end, other=0)
    return tl.reshape(tl.broadcast_to(word[:, None], [TILE // G, G]), [TILE])


@triton.jit
def _pen_tile(pen_row, o0, end, onebit, TILE: tl.constexpr, G: tl.constexpr):
    """(bitmask words, whether each token o0 + i of a tile is penalised), for o0 a multiple of
    32: bit i % 32 of its word, tested against ``onebit`` = 1 << (i % 32), which the caller
    computes once for all tiles (an AND per token instead of a shift, an AND and a compare on
    o0 + i)."""
    word = _pen_words_tile(pen_row, o0, end, TILE, G)
    return word, (word & onebit) != 0


@triton.jit
def _pen_tile_values(pen_row, o0, word, hit, x, W, FAST: tl.constexpr, TILE: tl.constexpr):
    """``x`` with each penalised token of the tile o0 + [0, TILE) (``word``, ``hit`` from
    :func:`_pen_tile`) replaced by its table value: the rows that choose in two levels need
    every token of a block (the others mask them)."""
    offs = o0 + tl.arange(0, TILE)
    pre = tl.load(pen_row + W + (offs >> 5), mask=hit, other=0)
    zrow = (pen_row + 2 * W).to(tl.pointer_type(tl.float32))
    zp = tl.load(zrow + _rank(word, pre, offs, FAST), mask=hit, other=0.0)
    return tl.where(hit, zp, x)


@triton.jit
def _pen_value(pen_row, word, pre, offs, mask, W, FAST: tl.constexpr, CM: tl.constexpr):
    """(hit, penalised value before the temperature) from a token's bitmask word and prefix."""
    hit = _bit(word, offs) & mask
    zrow = (pen_row + 2 * W).to(tl.pointer_type(tl.float32))
    zp = tl.load(zrow + _rank(word, pre, offs, FAST), mask=hit, other=0.0, cache_modifier=CM)
    return hit, zp


@triton.jit
def _pen_value_cg(pen_row, word, pre, offs, mask, W, FAST: tl.constexpr):
    """:func:`_pen_value` with L2-only loads (".cg"), for the prep, which wrote the table just
    now. On the GPU the rank and the load are inline PTX behind a per-token branch: no
    tl.load, so Triton's coalescing pass lays out no gather (Triton 3.6 laid the pivot's sampled
    gather along its runs and converted it through 32 KB of shared memory, bench/NOTES.md v9.2).
    Unmasked: a set bit is a token of the row, whose slot is in the table."""
    if FAST:
        hit = _bit(word, offs) & mask
        zrow = (pen_row + 2 * W).to(tl.pointer_type(tl.float32))
        zp = tl.inline_asm_elementwise(
            """{
            .reg .pred p;
            .reg .b32 s, m, c;
            .reg .b64 a;
            mov.b32 $0, 0;
            and.b32 s, $3, 31;
            shr.u32 m, $1, s;
            and.b32 m, m, 1;
            setp.eq.u32 p, m, 0;
            @p bra PSKIP${:uid};
            mov.b32 m, -1;
            shl.b32 m, m, s;
            not.b32 m, m;
            and.b32 m, m, $1;
            popc.b32 c, m;
            add.u32 c, c, $2;
            mad.wide.u32 a, c, 4, $4;
            ld.global.cg.f32 $0, [a];
            PSKIP${:uid}:
            }""",
            "=f,r,r,r,l", [word.to(tl.int32), pre.to(tl.int32), offs.to(tl.int32), zrow.to(tl.int64)],
            dtype=tl.float32, is_pure=False, pack=1)
        return hit, zp
    return _pen_value(pen_row, word, pre, offs, mask, W, FAST, ".cg")


@triton.jit
def _zval(x, offs, mask, pen_row, W, T, Y, HAS_PEN: tl.constexpr, HAS_TEMP: tl.constexpr,
          FAST: tl.constexpr, CM: tl.constexpr):
    """Penalised, tempered ``z`` from loaded logits ``x`` (float32; masked lanes -inf); CM: the
    table reads' cache modifier (:func:`_pen_words`)."""
    z = x
    if HAS_PEN:
        word, pre = _pen_words(pen_row, offs, mask, W, CM)
        hit, zp = _pen_value(pen_row, word, pre, offs, mask, W, FAST, CM)
        z = tl.where(hit, zp, z)
    if HAS_TEMP:
        z = _div(z, T, Y, FAST)
    return z


@triton.jit
def _load_z(x_row, offs, mask, pen_row, W, T, Y, HAS_PEN: tl.constexpr, HAS_TEMP: tl.constexpr,
            FAST: tl.constexpr):
    x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
    return x, _zval(x, offs, mask, pen_row, W, T, Y, HAS_PEN, HAS_TEMP, FAST, "")


@triton.jit
def _lse_update(s, m, z):
    """Online sum of exp(z - lane max), *excluding* the max's own 1 (float32).

    Keeping "the others" rather than the total keeps log1p(others) accurate for peaked rows,
    where the chosen token's logprob is -log1p(tiny)."""
    gt = z > m
    e = tl.exp2(tl.where(gt, m - z, z - m) * LOG2E)
    e = tl.where(z == float("-inf"), 0.0, e)
    return tl.where(gt, (s + 1.0) * e, s + e)


@triton.jit
def _lse_chunk(m_vec, s_vec):
    """(max, others) over lanes: sum exp(z - max) = 1 + others; others in float64."""
    mc = tl.max(m_vec)
    live = m_vec > float("-inf")
    at = (m_vec == mc) & live
    t = tl.where(at, s_vec, (1.0 + s_vec) * tl.exp2((m_vec - mc) * LOG2E))
    t = tl.where(live, t, 0.0).to(tl.float64)
    extra = tl.maximum(tl.sum(at.to(tl.int32)) - 1, 0)
    return mc, tl.sum(t) + extra.to(tl.float64)


@triton.jit
def _lse_rows(m_ptr, s_ptr, base, C, CP: tl.constexpr):
    """Row (max, others) from per-chunk (max, others); log-sum-exp = max + log1p(others)."""
    cc = tl.arange(0, CP)
    mc = tl.load(m_ptr + base + cc, mask=cc < C, other=float("-inf"))
    sc = tl.load(s_ptr + base + cc, mask=cc < C, other=0.0)
    m = tl.max(mc)
    live = mc > float("-inf")
    at = (mc == m) & live
    t = tl.where(at, sc, (1.0 + sc) * tl.exp(mc.to(tl.float64) - m.to(tl.float64)))
    t = tl.where(live, t, 0.0)
    extra = tl.maximum(tl.sum(at.to(tl.int32)) - 1, 0)
    return m, tl.sum(t) + extra.to(tl.float64)


@triton.jit
def _log1p(x):
    """log(1 + x) for float64 x >= 0, accurate for tiny x (the correction term restores the
    bits that 1 + x rounds away); portable to the interpreter, unlike libdevice."""
    u = 1.0 + x
    return tl.log(u) - ((u - 1.0) - x) / u


@triton.jit
def _row_flags(greedy_ptr, topk_ptr, topp_ptr, minp_ptr, b, V):
    greedy = tl.load(greedy_ptr + b) != 0
    k = tl.load(topk_ptr + b)
    p = tl.load(topp_ptr + b)
    mp = tl.load(minp_ptr + b)
    active_k = (k > 0) & (k < V)
    active_p = p < 1.0
    trunc = (greedy == 0) & (active_k | active_p | (mp > 0.0))
    return greedy, k, p, mp, active_k, active_p, trunc



# ----------------------------------------------------------------------------- prep


@triton.jit
def _penalise(z, st, r, f, pp, PEN_REP: tl.constexpr, PEN_OUT: tl.constexpr):
    """A penalised token's value from its logit z and its state st = 2 * (output count) + seen,
    float32 with each operation rounded separately (as numpy)."""
    if PEN_REP:
        z = tl.where((st & 1) != 0, tl.where(z > 0, tl.math.div_rn(z, r), z * r), z)
    if PEN_OUT:
        c = st >> 1
        z = tl.where(c > 0, z - f * c.to(tl.float32), z)
        z = tl.where(c > 0, z - pp, z)
    return z


@triton.jit
def _word_prefix(pen_row, W, FAST: tl.constexpr, BW: tl.constexpr):
    """The exclusive prefix of the bitmask words' set bits, after the bits (past a barrier);
    returns the number of set bits."""
    wl = tl.arange(0, BW)
    carry = tl.zeros([], tl.int32)
    for w0 in range(0, W, BW):
        pc = _popc(tl.load(pen_row + w0 + wl, mask=w0 + wl < W, other=0, cache_modifier=".cg").to(tl.uint32),
                   FAST)
        tl.store(pen_row + W + w0 + wl, carry + tl.cumsum(pc, 0) - pc, mask=w0 + wl < W)
        carry += tl.sum(pc)
    return carry


@triton.jit
def _position_key(
    b, V, out_ptr, out_stride, O, cnt_ptr, cnt_stride, pos_ptr, hs_ptr, slo_ptr, shi_ptr,
    samp_lo, samp_hi, call_ptr,
    HAS_OUT: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_POS: tl.constexpr, BL: tl.constexpr,
):
    """The row's stream key (uint32): seeded rows from (seed, position), others from the
    sampler's seed, the device call counter and the row index."""
    b64 = b.to(tl.int64)
    lanes = tl.arange(0, BL)
    # Stream position: the weighted number of valid output ids, unless given.
    if HAS_POS:
        pos = tl.load(pos_ptr + b).to(tl.int64)
    else:
        pos = tl.zeros([], tl.int64)
        if HAS_OUT:
            acc = tl.zeros([BL], tl.int64)
            for i0 in range(0, O, BL):
                i, ok, ts = _ids(out_ptr + b64 * out_stride, i0, lanes, O, V)
                if HAS_COUNTS:
                    w = tl.load(cnt_ptr + b64 * cnt_stride + i, mask=ok, other=0).to(tl.int64)
                else:
                    w = tl.full([BL], 1, tl.int64)
                acc += tl.where(ok, w, 0)
            pos = tl.sum(acc)
    has_seed = tl.load(hs_ptr + b) != 0
    lo = tl.load(slo_ptr + b).to(tl.uint32)
    hi = tl.load(shi_ptr + b).to(tl.uint32)
    seeded = rs.row_key(lo, hi, pos.to(tl.uint32))
    call = tl.load(call_ptr).to(tl.uint32)
    free = rs.unseeded_key(samp_lo.to(tl.uint32), samp_hi.to(tl.uint32), call, b.to(tl.uint32))
    return tl.where(has_seed, seeded, free)


@triton.jit
def _table_add(ids_row, st_row, pos_ptr, tok, R, V, aux_row, W, KEPT: tl.constexpr, FAST: tl.constexpr,
               BL: tl.constexpr):
    """Adds output token ``tok`` (-1: none) to a row of the request cache's table, in place, by
    the rule of ``RequestCache._append``: a known id's state gains a count (+2) and the seen bit;
    a new id is inserted at its rank (state 3), the larger ids moving one column right (the
    last column drops out of a full row; the cache leaves room); the stream position advances.

    KEPT: the row's bitmask kept with the table (:func:`_table_aux_build`) gives the rank, and
    is kept up to date (the id's bit, the groups' counts; a dropped last id's too); otherwise a
    pass over the row counts the ids below ``tok``."""
    if (tok >= 0) & (tok < V):
        lanes = tl.arange(0, BL)
        if KEPT:
            G = tl.cdiv(W, 8)
            n = tl.load(aux_row + W + G)  # the row's ids
            last = tl.load(ids_row + R - 1)
            word = tl.load(aux_row + (tok >> 5))
            rank = _aux_column(aux_row, W, tok, word, FAST)
            found = _bit(word, tok).to(tl.int32)
        else:
            rank = tl.zeros([], tl.int32)
            found = tl.zeros([], tl.int32)
            n = tl.zeros([], tl.int32)
            for i0 in range(0, R, BL):
                i = i0 + lanes
                t = tl.load(ids_row + i, mask=i < R, other=-1)
                rank += tl.sum(((t >= 0) & (t < tok)).to(tl.int32))
                found += tl.sum((t == tok).to(tl.int32))
                n += tl.sum((t >= 0).to(tl.int32))
        if found == 0:
            # Blocks from the last down: a block's columns i > rank take column i - 1, all
            # read (barrier) before any is written; the block below writes only its own.
            # Columns past the row's ids + 1 hold padding and stay as they are.
            top = tl.minimum(n + 1, R)
            nb = tl.cdiv(top, BL)
            for j in range(nb):
                i = (nb - 1 - j) * BL + lanes
                m = (i > rank) & (i < top)
                t = tl.load(ids_row + i - 1, mask=m, other=-1)
                st = tl.load(st_row + i - 1, mask=m, other=0)
                tl.debug_barrier()
                tl.store(ids_row + i, t, mask=m)
                tl.store(st_row + i, st, mask=m)
            tl.debug_barrier()
            tl.store(ids_row + rank, tok, mask=rank < R)  # (a full row drops a larger new id)
            tl.store(st_row + rank, 3, mask=rank < R)
            if KEPT:
                if rank < R:
                    # the id's bit; a full row's last id dropped out: its bit goes. The groups
                    # after the id's count one more, those after the dropped id's one less.
                    drop = (n >= R) & (last >= 0) & (last < V)
                    one = tl.full([], 1, tl.int32)
                    tl.atomic_or(aux_row + (tok >> 5), one << (tok & 31).to(tl.int32), sem="relaxed")
                    dl = tl.where(drop, last, 0)
                    tl.atomic_and(aux_row + (dl >> 5), ~(one << (dl & 31).to(tl.int32)), mask=drop, sem="relaxed")
                    gt = (tok >> 8).to(tl.int32)
                    gd = tl.where(drop, dl >> 8, G).to(tl.int32)
                    for g0 in range(gt + 1, G + 1, BL):
                        g = g0 + lanes
                        c = tl.load(aux_row + W + g, mask=g <= G, other=0)
                        tl.debug_barrier()
                        tl.store(aux_row + W + g, c + 1 - (g > gd).to(tl.int32), mask=g <= G)
        else:
            st = tl.load(st_row + rank)
            tl.debug_barrier()  # (every thread reads before any writes)
            tl.store(st_row + rank, (st | 1) + 2)
        pos = tl.load(pos_ptr)
        tl.debug_barrier()
        tl.store(pos_ptr, pos + 1)
    tl.debug_barrier()


@triton.jit
def _table_aux_build(aux_row, W, ids_row, R, V, FAST: tl.constexpr, BL: tl.constexpr, BW: tl.constexpr):
    """The bitmask of a cache table row's ids, kept with the table across calls (``Step.
    table_aux``) and read by the finish's candidate lookups (:func:`_cand_block`): [bits: W
    words | counts: G + 1], G = cdiv(W, 8); count g is the number of the row's ids below 256 * g
    (count G: all of them), so an id's column is found from its count and one sector of words
    (:func:`_aux_column`). Built here for a table the backend has not seen (or that the cache
    changed itself); afterwards :func:`_table_add` keeps it, O(V / 256) per added id instead
    of O(V / 32 + R) for a new bitmask each call."""
    lanes = tl.arange(0, BL)
    wl = tl.arange(0, BW)
    for w0 in range(0, W, BW):
        tl.store(aux_row + w0 + wl, tl.zeros([BW], tl.int32), mask=w0 + wl < W)
    tl.debug_barrier()
    for i0 in range(0, R, BL):
        i, ok, ts = _ids(ids_row, i0, lanes, R, V)
        _set_bits(aux_row, ts, ok)
    tl.debug_barrier()
    G = tl.cdiv(W, 8)
    GB: tl.constexpr = BW // 8
    gl = tl.arange(0, GB)
    jl = tl.arange(0, 8)
    carry = tl.zeros([], tl.int32)
    for g0 in range(0, G, GB):
        g = g0 + gl
        w = g[:, None] * 8 + jl[None, :]
        words = tl.load(aux_row + w, mask=w < W, other=0, cache_modifier=".cg")
        pc = tl.sum(_popc(words.to(tl.uint32), FAST), axis=1)
        tl.store(aux_row + W + g, carry + tl.cumsum(pc, 0) - pc, mask=g < G)
        carry += tl.sum(pc)
    tl.store(aux_row + W + G, carry)
    tl.debug_barrier()


@triton.jit
def _pen_table(pen_row, W, RS, x_row, rep_row, R, out_row, O, cnt_row, r, f, pp, V,
               PEN_REP: tl.constexpr, PEN_OUT: tl.constexpr, TABLE: tl.constexpr, HAS_COUNTS: tl.constexpr,
               BITS: tl.constexpr, FAST: tl.constexpr, BL: tl.constexpr, BW: tl.constexpr):
    """A row's penalty table from its history (raw ids: rep_row, R and out_row, O, weighted by
    cnt_row when HAS_COUNTS; or the cache's table: rep_row ids, cnt_row states, R columns).

    The row's penalty table, pen[b] = [bits: W words | prefix: W words | values: S | state: S
    | token ids: S]: bit t of the bitmask marks a penalised token, the prefix holds the set
    bits of the words before each word, so a penalised token's slot is its rank among the
    row's penalised tokens; values holds its penalised float32 value, state 2 * (output
    count) + (seen by the repetition penalty), token ids the slot's token (for the scan's
    penalised-token items). Everything the scan reads is O(V / 32 + L) per row, written
    coalesced or into a few KB, not scattered over a [B, V] table (bench/NOTES.md, v7).

    BITS (raw ids): the bitmask only, no values: the finish applies the penalties to the
    candidates, and builds the rest of the table itself for the rare rows that need every
    token's value. (From the cache's table the prep builds no table then: the finish reads the
    bitmask kept with the table, :func:`_table_aux_build`.)"""
    lanes = tl.arange(0, BL)
    wl = tl.arange(0, BW)
    zrow = (pen_row + 2 * W).to(tl.pointer_type(tl.float32))
    for w0 in range(0, W, BW):
        tl.store(pen_row + w0 + wl, tl.zeros([BW], tl.int32), mask=w0 + wl < W)
    if TABLE:
        # The cache's table (rep_ptr: ids, cnt_ptr: states, R columns): its valid ids are
        # distinct, ascending and first in the row, so the ids of one bitmask word sit in
        # consecutive columns. The "prefix" of a word that has set bits is the column of its
        # first id, written by that id (no prefix sum; the words without set bits are left
        # unwritten: a lookup reads a value only on a hit), and a penalised token's slot is
        # its column. One pass, no lookups; the states are the cache's own (no state slots).
        tl.debug_barrier()
        for i0 in range(0, R, BL):
            i, ok, ts = _ids(rep_row, i0, lanes, R, V)
            _set_bits(pen_row, ts, ok)
            before = tl.load(rep_row + i - 1, mask=ok & (i > 0), other=-1)
            first = ok & ((i == 0) | ((before >> 5) != (ts >> 5).to(tl.int64)))
            tl.store(pen_row + W + (ts >> 5), i, mask=first)
            st = tl.load(cnt_row + i, mask=ok, other=0)
            z = tl.load(x_row + ts, mask=ok, other=0.0).to(tl.float32)
            tl.store(zrow + i, _penalise(z, st, r, f, pp, PEN_REP, PEN_OUT), mask=ok)
    else:
        S, slot_row, id_row = _raw_slots(pen_row, W, RS)
        if not BITS:
            for i0 in range(0, S, BW):
                tl.store(slot_row + i0 + wl, tl.zeros([BW], tl.int32), mask=i0 + wl < S)
                tl.store(id_row + i0 + wl, tl.full([BW], -1, tl.int32), mask=i0 + wl < S)
        tl.debug_barrier()
        # Phase 1: the bits of every penalised token.
        if PEN_REP:
            for i0 in range(0, R, BL):
                i, ok, ts = _ids(rep_row, i0, lanes, R, V)
                _set_bits(pen_row, ts, ok)
        if PEN_OUT:
            for i0 in range(0, O, BL):
                i, ok, ts = _ids(out_row, i0, lanes, O, V)
                _set_bits(pen_row, ts, ok)
        if not BITS:
            tl.debug_barrier()
            # Phase 2: the exclusive prefix of the words' set bits; n penalised tokens.
            n = _word_prefix(pen_row, W, FAST, BW)
            tl.debug_barrier()
            # Phase 3: seen flags and output counts, per slot, and each slot's token id (every id
            # of a token writes the same one).
            if PEN_REP:
                for i0 in range(0, R, BL):
                    i, ok, ts = _ids(rep_row, i0, lanes, R, V)
                    word, pre = _pen_words(pen_row, ts, ok, W, ".cg")
                    slot = _rank(word, pre, ts, FAST)
                    tl.atomic_or(slot_row + slot, tl.full([BL], 1, tl.int32), mask=ok, sem="relaxed")
                    tl.store(id_row + slot, ts, mask=ok)
            if PEN_OUT:
                for i0 in range(0, O, BL):
                    i, ok, ts = _ids(out_row, i0, lanes, O, V)
                    if HAS_COUNTS:
                        w = tl.load(cnt_row + i, mask=ok, other=0).to(tl.int32)
                    else:
                        w = tl.full([BL], 1, tl.int32)
                    word, pre = _pen_words(pen_row, ts, ok, W, ".cg")
                    slot = _rank(word, pre, ts, FAST)
                    tl.atomic_add(slot_row + slot, 2 * w, mask=ok, sem="relaxed")
                    tl.store(id_row + slot, ts, mask=ok)
            tl.debug_barrier()
            # Phase 4: penalised values, per slot: its token and state are read in order, one
            # gather of the logits per penalised token (not per id, after a second rank lookup:
            # the ids' phase cost ~30% of the prep, bench/NOTES.md v18). Loads take no mask (the
            # slot clamped to the last used one).
            for s0 in range(0, n, BL):
                sl = s0 + lanes
                sc = tl.minimum(sl, n - 1)
                ts = tl.load(id_row + sc, cache_modifier=".cg")
                st = tl.load(slot_row + sc, cache_modifier=".cg")
                z = tl.load(x_row + ts).to(tl.float32)
                tl.store(zrow + sl, _penalise(z, st, r, f, pp, PEN_REP, PEN_OUT), mask=sl < n)


# Arguments that change from one decode step to the next are not specialised: Triton would
# otherwise compile a new variant each time an integer crosses 1 or a multiple of 16 (history
# widths and strides, batch size, chunk counts: every few steps of a growing history) or a
# pointer's 16-byte alignment changes (the candidate counters are a view at offset 2 * B of
# a workspace buffer, so their alignment flips with the parity of B; history tensors may be
# views too). None of them is a vectorised row access.
_HIST = ["rep_ptr", "rep_stride", "R", "out_ptr", "out_stride", "O", "cnt_ptr", "cnt_stride", "pos_ptr", "RS"]


@triton.jit(do_not_specialize=["samp_lo", "samp_hi", "ncand_ptr", "AS"] + _HIST)
def _prep_kernel(
    x_ptr, x_stride, V, W,
    rep_ptr, rep_stride, R,
    out_ptr, out_stride, O,
    cnt_ptr, cnt_stride,
    pos_ptr,
    rp_ptr, fp_ptr, pp_ptr,
    hs_ptr, slo_ptr, shi_ptr,
    samp_lo, samp_hi, call_ptr,
    pen_ptr, RS, aux_ptr, AS,
    rowkey_ptr, ncand_ptr, new_ptr,
    temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, theta_ptr, ythr_ptr, CAP,
    HAS_REP: tl.constexpr, HAS_OUT: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_POS: tl.constexpr,
    PEN_REP: tl.constexpr, PEN_OUT: tl.constexpr, TABLE: tl.constexpr, HAS_NEW: tl.constexpr, PIVOT: tl.constexpr,
    CAND: tl.constexpr, AUX: tl.constexpr, KEPT: tl.constexpr, HAS_TEMP: tl.constexpr, FAST: tl.constexpr,
    NS: tl.constexpr, J0: tl.constexpr, BL: tl.constexpr, BW: tl.constexpr, PDL: tl.constexpr,
):
    """CAND (the finish applies the penalties to the candidates, :func:`_cand_penalties`): the
    penalty table is the bitmask alone, and the pivot guesses from the raw logits (penalties
    that only lower values: a guess, verified by the finish against the penalised values).

    AUX (CAND with the cache's table): no penalty table at all; the finish reads the bitmask
    kept with the table (``aux_ptr``, :func:`_table_aux_build`), which the prep builds (KEPT
    false: a table it has not seen) or keeps while it adds the pending token (KEPT)."""
    _gdc_wait(PDL)
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    tl.store(ncand_ptr + b, 0)
    lanes = tl.arange(0, BL)
    # The pivot's sample is loaded first, so that its DRAM round trip overlaps the penalty
    # table's work, when that work is one pass (the cache's table, or no penalties). Held in
    # registers through the raw ids' four phases, it left ptxas too few to issue a phase's
    # loads together: there it is loaded after them (bench/NOTES.md, v17).
    EARLY: tl.constexpr = TABLE or CAND or not (PEN_REP or PEN_OUT)
    if PIVOT and EARLY:
        sbase, spos, smask, sx = _sample(x_ptr + b64 * x_stride, V, NS)
    aux_row = aux_ptr + b64 * AS
    if HAS_NEW:
        _table_add(rep_ptr + b64 * rep_stride, cnt_ptr + b64 * cnt_stride, pos_ptr + b, tl.load(new_ptr + b), R, V,
                   aux_row, W, AUX and KEPT, FAST, BL)
    if AUX and not KEPT:
        _table_aux_build(aux_row, W, rep_ptr + b64 * rep_stride, R, V, FAST, BL, BW)
    key = _position_key(b, V, out_ptr, out_stride, O, cnt_ptr, cnt_stride, pos_ptr, hs_ptr, slo_ptr, shi_ptr,
                        samp_lo, samp_hi, call_ptr, HAS_OUT, HAS_COUNTS, HAS_POS, BL)
    tl.store(rowkey_ptr + b, key.to(tl.int64))

    if (PEN_REP or PEN_OUT) and not AUX:
        _pen_table(pen_ptr + b64 * RS, W, RS, x_ptr + b64 * x_stride, rep_ptr + b64 * rep_stride, R,
                   out_ptr + b64 * out_stride, O, cnt_ptr + b64 * cnt_stride,
                   tl.load(rp_ptr + b), tl.load(fp_ptr + b), tl.load(pp_ptr + b), V,
                   PEN_REP, PEN_OUT, TABLE, HAS_COUNTS, CAND, FAST, BL, BW)
    if PIVOT:
        if not EARLY:
            sbase, spos, smask, sx = _sample(x_ptr + b64 * x_stride, V, NS)
        PIVOT_PEN: tl.constexpr = (PEN_REP or PEN_OUT) and not CAND
        if PIVOT_PEN:
            tl.debug_barrier()
        _pivot(sbase, spos, smask, sx, pen_ptr + b64 * RS, W, b, V,
               temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, theta_ptr, ythr_ptr, CAP,
               PIVOT_PEN, HAS_TEMP, FAST, NS, J0)
    _gdc_done(PDL)


@triton.jit
def _store_chunk_max(ymax, T, Y, ws, cflag_ptr, cm_ptr, HAS_TEMP: tl.constexpr, FAST: tl.constexpr):
    """A chunk's max z = max(y) / T (exact) and its flags, from the lanes' NaN-propagating maxima
    of y: bit 0, NaN or +inf (the row is invalid); bit 1, a value above -inf."""
    y_c = tl.max(ymax)
    m_c = y_c
    if HAS_TEMP:
        m_c = _div(y_c, T, Y, FAST)
    bad_c = (tl.max((ymax != ymax).to(tl.int32)) > 0) | (m_c == float("inf"))
    tl.store(cflag_ptr + ws, bad_c.to(tl.int32) | ((m_c > float("-inf")).to(tl.int32) << 1))
    tl.store(cm_ptr + ws, m_c)


@triton.jit
def _raw_slots(pen_row, W, RS):
    """The slot arrays of a raw-id penalty table (:func:`_prep_kernel`): [bits: W | prefix: W |
    values: S | states: S | token ids: S]; returns S and the states' and ids' rows."""
    S = (RS - 2 * W) // 3
    return S, pen_row + 2 * W + S, pen_row + 2 * W + 2 * S


@triton.jit
def _append_candidates(sel, y, ids, b, T, Y, ncand_ptr, cval_ptr, cidx_ptr, CAP, HAS_TEMP: tl.constexpr,
                       FAST: tl.constexpr):
    """Append the selected values (as z = y / T) and their token ids to row b's candidate list:
    one atomic for room, then the slots in order; beyond CAP nothing is stored (the count still
    grows, which sends the row to the fallback)."""
    si = sel.to(tl.int32)
    n = tl.sum(si)
    if n > 0:
        base = tl.atomic_add(ncand_ptr + b, n, sem="relaxed")
        dst = base + tl.cumsum(si, 0) - 1
        z = y
        if HAS_TEMP:
            z = _div(y, T, Y, FAST)
        ok = sel & (dst < CAP)
        tl.store(cval_ptr + b.to(tl.int64) * CAP + dst, z, mask=ok)
        tl.store(cidx_ptr + b.to(tl.int64) * CAP + dst, ids, mask=ok)


@triton.jit
def _pen_chunk(id_src, zrow, lo, hi, V, b, ws, temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, yth,
               cm_ptr, cs_ptr, crm_ptr, crs_ptr, cflag_ptr, ckey_ptr, cid_ptr, ncand_ptr, cval_ptr, cidx_ptr, CAP,
               HAS_TEMP: tl.constexpr, FAST: tl.constexpr, ANY_PLAIN: tl.constexpr, ANY_TRUNC: tl.constexpr,
               NEED_S: tl.constexpr, NEED_RAW: tl.constexpr, BC: tl.constexpr):
    """Slots [lo, hi) of the row's penalised tokens as one more chunk of its scan (stats at index
    ``ws``), from its table: token ids ``id_src`` (< 0 or >= V: empty), penalised values ``zrow``.

    The scan's chunks mask these tokens (a bit test per token instead of a rank and a load: S3's
    scan took 99 us against S2's 86 at B = 256, bench/NOTES.md v10), and a few more work items per
    row compute here what their loop would have had for them: the max and NaN flag, the sum
    of exp(z - max) below the max (per lane online, as :func:`_lse_update`), greedy rows' argmax
    (the lowest id on ties) and the candidates y >= yth, copied to the row's list as z = y / T.
    Rows that choose in two levels do not mask them (their blocks need every token). (In the
    prep, latency-bound with one program per row, the same work cost 3-5 us per call.)"""
    greedy, k, p, mp, active_k, active_p, trunc = _row_flags(greedy_ptr, topk_ptr, topp_ptr, minp_ptr, b, V)
    # rows that choose in two levels look their penalised tokens up in the chunks (a block's
    # key needs all its tokens): nothing to do here
    hi = tl.where((trunc == 0) & (greedy == 0), lo, hi)
    T = tl.load(temp_ptr + b)
    Y = _recip(T, FAST)
    ys = tl.full([], 1.0, tl.float32)
    if HAS_TEMP:
        ys = 1.0 / T
    lanes = tl.arange(0, BC)
    ymax = tl.full([BC], float("-inf"), tl.float32)
    m_vec = tl.full([BC], float("-inf"), tl.float32)
    s_vec = tl.zeros([BC], tl.float32)
    kb = tl.full([BC], float("-inf"), tl.float32)
    ki = tl.full([BC], INT32_MAX, tl.int32)
    cand = ANY_TRUNC and trunc
    for i0 in range(lo, hi, BC):
        i = i0 + lanes
        t = tl.load(id_src + i, mask=i < hi, other=-1)
        y = tl.load(zrow + i, mask=i < hi, other=float("-inf"), cache_modifier=".cg")
        ok = (t >= 0) & (t < V) & (i < hi)
        ts = tl.where(ok, t, 0).to(tl.int32)
        y = tl.where(ok, y, float("-inf"))
        ymax = _max_nan(ymax, y)
        if NEED_S:
            z = y * ys
            s_vec = _lse_update(s_vec, m_vec, z)
            m_vec = tl.maximum(m_vec, z)
        if ANY_PLAIN:
            # greedy rows (T = 1): the argmax of y
            better = ok & ((y > kb) | ((y == kb) & (ts < ki)))
            kb = tl.where(better, y, kb)
            ki = tl.where(better, ts, ki)
        if cand:
            _append_candidates(ok & (y >= yth), y, ts, b, T, Y, ncand_ptr, cval_ptr, cidx_ptr, CAP, HAS_TEMP, FAST)
    _store_chunk_max(ymax, T, Y, ws, cflag_ptr, cm_ptr, HAS_TEMP, FAST)
    if NEED_S:
        mc, oth = _lse_chunk(m_vec, s_vec)
        tl.store(cs_ptr + ws, oth)
    if NEED_RAW:
        # the raw log-sum-exp is the scan's, over every token
        tl.store(crm_ptr + ws, float("-inf"))
        tl.store(crs_ptr + ws, tl.zeros([], tl.float64))
    if ANY_PLAIN:
        kbest = tl.max(kb)
        tl.store(ckey_ptr + ws, kbest)
        tl.store(cid_ptr + ws, tl.min(tl.where(kb == kbest, ki, INT32_MAX)))


@triton.jit
def _sample(x_row, V, NS: tl.constexpr):
    """The pivot's sample of a row: NS values, NS / 8 runs of 8 neighbours spread evenly over
    the row (whole 32-byte sectors), or the whole row when V <= NS. Returns the runs' first
    positions [NS / 8], and as [8, NS / 8] (column r holding run r) the positions, whether they
    are in the row, and the float32 logits (-inf outside).

    The 8 offsets are scaled by (V >> 31) + 1 (= 1, unknown to the compiler) so that Triton
    cannot prove them contiguous: its coalescing pass would otherwise lay 8 lanes along a run,
    leaving the run maxima replicated over those lanes (8x the search's work) or converting
    layouts through shared memory. With 32 lanes x 8 warps along the runs, a thread holds whole
    runs, the maxima need no shuffles, and each table lookup stage is one batch of loads."""
    r = tl.arange(0, NS // 8)
    base = tl.where(V <= NS, r * 8, ((r.to(tl.int64) * V) // (NS // 8)).to(tl.int32))
    pos = base[None, :] + tl.arange(0, 8)[:, None] * ((V >> 31) + 1)
    mask = pos < V
    return base, pos, mask, tl.load(x_row + pos, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _pivot(base, pos, mask, x, pen_row, W, b, V, temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, theta_ptr,
           ythr_ptr, CAP, HAS_PEN: tl.constexpr, HAS_TEMP: tl.constexpr, FAST: tl.constexpr, NS: tl.constexpr,
           J0: tl.constexpr):
    """The row's candidate threshold ``theta`` (+inf: no candidates, the row takes the fallback),
    from the row's sample (:func:`_sample`: run starts, positions, in range, logits).

    With top-k, theta is a cut near rank j = ceil(k * NS / V) + J0 (between j and j + j/4 + 2
    sampled values lie above it): the row then holds about j * V / NS values above theta, at
    least k of them unless the sample was very unlucky (the finish verifies it). With min-p,
    max(sample) + log(min_p) (minus rounding slack) is a proven bound, since the sample's max is
    at most the row's.

    The selection works on the penalised values y before the temperature (rounded division by
    T > 0 is monotone: only the chosen value is divided), and for a spread sample on the NS / 8
    run maxima: at least j sampled values lie above the j-th largest run maximum, and more than
    j only when two of the top j share a run (~j * j * 7 / (2 * NS) extra: 0.2 at j = 14), for
    an eighth of the counting (bench/NOTES.md, v9).
    """
    greedy, k, p, mp, active_k, active_p, trunc = _row_flags(greedy_ptr, topk_ptr, topp_ptr, minp_ptr, b, V)
    th = tl.full([], float("inf"), tl.float32)
    T = tl.load(temp_ptr + b)
    Y = _recip(T, FAST)
    if trunc:
        y = x
        if HAS_PEN:
            # A run's 8 tokens share at most two bitmask words: their words and prefixes are
            # loaded once per run (a warp's load touches 32 runs' sectors; per token it would
            # be 8 such loads). (".cg": this program wrote the table just now, past a barrier.)
            in_row = base < V
            word0, pre0 = _pen_words(pen_row, base, in_row, W, ".cg")
            word1, pre1 = _pen_words(pen_row, tl.minimum(base + 7, V - 1), in_row, W, ".cg")
            first = (pos >> 5) == (base >> 5)[None, :]
            word = tl.where(first, word0[None, :], word1[None, :])
            pre = tl.where(first, pre0[None, :], pre1[None, :])
            hit, zp = _pen_value_cg(pen_row, word, pre, pos, mask, W, FAST)
            y = tl.where(hit, zp, x)
        valid = mask & (y == y) & (y > float("-inf"))
        ky = tl.where(valid, _okey(y), INT32_MIN)
        kr = tl.max(ky, axis=0)
        vr = kr > INT32_MIN
        cr = tl.sum(valid.to(tl.int32), axis=0)
        counts = tl.sum(cr + tl.where(cr > 0, 65536, 0))
        nvalid = counts & 65535
        nruns = counts >> 16
        hi = tl.max(kr).to(tl.int64)
        ns = tl.minimum(V, NS)
        if nvalid > 0:
            ms = _ofloat(hi.to(tl.int32))
            if HAS_TEMP:
                ms = _div(ms, T, Y, FAST)
            thm = _minp_cut(ms, mp)
            if active_k:
                j = tl.maximum(tl.minimum((k * ns + V - 1) // V + J0, nvalid), 1).to(tl.int32)
                band = j + j // 4 + 2
                # expected candidates ~ j * V / ns: beyond the slots, skip straight to the fallback
                if j * (V // ns) <= CAP:
                    if (V > NS) & (4 * j <= nruns):
                        # three cuts per step pack 10-bit counts: fewer than 1024 run maxima
                        key = _key_search(kr, vr, j, band, tl.min(tl.where(vr, kr, INT32_MAX)).to(tl.int64), hi,
                                          3 if NS // 8 < 1024 else 2, 0)
                    else:
                        key = _key_search(ky, valid, j, band, tl.min(tl.where(valid, ky, INT32_MAX)).to(tl.int64),
                                          hi, 2, 0)
                    th = _ofloat(key)
                    if HAS_TEMP:
                        th = _div(th, T, Y, FAST)
                if (mp > 0.0) & (active_p == 0):
                    # either bound covers top-k + min-p: the higher one leaves fewer candidates
                    th = tl.where(th == float("inf"), thm, tl.maximum(th, thm))
            elif mp > 0.0:
                th = thm
            elif active_p:
                # Top-p alone: c = the sampled values that hold p of the sample's mass; the
                # pivot is the (c/3 + J0 + 2)-th largest sampled value (the sample lacks the
                # row's extremes, so its nucleus is relatively wider). The finish checks that
                # the candidates' mass reaches p of the row's; randn-like rows (sigma 4.3) pass
                # ~92% of the time (bench/NOTES.md, v6), the rest take the fallback.
                z = y
                if HAS_TEMP:
                    z = _div(y, T, Y, FAST)
                kz = _okey(z)
                wz = tl.where(valid, tl.exp(z - ms), 0.0)
                pw = p * tl.sum(wz)
                zlo = tl.min(tl.where(valid, kz, INT32_MAX)).to(tl.int64)
                zhi = tl.max(tl.where(valid, kz, INT32_MIN)).to(tl.int64)
                lo = zlo
                up = zhi
                for _ in range(16):
                    mid = lo + (up - lo + 1) // 2
                    ok = tl.sum(tl.where(valid & (kz >= mid.to(tl.int32)), wz, 0.0)) >= pw
                    lo = tl.where(ok, mid, lo)
                    up = tl.where(ok, up, mid - 1)
                c = tl.sum((valid & (kz >= lo.to(tl.int32))).to(tl.int32))
                j = tl.maximum(tl.minimum(c // 3 + J0 + 2, nvalid), 1)
                if j * (V // ns) <= CAP:
                    th = _ofloat(_key_search(kz, valid, j, j + j // 4 + 2, zlo, zhi, 2, 0))
    tl.store(theta_ptr + b, th)
    # the scan compares the logits before the temperature
    yth = th
    if HAS_TEMP:
        yth = _y_threshold(th, T, Y, FAST)
    tl.store(ythr_ptr + b, yth)


# ----------------------------------------------------------------------------- scan


@triton.jit
def _widen(x, FAST: tl.constexpr):
    """Loaded logits as float32. bfloat16 pairs are widened by one instruction each (a shift
    and a mask of the 32-bit word that holds them: the compiler's conversion spends a byte
    permute on every second element)."""
    if FAST:
        if x.dtype == tl.bfloat16:
            return tl.inline_asm_elementwise(
                "{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xFFFF0000; }", "=r,=r,r",
                [x.to(tl.int16, bitcast=True)], dtype=tl.float32, is_pure=True, pack=2)
    return x.to(tl.float32)


@triton.jit
def _blk_sum(v, TILE: tl.constexpr):
    """Sums over the tile's blocks of rs.BLOCK consecutive tokens (in registers: a lane holds
    whole blocks), as [TILE // rs.BLOCK]."""
    return tl.sum(tl.reshape(v, [TILE // rs.BLOCK, rs.BLOCK]), 1)


@triton.jit
def _block_bound(m_row, kb_row, ys):
    """cb with exp(L - kb_row) = eb * cb for a block of log-mass L whose mass against the running
    max m_row is eb (inf while no block was chosen); 0.1% slack covers the rounding."""
    return tl.where(kb_row == float("-inf"), float("inf"), tl.exp2((m_row * ys - kb_row) * LOG2E) * 1.001)


@triton.jit
def _scan_tile(
    s0, end, x_row, lanes, blanes, pen_row, onebit, W, gum_row, ys, c2, yth, pbase, pc_ptr, bk, rk,
    ymax, m_row, ml2, n_at, s_extra, s_blk, rm_vec, rs_vec, kb, ki, kb_row, cb, gi, ccnt,
    MASKED: tl.constexpr, HAS_PEN: tl.constexpr, FAST: tl.constexpr, ANY_PLAIN: tl.constexpr,
    ANY_GUMBEL: tl.constexpr, ANY_TRUNC: tl.constexpr, NEED_S: tl.constexpr, NEED_RAW: tl.constexpr,
    TILE: tl.constexpr, VEC: tl.constexpr, D: tl.constexpr,
):
    """One tile s0 + [0, TILE) of a scan item: the item's running state in, updated state out
    (see :func:`_scan_kernel`). Only the item's last tile can be partial (MASKED). The token
    ids s0 + lanes are formed only where a rare branch needs them.

    Penalised tokens are masked here (-inf: never the max, a candidate or a key) and enter the
    row through the penalty items (_pen_chunk), so the tile reads only the bitmask words beside
    the logits; rows that choose in two levels need every token of a block, and look their
    penalised values up here instead."""
    if MASKED:
        x = _widen(tl.load(x_row + s0 + lanes, mask=s0 + lanes < end, other=float("-inf")), FAST)
    else:
        x = _widen(tl.load(x_row + s0 + lanes), FAST)
    y = x
    if HAS_PEN:
        pword, phit = _pen_tile(pen_row, s0, end, onebit, TILE, VEC)
        y = tl.where(phit, float("-inf"), x)
        if ANY_GUMBEL:  # (compiled only for batches with such rows)
            if gum_row:
                y = _pen_tile_values(pen_row, s0, pword, phit, x, W, FAST, TILE)
    # The lanes' own maxima (NaN-propagating: they flag NaN, and +inf shows in them) feed
    # the chunk max and the votes below: one compare per lane, not per element.
    lm = _lane_max(y, TILE, VEC)
    ymax = _max_nan(ymax, lm)
    if NEED_S or ANY_GUMBEL:
        # exp(z - m_row) against the running max as this tile starts, summed per block
        eb = _blk_sum(tl.exp2(tl.fma(y, c2, -ml2)), TILE)
    if ANY_GUMBEL:
        if gum_row:
            # A block (mass eb against m_row) can only beat kb_row where its v < thr =
            # eb * cb: after the first tiles almost no tile has one, so a vote over a
            # cheap conservative form of that test (on the uniform's bits, before any
            # log) skips the whole tile. One hash per block, none per token.
            # e is NaN for -inf tokens while m_row is still -inf (-inf - -inf): any
            # block could then win (cb = inf), so its mass reads as inf
            ebg = tl.where(eb == eb, eb, float("inf"))
            hb = _u_mantissa(bk, blanes + tl.cast(s0, tl.uint32) // rs.BLOCK)
            if _vote_bits(_beat_margin(hb, ebg, cb), FAST) > 0:
                kb, ki, kb_row = _block_update(y * ys, s0 + lanes, hb, ebg * cb, rk, kb, ki, kb_row, TILE, FAST)
                cb = _block_bound(m_row, kb_row, ys)
    if NEED_S or ANY_GUMBEL:
        # The running max rises in few tiles: a vote (one integer reduction) finds them,
        # and only they reduce the tile's max across the lanes and count the elements at
        # the max. (A NaN makes the sum NaN; its row is invalid through its flag.) One
        # vote for this and the Gumbel test above measured slower than two (v11).
        # (some y >= m_row: y - y is +0, and while m_row is -inf, -inf - -inf is NaN)
        if _vote_bits(lm - m_row, FAST) >= 0:
            tmax = tl.max(lm)
            if tmax > m_row:
                if ANY_PLAIN:
                    # greedy rows' argmax: the first token at the new max (an equal
                    # max in a later tile keeps the earlier token)
                    gi = tl.min(tl.where(y == tmax, s0 + lanes, INT32_MAX))
                f = tl.exp2((m_row - tmax) * c2)
                s_blk = s_blk * f
                s_extra = (s_extra + n_at) * f
                n_at = tl.zeros([], tl.float32)
                m_row = tmax
                ml2 = tmax * c2
                if ANY_GUMBEL:
                    cb = _block_bound(m_row, kb_row, ys)
            n_at += tl.sum((y == m_row).to(tl.float32))
            if NEED_S:
                s_blk += _blk_sum(tl.where(y < m_row, tl.exp2(tl.fma(y, c2, -ml2)), 0.0), TILE)
        else:
            if NEED_S:
                s_blk += eb
    if NEED_RAW:
        rs_vec = _lse_update(rs_vec, rm_vec, x)
        rm_vec = tl.maximum(rm_vec, x)
    if ANY_TRUNC:
        # a candidate y >= yth in some lane (the lanes' maxima decide; NaN votes yes)
        if _vote_bits(lm - yth, FAST) >= 0:
            sel = y >= yth
            slot = pbase + ccnt * TILE + lanes
            keep = sel & (ccnt < D)
            _store_candidate(pc_ptr + slot, _pack_candidate(y, s0 + lanes, FAST), keep, FAST)
            ccnt += sel.to(tl.int32)
    return ymax, m_row, ml2, n_at, s_extra, s_blk, rm_vec, rs_vec, kb, ki, kb_row, cb, gi, ccnt


@triton.jit(do_not_specialize=["samp_lo", "samp_hi", "ncand_ptr", "B", "NITEMS", "C", "CS", "NP", "SPAN"] + _HIST)
def _scan_kernel(
    x_ptr, x_stride, V, CH, C, CS, B, NITEMS, NP, SPAN, rep_ptr, rep_stride, R,
    temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, rowkey_ptr,
    pen_ptr, W, RS,
    cm_ptr, cs_ptr, crm_ptr, crs_ptr, cflag_ptr, ckey_ptr, cid_ptr,
    out_ptr, out_stride, O, cnt_ptr, cnt_stride, pos_ptr, hs_ptr, slo_ptr, shi_ptr,
    samp_lo, samp_hi, call_ptr, ythr_ptr, ncand_ptr, pc_ptr, cval_ptr, cidx_ptr, CAP,
    PREP: tl.constexpr, HAS_OUT: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_PEN: tl.constexpr, HAS_TEMP: tl.constexpr, FAST: tl.constexpr,
    ANY_PLAIN: tl.constexpr, ANY_GUMBEL: tl.constexpr, ANY_TRUNC: tl.constexpr,
    NEED_S: tl.constexpr, NEED_RAW: tl.constexpr, TILE: tl.constexpr, VEC: tl.constexpr, D: tl.constexpr,
    TABLE: tl.constexpr, NS: tl.constexpr, PDL: tl.constexpr,
):
    """Persistent: program p takes work items p, p + P, ... (item w is chunk w // B of row
    w % B).

    The loop works on the penalised logits ``y`` *before* the temperature, z = y / T: the
    division is monotone, so the row max, the candidates (y >= the prep's y-threshold, the
    exact preimage of ``z >= theta``) and the greedy argmax are exact without dividing each
    element; only the candidates and the chunk max are divided (exactly) when the item ends.
    The log-sum-exp and the Gumbel keys use z ~ y * (1/T) (within an ulp; they are
    approximations anyway, and the finish recomputes the chosen token's z exactly)."""
    _gdc_wait(PDL)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, TILE)
    # Chunks start at multiples of TILE, so token s0 + i of a tile has bit i % 32 of its bitmask
    # word: the bit masks of the penalty test are the same for every tile.
    tl.static_assert(TILE % 32 == 0)
    onebit = tl.full([TILE], 1, tl.int32) << (lanes & 31)
    # Work items g = pid, pid + P, ...: first NP = B * (CS - C) items of SPAN slots of the rows'
    # penalised tokens (the chunks mask them; a row's slots split over several short items: at
    # B = 1 one item over 2048 slots took 13.7 us serially, longer than the chunks), then the
    # chunks.
    for g in range(pid, NP, nprog):
        j = g // B
        b = g - j * B
        b64 = b.to(tl.int64)
        pen_row = pen_ptr + b64 * RS
        if TABLE:
            S = R
            id_src = rep_ptr + b64 * rep_stride
        else:
            S, _, id_src = _raw_slots(pen_row, W, RS)
        yth = tl.full([], float("inf"), tl.float32)
        if ANY_TRUNC:
            yth = tl.load(ythr_ptr + b)
        _pen_chunk(id_src, (pen_row + 2 * W).to(tl.pointer_type(tl.float32)), j * SPAN,
                   tl.minimum(S, j * SPAN + SPAN), V, b, b64 * CS + C + j,
                   temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, yth,
                   cm_ptr, cs_ptr, crm_ptr, crs_ptr, cflag_ptr, ckey_ptr, cid_ptr, ncand_ptr, cval_ptr, cidx_ptr, CAP,
                   HAS_TEMP, FAST, ANY_PLAIN, ANY_TRUNC, NEED_S, NEED_RAW, TILE)
    for g in range(pid + tl.cdiv(tl.maximum(NP - pid, 0), nprog) * nprog, NP + NITEMS, nprog):
        w = g - NP
        c = w // B
        b = w - c * B
        b64 = b.to(tl.int64)
        x_row = x_ptr + b64 * x_stride
        pen_row = pen_ptr + b64 * RS
        start = c * CH
        end = tl.minimum(start + CH, V)
        T = tl.load(temp_ptr + b)
        Y = _recip(T, FAST)
        ys = tl.full([], 1.0, tl.float32)  # z ~ y * ys
        if HAS_TEMP:
            ys = 1.0 / T
        c2 = ys * LOG2E
        greedy, k, p, mp, active_k, active_p, trunc = _row_flags(greedy_ptr, topk_ptr, topp_ptr, minp_ptr, b, V)
        gum_row = (trunc == 0) & (greedy == 0)
        if PREP:
            rk = tl.load(rowkey_ptr + b).to(tl.uint32)
        else:
            # Without penalties or truncation there is no prep launch: each item derives the
            # row key itself (O(L) reads); the first chunk publishes it.
            rk = _position_key(b, V, out_ptr, out_stride, O, cnt_ptr, cnt_stride, pos_ptr, hs_ptr, slo_ptr,
                               shi_ptr, samp_lo, samp_hi, call_ptr, HAS_OUT, HAS_COUNTS, HAS_POS, 256)
            if c == 0:
                tl.store(rowkey_ptr + b, rk.to(tl.int64))
        bk = rs.block_key(rk)
        # candidates of truncated rows: y >= yth. Tile position j appends to its own column of
        # D private slots (slot = count_j * TILE + j): no prefix sums, no atomics in the loop.
        yth = tl.full([], float("inf"), tl.float32)
        if ANY_TRUNC:
            yth = tl.load(ythr_ptr + b)
        pbase = (b64 + c * B) * (D * TILE)  # item w = c * B + b, in int64
        ccnt = tl.zeros([TILE], tl.int32)

        ymax = tl.full([32], float("-inf"), tl.float32)
        # Row log-sum-exp against the running chunk max m_row (a scalar, raised tile by tile):
        # s_blk sums exp(z - m_row) over elements strictly below it, per block slot of rs.BLOCK
        # tokens (the blocks' sums serve the two-level choice too); elements equal to m_row
        # are counted in n_at, and former maxima, once overtaken, move to s_extra. The sum of
        # "the others" stays accurate for peaked rows, where the logprob is -log1p(others).
        NB: tl.constexpr = TILE // rs.BLOCK
        m_row = tl.full([], float("-inf"), tl.float32)
        ml2 = tl.full([], float("-inf"), tl.float32)
        n_at = tl.zeros([], tl.float32)
        s_extra = tl.zeros([], tl.float32)
        s_blk = tl.zeros([NB], tl.float32)
        rm_vec = tl.full([TILE], float("-inf"), tl.float32)
        rs_vec = tl.zeros([TILE], tl.float32)
        # rows without truncation choose a block of rs.BLOCK tokens, then a token in it: per
        # block slot of the tile, the best block key so far and its token
        blanes = tl.arange(0, NB).to(tl.uint32)
        kb = tl.full([NB], float("-inf"), tl.float32)
        ki = tl.zeros([NB], tl.int32)
        kb_row = tl.full([], float("-inf"), tl.float32)
        cb = tl.full([], float("inf"), tl.float32)  # _block_bound(m_row, kb_row, ys)
        # Greedy rows (key y, T = 1) need no per-element work: their argmax moves only where the
        # running max m_row rises, which the log-sum-exp's vote finds (ANY_PLAIN implies NEED_S).
        tl.static_assert(NEED_S or not ANY_PLAIN)
        gi = tl.zeros([], tl.int32)
        # tl.range's software pipeline (NS stages) copies the next NS - 1 tiles into shared
        # memory (cp.async) while this one computes, holding no registers (3 stages measured
        # faster than a tile prefetched into registers by hand: v11; 4 faster than 3: v19).
        # Full tiles need no mask; a row's last chunk may end in one partial tile, peeled off.
        full = start + (end - start) // TILE * TILE
        for s0 in tl.range(start, full, TILE, num_stages=NS):
            ymax, m_row, ml2, n_at, s_extra, s_blk, rm_vec, rs_vec, kb, ki, kb_row, cb, gi, ccnt = _scan_tile(
                s0, end, x_row, lanes, blanes, pen_row, onebit, W, gum_row, ys, c2, yth, pbase, pc_ptr, bk, rk,
                ymax, m_row, ml2, n_at, s_extra, s_blk, rm_vec, rs_vec, kb, ki, kb_row, cb, gi, ccnt,
                False, HAS_PEN, FAST, ANY_PLAIN, ANY_GUMBEL, ANY_TRUNC, NEED_S, NEED_RAW, TILE, VEC, D)
        if full < end:
            ymax, m_row, ml2, n_at, s_extra, s_blk, rm_vec, rs_vec, kb, ki, kb_row, cb, gi, ccnt = _scan_tile(
                full, end, x_row, lanes, blanes, pen_row, onebit, W, gum_row, ys, c2, yth, pbase, pc_ptr, bk, rk,
                ymax, m_row, ml2, n_at, s_extra, s_blk, rm_vec, rs_vec, kb, ki, kb_row, cb, gi, ccnt,
                True, HAS_PEN, FAST, ANY_PLAIN, ANY_GUMBEL, ANY_TRUNC, NEED_S, NEED_RAW, TILE, VEC, D)

        ws = b64 * CS + c
        _store_chunk_max(ymax, T, Y, ws, cflag_ptr, cm_ptr, HAS_TEMP, FAST)
        if NEED_S:
            oth = tl.sum(s_blk.to(tl.float64)) + s_extra.to(tl.float64) + tl.maximum(n_at - 1.0, 0.0).to(tl.float64)
            tl.store(cs_ptr + ws, oth)
        if NEED_RAW:
            rmc, roth = _lse_chunk(rm_vec, rs_vec)
            tl.store(crm_ptr + ws, rmc)
            tl.store(crs_ptr + ws, roth)
        if ANY_PLAIN:
            kbest = m_row
            ibest = gi
            if ANY_GUMBEL:
                kg = tl.max(kb)
                kbest = tl.where(gum_row, kg, kbest)
                ibest = tl.where(gum_row, tl.min(tl.where(kb == kg, ki, INT32_MAX)), ibest)
            tl.store(ckey_ptr + ws, kbest)
            tl.store(cid_ptr + ws, ibest)
        if ANY_TRUNC:
            nj = tl.minimum(ccnt, D)
            tot = tl.sum(nj)
            if tl.max(ccnt) > D:
                # a tile position's slots overflowed: the row can only take the fallback
                tl.atomic_add(ncand_ptr + b, CAP + 1, sem="relaxed")
            elif tot > 0:
                # one atomic per item: room in the row's list, then the private slots are
                # copied there as z = y / T (written by this warp just now: the barrier makes
                # them visible to every lane)
                tl.debug_barrier()
                base = tl.atomic_add(ncand_ptr + b, tot, sem="relaxed")
                dst0 = base + tl.cumsum(nj, 0) - nj
                for d in range(0, tl.max(nj)):
                    mk = d < nj
                    pk = tl.load(pc_ptr + pbase + d * TILE + lanes, mask=mk, other=0)
                    val = (pk & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
                    idx = (pk >> 32).to(tl.int32)
                    if HAS_TEMP:
                        val = _div(val, T, Y, FAST)
                    dst = dst0 + d
                    ok = mk & (dst < CAP)
                    tl.store(cval_ptr + b64 * CAP + dst, val, mask=ok)
                    tl.store(cidx_ptr + b64 * CAP + dst, idx, mask=ok)
    _gdc_done(PDL)


# ----------------------------------------------------------------------------- finish


@triton.jit
def _wfix(v, m):
    """A candidate's mass exp(v - m) (float32, from float32 values) as int64 fixed point."""
    return _fix(tl.exp(v - m).to(tl.float64))


@triton.jit
def _compact(v, idx, w, sel, nk, row, cval_ptr, cidx_ptr, cw_ptr):
    """Store the selected lanes at slots nk, nk + 1, ... of the row's lists; returns the new
    count. Callers have read every slot at or after nk that they still need."""
    dst = nk + tl.cumsum(sel.to(tl.int32), 0) - 1
    tl.debug_barrier()
    tl.store(cval_ptr + row + dst, v, mask=sel)
    tl.store(cidx_ptr + row + dst, idx, mask=sel)
    tl.store(cw_ptr + row + dst, w, mask=sel)
    return nk + tl.sum(sel.to(tl.int32))


@triton.jit
def _top_k_regs(row, cnt, k, th, m, kth_ok, vs, ids, cval_ptr, cidx_ptr, cw_ptr, N: tl.constexpr, GAP: tl.constexpr):
    """The register path of :func:`_candidates_row` over cnt <= N candidates (vs, ids: the
    row's first N slots, read before the count was known): (total mass, max key, the k-th
    largest key, the number of top-k survivors, their mass), the survivors compacted to the
    front of the row's lists. Up to 256 slots the k-th search cuts 3 times a step: its compares
    are cheap there and its steps are the latency (ties at the k-th value, common in 2-byte
    logits, take it down to one key); over more, the extra compares cost more than the steps
    they save (bench/NOTES.md v19.1)."""
    i = tl.arange(0, N)
    ok = i < cnt
    v = tl.where(ok, vs, float("-inf"))
    keys = _okey(v)
    w = tl.where(ok, _wfix(v, m), 0)
    mass = tl.sum(w)
    kmax = tl.max(tl.where(ok, keys, INT32_MIN))
    kcut = tl.full([], INT32_MIN, tl.int32)
    if kth_ok:
        kcut = _key_search(keys, ok, k, k, _okey(th).to(tl.int64), kmax.to(tl.int64), 3 if N <= 256 else 1, GAP)
    idx = tl.where(ok, ids, 0)
    sel = ok & (keys >= kcut)
    nk = _compact(v, idx, w, sel, tl.zeros([], tl.int32), row, cval_ptr, cidx_ptr, cw_ptr)
    kmass = tl.sum(tl.where(sel, w, 0))
    return mass, kmax, kcut, nk, kmass


@triton.jit
def _candidates_row(b, k, p, mp, active_k, active_p, m, lse_all, cnt, ncov, vl, xl, theta_ptr, cval_ptr, cidx_ptr,
                    cw_ptr, rowkey_ptr, CAP, NEED_S: tl.constexpr, FT: tl.constexpr, FRL: tl.constexpr,
                    FR: tl.constexpr, NKP: tl.constexpr, GAP: tl.constexpr):
    """Exact top-k / top-p / min-p and the Gumbel-max choice over a row's candidates (every
    z >= theta). Returns (status, token, logprob, tau, lse); status 2 when the candidates do not
    provably hold every survivor (the finish then runs the exact fallback on the row).

    Up to FR candidates are held in registers, in arrays of FRL <= FR slots where they fit (the
    per-step work of the register arrays is the finish's latency); the k-th value by a bisection
    that stops once exactly k keys are above it; more are read in chunks of FT slots. The top-k
    survivors are then compacted to the front of the row's lists; top-p over <= NKP of them
    compares every pair (no bisection), over more it bisects chunk by chunk. Masses exp(z - m)
    are int64 fixed point (2**-40), so sums do not depend on the order in which the scan
    appended candidates.

    ``cnt`` slots of the row's lists are used, ``ncov`` of them hold candidates (the others, left
    by :func:`_cand_penalties`, hold -inf); vl, xl: the first FRL slots' values and ids, read by
    the caller together with the count (those past it hold stale values)."""
    b64 = b.to(tl.int64)
    row = b64 * CAP
    m64 = m.to(tl.float64)
    th = tl.load(theta_ptr + b)
    status = tl.full([], 2, tl.int32)
    tok = tl.full([], -1, tl.int32)
    lp = tl.full([], float("nan"), tl.float64)
    tau = tl.full([], float("-inf"), tl.float32)
    lse = tl.full([], float("nan"), tl.float64)
    lanes = tl.arange(0, FT)
    kth_ok = active_k & (k <= ncov)
    if (th < float("inf")) & (cnt <= CAP):
        if cnt <= FRL:
            mass, kmax, kcut, nk, kmass = _top_k_regs(row, cnt, k, th, m, kth_ok, vl, xl, cval_ptr, cidx_ptr, cw_ptr,
                                                      FRL, GAP)
        elif cnt <= FR:
            i = tl.arange(0, FR)
            vs = tl.load(cval_ptr + row + i, mask=i < cnt, other=float("-inf"))
            ids = tl.load(cidx_ptr + row + i, mask=i < cnt, other=0)
            mass, kmax, kcut, nk, kmass = _top_k_regs(row, cnt, k, th, m, kth_ok, vs, ids, cval_ptr, cidx_ptr, cw_ptr,
                                                      FR, GAP)
        else:
            mass = tl.zeros([], tl.int64)
            kmax = tl.full([], INT32_MIN, tl.int32)
            for c0 in range(0, cnt, FT):
                i = c0 + lanes
                ok = i < cnt
                v = tl.load(cval_ptr + row + i, mask=ok, other=float("-inf"))
                w = tl.where(ok, _wfix(v, m), 0)
                tl.store(cw_ptr + row + i, w, mask=ok)
                mass += tl.sum(w)
                kmax = tl.maximum(kmax, tl.max(tl.where(ok, _okey(v), INT32_MIN)))
            kcut = tl.full([], INT32_MIN, tl.int32)
            if kth_ok:
                lo = _okey(th).to(tl.int64)
                hi = kmax.to(tl.int64)
                while lo < hi:
                    mid = lo + (hi - lo + 1) // 2
                    c = tl.zeros([], tl.int32)
                    for c0 in range(0, cnt, FT):
                        i = c0 + lanes
                        v = tl.load(cval_ptr + row + i, mask=i < cnt, other=float("-inf"))
                        c += tl.sum((_okey(v) >= mid.to(tl.int32)).to(tl.int32))
                    lo = tl.where(c >= k, mid, lo)
                    hi = tl.where(c >= k, tl.where(c == k, mid, hi), mid - 1)
                kcut = lo.to(tl.int32)
            nk = tl.zeros([], tl.int32)
            kmass = tl.zeros([], tl.int64)
            for c0 in range(0, cnt, FT):
                i = c0 + lanes
                ok = i < cnt
                v = tl.load(cval_ptr + row + i, mask=ok, other=float("-inf"))
                idx = tl.load(cidx_ptr + row + i, mask=ok, other=0)
                w = tl.load(cw_ptr + row + i, mask=ok, other=0)
                sel = ok & (_okey(v) >= kcut)
                kmass += tl.sum(tl.where(sel, w, 0))
                nk = _compact(v, idx, w, sel, nk, row, cval_ptr, cidx_ptr, cw_ptr)
        tl.debug_barrier()
        # The candidates hold the top-k set if there are at least k of them (then the k-th
        # largest value is >= theta), the min-p set if theta is below the min-p cut of the
        # row's max, and the nucleus (top-p without top-k) if their mass reaches p of the
        # row's (the scan's log-sum-exp).
        cover_k = active_k & (ncov >= k)
        cover_m = (mp > 0.0) & (th <= _minp_cut(m, mp))
        covered = cover_k | cover_m
        pw = p.to(tl.float64) * kmass.to(tl.float64)
        if active_p:
            if active_k:
                covered = cover_k
            elif NEED_S:  # (the host asks for the row sums whenever such a row exists)
                pw = p.to(tl.float64) * tl.exp(lse_all - m64) * FIX
                covered = cover_m | (mass.to(tl.float64) >= pw)
            else:
                covered = False
        if covered:
            status = tl.full([], 0, tl.int32)
            # top-p: survivors are the top-k survivors whose strictly-greater mass is < p of
            # the total (the top-k mass, or the row's without top-k); ties share their fate
            pcut = kcut
            if active_p:
                if nk <= NKP:
                    j = tl.arange(0, NKP)
                    okj = j < nk
                    vj = tl.load(cval_ptr + row + j, mask=okj, other=float("-inf"))
                    wj = tl.load(cw_ptr + row + j, mask=okj, other=0)
                    kj = tl.where(okj, _okey(vj), INT32_MIN)
                    above = tl.sum(tl.where(kj[None, :] > kj[:, None], wj[None, :], 0), axis=1)
                    keep = okj & (above.to(tl.float64) < pw)
                    pcut = tl.maximum(pcut, tl.min(tl.where(keep, kj, INT32_MAX)))
                else:
                    lo = tl.maximum(kcut, _okey(th)).to(tl.int64)
                    hi = kmax.to(tl.int64)
                    while lo < hi:
                        mid = lo + (hi - lo) // 2
                        above = tl.zeros([], tl.int64)
                        for c0 in range(0, nk, FT):
                            i = c0 + lanes
                            ok = i < nk
                            v = tl.load(cval_ptr + row + i, mask=ok, other=float("-inf"))
                            w = tl.load(cw_ptr + row + i, mask=ok, other=0)
                            above += tl.sum(tl.where(_okey(v) > mid.to(tl.int32), w, 0))
                        good = above.to(tl.float64) < pw
                        hi = tl.where(good, mid, hi)
                        lo = tl.where(good, lo, mid + 1)
                    pcut = tl.maximum(pcut, hi.to(tl.int32))
            # survivors (and min-p), Gumbel-max, log-sum-exp over survivors
            rk = tl.load(rowkey_ptr + b).to(tl.uint32)
            best = tl.full([], float("-inf"), tl.float64)
            tok = tl.full([], INT32_MAX, tl.int32)
            z_tok = tl.zeros([], tl.float64)
            sq = tl.zeros([], tl.int64)
            tau = tl.full([], float("inf"), tl.float32)
            for c0 in range(0, nk, FT):
                i = c0 + lanes
                ok = i < nk
                v = tl.load(cval_ptr + row + i, mask=ok, other=float("-inf"))
                idx = tl.load(cidx_ptr + row + i, mask=ok, other=INT32_MAX)
                w = tl.load(cw_ptr + row + i, mask=ok, other=0)
                v64 = v.to(tl.float64)
                surv = ok & (_okey(v) >= pcut)
                if mp > 0.0:
                    surv = surv & (tl.exp(v64 - m64) >= mp.to(tl.float64))
                g = tl.where(surv, v64 + rs.gumbel64(rk, idx), float("-inf"))
                gb = tl.max(g)
                ib = tl.min(tl.where(g == gb, idx, INT32_MAX))
                take = (gb > best) | ((gb == best) & (ib < tok))
                z_tok = tl.where(take, tl.sum(tl.where(idx == ib, v64, 0.0)), z_tok)
                tok = tl.where(take, ib, tok)
                best = tl.where(take, gb, best)
                sq += tl.sum(tl.where(surv, w, 0))
                tau = tl.minimum(tau, tl.min(tl.where(surv, v, float("inf"))))
            lse = m64 + tl.log(sq.to(tl.float64) / FIX)
            lp = z_tok - lse
    return status, tok, lp, tau, lse


@triton.jit
def _hit_states(hid, hok, rep_row, R, out_row, O, cnt_row, PEN_REP: tl.constexpr, PEN_OUT: tl.constexpr,
                TABLE: tl.constexpr, HAS_COUNTS: tl.constexpr, HB: tl.constexpr, HL: tl.constexpr):
    """The states 2 * (output count) + seen of the tokens ``hid`` [HB] (where ``hok``), as the
    penalty table holds them (:func:`_pen_table`), by comparing them with every id of the row's
    history (or every column of the cache's table): O(HB * L), for the few penalised tokens
    among a row's candidates. Ids out of range never equal a token, so they count for nothing,
    as in the table."""
    lanes = tl.arange(0, HL)
    h = tl.where(hok, hid, -1).to(tl.int64)[:, None]
    hk = hok[:, None]
    st = tl.zeros([HB], tl.int32)
    if TABLE:
        for i0 in range(0, R, HL):
            i = i0 + lanes
            t = tl.load(rep_row + i, mask=i < R, other=-1).to(tl.int64)
            s = tl.load(cnt_row + i, mask=i < R, other=0).to(tl.int32)
            st += tl.sum(tl.where(hk & (t[None, :] == h), s[None, :], 0), axis=1)
    else:
        if PEN_REP:
            seen = tl.zeros([HB], tl.int32)
            for i0 in range(0, R, HL):
                i = i0 + lanes
                t = tl.load(rep_row + i, mask=i < R, other=-1).to(tl.int64)
                seen = tl.maximum(seen, tl.max((hk & (t[None, :] == h)).to(tl.int32), axis=1))
            st += seen
        if PEN_OUT:
            for i0 in range(0, O, HL):
                i = i0 + lanes
                t = tl.load(out_row + i, mask=i < O, other=-1).to(tl.int64)
                if HAS_COUNTS:
                    w = tl.load(cnt_row + i, mask=i < O, other=0).to(tl.int32)
                else:
                    w = tl.full([HL], 1, tl.int32)
                st += 2 * tl.sum(tl.where(hk & (t[None, :] == h), w[None, :], 0), axis=1)
    return st


@triton.jit(noinline=True)
def _pen_table_full(pen_row, W, RS, x_row, rep_row, R, out_row, O, cnt_row, r, f, pp, V,
                    PEN_REP: tl.constexpr, PEN_OUT: tl.constexpr, TABLE: tl.constexpr, HAS_COUNTS: tl.constexpr,
                    FAST: tl.constexpr, BL: tl.constexpr, BW: tl.constexpr):
    """The whole penalty table of a row in the finish (CAND: the prep built only its bitmask),
    for rows that need every token's penalised value: the exact pass, the fallback, or more
    penalised candidates than :func:`_hit_states` should compare."""
    _pen_table(pen_row, W, RS, x_row, rep_row, R, out_row, O, cnt_row, r, f, pp, V,
               PEN_REP, PEN_OUT, TABLE, HAS_COUNTS, False, FAST, BL, BW)
    tl.debug_barrier()


@triton.jit
def _cand_block(row, i, used, ids, v, th, x_row, pen_row, aux_row, W, RS, T, Y, r, f, pp, V, L,
                rep_row, R, out_row, O, cnt_row, cval_ptr, cw_ptr, built, store,
                PEN_REP: tl.constexpr, PEN_OUT: tl.constexpr, TABLE: tl.constexpr, HAS_COUNTS: tl.constexpr,
                HAS_TEMP: tl.constexpr, FAST: tl.constexpr, FRL: tl.constexpr, BL: tl.constexpr,
                BW: tl.constexpr, HLIM: tl.constexpr):
    """:func:`_cand_penalties` on one block of slots ``i`` (``used``: in the list) held in
    registers (token ids, values): returns the values with the penalised ones replaced (stored
    back where ``store``, or where only memory had them) and whether the whole table got built."""
    HB: tl.constexpr = 16 if FRL >= 64 else 4  # (the interpreter's small tiers: several groups)
    HL: tl.constexpr = 256
    # Unmasked (unused slots read word 0): masked, each of a thread's words needed its own
    # predicate and zeroed register, and ptxas issued them one DRAM round trip after another
    # (bench/NOTES.md, v28; the same as _ids).
    if TABLE:
        word = tl.load(aux_row + (tl.where(used, ids, 0) >> 5))
    else:
        word = tl.load(pen_row + (tl.where(used, ids, 0) >> 5))
    hit = used & _bit(word, ids)
    if TABLE:
        # The cache's table: a penalised token's column is its rank (from the bitmask kept with
        # the table: its group's count and one sector of words, the lanes without a hit reading
        # the row's first ones), its state the table's own. No count of the hits first: loads
        # masked off on every lane cost nothing. (Unmasked, the lanes without a hit reading the
        # row's first state and logit: the same time, v28.)
        col = _aux_column(aux_row, W, tl.where(hit, ids, 0), word, FAST)
        st = tl.load(cnt_row + col, mask=hit, other=0)
        # (1.0 off the hits: a zero would send those lanes to the divisions' slow paths)
        y = tl.load(x_row + ids, mask=hit, other=1.0).to(tl.float32)
        z = _penalise(y, st, r, f, pp, PEN_REP, PEN_OUT)
        if HAS_TEMP:
            z = _div(z, T, Y, FAST)
        v = tl.where(hit, tl.where(z >= th, z, float("-inf")), v)
        tl.store(cval_ptr + row + i, v, mask=hit & ((ids * 0 + store) != 0))
    else:
        nh = tl.sum(hit.to(tl.int32))
        if nh > 0:
            if (built == 0) & (nh * L > HLIM):
                _pen_table_full(pen_row, W, RS, x_row, rep_row, R, out_row, O, cnt_row, r, f, pp, V,
                                PEN_REP, PEN_OUT, TABLE, HAS_COUNTS, FAST, BL, BW)
                built = tl.full([], 1, tl.int32)
            if built != 0:
                zrow = (pen_row + 2 * W).to(tl.pointer_type(tl.float32))
                pre = tl.load(pen_row + W + (ids >> 5), mask=hit, other=0)
                z = tl.load(zrow + _rank(word, pre, ids, FAST), mask=hit, other=1.0)
                if HAS_TEMP:
                    z = _div(z, T, Y, FAST)
                v = tl.where(hit, tl.where(z >= th, z, float("-inf")), v)
                tl.store(cval_ptr + row + i, v, mask=hit & ((ids * 0 + store) != 0))
            else:
                # the hits' (slot, token) packed into the row's weight slots (free until the
                # candidates' exact work), then HB at a time; their values go to the row's list
                # and come back to the hits' lanes
                dst = tl.cumsum(hit.to(tl.int32), 0) - 1
                tl.store(cw_ptr + row + dst, (i.to(tl.int64) << 32) | ids.to(tl.int64), mask=hit)
                tl.debug_barrier()
                hl = tl.arange(0, HB)
                for g0 in range(0, nh, HB):
                    j = g0 + hl
                    hok = j < nh
                    pk = tl.load(cw_ptr + row + j, mask=hok, other=0)
                    hid = (pk & 0xFFFFFFFF).to(tl.int32)
                    st = _hit_states(hid, hok, rep_row, R, out_row, O, cnt_row, PEN_REP, PEN_OUT, TABLE, HAS_COUNTS,
                                     HB, HL)
                    y = tl.load(x_row + hid, mask=hok, other=1.0).to(tl.float32)
                    z = _penalise(y, st, r, f, pp, PEN_REP, PEN_OUT)
                    if HAS_TEMP:
                        z = _div(z, T, Y, FAST)
                    tl.store(cval_ptr + row + (pk >> 32), tl.where(z >= th, z, float("-inf")), mask=hok)
                tl.debug_barrier()
                v = tl.where(hit, tl.load(cval_ptr + row + i, mask=hit, other=0.0), v)
    return v, built


@triton.jit
def _cand_penalties(row, cnt, th, vl, xl, x_row, pen_row, aux_row, W, RS, T, Y, r, f, pp, V,
                    rep_row, R, out_row, O, cnt_row, cval_ptr, cidx_ptr, cw_ptr,
                    PEN_REP: tl.constexpr, PEN_OUT: tl.constexpr, TABLE: tl.constexpr, HAS_COUNTS: tl.constexpr,
                    HAS_TEMP: tl.constexpr, FAST: tl.constexpr, FRL: tl.constexpr, BL: tl.constexpr,
                    BW: tl.constexpr, HLIM: tl.constexpr):
    """CAND: the penalties applied to a row's candidates (``cnt`` <= CAP slots; the first FRL
    in registers: ``vl``, ``xl``). Returns (the first FRL values, penalised, the candidates
    left, their max, whether the row's whole penalty table got built).

    The scan read the logits without penalties, with a threshold theta from raw values, and the
    penalties only lower values (the host checks it), so the candidates (raw z >= theta) hold
    every token whose penalised z is >= theta. Each used slot whose token is set in the row's
    bitmask gets its penalised value from its raw logit and its state, or -inf where that
    falls below theta; the others are kept as they are. The states: the cache's table holds
    them at the token's column (from the bitmask kept with the table, ``aux_row``:
    :func:`_aux_column`); for raw ids they come from :func:`_hit_states` (a handful of penalised
    candidates per row), or from the whole table, built here when comparing would cost more
    than HLIM compares (penalties on the very tokens the model favours). Slots past the first
    FRL (rare) are read, penalised and stored back block by block.
    """
    L = R
    if not TABLE:
        L = (R if PEN_REP else 0) + (O if PEN_OUT else 0)
    il = tl.arange(0, FRL)
    built = tl.zeros([], tl.int32)
    more = (cnt > FRL).to(tl.int32)
    vl, built = _cand_block(row, il, il < cnt, xl, vl, th, x_row, pen_row, aux_row, W, RS, T, Y, r, f, pp, V, L,
                            rep_row, R, out_row, O, cnt_row, cval_ptr, cw_ptr, built, more,
                            PEN_REP, PEN_OUT, TABLE, HAS_COUNTS, HAS_TEMP, FAST, FRL, BL, BW, HLIM)
    ok = (il < cnt) & (vl >= th)
    ncov = tl.sum(ok.to(tl.int32))
    mc = tl.max(tl.where(ok, vl, float("-inf")))
    for c0 in range(FRL, cnt, FRL):
        i = c0 + il
        used = i < cnt
        ids = tl.load(cidx_ptr + row + i, mask=used, other=0)
        v = tl.load(cval_ptr + row + i, mask=used, other=float("-inf"))
        v, built = _cand_block(row, i, used, ids, v, th, x_row, pen_row, aux_row, W, RS, T, Y, r, f, pp, V, L,
                               rep_row, R, out_row, O, cnt_row, cval_ptr, cw_ptr, built, more,
                               PEN_REP, PEN_OUT, TABLE, HAS_COUNTS, HAS_TEMP, FAST, FRL, BL, BW, HLIM)
        ok = used & (v >= th)
        ncov += tl.sum(ok.to(tl.int32))
        mc = tl.maximum(mc, tl.max(tl.where(ok, v, float("-inf"))))
    if more != 0:
        tl.debug_barrier()
    return vl, ncov, mc, built


@triton.jit(noinline=True)
def _row_stats(x_row, pen_row, W, T, Y, V, HAS_PEN: tl.constexpr, HAS_TEMP: tl.constexpr, FAST: tl.constexpr,
               TILE: tl.constexpr):
    """(a NaN or +inf among the penalised, tempered z: int32, the row's max z) over the full row,
    as the masked scan's chunks flag and reduce them (:func:`_store_chunk_max`)."""
    lanes = tl.arange(0, TILE)
    bad = tl.zeros([TILE], tl.int32)
    mx = tl.full([TILE], float("-inf"), tl.float32)
    for s0 in range(0, V, TILE):
        offs = s0 + lanes
        mask = offs < V
        x, z = _load_z(x_row, offs, mask, pen_row, W, T, Y, HAS_PEN, HAS_TEMP, FAST)
        bad |= (mask & ((z != z) | (z == float("inf")))).to(tl.int32)
        mx = tl.maximum(mx, tl.where(mask & (z == z), z, float("-inf")))
    return tl.max(bad), tl.max(mx)


@triton.jit
def _finish_row(
    b, x_ptr, x_stride, V, C,
    temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, rowkey_ptr,
    pen_ptr, W, RS, aux_ptr, AS,
    rep_ptr, rep_stride, R, out_ptr, out_stride, O, cnt_ptr, cnt_stride, rp_ptr, fp_ptr, pp_ptr,
    cm_ptr, cs_ptr, crm_ptr, crs_ptr, cflag_ptr, ckey_ptr, cid_ptr,
    theta_ptr, ncand_ptr, cval_ptr, cidx_ptr, cw_ptr, CAP,
    tok_ptr, lp_ptr, status_ptr, tau_ptr, lse_ptr,
    MODE: tl.constexpr, HAS_PEN: tl.constexpr, CAND: tl.constexpr, TABLE: tl.constexpr, PEN_REP: tl.constexpr,
    PEN_OUT: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_TEMP: tl.constexpr, FAST: tl.constexpr,
    ANY_PLAIN: tl.constexpr, ANY_TRUNC: tl.constexpr, NEED_S: tl.constexpr, NEED_RAW: tl.constexpr,
    CP: tl.constexpr, FT: tl.constexpr, FRL: tl.constexpr, FR: tl.constexpr, NKP: tl.constexpr, TILE: tl.constexpr,
    GAP: tl.constexpr, BL: tl.constexpr, BW: tl.constexpr, HLIM: tl.constexpr,
):
    """Row b's outputs from its C chunks' statistics and its candidates (the finish kernel's
    program, and the last program of a row in the one-launch path). Rows whose candidates do not
    cover the survivors keep status 2 and take the exact fallback over the full row here (a
    launch of its own cost ~2 us per call, for rows that almost never exist).

    CAND (every row truncates, no row sums, penalties that only lower values): the scan read
    the raw logits, so its chunk maxima and flags are the raw row's. The penalties go onto the
    candidates (:func:`_cand_penalties`), and the row max is the largest of them (every token
    whose penalised z is >= theta is one, so the max is among them when any is). Rows where
    that does not settle it (raw NaN or +inf, which a penalty may or may not keep; no candidate
    left; no pivot; too many candidates) get their whole penalty table here, the exact
    statistics from a pass over the row (:func:`_row_stats`) and the exact fallback."""
    b64 = b.to(tl.int64)
    base = b64 * C
    greedy, k, p, mp, active_k, active_p, trunc = _row_flags(greedy_ptr, topk_ptr, topp_ptr, minp_ptr, b, V)
    cc = tl.arange(0, CP)
    cf = tl.load(cflag_ptr + base + cc, mask=cc < C, other=0)
    ok_row = (tl.max(cf & 1) == 0) & (tl.max((cf >> 1) & 1) == 1)
    m = tl.max(tl.load(cm_ptr + base + cc, mask=cc < C, other=float("-inf")))
    x_row = x_ptr + b64 * x_stride
    pen_row = pen_ptr + b64 * RS
    T = tl.load(temp_ptr + b)
    Y = _recip(T, FAST)
    lse_all = tl.zeros([], tl.float64)
    if NEED_S:
        m_s, oth = _lse_rows(cm_ptr, cs_ptr, base, C, CP)
        lse_all = m_s.to(tl.float64) + _log1p(oth)
    lse_raw = tl.zeros([], tl.float64)
    if NEED_RAW:
        m_r, roth = _lse_rows(crm_ptr, crs_ptr, base, C, CP)
        lse_raw = m_r.to(tl.float64) + _log1p(roth)

    cnt = tl.zeros([], tl.int32)
    il = tl.arange(0, FRL)
    vl = tl.full([FRL], float("-inf"), tl.float32)
    xl = tl.zeros([FRL], tl.int32)
    if ANY_TRUNC:
        cnt = tl.load(ncand_ptr + b)
        # the low tier's slots, read together with the count (rows that do not truncate, in
        # mixed batches, read none)
        nl = tl.where(trunc, CAP, 0)
        vl = tl.load(cval_ptr + b64 * CAP + il, mask=il < nl, other=float("-inf"))
        xl = tl.load(cidx_ptr + b64 * CAP + il, mask=il < nl, other=0)
    ncov = cnt
    clean = tl.full([], 1, tl.int32)
    built = tl.zeros([], tl.int32)
    if CAND:
        rep_row = rep_ptr + b64 * rep_stride
        out_row = out_ptr + b64 * out_stride
        cnt_row = cnt_ptr + b64 * cnt_stride
        r = tl.load(rp_ptr + b)
        f = tl.load(fp_ptr + b)
        pp = tl.load(pp_ptr + b)
        th = tl.load(theta_ptr + b)
        clean = ((tl.max(cf & 1) == 0) & (th < float("inf")) & (cnt <= CAP)).to(tl.int32)
        ncov = tl.zeros([], tl.int32)
        if clean != 0:
            vl, ncov, mc, built = _cand_penalties(
                b64 * CAP, cnt, th, vl, xl, x_row, pen_row, aux_ptr + b64 * AS, W, RS, T, Y, r, f, pp, V, rep_row, R,
                out_row, O, cnt_row, cval_ptr, cidx_ptr, cw_ptr, PEN_REP, PEN_OUT, TABLE, HAS_COUNTS, HAS_TEMP, FAST,
                FRL, BL, BW, HLIM)
            clean = (ncov >= 1).to(tl.int32)
            m = mc
        if clean == 0:
            if built == 0:
                _pen_table_full(pen_row, W, RS, x_row, rep_row, R, out_row, O, cnt_row, r, f, pp, V,
                                PEN_REP, PEN_OUT, TABLE, HAS_COUNTS, FAST, BL, BW)
                built = tl.full([], 1, tl.int32)
            bad, m = _row_stats(x_row, pen_row, W, T, Y, V, True, HAS_TEMP, FAST, TILE)
            ok_row = (bad == 0) & (m > float("-inf"))
    status = tl.where(ok_row, 0, 1)
    tok = tl.full([], -1, tl.int32)
    lp = tl.full([], float("nan"), tl.float64)
    tau = tl.full([], float("-inf"), tl.float32)
    lse = tl.full([], float("nan"), tl.float64)
    if ok_row:
        if trunc:
            if ANY_TRUNC:
                if clean != 0:
                    status, tok, lp, tau, lse = _candidates_row(
                        b, k, p, mp, active_k, active_p, m, lse_all, cnt, ncov, vl, xl, theta_ptr, cval_ptr,
                        cidx_ptr, cw_ptr, rowkey_ptr, CAP, NEED_S, FT, FRL, FR, NKP, GAP)
                else:
                    status = tl.full([], 2, tl.int32)
        else:
            if ANY_PLAIN:
                kc = tl.load(ckey_ptr + base + cc, mask=cc < C, other=float("-inf"))
                ic = tl.load(cid_ptr + base + cc, mask=cc < C, other=INT32_MAX)
                kbest = tl.max(kc)
                tok = tl.min(tl.where(kc == kbest, ic, INT32_MAX))
                xt, zt = _load_z(x_row, tok, tok >= 0, pen_row, W, T, Y, HAS_PEN, HAS_TEMP, FAST)
                lse = lse_all
                lp = zt.to(tl.float64) - lse
        if status == 0:
            if MODE == 1:
                xt, zt = _load_z(x_row, tok, tok >= 0, pen_row, W, T, Y, HAS_PEN, HAS_TEMP, FAST)
                lse = lse_all
                lp = zt.to(tl.float64) - lse
            if MODE == 2:
                # (the raw logit only: CAND rows have no penalised values to look up)
                xt, zt = _load_z(x_row, tok, tok >= 0, pen_row, W, T, Y, HAS_PEN and not CAND, HAS_TEMP, FAST)
                lse = lse_raw
                lp = xt.to(tl.float64) - lse
        if ANY_TRUNC:
            if status == 2:
                if CAND:
                    if built == 0:
                        _pen_table_full(pen_row, W, RS, x_row, rep_row, R, out_row, O, cnt_row, r, f, pp, V,
                                        PEN_REP, PEN_OUT, TABLE, HAS_COUNTS, FAST, BL, BW)
                tok, lp, tau, lse = _fallback_row(
                    x_row, pen_row, W, T, Y, V, k, p, mp, active_k, active_p, m,
                    tl.load(rowkey_ptr + b).to(tl.uint32), lse_all, lse_raw, MODE, HAS_PEN, HAS_TEMP, FAST, TILE,
                )
    tl.store(status_ptr + b, status)
    tl.store(tok_ptr + b, tok.to(tl.int64))
    tl.store(lp_ptr + b, lp.to(tl.float32))
    tl.store(tau_ptr + b, tau)
    tl.store(lse_ptr + b, lse)


@triton.jit(do_not_specialize=["C", "ncand_ptr", "RS", "AS"] + _HIST)
def _finish_kernel(
    x_ptr, x_stride, V, C,
    temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, rowkey_ptr,
    pen_ptr, W, RS, aux_ptr, AS,
    rep_ptr, rep_stride, R, out_ptr, out_stride, O, cnt_ptr, cnt_stride, rp_ptr, fp_ptr, pp_ptr,
    cm_ptr, cs_ptr, crm_ptr, crs_ptr, cflag_ptr, ckey_ptr, cid_ptr,
    theta_ptr, ncand_ptr, cval_ptr, cidx_ptr, cw_ptr, CAP,
    tok_ptr, lp_ptr, status_ptr, tau_ptr, lse_ptr, call_ptr,
    MODE: tl.constexpr, HAS_PEN: tl.constexpr, CAND: tl.constexpr, TABLE: tl.constexpr, PEN_REP: tl.constexpr,
    PEN_OUT: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_TEMP: tl.constexpr, FAST: tl.constexpr,
    ANY_PLAIN: tl.constexpr, ANY_TRUNC: tl.constexpr, NEED_S: tl.constexpr, NEED_RAW: tl.constexpr,
    CP: tl.constexpr, FT: tl.constexpr, FRL: tl.constexpr, FR: tl.constexpr, NKP: tl.constexpr, TILE: tl.constexpr,
    GAP: tl.constexpr, BL: tl.constexpr, BW: tl.constexpr, HLIM: tl.constexpr, PDL: tl.constexpr,
):
    """One row per program (:func:`_finish_row`)."""
    _gdc_wait(PDL)
    b = tl.program_id(0)
    _finish_row(b, x_ptr, x_stride, V, C, temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, rowkey_ptr,
                pen_ptr, W, RS, aux_ptr, AS, rep_ptr, rep_stride, R, out_ptr, out_stride, O, cnt_ptr, cnt_stride,
                rp_ptr, fp_ptr, pp_ptr, cm_ptr, cs_ptr, crm_ptr, crs_ptr, cflag_ptr, ckey_ptr, cid_ptr,
                theta_ptr, ncand_ptr, cval_ptr, cidx_ptr, cw_ptr, CAP, tok_ptr, lp_ptr, status_ptr, tau_ptr, lse_ptr,
                MODE, HAS_PEN, CAND, TABLE, PEN_REP, PEN_OUT, HAS_COUNTS, HAS_TEMP, FAST, ANY_PLAIN, ANY_TRUNC, NEED_S,
                NEED_RAW, CP, FT, FRL, FR, NKP, TILE, GAP, BL, BW, HLIM)
    if b == 0:
        # The device call counter advances inside the call, so CUDA-graph replays advance it.
        tl.atomic_add(call_ptr, 1)
    _gdc_done(PDL)


# ----------------------------------------------------------------------------- one launch


@triton.jit
def _enc(key):
    """An int32 key as a nonzero word: 0 marks a slot not yet written (the key -2**31, a NaN's,
    is folded onto the next one up). Decode with ``^ INT32_MIN``."""
    return tl.maximum(key, INT32_MIN + 1) ^ INT32_MIN


@triton.jit(do_not_specialize=["samp_lo", "samp_hi", "ncand_ptr", "out_ptr", "out_stride", "O", "cnt_ptr",
                               "cnt_stride", "pos_ptr"])
def _small_kernel(
    x_ptr, x_stride, V, CH, C, B,
    temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, rowkey_ptr,
    out_ptr, out_stride, O, cnt_ptr, cnt_stride, pos_ptr, hs_ptr, slo_ptr, shi_ptr, samp_lo, samp_hi, call_ptr,
    cm_ptr, cs_ptr, crm_ptr, crs_ptr, cflag_ptr, ckey_ptr, cid_ptr,
    theta_ptr, ncand_ptr, cval_ptr, cidx_ptr, cw_ptr, CAP,
    tok_ptr, lp_ptr, status_ptr, tau_ptr, lse_ptr, sync_ptr,
    MODE: tl.constexpr, HAS_OUT: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_TEMP: tl.constexpr, FAST: tl.constexpr, NEED_S: tl.constexpr, NEED_RAW: tl.constexpr,
    CT: tl.constexpr, CP: tl.constexpr, FT: tl.constexpr, FRL: tl.constexpr, FR: tl.constexpr, NKP: tl.constexpr,
    TILE: tl.constexpr, GAP: tl.constexpr, PHASE: tl.constexpr,
):
    """The whole call in one launch for small batches whose rows all truncate with top-k,
    without penalties: program (c, b) holds chunk c (CH <= CT values) of row b in registers.

    1. It publishes the chunk's max as a key in the row's key slots (``sync``), then stores the
       chunk's statistics (as the scan does).
    2. Once all C keys of the row are there (it reads the slots until none is empty: the
       values are the signal, so no fence orders other data before them), each program ranks
       its own key among the row's (ties by chunk index); the one of rank k - 1 holds the k-th
       largest chunk max, which is <= the row's k-th largest value (the k chunks with the
       largest maxima hold k values at least that large: k <= C, checked by the host), and
       publishes it as the row's pivot: theta, and in the row's flag its preimage before the
       temperature. Every top-k value is then a candidate: ~60 of them at k = 50 for
       randn-like rows, against ~520 from the pipeline's sampled pivot.
    3. Each program reads the flag until it is set, emits its candidates and counts itself done
       (acquire-release: everything the row's programs stored is visible to the last); the
       last runs the finish kernel's row (:func:`_finish_row`, the same code) and empties the
       row's slots for the next call. Row 0's last program advances the call counter once the
       other rows' first programs have read it (their release of ``ticket``).

    The waits need every program resident: the host launches a cooperative grid (which CUDA
    refuses when it cannot be resident rather than letting it hang) with registers capped to
    fit. PHASE 0 runs all three steps; under the interpreter, whose programs run one after
    another, the host launches PHASE 1, 2 and 3 in turn instead (the chunk is loaded again)."""
    c = tl.program_id(0)
    b = tl.program_id(1)
    b64 = b.to(tl.int64)
    ws = b64 * C + c
    flag = sync_ptr + b
    done = sync_ptr + B + b
    ticket = sync_ptr + 2 * B
    keys_row = sync_ptr + 2 * B + 1 + b64 * C
    cc = tl.arange(0, CP)
    if PHASE <= 1:
        if c == 0:  # (its loads overlap the chunk's)
            rk = _position_key(b, V, out_ptr, out_stride, O, cnt_ptr, cnt_stride, pos_ptr, hs_ptr, slo_ptr, shi_ptr,
                               samp_lo, samp_hi, call_ptr, HAS_OUT, HAS_COUNTS, HAS_POS, 256)
            tl.store(rowkey_ptr + b, rk.to(tl.int64))
    lanes = tl.arange(0, CT)
    offs = c * CH + lanes
    inr = (lanes < CH) & (offs < V)
    y = _widen(tl.load(x_ptr + b64 * x_stride + offs, mask=inr, other=float("-inf")), FAST)
    T = tl.load(temp_ptr + b)
    Y = _recip(T, FAST)
    # the chunk's max as an ordered key: a total order (NaN included), so exactly one program
    # has rank k - 1 and no wait lasts forever
    kmax = tl.maximum(tl.max(tl.where(inr, _okey(y), INT32_MIN)), INT32_MIN + 1)
    if PHASE <= 1:
        if (c == 0) & (b > 0):
            tl.atomic_add(ticket, 1, sem="release")
        tl.atomic_xchg(keys_row + c, _enc(kmax), sem="relaxed")
        _store_chunk_max(y, T, Y, ws, cflag_ptr, cm_ptr, HAS_TEMP, FAST)
        if NEED_S:
            ys = tl.full([], 1.0, tl.float32)
            if HAS_TEMP:
                ys = 1.0 / T
            _, oth = _lse_chunk(y * ys, tl.zeros([CT], tl.float32))
            tl.store(cs_ptr + ws, oth)
        if NEED_RAW:
            rmc, roth = _lse_chunk(y, tl.zeros([CT], tl.float32))
            tl.store(crm_ptr + ws, rmc)
            tl.store(crs_ptr + ws, roth)
    if (PHASE == 0) | (PHASE == 2):
        k = tl.load(topk_ptr + b)
        kc = tl.load(keys_row + cc, mask=cc < C, other=1, volatile=True)
        while tl.max((kc == 0).to(tl.int32)) > 0:
            kc = tl.load(keys_row + cc, mask=cc < C, other=1, volatile=True)
        kc = kc ^ INT32_MIN
        rank = tl.sum(((cc < C) & ((kc > kmax) | ((kc == kmax) & (cc < c)))).to(tl.int32))
        if rank == k - 1:
            th = _ofloat(kmax)
            yth = th
            if HAS_TEMP:
                th = _div(th, T, Y, FAST)
                yth = _y_threshold(th, T, Y, FAST)
            tl.store(theta_ptr + b, th)
            tl.atomic_xchg(flag, _enc(_okey(yth)), sem="relaxed")
    if (PHASE == 0) | (PHASE == 3):
        f = tl.load(flag, volatile=True)
        while f == 0:
            f = tl.load(flag, volatile=True)
        yth = _ofloat(f ^ INT32_MIN)
        _append_candidates(inr & (y >= yth), y, offs, b, T, Y, ncand_ptr, cval_ptr, cidx_ptr, CAP, HAS_TEMP, FAST)
        tl.debug_barrier()
        if tl.atomic_add(done, 1, sem="acq_rel") == C - 1:
            got = tl.zeros([], tl.int32) + B - 1
            if b == 0:  # (read early: its latency overlaps the finish's)
                got = tl.atomic_add(ticket, 0, sem="acquire")
            _finish_row(b, x_ptr, x_stride, V, C, temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, rowkey_ptr,
                        x_ptr, 0, 0, x_ptr, 0, x_ptr, 0, 0, x_ptr, 0, 0, x_ptr, 0, temp_ptr, temp_ptr, temp_ptr,
                        cm_ptr, cs_ptr, crm_ptr, crs_ptr, cflag_ptr, ckey_ptr, cid_ptr,
                        theta_ptr, ncand_ptr, cval_ptr, cidx_ptr, cw_ptr, CAP, tok_ptr, lp_ptr, status_ptr, tau_ptr,
                        lse_ptr, MODE, False, False, False, False, False, False, HAS_TEMP, FAST, False, True, NEED_S,
                        NEED_RAW, CP, FT, FRL, FR, NKP, TILE, GAP, 32, 32, 0)
            # every program of the row has read its keys and flag: empty them for the next call
            tl.store(keys_row + cc, 0, mask=cc < C)
            tl.store(flag, 0)
            tl.store(done, 0)
            tl.store(ncand_ptr + b, 0)
            if b == 0:
                while got < B - 1:
                    got = tl.atomic_add(ticket, 0, sem="acquire")
                tl.store(ticket, 0)
                tl.atomic_add(call_ptr, 1, sem="relaxed")


# ----------------------------------------------------------------------------- fallback


@triton.jit
def _radix_pass(
    x_row, pen_row, W, T, Y, V, m, prefix, shift, lowcut,
    WANT_MASS: tl.constexpr, HAS_PEN: tl.constexpr, HAS_TEMP: tl.constexpr, FAST: tl.constexpr,
    TILE: tl.constexpr,
):
    """Counts (and masses exp(z - m)) per 4-bit digit at ``shift`` of the elements whose
    unsigned key is >= ``lowcut`` and matches ``prefix`` above the digit."""
    d16 = tl.arange(0, 16)
    cnt = tl.zeros([16], tl.int32)
    mass = tl.zeros([16], tl.float64)
    lanes = tl.arange(0, TILE)
    for s0 in range(0, V, TILE):
        offs = s0 + lanes
        mask = offs < V
        x, z = _load_z(x_row, offs, mask, pen_row, W, T, Y, HAS_PEN, HAS_TEMP, FAST)
        u = _okey(z).to(tl.int64) + 2147483648
        inr = mask & ((u >> (shift + 4)) == (prefix >> (shift + 4))) & (u >= lowcut)
        dig = (u >> shift) & 15
        onehot = (dig[:, None] == d16[None, :]) & inr[:, None]
        cnt += tl.sum(onehot.to(tl.int32), axis=0)
        if WANT_MASS:
            w = tl.exp(z - m).to(tl.float64)
            mass += tl.sum(tl.where(onehot, w[:, None], 0.0), axis=0)
    return cnt, mass


@triton.jit
def _suffix_sum(v, d16):
    """s[i] = sum of v[j] for j >= i, for a length-16 vector."""
    return tl.sum(tl.where(d16[None, :] >= d16[:, None], v[None, :], 0), axis=1)


@triton.jit
def _pick(v, d16, j):
    return tl.sum(tl.where(d16 == j, v, 0), axis=0)


@triton.jit(noinline=True)
def _fallback_row(
    x_row, pen_row, W, T, Y, V, k, p, mp, active_k, active_p, m, rk, lse_all, lse_raw,
    MODE: tl.constexpr, HAS_PEN: tl.constexpr, HAS_TEMP: tl.constexpr, FAST: tl.constexpr, TILE: tl.constexpr,
):
    """A row whose candidate set was unbounded or overflowed, done exactly over the full row:
    radix selects for the top-k and top-p cuts (8 passes each, 16 bins a pass), then one
    Gumbel-max pass. Returns (token, logprob, smallest survivor, log-sum-exp of the mode)."""
    m64 = m.to(tl.float64)
    d16 = tl.arange(0, 16)
    # Top-k: the exact key of the k-th largest value, 4 bits a pass.
    kcut = tl.zeros([], tl.int64)
    if active_k:
        prefix = tl.zeros([], tl.int64)
        above = tl.zeros([], tl.int64)
        for level in range(8):
            shift = 28 - 4 * level
            cnt, mass = _radix_pass(x_row, pen_row, W, T, Y, V, m, prefix, shift, 0,
                                    False, HAS_PEN, HAS_TEMP, FAST, TILE)
            ge = _suffix_sum(cnt, d16).to(tl.int64)
            j = tl.max(tl.where(above + ge >= k, d16, -1))
            above = above + _pick(ge, d16, j) - _pick(cnt, d16, j).to(tl.int64)
            prefix = prefix + (j.to(tl.int64) << shift)
        kcut = prefix
    # Top-p on the top-k survivors: the key of the smallest kept value, by mass.
    pcut = tl.zeros([], tl.int64)
    if active_p:
        prefix = tl.zeros([], tl.int64)
        above_m = tl.zeros([], tl.float64)
        pw = tl.zeros([], tl.float64)
        for level in range(8):
            shift = 28 - 4 * level
            cnt, mass = _radix_pass(x_row, pen_row, W, T, Y, V, m, prefix, shift, kcut,
                                    True, HAS_PEN, HAS_TEMP, FAST, TILE)
            if level == 0:
                pw = p.to(tl.float64) * tl.sum(mass)
            ge = _suffix_sum(mass, d16)
            j = tl.max(tl.where(above_m + ge >= pw, d16, -1))
            if j < 0:
                j = tl.min(tl.where(cnt > 0, d16, 16))
            above_m = above_m + _pick(ge, d16, j) - _pick(mass, d16, j)
            prefix = prefix + (j.to(tl.int64) << shift)
        pcut = prefix
    cut = tl.maximum(kcut, pcut)
    # Final pass: Gumbel-max over survivors, with their log-sum-exp (masses in fixed point, as
    # on the candidate path; "processed" uses the scan's log-sum-exp, as every other row).
    lanes = tl.arange(0, TILE)
    kb = tl.full([TILE], float("-inf"), tl.float32)
    ki = tl.zeros([TILE], tl.int32)
    ws = tl.zeros([TILE], tl.int64)
    zmin = tl.full([TILE], float("inf"), tl.float32)
    for s0 in range(0, V, TILE):
        offs = s0 + lanes
        mask = offs < V
        x, z = _load_z(x_row, offs, mask, pen_row, W, T, Y, HAS_PEN, HAS_TEMP, FAST)
        u = _okey(z).to(tl.int64) + 2147483648
        surv = mask & (u >= cut)
        w = tl.exp(z.to(tl.float64) - m64)
        if mp > 0.0:
            surv = surv & (w >= mp.to(tl.float64))
        ws += tl.where(surv, _fix(w), 0)
        key = tl.where(surv, z + _gumbel(rk, offs, FAST), float("-inf"))
        better = key > kb
        kb = tl.where(better, key, kb)
        ki = tl.where(better, offs, ki)
        zmin = tl.minimum(zmin, tl.where(surv, z, float("inf")))
    best = tl.max(kb)
    tok = tl.min(tl.where(kb == best, ki, INT32_MAX))
    xt, zt = _load_z(x_row, tok, tok >= 0, pen_row, W, T, Y, HAS_PEN, HAS_TEMP, FAST)
    lse = m64 + tl.log(tl.sum(ws).to(tl.float64) / FIX)
    if MODE == 1:
        lse = lse_all
    lp = zt.to(tl.float64) - lse
    if MODE == 2:
        lse = lse_raw
        lp = xt.to(tl.float64) - lse
    return tok, lp, tl.min(zmin), lse


# ----------------------------------------------------------------------------- top-n


@triton.jit(do_not_specialize=["RS"])
def _topn_keys_kernel(
    x_ptr, x_stride, V, CH,
    temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr,
    pen_ptr, W, RS, tau_ptr, keys_ptr,
    MODE: tl.constexpr, HAS_PEN: tl.constexpr, HAS_TEMP: tl.constexpr, FAST: tl.constexpr,
    TILE: tl.constexpr,
):
    """int64 keys whose descending order is (value descending, id ascending): a plain top-n
    over them gives the reference's order, ties included, without sorting the row."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    b64 = b.to(tl.int64)
    x_row = x_ptr + b64 * x_stride
    T = tl.load(temp_ptr + b)
    Y = _recip(T, FAST)
    tau = tl.load(tau_ptr + b)
    start = c * CH
    end = tl.minimum(start + CH, V)
    lanes = tl.arange(0, TILE)
    for s0 in range(start, end, TILE):
        offs = s0 + lanes
        mask = offs < end
        x, z = _load_z(x_row, offs, mask, pen_ptr + b64 * RS, W, T, Y, HAS_PEN, HAS_TEMP, FAST)
        if MODE == 2:
            v = x
        elif MODE == 1:
            v = z
        else:
            v = tl.where(z >= tau, z, float("-inf"))
        key = (_okey(v).to(tl.int64) << 32) | (2147483647 - offs).to(tl.int64)
        tl.store(keys_ptr + b64 * V + offs, key, mask=mask)
