"""GPU benchmark: the Triton backend side by side with FlashInfer, torch and a one-read floor.

One command, one process::

    python bench/bench_gpu.py --out bench/results            # full grid (priority order)
    python bench/bench_gpu.py --out DIR --budget-s 300       # stop after ~300 s, list what was skipped

Writes ``gpu_bench.json`` (one record per measurement, each with GPU, versions, commit and
date), ``gpu_bench.md`` (the table) and ``gpu_bench.png`` (plotting imports matplotlib lazily,
after all timing is done). Times are medians of CUDA-graph replays; each graph runs the
operation over a rotation of input buffers totalling several times the 50 MB L2, so every call
reads its logits from HBM.

Scenarios (k = 50, p = 0.9, T = 0.7 given as per-row arrays):
S1 plain sampling + logprob; S2 top-k + top-p + sample + logprob; S3 penalties (1024-token
prompt + 512 output ids per row: repetition 1.1, frequency 0.2, presence 0.3) + temperature +
top-k + top-p + min-p 0.05 + logprob, from raw history ids; S3c the same from the request
cache's state (prefilled once with the same histories, untimed; each timed call is a decode
step that appends the previous call's tokens); S4 greedy with the same penalties.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np

L2_BYTES = 50 * 2**20
SCENARIOS = ("S1", "S2", "S3", "S3c", "S4")


# ----------------------------------------------------------------------------- environment


def _commit() -> str:
    if os.environ.get("SAMPLING_COMMIT"):
        return os.environ["SAMPLING_COMMIT"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _flashinfer():
    """flashinfer.sampling, or None. Falls back to loading the subpackage without the top-level
    __init__ (which imports many optional dependencies unrelated to sampling)."""
    try:
        import flashinfer.sampling as fs

        return fs
    except Exception as first:
        import importlib.util
        import types

        for name in [m for m in sys.modules if m == "flashinfer" or m.startswith("flashinfer.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("flashinfer")
        if spec is None:
            print(f"flashinfer unavailable: {first!r}")
            return None
        pkg = types.ModuleType("flashinfer")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["flashinfer"] = pkg
        try:
            import flashinfer.sampling as fs

            return fs
        except Exception as second:
            print(f"flashinfer unavailable: {first!r} / {second!r}")
            return None


# ----------------------------------------------------------------------------- timing


def time_graph(torch, fn, nbuf, min_calls=20, repeats=15):
    """Median microseconds per call of ``fn(i)`` replayed from a CUDA graph over ``nbuf`` buffers.

    A first graph of one pass over the buffers gives the GPU time per call (without the host's
    overhead, which can exceed the GPU time: the request cache's bookkeeping); slow methods
    (> 2 ms per call) are timed from that graph with fewer repeats, the others from a graph of
    >= min_calls calls."""

    def capture(inner):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                for i in range(nbuf):
                    fn(i)
        graph.replay()
        torch.cuda.synchronize()
        return graph

    def replay_us(graph, calls, n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(n):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000.0 / calls)
        return times

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(nbuf):
            fn(i)
        torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = capture(1)
    if min(replay_us(graph, nbuf, 2)) > 2e3:  # slow baselines: the device budget goes to the fast rows
        times = replay_us(graph, nbuf, 5)
    else:
        del graph
        inner = max(1, math.ceil(min_calls / nbuf))
        graph = capture(inner)
        times = replay_us(graph, inner * nbuf, repeats)
    del graph
    return statistics.median(times), "graph"


def time_eager(torch, fn, nbuf, repeats=15):
    for i in range(nbuf):
        fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        for i in range(nbuf):
            fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / nbuf)
    return statistics.median(times), "eager"


def scenario_inputs(rows: int, vocab: int, cuda) -> dict:
    """The issue's inputs for one batch size: T = 0.7, k = 50, p = 0.9, min-p 0.05, penalties over
    a 1024-token prompt and 512 output ids, a seed per row, as per-row arrays; ``prm`` holds the
    SamplingParam of each scenario, ``data`` the histories (S3, S4), and ``prefill`` / ``decode``
    the same histories as cached requests (S3c)."""
    from sampling import SamplingData, SamplingParam

    rng = np.random.default_rng(rows)
    seeds = rng.integers(0, 2**62, rows)
    T = np.full(rows, 0.7)
    out_ids = rng.integers(0, vocab, (rows, 512))
    all_ids = np.concatenate([rng.integers(0, vocab, (rows, 1024)), out_ids], axis=1)
    data = SamplingData.from_numpy(all_input_ids=all_ids, output_ids=out_ids, to_tensor=cuda)
    pen = dict(repetition_penalty=np.full(rows, 1.1), frequency_penalty=np.full(rows, 0.2),
               presence_penalty=np.full(rows, 0.3))
    prm = {
        "S1": SamplingParam.from_numpy(temperature=T, seed=seeds, to_tensor=cuda),
        "S2": SamplingParam.from_numpy(temperature=T, top_k=np.full(rows, 50), top_p=np.full(rows, 0.9),
                                       seed=seeds, to_tensor=cuda),
        "S3": SamplingParam.from_numpy(temperature=T, top_k=np.full(rows, 50), top_p=np.full(rows, 0.9),
                                       min_p=np.full(rows, 0.05), seed=seeds, to_tensor=cuda, **pen),
        "S4": SamplingParam.from_numpy(temperature=np.zeros(rows), seed=seeds, to_tensor=cuda, **pen),
    }
    prm["S3c"] = prm["S3"]
    rids = np.arange(rows)
    prefill = SamplingData.from_numpy(all_input_ids=all_ids, output_ids=out_ids, request_ids=rids,
                                      is_prefill=True, to_tensor=cuda)
    decode = SamplingData.from_numpy(request_ids=rids, is_prefill=False)
    return dict(T=T, all_ids=all_ids, out_ids=out_ids, data=data, pen=pen, prm=prm, prefill=prefill, decode=decode)


def sampler_call(Sampler, backend, sc, inputs, bufs):
    """``fn(i)``: one call of a fresh sampler on buffer i in scenario sc. S3c prefills the
    cache first (untimed), so that every call of fn is a decode step from the cached state:
    each adds the tokens of the call before to the cached rows. Graph replays add them on the
    device only (a row that fills its 2048 columns drops its largest new ids: same work)."""
    s = Sampler(backend=backend, seed=1)
    prm = inputs["prm"][sc]
    if sc == "S3c":
        s(bufs[0], inputs["prefill"], prm)
        data = inputs["decode"]
    else:
        data = inputs["data"] if sc in ("S3", "S4") else None
    return lambda i: s(bufs[i], data, prm)


def measure(torch, fn, nbuf):
    try:
        return time_graph(torch, fn, nbuf)
    except Exception as e:  # some third-party paths cannot be captured
        torch.cuda.synchronize()
        print(f"    graph capture failed ({type(e).__name__}: {str(e)[:120]}); timing eagerly")
        return time_eager(torch, fn, nbuf)


# ----------------------------------------------------------------------------- methods


def sort_pipeline(torch, x, T, k, p, mp=None, rep=None, out=None, pen=None, greedy=False):
    """The common engine fallback: dense penalties, sort, masks, softmax, exponential race."""
    z = x.float()
    if rep is not None:
        rows, vocab = z.shape
        seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=z.device)
        seen.scatter_(1, rep.clamp(0, vocab), True)
        seen = seen[:, :vocab]
        r, f, pr = pen
        z = torch.where(seen, torch.where(z > 0, z / r[:, None], z * r[:, None]), z)
        cnt = torch.zeros(rows, vocab + 1, dtype=torch.int32, device=z.device)
        cnt.scatter_add_(1, out.clamp(0, vocab), torch.ones_like(out, dtype=torch.int32))
        cnt = cnt[:, :vocab]
        z = z - f[:, None] * cnt - pr[:, None] * (cnt > 0)
    if greedy:
        tok = z.argmax(-1)
        return z.log_softmax(-1).gather(1, tok[:, None]), tok
    z = z / T[:, None]
    if k is not None:
        zs, idx = z.sort(dim=-1)
        vocab = z.shape[1]
        kth = zs.gather(1, (vocab - k).clamp(0, vocab - 1)[:, None])
        zs = zs.masked_fill(zs < kth, float("-inf"))
        cum = zs.softmax(-1).cumsum(-1)
        drop = cum <= (1 - p)[:, None]
        drop[:, -1] = False
        zs = zs.masked_fill(drop, float("-inf"))
        z = torch.empty_like(zs).scatter_(1, idx, zs)
        if mp is not None:
            probs = z.softmax(-1)
            z = z.masked_fill(probs < mp[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    probs = z.softmax(-1)
    q = torch.empty_like(probs).exponential_()
    tok = (probs / q).argmax(-1)
    return z.log_softmax(-1).gather(1, tok[:, None]), tok


def decode_steps(torch, cuda, Sampler, SamplingData, SamplingParam, rows=8, vocab=49152, steps=40):
    """Wall time of consecutive synchronised calls whose history grows by one id per step, as in
    a decode loop (the first call compiles; later ones must not, whatever the width)."""
    rng = np.random.default_rng(0)
    s = Sampler(backend="triton", seed=1)
    prompt = rng.integers(0, vocab, (rows, 20))
    out = np.zeros((rows, 0), np.int64)
    param = SamplingParam.from_numpy(temperature=np.full(rows, 0.7), top_k=np.full(rows, 50),
                                     top_p=np.full(rows, 0.9), repetition_penalty=np.full(rows, 1.1),
                                     frequency_penalty=np.full(rows, 0.2), to_tensor=cuda)
    times = []
    for _ in range(steps):
        x = torch.randn(rows, vocab, device="cuda") * 3
        data = SamplingData.from_numpy(all_input_ids=np.concatenate([prompt, out], axis=1),
                                       output_ids=out, to_tensor=cuda) if out.shape[1] else None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tok = s(x, data, param)[1]
        torch.cuda.synchronize()
        times.append(round((time.perf_counter() - t0) * 1e3, 2))
        out = np.concatenate([out, tok.cpu().numpy()[:, None]], axis=1)
    return times


# ----------------------------------------------------------------------------- main grid


def run(args):
    import torch
    import triton

    from sampling import Sampler, SamplingData, SamplingParam
    from sampling import backends

    fs = None if args.no_flashinfer else _flashinfer()
    meta = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        flashinfer=getattr(sys.modules.get("flashinfer"), "__version__", None) if fs else None,
        commit=_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    if fs is not None:
        try:
            import importlib.metadata as im

            meta["flashinfer"] = im.version("flashinfer-python")
        except Exception:
            pass
    print(json.dumps(meta))
    if fs is not None:
        # Build FlashInfer's JIT modules first, so a time budget never cuts them off mid-build.
        for dt in args.dtypes:
            xw = torch.randn(4, 151936, device="cuda").to(getattr(torch, dt))
            sd = torch.tensor([1], dtype=torch.int64, device="cuda")
            for name, call in (
                ("sampling_from_logits", lambda: fs.sampling_from_logits(xw, seed=sd, offset=sd)),
                ("top_k_top_p int k", lambda: fs.top_k_top_p_sampling_from_logits(xw, 50, 0.9, seed=sd, offset=sd)),
                ("top_k_top_p per-row", lambda: fs.top_k_top_p_sampling_from_logits(
                    xw, torch.full((4,), 50, dtype=torch.int32, device="cuda"),
                    torch.full((4,), 0.9, device="cuda"), seed=sd, offset=sd)),
            ):
                t0 = time.time()
                try:
                    call()
                    torch.cuda.synchronize()
                    print(f"flashinfer {name} {dt}: ready in {time.time() - t0:.1f} s")
                except Exception as e:
                    print(f"flashinfer {name} {dt} failed: {e!r}")
    if args.warm_flashinfer_only:
        return [], [], meta
    have_torch_backend = "torch" in backends.available()
    dev = torch.device("cuda")
    cuda = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
    meta["decode_steps_ms"] = decode_steps(torch, cuda, Sampler, SamplingData, SamplingParam)
    print("decode steps (ms, B=8, V=49152, growing history):", meta["decode_steps_ms"])

    shapes = [(256, 151936), (1, 151936), (1024, 151936), (32, 151936),
              (256, 128256), (1, 128256), (1024, 128256), (32, 128256)]
    if args.batches:
        shapes = [s for s in shapes if s[0] in args.batches]
    if args.vocabs:
        shapes = [s for s in shapes if s[1] in args.vocabs]
    dtypes = args.dtypes
    order = []
    for shape in shapes:
        for dt in dtypes:
            order.append((shape, dt))
    records, skipped = [], []
    t_start = time.time()
    fi_warm = set()
    for (rows, vocab), dtname in order:
        if time.time() - t_start > args.budget_s:
            skipped.append(f"B={rows} V={vocab} {dtname}")
            continue
        dtype = getattr(torch, dtname)
        item = torch.tensor([], dtype=dtype).element_size()
        nbytes = rows * vocab * item
        nbuf = int(min(args.max_buffers, max(2, math.ceil(4 * L2_BYTES / nbytes))))
        g = torch.Generator(device=dev).manual_seed(rows * 7 + vocab)
        bufs = [(torch.randn(rows, vocab, device=dev, generator=g) * 3).to(dtype) for _ in range(nbuf)]
        sc_in = scenario_inputs(rows, vocab, cuda)
        T, all_ids, out_ids, pen_np = (sc_in[k] for k in ("T", "all_ids", "out_ids", "pen"))
        Tt = cuda(T.astype(np.float32))
        kt = cuda(np.full(rows, 50, np.int64))
        pt = cuda(np.full(rows, 0.9, np.float32))
        mpt = cuda(np.full(rows, 0.05, np.float32))
        rep_t, out_t = cuda(all_ids), cuda(out_ids)
        pen_t = tuple(cuda(v.astype(np.float32)) for v in pen_np.values())
        fi_seed = torch.tensor([1234], dtype=torch.int64, device=dev)
        fi_off = torch.tensor([0], dtype=torch.int64, device=dev)
        k32 = kt.to(torch.int32)

        def nbuf_of(sc):
            # S3c: the host counts every eager and captured call's new token against a row's
            # 2048 columns (~1530 used) and widens the table from the host when they run out,
            # which a graph capture cannot do: at most 120 buffers keep the ~3 x 120 + 24 calls
            # of time_graph and profile_kernels within them (at B = 1: 73 MB, 1.4x the L2)
            return min(nbuf, 120) if sc == "S3c" else nbuf

        def add(scenario, method, us, how, note=""):
            rec = dict(meta, rows=rows, vocab=vocab, dtype=dtname, scenario=scenario, method=method,
                       us=round(us, 2), gbps=round(nbytes / us / 1e3, 1), timing=how, buffers=nbuf, note=note)
            records.append(rec)
            print(f"  {dtname:8s} B={rows:5d} V={vocab} {scenario} {method:34s} {us:9.1f} us {rec['gbps']:7.0f} GB/s [{how}]")

        floor, how = measure(torch, lambda i: torch.amax(bufs[i], dim=-1), nbuf)
        for sc in args.scenarios:
            add(sc, "one read (torch.amax)", floor, how)
        for sc in args.scenarios:
            fn = None
            try:
                fn = sampler_call(Sampler, "triton", sc, sc_in, bufs)
                us, how = measure(torch, fn, nbuf_of(sc))
                tok = fn(0)[1]
                ok = bool(((tok >= 0) & (tok < vocab)).all())
                add(sc, "ours (triton)", us, how, "" if ok else "INVALID TOKENS")
            except Exception as e:
                print(f"    ours failed: {e!r}")
                add(sc, "ours (triton)", float("nan"), "failed", repr(e)[:200])
            first = (rows, vocab, dtname) == (shapes[0][0], shapes[0][1], dtypes[0])
            from sampling.kernels.triton import launch as tl_launch

            for spec in args.variant:
                # NAME[@B]:field=value,...: on the first shape, or on every shape with B rows
                name, _, kv = spec.partition(":")
                name, _, only = name.partition("@")
                if not (int(only) == rows if only else first):
                    continue
                changes = {k: int(float(v)) for k, v in (p.split("=") for p in kv.split(",") if p)}
                try:
                    with tl_launch.use_config(**changes):
                        vfn = sampler_call(Sampler, "triton", sc, sc_in, bufs)
                        us, how = measure(torch, vfn, nbuf_of(sc))
                        if args.profile and rows in args.profile:
                            meta.setdefault("kernel_us", {})[f"{dtname} B={rows} {sc} [{name}]"] = \
                                profile_kernels(torch, vfn, nbuf_of(sc))
                    add(sc, f"ours [{name}]", us, how, kv)
                except Exception as e:
                    print(f"    variant {name} failed: {e!r}")
            if args.profile and rows in args.profile and fn is not None:
                meta.setdefault("kernel_us", {})[f"{dtname} B={rows} {sc}"] = profile_kernels(torch, fn, nbuf_of(sc))
            if have_torch_backend and not args.no_torch_backend and rows in (1, 256):
                try:
                    us, how = measure(torch, sampler_call(Sampler, "torch", sc, sc_in, bufs), nbuf_of(sc))
                    add(sc, "torch backend", us, how)
                except Exception as e:
                    print(f"    torch backend failed: {e!r}")
            if sc == "S1":
                fn = lambda i: sort_pipeline(torch, bufs[i], Tt, None, None)  # noqa: E731
            elif sc == "S2":
                fn = lambda i: sort_pipeline(torch, bufs[i], Tt, kt, pt)  # noqa: E731
            elif sc == "S3":
                fn = lambda i: sort_pipeline(torch, bufs[i], Tt, kt, pt, mpt, rep_t, out_t, pen_t)  # noqa: E731
            elif sc == "S4":
                fn = lambda i: sort_pipeline(torch, bufs[i], Tt, None, None, None, rep_t, out_t, pen_t, greedy=True)  # noqa: E731
            else:  # S3c: the sort pipeline has no cached state (its S3 row applies)
                fn = None
            try:
                if fn is not None:
                    us, how = measure(torch, fn, nbuf)
                    add(sc, "torch sort pipeline", us, how)
            except Exception as e:
                print(f"    sort pipeline failed: {e!r}")
            if fs is not None and sc in ("S1", "S2"):
                if sc == "S1":
                    cands = {"flashinfer sampling_from_logits":
                             lambda i: fs.sampling_from_logits(bufs[i], seed=fi_seed, offset=fi_off)}
                else:
                    cands = {
                        "flashinfer top_k_top_p (int k)":
                            lambda i: fs.top_k_top_p_sampling_from_logits(bufs[i], 50, 0.9, seed=fi_seed, offset=fi_off),
                        "flashinfer top_k_top_p (per-row)":
                            lambda i: fs.top_k_top_p_sampling_from_logits(bufs[i], k32, pt, seed=fi_seed, offset=fi_off),
                    }
                for name, fn in cands.items():
                    try:
                        if name not in fi_warm:
                            t0 = time.time()
                            fn(0)
                            torch.cuda.synchronize()
                            fi_warm.add(name)
                            print(f"    {name}: first call (JIT build) {time.time() - t0:.1f} s")
                        us, how = measure(torch, fn, nbuf)
                        add(sc, name, us, how)
                    except Exception as e:
                        print(f"    {name} failed: {e!r}")
                        add(sc, name, float("nan"), "failed", repr(e)[:200])
        bufs.clear()
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:  # partial results survive a kill
            json.dump(dict(meta=meta, skipped=skipped, records=records, partial=True), f, indent=1)
    return records, skipped, meta


def profile_kernels(torch, fn, nbuf, calls=20):
    """Mean GPU time per kernel (us per call) of ``fn``, from the CUDA profiler (not graphs)."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(3):
        fn(i % nbuf)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(i % nbuf)
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and ev.count:
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            out[ev.key[:40]] = round(t / calls, 2)
    print("    kernels (us per call):", out)
    return out


def table(records, skipped, meta):
    lines = [
        f"# GPU benchmark: {meta['gpu']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, flashinfer {meta['flashinfer']}, "
        f"commit {meta['commit']}, {meta['date']}. CUDA-graph replay medians; inputs rotated over "
        f">= 4x the L2; `x` = ratio to one read of the logits (torch.amax) in the same run.",
        "",
        "| dtype | B | V | scenario | method | us | GB/s | x one read |",
        "|---|---|---|---|---|---|---|---|",
    ]
    floors = {(r["dtype"], r["rows"], r["vocab"]): r["us"] for r in records if r["method"].startswith("one read")}
    for r in records:
        f = floors.get((r["dtype"], r["rows"], r["vocab"]))
        ratio = r["us"] / f if f else float("nan")
        r["ratio"] = round(ratio, 3)
        if r["method"].startswith("one read") and r["scenario"] != records[0]["scenario"]:
            continue
        lines.append(f"| {r['dtype']} | {r['rows']} | {r['vocab']} | {r['scenario']} | {r['method']} | "
                     f"{r['us']:.1f} | {r['gbps']:.0f} | {ratio:.2f} |")
    if skipped:
        lines += ["", "Skipped (time budget): " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def plot(records, path):
    """Ratio to one read against batch size, one panel per scenario and dtype (V = 151936)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in records})
    methods = sorted({r["method"] for r in records})
    color = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(dtypes), len(SCENARIOS), figsize=(4.5 * len(SCENARIOS), 4.2 * len(dtypes)),
                             squeeze=False)
    for i, dt in enumerate(dtypes):
        for j, sc in enumerate(SCENARIOS):
            ax = axes[i][j]
            sel = [r for r in records if r["dtype"] == dt and r["scenario"] == sc and r["vocab"] == 151936]
            for m in sorted({r["method"] for r in sel}):
                pts = sorted((r["rows"], r.get("ratio", float("nan"))) for r in sel if r["method"] == m)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, color=color[m])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{sc} {dt} V=151936")
            ax.set_xlabel("batch")
            ax.set_ylabel("time / one read")
            ax.grid(True, which="both", alpha=0.3)
    # one legend for every method of every panel (not each panel's subset)
    handles = [plt.Line2D([], [], color=color[m], marker="o", label=m) for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(methods), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)


def replot(json_path):
    """Redraw the PNG beside a saved gpu_bench.json (python bench/bench_gpu.py --replot FILE)."""
    with open(json_path) as f:
        data = json.load(f)
    plot(data["records"], os.path.splitext(json_path)[0] + ".png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new shapes after this many seconds")
    ap.add_argument("--batches", type=int, nargs="*")
    ap.add_argument("--vocabs", type=int, nargs="*")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    ap.add_argument("--max-buffers", type=int, default=400)
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--no-torch-backend", action="store_true")
    ap.add_argument("--profile", type=int, nargs="*", default=[],
                    help="batch sizes whose calls of ours are also profiled kernel by kernel")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME[@B]:field=value,... extra runs of ours with changed launch.Config fields "
                         "(the first shape, or every shape with B rows)")
    ap.add_argument("--warm-flashinfer-only", action="store_true",
                    help="only build FlashInfer's JIT modules (gpu_run.sh runs it alongside the tests)")
    ap.add_argument("--replot", help="only redraw the plot of a saved gpu_bench.json")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(args.replot)
    os.makedirs(args.out, exist_ok=True)
    records, skipped, meta = run(args)
    if args.warm_flashinfer_only:
        return
    md = table(records, skipped, meta)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(dict(meta=meta, skipped=skipped, records=records), f, indent=1)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write(md)
    try:
        plot(records, os.path.join(args.out, "gpu_bench.png"))
    except Exception as e:
        print(f"plot failed: {e!r}")
    print(md)


if __name__ == "__main__":
    main()
