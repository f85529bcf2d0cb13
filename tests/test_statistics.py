"""Statistical tests: sampled frequencies against the exact kept distribution, and the stream.

Everything is seeded (rows with distinct seeds give independent draws), so each test is a fixed
computation: it passes or fails the same way on every run, never flakily. The significance
level says how unlucky a fixed seed choice would have to be for a correct sampler to fail:
``ALPHA`` per test, below.
"""

from __future__ import annotations

import numpy as np
import pytest

from sampling import stream
from sampling.testing import chi_square
from sampling.testing import strategies as sst

#: Chance that a correct sampler fails one of these tests for the fixed seeds chosen here.
ALPHA = 1e-4

#: Each case is one logits row and its parameters; the row is repeated with distinct seeds.
CASES = {
    "top-k 3, T 0.7": (
        [1.0, 0.5, 2.0, -1.0, 0.3, 0.0, 1.7, -0.4, 0.9, -2.0, 0.1],
        dict(temperature=0.7, top_k=3),
    ),
    "top-k 2 with ties at the boundary": ([2.0, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0, -1.0], dict(top_k=2)),
    "top-p 0.8 on the top-k 6 survivors": (
        [0.2, 1.5, -0.3, 1.1, 0.9, -1.2, 0.0, 0.4, 1.3, -0.7, 0.6, -2.5, 0.8],
        dict(top_k=6, top_p=0.8),
    ),
    "min-p 0.2, T 1.5": ([0.0, 1.0, 2.0, -1.0, 0.5, 1.5, -0.5, 0.2, 1.2], dict(temperature=1.5, min_p=0.2)),
    "-inf masked, top-p 0.9": ([-np.inf, 0.3, -np.inf, 1.0, 0.8, -np.inf, 0.0, 0.6, -0.2], dict(top_p=0.9)),
    "penalties with padding": (
        [1.0, 2.0, 0.5, 1.5, -0.5, 0.0, 1.2, 0.7],
        dict(repetition_penalty=1.4, frequency_penalty=0.3, presence_penalty=0.2, temperature=0.9, top_k=6),
    ),
    # Rows without truncation choose a block of 4 ids, then a token in it (sampling/stream.py):
    # three blocks here, the last one partial, with unequal masses.
    "plain, T 0.7 (two-level choice)": (
        [1.0, 0.5, 2.0, -1.0, 0.3, 0.0, 1.7, -0.4, 0.9, -2.0, 0.1],
        dict(temperature=0.7),
    ),
    "plain with penalties, -inf masked (two-level choice)": (
        [1.0, 2.0, -np.inf, 1.5, -0.5, 0.0, 1.2, 0.7, -np.inf],
        dict(repetition_penalty=1.4, frequency_penalty=0.3, presence_penalty=0.2, temperature=0.9),
    ),
}
#: Histories of the cases with penalties (positions differ per row through output_ids).
HISTORY = dict(all_input_ids=[1, 3, 3, 6, -1, 8], output_ids=[3, 1, 3, 8, -1])


def draws_for(backend) -> int:
    # The Triton interpreter runs each row's programs in Python (about 0.1 s a row): a light
    # check there; its ids are compared one by one with the reference in test_properties anyway.
    return 40 if backend.interpreted else 4000


def _replicate(name: str, draws: int, seed_base: int) -> sst.Case:
    row, fields = CASES[name]
    logits = np.tile(np.array(row, np.float32), (draws, 1))
    param = {k: np.full(draws, v) for k, v in fields.items()}
    param["seed"] = seed_base + np.arange(draws, dtype=np.int64)
    data = {}
    if "repetition_penalty" in fields:
        data = {k: np.tile(np.array(v, np.int64), (draws, 1)) for k, v in HISTORY.items()}
    return sst.Case(logits, "float32", param, data)


def _exact_distribution(case: sst.Case) -> np.ndarray:
    """Probabilities of the first row's kept distribution (sampling-mode log-probabilities)."""
    one = case.take(np.array([0]))
    _, _, ids, lp = one.reference(num_logprobs=one.vocab)
    probs = np.zeros(one.vocab)
    probs[ids[0]] = np.exp(lp[0].astype(np.float64))
    return probs


@pytest.mark.parametrize("name", list(CASES))
def test_frequencies_match_the_kept_distribution(backend, name):
    draws = draws_for(backend)
    case = _replicate(name, draws, seed_base=1_000_003 * (list(CASES).index(name) + 1))
    probs = _exact_distribution(case)
    _, tokens, _, _ = backend.run(case)
    counts = np.bincount(tokens, minlength=case.vocab)
    kept = probs > 0
    assert counts[~kept].sum() == 0, f"draws outside the kept set: {np.flatnonzero(counts * ~kept)}"
    assert kept.sum() > 1, "the case must leave a choice"
    stat, dof, pvalue = chi_square(counts[kept], probs[kept])
    assert pvalue > ALPHA, (
        f"{name}: chi2 = {stat:.1f} ({dof} dof), p = {pvalue:.2e}; "
        f"observed {counts[kept] / draws}, expected {probs[kept]}"
    )


def test_flat_rows_draw_uniformly_over_seeds(backend):
    """A flat row (all logits equal) gives each token with probability 1/V, over seeds."""
    draws, vocab = (60, 5) if backend.interpreted else (4000, 37)
    case = sst.Case(np.zeros((draws, vocab), np.float32), "float32", {"seed": np.arange(draws) + 77})
    counts = np.bincount(backend.run(case)[1], minlength=vocab)
    stat, dof, pvalue = chi_square(counts, np.full(vocab, 1.0 / vocab))
    assert pvalue > ALPHA, (stat, dof, pvalue, counts)


def test_positions_draw_uniformly_for_one_seed(backend):
    """One seed, stream positions 0..N-1 (set by the number of valid output ids): uniform draws."""
    n, vocab = (60 if backend.interpreted else 600), 7
    out_ids = np.where(np.arange(n)[None, :] < np.arange(n)[:, None], 0, -1)  # row i: i valid ids
    # A frequency / presence penalty of 0 leaves the logits alone: output_ids only set positions.
    case = sst.Case(np.zeros((n, vocab), np.float32), "float32", {"seed": np.full(n, 12345)}, {"output_ids": out_ids})
    tokens = backend.run(case)[1]
    np.testing.assert_array_equal(tokens, case.reference()[1])
    stat, dof, pvalue = chi_square(np.bincount(tokens, minlength=vocab), np.full(vocab, 1.0 / vocab))
    assert pvalue > ALPHA, (stat, dof, pvalue)


# --- the stream itself (the definition in sampling/stream.py) ----------------------------------------


def _uniforms(seeds, positions, tokens) -> np.ndarray:
    seeds = np.asarray(seeds, np.int64)
    keys = stream.row_keys(seeds & stream.MASK32, seeds >> 32, np.asarray(positions, np.int64))
    return stream.uniforms(stream.token_bits(keys[:, None], np.asarray(tokens, np.int64)[None, :]))


def test_stream_uniforms_are_uniform():
    u = _uniforms(np.arange(1000), 0, np.arange(1000)).ravel()
    assert (u > 0).all() and (u < 1).all()
    # Odd multiples of 2**-24: exactly representable in float32.
    scaled = u * 2.0**24
    assert (scaled == np.round(scaled)).all() and (np.round(scaled) % 2 == 1).all()
    assert (u.astype(np.float32).astype(np.float64) == u).all()
    stat, dof, pvalue = chi_square(np.histogram(u, bins=1024, range=(0, 1))[0], np.full(1024, 1 / 1024))
    assert pvalue > ALPHA, (stat, dof, pvalue)
    from scipy import stats

    assert stats.kstest(u[:200_000], "uniform").pvalue > ALPHA


@pytest.mark.parametrize(
    "pairing",
    ["adjacent tokens", "adjacent positions", "adjacent seeds", "seeds 2**32 apart"],
)
def test_stream_uniforms_are_pairwise_independent(pairing):
    """Joint histogram of (u, u') for neighbouring tokens / positions / seeds is flat (32 x 32)."""
    n = 200_000
    idx = np.arange(n, dtype=np.int64)
    if pairing == "adjacent tokens":
        u = _uniforms(np.arange(n // 100), 0, np.arange(200))
        a, b = u[:, 0::2].ravel(), u[:, 1::2].ravel()
    elif pairing == "adjacent positions":
        a, b = (_uniforms(np.full(n, 99), idx * 2 + d, [5])[:, 0] for d in (0, 1))
    elif pairing == "adjacent seeds":
        a, b = (_uniforms(idx * 2 + d, 3, [11])[:, 0] for d in (0, 1))
    else:
        a, b = (_uniforms(idx + (d << 32), 3, [11])[:, 0] for d in (0, 1))
    joint = np.histogram2d(a, b, bins=32, range=((0, 1), (0, 1)))[0].ravel()
    stat, dof, pvalue = chi_square(joint, np.full(joint.size, 1 / joint.size))
    assert pvalue > ALPHA, (pairing, stat, dof, pvalue)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)


def test_gumbel_max_law_on_the_reference():
    """Many seeded draws of the reference: frequencies follow softmax over the kept set."""
    draws = 40_000
    case = _replicate("top-p 0.8 on the top-k 6 survivors", draws, seed_base=5)
    probs = _exact_distribution(case)
    counts = np.bincount(case.reference()[1], minlength=case.vocab)
    stat, dof, pvalue = chi_square(counts[probs > 0], probs[probs > 0])
    assert pvalue > ALPHA, (stat, dof, pvalue)
    # 40k draws resolve each frequency to about 0.005: the test can see a wrong distribution.
    np.testing.assert_allclose(counts / draws, probs, atol=0.01)


def test_two_level_law_on_the_reference():
    """Rows without truncation draw a block, then a token in it: the product is still softmax
    over all tokens, including a partial last block and a block whose tokens are all -inf."""
    draws, vocab = 40_000, 10
    row = np.array([0.3, -1.0, 2.2, 0.9, -np.inf, -np.inf, -np.inf, -np.inf, 1.4, 1.5], np.float32)
    case = sst.Case(np.tile(row, (draws, 1)), "float32", {"seed": 7 + np.arange(draws), "temperature": np.full(draws, 0.8)})
    tokens = case.reference()[1]
    z = row.astype(np.float64) / np.float64(np.float32(0.8))
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    counts = np.bincount(tokens, minlength=vocab)
    kept = probs > 0
    assert counts[~kept].sum() == 0
    stat, dof, pvalue = chi_square(counts[kept], probs[kept])
    assert pvalue > ALPHA, (stat, dof, pvalue, counts / draws, probs)
    np.testing.assert_allclose(counts / draws, probs, atol=0.01)
