"""Decode-step time with the request cache versus the stateless path, for growing histories.

    python bench/bench_cache.py --backend torch --device cpu --batch 8
    python bench/bench_cache.py --backend triton --device cuda --batch 64

Each step samples a batch with all three penalties, temperature, top-k and top-p. The stateless
path passes the full history ids every step (what an engine without the cache does: host arrays
converted and moved to the device, then read by the penalties); the cached path prefills once and
then passes only ``request_ids`` (the tokens come from the previous step). A step's time is wall
clock from building its inputs to its tokens being ready (with a device sync on CUDA), median of
``--steps`` steps. Histories are Zipf-distributed ids (distinct ids grow like real text, slower
than the history) or uniform ones (every id distinct: the worst case for the cache's state).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import numpy as np

from sampling import Sampler, SamplingData, SamplingParam, __version__

VOCAB = 151936


def histories(rows: int, length: int, dist: str, rng) -> np.ndarray:
    if dist == "uniform":
        return rng.integers(0, VOCAB, size=(rows, length))
    ranks = rng.zipf(1.2, size=(rows, length))
    return (ranks * 7919) % VOCAB  # spread ranks over the vocabulary


def run(args) -> list:
    import torch

    rng = np.random.default_rng(0)
    rows = args.batch
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    param = SamplingParam.from_numpy(
        repetition_penalty=np.full(rows, 1.1),
        frequency_penalty=np.full(rows, 0.2),
        presence_penalty=np.full(rows, 0.1),
        temperature=np.full(rows, 0.7),
        top_k=np.full(rows, 50),
        top_p=np.full(rows, 0.9),
        seed=np.arange(rows),
    )
    out = []
    for length in args.lengths:
        for dist in args.dists:
            hist = histories(rows, length, dist, rng)
            n_out = min(512, length // 2)
            logits = [torch.randn(rows, VOCAB, device=dev) * 3 for _ in range(4)]
            times = {}
            # Stateless: the engine passes the whole history every step.
            s = Sampler(args.backend, seed=0)
            prompt, output = hist[:, : length - n_out], hist[:, length - n_out :]
            step_times = []
            for i in range(args.steps + 2):
                t0 = time.perf_counter()
                data = SamplingData.from_numpy(all_input_ids=np.concatenate([prompt, output], 1), output_ids=output)
                tok = s(logits[i % 4], data, param)[1]
                sync()
                step_times.append(time.perf_counter() - t0)
                new = tok.cpu().numpy()[:, None]
                output = np.concatenate([output, new], 1)
            times["stateless"] = statistics.median(step_times[2:])
            # Cached: prefill once, then only request ids.
            c = Sampler(args.backend, seed=0)
            ids = np.arange(rows)
            c(logits[0], SamplingData.from_numpy(all_input_ids=hist, output_ids=hist[:, length - n_out :], request_ids=ids), param)
            step_times = []
            for i in range(args.steps + 2):
                t0 = time.perf_counter()
                c(logits[i % 4], SamplingData.from_numpy(is_prefill=False, request_ids=ids), None)
                sync()
                step_times.append(time.perf_counter() - t0)
            times["cached"] = statistics.median(step_times[2:])
            distinct = int(np.mean([len(np.unique(h)) for h in hist]))
            row = dict(length=length, dist=dist, distinct=distinct, **{k + "_ms": v * 1e3 for k, v in times.items()})
            print(f"L={length:6d} {dist:8s} distinct={distinct:6d}  stateless {row['stateless_ms']:9.2f} ms   cached {row['cached_ms']:9.2f} ms", flush=True)
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--dists", nargs="+", default=["zipf", "uniform"])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    import torch

    rows = run(args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    meta = dict(
        bench="cache",
        backend=args.backend,
        device=device,
        batch=args.batch,
        vocab=VOCAB,
        torch=torch.__version__,
        sampling=__version__,
        commit=commit,
        date=datetime.date.today().isoformat(),
        cpus=os.cpu_count(),
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cache_{args.backend}_{args.device.split(':')[0]}.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
