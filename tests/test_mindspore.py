"""MindSpore-specific tests: the stream's integer hash in int64 ops, tensor plumbing, the windows.

The shared property suite runs the MindSpore backend against the numpy reference like every other
backend; this file covers what only this backend has: its own implementation of the stream hash
(checked word for word on edge seeds), ``to_tensor=mindspore.Tensor``, MindSpore dtypes, and the
CPU fast paths (window hashing, top-p window widening, the float32-sum validity check), each
checked against the reference and checked to have actually run.
"""

from __future__ import annotations

import os

# MindSpore's C++ logging (glog) reads GLOG_v at import: 3 = errors only.
os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402

ms = pytest.importorskip("mindspore", reason="the MindSpore backend needs the [mindspore] extra")

from sampling import InvalidLogitsError, Sampler, SamplingData, SamplingInputError, SamplingParam, stream  # noqa: E402
from sampling.backends import mindspore_backend as mb  # noqa: E402
from sampling.kernels import reference  # noqa: E402
from sampling.step import Step  # noqa: E402
from sampling.testing import strategies as sst  # noqa: E402

#: Seeds on either side of every word boundary the int64 hash could get wrong.
EDGE_SEEDS = np.array(
    [0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 2, 2**63 - 1,
     2**63, 2**63 + 1, 2**64 - 2, 2**64 - 1],
    dtype=np.uint64,
)
EDGE_WORDS = np.array([0, 1, 2**15, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1], np.int64)


def T(a) -> "ms.Tensor":
    return ms.Tensor(np.ascontiguousarray(a))


def rows_of(logits, **param):
    """Run numpy and MindSpore on the same inputs; returns both outputs (MindSpore's as numpy)."""
    data = param.pop("data", None)
    kw = dict(seed=param.pop("sampler_seed", 7), logprobs_mode=param.pop("mode", "sampling"),
              num_logprobs=param.pop("num_logprobs", 0))
    p = SamplingParam.from_numpy(**param) if param else None
    d = SamplingData.from_numpy(**data) if data else None
    ref = Sampler(backend="numpy", **kw)(logits.astype(np.float32), d, p)
    got = Sampler(backend="mindspore", **kw)(T(logits), d, p)
    as_np = [x.asnumpy() if x is not None else None for x in (got[0], got[1], got.top_ids, got.top_logprobs)]
    return (ref[0], ref[1], ref.top_ids, ref.top_logprobs), as_np


def assert_same(ref, got):
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-7)
    if ref[2] is not None:
        np.testing.assert_array_equal(got[2], ref[2])
        np.testing.assert_allclose(got[3], ref[3], rtol=1e-5, atol=1e-7)


# --- the stream's integer hash ------------------------------------------------------------------


def test_mix32_matches_the_stream_on_edge_and_random_words():
    words = np.concatenate([EDGE_WORDS, np.random.default_rng(0).integers(0, 2**32, 20000)])
    np.testing.assert_array_equal(mb.mix32(T(words)).asnumpy(), stream.mix32(words))


@pytest.mark.parametrize("sampler_seed", [0, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1])
@pytest.mark.parametrize("call", [0, 2**32 + 3])
def test_row_keys_match_the_stream_near_word_boundaries(sampler_seed, call):
    """Seeded rows (every edge seed, positions near 2**31, 2**32, 2**62) and unseeded rows."""
    seeds = np.concatenate([EDGE_SEEDS, EDGE_SEEDS])
    rows = len(seeds)
    has = np.arange(rows) % 3 != 2
    host = SamplingParam.from_numpy(seed=seeds, temperature=np.ones(rows))
    arrays = dict(host.arrays, has_seed=has)
    host = SamplingParam(rows=rows, arrays=arrays, given=host.given)
    pos = np.resize(np.array([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, 2**62], np.int64), rows)
    for given in (True, False):
        step = Step(logits=T(np.zeros((rows, 4), np.float32)), params={k: T(v) for k, v in arrays.items()},
                    host=host, positions=T(pos) if given else None, sampler_seed=sampler_seed, call=call)
        expected = reference.row_keys(arrays, pos if given else np.zeros(rows, np.int64), sampler_seed, call)
        np.testing.assert_array_equal(mb.row_keys(step).asnumpy(), expected)


def test_uniforms_are_bit_identical_and_gumbel_within_rounding_of_log():
    words_lo_hi_pos = ([0, 2**31, 2**32 - 1], [0, 2**31 - 1, 2**32 - 1], [0, 9, 2**32 - 1])
    keys = stream.row_keys(*(np.array(w, np.int64) for w in words_lo_hi_pos))
    vocab = 151936
    bits = stream.token_bits(keys[:, None], np.arange(vocab, dtype=np.int64)[None, :])
    words = mb._TILE(mb.token_words(vocab)[None, :], (3, 1))
    u = mb.uniforms(T(keys), words, 3, vocab).asnumpy()
    np.testing.assert_array_equal(u, stream.uniforms(bits))
    # numpy may use its own SIMD log (1 ulp from the C library's), so the Gumbel values may
    # differ in the last bit; the integer stream above may not.
    g = mb.gumbel_scores(T(np.zeros((3, vocab))), T(keys), words, 3, vocab).asnumpy()
    np.testing.assert_allclose(g, stream.gumbel(bits), rtol=0, atol=1e-14)


def test_edge_seeds_draw_the_numpy_tokens_at_full_vocabulary():
    rng = np.random.default_rng(3)
    rows, vocab = len(EDGE_SEEDS), 151936
    logits = (rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
    # Output ids move each row's stream position (positions near 2**32: test_row_keys_...).
    out = np.where(rng.random((rows, 5)) < 0.6, rng.integers(0, vocab, (rows, 5)), -1)
    ref, got = rows_of(logits, seed=EDGE_SEEDS, temperature=np.full(rows, 0.9), data=dict(output_ids=out))
    assert_same(ref, got)
    # int64 seeds (the signed form of the same values up to 2**63 - 1) give the same tokens.
    signed = EDGE_SEEDS[EDGE_SEEDS < 2**63].astype(np.int64)
    ref2, got2 = rows_of(logits[: len(signed)], seed=signed, temperature=np.full(len(signed), 0.9),
                         data=dict(output_ids=out[: len(signed)]))
    assert_same(ref2, got2)
    np.testing.assert_array_equal(got2[1], got[1][: len(signed)])


# --- tensors in and out -------------------------------------------------------------------------


def test_to_tensor_mindspore_tensor_in_both_constructors_and_output_types():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 300)).astype(np.float32)
    kwargs = dict(temperature=np.array([0.7, 0.0, 1.3]), top_k=np.array([20, -1, 0]),
                  repetition_penalty=np.array([1.2, 1.0, 0.8]), seed=np.array([5, -1, 2**40]))
    hist = dict(all_input_ids=np.array([[1, 2, 3, -1], [4, 4, 300, -1], [7, 8, 9, 10]]),
                output_ids=np.array([[3, -1], [4, 300], [10, 9]]))
    p = SamplingParam.from_numpy(**kwargs, to_tensor=ms.Tensor)
    d = SamplingData.from_numpy(**hist, to_tensor=ms.Tensor)
    assert all(isinstance(v, ms.Tensor) for v in p.tensors.values())
    out = Sampler(seed=2, num_logprobs=4)(T(logits), d, p)
    lp, tokens = out
    for x, dtype in ((tokens, ms.int64), (lp, ms.float32), (out.top_ids, ms.int64), (out.top_logprobs, ms.float32)):
        assert isinstance(x, ms.Tensor) and x.dtype == dtype
    assert tuple(out.top_ids.shape) == (3, 4)
    ref = Sampler(backend="numpy", seed=2, num_logprobs=4)(
        logits, SamplingData.from_numpy(**hist), SamplingParam.from_numpy(**kwargs))
    np.testing.assert_array_equal(tokens.asnumpy(), ref[1])
    np.testing.assert_allclose(lp.asnumpy(), ref[0], rtol=1e-5)
    np.testing.assert_array_equal(out.top_ids.asnumpy(), ref.top_ids)


@pytest.mark.parametrize("to_tensor", [np.asarray, lambda a: a.tolist()], ids=["numpy", "list"])
def test_to_tensor_of_another_framework_is_a_clear_error(to_tensor):
    logits = T(np.zeros((2, 5), np.float32))
    with pytest.raises(SamplingInputError, match="mindspore.Tensor"):
        param = SamplingParam.from_numpy(temperature=np.ones(2), to_tensor=to_tensor)
        Sampler(backend="mindspore")(logits, None, param)
    with pytest.raises(SamplingInputError, match="mindspore.Tensor"):
        data = SamplingData.from_numpy(output_ids=np.zeros((2, 1), np.int64), to_tensor=to_tensor)
        Sampler(backend="mindspore")(logits, data, None)


def test_auto_picks_mindspore_and_numpy_logits_are_refused():
    x = np.array([[0.0, 2.0, 1.0]], np.float32)
    assert Sampler().sample(T(x)).asnumpy().tolist() == [1]
    with pytest.raises(SamplingInputError, match="mindspore backend cannot take"):
        Sampler(backend="mindspore")(x)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits(dtype):
    rng = np.random.default_rng(2)
    values = (rng.standard_normal((4, 1000)) * 3).astype(np.float32)
    values = sst.round_to_bfloat16(values) if dtype == "bfloat16" else values.astype(np.float16).astype(np.float32)
    # bfloat16: the CPU kernels cannot compare or reduce bfloat16, so the backend widens first.
    logits = T(values).astype(ms.bfloat16) if dtype == "bfloat16" else T(values.astype(np.float16))
    assert mb.MindSporeBackend().dtype_name(logits) == dtype
    param = SamplingParam.from_numpy(temperature=np.array([0.0, 0.8, 1.0, 1.2]), top_p=np.array([1, 0.9, 0.5, 1]),
                                     seed=np.arange(4))
    lp, tokens = Sampler(seed=1)(logits, None, param)
    ref = Sampler(backend="numpy", seed=1)(values, None, param)
    np.testing.assert_array_equal(tokens.asnumpy(), ref[1])
    np.testing.assert_allclose(lp.asnumpy(), ref[0], rtol=1e-5)


# --- invalid rows -------------------------------------------------------------------------------


def _invalid_batch():
    x = np.random.default_rng(4).standard_normal((5, 64)).astype(np.float32)
    x[1, 3] = np.nan
    x[2, 9] = np.inf
    x[3] = -np.inf
    return x


def test_invalid_rows_raise_on_the_cpu_naming_the_first_row():
    with pytest.raises(InvalidLogitsError, match="row 1"):
        Sampler(backend="mindspore")(T(_invalid_batch()))
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    x[2, 0] = 3e38  # finite, but / 0.5 overflows to +inf
    with pytest.raises(InvalidLogitsError, match="row 2"):
        Sampler(backend="mindspore")(T(x), None, SamplingParam.from_numpy(temperature=np.array([1.0, 1.0, 0.5])))


def test_finite_rows_whose_float32_sum_overflows_are_valid():
    # The fast check sums rows in float32; a sum that overflows must fall back to the exact test.
    x = np.full((2, 8), 3e38, np.float32)
    x[1, 5] = -np.inf
    x[0, 6] = 3.3e38
    ref, got = rows_of(x, temperature=np.ones(2), seed=np.array([1, 2]))
    assert_same(ref, got)


@pytest.mark.parametrize("mode", ["sampling", "processed", "raw"])
def test_check_logits_false_flags_invalid_rows(mode):
    x = _invalid_batch()
    out = Sampler(backend="mindspore", seed=3, check_logits=False, logprobs_mode=mode, num_logprobs=2)(
        T(x), None, SamplingParam.from_numpy(temperature=np.full(5, 0.8)))
    tokens, lp = out[1].asnumpy(), out[0].asnumpy()
    assert tokens[1:4].tolist() == [-1, -1, -1] and np.isnan(lp[1:4]).all()
    assert (out.top_ids.asnumpy()[1:4] == -1).all()
    ok = [0, 4]
    # Row indices feed the unseeded stream, so compare the valid rows through seeds instead.
    seeded = SamplingParam.from_numpy(temperature=np.full(5, 0.8), seed=np.arange(5))
    flagged = Sampler(backend="mindspore", check_logits=False, logprobs_mode=mode)(T(x), None, seeded)
    ref = Sampler(backend="numpy", logprobs_mode=mode)(
        x[ok], None, SamplingParam.from_numpy(temperature=np.full(2, 0.8), seed=np.array(ok)))
    np.testing.assert_array_equal(flagged[1].asnumpy()[ok], ref[1])
    np.testing.assert_allclose(flagged[0].asnumpy()[ok], ref[0], rtol=1e-5)


# --- penalties ----------------------------------------------------------------------------------


def test_penalties_with_padding_duplicates_and_garbage_ids():
    vocab = 50
    rng = np.random.default_rng(6)
    garbage = np.array([-1, vocab, vocab + 7, -(2**62), 2**62], np.int64)
    for trial in range(6):
        rows = 5
        logits = (rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
        logits[:, :3] = [0.0, 1.5, -1.5]  # zero, positive and negative values under the penalty
        hist = rng.integers(0, 6, (rows, 9))  # small ids: many duplicates
        hist = np.where(rng.random(hist.shape) < 0.3, rng.choice(garbage, hist.shape), hist)
        hist[0] = -1  # a row of padding only
        out = np.where(rng.random((rows, 6)) < 0.3, rng.choice(garbage, (rows, 6)), rng.integers(0, 6, (rows, 6)))
        out[1] = vocab
        param = dict(repetition_penalty=rng.uniform(0.5, 2.0, rows), frequency_penalty=rng.uniform(-1, 1, rows),
                     presence_penalty=rng.uniform(-1, 1, rows), temperature=np.where(np.arange(rows) % 2, 0.0, 0.9),
                     seed=np.arange(rows) + trial)
        # "processed" log-probabilities expose every penalised logit of the chosen token.
        ref, got = rows_of(logits, **param, data=dict(all_input_ids=hist, output_ids=out), mode="processed",
                           num_logprobs=vocab)
        assert_same(ref, got)


def test_frequency_counts_weight_each_entry():
    """``out_counts`` (the request cache's per-entry counts) weight the frequency penalty and the position."""
    rng = np.random.default_rng(7)
    rows, vocab = 4, 40
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    ids = np.array([[1, 2, 3, -1], [5, 5, 40, 6], [7, -1, -1, -1], [8, 9, 10, 11]], np.int64)
    counts = np.array([[3, 1, 0, 9], [2, 1, 5, 4], [1, 1, 1, 1], [0, 0, 0, 0]], np.int32)
    host = SamplingParam.from_numpy(frequency_penalty=np.array([0.5, -0.25, 1.0, 2.0]),
                                    presence_penalty=np.array([0.1, 0.2, 0.0, 1.0]),
                                    temperature=np.full(rows, 0.8), seed=np.arange(rows))
    be = mb.MindSporeBackend()
    step = Step(logits=T(logits), params={k: T(v) for k, v in host.arrays.items()}, host=host,
                out_ids=T(ids), out_counts=T(counts), logprobs_mode="processed", num_logprobs=vocab)
    got = [x.asnumpy() for x in be.run(step)]
    ref = reference.sample(logits, host.arrays, out_ids=ids, out_counts=counts, logprobs_mode="processed",
                           num_logprobs=vocab)
    assert_same(ref, got)


def test_empty_histories_are_position_zero():
    # MindSpore's CPU ReduceSum over an empty axis does not give 0; the backend must not rely on it.
    x = np.random.default_rng(12).standard_normal((2, 30)).astype(np.float32)
    empty = np.zeros((2, 0), np.int64)
    for data in (dict(output_ids=empty), dict(all_input_ids=empty, output_ids=empty)):
        ref, got = rows_of(x, seed=np.array([0, 2**40]), repetition_penalty=np.full(2, 1.3),
                           frequency_penalty=np.full(2, 0.5), data=data)
        assert_same(ref, got)


# --- windows and fast paths ---------------------------------------------------------------------


@pytest.fixture
def hashed_widths(monkeypatch):
    """The widths the Gumbel hash ran over, call by call."""
    widths = []
    real = mb.gumbel_scores

    def spy(z64, keys, words, rows, width):
        widths.append(width)
        return real(z64, keys, words, rows, width)

    monkeypatch.setattr(mb, "gumbel_scores", spy)
    return widths


@pytest.fixture
def topk_widths(monkeypatch):
    widths = []
    real = mb._TOPK

    def spy(x, k):
        widths.append(int(k))
        return real(x, k)

    monkeypatch.setattr(mb, "_TOPK", spy)
    return widths


def test_no_vocabulary_sort_without_truncation(topk_widths, hashed_widths):
    # rows without truncation choose in two levels: one hash per block of 4 ids, then the 4 ids
    # of the chosen block; nothing per token of the vocabulary
    x = np.random.default_rng(8).standard_normal((3, 2000)).astype(np.float32)
    ref, got = rows_of(x, temperature=np.array([0.5, 1.0, 0.0]), seed=np.arange(3))
    assert_same(ref, got)
    assert topk_widths == [] and hashed_widths == [500, 4]


def test_top_k_hashes_only_its_window(topk_widths, hashed_widths):
    x = np.random.default_rng(9).standard_normal((4, 2000)).astype(np.float32)
    ref, got = rows_of(x, top_k=np.array([5, 50, 1, 7]), min_p=np.array([0, 0.2, 0, 0.1]), seed=np.arange(4))
    assert_same(ref, got)
    assert topk_widths == [51] and hashed_widths == [51]


def test_top_k_ties_past_the_window_fall_back_to_the_full_hash(topk_widths, hashed_widths):
    x = np.zeros((2, 2000), np.float32)
    x[:, :4] = [5, 4, 3, 2]  # k = 6: the 6th value is 0, tied with 1996 tokens
    for seed in range(3):
        ref, got = rows_of(x, top_k=np.array([6, 6]), seed=np.array([seed, seed + 10]))
        assert_same(ref, got)
    assert hashed_widths == [2000] * 3
    # With top-p on top: the tied survivors beyond the window enter the total mass, no widening.
    topk_widths.clear()
    for p in (0.5, 0.9, 0.999):
        ref, got = rows_of(x, top_k=np.array([6, 6]), top_p=np.array([p, 1.0]), seed=np.array([1, 2]),
                           mode="processed", num_logprobs=8)
        assert_same(ref, got)
    assert topk_widths == [7, 8, 8] * 3  # the top-k window, then top-n's two topk


def test_top_p_without_top_k_widens_its_window(monkeypatch, topk_widths, hashed_widths):
    monkeypatch.setattr(mb, "TOP_P_WINDOW", 16)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 4000)).astype(np.float32)
    x[0] *= 0.01  # nearly flat: the nucleus needs thousands of tokens
    x[1] *= 40.0  # peaked: a few tokens
    ref, got = rows_of(x, top_p=np.array([0.9, 0.9, 0.3]), seed=np.arange(3))
    assert_same(ref, got)
    assert topk_widths == [16, 128, 1024, 4000]
    assert hashed_widths == [4000]  # the window ended up as the whole row
    topk_widths.clear()
    hashed_widths.clear()
    ref, got = rows_of(np.stack([x[1], x[1] * 0.5]), top_p=np.array([0.9, 0.3]), seed=np.arange(2))
    assert_same(ref, got)
    assert topk_widths == [16] and hashed_widths == [16]


@pytest.mark.parametrize("mode", ["sampling", "processed", "raw"])
def test_top_n_ties_lowest_id_first(mode):
    x = np.random.default_rng(11).choice(np.array([0.0, 1.0, 2.0, -np.inf], np.float32), (4, 300))
    ref, got = rows_of(x, temperature=np.array([0.0, 1.0, 0.7, 1.0]), top_k=np.array([0, 3, 40, 0]),
                       repetition_penalty=np.array([1.0, 1.3, 1.0, 0.9]), seed=np.arange(4),
                       data=dict(all_input_ids=np.tile(np.arange(10), (4, 1))), mode=mode, num_logprobs=12)
    assert_same(ref, got)


@given(sst.cases(max_rows=4, max_vocab=300))
@settings(max_examples=15)
def test_matches_the_reference_with_a_tiny_top_p_window(case):
    """Every window path, widened from 2 tokens, on drawn inputs (shapes that hit the edges)."""
    old = mb.TOP_P_WINDOW
    mb.TOP_P_WINDOW = 2
    try:
        for mode, n in (("sampling", 3), ("raw", 0)):
            if n > case.vocab:
                n = case.vocab
            ref = case.reference(sampler_seed=11, logprobs_mode=mode, num_logprobs=n)
            x = T(case.logits32)
            if case.dtype == "float16":
                x = T(np.asarray(case.logits))
            elif case.dtype == "bfloat16":
                x = x.astype(ms.bfloat16)
            out = Sampler(backend="mindspore", seed=11, logprobs_mode=mode, num_logprobs=n)(
                x, case.sampling_data(), case.sampling_param())
            got = (out[0].asnumpy(), out[1].asnumpy(),
                   None if out.top_ids is None else out.top_ids.asnumpy(),
                   None if out.top_logprobs is None else out.top_logprobs.asnumpy())
            assert_same(ref, got)
    finally:
        mb.TOP_P_WINDOW = old
