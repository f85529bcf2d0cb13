"""The Triton backend on a CUDA GPU at realistic sizes (V = 151936), against the numpy reference.

Run on the device machine by ``bench/gpu_run.sh``. ``SAMPLING_GPU_SMALL=1`` shrinks the batches
(used for the run under ``compute-sanitizer --tool memcheck``, with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its own allocation and an
out-of-bounds access cannot hide inside a cached block).

Seeded draws must agree with numpy on >= 99.9% of rows, and every disagreement must be a
float near-tie: either two tokens whose float64 Gumbel keys are within float32 rounding
(the plain path ranks keys in float32), or a token whose top-p mass or min-p ratio sits
within rounding of the threshold. ``explain`` checks that for each disagreeing row.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from sampling import InvalidLogitsError, Sampler, SamplingData, SamplingParam  # noqa: E402
from sampling import stream  # noqa: E402
from sampling.kernels import reference  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/gpu_run.sh on the device)"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="TRITON_INTERPRET is on"),
]

SMALL = os.environ.get("SAMPLING_GPU_SMALL") == "1"
NO_CACHE = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1"
V = 151936
ROWS = 8 if SMALL else 1024


def cuda(a):
    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


def randn_logits(rows, vocab=V, scale=3.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(rows, vocab, device="cuda", generator=g) * scale


def _ref_part(args):
    x, arrays, rep, out, mode, n = args
    return reference.sample(x, arrays, rep_ids=rep, out_ids=out, logprobs_mode=mode, num_logprobs=n)


def ref_sample(x, param, data=None, mode="sampling", n=0):
    """The reference, split over processes by rows (all rows seeded, so rows are independent)."""
    assert param.arrays["has_seed"].all()
    rows = x.shape[0]
    parts = np.array_split(np.arange(rows), min(16, rows))
    jobs = []
    for idx in parts:
        rep = None if data is None or data.all_input_ids is None else data.all_input_ids[idx]
        out = None if data is None or data.output_ids is None else data.output_ids[idx]
        jobs.append((x[idx], param.take(idx).arrays, rep, out, mode, n))
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as ex:
        res = list(ex.map(_ref_part, jobs))
    lp = np.concatenate([r[0] for r in res])
    tok = np.concatenate([r[1] for r in res])
    top = (np.concatenate([r[2] for r in res]), np.concatenate([r[3] for r in res])) if n else (None, None)
    return lp, tok, top[0], top[1]


def explain(x_row, arrays, i, ours, theirs, rep=None, out=None):
    """Why row ``i`` may differ: a float near-tie (returns a reason) or not (returns None)."""
    one = {k: v[i : i + 1] for k, v in arrays.items()}
    z = reference.penalize(x_row[None], one, None if rep is None else rep[i : i + 1], None if out is None else out[i : i + 1])
    zt = reference.scale(z, one)
    keep = reference.truncate(zt, one)[0]
    z64 = zt[0].astype(np.float64)
    pos = reference.positions(None if out is None else out[i : i + 1], 1, zt.shape[1])
    key = reference.row_keys(one, pos, 0, 0)
    g = stream.gumbel(stream.token_bits(key[:, None], np.array([[ours, theirs]])))[0]
    k_ours, k_theirs = z64[ours] + g[0], z64[theirs] + g[1]
    blocks = np.array([ours, theirs]) // stream.BLOCK
    if stream.two_level_rows(one, zt.shape[1])[0] and blocks[0] != blocks[1]:
        # two-level choice: the keys that compete are the blocks' (log-mass + block noise)
        gb = stream.gumbel(stream.token_bits(stream.block_keys(key)[:, None], blocks[None, :]))[0]
        mass = [np.logaddexp.reduce(z64[j * stream.BLOCK : (j + 1) * stream.BLOCK]) for j in blocks]
        k_ours, k_theirs = mass[0] + gb[0], mass[1] + gb[1]
    if keep[ours] and abs(k_ours - k_theirs) <= 1e-5 * (1 + abs(k_theirs)):
        return "gumbel near-tie"
    top = z64.max()
    w = np.exp(z64 - top)
    if one["top_p"][0] < 1:
        kk = np.ones_like(keep)
        if 0 < one["top_k"][0] < zt.shape[1]:
            kth = -np.partition(-zt[0], one["top_k"][0] - 1)[one["top_k"][0] - 1]
            kk = zt[0] >= kth
        total = w[kk].sum()
        for t in (ours, theirs):
            above = w[kk & (z64 > z64[t])].sum() / total
            if abs(above - one["top_p"][0]) <= 1e-5:
                return "top-p mass near-tie"
    if one["min_p"][0] > 0:
        for t in (ours, theirs):
            if abs(w[t] - one["min_p"][0]) <= 1e-6 * one["min_p"][0]:
                return "min-p near-tie"
    return None


def check_agreement(x, param, ours, ref, data=None, min_frac=0.999):
    tok, lp = ours[1].cpu().numpy(), ours[0].cpu().numpy()
    same = tok == ref[1]
    assert same.mean() >= min_frac, f"only {same.mean():.5f} of rows agree"
    rep = None if data is None else data.all_input_ids
    out = None if data is None else data.output_ids
    for i in np.flatnonzero(~same):
        why = explain(x[i], param.arrays, i, int(tok[i]), int(ref[1][i]), rep, out)
        assert why is not None, f"row {i}: ours {tok[i]} vs numpy {ref[1][i]} is not a near-tie"
    np.testing.assert_allclose(lp[same], ref[0][same], rtol=1e-5, atol=1e-6)
    assert ((tok >= 0) & (tok < x.shape[1])).all()
    return int((~same).sum())


def params(rows, kind, seed=0):
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 2**62, rows)
    t = np.full(rows, 0.7)
    if kind == "S1":
        return SamplingParam.from_numpy(temperature=t, seed=seeds)
    if kind == "S1pen":  # no truncation (two-level choice), penalties
        return SamplingParam.from_numpy(
            temperature=t, repetition_penalty=np.full(rows, 1.1), frequency_penalty=np.full(rows, 0.2),
            presence_penalty=np.full(rows, 0.3), seed=seeds,
        )
    if kind == "S2":
        return SamplingParam.from_numpy(temperature=t, top_k=np.full(rows, 50), top_p=np.full(rows, 0.9), seed=seeds)
    if kind == "top_p":
        return SamplingParam.from_numpy(temperature=t, top_p=np.full(rows, 0.9), seed=seeds)
    if kind == "S3":
        return SamplingParam.from_numpy(
            temperature=t, top_k=np.full(rows, 50), top_p=np.full(rows, 0.9), min_p=np.full(rows, 0.05),
            repetition_penalty=np.full(rows, 1.1), frequency_penalty=np.full(rows, 0.2),
            presence_penalty=np.full(rows, 0.3), seed=seeds,
        )
    if kind == "mixed":
        return SamplingParam.from_numpy(
            temperature=rng.choice([0.0, 0.5, 0.7, 1.0, 1.3], rows), top_k=rng.choice([0, 1, 20, 50, 400, 3000], rows),
            top_p=rng.choice([1.0, 0.95, 0.9, 0.5], rows), min_p=rng.choice([0.0, 0.0, 0.05, 0.2], rows),
            repetition_penalty=rng.choice([1.0, 1.2], rows), frequency_penalty=rng.choice([0.0, 0.3], rows),
            presence_penalty=rng.choice([0.0, 0.5], rows), seed=seeds,
        )
    raise ValueError(kind)


def history(rows, seed=0, prompt=1024, gen=512, vocab=V):
    rng = np.random.default_rng(seed)
    out = rng.integers(0, vocab, (rows, gen))
    allin = np.concatenate([rng.integers(0, vocab, (rows, prompt)), out], axis=1)
    return SamplingData.from_numpy(all_input_ids=allin, output_ids=out)


@pytest.mark.parametrize("kind", ["S1", "S1pen", "S2", "S3", "mixed"])
def test_seeded_rows_agree_with_numpy(kind):
    rows = ROWS if kind in ("S1", "S2") else max(ROWS // 4, 8)
    xt = randn_logits(rows, seed=hash(kind) % 1000)
    x = xt.cpu().numpy()
    param = params(rows, kind)
    data = history(rows) if kind in ("S1pen", "S3", "mixed") else None
    ours = Sampler(backend="triton")(xt, data, param)
    ref = ref_sample(x, param, data)
    check_agreement(x, param, ours, ref, data)


@pytest.mark.parametrize("kind", ["S1", "S1pen"])
def test_plain_rows_with_a_masked_vocabulary_agree_with_numpy(kind):
    """Rows without truncation choose a block of 4 ids, then a token. With most of the vocabulary
    at -inf (a grammar's mask), chunks start with blocks of -inf only (while the running max is
    still -inf) and blocks that mix -inf and finite values: no block may be lost there (with ~20
    live tokens per chunk, ~1 in 20 lies in the first live tile of its chunk)."""
    rows = max(ROWS // 4, 8)
    xt = randn_logits(rows, seed=21)
    g = torch.Generator(device="cuda").manual_seed(3)
    live = torch.rand(xt.shape, device="cuda", generator=g) < 0.002  # ~150 live tokens a row
    live[:, : V // 2] = False
    live[:, -1] = True
    xt = torch.where(live, xt, torch.full_like(xt, float("-inf")))
    x = xt.cpu().numpy()
    param = params(rows, kind, seed=4)
    data = history(rows, seed=4) if kind == "S1pen" else None
    ours = Sampler(backend="triton")(xt, data, param)
    ref = ref_sample(x, param, data)
    check_agreement(x, param, ours, ref, data)
    assert np.isfinite(x[np.arange(rows), ours[1].cpu().numpy()]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype):
    # all rows: the scan's grid for 2-byte logits at more than 3 rows per SM (launch.Config)
    rows = ROWS
    xt = randn_logits(rows, seed=5).to(dtype)
    x = xt.float().cpu().numpy()
    param = params(rows, "mixed", seed=1)
    ours = Sampler(backend="triton")(xt, None, param)
    check_agreement(x, param, ours, ref_sample(x, param))


@pytest.mark.parametrize("mode", ["sampling", "processed", "raw"])
def test_logprob_modes_and_top_n(mode):
    rows = max(ROWS // 16, 8)
    xt = randn_logits(rows, seed=6)
    x = xt.cpu().numpy()
    param = params(rows, "mixed", seed=2)
    data = history(rows, seed=2)
    ours = Sampler(backend="triton", logprobs_mode=mode, num_logprobs=5)(xt, data, param)
    ref = ref_sample(x, param, data, mode=mode, n=5)
    check_agreement(x, param, ours, ref, data)
    same = ours[1].cpu().numpy() == ref[1]
    np.testing.assert_array_equal(ours.top_ids.cpu().numpy(), ref[2])
    np.testing.assert_allclose(ours.top_logprobs.cpu().numpy()[same], ref[3][same], rtol=1e-5, atol=1e-6)


def test_top_p_without_top_k_on_flat_rows_takes_the_exact_fallback():
    # Nearly flat rows: top-p keeps most of the vocabulary, far more than the candidate slots.
    rows = 8 if SMALL else 32
    xt = randn_logits(rows, scale=0.05, seed=7)
    x = xt.cpu().numpy()
    rng = np.random.default_rng(3)
    param = SamplingParam.from_numpy(top_p=rng.choice([0.9, 0.5, 0.99], rows), min_p=np.zeros(rows),
                                     seed=rng.integers(0, 2**31, rows))
    ours = Sampler(backend="triton")(xt, None, param)
    check_agreement(x, param, ours, ref_sample(x, param), min_frac=0.9)


def test_histories_with_padding_garbage_int64_extremes_and_huge_lengths():
    rows = 4 if SMALL else 8
    rng = np.random.default_rng(4)
    prompt = 20000 if SMALL else 200000
    rep = rng.integers(-(2**40), 2**40, (rows, prompt))
    rep[:, ::3] = rng.integers(0, V, rep[:, ::3].shape)
    rep[:, :8] = [-1, V, V + 1, np.iinfo(np.int64).max, np.iinfo(np.int64).min, 2**31, -(2**31), 2**32 + 7]
    out = rng.integers(-5, V + 5, (rows, 5000))
    out[:, :3] = [np.iinfo(np.int64).max, np.iinfo(np.int64).min, -1]
    data = SamplingData.from_numpy(all_input_ids=rep, output_ids=out)
    param = params(rows, "S3", seed=4)
    xt = randn_logits(rows, seed=8)
    x = xt.cpu().numpy()
    ours = Sampler(backend="triton", num_logprobs=3)(xt, data, param)
    ref = ref_sample(x, param, data, n=3)
    check_agreement(x, param, ours, ref, data, min_frac=1.0)


def test_invalid_rows_are_flagged_on_gpu_and_raise_when_checked():
    xt = randn_logits(6, seed=9)
    xt[1, 100] = float("nan")
    xt[3, 5] = float("inf")
    xt[4] = float("-inf")
    param = params(6, "mixed", seed=5)
    out = Sampler(backend="triton")(xt, None, param)
    tok, lp = out[1].cpu().numpy(), out[0].cpu().numpy()
    assert list(tok[[1, 3, 4]]) == [-1, -1, -1] and np.isnan(lp[[1, 3, 4]]).all()
    ok = [0, 2, 5]
    assert ((tok[ok] >= 0) & (tok[ok] < V)).all() and np.isfinite(lp[ok]).all()
    with pytest.raises(InvalidLogitsError, match="row 1"):
        Sampler(backend="triton", check_logits=True)(xt, None, param)


@pytest.mark.skipif(NO_CACHE, reason="graph capture needs PyTorch's caching allocator")
def test_whole_call_captured_in_a_cuda_graph_and_replayed():
    rows = 16 if SMALL else 64
    rng = np.random.default_rng(10)
    seeds = np.where(rng.random(rows) < 0.5, -1, rng.integers(0, 2**40, rows))
    param = SamplingParam.from_numpy(
        temperature=rng.choice([0.0, 0.7, 1.0], rows), top_k=rng.choice([0, 50], rows),
        top_p=rng.choice([1.0, 0.9], rows), repetition_penalty=np.full(rows, 1.1),
        frequency_penalty=np.full(rows, 0.2), seed=seeds, to_tensor=cuda,
    )
    hist = history(rows, seed=10, prompt=64, gen=32)
    data = SamplingData.from_numpy(all_input_ids=hist.all_input_ids, output_ids=hist.output_ids, to_tensor=cuda)
    static = randn_logits(rows, seed=11)
    sampler = Sampler(backend="triton", seed=77, num_logprobs=2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sampler(static, data, param)  # warm-up: compiles every kernel (call 0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sampler(static, data, param)
    seen = []
    for call in (1, 2, 3):
        fresh = randn_logits(rows, seed=100 + call)
        static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        x = fresh.cpu().numpy()
        ref = reference.sample(x, param.arrays, rep_ids=hist.all_input_ids, out_ids=hist.output_ids,
                               sampler_seed=77, call=call, num_logprobs=2)
        tok = out[1].cpu().numpy()
        same = tok == ref[1]
        for i in np.flatnonzero(~same):
            assert seeds[i] < 0 or explain(x[i], param.arrays, i, int(tok[i]), int(ref[1][i]),
                                           hist.all_input_ids, hist.output_ids), f"replay {call} row {i}"
        assert same.mean() >= 0.95
        np.testing.assert_allclose(out[0].cpu().numpy()[same], ref[0][same], rtol=1e-5, atol=1e-6)
        seen.append(tok.copy())
    # unseeded rows draw fresh numbers on every replay: identical logits would still move them
    static.copy_(randn_logits(rows, seed=500))
    graph.replay()
    a = out[1].clone()
    graph.replay()
    b = out[1].clone()
    free = torch.from_numpy(seeds < 0).cuda() & torch.from_numpy(param.arrays["greedy"] == 0).cuda()
    seeded = ~torch.from_numpy(seeds < 0).cuda()
    assert torch.equal(a[seeded], b[seeded])
    assert (a[free] != b[free]).any()


@pytest.mark.parametrize("rows", [1, 2])
def test_one_launch_path_equals_the_pipeline_and_replays_from_a_graph(rows, monkeypatch):
    # Small batches of top-k rows without penalties run as one cooperative launch whose programs
    # wait for values the others publish (pipeline._small_kernel): the same tokens and
    # log-probabilities as the three-kernel pipeline, bit for bit ("sampling" log-probabilities
    # and top-n: sums over the survivors are exact), in both dtypes; then the call captured in a
    # CUDA graph, with unseeded rows, replayed against the reference.
    from sampling.kernels.triton import launch

    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    rng = np.random.default_rng(40 + rows)
    calls = 6 if SMALL else 24
    for i in range(calls):
        dtype = (torch.float32, torch.bfloat16)[i % 2]
        xt = randn_logits(rows, seed=300 + i).to(dtype)
        param = SamplingParam.from_numpy(
            temperature=rng.choice([0.7, 1.0, 1.5], rows), top_k=rng.choice([1, 20, 50, 70], rows),
            top_p=rng.choice([1.0, 0.9, 0.5], rows), min_p=rng.choice([0.0, 0.05], rows),
            seed=rng.integers(0, 2**62, rows), to_tensor=cuda)
        ours = Sampler(backend="triton", num_logprobs=3)(xt, None, param)
        assert debug["small"] and (debug["status"] == 0).all()
        with launch.use_config(small_rows=0):
            pipe = Sampler(backend="triton", num_logprobs=3)(xt, None, param)
        assert not debug["small"]
        assert torch.equal(ours[1], pipe[1]) and torch.equal(ours[0], pipe[0]), i
        assert torch.equal(ours.top_ids, pipe.top_ids) and torch.equal(ours.top_logprobs, pipe.top_logprobs)
        x = xt.float().cpu().numpy()
        # (one or two rows per call: no fraction to hold; every disagreement must be a near-tie)
        check_agreement(x, param, ours, ref_sample(x, param), min_frac=0.0)
    if NO_CACHE:
        return  # graph capture needs PyTorch's caching allocator
    param = SamplingParam.from_numpy(temperature=np.full(rows, 0.7), top_k=np.full(rows, 50),
                                     top_p=np.full(rows, 0.9), to_tensor=cuda)
    static = randn_logits(rows, seed=600)
    sampler = Sampler(backend="triton", seed=99)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sampler(static, None, param)  # call 0 compiles
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sampler(static, None, param)
    assert debug["small"]
    for call in (1, 2, 3):
        fresh = randn_logits(rows, seed=700 + call)
        static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.sample(fresh.cpu().numpy(), param.arrays, sampler_seed=99, call=call)
        np.testing.assert_array_equal(out[1].cpu().numpy(), ref[1])
        np.testing.assert_allclose(out[0].cpu().numpy(), ref[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["S2", "S3", "top_p", "mixed"])
def test_identical_calls_are_bit_identical_and_the_fallback_agrees(kind, monkeypatch):
    # Work items append candidates in whatever order they finish; the finish sums masses as
    # integers, so repeated calls give the same bits. The radix fallback (forced here: no slots
    # for candidates) must pick the same tokens with the same log-probabilities.
    from sampling.kernels.triton import launch

    rows = 8 if SMALL else 256
    xt = randn_logits(rows, seed=12)
    param = params(rows, kind, seed=6)
    data = history(rows, seed=6) if kind != "S2" else None
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    runs = [Sampler(backend="triton", num_logprobs=2)(xt, data, param) for _ in range(3)]
    status = debug["status"].cpu().numpy()
    if kind in ("S2", "S3"):
        # with top-k (or min-p) realistic rows never need the fallback: the pivot leaves a
        # few hundred candidates, at least k with overwhelming probability
        assert (status == 0).all(), np.bincount(status)
    if kind == "top_p":
        # top-p alone: the sampled guess of the nucleus misses on ~10% of these rows
        # (bench/NOTES.md, v6), which the fallback finishes
        assert (status == 0).mean() >= 0.8, np.bincount(status)
    x = xt.cpu().numpy()
    check_agreement(x, param, runs[0], ref_sample(x, param, data), data)
    for r in runs[1:]:
        assert torch.equal(r[1], runs[0][1]) and torch.equal(r[0], runs[0][0])
        assert torch.equal(r.top_ids, runs[0].top_ids) and torch.equal(r.top_logprobs, runs[0].top_logprobs)
    if not SMALL:
        n = 32
        sub = None if data is None else SamplingData.from_numpy(all_input_ids=data.all_input_ids[:n],
                                                               output_ids=data.output_ids[:n])
        with launch.use_config(cap=1):
            fb = Sampler(backend="triton", num_logprobs=2)(xt[:n], sub, param.take(np.arange(n)))
        if kind != "mixed":
            assert (debug["status"].cpu().numpy() == 2).all()
        assert torch.equal(fb[1], runs[0][1][:n])
        torch.testing.assert_close(fb[0], runs[0][0][:n], rtol=1e-6, atol=1e-6)


def test_fast_division_is_bit_identical_to_div_rn():
    # The scan divides by the temperature with div.rn.f32's fast path, its reciprocal hoisted per
    # row, and branches to the full div.rn.f32 outside [2**-100, 2**100]: bit for bit the same
    # as a correctly rounded division (torch's CUDA float32 division), specials included.
    import triton
    import triton.language as tl

    from sampling.kernels.triton import pipeline as K

    @triton.jit
    def div_kernel(z_ptr, t_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        t = tl.load(t_ptr + tl.program_id(0))
        z = tl.load(z_ptr + i)
        tl.store(out_ptr + tl.program_id(0) * n + i, K._div(z, t, K._recip(t, True), True))

    g = torch.Generator(device="cuda").manual_seed(3)
    n = 1 << 16
    mant = torch.rand(n, device="cuda", generator=g) + 1.0
    expo = torch.randint(-140, 128, (n,), device="cuda", generator=g).float()
    z = (mant * torch.exp2(expo)) * torch.where(torch.rand(n, device="cuda", generator=g) < 0.5, -1.0, 1.0)
    z[:8] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -3e38, 2.0**-100],
                         device="cuda")
    temps = torch.cat([torch.rand(30, device="cuda", generator=g) * 3 + 0.01,
                       torch.tensor([2.0**-20, 2.0**20, 1.0, 0.7], device="cuda")])
    out = torch.empty(len(temps), n, device="cuda")
    div_kernel[(len(temps), n // 1024)](z, temps, out, n, BLOCK=1024)
    ref = z[None, :] / temps[:, None]
    same = (out.view(torch.int32) == ref.view(torch.int32)) | (torch.isnan(out) & torch.isnan(ref))
    assert bool(same.all()), f"{int((~same).sum())} quotients differ"


def test_gumbel_tile_vote_keeps_every_token_that_could_win():
    # The scan computes a tile's Gumbel keys only if some token has a margin >= +0: the margin
    # (one fused multiply-add on the uniform's bits) must be positive wherever the exact test of
    # _gumbel_key, v < e * cb, holds; here with v within a few ulps of e * cb, on the GPU's fma.
    import triton
    import triton.language as tl

    from sampling.kernels.triton import pipeline as K

    @triton.jit
    def margin_kernel(m_ptr, e_ptr, cb_ptr, out_ptr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = tl.load(m_ptr + i).to(tl.uint32)
        e = tl.load(e_ptr + i)
        cb = tl.load(cb_ptr + i)
        u, v = K._uv_m(m)
        tl.store(out_ptr + i, K._beat_margin(m, e, cb))
        tl.store(out_ptr + BLOCK * tl.num_programs(0) + i, v)
        tl.store(out_ptr + 2 * BLOCK * tl.num_programs(0) + i, e * cb)

    rng = np.random.default_rng(11)
    n = 1 << 18
    m = rng.integers(0, 1 << 23, n)
    m[:4] = [0, 1, (1 << 23) - 2, (1 << 23) - 1]
    v = ((2 * ((1 << 23) - 1 - m) + 1) * 2.0**-24).astype(np.float32)  # exact
    e = np.exp2(rng.uniform(-40, 0, n)).astype(np.float32)
    # thresholds at v and a few ulps around it
    thr = (v.astype(np.float64) * (1 + rng.integers(-6, 7, n) * 2.0**-24)).astype(np.float32)
    cb = (thr.astype(np.float64) / e).astype(np.float32)
    out = torch.empty(3 * n, device="cuda")
    margin_kernel[(n // 1024,)](cuda(m.astype(np.int32)), cuda(e), cuda(cb), out, BLOCK=1024)
    margin, v_dev, thr_dev = out.view(3, n).cpu().numpy()
    np.testing.assert_array_equal(v_dev, v)
    passes = v_dev < thr_dev
    assert 0.2 * n < passes.sum() < 0.8 * n  # the cases straddle the test
    assert (margin[passes] > 0).all(), f"{int((margin[passes] <= 0).sum())} winners would be skipped"
    # and it is tight: its slack is 3 * 2**-24, so tokens 2**-22 above the threshold are skipped
    far = v_dev > thr_dev + 2.0**-22
    assert far.sum() > 1000 and (margin[far] <= 0).all()


def _compiled_variants():
    """Compiled kernel variants held by the JIT caches of every pipeline kernel."""
    from sampling.kernels.triton import pipeline as K

    n = 0
    for name in dir(K):
        caches = getattr(getattr(K, name), "device_caches", None)
        if caches:
            n += sum(len(v[0]) for v in caches.values())
    return n


def test_growing_histories_and_batch_sizes_compile_no_new_kernel_variants():
    # A decode loop changes the history width every step and the batch size as requests
    # finish; a specialisation on either (==1, multiple of 16) recompiled kernels in the demo.
    vocab = 8192
    rng = np.random.default_rng(5)
    sampler = Sampler(backend="triton", seed=3)

    def step(rows, width):
        x = randn_logits(rows, vocab, seed=width)
        out = rng.integers(0, vocab, (rows, width))
        ids = np.concatenate([rng.integers(0, vocab, (rows, 7)), out], axis=1)
        data = SamplingData.from_numpy(all_input_ids=ids, output_ids=out, to_tensor=cuda)
        param = SamplingParam.from_numpy(temperature=np.full(rows, 0.7), top_k=np.full(rows, 50),
                                         top_p=np.full(rows, 0.9), repetition_penalty=np.full(rows, 1.1),
                                         frequency_penalty=np.full(rows, 0.2), presence_penalty=np.full(rows, 0.3),
                                         to_tensor=cuda)
        tok = sampler(x, data, param)[1]
        assert bool(((tok >= 0) & (tok < vocab)).all())

    step(3, 3)
    before = _compiled_variants()
    assert before > 0
    for width in range(1, 41):
        step(1 + width % 5, width)
    assert _compiled_variants() == before


def test_penalised_top_tokens_come_from_their_own_chunk_and_agree_with_numpy():
    """The scan masks penalised tokens in its chunks and adds them as a chunk of their own. With the
    histories' tokens lifted to the top of each row (1024 + 512 ids, mild penalties), the
    winners, maxima and candidates come from that chunk: S1-, S2-, S3- and greedy rows against
    numpy."""
    rows = 8 if SMALL else 128
    data = history(rows, seed=12)
    xt = randn_logits(rows, seed=12)
    lift = torch.zeros_like(xt)
    # +12: at T = 1 the unlifted tokens hold ~150000 / (1500 e**12) ~ 6e-4 of a row's mass
    lift.scatter_(1, cuda(data.all_input_ids), 12.0)
    xt = xt + lift
    x = xt.cpu().numpy()
    rng = np.random.default_rng(12)
    param = SamplingParam.from_numpy(
        temperature=rng.choice([0.0, 0.7, 1.0], rows), top_k=rng.choice([0, 50], rows),
        top_p=rng.choice([1.0, 0.9], rows), min_p=rng.choice([0.0, 0.05], rows),
        repetition_penalty=np.full(rows, 1.05), frequency_penalty=np.full(rows, 0.05),
        presence_penalty=np.full(rows, 0.02), seed=rng.integers(0, 2**62, rows),
    )
    ours = Sampler(backend="triton", logprobs_mode="processed")(xt, data, param)
    ref = ref_sample(x, param, data, mode="processed")
    check_agreement(x, param, ours, ref, data)
    hist = data.all_input_ids
    tok = ours[1].cpu().numpy()
    assert all(tok[b] in set(hist[b].tolist()) for b in range(rows))


def test_cached_decode_steps_are_bit_identical_to_the_stateless_path():
    """The prep from the request cache's table (ids sorted, states given) against raw history ids:
    a prefill and three decode steps of heterogeneous rows, with 1024 + 512-id histories."""
    rows = 8 if SMALL else 256
    rng = np.random.default_rng(5)
    param = params(rows, "mixed", seed=5)
    prompt = rng.integers(-3, V + 3, (rows, 1024))  # padding and garbage too
    out = rng.integers(0, V, (rows, 512))
    rids = np.arange(rows) * 7 + 3
    cached = Sampler(backend="triton", seed=2, num_logprobs=3)
    stateless = Sampler(backend="triton", seed=2, num_logprobs=3)
    for step in range(4):
        x = randn_logits(rows, seed=100 + step)
        full = SamplingData.from_numpy(all_input_ids=np.concatenate([prompt, out], axis=1), output_ids=out)
        if step == 0:
            data = SamplingData.from_numpy(all_input_ids=np.concatenate([prompt, out], axis=1), output_ids=out,
                                           request_ids=rids, is_prefill=True)
        else:
            data = SamplingData.from_numpy(request_ids=rids, is_prefill=False)
        got, want = cached(x, data, param), stateless(x, full, param)
        for g, w in zip(got, want):
            assert torch.equal(g, w), step
        out = np.concatenate([out, want[1].cpu().numpy()[:, None]], axis=1)


@pytest.mark.parametrize("cached", [False, True])
def test_penalties_on_the_candidates_are_bit_identical_to_the_masked_scan(cached, monkeypatch):
    """S3 rows (sampling log-probabilities, penalties that only lower values) take the path that
    penalises the scan's raw candidates in the finish (launch.Config.cand). Half the rows have
    their history's tokens lifted to the top, so most of their candidates are penalised (past
    cand_compares: the whole table in the finish); against the masked scan bit for bit, from
    raw ids and from the request cache's table over a prefill and two decode steps, and against
    numpy."""
    from sampling.kernels.triton import launch

    rows = 8 if SMALL else 256
    data = history(rows, seed=21)
    param = params(rows, "S3", seed=21)
    prompt, out = data.all_input_ids[:, :1024], data.output_ids
    rids = np.arange(rows) + 900
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    cand, masked = Sampler(backend="triton", seed=4), Sampler(backend="triton", seed=4)
    for step in range(3 if cached else 1):
        hist = np.concatenate([prompt, out], axis=1)
        xt = randn_logits(rows, seed=21 + step)
        lift = torch.zeros_like(xt)
        lift[::2].scatter_(1, cuda(hist[::2]), 6.0)
        xt = xt + lift
        if cached and step == 0:
            data = SamplingData.from_numpy(all_input_ids=hist, output_ids=out, request_ids=rids, is_prefill=True)
        elif cached:
            data = SamplingData.from_numpy(request_ids=rids, is_prefill=False)
        else:
            data = SamplingData.from_numpy(all_input_ids=hist, output_ids=out)
        got = cand(xt, data, param)
        assert debug["cand"]
        with launch.use_config(cand=0):
            want = masked(xt, data, param)
        assert not debug["cand"]
        for g, w in zip(got, want):
            assert torch.equal(g, w), step
        ref = ref_sample(xt.cpu().numpy(), param, SamplingData.from_numpy(all_input_ids=hist, output_ids=out))
        check_agreement(xt.cpu().numpy(), param, got, ref, SamplingData.from_numpy(all_input_ids=hist, output_ids=out))
        out = np.concatenate([out, got[1].cpu().numpy()[:, None]], axis=1)


@pytest.mark.skipif(NO_CACHE, reason="graph capture needs PyTorch's caching allocator")
def test_cached_rows_filled_by_graph_replays_keep_their_table_and_bitmask(monkeypatch):
    """Decode steps from the request cache captured in a CUDA graph (four calls, each adding the
    tokens of the call before, on the device only) and replayed until every row's table of 64
    columns is full and drops its largest ids, which the host never sees. After each replay the
    table, the positions and the bitmask kept with the table (pipeline._table_aux_build) follow
    the cache's rule exactly; each call of the last replay gives the tokens and log-probabilities
    of the stateless path over the same state, bit for bit."""
    from sampling.kernels.triton import launch
    from sampling.step import Step

    rows, calls, width = (8 if SMALL else 64), 4, 64
    words = -(-V // 32)
    groups = -(-words // 8)
    rng = np.random.default_rng(30)
    # (parameters already on the GPU: a host array would be copied inside the capture)
    param = SamplingParam.from_numpy(
        temperature=np.full(rows, 0.7), top_k=np.full(rows, 50), top_p=np.full(rows, 0.9), min_p=np.full(rows, 0.05),
        repetition_penalty=np.full(rows, 1.1), frequency_penalty=np.full(rows, 0.2),
        presence_penalty=np.full(rows, 0.3), seed=rng.integers(0, 2**62, rows), to_tensor=cuda,
    )
    hist = np.stack([rng.choice(V, 58, replace=False) for _ in range(rows)])
    rids = np.arange(rows) + 300
    debug = {}
    monkeypatch.setattr(launch, "DEBUG", debug)
    s = Sampler(backend="triton", seed=9)
    bufs = [randn_logits(rows, seed=31 + j) for j in range(calls)]
    decode = SamplingData.from_numpy(request_ids=rids, is_prefill=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        s(bufs[0], SamplingData.from_numpy(all_input_ids=hist, output_ids=hist[:, 40:], request_ids=rids,
                                           is_prefill=True), param)
        eager = s(bufs[0], decode, param)[1]
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert debug["cand"]
    table = s.cache.table
    assert table.width == width
    ids, flags, pos = table.ids.cpu().numpy(), table.flags.cpu().numpy(), table.positions.cpu().numpy()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [s(bufs[j], decode, param) for j in range(calls)]
    assert s.cache.table is table  # (the host's bound still fits: no new table)
    tensors = {k: cuda(v) for k, v in param.arrays.items()}
    drops = 0
    for replay in range(12):
        xs = [randn_logits(rows, seed=1000 * replay + j) for j in range(calls)]
        for b, x in zip(bufs, xs):
            b.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        pending = eager.cpu().numpy()
        for j in range(calls):
            for b in range(rows):
                t = int(pending[b])
                drops += int(ids[b, -1] >= 0 and ids[b, -1] > t and t not in ids[b])
                rank = int(((ids[b] >= 0) & (ids[b] < t)).sum())
                if rank < width and ids[b, rank] == t:
                    flags[b, rank] = (flags[b, rank] | 1) + 2
                elif rank < width:
                    ids[b, rank + 1:], flags[b, rank + 1:] = ids[b, rank:-1].copy(), flags[b, rank:-1].copy()
                    ids[b, rank], flags[b, rank] = t, 3
                pos[b] += 1
            if replay == 11:
                # the stateless path over the state this call saw
                step = Step(logits=xs[j], params=tensors, host=param, rep_ids=cuda(np.where(flags & 1, ids, -1)),
                            out_ids=cuda(ids), out_counts=cuda(flags >> 1), positions=cuda(pos), sampler_seed=9)
                want = launch.run(step)
                assert debug["cand"]
                for g, w in zip(outs[j][:2], want[:2]):
                    assert torch.equal(g, w), j
            pending = outs[j][1].cpu().numpy()
        np.testing.assert_array_equal(table.ids.cpu().numpy(), ids)
        np.testing.assert_array_equal(table.flags.cpu().numpy(), flags)
        np.testing.assert_array_equal(table.positions.cpu().numpy(), pos)
        bits = np.zeros((rows, words), np.int64)
        counts = np.zeros((rows, groups + 1), np.int64)
        for b in range(rows):
            row = ids[b][ids[b] >= 0]
            np.bitwise_or.at(bits[b], row >> 5, 1 << (row & 31))
            counts[b] = np.append(np.searchsorted(row, 256 * np.arange(groups)), len(row))
        aux = table.aux["triton_aux"].cpu().numpy()
        np.testing.assert_array_equal(aux[:, :words].astype(np.int64) & 0xFFFFFFFF, bits)
        np.testing.assert_array_equal(aux[:, words:], counts)
    assert (ids >= 0).all() and drops > rows  # (every row full, and dropping ids)
