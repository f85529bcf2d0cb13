"""Where does the graph time of one call go beyond its kernels' sum? (bf16/fp32 S1, S2 at B = 256)
Graph medians of: amax; the full call; the call without the finish launch (scan only); the call
with pdl=0; plus profiler kernel times of the same (eager)."""
import math, os, sys, statistics
sys.path.insert(0, "bench")
import numpy as np, torch
import bench_gpu as bg
from sampling import Sampler
from sampling.kernels.triton import launch
from sampling.kernels.triton import pipeline as K

bg.args = type("A", (), {"out": "/tmp/pg"})()
dev = torch.device("cuda")
cuda = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)
rows, V = 256, 151936
res = []
for dt in (torch.bfloat16, torch.float32):
    nbytes = rows * V * torch.tensor([], dtype=dt).element_size()
    nbuf = max(2, math.ceil(4 * 50e6 / nbytes))
    g = torch.Generator(device=dev).manual_seed(5)
    bufs = [(torch.randn(rows, V, device=dev, generator=g) * 3).to(dt) for _ in range(nbuf)]
    sc_in = bg.scenario_inputs(rows, V, cuda)
    amax = lambda i: torch.amax(bufs[i], dim=-1)
    t_amax, _ = bg.time_graph(torch, amax, nbuf)
    p_amax = bg.profile_kernels(torch, amax, nbuf)
    line = [f"{dt} amax graph {t_amax:.1f} prof {p_amax}"]
    for sc in ("S1", "S2"):
        fn = bg.sampler_call(Sampler, "triton", sc, sc_in, bufs)
        full, _ = bg.time_graph(torch, fn, nbuf)
        pk = bg.profile_kernels(torch, fn, nbuf)
        real = K._finish_kernel
        class Skip:
            def __getitem__(self, grid):
                return lambda *a, **k: None
        K._finish_kernel = Skip()
        try:
            fn2 = bg.sampler_call(Sampler, "triton", sc, sc_in, bufs)
            scan_only, _ = bg.time_graph(torch, fn2, nbuf)
        finally:
            K._finish_kernel = real
        with launch.use_config(pdl=0):
            fn3 = bg.sampler_call(Sampler, "triton", sc, sc_in, bufs)
            nopdl, _ = bg.time_graph(torch, fn3, nbuf)
        # two calls per replay slot on the same buffer: the second call's marginal cost
        fn4 = bg.sampler_call(Sampler, "triton", sc, sc_in, bufs)
        twice, _ = bg.time_graph(torch, lambda i: (fn4(i), fn4(i)), nbuf)
        line.append(f"  {sc}: graph {full:.1f} | no finish {scan_only:.1f} | pdl=0 {nopdl:.1f} | "
                    f"twice/slot {twice:.1f} | profiler {pk}")
    print("\n".join(line), flush=True)
    del bufs
    torch.cuda.empty_cache()
