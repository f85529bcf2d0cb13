"""The MindSpore backend: the reference pipeline on ``mindspore.Tensor`` logits, vectorised over the batch.

Same stages as :mod:`sampling.kernels.reference` and the torch backend, written with
``mindspore.ops`` / ``mindspore.mint`` operators that MindSpore lists for Ascend, GPU and CPU.
Fast paths are chosen from the host-side parameter arrays (``step.host``), never from device
values, except where reading a [B] flag back is free (the CPU, see :func:`_readback_is_free`).

Costs worth knowing:

* Penalties gather and scatter over the history ids (O(B*L)); no [B, V] count tensor is built.
  Frequency counts come from sorting each row's ids (O(L log L)).
* No sort of the vocabulary when no sampling row truncates. Top-k takes ``topk(max k + 1)``.
  Top-p without a top-k first looks at the ``TOP_P_WINDOW`` largest values and widens the window
  (up to the whole row) only for a batch whose nucleus does not fit (CPU; elsewhere it takes
  the whole row at once).
* The random stream (:mod:`sampling.stream`) is hashed in int64: every product of a 32-bit word
  with a multiplier below 2**31 fits, so no product overflows. On the CPU, when every sampling
  row's survivors lie in its top-k / top-p window, only that window is hashed.
* MindSpore's CPU kernels broadcast a [B, 1] column into [B, V] several times slower than they
  combine same-shape tensors, and some primitives (RealDiv, Sub, TopK) are several times faster
  than the functional forms: hence the tiles and primitive instances below. Every operator call
  also costs tens to hundreds of microseconds, so the per-row key prefixes, which depend only
  on host values, are hashed on the host with :mod:`sampling.stream` itself.
"""

from __future__ import annotations

import numpy as np

import mindspore as ms
from mindspore import Tensor, mint, ops

from sampling import stream
from sampling.errors import InvalidLogitsError, SamplingInputError
from sampling.step import Step

#: Width of the first top-p window for rows without a top-k (widened when the nucleus is larger).
TOP_P_WINDOW = 1024
_FLOAT_NAMES = {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16"}
_F32_MAX = float(np.finfo(np.float32).max)
_NEG_INF = float("-inf")
_REALDIV = ops.RealDiv()
_SUB = ops.Sub()
_TOPK = ops.TopK(sorted=True)
_TILE = ops.Tile()
_GE = ops.GreaterEqual()
#: Tensors with at least this many elements take the primitive kernels (fast on large inputs);
#: smaller ones the PyBoost operators, whose per-call dispatch is cheaper.
_LARGE = 1 << 15


def _sub(a: Tensor, b: Tensor, numel: int) -> Tensor:
    """``a - b``; ``numel`` is the result's size, passed in because asking a fresh tensor for its
    shape can wait for the kernel that computes it."""
    return _SUB(a, b) if numel >= _LARGE else mint.sub(a, b)


def _div(a: Tensor, b: Tensor, numel: int) -> Tensor:
    """``a / b``, correctly rounded by either kernel; ``numel`` as in :func:`_sub`."""
    return _REALDIV(a, b) if numel >= _LARGE else mint.div(a, b)


def _zeros(shape, dtype) -> Tensor:
    return mint.zeros(shape, dtype=dtype)


def _word(v: int) -> Tensor:
    """An int64 scalar tensor: broadcasting against a 0-d int64 tensor keeps int64 arithmetic."""
    return Tensor(v, ms.int64)


_MASK32 = _word(stream.MASK32)
_MUL1 = _word(stream.MUL1)
_MUL2 = _word(stream.MUL2)
_ONE = _word(1)
_TWO24 = Tensor(2.0**24, ms.float64)
_SHIFT = {s: _word(s) for s in (8, 15, 16)}


# --- shapes (tensor indexing is a slow path in MindSpore's PyNative mode) -----------------------


def _col(v: Tensor) -> Tensor:
    """[B] -> [B, 1]."""
    return ops.expand_dims(v, 1)


def _flat(x: Tensor) -> Tensor:
    """[B, 1] -> [B]."""
    return ops.reshape(x, (-1,))


def _cols(x: Tensor, start: int, length: int) -> Tensor:
    """Columns ``start .. start + length - 1`` of a [B, W] tensor."""
    return mint.narrow(x, 1, start, length)


def _wide(v: Tensor, width: int) -> Tensor:
    """[B] as [B, width] (every column the same): same-shape operands for the CPU kernels."""
    return _TILE(_col(v), (1, width))


# --- the stream ---------------------------------------------------------------------------------


def _shr(x: Tensor, s: int) -> Tensor:
    # Tensor has no ``>>`` operator; values are in [0, 2**32), so the arithmetic shift is logical.
    return ops.bitwise_right_shift(x, _SHIFT[s])


def _after_first_round(x: Tensor) -> Tensor:
    """:func:`sampling.stream.mix32` from its first multiply on, for ``x = w ^ (w >> 16)``."""
    x = ops.bitwise_and(ops.mul(x, _MUL1), _MASK32)
    x = ops.bitwise_xor(x, _shr(x, 15))
    x = ops.bitwise_and(ops.mul(x, _MUL2), _MASK32)
    return ops.bitwise_xor(x, _shr(x, 15))


def _premix(w: Tensor) -> Tensor:
    """``w ^ (w >> 16)``: the first step of ``mix32``. It distributes over ``^``, so it is applied
    to the row key and to the token word separately (once per row, once per token id)."""
    return ops.bitwise_xor(w, _shr(w, 16))


def mix32(x: Tensor) -> Tensor:
    """:func:`sampling.stream.mix32` on an int64 tensor of 32-bit words, in MindSpore int64 ops."""
    return _after_first_round(_premix(x))


def token_words(vocab: int) -> Tensor:
    """``premix(t * GOLDEN mod 2**32)`` for every token id t: [V] int64."""
    t = ops.arange(0, vocab, dtype=ms.int64)
    return _premix(ops.bitwise_and(ops.mul(t, _word(stream.GOLDEN)), _MASK32))


def uniforms(keys: Tensor, words: Tensor, rows: int, width: int) -> Tensor:
    """:func:`sampling.stream.uniforms` of the token bits of row ``keys`` [B] and premixed token
    ``words`` [rows, width] (from :func:`token_words`): [rows, width] float64, bit-identical.

    ``2 * (h >> 9) + 1`` is computed as ``(h >> 8) | 1`` (the same integer), and the scaling by
    2**-24 as a division by 2**24 (both exact; MindSpore's CPU divides faster than it multiplies).
    """
    x = _after_first_round(ops.bitwise_xor(_wide(_premix(keys), width), words))
    odd = ops.bitwise_or(_shr(x, 8), _ONE)
    return _div(odd.astype(ms.float64), _TWO24, rows * width)


def gumbel_scores(z64: Tensor, keys: Tensor, words: Tensor, rows: int, width: int) -> Tensor:
    """``z + G`` in float64 (``z64`` [B, width]): the Gumbel-max keys of :mod:`sampling.stream`.

    ``z + (-log E)`` is computed as ``z - log E``: IEEE negation is exact, so the sum is the same.
    """
    g = ops.log(ops.neg(ops.log(uniforms(keys, words, rows, width))))
    return _sub(z64, g, rows * width)


class MindSporeBackend:
    name = "mindspore"
    reads_cache_table = False

    def owns(self, x) -> bool:
        return isinstance(x, Tensor)

    def dtype_name(self, logits) -> str:
        return _FLOAT_NAMES.get(logits.dtype, str(logits.dtype).lower())

    def asarray(self, host, like, given=None):
        if given is not None:
            if not isinstance(given, Tensor):
                raise SamplingInputError(
                    f"to_tensor produced {type(given).__name__}, but the {self.name} backend needs "
                    "mindspore.Tensor (for example to_tensor=mindspore.Tensor)"
                )
            return given
        # A copy, not Tensor.from_numpy: the tensor must not alias the caller's arrays.
        return Tensor(np.ascontiguousarray(host))

    def default_raise_invalid(self, logits) -> bool:
        # Raising reads a flag back from the device: free on the CPU, a sync on Ascend / GPU.
        return _readback_is_free()

    def run(self, step: Step):
        return run_pipeline(step)


def _readback_is_free() -> bool:
    """Reading a flag back is free on the CPU; on Ascend / GPU it is a device sync, avoided."""
    return ms.get_context("device_target") == "CPU"


# --- penalties ----------------------------------------------------------------------------------


def _valid(ids: Tensor, vocab: int) -> Tensor:
    return ops.logical_and(ids >= 0, ids < vocab)


def _scatter_rows(z: Tensor, target: Tensor, new: Tensor, hit: Tensor) -> Tensor:
    """``z`` with ``new[b, j]`` written at column ``target[b, j]`` wherever ``hit[b, j]``.

    Entries that are not hit are redirected to the row's first hit entry (same column, same
    value), or, in a row without one, write column 0's own value back. Every write to a column
    then carries the same value, so the scatter's order over duplicates does not matter.
    """
    first = _col(ops.argmax(hit.astype(ms.int32), 1))
    any_hit = ops.any(hit, 1, keep_dims=True)
    anchor_col = ops.where(any_hit, ops.gather_elements(target, 1, first), 0)
    anchor_val = ops.where(any_hit, ops.gather_elements(new, 1, first), _cols(z, 0, 1))
    cols = ops.where(hit, target, anchor_col)
    vals = ops.where(hit, new, anchor_val)
    return mint.scatter(z, 1, cols, vals)


def repetition(z: Tensor, ids: Tensor, r: Tensor, vocab: int) -> Tensor:
    """z / r if z > 0 else z * r at every distinct valid id (duplicates write the same value)."""
    numel = ids.shape[0] * ids.shape[1]  # of the input tensor: known without waiting
    ids = ids.astype(ms.int64)
    valid = _valid(ids, vocab)
    cols = ops.where(valid, ids, 0)
    vals = ops.gather_elements(z, 1, cols)
    r = _col(r)
    return _scatter_rows(z, cols, ops.where(vals > 0, _div(vals, r, numel), ops.mul(vals, r)), valid)


def occurrences(ids: Tensor, counts, vocab: int):
    """Each row's ids sorted (padding last, as ``vocab``) and, per entry, the total count of its id.

    Sorting float32 keys (ids below 2**24 are exact) rather than int64 keeps to the dtypes every
    device's sort takes.
    """
    rows = ids.shape[0]
    ids = ids.astype(ms.int64)
    valid = _valid(ids, vocab)
    key_dtype = ms.float32 if vocab < 2**24 else ms.int64
    keys = ops.where(valid, ids, vocab).astype(key_dtype)
    w = valid.astype(ms.int64) if counts is None else ops.where(valid, counts.astype(ms.int64), 0)
    skeys, order = ops.sort(keys, 1)
    csum = ops.cumsum(ops.gather_elements(w, 1, order.astype(ms.int64)), 1)
    csum = ops.cat([_zeros((rows, 1), ms.int64), csum], 1)
    left = ops.searchsorted(skeys, skeys)
    right = ops.searchsorted(skeys, skeys, right=True)
    count = ops.gather_elements(csum, 1, right) - ops.gather_elements(csum, 1, left)
    return skeys.astype(ms.int64), count


def frequency_presence(z: Tensor, ids: Tensor, counts, f: Tensor, p: Tensor, vocab: int) -> Tensor:
    """z - f * count, then - p, at every id counted at least once (each step rounded to float32)."""
    sorted_ids, count = occurrences(ids, counts, vocab)
    hit = ops.logical_and(sorted_ids < vocab, count > 0)
    cols = ops.where(hit, sorted_ids, 0)
    vals = ops.gather_elements(z, 1, cols)
    vals = mint.sub(vals, ops.mul(_col(f), count.astype(ms.float32)))
    vals = mint.sub(vals, _col(p))
    return _scatter_rows(z, cols, vals, hit)


def positions(step: Step) -> Tensor:
    """Stream position per row: [B] int64 on the device."""
    if step.positions is not None:
        return step.positions.astype(ms.int64)
    valid = _valid(step.out_ids, step.vocab).astype(ms.int64)
    w = valid if step.out_counts is None else ops.mul(valid, step.out_counts.astype(ms.int64))
    return ops.sum(w, 1)


def row_keys(step: Step) -> Tensor:
    """Per-row stream keys [B] int64: ``stream.row_keys`` for seeded rows, ``unseeded_keys`` else.

    Everything but the stream position is a host value (seeds, the sampler's seed and call
    counter), so the keys' prefixes are hashed on the host by :mod:`sampling.stream` itself;
    the last round, which mixes in the position, runs on the device when the position is
    there (``output_ids``, or the cache's positions).
    """
    host = step.host.arrays
    has_seed = host["has_seed"]
    free = stream.unseeded_keys(step.sampler_seed, step.call, np.arange(step.rows, dtype=np.int64))
    prefix = stream.mix32(stream.mix32(host["seed_lo"] ^ stream.SALT) ^ host["seed_hi"])
    on_host = step.positions is None and (step.out_ids is None or step.out_ids.shape[1] == 0)
    if on_host or not has_seed.any():
        # Position 0 (no output ids) or no seeded row: no device value is needed.
        return Tensor(np.where(has_seed, stream.mix32(prefix), free).astype(np.int64))
    position = ops.bitwise_and(positions(step), _MASK32)
    seeded = mix32(ops.bitwise_xor(Tensor(prefix.astype(np.int64)), position))
    if has_seed.all():
        return seeded
    return ops.where(Tensor(has_seed), seeded, Tensor(free.astype(np.int64)))


# --- truncation ---------------------------------------------------------------------------------


class _Full:
    """Full-vocabulary float64 quantities of the tempered logits ``zt``, computed on first use."""

    def __init__(self, zt: Tensor, top: Tensor, numel: int):
        self.zt = zt
        self.numel = numel
        self.top = top  # [B, 1] float32 row maximum
        self.top64 = top.astype(ms.float64)
        self._z64 = self._e = self._esum = None

    @property
    def z64(self) -> Tensor:
        if self._z64 is None:
            self._z64 = self.zt.astype(ms.float64)
        return self._z64

    @property
    def e(self) -> Tensor:
        """``exp(z - max)`` in float64: the reference's min-p ratio, top-p weight and softmax term."""
        if self._e is None:
            self._e = ops.exp(_sub(self.z64, self.top64, self.numel))
        return self._e

    @property
    def esum(self) -> Tensor:
        """[B, 1] row sums of :attr:`e`."""
        if self._esum is None:
            self._esum = ops.sum(self.e, 1, keepdim=True)
        return self._esum


class _Window:
    """The ``width`` largest values of each row (descending, float32) and their ids (int64)."""

    def __init__(self, zt: Tensor, width: int):
        self.width = width
        vals, idx = _TOPK(zt, width)
        self.vals = vals
        self.idx = idx.astype(ms.int64)
        self.last = _flat(_cols(vals, width - 1, 1))


class _Plan:
    """Host-side flags over the sampling rows, decided before any device work."""

    def __init__(self, step: Step):
        host = step.host.arrays
        self.sampling = ~host["greedy"]
        self.any_greedy = bool(host["greedy"].any())
        self.k = np.where((host["top_k"] > 0) & (host["top_k"] < step.vocab), host["top_k"], 0)
        self.top_k = self.sampling & (self.k > 0)
        self.top_p = self.sampling & (host["top_p"] < 1)
        self.min_p = self.sampling & (host["min_p"] > 0)
        self.p_without_k = bool((self.top_p & (self.k == 0)).any())
        self.windowed = bool((self.top_k | self.top_p)[self.sampling].all())


def _p_rows(P) -> Tensor:
    return ops.logical_and(ops.logical_not(P["greedy"]), P["top_p"] < 1)


def thresholds(full: _Full, plan: _Plan, step: Step):
    """Top-k, then top-p on the top-k survivors: ``(threshold [B] float32, window)``.

    The survivors of both are exactly ``zt >= threshold`` (-inf for rows with neither). The
    window holds the sorted largest values: ``max k + 1`` of them when every top-p row has a top-k
    (one more than any k, so that ties running past the k-th value can be seen), else first
    ``TOP_P_WINDOW``, widened until every nucleus fits. Returns ``(None, None)`` when no sampling
    row uses top-k or top-p.
    """
    zt = full.zt
    P = step.params
    rows, vocab = step.rows, step.vocab
    if not (plan.top_k.any() or plan.top_p.any()):
        return None, None
    k_dev = P["top_k"].astype(ms.int64)
    k_dev = ops.where(ops.logical_and(k_dev > 0, k_dev < vocab), k_dev, 0)
    width = int(plan.k[plan.top_k].max(initial=0)) + 1
    if plan.p_without_k:
        # Widening reads a flag back: free on the CPU; elsewhere take the whole row at once.
        width = max(width, TOP_P_WINDOW if _readback_is_free() else vocab)
    width = min(width, vocab)
    while True:
        window = _Window(zt, width)
        kth = _flat(ops.gather_elements(window.vals, 1, _col(ops.clamp(k_dev - 1, 0, width - 1))))
        thr = ops.where(k_dev > 0, kth, _NEG_INF)
        if not plan.top_p.any():
            return thr, window
        thr_p, complete = _top_p(full, thr, window, plan, step)
        if complete is None or bool(ops.all(complete)):
            return ops.where(_p_rows(P), ops.maximum(thr_p, thr), thr), window
        # The nucleus of a row without a top-k reaches past the window: widen it.
        width = min(vocab, width * 8)


def _top_p(full: _Full, thr_k: Tensor, window: _Window, plan: _Plan, step: Step):
    """Top-p threshold [B] over the top-k survivors, and per row whether its nucleus is complete
    inside the window (None when the window is the whole row).

    The reference sums survivors' ``exp(z - max)`` in descending order of value (float64) and
    keeps t iff the mass strictly above t's value group, over the total, is < p. That mass is
    non-decreasing along the sorted window, so the kept tokens are the first n positions plus
    the rest of the n-th position's tie group: the threshold is the n-th value.
    """
    P = step.params
    zt = full.zt
    vocab = step.vocab
    width = window.width
    vals = window.vals
    survivor = _GE(vals, _wide(thr_k, width))
    rows = step.rows
    w = ops.where(survivor, ops.exp(_sub(vals.astype(ms.float64), full.top64, rows * width)), 0.0)
    csum = ops.cumsum(w, 1)
    last = _flat(_cols(csum, width - 1, 1))
    in_window = n_surv = None
    if width == vocab:
        total = last
    else:
        # float32 counts are exact below 2**24 tokens, and MindSpore sums float32 fastest.
        in_window = ops.sum(survivor.astype(ms.float32), 1)
        n_surv = ops.sum(_GE(zt, _wide(thr_k, vocab)).astype(ms.float32), 1)
        beyond = (n_surv - in_window).astype(ms.float64)
        # A top-k row's survivors beyond the window tie with its k-th value; they come last.
        total = last + beyond * _flat(ops.exp(_col(thr_k.astype(ms.float64)) - full.top64))
        if plan.p_without_k:
            total = ops.where(thr_k > _NEG_INF, total, _flat(full.esum))
    exclusive = ops.cat([_zeros((rows, 1), ms.float64), _cols(csum, 0, width - 1)], 1)
    ratio = _div(exclusive, _col(total), rows * width)
    below = ops.logical_and(ratio < _col(P["top_p"].astype(ms.float64)), survivor)
    n_kept = ops.clamp(ops.sum(below.astype(ms.int64), 1), 1, width)
    thr_p = _flat(ops.gather_elements(vals, 1, _col(n_kept - 1)))
    if n_surv is None:
        return thr_p, None
    # Complete when the crossing happened inside the window, or nothing survives beyond it. A
    # top-k row always is: what lies beyond ties with its k-th value, counted in the total.
    complete = ops.logical_or(n_kept < width, in_window >= n_surv)
    complete = ops.logical_or(complete, thr_k > _NEG_INF)
    return thr_p, ops.logical_or(complete, ops.logical_not(_p_rows(P)))


def full_keep(full: _Full, thr, plan: _Plan, step: Step):
    """The [B, V] keep mask (greedy rows keep everything), or None when nothing is truncated."""
    P = step.params
    vocab = step.vocab
    keep = None if thr is None else _GE(full.zt, _wide(thr, vocab))
    if plan.min_p.any():
        by_min_p = full.e >= _col(P["min_p"].astype(ms.float64))
        keep = by_min_p if keep is None else ops.logical_and(keep, by_min_p)
    if keep is not None and plan.any_greedy:
        keep = ops.logical_or(keep, _col(P["greedy"]))
    return keep


# --- choice and log-probabilities ---------------------------------------------------------------


def _token_words(step: Step) -> Tensor:
    key = ("token_words", step.vocab)
    words = step.state.get(key)
    if words is None:
        words = token_words(step.vocab)
        step.state[key] = words
    return words


def choose_in_window(full: _Full, thr, window, plan: _Plan, step: Step):
    """Gumbel-max when every sampling row's survivors lie in the window, hashing only its ids.

    Returns ``(tokens [B], log-normaliser [B, 1] over the survivors)``, or None when some
    sampling row may keep a token outside the window (the window's last value reaches the
    threshold), or when the window is too wide to be worth it. Deciding reads a flag back, so
    this runs only where that is free (CPU).
    """
    if window is None or not plan.windowed or window.width * 4 > step.vocab or not _readback_is_free():
        return None
    P = step.params
    if not bool(ops.all(ops.logical_or(window.last < thr, P["greedy"]))):
        return None
    keep = _GE(window.vals, _wide(thr, window.width))
    v64 = window.vals.astype(ms.float64)
    e = ops.exp(_sub(v64, full.top64, step.rows * window.width))
    if plan.min_p.any():
        keep = ops.logical_and(keep, e >= _col(P["min_p"].astype(ms.float64)))
    scores = gumbel_scores(v64, row_keys(step), ops.gather(_token_words(step), window.idx, 0), step.rows, window.width)
    scores = ops.where(keep, scores, _NEG_INF)
    # topk orders ties arbitrarily: among equal best scores take the lowest id.
    best = ops.max(scores, 1, keepdims=True)[0]
    ids = ops.where(scores == best, window.idx, step.vocab)
    tokens = ops.min(ids, 1)[0]
    lse = full.top64 + ops.log(ops.sum(ops.where(keep, e, 0.0), 1, keepdim=True))
    return tokens, lse


def choose(full: _Full, keep, step: Step) -> Tensor:
    """Gumbel-max over survivors (all tokens when ``keep`` is None), lowest id on exact ties;
    rows without truncation in two levels (:func:`two_level`)."""
    keys = row_keys(step)
    host = step.host.arrays
    plain = stream.two_level_rows(host, step.vocab)
    if plain[~host["greedy"]].all():  # greedy rows take their argmax elsewhere
        return two_level(full, keys, step)
    words = _TILE(ops.expand_dims(_token_words(step), 0), (step.rows, 1))
    scores = gumbel_scores(full.z64, keys, words, step.rows, step.vocab)
    if keep is not None:
        scores = ops.where(keep, scores, _NEG_INF)
    chosen = ops.argmax(scores, 1)
    if plain.any():
        chosen = ops.where(Tensor(plain), two_level(full, keys, step), chosen)
    return chosen


def two_level(full: _Full, keys: Tensor, step: Step) -> Tensor:
    """The two-level choice of :mod:`sampling.stream` for every row: a block by Gumbel-max over
    the blocks' float64 log-masses, then a token in it (the reference's formula)."""
    rows, vocab, width = step.rows, step.vocab, stream.BLOCK
    nb = -(-vocab // width)
    z64 = full.z64
    if nb * width > vocab:
        z64 = ops.cat([z64, Tensor(np.full((rows, nb * width - vocab), -np.inf))], 1)
    zb = ops.reshape(z64, (rows, nb, width))
    top = ops.max(zb, 2)[0]
    safe = ops.where(top == _NEG_INF, 0.0, top)
    mass = top + ops.log(ops.sum(ops.exp(zb - ops.expand_dims(safe, 2)), 2))
    words = _token_words(step)
    bwords = _TILE(ops.expand_dims(mint.narrow(words, 0, 0, nb), 0), (rows, 1))
    bkeys = mix32(ops.bitwise_xor(keys, _word(stream.BLOCK_SALT)))
    block = ops.argmax(gumbel_scores(mass, bkeys, bwords, rows, nb), 1).astype(ms.int64)
    cols = _col(block) * width + ops.expand_dims(ops.arange(0, width, dtype=ms.int64), 0)
    inside = cols < vocab
    cols = ops.clamp(cols, 0, vocab - 1)
    tk = gumbel_scores(ops.gather_elements(full.z64, 1, cols), keys, ops.gather(words, cols, 0), rows, width)
    tk = ops.where(inside, tk, _NEG_INF)
    return _flat(ops.gather_elements(cols, 1, _col(ops.argmax(tk, 1).astype(ms.int64))))


def top_n(lp: Tensor, n: int, rows: int, vocab: int):
    """The n largest log-probabilities per row, lowest id first on ties: (ids int64, lp float32).

    ``topk`` breaks ties in no documented order, so the ids tied with the n-th value are taken
    lowest first from a second ``topk`` over negated ids, and the n picks are ranked by
    (value descending, id ascending) with an [n, n] comparison.
    """
    vals, idx = _TOPK(lp, n)
    idx = idx.astype(ms.int64)
    last = _cols(vals, n - 1, 1)
    above = ops.sum((vals > last).astype(ms.int64), 1, keepdim=True)
    neg_ids = ops.expand_dims(ops.neg(ops.arange(0, vocab, dtype=ms.float32)), 0)
    tied = ops.where(lp == last, neg_ids, _NEG_INF)
    tied_ids = ops.neg(_TOPK(tied, n)[0]).astype(ms.int64)
    j = ops.expand_dims(ops.arange(0, n, dtype=ms.int64), 0)
    from_ties = ops.gather_elements(tied_ids, 1, ops.clamp(j - above, 0, n - 1))
    ids = ops.where(j < above, idx, from_ties)
    v = ops.where(j < above, vals, ops.broadcast_to(last, (rows, n)))
    vi, vj = ops.expand_dims(v, 2), ops.expand_dims(v, 1)
    ii, ij = ops.expand_dims(ids, 2), ops.expand_dims(ids, 1)
    before = ops.logical_or(vj > vi, ops.logical_and(vj == vi, ij < ii))
    rank = ops.sum(before.astype(ms.int64), 2)
    out_ids = mint.scatter(_zeros((rows, n), ms.int64), 1, rank, ids)
    out_lp = mint.scatter(_zeros((rows, n), ms.float64), 1, rank, v)
    return out_ids, out_lp.astype(ms.float32)


def invalid_rows(zt: Tensor, top: Tensor) -> Tensor:
    """[B] bool: NaN or +inf (both fail ``<= max float``), or no finite value (max is -inf)."""
    return ops.logical_or(ops.logical_not(ops.all(zt <= _F32_MAX, 1)), _flat(top) == _NEG_INF)


def check_rows(zt: Tensor, top: Tensor) -> None:
    """Raise :class:`InvalidLogitsError` for the first invalid row.

    A float32 row sum is NaN or +inf whenever the row holds NaN or +inf (and, rarely, when
    finite values overflow), and MindSpore sums float32 far faster than it compares and reduces
    booleans: the exact test runs only for a batch whose sums look suspicious.
    """
    s = ops.sum(zt, 1)
    suspicious = ops.logical_or(ops.logical_or(mint.isnan(s), s == float("inf")), _flat(top) == _NEG_INF)
    if not bool(ops.any(suspicious)):
        return
    bad = invalid_rows(zt, top).asnumpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InvalidLogitsError(
            f"logits row {row} has NaN or +inf (after penalties and temperature) or no finite value"
        )


def _penalised(x: Tensor, step: Step) -> Tensor:
    P = step.params
    host = step.host
    z = x
    if step.rep_ids is not None and step.rep_ids.shape[1] and host.any("repetition_penalty"):
        z = repetition(z, step.rep_ids, P["repetition_penalty"], step.vocab)
    if step.out_ids is not None and step.out_ids.shape[1] and (
        host.any("frequency_penalty") or host.any("presence_penalty")
    ):
        z = frequency_presence(
            z, step.out_ids, step.out_counts, P["frequency_penalty"], P["presence_penalty"],
            step.vocab,
        )
    return z


def run_pipeline(step: Step):
    P = step.params
    host = step.host
    x = step.logits if step.logits.dtype == ms.float32 else step.logits.astype(ms.float32)
    z = _penalised(x, step)
    # RealDiv: correctly rounded float32 division, several times faster on the CPU than ``/``.
    rows, vocab = step.rows, step.vocab
    zt = _div(z, _col(P["temperature"]), rows * vocab) if host.any("temperature") else z
    raw_is_zt = zt is x
    top, greedy_ids = ops.max(zt, 1, keepdims=True)
    bad = None
    if step.raise_invalid:
        check_rows(zt, top)
    else:
        bad = invalid_rows(zt, top)
        # Keep flagged rows from poisoning the arithmetic; their outputs are overwritten below.
        zt = ops.where(_col(bad), 0.0, zt)
        top, greedy_ids = ops.max(zt, 1, keepdims=True)
    tokens = _flat(greedy_ids).astype(ms.int64)
    full = _Full(zt, top, rows * vocab)
    mode = step.logprobs_mode
    keep = lse = None
    if host.any("sampling"):
        plan = _Plan(step)
        thr, window = thresholds(full, plan, step)
        picked = choose_in_window(full, thr, window, plan, step)
        if picked is not None:
            sampled, window_lse = picked
            if mode == "sampling" and not plan.any_greedy and not step.num_logprobs:
                lse = window_lse
            elif mode == "sampling":
                keep = full_keep(full, thr, plan, step)
        else:
            keep = full_keep(full, thr, plan, step)
            sampled = choose(full, keep, step)
        tokens = ops.where(P["greedy"], tokens, sampled) if plan.any_greedy else sampled
    if mode == "raw" and not raw_is_zt:
        src = _Full(x, ops.max(x, 1, keepdims=True)[0], rows * vocab)
    else:
        src = full
    mask = keep if mode == "sampling" else None
    if lse is None:
        if mask is None:
            lse = src.top64 + ops.log(src.esum)
        else:
            lse = src.top64 + ops.log(ops.sum(ops.where(mask, src.e, 0.0), 1, keepdim=True))
    chosen = ops.gather_elements(src.zt, 1, _col(tokens)).astype(ms.float64)
    logprobs = _flat(chosen - lse).astype(ms.float32)
    top_ids = top_lp = None
    if step.num_logprobs:
        z64 = src.z64 if mask is None else ops.where(mask, src.z64, _NEG_INF)
        top_ids, top_lp = top_n(_sub(z64, lse, rows * vocab), step.num_logprobs, rows, vocab)
    if bad is not None:
        tokens = ops.where(bad, -1, tokens)
        logprobs = ops.where(bad, float("nan"), logprobs)
        if top_ids is not None:
            top_ids = ops.where(_col(bad), -1, top_ids)
            top_lp = ops.where(_col(bad), float("nan"), top_lp)
    return logprobs, tokens, top_ids, top_lp
