"""A few sampler calls for Nsight Compute (stage ``ncu`` of ``gpu_run.sh``): the bench's inputs.

    ncu ... python3 bench/ncu_calls.py --rows 256 --scenarios S1 S2 S3

Each scenario is called twice on fresh randn*3 logits (the first call compiles); ncu's
``--launch-skip`` / kernel filters pick the launches. Prints nothing of interest itself.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from sampling import Sampler, SamplingData, SamplingParam


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--scenarios", nargs="*", default=["S1", "S2", "S3"])
    args = ap.parse_args()
    rows, vocab = args.rows, args.vocab
    dev = torch.device("cuda")
    cuda = lambda a: torch.as_tensor(a).to(dev)  # noqa: E731
    rng = np.random.default_rng(rows)
    g = torch.Generator(device=dev).manual_seed(rows)
    x = (torch.randn(rows, vocab, device=dev, generator=g) * 3).to(getattr(torch, args.dtype))
    T = np.full(rows, 0.7)
    seeds = rng.integers(0, 2**62, rows)
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
    for sc in args.scenarios:
        s = Sampler(backend="triton", seed=1)
        d = data if sc in ("S3", "S4") else None
        for _ in range(2):
            s(x, d, prm[sc])
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
