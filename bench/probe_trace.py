"""Where the one-launch path's time goes: %globaltimer stamps inside ``_small_kernel`` (GPU).

    python bench/probe_trace.py [--calls 60] [--dtypes float32 bfloat16]

A probe, not part of the library: it copies ``kernels/triton/pipeline.py`` to a temporary
package, inserts stamps at fixed lines of ``_small_kernel`` and ``_candidates_row``, and runs
the library's own launch code with that module in place of the pipeline. Each stamp is an
atomic min or max of the GPU's global timer (ns) into a spare int64 slot at the end of the
row's candidate weights (``cw``; ~60 of its 2048 slots are used at k = 50), reset by the host
before every call, so a call gives e.g. the last program's arrival at the first barrier. The
table gives each stamp's median over the calls (eager calls, inputs rotated over >= 4x the
L2), in us after the first program started; then CUDA-graph medians of the traced and of the
library's kernel, for the stamps' own cost. Tokens must equal the library's.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sampling import Sampler, SamplingParam  # noqa: E402
from sampling.kernels.triton import launch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import time_graph  # noqa: E402  (bench/ is the script's directory)

# (slot, op, label): op 0 atomic min, 1 atomic max
STAMPS = [
    (0, 0, "first program starts"),
    (1, 1, "last program starts"),
    (2, 1, "last chunk max computed"),
    (3, 1, "last key published"),
    (4, 0, "first has every key"),
    (5, 1, "last has every key"),
    (6, 1, "pivot published"),
    (7, 0, "first sees the pivot"),
    (8, 1, "last sees the pivot"),
    (9, 1, "last candidates appended"),
    (10, 1, "finish starts"),
    (11, 1, "finish: count loaded"),
    (12, 1, "finish: top-k done"),
    (13, 1, "finish: top-p done"),
    (14, 1, "finish: choice done"),
    (15, 1, "finish row done"),
    (16, 1, "last program ends"),
]
NSLOT = len(STAMPS)
#: (function, anchor line, slots, after): a stamp after (or before) the unique line
ANCHORS = [
    ("_small_kernel", "ws = b64 * C + c", (0, 1), True),
    ("_small_kernel", "kmax = tl.maximum(tl.max(tl.where(inr, _okey(y), INT32_MIN)), INT32_MIN + 1)", (2,), True),
    ("_small_kernel", "tl.atomic_xchg(keys_row + c, _enc(kmax), sem=\"relaxed\")", (3,), True),
    ("_small_kernel", "kc = kc ^ INT32_MIN", (4, 5), True),
    ("_small_kernel", "tl.atomic_xchg(flag, _enc(_okey(yth)), sem=\"relaxed\")", (6,), True),
    ("_small_kernel", "yth = _ofloat(f ^ INT32_MIN)", (7, 8), True),
    ("_small_kernel", "if tl.atomic_add(done, 1, sem=\"acq_rel\") == C - 1:", (9,), False),
    ("_small_kernel", "got = tl.zeros([], tl.int32) + B - 1", (10,), False),
    ("_small_kernel", "tl.store(keys_row + cc, 0, mask=cc < C)", (15,), False),
    ("_candidates_row", "kth_ok = active_k & (k <= cnt)", (11,), True),
    ("_candidates_row", "cover_k = active_k & (cnt >= k)", (12,), False),
    ("_candidates_row", "# survivors (and min-p), Gumbel-max, log-sum-exp over survivors", (13,), False),
    ("_candidates_row", "lse = m64 + tl.log(sq.to(tl.float64) / FIX)", (14,), False),
]

STAMP_FN = '''

@triton.jit
def _trace(ptr, s: tl.constexpr, op: tl.constexpr):
    t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    if op == 0:
        tl.atomic_min(ptr - s, t, sem="relaxed")
    else:
        tl.atomic_max(ptr - s, t, sem="relaxed")
'''


def _insert(src: str, anchor: str, text: str, after: bool) -> str:
    """Insert text (lines, with the anchor line's indentation) after / before the unique anchor line."""
    lines = src.split("\n")
    hits = [i for i, ln in enumerate(lines) if ln.strip() == anchor.strip()]
    assert len(hits) == 1, (anchor, len(hits))
    i = hits[0]
    ind = re.match(r"\s*", lines[i]).group(0)
    at = i + 1 if after else i
    lines[at:at] = [ind + t for t in text.split("\n")]
    return "\n".join(lines)


def traced_module():
    """The pipeline module with stamps, imported from a temporary package."""
    kdir = os.path.join(ROOT, "kernels", "triton")
    src = open(os.path.join(kdir, "pipeline.py")).read()
    parts = re.split(r"(?m)^(?=@triton\.jit)", src)  # each jit function with its decorator
    tr = "_trace(cw_ptr + b.to(tl.int64) * CAP + CAP - 1, {}, {})"
    for fn, anchor, slots, after in ANCHORS:
        j = next(j for j, part in enumerate(parts) if f"def {fn}(" in part)
        parts[j] = _insert(parts[j], anchor, "\n".join(tr.format(sl, STAMPS[sl][1]) for sl in slots), after)
    j = next(j for j, part in enumerate(parts) if "def _small_kernel(" in part)
    body, sep, rest = parts[j].partition("\n\n\n#")
    parts[j] = body.rstrip() + "\n    " + tr.format(16, 1) + "\n\n\n" + sep.lstrip("\n") + rest
    out = parts[0] + STAMP_FN + "\n\n" + "".join(parts[1:])
    pkg = tempfile.mkdtemp(prefix="trace_")
    os.makedirs(os.path.join(pkg, "tracedk"))
    open(os.path.join(pkg, "tracedk", "__init__.py"), "w").close()
    open(os.path.join(pkg, "tracedk", "stream.py"), "w").write(open(os.path.join(kdir, "stream.py")).read())
    open(os.path.join(pkg, "tracedk", "pipeline.py"), "w").write(out)
    sys.path.insert(0, pkg)
    return importlib.import_module("tracedk.pipeline")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    args = ap.parse_args()
    V, B = args.vocab, args.rows
    dev = torch.device("cuda")
    KT = traced_module()
    KL = launch.K
    cap = launch.config().cap
    prm = SamplingParam.from_numpy(temperature=np.full(B, 0.7), top_k=np.full(B, 50), top_p=np.full(B, 0.9),
                                   seed=np.arange(B) + 12345, to_tensor=lambda a: torch.from_numpy(a).to(dev))
    for dtn in args.dtypes:
        dt = getattr(torch, dtn)
        nbuf = max(2, -(-4 * 50 * 2**20 // (B * V * dt.itemsize)))
        g = torch.Generator(device=dev).manual_seed(0)
        xs = [(torch.randn(B, V, generator=g, device=dev) * 3).to(dt) for _ in range(nbuf)]
        s_lib = Sampler(backend="triton", seed=1)
        ref = [s_lib(x, None, prm).next_tokens.clone() for x in xs[:args.calls]]
        us_lib = time_graph(torch, lambda i: s_lib(xs[i], None, prm), nbuf)[0]
        launch.K = KT
        try:
            s = Sampler(backend="triton", seed=1)
            s(xs[0], None, prm)
            ws = next(v for k, v in s._state["triton"].items() if isinstance(k, tuple) and k[0] == "ws")
            cw = ws["cw"].view(B, cap)
            init = torch.tensor([2**62 if op == 0 else 0 for _, op, _ in STAMPS][::-1], dtype=torch.int64,
                                device=dev)
            rows, same = [], 0
            for i in range(args.calls):
                cw[:, cap - NSLOT:] = init
                torch.cuda.synchronize()
                out = s(xs[i], None, prm)
                torch.cuda.synchronize()
                same += int(torch.equal(out.next_tokens, ref[i]))
                st = cw[:, cap - NSLOT:].flip(1).cpu().numpy().astype(np.float64)  # [B, slot]
                st[(st == 0) | (st == 2**62)] = np.nan  # (not reached in this call)
                t0 = np.nanmin(st[:, 0])
                rows.append([(np.nanmax(st[:, j]) if STAMPS[j][1] else np.nanmin(st[:, j])) - t0
                             if not np.isnan(st[:, j]).all() else np.nan for j in range(NSLOT)])
            us_tr = time_graph(torch, lambda i: s(xs[i], None, prm), nbuf)[0]
        finally:
            launch.K = KL
        a = np.array(rows, dtype=np.float64) / 1000.0
        print(f"\n{dtn} B={B} V={V}: {args.calls} eager calls, same tokens as the library {same}/{args.calls}")
        prev = 0.0
        for j, (_, op, label) in enumerate(STAMPS):
            col = a[:, j][~np.isnan(a[:, j])]
            if not len(col):
                print(f"  {j:2d} {label:28s}       -")
                continue
            med = statistics.median(col)
            print(f"  {j:2d} {label:28s} {med:7.2f} us  (+{med - prev:5.2f})  p10 {np.percentile(col, 10):6.2f}"
                  f"  p90 {np.percentile(col, 90):6.2f}  ({len(col)} calls)")
            prev = med
        print(f"  graph medians: library {us_lib:.2f} us, traced {us_tr:.2f} us")


if __name__ == "__main__":
    main()
