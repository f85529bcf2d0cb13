"""What one kernel per call would give at B = 1 (S2): a probe of a fused small-batch structure (GPU).

    python bench/probe_fused.py [--chunk 1024 ...] [--warps 4 ...]
    TRITON_INTERPRET=1 python bench/probe_fused.py --check-only --vocab 200 --chunk 32 --warps 1

The pipeline runs three kernels in series (prep: the pivot; scan: chunks and candidates;
finish: the exact top-k / top-p / choice), ~25 us at B = 1 S2 against the target of 15. This
probe fuses them for one row, reusing the pipeline's own functions: every program of the grid
(one per chunk of the row) computes the pivot from the row's sample itself (``_sample``,
``_pivot``), emits its chunk's candidates (one atomic per program for room in the row's list),
then counts itself done (an acquire-release atomic); the last program to arrive runs the
finish's candidate path (``_candidates_row``) and resets the counters for the next call. No
program waits for another, so it also runs under TRITON_INTERPRET=1.

Second mode ("barrier", GPU only, ``--barrier-chunk``): the pivot from the chunks' maxima
behind a grid barrier (``_fused_cm``: the k-th largest chunk max, by an all-pairs compare (SEL 0)
or by each program ranking its own max (SEL 1), or the call before's (SEL 2, for the breakdown)),
and the barrier alone (``--barrier-only``). SEL 1 became ``pipeline._small_kernel`` (NOTES v22).

Scope: S2 only (fp32, temperature, top-k, top-p, seeded rows, "sampling" log-probabilities),
no penalties, no fallback, no NaN checks: a bound on what the structure costs, not a backend.
Its tokens and log-probabilities must equal the pipeline's (same row keys); both are timed in
the same process as CUDA-graph medians over inputs rotated through >= 4x the L2. (Under the
interpreter's small Config, with a 64-value sample, some calls' candidates miss the top-k:
status 2, which the pipeline settles by its fallback and the probe does not.)
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sampling.kernels.triton.pipeline import (  # noqa: E402
    _append_candidates, _candidates_row, _div, _pivot, _recip, _row_flags, _sample,
)


@triton.jit
def _ld_acquire(ptr):
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _wait_for(ptr, target):
    """Spin until the int32 at ptr reaches target (acquire loads; GPU only)."""
    got = _ld_acquire(ptr)
    while got < target:
        got = _ld_acquire(ptr)


@triton.jit
def _chunk(x_ptr, V, CH, CT: tl.constexpr):
    """Program c's chunk of the row: (offsets, mask, values; -inf outside the row)."""
    lanes = tl.arange(0, CT)
    offs = tl.program_id(0) * CH + lanes
    msk = (lanes < CH) & (offs < V)
    return offs, msk, tl.load(x_ptr + offs, mask=msk, other=float("-inf"))


@triton.jit
def _finish_one(V, P, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, theta_ptr, ncand_ptr, cval_ptr, cidx_ptr, cw_ptr,
                cm_ptr, rowkey_ptr, tok_ptr, lp_ptr, status_ptr, CAP, CP: tl.constexpr, FT: tl.constexpr,
                FRL: tl.constexpr, FR: tl.constexpr, NKP: tl.constexpr):
    """The last program's work for the one row: the pipeline's candidate path over its list."""
    b = tl.zeros([], tl.int32)
    cc = tl.arange(0, CP)
    m = tl.max(tl.load(cm_ptr + cc, mask=cc < P, other=float("-inf"), cache_modifier=".cg"))
    greedy, k, p, mp, active_k, active_p, trunc = _row_flags(greedy_ptr, topk_ptr, topp_ptr, minp_ptr, b, V)
    status, tok, lp, tau, lse = _candidates_row(
        b, k, p, mp, active_k, active_p, m, tl.zeros([], tl.float64), theta_ptr, ncand_ptr, cval_ptr, cidx_ptr,
        cw_ptr, rowkey_ptr, CAP, False, FT, FRL, FR, NKP, 0)
    tl.store(tok_ptr, tok.to(tl.int64))
    tl.store(lp_ptr, lp.to(tl.float32))
    tl.store(status_ptr, status)


@triton.jit
def _fused(x_ptr, V, CH, P, temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, theta_ptr, ythr_ptr,
           ncand_ptr, cval_ptr, cidx_ptr, cw_ptr, cm_ptr, done_ptr, rowkey_ptr, tok_ptr, lp_ptr, status_ptr, CAP,
           FAST: tl.constexpr, NS: tl.constexpr, J0: tl.constexpr, CT: tl.constexpr, CP: tl.constexpr,
           FT: tl.constexpr, FRL: tl.constexpr, FR: tl.constexpr, NKP: tl.constexpr,
           PIVOT: tl.constexpr = True, FINISH: tl.constexpr = True):
    c = tl.program_id(0)
    b = tl.zeros([], tl.int32)
    offs, msk, y = _chunk(x_ptr, V, CH, CT)
    if PIVOT:  # (False, for the breakdown: the threshold of the call before)
        sbase, spos, smask, sx = _sample(x_ptr, V, NS)
        # every program computes the same pivot and stores the same theta
        _pivot(sbase, spos, smask, sx, x_ptr, 0, b, V, temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr,
               theta_ptr, ythr_ptr, CAP, False, True, FAST, NS, J0)
        tl.debug_barrier()
    yth = tl.load(ythr_ptr + b, cache_modifier=".cg")
    T = tl.load(temp_ptr + b)
    Y = _recip(T, FAST)
    tl.store(cm_ptr + c, _div(tl.max(y), T, Y, FAST))
    _append_candidates(msk & (y >= yth), y, offs, b, T, Y, ncand_ptr, cval_ptr, cidx_ptr, CAP, True, FAST)
    tl.debug_barrier()
    prev = tl.atomic_add(done_ptr, 1, sem="acq_rel")
    if (prev == P - 1) & (not FINISH):
        tl.store(ncand_ptr + b, 0)
        tl.store(done_ptr, 0)
    if (prev == P - 1) & FINISH:
        _finish_one(V, P, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, theta_ptr, ncand_ptr, cval_ptr, cidx_ptr, cw_ptr,
                    cm_ptr, rowkey_ptr, tok_ptr, lp_ptr, status_ptr, CAP, CP, FT, FRL, FR, NKP)
        tl.store(ncand_ptr + b, 0)
        tl.store(done_ptr, 0)


@triton.jit
def _fused_cm(x_ptr, V, CH, P, temp_ptr, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, theta_ptr,
              ncand_ptr, cval_ptr, cidx_ptr, cw_ptr, cm_ptr, cy_ptr, arrive_ptr, done_ptr, rowkey_ptr, tok_ptr,
              lp_ptr, status_ptr, cnt_ptr, piv_ptr, flag_ptr, CAP, FAST: tl.constexpr, CT: tl.constexpr,
              CP: tl.constexpr,
              FT: tl.constexpr, FRL: tl.constexpr, FR: tl.constexpr, NKP: tl.constexpr, SPIN: tl.constexpr,
              SEL: tl.constexpr):
    """The pivot from the chunks' maxima, behind a grid barrier (GPU only: every program must
    be resident at once; the interpreter runs programs one after another and would spin).
    The k-th largest chunk maximum is <= the row's k-th largest value (k <= P: the k chunks with
    the largest maxima hold k values at least that large), so every top-k value is a candidate."""
    c = tl.program_id(0)
    b = tl.zeros([], tl.int32)
    offs, msk, y = _chunk(x_ptr, V, CH, CT)
    T = tl.load(temp_ptr + b)
    Y = _recip(T, FAST)
    ymax = tl.max(y)
    tl.store(cy_ptr + c, ymax)
    tl.store(cm_ptr + c, _div(ymax, T, Y, FAST))
    tl.debug_barrier()
    seen = tl.atomic_add(arrive_ptr, 1, sem="release") + 1
    while seen < P:
        if SPIN == 0:  # read-modify-writes: every poll queues at the counter's L2 slice
            seen = tl.atomic_add(arrive_ptr, 0, sem="acquire")
        else:  # acquire loads, optionally with a pause between polls
            if SPIN == 2:
                tl.inline_asm_elementwise("nanosleep.u32 64; mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                          is_pure=False, pack=1)
            seen = _ld_acquire(arrive_ptr)
    tl.debug_barrier()
    k = tl.load(topk_ptr + b)
    cc = tl.arange(0, CP)
    ok = cc < P
    cy = tl.load(cy_ptr + cc, mask=ok, other=float("-inf"), cache_modifier=".cg")
    if SEL == 0:
        # the k-th largest: the largest value with >= k values at least as large, rows of the
        # all-pairs compare 64 at a time (a [CP, CP] block would take every register)
        yth = tl.full([], float("-inf"), tl.float32)
        for r0 in tl.static_range(0, CP, 64):
            rr = r0 + tl.arange(0, 64)
            okr = rr < P
            cr = tl.load(cy_ptr + rr, mask=okr, other=float("-inf"), cache_modifier=".cg")
            ge = tl.sum((ok[None, :] & (cy[None, :] >= cr[:, None])).to(tl.int32), axis=1)
            yth = tl.maximum(yth, tl.max(tl.where(okr & (ge >= k), cr, float("-inf"))))
    elif SEL == 1:
        # each program ranks its own maximum (ties by chunk index); the one of rank k - 1 holds
        # the k-th largest and publishes it; the others wait for it (a second barrier)
        rank = tl.sum((ok & ((cy > ymax) | ((cy == ymax) & (cc < c)))).to(tl.int32))
        if rank == k - 1:
            tl.store(piv_ptr, ymax)
            tl.debug_barrier()
            tl.atomic_xchg(flag_ptr, 1, sem="release")
        _wait_for(flag_ptr, 1)
        yth = tl.load(piv_ptr, cache_modifier=".cg")
    else:  # (the breakdown: the pivot of the call before)
        yth = tl.load(piv_ptr, cache_modifier=".cg")
    tl.store(theta_ptr + b, _div(yth, T, Y, FAST))
    _append_candidates(msk & (y >= yth), y, offs, b, T, Y, ncand_ptr, cval_ptr, cidx_ptr, CAP, True, FAST)
    tl.debug_barrier()
    prev = tl.atomic_add(done_ptr, 1, sem="acq_rel")
    if prev == P - 1:
        _finish_one(V, P, greedy_ptr, topk_ptr, topp_ptr, minp_ptr, theta_ptr, ncand_ptr, cval_ptr, cidx_ptr, cw_ptr,
                    cm_ptr, rowkey_ptr, tok_ptr, lp_ptr, status_ptr, CAP, CP, FT, FRL, FR, NKP)
        tl.store(cnt_ptr, tl.load(ncand_ptr + b))
        tl.store(ncand_ptr + b, 0)
        tl.store(arrive_ptr, 0)
        tl.store(flag_ptr, 0)
        tl.store(done_ptr, 0)


@triton.jit
def _grid_barrier(x_ptr, V, CH, arrive_ptr, done_ptr, out_ptr, P, CT: tl.constexpr, WAIT: tl.constexpr,
                  SEM: tl.constexpr):
    """The grid barrier alone: load a chunk, arrive, wait for all P programs (WAIT), count out."""
    c = tl.program_id(0)
    offs, msk, y = _chunk(x_ptr, V, CH, CT)
    tl.store(out_ptr + c, tl.max(y))
    if WAIT:
        tl.debug_barrier()
        seen = tl.atomic_add(arrive_ptr, 1, sem=SEM) + 1
        while seen < P:
            seen = _ld_acquire(arrive_ptr)
    prev = tl.atomic_add(done_ptr, 1, sem="acq_rel")
    if prev == P - 1:
        tl.store(arrive_ptr, 0)
        tl.store(done_ptr, 0)


def main():
    from bench_gpu import time_graph  # (bench/ is the script's directory)

    from sampling import Sampler, SamplingParam
    from sampling.kernels.triton import launch

    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--chunk", type=int, nargs="*", default=[1024, 2048, 4096, 512])
    ap.add_argument("--warps", type=int, nargs="*", default=[4, 8, 16])
    ap.add_argument("--barrier-chunk", type=int, nargs="*", default=[1024, 2048])
    ap.add_argument("--barrier-frl", type=int, nargs="*", default=[1024, 256, 128])
    ap.add_argument("--barrier-spin", type=int, nargs="*", default=[1, 2, 0])
    ap.add_argument("--barrier-sel", type=int, nargs="*", default=[1, 0, 2])
    ap.add_argument("--barrier-only", type=int, nargs="*", default=[])
    ap.add_argument("--check-only", action="store_true", help="no timing (CPU, under TRITON_INTERPRET=1)")
    args = ap.parse_args()
    V = args.vocab
    dev = torch.device("cpu" if args.check_only else "cuda")
    cfg = launch.config()
    nbuf = max(2, -(-4 * 50 * 2**20 // (V * 4)))
    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(1, V, generator=g) * 3).to(dev) for _ in range(nbuf)]
    prm = SamplingParam.from_numpy(temperature=np.array([0.7]), top_k=np.array([50]), top_p=np.array([0.9]),
                                   seed=np.array([12345]), to_tensor=lambda a: torch.from_numpy(a).to(dev))
    s = Sampler(backend="triton", seed=1)
    nref = 4 if args.check_only else 32
    ref = [s(x, None, prm) for x in xs[:nref]]
    ws = next(v for k, v in s._state["triton"].items() if isinstance(k, tuple) and k[0] == "ws")
    rowkey = ws["rowkey"].clone()

    f32 = dict(dtype=torch.float32, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    temp, topp, minp = (torch.tensor([v], **f32) for v in (0.7, 0.9, 0.0))
    greedy, topk = torch.zeros(1, **i32), torch.tensor([50], **i32)
    theta, ythr = torch.empty(1, **f32), torch.empty(1, **f32)
    ncand, done = torch.zeros(1, **i32), torch.zeros(1, **i32)
    cval, cidx = torch.empty(cfg.cap, **f32), torch.empty(cfg.cap, **i32)
    cw = torch.empty(cfg.cap, dtype=torch.int64, device=dev)
    tok, lp, status = torch.empty(1, dtype=torch.int64, device=dev), torch.empty(1, **f32), torch.empty(1, **i32)

    if not args.check_only:
        us_ref = time_graph(torch, lambda i: s(xs[i], None, prm), nbuf)[0]
        print(f"pipeline (prep + scan + finish)           {us_ref:7.2f} us", flush=True)
    for chunk in args.chunk:
        P = triton.cdiv(V, chunk)
        cm = torch.empty(P, **f32)
        for warps, parts in [(w, "") for w in args.warps] + [(8, "no pivot"), (8, "no finish")]:
            if parts and chunk != args.chunk[0]:
                continue

            def fn(i, P=P, cm=cm, chunk=chunk, warps=warps, parts=parts):
                _fused[(P,)](xs[i], V, chunk, P, temp, greedy, topk, topp, minp, theta, ythr, ncand, cval, cidx, cw,
                             cm, done, rowkey, tok, lp, status, cfg.cap, FAST=not args.check_only,
                             NS=cfg.sample, J0=cfg.pivot_j0,
                             CT=triton.next_power_of_2(chunk), CP=triton.next_power_of_2(P), FT=cfg.finish_tile,
                             FRL=cfg.finish_regs_low, FR=cfg.finish_regs, NKP=cfg.finish_pairs,
                             PIVOT=parts != "no pivot", FINISH=parts != "no finish",
                             num_warps=warps, enable_fp_fusion=False)
            same = 0
            for i, r in enumerate(ref):
                fn(i)
                if args.check_only:
                    print("   ", i, tok.item(), int(r.next_tokens[0]), lp.item(), float(r.logprobs[0]), status.item())
                same += int(tok.item() == int(r.next_tokens[0]) and lp.item() == float(r.logprobs[0])
                            and status.item() == 0)
            us = float("nan") if args.check_only else time_graph(torch, fn, nbuf)[0]
            print(f"fused: {P} programs of {chunk}, {warps} warps {parts:9s}  {us:7.2f} us   "
                  f"same token and logprob: {same}/{len(ref)}", flush=True)

    if args.check_only:
        return
    arrive, cnt = torch.zeros(1, **i32), torch.zeros(1, **i32)
    for chunk in args.barrier_only:
        P = triton.cdiv(V, chunk)
        out = torch.empty(P, **f32)
        for warps in args.warps:
            for wait, sem in [(False, "relaxed"), (True, "relaxed"), (True, "release")]:
                def fn(i, P=P, chunk=chunk, out=out, warps=warps, wait=wait, sem=sem):
                    _grid_barrier[(P,)](xs[i], V, chunk, arrive, done, out, P, CT=triton.next_power_of_2(chunk),
                                        WAIT=wait, SEM=sem, num_warps=warps)
                fn(0)
                torch.cuda.synchronize()
                print(f"grid barrier: {P} programs of {chunk}, {warps} warps, wait {wait:d}, {sem:8s} "
                      f"{time_graph(torch, fn, nbuf)[0]:7.2f} us", flush=True)
    # the pivot from the chunks' maxima behind a grid barrier (every program must be resident)
    piv, flag = torch.zeros(1, **f32), torch.zeros(1, **i32)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for chunk in args.barrier_chunk:
        P = triton.cdiv(V, chunk)
        cm, cy = torch.empty(P, **f32), torch.empty(P, **f32)
        for warps in args.warps:
            for frl, spin, sel in [(f, sp, se) for se in args.barrier_sel for sp in args.barrier_spin
                                   for f in args.barrier_frl]:
                kw = dict(CAP=cfg.cap, FAST=True, CT=triton.next_power_of_2(chunk), CP=triton.next_power_of_2(P),
                          FT=cfg.finish_tile, FRL=frl, FR=cfg.finish_regs, NKP=cfg.finish_pairs, SPIN=spin, SEL=sel,
                          num_warps=warps, enable_fp_fusion=False)

                def fn(i, P=P, cm=cm, cy=cy, chunk=chunk, kw=kw):
                    _fused_cm[(P,)](xs[i], V, chunk, P, temp, greedy, topk, topp, minp, theta, ncand, cval, cidx, cw,
                                    cm, cy, arrive, done, rowkey, tok, lp, status, cnt, piv, flag, **kw)
                ck = _fused_cm.warmup(xs[0], V, chunk, P, temp, greedy, topk, topp, minp, theta, ncand, cval, cidx,
                                      cw, cm, cy, arrive, done, rowkey, tok, lp, status, cnt, piv, flag, grid=(P,),
                                      **kw)
                if hasattr(ck, "_init_handles"):
                    ck._init_handles()
                per_sm = min(65536 // max(1, ck.n_regs * 32 * warps), 64 // warps,
                             (228 * 1024) // max(1, ck.metadata.shared))
                if P > per_sm * sms:
                    print(f"barrier: {P} programs of {chunk}, {warps} warps: {per_sm}/SM, not all resident: skipped")
                    continue
                same, ncs = 0, []
                for i, r in enumerate(ref):
                    fn(i)
                    ncs.append(cnt.item())
                    same += int(tok.item() == int(r.next_tokens[0]) and lp.item() == float(r.logprobs[0])
                                and status.item() == 0)
                us = time_graph(torch, fn, nbuf)[0]
                print(f"barrier: {P} programs of {chunk}, {warps} warps, spin {spin}, sel {sel}, FRL {frl:4d} ({ck.n_regs} regs, "
                      f"{per_sm}/SM)  {us:7.2f} us   same: {same}/{len(ref)}   candidates mean {np.mean(ncs):.0f} "
                      f"max {max(ncs)}", flush=True)


if __name__ == "__main__":
    main()
