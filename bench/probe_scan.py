"""What the scan's structure costs without its arithmetic: a read-only probe (GPU).

    python bench/probe_scan.py [--rows 256] [--vocab 151936]

The scan kernel reads each row in chunks, one chunk per persistent work item, one warp per
program and a tile of 256 float32 per loop step, the next tile loaded by hand while the current
one computes. This probe keeps that structure and replaces the arithmetic with a running max plus
``work`` dependent FMAs per element and, optionally, the candidate emission of truncated rows
(``emit``: a warp vote per tile, then stores of the values above a threshold into private slots,
in several forms), so that the table shows the floor of the structure itself against
``torch.amax`` and what each kind of work on a tile's critical path adds (bench/NOTES.md, v11). CUDA-graph medians over inputs
rotated through >= 4x the L2, as in bench_gpu.py.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from bench_gpu import time_graph  # (bench/ is the script's directory)


@triton.jit
def _probe(x_ptr, stride, V, CH, B, NITEMS, out_ptr, thr, pv_ptr, pi_ptr, TILE: tl.constexpr, WORK: tl.constexpr,
           AHEAD: tl.constexpr, EMIT: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, TILE)
    for w in range(pid, NITEMS, nprog):
        c = w // B
        b = w - c * B
        x_row = x_ptr + b.to(tl.int64) * stride
        start = c * CH
        end = tl.minimum(start + CH, V)
        acc = tl.full([TILE], float("-inf"), tl.float32)
        acc2 = tl.zeros([TILE], tl.float32)
        ccnt = tl.zeros([TILE], tl.int32)
        pbase = w.to(tl.int64) * (D * TILE)
        xn = tl.load(x_row + start + lanes, mask=start + lanes < end, other=float("-inf"))
        if AHEAD == 2:
            xnn = tl.load(x_row + start + TILE + lanes, mask=start + TILE + lanes < end, other=float("-inf"))
        for s0 in range(start, end, TILE):
            offs = s0 + lanes
            x = xn
            if AHEAD == 2:
                xn = xnn
                xnn = tl.load(x_row + offs + 2 * TILE, mask=offs + 2 * TILE < end, other=float("-inf"))
            else:
                xn = tl.load(x_row + offs + TILE, mask=offs + TILE < end, other=float("-inf"))
            acc = tl.maximum(acc, x)
            t = x
            for _ in tl.static_range(WORK):
                t = tl.fma(t, 0.999, 0.5)
            acc2 += t
            if EMIT > 0:
                # the scan's candidate emission: a vote, then private slots per tile position
                sel = x >= thr
                if EMIT >= 7:  # no vote: the stores are always issued, predicated per element
                    slot = pbase + ccnt * TILE + lanes
                    keep = sel & (ccnt < D)
                    if EMIT == 7:
                        tl.store(pv_ptr + slot, x, mask=keep)
                        tl.store(pi_ptr + slot, offs, mask=keep)
                    else:
                        packed = (offs.to(tl.int64) << 32) | x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
                        tl.store(pi_ptr.to(tl.pointer_type(tl.int64)) + slot, packed, mask=keep)
                    ccnt += sel.to(tl.int32)
                    go = False
                elif EMIT == 3:
                    go = tl.max((x - thr).to(tl.int32, bitcast=True)) >= 0
                else:
                    go = tl.max(sel.to(tl.int32)) > 0
                if go:
                    if EMIT == 2 or EMIT == 3:
                        slot = pbase + ccnt * TILE + lanes
                        keep = sel & (ccnt < D)
                        tl.store(pv_ptr + slot, x, mask=keep)
                        tl.store(pi_ptr + slot, offs, mask=keep)
                    if EMIT == 4:  # value and id in one 8-byte store
                        slot = pbase + ccnt * TILE + lanes
                        keep = sel & (ccnt < D)
                        packed = (offs.to(tl.int64) << 32) | x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
                        tl.store(pi_ptr.to(tl.pointer_type(tl.int64)) + slot, packed, mask=keep)
                    if EMIT == 5:  # ids only
                        slot = pbase + ccnt * TILE + lanes
                        keep = sel & (ccnt < D)
                        tl.store(pi_ptr + slot, offs, mask=keep)
                    if EMIT == 6:  # one compact list per item: a tile's prefix sum
                        si = sel.to(tl.int32)
                        pos = tl.sum(ccnt) // TILE + tl.cumsum(si, 0) - si
                        keep = sel & (pos < D * TILE)
                        tl.store(pv_ptr + pbase + pos, x, mask=keep)
                        tl.store(pi_ptr + pbase + pos, offs, mask=keep)
                        ccnt += tl.sum(si)
                    if EMIT != 6:
                        ccnt += sel.to(tl.int32)
        tl.store(out_ptr + w, tl.max(acc) + tl.sum(acc2) * 0.0 + tl.sum(ccnt).to(tl.float32))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    args = ap.parse_args()
    rows, vocab = args.rows, args.vocab
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    nbuf = max(2, -(-4 * 50 * 2**20 // (rows * vocab * 4)))
    xs = [torch.randn(rows, vocab, device=dev) * 3 for _ in range(nbuf)]
    out = torch.empty(1 << 16, device=dev)
    res = []

    def add(name, fn):
        us = time_graph(torch, fn, nbuf)[0]
        res.append((name, us))
        print(f"{name:48s} {us:8.1f} us", flush=True)

    add("torch.amax", lambda i: torch.amax(xs[i], dim=-1))
    D = 16
    pv = torch.empty(sms * 32 * D * 1024, device=dev)
    pi = torch.empty(sms * 32 * D * 1024, device=dev, dtype=torch.int32)
    # emit: 0 none; 1 the vote and counters; 2 with the stores; 3 the stores behind a float-bits vote;
    # 4 one 8-byte store per candidate; 5 ids only; 6 a compact list per item (tile prefix sums);
    # 7 no vote, stores predicated per element; 8 the same with one 8-byte store
    # thr = 8.15: ~500 of 151936 randn * 3 values per row (S2's candidates), in ~57% of the tiles;
    # 9.27: ~150
    for warps, tile, per_sm, ahead, work, emit, thr in [
        (1, 256, 16, 1, 0, 0, 8.15), (1, 256, 16, 1, 32, 0, 8.15), (1, 256, 16, 1, 0, 1, 8.15),
        (1, 256, 16, 1, 0, 2, 8.15), (1, 256, 16, 1, 0, 3, 8.15), (1, 256, 16, 1, 0, 4, 8.15),
        (1, 256, 16, 1, 0, 5, 8.15), (1, 256, 16, 1, 0, 6, 8.15),
        (1, 256, 16, 1, 0, 1, 9.27), (1, 256, 16, 1, 0, 2, 9.27), (1, 256, 16, 1, 0, 6, 9.27),
        (1, 256, 16, 1, 0, 7, 8.15), (1, 256, 16, 1, 0, 8, 8.15), (1, 256, 16, 1, 0, 7, 9.27),
        (1, 256, 16, 2, 0, 1, 8.15), (1, 256, 16, 2, 0, 7, 8.15),
    ]:

        nprog = per_sm * sms
        tiles = triton.cdiv(vocab, tile)
        chunks = max(1, min(nprog // rows, tiles // 4))
        ch = triton.cdiv(tiles, chunks) * tile
        nitems = rows * chunks
        grid = (min(nprog, nitems),)

        def fn(i, warps=warps, tile=tile, work=work, ahead=ahead, grid=grid, ch=ch, nitems=nitems, emit=emit, thr=thr):
            _probe[grid](xs[i], xs[i].stride(0), vocab, ch, rows, nitems, out, thr, pv, pi, TILE=tile, WORK=work,
                         AHEAD=ahead, EMIT=emit, D=D, num_warps=warps,
                         maxnreg=min(248, 65536 // (per_sm * warps * 32) // 8 * 8))
        add(f"warps={warps} tile={tile} per_sm={per_sm} ahead={ahead} work={work} emit={emit} thr={thr}", fn)


if __name__ == "__main__":
    main()
