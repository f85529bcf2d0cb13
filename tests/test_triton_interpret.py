"""The Triton backend on the CPU, under Triton's interpreter (TRITON_INTERPRET=1).

Small shapes and a small kernel configuration (tiles of 32, 64 candidate slots), so that every
code path of :mod:`sampling.kernels.triton.pipeline` runs: plain single-pass sampling, the
candidate path (top-k / top-p / min-p), the radix fallback (top-p without top-k, overflowing
candidate lists), penalties, all logprobs modes and top-n, all logits dtypes, invalid rows.
Each case is compared with :mod:`sampling.kernels.reference`.
"""

from __future__ import annotations

import os

# The kernels are interpreted only if this is set before their module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses
import importlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from sampling import InvalidLogitsError, Sampler, SamplingData, SamplingParam  # noqa: E402
from sampling import stream  # noqa: E402
from sampling.kernels import reference  # noqa: E402
from sampling.kernels.triton import pipeline as K  # noqa: E402
from sampling.kernels.triton import stream as ts  # noqa: E402
from sampling.step import Step  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="TRITON_INTERPRET is set to something other than 1"
)


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    """Re-import the kernel modules if something imported them before the interpreter was on."""
    from sampling.kernels.triton import launch, pipeline, stream as tstream

    if not type(pipeline._scan_kernel).__name__.startswith("Interpreted"):
        for mod in (tstream, pipeline, launch):
            importlib.reload(mod)
    yield


def _launch():
    from sampling.kernels.triton import launch

    return launch


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_both(x, param, data=None, *, dtype="float32", mode="sampling", n=0, seed=11, check=True):
    """Our result and the reference's for the same inputs (logits rounded to ``dtype`` first)."""
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(DTYPES[dtype])
    xr = xt.float().numpy()
    ours = Sampler(backend="triton", seed=seed, logprobs_mode=mode, num_logprobs=n, check_logits=check)(xt, data, param)
    ref = reference.sample(
        xr,
        (param or SamplingParam.all_greedy(x.shape[0])).arrays,
        rep_ids=None if data is None else data.all_input_ids,
        out_ids=None if data is None else data.output_ids,
        sampler_seed=seed,
        call=0,
        logprobs_mode=mode,
        num_logprobs=n,
    )
    return ours, ref


def assert_same(ours, ref, n=0):
    np.testing.assert_array_equal(ours[1].numpy(), ref[1])
    np.testing.assert_allclose(ours[0].numpy(), ref[0], rtol=1e-5, atol=1e-6)
    if n:
        np.testing.assert_array_equal(ours.top_ids.numpy(), ref[2])
        np.testing.assert_allclose(ours.top_logprobs.numpy(), ref[3], rtol=1e-5, atol=1e-6)


def logits(rows, vocab, scale=3.0, seed=0, ties=False):
    x = (np.random.default_rng(seed).standard_normal((rows, vocab)) * scale).astype(np.float32)
    return np.round(x) if ties else x


# ----------------------------------------------------------------------------- stream


@triton.jit
def _stream_probe(out_ptr, g_ptr, lo, hi, pos, N: tl.constexpr):
    t = tl.arange(0, N)
    key = ts.row_key(lo.to(tl.uint32), hi.to(tl.uint32), pos.to(tl.uint32))
    tl.store(out_ptr + t, ts.token_bits(key, t.to(tl.uint32)).to(tl.int64))
    free = ts.unseeded_key(lo.to(tl.uint32), hi.to(tl.uint32), pos.to(tl.uint32), t.to(tl.uint32))
    tl.store(out_ptr + N + t, free.to(tl.int64))
    tl.store(g_ptr + t, ts.gumbel64(key, t))
    tl.store(g_ptr + N + t, K._gumbel(key, t, False).to(tl.float64))


@triton.jit
def _y_threshold_probe(th_ptr, t_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    th = tl.load(th_ptr + i)
    t = tl.load(t_ptr + i)
    tl.store(out_ptr + i, K._y_threshold(th, t, t, False))


def test_y_threshold_is_the_exact_preimage():
    # The scan selects candidates by y >= yth instead of y / T >= theta: yth must be the
    # smallest float32 whose correctly rounded quotient reaches theta, for every theta and T.
    rng = np.random.default_rng(7)
    n = 512
    th = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(np.float32)
    th[:8] = [0.0, -0.0, np.inf, -np.inf, 1e-38, -1e-38, 3e38, -3e38]
    T = np.exp(rng.uniform(np.log(0.05), np.log(20.0), n)).astype(np.float32)
    T[:8] = [0.7, 1.3, 0.7, 0.7, 0.25, 3.0, 0.5, 2.0]
    out = torch.zeros(n, dtype=torch.float32)
    _y_threshold_probe[(1,)](torch.from_numpy(th), torch.from_numpy(T), out, N=n)
    y = out.numpy()
    with np.errstate(over="ignore"):
        assert (y / T >= th).all()
        below = np.nextafter(y, np.float32(-np.inf))
        fin = np.isfinite(th) & (y > -np.inf)
        assert (below[fin] / T[fin] < th[fin]).all()
    np.testing.assert_array_equal(y[2:4], [np.inf, -np.inf])


@triton.jit
def _key_search_probe(k_ptr, v_ptr, out_ptr, j, band, N: tl.constexpr, NC: tl.constexpr, GAP: tl.constexpr):
    i = tl.arange(0, N)
    keys = tl.load(k_ptr + i)
    valid = tl.load(v_ptr + i) != 0
    lo = tl.min(tl.where(valid, keys, 2147483647)).to(tl.int64)
    hi = tl.max(tl.where(valid, keys, -2147483648)).to(tl.int64)
    tl.store(out_ptr, K._key_search(keys, valid, j, band, lo, hi, NC, GAP))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    n=st.sampled_from([64, 512]),
    nc=st.sampled_from([1, 2, 3]),
    spread=st.sampled_from([3, 1000, 2**31]),
    grid=st.sampled_from([1, 1 << 16]),
    gap=st.sampled_from([0, 8, 1 << 15]),
    data=st.data(),
)
def test_key_search_lands_in_the_band(n, nc, spread, grid, gap, data):
    # the pivot's and the finish's search: at least j valid keys at or above the result, and
    # at most band of them unless the result is the j-th largest key itself (ties); keys on a
    # grid (as 2-byte logits' are) with the bounds snapped to them (gap) or not
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    lo = -(spread // 2)
    keys = rng.integers(lo, lo + spread, n, dtype=np.int64) * grid
    keys = keys.clip(-2**31 + 1, 2**31 - 1).astype(np.int32)
    if data.draw(st.booleans()):
        keys[rng.integers(0, n, 3)] = [-2**31 + 1, 2**31 - 1, 0]
    valid = rng.random(n) < data.draw(st.sampled_from([0.1, 0.9, 1.0]))
    valid[0] = True
    desc = np.sort(keys[valid])[::-1]
    j = data.draw(st.integers(1, len(desc)))
    band = j + data.draw(st.sampled_from([0, 1, j // 4 + 2]))
    out = torch.zeros(1, dtype=torch.int32)
    _key_search_probe[(1,)](torch.from_numpy(keys), torch.from_numpy(valid.astype(np.int32)), out, j, band, N=n, NC=nc,
                            GAP=gap)
    t = int(out[0])
    count = int((desc >= t).sum())
    assert count >= j
    assert count <= band or t == desc[j - 1]


@pytest.mark.parametrize("vocab,sample,j0", [(8000, 1024, 8), (200, 256, 2)])
def test_pivot_counts_land_in_the_band(vocab, sample, j0, monkeypatch):
    # T = 1, no penalties: theta is a cut between sampled values. A spread sample (V > sampled values)
    # selects among its runs' maxima (runs of 8), a whole-row sample among all values.
    launch = _launch()
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    k = np.array([1, 5, 10, 20])
    x = logits(4, vocab, seed=vocab)
    param = SamplingParam.from_numpy(top_k=k, seed=np.array([1, 2, 3, 4]))
    with launch.use_config(sample=sample, pivot_j0=j0, cap=512, emit_depth=32):
        ours, ref = run_both(x, param)
    assert_same(ours, ref)
    np.testing.assert_array_equal(debug["status"].numpy(), [0, 0, 0, 0])
    theta = debug["theta"].numpy()
    for b in range(4):
        if vocab > sample:
            runs = sample // 8
            starts = np.arange(runs) * vocab // runs
            pool = x[b][starts[:, None] + np.arange(8)].max(axis=1)
            j = -(-k[b] * sample // vocab) + j0
            assert 4 * j <= runs  # (the run path)
        else:
            pool = x[b]
            j = k[b] + j0
        count = int((pool >= theta[b]).sum())
        assert j <= count <= j + j // 4 + 2, (b, j, count)


def test_stream_matches_numpy_bit_for_bit():
    lo, hi, pos = 0xFEDCBA98, 0x0BADF00D, 12345
    out = torch.zeros(1024, dtype=torch.int64)
    g = torch.zeros(1024, dtype=torch.float64)
    _stream_probe[(1,)](out, g, lo, hi, pos, N=512)
    key = stream.row_keys(np.int64(lo), np.int64(hi), np.int64(pos))
    bits = stream.token_bits(np.full((1, 1), key), np.arange(512)[None])[0]
    np.testing.assert_array_equal(out[:512].numpy(), bits)
    np.testing.assert_array_equal(out[512:].numpy(), stream.unseeded_keys((hi << 32) | lo, pos, np.arange(512)))
    ref = stream.gumbel(bits)
    np.testing.assert_allclose(g[:512].numpy(), ref, rtol=1e-13)
    # the plain pass's float32 Gumbel values: within ~1e-6 absolute everywhere, including the
    # largest values (u near 1), which decide the winners (the reason near-ties may differ)
    np.testing.assert_allclose(g[512:].numpy(), ref, rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------- code paths

#: V = 200 <= 256 sampled values: the pivot is the exact (k + J0)-th largest value.
WHOLE = dict(sample=256)

# name: (param kwargs, config overrides, expected row status after the call:
#        0 = finished by the plain pass or the candidate path, 2 = finished by the fallback)
PATHS = {
    "plain": (dict(temperature=[0.7, 1.0, 1.3, 0.5]), {}, [0, 0, 0, 0]),
    "greedy": (dict(temperature=[0.0, 0.0, 0.7, 0.0]), {}, [0, 0, 0, 0]),
    "top_k": (dict(top_k=[1, 3, 10, 16], temperature=[0.8, 1.0, 1.0, 2.0]), WHOLE, [0, 0, 0, 0]),
    "top_k_top_p": (dict(top_k=[5, 12, 20, 3], top_p=[0.9, 0.5, 0.99, 0.3]), WHOLE, [0, 0, 0, 0]),
    "top_k_min_p": (dict(top_k=[10, 4, 60, 2], min_p=[0.1, 0.0, 0.3, 0.01]), WHOLE, [0, 0, 0, 0]),
    # min-p's pivot (sample max + log min_p) is a proven bound: never a fallback
    "min_p": (dict(min_p=[0.05, 0.5, 0.0, 1.0], temperature=[1.0, 0.5, 1.0, 1.0]), {}, [0, 0, 0, 0]),
    # top-p without top-k: candidates from a sampled guess of the nucleus, verified by their mass
    # against the row's (the scan's log-sum-exp); a nucleus wider than the guess (p = 0.999)
    # takes the radix fallback
    "top_p_min_p": (dict(top_p=[0.8, 0.95, 0.5, 1.0], min_p=[0.05, 0.1, 0.0, 0.2]), {}, [0, 0, 0, 0]),
    "top_p": (dict(top_p=[0.9, 0.3, 0.999, 0.05]), {}, [0, 0, 2, 0]),
    # a pivot from 64 of the 200 values (runs of 8), verified by the count of candidates
    "sampled_pivot": (dict(top_k=[1, 3, 10, 16], top_p=[1.0, 0.9, 0.8, 1.0]), {}, [0, 0, 0, 0]),
    # a rank far below k (its band, j + j/4 + 2, ends below k): the pivot lands above the k-th
    # value and the finish catches it
    "pivot_above_kth": (dict(top_k=[6, 9, 12, 15]), dict(WHOLE, pivot_j0=-8), [2, 2, 2, 2]),
    # more candidates expected than slots: no emission, straight to the fallback
    "k_beyond_slots": (dict(top_k=[30, 25, 20, 28], top_p=[0.9, 1.0, 0.7, 0.95]), dict(WHOLE, cap=16), [2, 2, 2, 2]),
    # more candidates found than slots (flat rows, a low min-p cut)
    "row_overflow": (dict(min_p=[0.01, 0.02, 0.05, 0.01], temperature=[9.0, 9.0, 9.0, 9.0]), dict(cap=16), [2, 2, 2, 2]),
    # a tile position of a work item finds more candidates than its private slots
    "item_overflow": (dict(top_k=[40, 45, 50, 60]), dict(WHOLE, emit_depth=1), [2, 2, 2, 2]),
    # one chunk per row
    "one_chunk": (dict(top_k=[8, 5, 3, 1], top_p=[1.0, 0.9, 1.0, 0.5]), dict(WHOLE, programs_per_sm=1), [0, 0, 0, 0]),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_code_path_matches_reference(path, monkeypatch):
    kw, cfg, expected = PATHS[path]
    launch = _launch()
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    x = logits(4, 200, seed=len(path))
    param = SamplingParam.from_numpy(seed=np.array([1, 2, -1, 3]), **{k: np.array(v) for k, v in kw.items()})
    with launch.use_config(**cfg):
        ours, ref = run_both(x, param)
    assert_same(ours, ref)
    np.testing.assert_array_equal(debug["status"].numpy(), expected)


# One launch for small batches (pipeline._small_kernel; here its three phases as launches). With
# the interpreter's Config and 4 "SMs", V = 200 gives 7 chunks per row at B = 1, 4 at B = 2:
# the pivot (the k-th largest chunk max) needs k <= that.
SMALL_CASES = {
    "top_k": (dict(top_k=[5], temperature=[0.7]), {}, [0]),
    "k_is_chunks": (dict(top_k=[7], top_p=[0.8], temperature=[1.3]), {}, [0]),
    "two_rows": (dict(top_k=[4, 2], top_p=[0.9, 1.0], min_p=[0.0, 0.1], temperature=[0.5, 1.0]), {}, [0, 0]),
    "unseeded": (dict(top_k=[3, 4], top_p=[0.7, 0.95]), {}, [0, 0]),
    # more candidates than slots: the finish's exact fallback, in the same program
    "overflow": (dict(top_k=[6], temperature=[9.0]), dict(cap=4), [2]),
}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("case", sorted(SMALL_CASES))
def test_one_launch_path_matches_reference_and_pipeline(case, ties, monkeypatch):
    kw, cfg, expected = SMALL_CASES[case]
    launch = _launch()
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    rows = len(expected)
    x = logits(rows, 200, seed=len(case), ties=ties)
    seeds = np.full(rows, -1) if case == "unseeded" else np.arange(rows) + 3
    param = SamplingParam.from_numpy(seed=seeds, **{k: np.array(v) for k, v in kw.items()})
    with launch.use_config(**cfg):
        for mode in ("sampling", "processed"):
            ours, ref = run_both(x, param, mode=mode, n=3)
            assert debug["small"]
            assert_same(ours, ref, n=3)
            np.testing.assert_array_equal(debug["status"].numpy(), expected)
            with launch.use_config(small_rows=0):
                pipe, _ = run_both(x, param, mode=mode, n=3)
            assert not debug["small"]
            assert torch.equal(ours[1], pipe[1]) and torch.equal(ours.top_ids, pipe.top_ids)
            if mode == "sampling":  # (the survivors' sums are exact; the row's depend on the chunks)
                assert torch.equal(ours[0], pipe[0]) and torch.equal(ours.top_logprobs, pipe.top_logprobs)


def test_one_launch_path_only_where_it_applies(monkeypatch):
    # k above the chunks per row, a row without top-k, penalties, or too many rows: the pipeline
    launch = _launch()
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    x = logits(3, 200, seed=2)
    hist = SamplingData.from_numpy(all_input_ids=np.array([[1, 2, 3]]), output_ids=np.array([[2, 3]]))
    for rows, kw, data, small in [
        (1, dict(top_k=[7]), None, True),
        (1, dict(top_k=[8]), None, False),
        (2, dict(top_k=[4, 5]), None, False),
        (2, dict(top_k=[4, 0], top_p=[1.0, 0.9]), None, False),
        (2, dict(top_k=[4, 3], temperature=[0.0, 1.0]), None, False),
        (1, dict(top_k=[3], repetition_penalty=[1.2]), hist, False),
        (3, dict(top_k=[2, 2, 2]), None, False),
    ]:
        param = SamplingParam.from_numpy(seed=np.arange(rows) + 1, **{k: np.array(v) for k, v in kw.items()})
        ours, ref = run_both(x[:rows], param, data)
        assert debug["small"] == small, (rows, kw)
        assert_same(ours, ref)
    with launch.use_config(small_rows=3):
        param = SamplingParam.from_numpy(top_k=np.array([2, 2, 2]), seed=np.array([1, 2, 3]))
        assert_same(*run_both(x, param))
        assert debug["small"]


def test_one_launch_path_advances_the_call_counter_once_per_call(monkeypatch):
    launch = _launch()
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    x = logits(2, 200, seed=9)
    param = SamplingParam.from_numpy(top_k=np.array([4, 3]), top_p=np.array([0.9, 1.0]))
    s = Sampler(backend="triton", seed=2024)
    for call in range(3):
        ours = s(torch.from_numpy(x), None, param)
        assert debug["small"]
        np.testing.assert_array_equal(ours[1].numpy(), reference.sample(x, param.arrays, sampler_seed=2024,
                                                                        call=call)[1])
        # the kernel empties what it used: on the GPU a key or flag left over would end the next
        # call's waits early (here its phases are launches, so only this check sees it)
        state = s._state["triton"]
        sync = next(v for k, v in state.items() if isinstance(k, tuple) and k[0] == "sync")
        ws = next(v for k, v in state.items() if isinstance(k, tuple) and k[0] == "ws")
        assert not sync.any() and not ws["ncand"].any()


def test_one_launch_path_flags_invalid_rows(monkeypatch):
    launch = _launch()
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    x = logits(2, 200, seed=12)
    param = SamplingParam.from_numpy(top_k=np.array([3, 4]), seed=np.array([1, 2]))
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        if bad == -np.inf:
            y[1, :] = bad
        else:
            y[1, 77] = bad
        out = Sampler(backend="triton", check_logits=False, num_logprobs=2)(torch.from_numpy(y), None, param)
        assert debug["small"]
        ref = reference.sample(y[:1], param.take(np.arange(1)).arrays, sampler_seed=0, call=0)
        assert out[1][0].item() == ref[1][0] and out[1][1].item() == -1 and np.isnan(out[0][1].item())
        assert (out.top_ids.numpy()[1] == -1).all()
        np.testing.assert_array_equal(debug["status"].numpy(), [0, 1])
        with pytest.raises(InvalidLogitsError, match="row 1"):
            Sampler(backend="triton", check_logits=True)(torch.from_numpy(y), None, param)


@pytest.mark.parametrize("regs,low,pairs", [(1, 1, 1), (1, 1, 256), (256, 1, 1), (256, 256, 256), (256, 16, 256)])
def test_finish_register_and_chunked_paths(regs, low, pairs, monkeypatch):
    # candidates held in registers (arrays of finish_regs or of finish_regs_low slots) or read
    # in chunks; top-p by comparing all pairs of top-k survivors or by bisection: the same
    # results, all on the candidate path (status 0)
    launch = _launch()
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    x = logits(4, 200, seed=21, ties=True)
    param = SamplingParam.from_numpy(top_k=np.array([3, 40, 0, 17]), top_p=np.array([0.7, 0.95, 1.0, 0.5]),
                                     min_p=np.array([0.0, 0.0, 0.02, 0.01]), seed=np.array([4, 5, 6, 7]))
    with launch.use_config(sample=256, finish_regs=regs, finish_regs_low=low, finish_pairs=pairs, cap=256):
        ours, ref = run_both(x, param, n=2)
    assert_same(ours, ref, n=2)
    np.testing.assert_array_equal(debug["status"].numpy(), [0, 0, 0, 0])


@pytest.mark.parametrize("ties", [False, True])
def test_ties_at_every_boundary(ties):
    # Integer-valued logits: many exact ties at the k-th value, inside the top-p crossing group
    # and at the argmax; ties at the boundary are kept and exact argmax ties go to the lowest id.
    x = logits(4, 150, scale=2.0, seed=3, ties=ties)
    x[0, :10] = x[0].max()  # ten-way tie for the top
    param = SamplingParam.from_numpy(
        top_k=np.array([3, 7, 0, 12]), top_p=np.array([0.6, 1.0, 0.8, 0.9]),
        temperature=np.array([0.0, 1.0, 1.0, 0.5]), seed=np.array([5, 6, 7, 8]),
    )
    ours, ref = run_both(x, param, n=4)
    assert_same(ours, ref, n=4)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("mode", ["sampling", "processed", "raw"])
def test_dtypes_modes_and_top_n(dtype, mode):
    x = logits(3, 120, seed=7)
    param = SamplingParam.from_numpy(
        temperature=np.array([0.7, 0.0, 1.2]), top_k=np.array([5, 0, 0]), top_p=np.array([0.9, 1.0, 1.0]),
        seed=np.array([1, -1, 2]),
    )
    ours, ref = run_both(x, param, dtype=dtype, mode=mode, n=3)
    assert_same(ours, ref, n=3)


def test_half_precision_batches_with_many_rows_per_sm_take_their_own_scan_grid(monkeypatch):
    # 2-byte logits with more than 3 rows per SM (4 "SMs" off the GPU) run the scan on
    # programs_per_sm_2byte programs per SM (launch.Config); float32 and that grid turned off
    # keep programs_per_sm. Every grid gives the reference's results.
    grids = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            grids.append(grid[0])
            return self.fn[grid]

    monkeypatch.setattr(K, "_scan_kernel", Recorder(K._scan_kernel))
    rows = 16
    x = logits(rows, 150, seed=12)
    rng = np.random.default_rng(12)
    param = SamplingParam.from_numpy(
        temperature=rng.choice([0.0, 0.7, 1.0], rows), top_k=rng.choice([0, 5, 40], rows),
        top_p=rng.choice([1.0, 0.9], rows), min_p=rng.choice([0.0, 0.05], rows), seed=np.arange(rows) + 1,
    )
    for dtype, cfg, grid in [("bfloat16", {}, 12), ("float16", {}, 12), ("float32", {}, 8),
                             ("bfloat16", {"programs_per_sm_2byte": 0}, 8)]:
        with _launch().use_config(**cfg):
            ours, ref = run_both(x, param, dtype=dtype, n=2)
        assert_same(ours, ref, n=2)
        assert grids[-1] == grid, (dtype, cfg, grids)


def test_top_n_beyond_survivors_lists_lowest_ids_at_minus_inf():
    x = logits(2, 64, seed=9)
    param = SamplingParam.from_numpy(top_k=np.array([2, 3]), seed=np.array([1, 2]))
    ours, ref = run_both(x, param, n=6)
    assert_same(ours, ref, n=6)
    assert np.isneginf(ours.top_logprobs.numpy()[:, 3:]).all()


@pytest.mark.parametrize("two_level", [False, True])
def test_penalties_with_padding_garbage_and_counts(two_level):
    # With ``two_level``, row 1 chooses in two levels: its scan chunks read the penalised values
    # of its tokens, which the other rows' chunks mask (and the penalised-token items take).
    rows, vocab = 3, 96
    rng = np.random.default_rng(4)
    x = logits(rows, vocab, seed=4)
    big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    rep = rng.integers(0, vocab, (rows, 40))
    rep[:, -6:] = [-1, vocab, big, small, 2**31, -(2**31)]
    out = rng.integers(0, vocab, (rows, 12))
    out[:, -3:] = [-1, vocab, big]
    out[1, :6] = 7  # one token six times: the frequency penalty scales with the count
    data = SamplingData.from_numpy(all_input_ids=rep, output_ids=out)
    param = SamplingParam.from_numpy(
        repetition_penalty=np.array([1.3, 0.7, 1.0]), frequency_penalty=np.array([0.4, -0.3, 0.0]),
        presence_penalty=np.array([0.2, 0.5, -1.0]), temperature=np.array([0.9, 1.0, 0.0]),
        top_k=np.array([20, 0, 0]), top_p=np.array([1.0, 1.0 if two_level else 0.9, 1.0]), seed=np.array([3, 4, 5]),
    )
    for mode in ("sampling", "processed", "raw"):
        # n = V: every token's processed value is in the top-n lists
        ours, ref = run_both(x, param, data, mode=mode, n=vocab)
        assert_same(ours, ref, n=vocab)


@pytest.mark.parametrize("programs_per_sm", [2, 128])
def test_penalised_tokens_decide_the_row_from_their_own_chunk(programs_per_sm):
    # The scan masks penalised tokens in its chunks and adds them as one more chunk
    # (pipeline._pen_chunk). Here they hold the row's top values (a mild penalty keeps them
    # there), so the max, the log-sum-exp, the greedy / Gumbel winner and most candidates come
    # from that chunk; row 5 penalises every token (each scan chunk fully masked), row 6 has
    # its only high value on an unpenalised token next to penalised ones.
    rows, vocab = 7, 150
    rng = np.random.default_rng(21)
    x = logits(rows, vocab, seed=21)
    hot = rng.choice(vocab, (rows, 12), replace=True)
    for b in range(rows):
        x[b, hot[b]] += 9.0
    hot[6] = np.arange(40, 52)
    x[6, 39] = 30.0
    rep = np.full((rows, vocab), -1)
    rep[:, :32] = np.concatenate([hot, rng.integers(0, vocab, (rows, 20))], axis=1)
    rep[5] = np.arange(vocab)
    out = hot[:, :5].copy()
    data = SamplingData.from_numpy(all_input_ids=rep, output_ids=out)
    param = SamplingParam.from_numpy(
        repetition_penalty=np.full(rows, 1.05), frequency_penalty=np.full(rows, 0.05),
        presence_penalty=np.full(rows, 0.02), temperature=np.array([0.0, 0.8, 0.8, 0.8, 0.8, 0.8, 0.9]),
        top_k=np.array([0, 0, 6, 0, 0, 4, 3]), top_p=np.array([1.0, 1.0, 1.0, 0.8, 1.0, 0.9, 1.0]),
        min_p=np.array([0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0]), seed=np.arange(rows) + 3,
    )
    # 2 programs per SM: one item per row takes all of its table's slots (a loop of tiles);
    # 128: four items per row split them (the launch's choice at small batches), one empty
    with _launch().use_config(programs_per_sm=programs_per_sm):
        for mode in ("sampling", "processed", "raw"):
            ours, ref = run_both(x, param, data, mode=mode, n=3)
            assert_same(ours, ref, n=3)
    # the winners are penalised tokens in rows 0-4 and the unpenalised 39 in row 6
    tok = ours[1].numpy()
    assert all(tok[b] in set(hot[b].tolist()) for b in range(5)) and tok[6] == 39
    # a NaN on a penalised token (masked in the scan) still makes its row invalid
    x[1, hot[1, 0]] = np.nan
    out_nan = Sampler(backend="triton", check_logits=False)(torch.from_numpy(x), data, param)
    assert out_nan[1].numpy()[1] == -1 and np.isnan(out_nan[0].numpy()[1])
    assert (out_nan[1].numpy()[[0, 2, 3, 4, 5, 6]] >= 0).all()


def test_truncated_rows_whose_raw_maxima_are_penalised(monkeypatch):
    # Every row truncates, and the raw maxima are penalised tokens that the penalties bring far
    # down: a raw value among the candidates or a raw row max would change the token (row 0:
    # the raw 20 would win) or the min-p cut (row 1). Row 2's raw 3e38 / T overflows but its
    # penalised value does not: the row is valid and that token wins. Row 3 penalises every
    # token. (A scan that reads penalised tokens unmasked must get all of these right:
    # bench/NOTES.md v26; this test failed on five mutations of that experiment.)
    launch = _launch()
    rows, vocab = 5, 150
    rng = np.random.default_rng(31)
    x = logits(rows, vocab, seed=31)
    hot = rng.choice(vocab, (rows, 6), replace=False)
    x[np.arange(rows)[:, None], hot] = 20.0
    x[2, hot[2, 0]] = 3e38
    rep = np.full((rows, vocab), -1)
    rep[:, :6] = hot
    rep[3] = np.arange(vocab)
    out = hot[:, :3].copy()
    data = SamplingData.from_numpy(all_input_ids=rep, output_ids=out)
    param = SamplingParam.from_numpy(
        repetition_penalty=np.full(rows, 4.0), frequency_penalty=np.full(rows, 0.5),
        presence_penalty=np.full(rows, 1.0), temperature=np.array([0.8, 1.0, 0.5, 0.9, 1.2]),
        top_k=np.array([5, 0, 3, 4, 8]), top_p=np.array([1.0, 1.0, 0.8, 0.9, 0.95]),
        min_p=np.array([0.0, 0.3, 0.0, 0.0, 0.05]), seed=np.arange(rows) + 7,
    )
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    ours, ref = run_both(x, param, data, n=4)
    assert_same(ours, ref, n=4)
    # lists longer than the finish's low register tier
    with launch.use_config(finish_regs_low=4):
        long, _ = run_both(x, param, data, n=4)
    assert (debug["ncand"].numpy() > 4).all()
    assert_same(long, ref, n=4)
    tok = ours[1].numpy()
    # without top-n the finish applies the penalties to the raw candidates (CAND): row 2's
    # raw flag sends it through the exact pass, row 3 has no candidate left
    for low in (16, 4):
        with launch.use_config(finish_regs_low=low):
            cand, ref0 = run_both(x, param, data)
        assert debug["cand"] and debug["status"].numpy()[3] == 2
        assert_same(cand, ref0)
        np.testing.assert_array_equal(cand[1].numpy(), tok)
    assert tok[2] == hot[2, 0] and all(tok[b] not in set(hot[b].tolist()) for b in (0, 1, 4))
    # "processed" log-probabilities (the row sums) choose the same tokens
    processed, _ = run_both(x, param, data, mode="processed")
    np.testing.assert_array_equal(processed[1].numpy(), tok)
    # more candidates than slots: the fallback
    flat = logits(rows, vocab, scale=0.3, seed=32)
    flat[np.arange(rows)[:, None], hot] = 20.0
    with launch.use_config(cap=16):
        ours, ref = run_both(flat, param, data)
    assert debug["cand"] and (debug["status"].numpy() == 2).any()
    assert_same(ours, ref)
    # a NaN on a penalised token makes its row invalid
    x[1, hot[1, 1]] = np.nan
    bad = Sampler(backend="triton", check_logits=False)(torch.from_numpy(x), data, param)
    assert bad[1].numpy()[1] == -1 and np.isnan(bad[0].numpy()[1])
    assert (bad[1].numpy()[[0, 2, 3, 4]] >= 0).all()


@pytest.mark.parametrize("cached", [False, True])
def test_penalties_on_the_candidates_match_the_masked_scan(monkeypatch, cached):
    # Every row truncates, no row sums, penalties that only lower values: the prep builds the
    # bitmask alone, the scan reads the raw logits, and the finish penalises the candidates
    # (pipeline._cand_penalties), comparing them with the history or, past cand_compares,
    # from the whole table built in the finish. The histories hold each row's raw favourites,
    # so many candidates are penalised. Same bits as the masked scan (cand = 0), and the
    # reference's tokens, over two decode steps of the request cache when ``cached``.
    launch = _launch()
    rows, vocab = 6, 300
    rng = np.random.default_rng(44)
    arrays = dict(
        repetition_penalty=np.array([1.0, 1.5, 3.0, 1.2, 1.5, 1.1]),
        frequency_penalty=np.array([0.5, 0.0, 1.0, 0.2, 0.0, 3.0]),
        presence_penalty=np.array([0.0, 0.4, 1.0, 0.0, 0.5, 0.1]),
        temperature=np.array([0.7, 1.0, 1.3, 0.5, 0.9, 1.0]),
        top_k=np.array([5, 20, 0, 40, 12, 12]), top_p=np.array([1.0, 0.9, 1.0, 0.8, 1.0, 0.95]),
        min_p=np.array([0.0, 0.0, 0.1, 0.05, 0.0, 0.02]), seed=np.arange(rows) + 3,
    )
    param = SamplingParam.from_numpy(**arrays)
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    rids = np.arange(rows) + 70
    samplers = {c: Sampler(backend="triton", seed=5) for c in ("cand", "masked", "table")}
    configs = {"cand": {}, "masked": {"cand": 0}, "table": {"cand_compares": 1}}
    x = logits(rows, vocab, seed=60)
    fav = np.argsort(-x, 1)[:, :40]
    prompt = rng.integers(-2, vocab + 2, (rows, 40))
    prompt[:, :4] = fav[:, :4]
    # row 4: its 40 favourites penalised, so fewer than k candidates stay above the raw
    # pivot: the row must take the fallback, not the survivors among the candidates
    prompt[4] = fav[4]
    out = rng.integers(0, vocab, (rows, 12))
    out[:, :3] = fav[:, 2:5]
    for step in range(2):
        hist = np.concatenate([prompt, out], 1)
        kw = dict(request_ids=rids, is_prefill=step == 0) if cached else {}
        data = SamplingData.from_numpy(all_input_ids=hist, output_ids=out, **kw)
        got = {}
        for c, s in samplers.items():
            with launch.use_config(**configs[c]):
                got[c] = s(torch.from_numpy(x), data, param)
            assert debug["cand"] == (c != "masked")
        ref = reference.sample(x, param.arrays, rep_ids=hist, out_ids=out, sampler_seed=5, call=step)
        assert_same(got["cand"], ref)
        assert debug["status"].numpy()[4] == 2
        for c in ("masked", "table"):
            for g, w in zip(got[c], got["cand"]):
                assert torch.equal(g, w), (c, step)
        # the next step: the sampled tokens join the history, the favourites barely move
        out = np.concatenate([out, got["cand"][1].numpy()[:, None]], 1)
        x = x + logits(rows, vocab, scale=0.1, seed=61)
    # raw log-probabilities take the same path
    data = SamplingData.from_numpy(all_input_ids=np.concatenate([prompt, out], 1), output_ids=out)
    ours, ref = run_both(x, param, data, mode="raw")
    assert debug["cand"]
    assert_same(ours, ref)
    # a penalty that raises values (repetition < 1) keeps the masked scan
    up = SamplingParam.from_numpy(**{**arrays, "repetition_penalty": np.full(rows, 0.8)})
    ours, ref = run_both(x, up, data)
    assert not debug["cand"]
    assert_same(ours, ref)


def test_cache_decode_with_several_new_tokens_matches_the_stateless_path():
    # A decode step whose output_ids bring three new tokens per row: the cache adds the first
    # two itself and hands the last to the prep as a column of its [B, 3] tensor, a strided
    # view (read as if contiguous, each row got another row's token).
    rows, vocab = 4, 120
    rng = np.random.default_rng(83)
    x = torch.from_numpy(logits(rows, vocab, seed=83))
    param = SamplingParam.from_numpy(frequency_penalty=np.array([0.5, 1.0, 2.0, 0.3]), top_k=np.full(rows, 8),
                                     seed=np.arange(rows) + 2)
    prompt, out = rng.integers(0, vocab, (rows, 20)), rng.integers(0, vocab, (rows, 4))
    new = np.argsort(-x.numpy(), 1)[:, :3]  # (the rows' favourites: their penalties decide)
    rids = np.arange(rows) + 5
    cached = Sampler(backend="triton", seed=1)
    cached(x, SamplingData.from_numpy(all_input_ids=np.concatenate([prompt, out], 1), output_ids=out, request_ids=rids,
                                      is_prefill=True), param)
    out = np.concatenate([out, new], 1)
    got = cached(x, SamplingData.from_numpy(output_ids=out, request_ids=rids, is_prefill=False), param)
    want = Sampler(backend="triton", seed=1)(x, SamplingData.from_numpy(all_input_ids=np.concatenate([prompt, out], 1),
                                                                        output_ids=out), param)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_strided_parameter_tensors_are_read_per_row():
    # Per-row parameter tensors that are views with a stride (here what a user's to_tensor
    # returned: a column of a [B, 2] tensor) are read row by row, as contiguous ones are.
    rows, vocab = 4, 64
    x = torch.from_numpy(logits(rows, vocab, seed=84))
    arrays = dict(temperature=np.array([0.5, 1.0, 2.0, 0.7]), top_k=np.array([5, 10, 3, 8]),
                  frequency_penalty=np.array([0.5, 0.0, 1.0, 0.2]), seed=np.arange(rows) + 1)
    view = lambda a: torch.from_numpy(np.ascontiguousarray(np.stack([a, a[::-1]], 1)))[:, 0]  # noqa: E731
    strided = SamplingParam.from_numpy(**arrays, to_tensor=view)
    assert strided.tensors["temperature"].stride() == (2,)
    data = SamplingData.from_numpy(output_ids=np.array([[1, 2], [3, 3], [5, -1], [7, 8]]))
    got = Sampler(backend="triton", seed=1)(x, data, strided)
    want = Sampler(backend="triton", seed=1)(x, data, SamplingParam.from_numpy(**arrays))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_cached_candidate_penalties_over_every_kind_of_decode_step(monkeypatch):
    # The candidate path from the request cache's table (the prep's bitmask and word prefix of
    # the table, the finish's lookups) after each kind of table change. Each step adds the
    # rows' raw favourites, so an id lost from the table or the bitmask would leave its penalty
    # out: decode steps whose pending token the prep adds (given, or the one sampled before),
    # several tokens at once (the cache adds all but the last itself), and a reordered batch
    # (a new table) all match the stateless path bit for bit, and the reference.
    launch = _launch()
    rows, vocab = 4, 300
    rng = np.random.default_rng(81)
    arrays = dict(
        repetition_penalty=np.array([1.5, 1.2, 2.0, 1.1]), frequency_penalty=np.array([0.5, 1.0, 0.0, 2.0]),
        presence_penalty=np.array([0.5, 0.0, 1.0, 0.3]), temperature=np.array([0.8, 1.0, 1.2, 0.6]),
        top_k=np.array([10, 20, 5, 30]), top_p=np.array([0.9, 1.0, 0.8, 1.0]), seed=np.arange(rows) + 1,
    )
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    rids = np.arange(rows) + 10
    cached, stateless = Sampler(backend="triton", seed=7), Sampler(backend="triton", seed=7)
    x = logits(rows, vocab, seed=80)
    fav = np.argsort(-x, 1)
    prompt = rng.integers(0, vocab, (rows, 30))
    out = rng.integers(0, vocab, (rows, 5))
    order = np.arange(rows)
    last = None
    steps = ["prefill", "given", "sampled", "several", "reordered", "given"]
    for step, kind in enumerate(steps):
        if kind == "sampled":
            out = np.concatenate([out, last[:, None]], 1)
        elif kind == "several":
            out = np.concatenate([out, fav[:, 1:4]], 1)
        elif kind != "prefill":
            out = np.concatenate([out, fav[:, step : step + 1]], 1)
        if kind == "reordered":
            order = np.array([2, 0, 3, 1])
        hist = np.concatenate([prompt, out], 1)[order]
        param = SamplingParam.from_numpy(**{k: v[order] for k, v in arrays.items()})
        full = SamplingData.from_numpy(all_input_ids=hist, output_ids=out[order])
        if kind == "prefill":
            data = SamplingData.from_numpy(all_input_ids=hist, output_ids=out[order], request_ids=rids[order],
                                           is_prefill=True)
        elif kind == "sampled":
            data = SamplingData.from_numpy(request_ids=rids[order], is_prefill=False)
        else:
            data = SamplingData.from_numpy(output_ids=out[order], request_ids=rids[order], is_prefill=False)
        xs = torch.from_numpy(x[order])
        got = cached(xs, data, param)
        assert debug["cand"], kind
        want = stateless(xs, full, param)
        ref = reference.sample(x[order], param.arrays, rep_ids=hist, out_ids=out[order], sampler_seed=7, call=step)
        for g, w in zip(got, want):
            assert torch.equal(g, w), kind
        assert_same(got, ref)
        last = np.empty(rows, np.int64)
        last[order] = got[1].numpy()
        x = x + logits(rows, vocab, scale=0.1, seed=82 + step)


def _table_insert(ids, flags, tok):
    """The cache's rule for one added token on a numpy table row (in place): a known id counts
    again, a new one goes in at its rank, a full row dropping its largest id."""
    rank = int(((ids >= 0) & (ids < tok)).sum())
    if rank < len(ids) and ids[rank] == tok:
        flags[rank] = (flags[rank] | 1) + 2
    elif rank < len(ids):
        ids[rank + 1:], flags[rank + 1:] = ids[rank:-1].copy(), flags[rank:-1].copy()
        ids[rank], flags[rank] = tok, 3


def test_table_bitmask_kept_across_calls_follows_every_insertion(monkeypatch):
    # With the cache's table on the candidate path the bitmask of each row's ids and the counts
    # of its groups of 256 ids are kept with the table across calls; each call adds the pending
    # tokens and keeps them (pipeline._table_add). Driven through launch.run with the table given
    # directly, so that a full row (which the cache only reaches in CUDA-graph replays) drops
    # its largest id. Every call: the table and positions as by the cache's rule, the kept
    # bitmask and counts equal to ones built afresh, the tokens and log-probabilities equal to
    # a call that builds them afresh, and to the reference over the same state. A call off the
    # candidate path (top-n) that adds a token drops them, and the next call builds them again.
    launch = _launch()
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    rows, vocab, R = 3, 1100, 48  # 35 words: 5 groups of 8 words (the last one short)
    words = -(-vocab // 32)
    G = -(-words // 8)
    rng = np.random.default_rng(90)
    ids = np.full((rows, R), -1, np.int64)
    flags = np.zeros((rows, R), np.int32)
    pool = np.setdiff1d(np.arange(1, vocab - 1), [256])
    for b, n in enumerate([40, 44, R]):  # (row 2 is full, and holds 256: the first id of a group)
        row = rng.choice(pool, n, replace=False)
        if b == 2:
            row[0] = 256
        ids[b, :n] = np.sort(row)
        flags[b, :n] = 2 * rng.integers(0, 3, n) + rng.integers(0, 2, n)
    pos = np.array([7, 0, 2**33], np.int64)
    steps = [  # the tokens added per call (-1: none)
        [0, 255, 1099],  # the front; the last of a group; larger than all of a full row: dropped
        [256, 511, 3],  # a group's first id; the full row drops its largest id
        [ids[0, 3], 512, ids[2, 20]],  # known ids; a group boundary
        [-1, ids[1, -1] + 1 if ids[1, 43] < vocab - 1 else 1, 1098],
        [700, 701, 699],  # (top-n: off the candidate path)
        [1099, 702, 0],
        [ids[0, 0], 5, 640],
    ]
    param = SamplingParam.from_numpy(
        repetition_penalty=np.array([1.3, 1.6, 1.1]), frequency_penalty=np.array([0.5, 1.0, 2.0]),
        presence_penalty=np.array([0.3, 0.0, 0.7]), temperature=np.array([0.8, 1.0, 1.2]),
        top_k=np.array([10, 20, 4]), top_p=np.array([0.95, 1.0, 0.9]), seed=np.array([4, 5, 6]),
    )
    # (a larger sample and list than the interpreter's default: every row on the candidate path,
    # whose finish looks its penalised candidates up in the kept bitmask)
    monkeypatch.setattr(launch, "_override", dataclasses.replace(launch.config(), cap=256, sample=256))
    tensors = {k: torch.from_numpy(v) for k, v in param.arrays.items()}
    t_ids, t_flags, t_pos = torch.from_numpy(ids.copy()), torch.from_numpy(flags.copy()), torch.from_numpy(pos.copy())
    aux = {}
    kept = None
    finished = 0
    for call, toks in enumerate(steps):
        x = logits(rows, vocab, seed=91 + call)
        # the rows' favourite tokens carry penalties: their lookups decide the rows' tokens
        x[np.arange(rows)[:, None], np.where(ids >= 0, ids, 0)[:, :12]] += 8.0
        topn = call == 4
        for b, t in enumerate(toks):
            if t >= 0:
                _table_insert(ids[b], flags[b], t)
                pos[b] += 1
        run = dict(logits=torch.from_numpy(x), params=tensors, host=param, sampler_seed=1, call=call,
                   raise_invalid=True, num_logprobs=3 if topn else 0)
        got = launch.run(Step(table_ids=t_ids, table_flags=t_flags, positions=t_pos,
                              table_new=torch.tensor(toks, dtype=torch.int64), table_aux=aux, **run))
        np.testing.assert_array_equal(t_ids.numpy(), ids)
        np.testing.assert_array_equal(t_flags.numpy(), flags)
        np.testing.assert_array_equal(t_pos.numpy(), pos)
        assert debug["cand"] == (not topn)
        if topn:
            assert "triton_aux" not in aux
            kept = None
            continue
        finished += int((debug["status"] == 0).sum())  # (rows the candidate path finished)
        if kept is not None:
            assert aux["triton_aux"] is kept  # (kept, not built again)
        kept = aux["triton_aux"]
        bits = np.zeros((rows, words), np.int64)
        counts = np.zeros((rows, G + 1), np.int64)
        for b in range(rows):
            row = ids[b][ids[b] >= 0]
            np.bitwise_or.at(bits[b], row >> 5, 1 << (row & 31))
            counts[b] = [(row < 256 * g).sum() for g in range(G)] + [len(row)]
        np.testing.assert_array_equal(kept[:, :words].numpy().astype(np.int64) & 0xFFFFFFFF, bits)
        np.testing.assert_array_equal(kept[:, words:].numpy(), counts)
        # the same state with the bitmask built afresh (no pending token; nowhere to keep it)
        fresh = launch.run(Step(table_ids=t_ids.clone(), table_flags=t_flags.clone(), positions=t_pos.clone(),
                                table_aux=None, **run))
        for g, w in zip(got[:2], fresh[:2]):
            assert torch.equal(g, w), call
        seen = np.where(flags & 1, ids, -1)
        ref = reference.sample(x, param.arrays, rep_ids=seen, out_ids=ids, out_counts=flags >> 1, pos=pos,
                               sampler_seed=1, call=call)
        assert_same(got, ref)
    assert finished >= 14  # of 18 (the others: too few candidates left above theta, the fallback)


@pytest.mark.parametrize("sample", [64, 256])
def test_prefetched_penalty_lookups_match_reference(sample):
    # the scan's pipelined bitmask / penalised-value loads (two and one tiles ahead) must see
    # the same penalties as the in-loop lookups, across tiles, chunks and a partial last tile
    rows, vocab = 3, 203
    rng = np.random.default_rng(9)
    x = logits(rows, vocab, seed=9)
    rep = rng.integers(-3, vocab + 3, (rows, 60))
    out = rng.integers(0, vocab, (rows, 25))
    out[:, -2:] = vocab - 1  # the last id of the partial last tile
    data = SamplingData.from_numpy(all_input_ids=rep, output_ids=out)
    param = SamplingParam.from_numpy(
        repetition_penalty=np.array([1.3, 0.7, 1.2]), frequency_penalty=np.array([0.4, -0.3, 0.1]),
        presence_penalty=np.array([0.2, 0.5, -1.0]), temperature=np.array([0.9, 1.0, 0.0]),
        top_k=np.array([20, 0, 0]), seed=np.array([3, 4, 5]),
    )
    # the pivot reads penalised values that the same prep program wrote just before
    with _launch().use_config(sample=sample):
        ours, ref = run_both(x, param, data, mode="processed", n=3)
    assert_same(ours, ref, n=3)


def test_penalties_use_out_counts_and_given_positions():
    from sampling.kernels.triton import launch

    rows, vocab = 2, 80
    x = torch.from_numpy(logits(rows, vocab, seed=5))
    out = np.array([[3, 9, 3, -1], [4, 4, 80, 5]])
    counts = np.array([[2, 1, 3, 7], [1, 5, 9, 0]])
    pos = np.array([17, 2**33 + 5])
    param = SamplingParam.from_numpy(
        frequency_penalty=np.array([0.5, 0.25]), presence_penalty=np.array([0.1, 0.0]),
        top_k=np.array([4, 0]), seed=np.array([9, 10]),
    )
    step = Step(
        logits=x, params={k: torch.from_numpy(v) for k, v in param.arrays.items()}, host=param,
        out_ids=torch.from_numpy(out), out_counts=torch.from_numpy(counts), positions=torch.from_numpy(pos),
        sampler_seed=1, call=0, raise_invalid=True,
    )
    lp, tok, _, _ = launch.run(step)
    ref = reference.sample(x.numpy(), param.arrays, out_ids=out, out_counts=counts, pos=pos, sampler_seed=1)
    np.testing.assert_array_equal(tok.numpy(), ref[1])
    np.testing.assert_allclose(lp.numpy(), ref[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("truncated,penalised", [(False, True), (True, True), (True, False)])
def test_cache_table_insertions_match_the_stateless_path(truncated, penalised):
    """The prep's insertion of the cache's pending token and its table pass over several blocks
    of 16 columns: new ids inserted at the front, at a block boundary, in the middle and at the
    end, known ids counted again, against the stateless path over the raw ids. Every processed
    value is in the top-n lists (n = V), so a wrong penalised value or a lost table entry shows.
    With ``truncated`` (top-k on every row) the rows take the candidate path, otherwise they
    choose in two levels; both are checked against the reference too. Without penalties the
    table is only updated (no penalty table): its ids and states are checked at the end."""
    rows, vocab = 4, 96
    rng = np.random.default_rng(12)
    # 40 distinct even ids 8..86 (then repeats): an odd id 2r + 7 is new, with rank r
    prompt = np.concatenate([np.tile(np.arange(8, 88, 2), (rows, 1)), rng.integers(8, 88, (rows, 20)) // 2 * 2], 1)
    out = np.array([[10, 12, 12], [14, 9, 20], [30, 30, 30], [86, 8, 40]])
    new = np.array([
        [0, 1, 95, 8],  # front, front, end, known
        [2 * 16 + 7, 38, 2 * 13 + 7, 2 * 16 + 9],  # rank 16 (a block boundary), known, middle
        [7, 87, 2 * 15 + 7, 40],
        [2 * 32 + 7, 2 * 31 + 7, 41, 9],
    ])
    pen = dict(
        repetition_penalty=np.array([1.3, 0.8, 1.5, 1.1]), frequency_penalty=np.array([0.5, 0.25, 0.0, 1.0]),
        presence_penalty=np.array([0.3, 0.0, 0.7, 0.1]),
    )
    param = SamplingParam.from_numpy(
        **(pen if penalised else {}), temperature=np.array([0.9, 1.0, 1.3, 0.7]),
        top_k=np.full(rows, 60 if truncated else 0), seed=np.arange(rows) + 5,
    )
    rids = np.arange(rows) + 40
    cached = Sampler(backend="triton", seed=3, num_logprobs=vocab, logprobs_mode="processed")
    stateless = Sampler(backend="triton", seed=3, num_logprobs=vocab, logprobs_mode="processed")
    for step in range(new.shape[1] + 1):
        x = torch.from_numpy(logits(rows, vocab, seed=30 + step))
        hist = np.concatenate([prompt, out], 1)
        full = SamplingData.from_numpy(all_input_ids=hist, output_ids=out)
        data = SamplingData.from_numpy(all_input_ids=hist, output_ids=out, request_ids=rids, is_prefill=step == 0)
        got, want = cached(x, data, param), stateless(x, full, param)
        for g, w in zip(got, want):
            assert torch.equal(g, w), step
        ref = reference.sample(x.numpy(), param.arrays, rep_ids=hist, out_ids=out, sampler_seed=3, call=step,
                               logprobs_mode="processed", num_logprobs=vocab)
        assert_same(got, ref, n=vocab)
        if step < new.shape[1]:
            out = np.concatenate([out, new[:, step : step + 1]], 1)
    table = cached.cache.table
    assert table.ids.shape[1] > 3 * 16  # (several blocks)
    for row, flags, p, o in zip(table.ids.numpy(), table.flags.numpy(), prompt, out):
        ids = np.unique(np.concatenate([p, o]))
        np.testing.assert_array_equal(row[: len(ids)], ids)
        np.testing.assert_array_equal(row[len(ids):], -1)
        # every id is in the repetition penalty's history (prompt + output): 2 * output count + 1
        np.testing.assert_array_equal(flags[: len(ids)], 2 * (o[:, None] == ids).sum(0) + 1)


def test_huge_history_and_empty_history():
    rows, vocab = 2, 64
    rng = np.random.default_rng(6)
    rep = rng.integers(-vocab, 2 * vocab, (rows, 3000))
    out = np.full((rows, 0), 0, np.int64)
    data = SamplingData.from_numpy(all_input_ids=rep, output_ids=out)
    param = SamplingParam.from_numpy(repetition_penalty=np.array([1.5, 0.5]), seed=np.array([1, 2]))
    ours, ref = run_both(logits(rows, vocab, seed=6), param, data)
    assert_same(ours, ref)


def test_unseeded_rows_follow_the_sampler_call_counter():
    x = logits(3, 100, seed=8)
    xt = torch.from_numpy(x)
    param = SamplingParam.from_numpy(temperature=np.array([1.0, 1.0, 1.0]), top_k=np.array([0, 30, 0]))
    s = Sampler(backend="triton", seed=2024)
    for call in range(3):
        ours = s(xt, None, param)
        ref = reference.sample(x, param.arrays, sampler_seed=2024, call=call)
        np.testing.assert_array_equal(ours[1].numpy(), ref[1])


def test_batch_permutation_changes_no_row():
    x = logits(5, 90, seed=10)
    kw = dict(top_k=np.array([0, 5, 9, 0, 2]), top_p=np.array([1.0, 0.8, 1.0, 0.7, 1.0]),
              temperature=np.array([0.9, 1.0, 0.0, 1.1, 1.0]), seed=np.array([4, 5, 6, 7, 8]))
    param = SamplingParam.from_numpy(**kw)
    perm = np.array([3, 0, 4, 2, 1])
    a = Sampler(backend="triton")(torch.from_numpy(x), None, param)
    b = Sampler(backend="triton")(torch.from_numpy(x[perm]), None, param.take(perm))
    np.testing.assert_array_equal(a[1].numpy()[perm], b[1].numpy())
    np.testing.assert_allclose(a[0].numpy()[perm], b[0].numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------- invalid rows


def _bad_logits():
    x = logits(4, 50, seed=12)
    x[1, 7] = np.nan
    x[2, 3] = np.inf
    x[3, :] = -np.inf
    return x


def test_invalid_rows_are_flagged_without_raising():
    x = _bad_logits()
    param = SamplingParam.from_numpy(top_k=np.array([5, 0, 3, 0]), seed=np.array([1, 2, 3, 4]))
    out = Sampler(backend="triton", check_logits=False, num_logprobs=2)(torch.from_numpy(x), None, param)
    tok, lp = out[1].numpy(), out[0].numpy()
    np.testing.assert_array_equal(tok[1:], [-1, -1, -1])
    assert np.isnan(lp[1:]).all() and np.isfinite(lp[0]) and 0 <= tok[0] < 50
    assert (out.top_ids.numpy()[1:] == -1).all() and np.isnan(out.top_logprobs.numpy()[1:]).all()


def test_invalid_rows_raise_when_checked():
    x = _bad_logits()
    with pytest.raises(InvalidLogitsError, match="row 1"):
        Sampler(backend="triton")(torch.from_numpy(x), None, None)


def test_temperature_overflow_makes_a_row_invalid():
    x = logits(2, 40, seed=13)
    x[0, 5] = 3e38
    param = SamplingParam.from_numpy(temperature=np.array([0.01, 0.01]))
    out = Sampler(backend="triton", check_logits=False)(torch.from_numpy(x), None, param)
    assert out[1].numpy()[0] == -1 and out[1].numpy()[1] >= 0


def test_cpu_tensors_without_interpreter_are_refused():
    code = (
        "import torch, numpy as np\n"
        "from sampling import Sampler, SamplingInputError\n"
        "try:\n"
        "    Sampler(backend='triton')(torch.zeros(2, 5), None, None)\n"
        "except SamplingInputError as e:\n"
        "    print('refused:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "refused:" in out.stdout and "TRITON_INTERPRET" in out.stdout, out.stderr


# ----------------------------------------------------------------------------- two-level choice


@pytest.mark.parametrize("mixed", [False, True])
def test_two_level_rows_with_penalties_match_the_reference(mixed):
    """Rows without truncation choose a block, then a token (sampling/stream.py): the chunks of
    the scan must see every token of a block with its penalised value, although they mask the
    penalised tokens of the other rows (which the penalty items take). The histories are each
    row's most likely tokens, so a chunk that skipped or mis-read them would pick other blocks.
    With ``mixed``, truncated and greedy rows share the batch (and the penalty items)."""
    rows, vocab = 24, 301  # several chunks of 32-token tiles; the last block holds one id
    x = logits(rows, vocab, seed=3)
    x[1, 5::7] = -np.inf
    hist = np.argsort(-x, axis=1)[:, :12]
    data = SamplingData.from_numpy(all_input_ids=np.concatenate([hist, np.full((rows, 2), -1)], axis=1),
                                   output_ids=hist[:, ::2])
    top_k = np.where(np.arange(rows) % 3 == 1, 5, 0) if mixed else np.zeros(rows, int)
    temp = np.where(np.arange(rows) % 3 == 2, 0.0, 0.7) if mixed else np.full(rows, 0.7)
    param = SamplingParam.from_numpy(temperature=temp, top_k=top_k, repetition_penalty=np.full(rows, 1.6),
                                     frequency_penalty=np.full(rows, -0.4), presence_penalty=np.full(rows, 0.5),
                                     seed=np.arange(rows) + 1000)
    ours, ref = run_both(x, param, data)
    assert_same(ours, ref)
    # the penalties matter: without them, most rows would choose differently
    free = reference.sample(x, param.arrays)[1]
    assert (free != ref[1]).sum() >= rows // 3


def test_two_level_rows_whose_first_tiles_mix_masked_and_finite_tokens():
    """While a chunk has seen no finite value, exp(z - max) is NaN for its -inf tokens, so a
    block that mixes -inf and finite tokens has a NaN mass in the scan's cheap test. The scan
    must still consider such blocks (the first finite tile decides the chunk's first best
    block). Here every block of every row holds a -inf token, from the first tile on; rows
    differ in where the finite tokens sit. A NaN read as "no chance" skips these tiles, and
    the chosen tokens no longer match the reference's. Rows that start with whole tiles of
    -inf also check the log-sum-exp's vote there (-inf - -inf is NaN, whose sign bit differs
    between the GPU and numpy): a wrong branch returns NaN log-probabilities."""
    rows, vocab = 16, 301
    x = logits(rows, vocab, seed=8)
    ids = np.arange(vocab)
    for r in range(rows):
        x[r, ids % 4 == r % 4] = -np.inf  # one -inf in each block of 4 (rs.BLOCK)
        x[r, : 32 * (r % 3)] = -np.inf  # and some rows start with whole tiles of -inf
    param = SamplingParam.from_numpy(temperature=np.full(rows, 0.7), seed=np.arange(rows) + 77)
    ours, ref = run_both(x, param)
    assert_same(ours, ref)
    assert np.isfinite(x[np.arange(rows), ref[1]]).all()


# ----------------------------------------------------------------------------- near-ties


def test_float32_gumbel_keys_differ_only_at_near_ties():
    """Why the plain single-pass path may disagree with numpy on a vanishing fraction of rows.

    The plain path ranks ``z + G`` in float32 (the row is read once, at memory speed); the
    reference ranks in float64. Two tokens whose float64 keys lie closer than the float32
    rounding of the keys (~1e-6 here) can swap; any wider gap cannot. We build rows where
    token 1's key exceeds token 0's by ``gap`` and check both regimes.
    """
    vocab, rows = 64, 8
    seeds = np.arange(1, rows + 1)
    key = stream.row_keys(seeds & stream.MASK32, seeds >> 32, np.zeros(rows, np.int64))
    g = stream.gumbel(stream.token_bits(key[:, None], np.arange(vocab)[None, :]))
    for gap, must_match in ((1e-3, True), (1e-9, False)):
        x = np.full((rows, vocab), -30.0, np.float32)
        x[:, 0] = 5.0
        # float32 logits chosen so the float64 keys differ by ~gap (token 1 ahead)
        x[:, 1] = (5.0 + g[:, 0] - g[:, 1] + gap).astype(np.float32)
        param = SamplingParam.from_numpy(temperature=np.ones(rows), seed=seeds)
        ours, ref = run_both(x, param)
        assert set(ours[1].numpy()) <= {0, 1} and set(ref[1]) <= {0, 1}
        if must_match:
            np.testing.assert_array_equal(ours[1].numpy(), ref[1])
        # with top-k the same rows go through the float64 candidate path: exact either way
        pk = SamplingParam.from_numpy(top_k=np.full(rows, 2), seed=seeds)
        ours_k, ref_k = run_both(x, pk)
        np.testing.assert_array_equal(ours_k[1].numpy(), ref_k[1])


# ----------------------------------------------------------------------------- properties


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 4),
    vocab=st.integers(2, 130),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.1, 3.0, 20.0]),
    ties=st.booleans(),
    dtype=st.sampled_from(sorted(DTYPES)),
    mode=st.sampled_from(["sampling", "processed", "raw"]),
    pen=st.booleans(),
    sample=st.sampled_from([16, 64, 256]),
)
def test_random_batches_match_reference(rows, vocab, seed, scale, ties, dtype, mode, pen, sample):
    rng = np.random.default_rng(seed)
    x = logits(rows, vocab, scale=scale, seed=seed, ties=ties)
    data = None
    if pen:
        data = SamplingData.from_numpy(
            all_input_ids=rng.integers(-2, vocab + 2, (rows, 9)), output_ids=rng.integers(-2, vocab + 2, (rows, 5))
        )
    param = SamplingParam.from_numpy(
        temperature=rng.choice([0.0, 0.6, 1.0, 1.7], rows),
        top_k=rng.choice([-1, 0, 1, 3, 17, vocab, vocab + 5], rows),
        top_p=rng.choice([1.0, 0.95, 0.6, 0.2], rows),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.4], rows),
        repetition_penalty=rng.choice([1.0, 1.2, 0.9], rows),
        frequency_penalty=rng.choice([0.0, 0.3, -0.2], rows),
        presence_penalty=rng.choice([0.0, 0.5], rows),
        seed=rng.choice(np.array([0, 99, 2**63 + 1], np.uint64), rows)
        if rng.random() < 0.5
        else rng.choice([-1, 0, 99], rows),
    )
    n = int(rng.integers(0, min(vocab, 4) + 1))
    with _launch().use_config(sample=sample):
        ours, ref = run_both(x, param, data, dtype=dtype, mode=mode, n=n)
    assert_same(ours, ref, n=n)
