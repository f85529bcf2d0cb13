"""A few sampler calls for Nsight Compute (stage ``ncu`` of ``gpu_run.sh``): the bench's inputs.

    ncu ... python3 bench/ncu_calls.py --rows 256 --scenarios S1 S2 S3

Each scenario is called twice on fresh randn*3 logits (the first call compiles; S3c: a prefill,
then three decode steps, which add the tokens sampled before or, with ``--tokens``, new or known
ids); ncu's ``--launch-skip`` / kernel filters pick the launches. Prints nothing of interest.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from bench_gpu import scenario_inputs  # (bench/ is the script's directory)

from sampling import Sampler, SamplingData


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--scenarios", nargs="*", default=["S1", "S2", "S3"])
    ap.add_argument("--tokens", default="sampled", choices=["sampled", "new", "known"],
                    help="S3c's decode steps add the tokens sampled before (the bench's), or given "
                         "output ids: random ones (new to the table but ~1%%) or each row's last (known)")
    args = ap.parse_args()
    rows, vocab = args.rows, args.vocab
    dev = torch.device("cuda")
    cuda = lambda a: torch.as_tensor(a).to(dev)  # noqa: E731
    g = torch.Generator(device=dev).manual_seed(rows)
    x = (torch.randn(rows, vocab, device=dev, generator=g) * 3).to(getattr(torch, args.dtype))
    inputs = scenario_inputs(rows, vocab, cuda)
    data, prm = inputs["data"], inputs["prm"]
    for sc in args.scenarios:
        s = Sampler(backend="triton", seed=1)
        d = data if sc in ("S3", "S4") else None
        calls = 2
        if sc == "S3c":
            # the prefill fills the request cache; then three decode steps from its state
            s(x, inputs["prefill"], prm[sc])
            d, calls = inputs["decode"], 3
        out = inputs["out_ids"]
        rng = np.random.default_rng(0)
        for _ in range(calls):
            if sc == "S3c" and args.tokens != "sampled":
                add = rng.integers(0, vocab, (rows, 1)) if args.tokens == "new" else out[:, -1:]
                out = np.concatenate([out, add], 1)
                d = SamplingData.from_numpy(output_ids=out, request_ids=np.arange(rows), is_prefill=False)
            s(x, d, prm[sc])
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
