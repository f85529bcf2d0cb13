"""Would the penalty table's work hide beside the scan? A timing probe (GPU), not part of the library.

    python bench/probe_concurrent.py [--rows 1024] [--dtype bfloat16] [--out DIR]

The library's own launch code runs one decode call of S3c (the request cache's table) and one
of S3 (raw history ids), recording each kernel launch (grid, arguments). The probe then replays
those launches from CUDA graphs in other arrangements:

- ``seq``: prep -> scan -> finish, as the library issues them (``+pdl``: with programmatic
  dependent launch, as the library does; the others without it);
- each kernel alone, the prep at several sizes (warps, register cap) and the scan at several
  programs per SM (registers capped at 80, its cap at 24 per SM);
- ``conc``: the prep on a side stream *beside* the scan (a fork and a join in the graph), then
  the finish; prep and scan sized so that both fit in an SM's 64K registers at once.

In ``conc`` the scan reads a table and thresholds that the prep is rewriting: the tokens are
garbage, only the times mean anything. The question is the time of ``conc`` against the prep
alone plus the scan alone: if the table's work overlapped the scan's read for free, a pipeline
whose prep computed only the pivot (and the bitmask) before the scan could move the rest beside
it (bench/NOTES.md, v26).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampling import Sampler  # noqa: E402
from sampling.kernels.triton import launch  # noqa: E402
from sampling.kernels.triton import pipeline as K  # noqa: E402
from bench_gpu import scenario_inputs, time_graph  # noqa: E402

NAMES = ("_prep_kernel", "_scan_kernel", "_finish_kernel")


class _Recorder:
    def __init__(self, name, fn, log):
        self.name, self.fn, self.log = name, fn, log

    def __getitem__(self, grid):
        def go(*args, **kw):
            self.log.append((self.name, grid, args, dict(kw)))  # recorded, not launched
        return go


def record(fn):
    """The kernel launches of one call of fn(), as {name: (grid, args, kwargs)}."""
    log = []
    saved = {n: getattr(K, n) for n in NAMES}
    try:
        for n in NAMES:
            setattr(K, n, _Recorder(n, saved[n], log))
        fn()
    finally:
        for n, f in saved.items():
            setattr(K, n, f)
    torch.cuda.synchronize()
    return {name: (grid, args, kw) for name, grid, args, kw in log}


def launch_one(rec, name, grid=None, **changes):
    g, args, kw = rec[name]
    kw = dict(kw, **changes)
    if "PDL" in changes:
        kw["launch_pdl"] = changes["PDL"]
    return getattr(K, name)[grid or g](*args, **kw)


def time_us(fn):
    """Median microseconds of fn() replayed from a CUDA graph (the benchmark's timing)."""
    return time_graph(torch, lambda i: fn(), 1)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="/tmp/probe_concurrent")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device("cuda")
    dt = getattr(torch, a.dtype)
    torch.manual_seed(0)
    x = (torch.randn(a.rows, a.vocab, device=dev) * 3).to(dt)
    inp = scenario_inputs(a.rows, a.vocab, lambda v: torch.from_numpy(np.ascontiguousarray(v)).to(dev))
    prm = inp["prm"]["S3"]
    results = {}
    comp = {}

    def note(key, us):
        results[key] = round(us, 1)
        print(f"{key:58s} {us:8.1f}", flush=True)

    def regs(k):
        return f"{k.n_regs} regs, {k.n_spills} spills" if hasattr(k, "n_regs") else "?"

    for sc in ("S3c", "S3", "S2"):
        recs = {}
        for pps in (24, 20, 19, 16, 12):
            s = Sampler(backend="triton", seed=1)
            p = inp["prm"]["S2"] if sc == "S2" else prm
            if sc == "S3c":
                s(x, inp["prefill"], p)
                data = inp["decode"]
            else:
                data = inp["data"] if sc == "S3" else None
            s(x, data, p)  # compile, and (S3c) a first decode step
            with launch.use_config(programs_per_sm_2byte=pps, programs_per_sm=pps):
                recs[pps] = record(lambda: s(x, data, p))
        r24 = recs[24]
        if sc == "S2":
            note(f"{sc} prep alone", time_us(lambda: launch_one(r24, "_prep_kernel", PDL=False)))
            note(f"{sc} scan alone 24/SM", time_us(lambda: launch_one(r24, "_scan_kernel", PDL=False)))
            continue
        note(f"{sc} seq +pdl (the library's call)",
             time_us(lambda: [launch_one(r24, n) for n in NAMES]))
        note(f"{sc} seq", time_us(lambda: [launch_one(r24, n, PDL=False) for n in NAMES]))
        note(f"{sc} finish alone", time_us(lambda: launch_one(r24, "_finish_kernel", PDL=False)))
        preps = [(8, 128), (8, 96), (4, 128), (4, 112)]
        for w, rg in preps:
            k = launch_one(r24, "_prep_kernel", PDL=False, num_warps=w, maxnreg=rg)
            comp[f"{sc} prep {w}w@{rg}"] = regs(k)
            note(f"{sc} prep alone {w} warps, <= {rg} regs ({regs(k)})",
                 time_us(lambda: launch_one(r24, "_prep_kernel", PDL=False, num_warps=w, maxnreg=rg)))
        for pps in (24, 20, 19, 16, 12):
            k = launch_one(recs[pps], "_scan_kernel", PDL=False, maxnreg=80)
            comp[f"{sc} scan {pps}"] = regs(k)
            note(f"{sc} scan alone {pps}/SM ({regs(k)})",
                 time_us(lambda: launch_one(recs[pps], "_scan_kernel", PDL=False, maxnreg=80)))
        side = torch.cuda.Stream()
        for pps, w, rg in ((20, 4, 112), (19, 4, 128), (16, 8, 96), (12, 8, 128)):
            rec = recs[pps]

            def conc(finish):
                main = torch.cuda.current_stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    launch_one(rec, "_prep_kernel", PDL=False, num_warps=w, maxnreg=rg)
                launch_one(rec, "_scan_kernel", PDL=False, maxnreg=80)
                main.wait_stream(side)
                if finish:
                    launch_one(rec, "_finish_kernel", PDL=False)

            note(f"{sc} conc: scan {pps}/SM || prep {w}w@{rg}, then finish", time_us(lambda: conc(True)))
            note(f"{sc} conc: scan {pps}/SM || prep {w}w@{rg} (no finish)", time_us(lambda: conc(False)))
    json.dump(dict(rows=a.rows, vocab=a.vocab, dtype=a.dtype, us=results, compiled=comp,
                   gpu=torch.cuda.get_device_name(), torch=torch.__version__),
              open(os.path.join(a.out, "probe_concurrent.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
