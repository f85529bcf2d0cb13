"""The shared property suite: every available backend against the numpy reference.

Inputs come from :mod:`sampling.testing.strategies`, so the strategies engines use are exercised
on every backend here. Exact where the semantics are exact (token ids, top-n ids); log-
probabilities within 1e-5 relative (float32 results of float64 math).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sampling import InvalidLogitsError, Sampler
from sampling.testing import strategies as sst

MODES = ("sampling", "processed", "raw")
#: Log-probabilities: 1e-5 relative, with a floor of one float32 ulp at 1 for values near 0
#: (a single-survivor row has log-probability exactly 0, where a relative bound means nothing).
RTOL, ATOL = 1e-5, 2.0**-23

seeds = st.integers(0, 2**64 - 1)


def assert_matches(out, ref, case, what=""):
    lp, tokens, top_ids, top_lp = out
    r_lp, r_tokens, r_ids, r_top = ref
    np.testing.assert_array_equal(tokens, r_tokens, err_msg=f"token ids differ {what}")
    np.testing.assert_allclose(lp, r_lp, rtol=RTOL, atol=ATOL, err_msg=f"log-probabilities differ {what}")
    if r_ids is not None:
        np.testing.assert_array_equal(top_ids, r_ids, err_msg=f"top-n ids differ {what}")
        np.testing.assert_allclose(
            top_lp, r_top, rtol=RTOL, atol=ATOL, err_msg=f"top-n log-probabilities differ {what}"
        )
    else:
        assert top_ids is None and top_lp is None


def assert_identical(a, b, what):
    """Bitwise-equal results (tokens, log-probabilities, top-n)."""
    for x, y, name in zip(a, b, ("logprobs", "tokens", "top_ids", "top_logprobs")):
        if y is None:
            assert x is None, f"{name}: {what}"
        else:
            np.testing.assert_array_equal(x, y, err_msg=f"{name} differ: {what}")


# --- every backend equals the reference -----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(backend, mode):
    """Ids exactly (greedy and seeded or unseeded sampling), log-probabilities and top-n in ``mode``."""

    @backend.settings(30)
    @given(case=backend.cases(), seed=seeds, n=st.integers(0, 4), convert=st.booleans())
    def check(case, seed, n, convert):
        n = min(n, case.vocab)
        out = backend.run(case, seed=seed, mode=mode, num_logprobs=n, convert=convert)
        ref = case.reference(sampler_seed=seed, logprobs_mode=mode, num_logprobs=n)
        assert_matches(out, ref, case, f"({backend}, {mode})")

    check()


def test_serving_sized_batches(backend):
    """Batches the size engines run: 64 x 32000 and 8 x 151936 (the interpreter: 2 x 2500, still
    several vocabulary tiles per row)."""
    shapes = [(2, 2500)] if backend.interpreted else [(64, 32000), (8, 151936)]
    for rows, vocab in shapes:

        @settings(backend.settings(2), max_examples=2)
        @given(
            case=sst.cases(
                rows=rows, vocab=vocab, kinds=sst.ROW_KINDS[1:], required_history=sst.HISTORY_FIELDS,
                required=("temperature", "top_k", "top_p", "min_p", "seed", "repetition_penalty",
                          "frequency_penalty"),
            ),
            seed=seeds,
        )
        def check(case, seed):
            out = backend.run(case, seed=seed, num_logprobs=3)
            assert_matches(out, case.reference(sampler_seed=seed, num_logprobs=3), case, f"{rows} x {vocab}")

        check()


@pytest.mark.parametrize("dtype", sst.DTYPES)
def test_each_logits_dtype(backend, dtype):
    """Each logits dtype on its own (the mixed suite above may draw few of one)."""

    @backend.settings(12)
    @given(case=backend.cases(dtypes=(dtype,)), seed=seeds)
    def check(case, seed):
        out = backend.run(case, seed=seed, num_logprobs=min(2, case.vocab))
        assert_matches(out, case.reference(sampler_seed=seed, num_logprobs=min(2, case.vocab)), case, dtype)

    check()


def test_kept_set_is_exact(backend):
    """Top-k, top-p (on the top-k survivors) and min-p keep exactly the reference's set.

    With ``num_logprobs = V`` in "sampling" mode every token is listed, and exactly the dropped
    ones have log-probability -inf, so the kept set is visible, not only the one drawn token.
    """

    @backend.settings(40)
    @given(
        case=backend.cases(
            max_vocab=min(backend.max_vocab, 48), realistic=False, greedy="none",
            fields=("top_k", "top_p", "min_p", "temperature", "seed", "repetition_penalty"),
            required=("top_k", "top_p"),
        ),
        seed=seeds,
    )
    def check(case, seed):
        out = backend.run(case, seed=seed, num_logprobs=case.vocab)
        ref = case.reference(sampler_seed=seed, num_logprobs=case.vocab)
        kept = np.zeros((case.rows, case.vocab), bool)
        np.put_along_axis(kept, out[2], np.isfinite(out[3]), axis=1)
        r_kept = np.zeros_like(kept)
        np.put_along_axis(r_kept, ref[2], np.isfinite(ref[3]), axis=1)
        np.testing.assert_array_equal(kept, r_kept, err_msg="kept sets differ")
        assert_matches(out, ref, case, "(kept sets)")

    check()


#: Backends whose Gumbel keys are float64 on every row. README "Precision": the Triton kernels
#: rank untruncated rows in float32 (a near-tie of two keys may resolve differently there) and
#: finish truncated rows in float64 on their candidates.
FLOAT64_KEYS_EVERYWHERE = ("numpy", "torch", "mindspore")


def test_gumbel_race_is_float64(backend):
    """Seeded draws whose float64 race is decided by ~1e-10: float32 noise would flip about half.

    Random cases almost never land this close, so a backend computing the Gumbel keys (or
    ``z + G``) in float32 would pass the suite above; here each row is a two-token race whose
    margin is far below float32 resolution, found by scanning seeds. A third token, dropped by
    top-k = 2, makes the rows truncated: exact on every backend. Without it the rows are plain,
    exact on the backends of :data:`FLOAT64_KEYS_EVERYWHERE`.
    """
    from sampling import stream

    seeds_ = np.arange(200_000, dtype=np.int64)
    keys = stream.row_keys(seeds_ & stream.MASK32, seeds_ >> 32, np.zeros_like(seeds_))
    g = stream.gumbel(stream.token_bits(keys[:, None], np.arange(2, dtype=np.int64)[None, :]))
    z1 = (g[:, 0] - g[:, 1]).astype(np.float32)  # token 1's logit almost cancels the noise gap
    margin = (z1.astype(np.float64) + g[:, 1]) - g[:, 0]
    pick = np.flatnonzero(np.abs(margin) < 1e-10 * np.abs(g[:, 0]))[:16]
    assert pick.size == 16
    expected = (margin[pick] > 0).astype(np.int64)
    third = np.full(pick.size, -30.0, np.float32)
    truncated = sst.Case(
        np.stack([np.zeros(pick.size, np.float32), z1[pick], third], axis=1),
        "float32",
        {"seed": seeds_[pick], "top_k": np.full(pick.size, 2)},
    )
    plain = sst.Case(np.stack([np.zeros(pick.size, np.float32), z1[pick]], axis=1), "float32", {"seed": seeds_[pick]})
    for case in (truncated, plain):
        np.testing.assert_array_equal(case.reference()[1], expected)
    np.testing.assert_array_equal(backend.run(truncated)[1], expected, err_msg="truncated rows: race not float64")
    ids = backend.run(plain)[1]
    if backend.name in FLOAT64_KEYS_EVERYWHERE:
        np.testing.assert_array_equal(ids, expected, err_msg="plain rows: race not float64")
    else:
        assert set(ids.tolist()) <= {0, 1}


def test_temperature_is_a_float32_division(backend):
    """z / T, not z * (1 / T): rows where only the division keeps two values apart, under top-k 1.

    The values are one float32 ulp apart; multiplying by a rounded reciprocal merges them (a tie,
    both kept by top-k = 1), dividing keeps them distinct (one kept).
    """
    rng = np.random.default_rng(7)
    rows = []
    while len(rows) < 8:
        t = np.float32(rng.uniform(0.1, 3.0))
        z = rng.uniform(-8, 8, size=4096).astype(np.float32)
        up = np.nextafter(z, np.float32(np.inf))
        div_apart = (up / t) != (z / t)
        mul_tied = (up * (np.float32(1) / t)) == (z * (np.float32(1) / t))
        hit = np.flatnonzero(div_apart & mul_tied)
        if hit.size:
            rows.append((z[hit[0]], up[hit[0]], t))
    logits = np.array([[a, b, np.float32(-20)] for a, b, _ in rows], np.float32)
    param = {"temperature": np.array([t for _, _, t in rows], np.float32), "top_k": np.ones(len(rows), np.int64),
             "seed": np.arange(len(rows))}
    case = sst.Case(logits, "float32", param)
    out = backend.run(case, num_logprobs=3)
    ref = case.reference(num_logprobs=3)
    assert (np.isfinite(ref[3]).sum(axis=1) == 1).all()  # the division keeps only the larger value
    assert_matches(out, ref, case, "(temperature division)")


def test_greedy_is_exact_argmax(backend):
    """Greedy rows (param=None, temperature 0, do_sample False) return the penalised argmax."""

    @backend.settings(25)
    @given(case=backend.cases(greedy="all", kinds=("grid", "near_ties", "flat", "masked", "large")))
    def check(case):
        out = backend.run(case)
        ref = case.reference()
        assert_matches(out, ref, case, "greedy")

    check()


def test_penalties_with_padding(backend):
    """Penalty histories padded with -1, vocab_size or any other out-of-range id."""

    @backend.settings(25)
    @given(
        case=backend.cases(
            fields=("repetition_penalty", "frequency_penalty", "presence_penalty", "temperature", "seed"),
            required=("repetition_penalty", "frequency_penalty", "presence_penalty"),
            history=sst.HISTORY_FIELDS,
            pad=(-1, "vocab", -7, 2**31 - 1),
            max_history=12,
        ),
        seed=seeds,
    )
    def check(case, seed):
        out = backend.run(case, seed=seed, mode="processed", num_logprobs=min(3, case.vocab))
        ref = case.reference(sampler_seed=seed, logprobs_mode="processed", num_logprobs=min(3, case.vocab))
        assert_matches(out, ref, case)

    check()


# --- batch invariance and seeds ----------------------------------------------------------------------


def test_batch_invariance(backend):
    """Permuting or slicing a batch changes no row's result (seeded and greedy rows)."""

    @backend.settings(20)
    @given(case=backend.cases(seeded="all"), data=st.data())
    def check(case, data):
        full = backend.run(case, num_logprobs=min(2, case.vocab))
        perm = np.array(data.draw(st.permutations(range(case.rows)), label="permutation"))
        start = data.draw(st.integers(0, case.rows - 1), label="slice start")
        stop = data.draw(st.integers(start + 1, case.rows), label="slice stop")
        for index, what in ((perm, "permuted"), (np.arange(start, stop), f"rows {start}:{stop}")):
            part = backend.run(case.take(index), num_logprobs=min(2, case.vocab))
            assert_identical(part, [None if x is None else x[index] for x in full], what)

    check()


def test_seed_reproducibility(backend):
    """Same sampler seed and call: same result; seeded rows ignore the sampler's seed; calls advance."""

    @backend.settings(15)
    @given(case=backend.cases(), s1=seeds, s2=seeds)
    def check(case, s1, s2):
        a = backend.run(case, seed=s1)
        assert_identical(backend.run(case, seed=s1), a, "same sampler seed")
        b = backend.run(case, seed=s2)
        seeded = case.arrays()["has_seed"] | case.arrays()["greedy"]
        np.testing.assert_array_equal(a[1][seeded], b[1][seeded], err_msg="seeded rows depend on the sampler seed")
        # A sampler's second call draws from call counter 1 for rows without a seed.
        sampler = Sampler(backend=backend.name, seed=s1)
        backend.run(case, sampler=sampler)
        second = backend.run(case, sampler=sampler)
        np.testing.assert_array_equal(second[1], case.reference(sampler_seed=s1, call=1)[1])

    check()


# --- invalid rows ------------------------------------------------------------------------------------


def test_invalid_rows_raise_on_cpu(backend):
    """A row with NaN, +inf or nothing finite raises on CPU backends, naming the first bad row."""

    @backend.settings(15)
    @given(drawn=sst.invalid_cases(max_rows=backend.max_rows, max_vocab=min(backend.max_vocab, 64)))
    def check(drawn):
        case, bad = drawn
        # None: the backend's default, which raises on CPU (a GPU flags by default, see below).
        for check_logits in ([] if backend.gpu else [None]) + [True]:
            with pytest.raises(InvalidLogitsError, match=f"row {bad[0]}\\b"):
                backend.run(case, check_logits=check_logits)

    check()


def test_invalid_rows_flagged(backend):
    """check_logits=False flags bad rows (token -1, NaN log-probability); other rows are untouched."""

    @backend.settings(15)
    @given(drawn=sst.invalid_cases(max_rows=backend.max_rows, max_vocab=min(backend.max_vocab, 64)), seed=seeds)
    def check(drawn, seed):
        case, bad = drawn
        lp, tokens, top_ids, top_lp = backend.run(case, seed=seed, check_logits=False, num_logprobs=1)
        if backend.gpu:  # flagging is also the default on a GPU (no device sync)
            assert_identical(backend.run(case, seed=seed, num_logprobs=1), (lp, tokens, top_ids, top_lp), "default")
        assert (tokens[bad] == -1).all() and np.isnan(lp[bad]).all()
        assert (top_ids[bad] == -1).all() and np.isnan(top_lp[bad]).all()
        good = np.setdiff1d(np.arange(case.rows), bad)
        if good.size:
            # The reference on the same batch with the bad rows made harmless keeps every row index.
            x = case.logits32
            x[bad] = 0.0
            ref = sst.Case(sst.as_dtype(x, case.dtype), case.dtype, case.param, case.data).reference(
                sampler_seed=seed, num_logprobs=1)
            np.testing.assert_array_equal(tokens[good], ref[1][good])
            np.testing.assert_allclose(lp[good], ref[0][good], rtol=RTOL, atol=ATOL)

    check()


# --- properties -----------------------------------------------------------------------------------------


def _full_logprobs(backend, case, mode):
    """[B, V] log-probabilities in ``mode`` (top-n with n = V, put back in id order); ``backend``
    None: the reference's."""
    if backend is None:
        lp, tokens, ids, top = case.reference(logprobs_mode=mode, num_logprobs=case.vocab)
    else:
        lp, tokens, ids, top = backend.run(case, mode=mode, num_logprobs=case.vocab)
    out = np.empty(ids.shape, np.float64)
    np.put_along_axis(out, ids, top, axis=1)
    return out


def _with(case, param=None, data=None):
    """``case`` with its parameter / history keyword arguments replaced."""
    param = case.param if param is None else param
    return sst.Case(case.logits, case.dtype, param, case.data if data is None else data)


def test_positive_penalty_never_raises_a_seen_token(backend):
    """With repetition >= 1 and frequency, presence >= 0, no seen token gains on an unseen one."""
    small = dict(max_rows=min(backend.max_rows, 4), max_vocab=min(backend.max_vocab, 40), realistic=False)
    per_row = lambda lo, hi: st.floats(lo, hi, width=32)  # noqa: E731

    @backend.settings(25)
    @given(
        case=backend.cases(fields=("temperature",), required=("temperature",), history=sst.HISTORY_FIELDS, **small),
        data=st.data(),
    )
    def check(case, data):
        rows, vocab = case.rows, case.vocab
        def draw(lo, hi):
            return np.array(data.draw(st.lists(per_row(lo, hi), min_size=rows, max_size=rows)), np.float32)

        pen = {
            "repetition_penalty": draw(1.0, 4.0),
            "frequency_penalty": draw(0.0, 2.0),
            "presence_penalty": draw(0.0, 2.0),
        }
        penalised = _with(case, {**case.param, **pen})
        seen = np.zeros((rows, vocab), bool)
        for ids in case.data.values():
            for i, row in enumerate(np.asarray(ids, np.int64)):
                seen[i, row[(row >= 0) & (row < vocab)]] = True

        before = _full_logprobs(backend, case, "processed")
        after = _full_logprobs(backend, penalised, "processed")
        for i in range(rows):
            finite = np.isfinite(before[i])
            s, u = seen[i] & finite, ~seen[i] & finite
            if s.any() and u.any():
                # A seen token's log-probability gap to every unseen token may only shrink.
                gain = (after[i, s][:, None] - after[i, u][None, :]) - (before[i, s][:, None] - before[i, u][None, :])
                assert gain.max() <= 1e-5 * (1 + np.abs(before[i, finite]).max()), (i, gain.max())

        # Greedy: an unseen argmax is never overtaken by a seen token.
        greedy = np.zeros(rows, bool)
        plain = backend.run(_with(case, {"do_sample": greedy}))[1]
        pen_greedy = backend.run(_with(case, {**pen, "do_sample": greedy}))[1]
        stays = ~seen[np.arange(rows), plain]
        np.testing.assert_array_equal(
            pen_greedy[stays], plain[stays], err_msg="an unseen argmax lost to a seen token"
        )

    check()


def test_neutral_penalties_are_the_identity(backend):
    """repetition 1, frequency 0 and presence 0 with histories change nothing (processed == raw at T = 1)."""

    @backend.settings(20)
    @given(
        case=backend.cases(fields=("seed", "top_k", "top_p", "min_p"), required=("seed",), history=sst.HISTORY_FIELDS),
        seed=seeds,
    )
    def check(case, seed):
        rows = case.rows
        neutral = {
            "repetition_penalty": np.ones(rows),
            "frequency_penalty": np.zeros(rows),
            "presence_penalty": np.zeros(rows),
        }
        with_pen = _with(case, {**case.param, **neutral})
        for mode in MODES:
            plain = backend.run(case, seed=seed, mode=mode)
            assert_identical(backend.run(with_pen, seed=seed, mode=mode), plain, mode)
        # Repetition 1.0 is the identity even without output_ids: dropping all_input_ids changes nothing.
        rep_only = {k: v for k, v in case.data.items() if k != "all_input_ids"}
        a = _with(case, {**case.param, "repetition_penalty": np.ones(rows)})
        b = _with(case, data=rep_only)
        assert_identical(backend.run(a, seed=seed), backend.run(b, seed=seed), "repetition 1.0")
        # With neutral penalties and T = 1, "processed" is the reference's "raw" (to the usual tolerance:
        # the two modes may round differently on a backend, so they need not be bitwise equal).
        raw = _full_logprobs(None, sst.Case(case.logits, case.dtype, {"seed": case.param["seed"]}), "raw")
        np.testing.assert_allclose(_full_logprobs(backend, with_pen, "processed"), raw, rtol=RTOL, atol=ATOL,
                                   err_msg="processed != raw with neutral penalties and T = 1")

    check()


def test_top_k_vocab_and_top_p_one_change_nothing(backend):
    """top_k in {V, V+1, 0, -1}, top_p = 1 and min_p = 0 give the untruncated result, bitwise."""

    @backend.settings(20)
    @given(case=backend.cases(fields=("temperature", "seed", "do_sample", "repetition_penalty"), required=("seed",)),
           seed=seeds, data=st.data())
    def check(case, seed, data):
        v, rows = case.vocab, case.rows
        off = {
            "top_k": np.array(data.draw(st.lists(st.sampled_from([v, v + 1, 0, -1]), min_size=rows, max_size=rows))),
            "top_p": np.ones(rows, np.float32),
            "min_p": np.zeros(rows, np.float32),
        }
        truncated_off = _with(case, {**case.param, **off})
        for mode in MODES:
            assert_identical(
                backend.run(truncated_off, seed=seed, mode=mode, num_logprobs=min(2, v)),
                backend.run(case, seed=seed, mode=mode, num_logprobs=min(2, v)),
                mode,
            )

    check()


def test_outputs_stay_in_the_framework(backend):
    """Results are the logits' framework tensors, int64 ids in [0, V), float32 log-probabilities."""
    case = sst.Case(np.array([[0.0, 3.0, 1.0], [2.0, -np.inf, 2.0]], np.float32))
    lp, tokens, _, _ = backend.run(case)  # run() asserts framework, dtypes and shapes
    assert tokens.tolist() == [1, 0]
    np.testing.assert_allclose(lp, case.reference()[0], rtol=RTOL, atol=ATOL)
