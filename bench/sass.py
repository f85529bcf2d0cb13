"""Compile the Triton pipeline's kernels for sm_90 on a machine without a GPU, and count.

    python bench/sass.py [--scenario S2] [--rows 256] [--vocab 151936] [--dtype bfloat16] [--dump DIR]
    (DIR: SASS, PTX, TTGIR, cubin: ``nvdisasm -g -c`` maps SASS offsets to lines)

Runs one sampler call under TRITON_INTERPRET=1 (in a subprocess) to record each launch's
arguments, then compiles the same launches with Triton's ahead-of-time path for an H100
(GPUTarget cuda 90) and prints per kernel: registers, spills, shared memory, and the SASS
instruction count of the whole kernel and of its hottest loop (the largest basic block that
branches backwards). Catches compile errors and register spills before any device time.

The device runs Triton 3.6, which rejects some code that later versions accept (a constexpr str
default, pointer operands of two element types in inline asm: bench/NOTES.md v8, v9) and lays
out some tensors differently: compile with that version too, e.g. after
``pip install --no-deps --target /tmp/t36 triton==3.6.0``, as ``PYTHONPATH=/tmp/t36 python bench/sass.py``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = ["_prep_kernel", "_scan_kernel", "_finish_kernel"]


def record(scenario: str, rows: int, vocab: int, dtype: str, path: str) -> None:
    """(interpreter process) One call; write each kernel launch's argument types and values."""
    import torch
    from bench_gpu import sampler_call, scenario_inputs  # (bench/ is the script's directory)

    from sampling import Sampler
    from sampling.kernels.triton import launch
    from sampling.kernels.triton import pipeline as K

    launch.INTERPRET_CONFIG = launch.GPU_CONFIG  # the GPU's tile sizes and constants
    if os.environ.get("SASS_CONFIG"):
        from dataclasses import replace
        kv = dict(p.split("=") for p in os.environ["SASS_CONFIG"].split(","))
        launch.INTERPRET_CONFIG = replace(launch.GPU_CONFIG, **{k: int(v) for k, v in kv.items()})
    launch._sms = lambda device: 132
    seen = {}

    class Rec:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def call(*args, **kwargs):
                params = list(inspect.signature(self.fn.fn).parameters.values())
                sig, consts = {}, {}
                for p, a in zip(params, args):
                    sig[p.name] = _type(a)
                    # what the JIT specialises at launch: 16-aligned pointers, ints % 16 == 0
                    # (the caching allocator aligns GPU tensors, so every tensor counts)
                    if isinstance(a, torch.Tensor) or (isinstance(a, int) and not isinstance(a, bool)
                                                       and a % 16 == 0):
                        sig.setdefault("__div16", []).append(p.name)
                for k, v in kwargs.items():
                    if k in ("num_warps", "enable_fp_fusion", "num_stages", "maxnreg", "launch_pdl"):
                        consts["__opt_" + k] = v
                    else:
                        consts[k] = v
                seen[self.name] = dict(sig=sig, consts=consts)
                # no need to run the kernel: only its arguments are wanted (but rows must look
                # valid, or the call before the recorded one raises: status 0, token 0)
                for p, a in zip(params, args):
                    if p.name in ("status_ptr", "tok_ptr"):
                        a.zero_()
            return call

    for name in KERNELS:
        setattr(K, name, Rec(name, getattr(K, name)))
    # the benchmark's inputs and call (bench_gpu; S3c prefills the cache, then records a decode step)
    fn = sampler_call(Sampler, "triton", scenario, scenario_inputs(rows, vocab, torch.as_tensor),
                      [torch.randn(rows, vocab).to(getattr(torch, dtype))])
    try:
        fn(0)
    except Exception:
        pass  # the recorder does not run the kernels, so outputs are garbage
    with open(path, "w") as f:
        json.dump(seen, f)


def _type(a):
    import torch

    if isinstance(a, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64",
                      torch.bool: "i1", torch.float16: "fp16", torch.bfloat16: "bf16"}[a.dtype]
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i64" if not -(2**31) <= a < 2**31 else "i32"
    if isinstance(a, float):
        return "fp32"
    return "none"


def compile_all(path: str, dump: str | None) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sampling.kernels.triton import pipeline as K

    seen = json.load(open(path))
    target = GPUTarget("cuda", 90, 32)
    print(f"{'kernel':16s} {'regs':>5s} {'spill':>6s} {'smem':>6s} {'sass':>6s} {'hot loop':>9s}")
    for name in KERNELS:
        if name not in seen:
            continue
        rec = seen[name]
        fn = getattr(K, name)
        consts = {k: v for k, v in rec["consts"].items() if not k.startswith("__opt_")}
        if "FAST" in consts:
            consts["FAST"] = True  # the recording ran on the CPU; the GPU takes the fast paths
        if "PDL" in consts:
            consts["PDL"] = True  # (and programmatic dependent launch)
        opts = {k[6:]: v for k, v in rec["consts"].items() if k.startswith("__opt_")}
        if "PDL" in consts:
            opts["launch_pdl"] = True
        sig = dict(rec["sig"])
        div16 = sig.pop("__div16", [])
        nospec = {fn.arg_names[i] if isinstance(i, int) else i for i in (fn.do_not_specialize or [])}
        for k in consts:
            sig[k] = "constexpr"
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div16 if k not in nospec}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
        try:
            ck = triton.compile(src, target=target, options=opts)
        except Exception as e:
            print(f"{name:16s} COMPILE ERROR: {e}")
            raise
        sass, res = _sass(ck)
        nins = len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+[^;]*;", sass))
        reg = re.search(r"REG:(\d+)", res)
        local = re.search(r"LOCAL:(\d+)", res)
        print(f"{name:16s} {int(reg.group(1)) if reg else -1:5d} {int(local.group(1)) if local else -1:6d} "
              f"{ck.metadata.shared:6d} {nins:6d} {_hot_loop(sass):9d}")
        if dump:
            os.makedirs(dump, exist_ok=True)
            open(os.path.join(dump, name + ".sass"), "w").write(sass)
            open(os.path.join(dump, name + ".ptx"), "w").write(ck.asm["ptx"])
            open(os.path.join(dump, name + ".ttgir"), "w").write(ck.asm["ttgir"])
            open(os.path.join(dump, name + ".cubin"), "wb").write(ck.asm["cubin"])


def _sass(ck) -> str:
    import tempfile

    import triton.backends.nvidia as nv

    cubin = ck.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")  # bundled with triton
    if not os.path.exists(tool):
        tool = "cuobjdump"
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return sass, res


def _hot_loop(sass: str) -> int:
    """Instructions between the largest backward branch's target and the branch."""
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    addr = [int(a, 16) for a, _ in lines]
    best = 0
    for i, (_, ins) in enumerate(lines):
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if m:
            tgt = int(m.group(1), 16)
            if tgt < addr[i]:
                best = max(best, sum(1 for a in addr if tgt <= a <= addr[i]))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="S2", choices=["S1", "S2", "S3", "S3c", "S4"])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--dump")
    ap.add_argument("--config", default="", help="launch.Config overrides, e.g. stages=3,tile=512")
    ap.add_argument("--record", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.record:
        record(args.scenario, args.rows, args.vocab, args.dtype, args.record)
        return
    path = "/tmp/sass_launches.json"
    env = dict(os.environ, TRITON_INTERPRET="1", SASS_CONFIG=args.config)
    subprocess.run([sys.executable, __file__, "--scenario", args.scenario, "--rows", str(args.rows), "--vocab",
                    str(args.vocab), "--dtype", args.dtype, "--record", path], env=env, check=True)
    os.environ.pop("TRITON_INTERPRET", None)
    compile_all(path, args.dump)


if __name__ == "__main__":
    main()
