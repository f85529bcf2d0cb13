"""CPU time of one sampler call: MindSpore beside torch and the numpy reference, in one run.

    python bench/bench_cpu.py                      # B = 64, V = 151936, float32, all scenarios
    python bench/bench_cpu.py --reps 5 --scenarios plain top_k_top_p

Scenarios (every row sampled, seeded, temperature in [0.6, 1.2]):

``plain``        temperature only: no truncation, so every token of the vocabulary is hashed.
``top_k_top_p``  top-k 50 and top-p 0.9 on every row.
``top_p``        top-p 0.9 alone (no top-k): the nucleus decides how much must be sorted.
``penalties``    repetition 1.1, frequency 0.2, presence 0.1 over a 2048-token history
                 (the last 512 are the output), plus top-k 50 / top-p 0.9.

Logits are ``N(0, 1) * 3`` with one token per row raised by 8 (a peaked, LLM-like row). Each
backend first must return the reference's tokens on the benchmark inputs (the run stops
otherwise); then the backends are timed in turns (round-robin, so that load from other processes
hits them alike), ``--reps`` calls each after ``--warmup`` calls. A call's time is wall clock
from the sampler call to its outputs being readable as numpy arrays (``asnumpy`` waits for
MindSpore's asynchronous kernels). Inputs are already tensors (``to_tensor`` in ``from_numpy``).
Reported: median, p20, p80 in milliseconds, and each backend's median over torch's (and over
numpy's). A backend whose framework is missing is skipped, and the run says so.

MindSpore runs twice: with its default asynchronous PyNative dispatch, and, in a child process
(the switch cannot be undone), after ``mindspore.runtime.launch_blocking()``, which executes each
operator synchronously. On a CPU with few cores the dispatch threads compete with the kernels,
and the blocking mode is much faster; both runs time every backend, so each has its own ratios.

Results go to ``bench/results/cpu_<date>.json`` with the CPU model, versions, commit and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sampling import Sampler, SamplingData, SamplingParam, __version__, backends

SCENARIOS = ("plain", "top_k_top_p", "top_p", "penalties")
HISTORY, OUTPUT = 2048, 512


def make_inputs(scenario: str, rows: int, vocab: int, seed: int = 0):
    """Logits (numpy float32), and the keyword arguments of the two ``from_numpy`` calls."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    logits[np.arange(rows), rng.integers(0, vocab, rows)] += 8.0
    params = dict(temperature=rng.uniform(0.6, 1.2, rows), seed=np.arange(rows) + 1000)
    data = {}
    if scenario in ("top_k_top_p", "penalties"):
        params.update(top_k=np.full(rows, 50), top_p=np.full(rows, 0.9))
    if scenario == "top_p":
        params.update(top_p=np.full(rows, 0.9))
    if scenario == "penalties":
        params.update(
            repetition_penalty=np.full(rows, 1.1),
            frequency_penalty=np.full(rows, 0.2),
            presence_penalty=np.full(rows, 0.1),
        )
        # Zipf-like ids (repeats, like text), right-padded with -1 by a random amount per row.
        hist = (rng.zipf(1.2, size=(rows, HISTORY)) * 7919) % vocab
        pad = rng.integers(0, HISTORY // 4, rows)
        hist[np.arange(HISTORY)[None, :] >= (HISTORY - pad)[:, None]] = -1
        data = dict(all_input_ids=hist, output_ids=hist[:, HISTORY - OUTPUT :])
    return logits, params, data


class Runner:
    """One backend: converts the inputs once, then times sampler calls."""

    def __init__(self, name: str, logits: np.ndarray, params: dict, data: dict):
        self.name = name
        self.sampler = Sampler(backend=name, seed=0)
        if name == "numpy":
            to_tensor, self.logits = None, logits
            self.to_numpy = lambda x: x
        elif name == "torch":
            import torch

            to_tensor, self.logits = torch.from_numpy, torch.from_numpy(logits)
            self.to_numpy = lambda x: x.numpy()
        elif name == "mindspore":
            import mindspore

            to_tensor, self.logits = mindspore.Tensor, mindspore.Tensor(logits)
            self.to_numpy = lambda x: x.asnumpy()
        else:
            raise ValueError(f"no CPU runner for backend {name!r}")
        self.param = SamplingParam.from_numpy(**params, to_tensor=to_tensor)
        self.data = SamplingData.from_numpy(**data, to_tensor=to_tensor) if data else None
        self.times: list = []

    def call(self):
        lp, tokens = self.sampler(self.logits, self.data, self.param)
        return self.to_numpy(tokens), self.to_numpy(lp)

    def timed(self) -> None:
        t0 = time.perf_counter()
        self.call()
        self.times.append(time.perf_counter() - t0)


def _pct(x, q):
    return float(np.percentile(np.asarray(x) * 1e3, q))


def bench_scenario(scenario: str, names: list, args) -> dict:
    logits, params, data = make_inputs(scenario, args.rows, args.vocab)
    runners = [Runner(n, logits, params, data) for n in names]
    ref_tokens = ref_lp = None
    for r in runners:
        tokens, lp = r.call()
        if ref_tokens is None:
            ref_tokens, ref_lp = tokens, lp
        elif not (tokens == ref_tokens).all():
            bad = int(np.flatnonzero(tokens != ref_tokens)[0])
            raise SystemExit(f"{scenario}: {r.name} differs from {runners[0].name} at row {bad}")
        elif not np.allclose(lp, ref_lp, rtol=1e-5, atol=1e-6):
            raise SystemExit(f"{scenario}: {r.name} logprobs differ from {runners[0].name}")
    for _ in range(args.warmup):
        for r in runners:
            r.call()
    for _ in range(args.reps):
        for r in runners:
            r.timed()
    out = {}
    for r in runners:
        out[r.name] = dict(median_ms=_pct(r.times, 50), p20_ms=_pct(r.times, 20), p80_ms=_pct(r.times, 80),
                           reps=len(r.times))
    for base in ("torch", "numpy"):
        if base in out:
            for name in out:
                out[name][f"vs_{base}"] = out[name]["median_ms"] / out[base]["median_ms"]
    return out


def environment() -> dict:
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        sampling=__version__,
        python=platform.python_version(),
        numpy=np.__version__,
        cpu=_cpu_name(),
        cores=os.cpu_count(),
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )
    for mod in ("torch", "mindspore"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_all(names: list, args) -> dict:
    results = {}
    for scenario in args.scenarios:
        res = bench_scenario(scenario, names, args)
        results[scenario] = res
        for name, r in res.items():
            ratios = "  ".join(f"{k}={v:.2f}x" for k, v in r.items() if k.startswith("vs_"))
            print(f"{scenario:12s} {name:10s} median {r['median_ms']:8.1f} ms  "
                  f"(p20 {r['p20_ms']:.1f}, p80 {r['p80_ms']:.1f})  {ratios}", flush=True)
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    ap.add_argument("--backends", nargs="+", default=["numpy", "torch", "mindspore"])
    ap.add_argument("--mindspore-mode", choices=("both", "async", "blocking"), default="both",
                    help="MindSpore's dispatch: default asynchronous, launch_blocking(), or both runs")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/cpu_<date>.json)")
    args = ap.parse_args(argv)

    available = backends.available()
    names = []
    for name in args.backends:
        if name in available:
            names.append(name)
        else:
            print(f"skipping {name}: its framework or backend module is not installed")
    modes = ["async", "blocking"] if args.mindspore_mode == "both" else [args.mindspore_mode]
    if "mindspore" not in names:
        modes = ["async"]
    env = environment()
    print(f"{env['cpu']} ({env['cores']} cores), numpy {env['numpy']}, torch {env['torch']}, "
          f"mindspore {env['mindspore']}; B={args.rows} V={args.vocab} float32, {args.reps} reps")
    runs = {}
    for mode in modes:
        if mode == "blocking" and len(modes) > 1:
            runs[mode] = _child_run(argv, args)
            continue
        if mode == "blocking":
            import mindspore

            mindspore.runtime.launch_blocking()
        print(f"--- MindSpore dispatch: {mode}")
        runs[mode] = run_all(names, args)
    doc = dict(env=env, rows=args.rows, vocab=args.vocab, dtype="float32", backends=names,
               mindspore_modes=modes, runs=runs)
    path = Path(args.out) if args.out else (
        Path(__file__).parent / "results" / f"cpu_{datetime.date.today().isoformat()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    return doc


def _child_run(argv, args) -> dict:
    """The same benchmark in a fresh process with MindSpore's launch_blocking() (irreversible)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--out", "--mindspore-mode"):
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "blocking.json"
        subprocess.run([sys.executable, __file__, *argv, "--mindspore-mode", "blocking", "--out", str(out)],
                       check=True)
        return json.loads(out.read_text())["runs"]["blocking"]


if __name__ == "__main__":
    main()
