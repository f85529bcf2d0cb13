"""How long the finish's exact k-th search takes, and what other ways of finding it cost (GPU).

    python bench/probe_select.py [--k 50]

The finish (one program per row, 4 warps) holds a row's candidates (every value >= the pivot
theta: ~520 per row at k = 50, V = 151936) in a 1024-slot register array and finds the exact
k-th largest by a bisection on the values' int32 keys (pipeline._key_search, one block-wide
count per step, ~20 steps). This probe times that search alone against:

- radix: an MSD radix select, RB bits a round: a histogram of the digits (tl.histogram), its
  prefix sums, and the digit holding the k-th largest; ~2-3 rounds instead of ~20 steps;
- sort: tl.sort of the keys (bitonic), then the (k-1)-th element;
- none: the loads and the row maximum only (the floor every variant shares).

Each variant runs in a kernel of one program per row, on G rows at once (G = 1: the finish of
B = 1; G = 256: one program per row of B = 256), timed as CUDA-graph replay medians per launch
(bench_gpu.time_graph). Every variant's cut must select the same set as the bisection's.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_gpu import time_graph  # noqa: E402  (bench/ is the script's directory)
from sampling.kernels.triton.pipeline import INT32_MIN, _key_search, _okey  # noqa: E402


@triton.jit
def _radix_kth(keys, valid, k, lo, hi, RB: tl.constexpr):
    """The exact k-th largest valid key, given lo <= it <= hi (int32 keys, lo, hi int32)."""
    NB: tl.constexpr = 1 << RB
    d_ids = tl.arange(0, NB)
    u = (keys - lo).to(tl.uint32, bitcast=True)  # offsets from lo, for every key >= lo
    rng = (hi - lo).to(tl.uint32, bitcast=True)
    # bit length of the range, and the first digit's shift
    # (the float's exponent: rounding up at most adds one bit, which widens the first window)
    nb = tl.maximum(((rng.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 255) - 126, 0)
    shift = tl.maximum(nb - RB, 0)
    base = tl.zeros([], tl.uint32)
    need = k
    done = False
    while not done:
        off = u - base
        d = (off >> shift.to(tl.uint32)).to(tl.int32)
        inr = valid & (u >= base) & (d < NB)
        h = tl.histogram(d, NB, mask=inr)
        c = tl.cumsum(h, 0)
        tot = tl.sum(h)
        suf = tot - c + h  # keys in the window with digit >= i
        j = tl.max(tl.where(suf >= need, d_ids, -1))
        sh = tl.sum(tl.where(d_ids == j, (suf << 16) | h, 0))
        sj = sh >> 16
        hj = sh & 65535
        base = base + (j.to(tl.uint32) << shift.to(tl.uint32))
        done = (sj == need) | (shift == 0)
        need = need - (sj - hj)
        shift = tl.maximum(shift - RB, 0)
    return (base.to(tl.int32, bitcast=True) + lo)


@triton.jit
def _probe(v_ptr, cnt_ptr, th_ptr, out_ptr, k, N: tl.constexpr, METHOD: tl.constexpr, RB: tl.constexpr):
    r = tl.program_id(0)
    i = tl.arange(0, N)
    cnt = tl.load(cnt_ptr + r)
    ok = i < cnt
    v = tl.load(v_ptr + r.to(tl.int64) * N + i, mask=ok, other=float("-inf"))
    keys = _okey(v)
    kmax = tl.max(tl.where(ok, keys, INT32_MIN))
    lo = _okey(tl.load(th_ptr + r))
    if METHOD == 0:
        cut = kmax
    elif METHOD == 1:
        cut = _key_search(keys, ok, k, k, lo.to(tl.int64), kmax.to(tl.int64), 1, 0)
    elif METHOD == 2:
        cut = _radix_kth(keys, ok, k, lo, kmax, RB)
    else:
        s = tl.sort(tl.where(ok, keys, INT32_MIN), descending=True)
        cut = tl.sum(tl.where(i == k - 1, s, 0))
    tl.store(out_ptr + r, cut)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", type=int, default=256)
    args = ap.parse_args()
    dev = torch.device("cuda")
    N = 1024
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = args.rows
    vals = torch.full((rows, N), float("-inf"))
    cnt = torch.randint(420, 640, (rows,), generator=g, dtype=torch.int32)
    th = torch.empty(rows)
    for r in range(rows):
        x = torch.randn(args.vocab, generator=g) * 3
        top = torch.topk(x, int(cnt[r])).values
        vals[r, : int(cnt[r])] = top[torch.randperm(int(cnt[r]), generator=g)]
        th[r] = top[-1]
    vals, cnt, th = vals.to(dev), cnt.to(dev), th.to(dev)
    kth = torch.topk(vals, args.k, dim=1).values[:, -1]
    want = (vals >= kth[:, None]).sum(1)

    variants = [("none (loads, max)", 0, 8), ("bisection (the finish's)", 1, 8), ("radix 8 bits", 2, 8),
                ("radix 6 bits", 2, 6), ("radix 4 bits", 2, 4), ("tl.sort", 3, 8)]
    print(f"{'variant':28s} {'G=1 us':>8s} {'G=256 us':>9s}  same set")
    for name, method, rb in variants:
        out = torch.empty(rows, dtype=torch.int32, device=dev)
        _probe[(rows,)](vals, cnt, th, out, args.k, N=N, METHOD=method, RB=rb, num_warps=4)
        torch.cuda.synchronize()
        if method:
            cutv = (out ^ ((out >> 31) & 0x7FFFFFFF)).view(torch.float32)
            same = bool(((vals >= cutv[:, None]).sum(1) == want).all())
        else:
            same = "-"
        times = []
        for G in (1, rows):
            def fn(i, G=G):
                _probe[(G,)](vals, cnt, th, out, args.k, N=N, METHOD=method, RB=rb, num_warps=4)
            times.append(time_graph(torch, fn, 1, min_calls=200)[0])
        print(f"{name:28s} {times[0]:8.2f} {times[1]:9.2f}  {same}", flush=True)


if __name__ == "__main__":
    main()
