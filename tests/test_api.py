"""The public API's contract: shapes, dtypes, defaults, greedy rules and every bad-input error."""

from __future__ import annotations

import numpy as np
import pytest

from sampling import InvalidLogitsError, Sampler, SamplingData, SamplingInputError, SamplingParam, stream
from sampling import backends

torch = pytest.importorskip("torch", reason="the torch extra is part of the test set-up")

LOGITS = np.array([[0.0, 2.0, 1.0, 2.0], [3.0, -1.0, 0.5, 0.0]], np.float32)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", [-0.1, 1.0], r"temperature\[0\] = -0.1 is invalid: must be >= 0"),
        ("temperature", [1.0, np.nan], r"temperature\[1\] = nan is not finite"),
        ("temperature", [1.0, 1e-50], r"temperature\[1\].*underflows float32"),
        ("top_p", [0.5, 0.0], r"top_p\[1\] = 0.0 is invalid: must be in \(0, 1\]"),
        ("top_p", [1.5, 0.5], r"top_p\[0\] = 1.5 is invalid"),
        ("top_k", [-2, 5], r"top_k\[0\] = -2 is invalid: must be >= -1"),
        ("top_k", [1.5, 5], r"top_k\[0\] = 1.5 is invalid: must be an integer"),
        ("min_p", [0.1, 1.01], r"min_p\[1\] = 1.01 is invalid: must be in \[0, 1\]"),
        ("repetition_penalty", [1.0, 0.0], r"repetition_penalty\[1\] = 0.0 is invalid: must be > 0"),
        ("frequency_penalty", [np.inf, 0.0], r"frequency_penalty\[0\] = inf is not finite"),
        ("presence_penalty", [[0.0, 1.0]], r"presence_penalty must be a 1-D array"),
        ("seed", [-2, 1], r"seed\[0\] = -2 is invalid"),
        ("seed", [0.5, 1.0], r"seed must be an integer array"),
        ("do_sample", [0.5, 1.0], r"do_sample must be a bool array"),
    ],
)
def test_bad_parameters_name_field_and_row(field, value, message):
    with pytest.raises(SamplingInputError, match=message):
        SamplingParam.from_numpy(**{field: np.array(value)})


def test_parameter_lengths_must_agree():
    with pytest.raises(SamplingInputError, match=r"top_k has 3 rows, expected 2"):
        SamplingParam.from_numpy(temperature=np.ones(2), top_k=np.ones(3, int))


def test_bad_parameters_are_value_errors():
    with pytest.raises(ValueError):
        SamplingParam.from_numpy(temperature=np.array([-1.0]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(all_input_ids=np.array([1, 2])), r"all_input_ids must be a 2-D integer array"),
        (dict(output_ids=np.array([[1.0, 2.0]])), r"output_ids must be a 2-D integer array, got dtype float64"),
        (dict(all_input_ids=np.ones((2, 3), int), output_ids=np.ones((3, 3), int)), r"has 2 rows but output_ids has 3"),
        (dict(request_ids=np.array([[1]])), r"request_ids must be a 1-D integer array"),
        (dict(is_prefill="yes"), r"is_prefill must be a bool"),
    ],
)
def test_bad_data(kwargs, message):
    with pytest.raises(SamplingInputError, match=message):
        SamplingData.from_numpy(**kwargs)


def test_bad_logits_and_mismatched_batches():
    s = Sampler("numpy")
    with pytest.raises(SamplingInputError, match=r"logits must be 2-D"):
        s(np.zeros(4, np.float32))
    with pytest.raises(SamplingInputError, match=r"dtype must be one of"):
        s(np.zeros((1, 4), np.float64))
    with pytest.raises(SamplingInputError, match=r"param has 3 rows but logits have 2"):
        s(LOGITS, None, SamplingParam.from_numpy(temperature=np.ones(3)))
    with pytest.raises(SamplingInputError, match=r"data has 1 rows but logits have 2"):
        s(LOGITS, SamplingData.from_numpy(output_ids=np.ones((1, 2), int)))
    with pytest.raises(SamplingInputError, match=r"num_logprobs = 5 exceeds the vocabulary size 4"):
        Sampler("numpy", num_logprobs=5)(LOGITS)
    with pytest.raises(SamplingInputError, match=r"unknown backend 'cupy'"):
        Sampler("cupy")
    with pytest.raises(SamplingInputError, match=r"logprobs_mode"):
        Sampler(logprobs_mode="final")
    with pytest.raises(SamplingInputError, match=r"cannot take logits"):
        Sampler("torch")(LOGITS)
    with pytest.raises(SamplingInputError, match=r"needs torch tensors"):
        Sampler("torch")(torch.from_numpy(LOGITS), None, SamplingParam.from_numpy(temperature=np.ones(2), to_tensor=lambda a: a))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_invalid_rows_raise_on_cpu_and_flag_when_asked(backend):
    conv = (lambda a: a) if backend == "numpy" else torch.from_numpy
    for poison in (np.nan, np.inf):
        x = LOGITS.copy()
        x[1, 2] = poison
        with pytest.raises(InvalidLogitsError, match="logits row 1"):
            Sampler(backend)(conv(x))
    x = np.full_like(LOGITS, -np.inf)
    x[0, 1] = 0
    with pytest.raises(InvalidLogitsError, match="logits row 1 .* no finite value"):
        Sampler(backend)(conv(x))
    if backend == "torch":
        x = LOGITS.copy()
        x[1, 2] = np.nan
        lp, tok = Sampler(backend, check_logits=False)(conv(x))
        assert tok.tolist() == [1, -1] and np.isnan(lp[1].item())


def test_temperature_overflow_is_an_invalid_row():
    x = np.array([[3e38, 0.0]], np.float32)
    with pytest.raises(InvalidLogitsError):
        Sampler("numpy")(x, None, SamplingParam.from_numpy(temperature=np.array([0.5])))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_result_types(backend):
    conv = (lambda a: a) if backend == "numpy" else torch.from_numpy
    out = Sampler(backend, num_logprobs=2)(conv(LOGITS))
    logprobs, tokens = out
    assert out.logprobs is logprobs and out.next_tokens is tokens
    assert type(tokens) is type(conv(LOGITS))
    assert str(tokens.dtype).endswith("int64") and str(logprobs.dtype).endswith("float32")
    assert tuple(tokens.shape) == (2,) and tuple(out.top_ids.shape) == (2, 2)
    assert tokens.tolist() == [1, 0]  # lowest id on the exact tie in row 0
    assert Sampler(backend).sample(conv(LOGITS)).tolist() == [1, 0]


def test_auto_backend_follows_the_logits():
    assert backends.detect(LOGITS) == "numpy"
    assert backends.detect(torch.zeros(1, 2)) == "torch"
    with pytest.raises(SamplingInputError, match="must be a numpy array, torch.Tensor or mindspore.Tensor"):
        backends.detect([[0.0, 1.0]])


def test_greedy_rules():
    s = Sampler("numpy", seed=0)
    flat = np.zeros((3, 50), np.float32)
    flat[:, 7] = 0.5  # a sampling row would often pick something else
    greedy = SamplingParam.from_numpy(temperature=np.array([0.0, 1.0, 1.0]), do_sample=np.array([True, False, True]))
    tokens = [s(flat, None, greedy)[1] for _ in range(20)]
    assert all(t[0] == 7 and t[1] == 7 for t in tokens)
    assert len({int(t[2]) for t in tokens}) > 1
    assert s(flat)[1].tolist() == [7, 7, 7]  # param None: greedy


def test_do_sample_none_samples_unless_temperature_zero():
    p = SamplingParam.from_numpy(temperature=np.array([0.7, 0.0]))
    assert p.arrays["greedy"].tolist() == [False, True]
    assert SamplingParam.from_numpy(top_k=np.array([5])).arrays["greedy"].tolist() == [False]


def test_logits_are_not_modified():
    x = (np.random.default_rng(0).standard_normal((2, 30)) * 3).astype(np.float32)
    data = SamplingData.from_numpy(all_input_ids=np.array([[1, 2, 3]] * 2), output_ids=np.array([[2, 3]] * 2))
    param = SamplingParam.from_numpy(repetition_penalty=np.array([1.5, 2.0]), frequency_penalty=np.array([1.0, 1.0]), temperature=np.array([0.5, 2.0]))
    for backend, conv in (("numpy", np.array), ("torch", torch.tensor)):
        t = conv(x.copy())
        Sampler(backend)(t, data, param)
        np.testing.assert_array_equal(np.asarray(t), x)


def test_unseeded_rows_follow_the_sampler_seed():
    x = np.zeros((4, 1000), np.float32)
    param = SamplingParam.from_numpy(temperature=np.ones(4))
    a = [Sampler("numpy", seed=5)(x, None, param)[1].tolist() for _ in range(2)]
    assert a[0] == a[1]
    s = Sampler("numpy", seed=5)
    first, second = s(x, None, param)[1], s(x, None, param)[1]
    assert first.tolist() != second.tolist()  # the stream advances between calls
    assert Sampler("numpy", seed=6)(x, None, param)[1].tolist() != first.tolist()


def test_seeded_rows_ignore_batch_position_and_sampler_seed():
    x = (np.random.default_rng(1).standard_normal((3, 500)) * 2).astype(np.float32)
    seeds = np.array([11, 2**63 - 1, 2**32 + 1])
    full = Sampler("numpy", seed=1)(x, None, SamplingParam.from_numpy(seed=seeds))[1]
    perm = [2, 0, 1]
    part = Sampler("numpy", seed=2)(x[perm], None, SamplingParam.from_numpy(seed=seeds[perm]))[1]
    assert part.tolist() == full[perm].tolist()


def test_stream_known_answers():
    """Pin the stream's definition: a change here changes every seeded draw for every user."""
    keys = stream.row_keys(np.array([0, 1, 0xFFFFFFFF]), np.array([0, 0, 0x7FFFFFFF]), np.array([0, 5, 2**32 + 3]))
    bits = stream.token_bits(keys[:, None], np.array([[0, 1, 151935]]))
    u = stream.uniforms(bits)
    assert keys.tolist() == [int(k) for k in keys]  # ints in [0, 2**32)
    assert ((0 <= keys) & (keys < 2**32)).all() and ((0 < u) & (u < 1)).all()
    assert (u == u.astype(np.float32)).all()  # exact in float32
    expected = EXPECTED_BITS
    assert bits.tolist() == expected


def test_mix32_is_a_bijection_on_a_sample():
    x = np.arange(0, 2**32, 4099, dtype=np.int64)
    assert len(np.unique(stream.mix32(x))) == len(x)


def test_uint64_and_large_seeds_split_into_words():
    p = SamplingParam.from_numpy(seed=np.array([2**64 - 1, 2**63 + 5], np.uint64))
    assert p.arrays["seed_lo"].tolist() == [2**32 - 1, 5]
    assert p.arrays["seed_hi"].tolist() == [2**32 - 1, 2**31]


EXPECTED_BITS = [
    [987973740, 1020822949, 1187004069],
    [2428000598, 1196158278, 4105714064],
    [3605832962, 342973508, 2587008142],
]


def _mix32_uint32(x):
    """An independent form of the finaliser in wrapping uint32 arithmetic (what Triton computes)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(stream.MUL1)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(stream.MUL2)
        return x ^ (x >> np.uint32(15))


def test_int64_masked_arithmetic_equals_uint32_wrapping():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, size=100_000, dtype=np.int64)
    t = rng.integers(0, 2**31, size=100_000, dtype=np.int64)
    with np.errstate(over="ignore"):
        want = _mix32_uint32(x.astype(np.uint32) ^ (t.astype(np.uint32) * np.uint32(stream.GOLDEN)))
    np.testing.assert_array_equal(stream.token_bits(x, t), want.astype(np.int64))
