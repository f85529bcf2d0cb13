"""The torch backend on CUDA: same results as the reference, no sync, capturable in a CUDA graph."""

from __future__ import annotations

import numpy as np
import pytest

from sampling import Sampler, SamplingData, SamplingParam
from sampling.kernels import reference

torch = pytest.importorskip("torch", reason="the torch extra is part of the test set-up")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)"),
]

V = 151936


def _batch(rows, seed=0, all_seeded=True):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, V)) * 3).astype(np.float32)
    seeds = rng.integers(0, 2**63 - 1, size=rows)
    if not all_seeded:
        seeds[::2] = -1
    kw = dict(
        repetition_penalty=rng.choice([1.0, 1.2], rows),
        frequency_penalty=rng.choice([0.0, 0.3], rows),
        presence_penalty=rng.choice([0.0, 0.2], rows),
        temperature=rng.choice([0.0, 0.7, 1.0], rows),
        top_k=rng.choice([-1, 50, 1000], rows),
        top_p=rng.choice([1.0, 0.9], rows),
        min_p=rng.choice([0.0, 0.05], rows),
        seed=seeds,
    )
    hist = rng.integers(-1, V + 1, size=(rows, 300))
    hist[0, 0] = np.iinfo(np.int64).max
    out = rng.integers(-1, V + 1, size=(rows, 100))
    return logits, kw, hist, out


def test_cuda_matches_reference_at_full_vocabulary():
    logits, kw, hist, out = _batch(64)
    param = SamplingParam.from_numpy(**kw)
    data = SamplingData.from_numpy(all_input_ids=hist, output_ids=out)
    want = Sampler("numpy", seed=3)(logits, data, param)
    got = Sampler("torch", seed=3)(torch.from_numpy(logits).cuda(), data, param)
    assert got[1].is_cuda and got[0].is_cuda
    np.testing.assert_array_equal(got[1].cpu().numpy(), want[1])
    np.testing.assert_allclose(got[0].cpu().numpy(), want[0], rtol=1e-5)


def test_whole_call_is_captured_in_a_cuda_graph():
    rows = 16
    logits, kw, hist, out = _batch(rows, seed=1, all_seeded=False)
    # rows 1 and 2 without truncation (two-level choice) beside truncated and greedy rows
    kw["temperature"][1:3], kw["top_k"][1:3], kw["top_p"][1:3], kw["min_p"][1:3] = 0.7, -1, 1.0, 0.0
    cuda = lambda a: torch.from_numpy(a).cuda()
    param = SamplingParam.from_numpy(**kw, to_tensor=cuda)
    data = SamplingData.from_numpy(all_input_ids=hist, output_ids=out, to_tensor=cuda)
    sampler = Sampler("torch", seed=9, num_logprobs=2)
    static = cuda(logits)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph: caches and the device counter are created
            sampler(static, data, param)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sampler(static, data, param)
    # Capturing records the counter's increment without running it: replay i is call 2 + i.
    calls_before_replay = 2
    host_data = SamplingData.from_numpy(all_input_ids=hist, output_ids=out)
    replays = []
    for i in range(3):
        fresh = (np.random.default_rng(100 + i).standard_normal((rows, V)) * 3).astype(np.float32)
        static.copy_(cuda(fresh))
        graph.replay()
        torch.cuda.synchronize()
        got = captured[1].cpu().numpy().copy()
        replays.append(got)
        # The same call done eagerly by a fresh sampler whose counter stands at the replay's call.
        twin = Sampler("numpy", seed=9)
        twin.calls = calls_before_replay + i
        want = twin(fresh, host_data, param.take(np.arange(rows), convert=False))
        np.testing.assert_array_equal(got, want[1])


def test_unseeded_rows_advance_across_replays():
    rows = 8
    cuda = lambda a: torch.from_numpy(a).cuda()
    param = SamplingParam.from_numpy(temperature=np.ones(rows), to_tensor=cuda)
    sampler = Sampler("torch", seed=1)
    static = torch.zeros(rows, 1000, device="cuda")  # uniform rows: any repetition is visible
    sampler(static, None, param)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = sampler(static, None, param)[1]
    draws = []
    for _ in range(4):
        graph.replay()
        draws.append(tokens.cpu().numpy().copy())
    assert len({d.tobytes() for d in draws}) == 4


def test_bfloat16_and_float16_logits():
    logits, kw, hist, out = _batch(8, seed=2)
    param = SamplingParam.from_numpy(**kw)
    for dt in (torch.bfloat16, torch.float16):
        x = torch.from_numpy(logits).to(dt)
        want = Sampler("numpy", seed=0)(x.float().numpy(), None, param)
        got = Sampler("torch", seed=0)(x.cuda(), None, param)
        np.testing.assert_array_equal(got[1].cpu().numpy(), want[1])
