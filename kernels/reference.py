"""The numpy reference: the executable definition of the sampling semantics.

Every backend is tested against these functions. They favour clarity over speed, but stay
vectorised over the batch. Stages, for each row::

    penalties (repetition -> frequency -> presence) -> temperature -> validity check
    -> top-k -> top-p -> min-p -> choose (Gumbel-max over survivors; two levels, block then
    token, for rows without truncation) -> log-probabilities

Precision: penalties and temperature are float32 operations, each rounded separately (no fused
multiply-add). Probabilities, the top-p mass, min-p ratios, Gumbel keys and log-probabilities
are float64.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from sampling import stream
from sampling.errors import InvalidLogitsError

MODES = ("sampling", "processed", "raw")


def _valid(ids: np.ndarray, vocab: int) -> np.ndarray:
    return (ids >= 0) & (ids < vocab)


def positions(out_ids: Optional[np.ndarray], rows: int, vocab: int, out_counts=None) -> np.ndarray:
    """Stream position of each row: the number of valid ids in ``output_ids`` (with per-entry
    ``out_counts``: the sum of the valid entries' counts)."""
    if out_ids is None:
        return np.zeros(rows, np.int64)
    w = 1 if out_counts is None else out_counts.astype(np.int64)
    return (_valid(out_ids, vocab) * w).sum(axis=1).astype(np.int64)


def _dense(ids: np.ndarray, counts: Optional[np.ndarray], vocab: int) -> np.ndarray:
    """[B, V] int64 occurrence counts of valid ids (the reference may be dense)."""
    rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
    ok = _valid(ids, vocab)
    w = np.ones(ids.shape, np.int64) if counts is None else counts.astype(np.int64)
    dense = np.zeros((ids.shape[0], vocab), np.int64)
    np.add.at(dense, (rows[ok], ids[ok]), w[ok])
    return dense


def penalize(z: np.ndarray, params, rep_ids=None, out_ids=None, out_counts=None) -> np.ndarray:
    """Repetition, then frequency, then presence penalties, in float32 (returns a new array)."""
    z = z.astype(np.float32, copy=True)
    vocab = z.shape[1]
    if rep_ids is not None:
        seen = _dense(rep_ids, None, vocab) > 0
        r = params["repetition_penalty"][:, None]
        z = np.where(seen, np.where(z > 0, z / r, z * r), z).astype(np.float32)
    if out_ids is not None:
        count = _dense(out_ids, out_counts, vocab)
        hit = count > 0
        f = params["frequency_penalty"][:, None]
        p = params["presence_penalty"][:, None]
        z = np.where(hit, z - f * count.astype(np.float32), z).astype(np.float32)
        z = np.where(hit, z - p, z).astype(np.float32)
    return z


def scale(z: np.ndarray, params) -> np.ndarray:
    """Temperature: z / T in float32 (greedy rows carry T = 1)."""
    # Overflow to +inf is defined behaviour: the row is then invalid (see check_rows).
    with np.errstate(over="ignore"):
        return (z / params["temperature"][:, None]).astype(np.float32)


def invalid_rows(zt: np.ndarray) -> np.ndarray:
    """Rows with NaN or +inf, or with no finite value: [B] bool."""
    return np.isnan(zt).any(1) | np.isposinf(zt).any(1) | ~np.isfinite(zt).any(1)


def check_rows(zt: np.ndarray) -> None:
    bad = invalid_rows(zt)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InvalidLogitsError(
            f"logits row {row} has NaN or +inf (after penalties and temperature) or no finite value"
        )


def truncate(zt: np.ndarray, params) -> np.ndarray:
    """Top-k, then top-p on the top-k-renormalised distribution, then min-p: [B, V] keep mask."""
    rows, vocab = zt.shape
    keep = np.ones(zt.shape, bool)
    k = params["top_k"]
    for i in np.flatnonzero((k > 0) & (k < vocab)):
        kth = -np.partition(-zt[i], k[i] - 1)[k[i] - 1]
        keep[i] = zt[i] >= kth  # ties with the k-th value are kept
    z64 = zt.astype(np.float64)
    top = z64.max(axis=1, keepdims=True)
    w = np.where(keep, np.exp(z64 - top), 0.0)
    for i in np.flatnonzero(params["top_p"] < 1):
        mass_above = _mass_strictly_above(zt[i], w[i], keep[i])
        keep[i] &= mass_above < np.float64(params["top_p"][i])
    min_p = params["min_p"].astype(np.float64)[:, None]
    keep &= np.exp(z64 - top) >= min_p
    return keep


def _mass_strictly_above(z: np.ndarray, w: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """For each token, the renormalised mass of survivors with a strictly larger value.

    The sum runs over survivors in descending order of value (the order every backend uses);
    tokens that tie share the mass above their group.
    """
    idx = np.flatnonzero(keep)
    order = idx[np.argsort(-z[idx], kind="stable")]
    vals = z[order]
    csum = np.cumsum(w[order])
    total = csum[-1]
    exclusive = np.concatenate(([0.0], csum[:-1]))
    first_of_group = np.searchsorted(-vals, -vals, side="left")
    above = np.full(z.shape, np.inf)
    above[order] = exclusive[first_of_group] / total
    return above


def row_keys(params, pos: np.ndarray, sampler_seed: int, call: int) -> np.ndarray:
    """Per-row stream keys: seeded rows from (seed, position), others from the sampler's stream."""
    seeded = stream.row_keys(params["seed_lo"], params["seed_hi"], pos)
    free = stream.unseeded_keys(sampler_seed, call, np.arange(len(pos), dtype=np.int64))
    return np.where(params["has_seed"], seeded, free).astype(np.int64)


def choose(zt: np.ndarray, keep: np.ndarray, keys: np.ndarray, plain: Optional[np.ndarray] = None) -> np.ndarray:
    """Gumbel-max over survivors, lowest id on exact ties; rows in ``plain`` (no truncation: all
    tokens survive) choose a block, then a token in it (:mod:`sampling.stream`)."""
    tokens = np.arange(zt.shape[1], dtype=np.int64)[None, :]
    g = stream.gumbel(stream.token_bits(keys[:, None], tokens))
    z64 = zt.astype(np.float64)
    key = np.where(keep, z64 + g, -np.inf)
    chosen = key.argmax(axis=1).astype(np.int64)
    if plain is not None and plain.any():
        chosen = np.where(plain, _two_level(z64, g, keys), chosen)
    return chosen


def _two_level(z64: np.ndarray, g: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The two-level choice of :mod:`sampling.stream` on every row (``g``: the tokens' noise)."""
    rows, vocab = z64.shape
    nb = -(-vocab // stream.BLOCK)
    zb = np.full((rows, nb * stream.BLOCK), -np.inf)
    zb[:, :vocab] = z64
    zb = zb.reshape(rows, nb, stream.BLOCK)
    top = zb.max(axis=2)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # blocks of -inf only: log(0) = -inf
        mass = top + np.log(np.exp(zb - safe[:, :, None]).sum(axis=2))
    blocks = np.arange(nb, dtype=np.int64)[None, :]
    gb = stream.gumbel(stream.token_bits(stream.block_keys(keys)[:, None], blocks))
    J = (mass + gb).argmax(axis=1)
    cols = J[:, None] * stream.BLOCK + np.arange(stream.BLOCK)[None, :]
    inside = cols < vocab
    cols = np.minimum(cols, vocab - 1)
    r = np.arange(rows)[:, None]
    tkey = np.where(inside, z64[r, cols] + g[r, cols], -np.inf)
    return cols[np.arange(rows), tkey.argmax(axis=1)].astype(np.int64)


def log_softmax(x: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """float64 log-softmax of float32 values, over ``mask`` only (elsewhere -inf)."""
    x = x.astype(np.float64)
    if mask is not None:
        x = np.where(mask, x, -np.inf)
    top = x.max(axis=1, keepdims=True)
    lse = top + np.log(np.exp(x - top).sum(axis=1, keepdims=True))
    return x - lse


def top_n(lp: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n largest log-probabilities per row, lowest id first on ties."""
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :n].astype(np.int64)
    return ids, np.take_along_axis(lp, ids, axis=1).astype(np.float32)


def sample(
    logits: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    rep_ids: Optional[np.ndarray] = None,
    out_ids: Optional[np.ndarray] = None,
    out_counts: Optional[np.ndarray] = None,
    pos: Optional[np.ndarray] = None,
    sampler_seed: int = 0,
    call: int = 0,
    logprobs_mode: str = "sampling",
    num_logprobs: int = 0,
    raise_invalid: bool = True,
):
    """The whole pipeline. Returns ``(logprobs [B] f32, tokens [B] i64, top_ids, top_logprobs)``.

    ``params`` are the normalised arrays of :class:`sampling.SamplingParam`. ``rep_ids`` are the
    ids the repetition penalty sees (``all_input_ids``); ``out_ids`` (with optional per-entry
    ``out_counts``) those the frequency and presence penalties count. ``pos`` defaults to the
    number of valid ids in ``out_ids`` (with counts: their sum). With ``raise_invalid=False``
    an invalid row is flagged instead of raising: token -1, logprob NaN (top-n: -1 / NaN).
    """
    x = np.asarray(logits).astype(np.float32)
    rows, vocab = x.shape
    z = penalize(x, params, rep_ids, out_ids, out_counts)
    zt = scale(z, params)
    bad = invalid_rows(zt)
    if raise_invalid:
        check_rows(zt)
    else:
        # Flagged rows are computed on zeros so they cannot poison anything; outputs are replaced.
        zt = np.where(bad[:, None], np.float32(0), zt)
        x = np.where(bad[:, None], np.float32(0), x)
    greedy = params["greedy"]
    keep = truncate(zt, params)
    keep[greedy] = True
    if pos is None:
        pos = positions(out_ids, rows, vocab, out_counts)
    keys = row_keys(params, pos, sampler_seed, call)
    plain = stream.two_level_rows(params, vocab)
    tokens = np.where(greedy, zt.argmax(axis=1), choose(zt, keep, keys, plain)).astype(np.int64)
    if logprobs_mode == "raw":
        lp = log_softmax(x)
    elif logprobs_mode == "processed":
        lp = log_softmax(zt)
    else:
        lp = log_softmax(zt, keep)
    chosen = lp[np.arange(rows), tokens].astype(np.float32)
    top_ids = top_lp = None
    if num_logprobs:
        top_ids, top_lp = top_n(lp, num_logprobs)
    if bad.any() and not raise_invalid:
        tokens[bad], chosen[bad] = -1, np.nan
        if top_ids is not None:
            top_ids[bad], top_lp[bad] = -1, np.nan
    return chosen, tokens, top_ids, top_lp
