"""Shared fixtures: one harness per available backend, and the hypothesis profiles.

Every backend listed by :func:`sampling.backends.available` is tested; a backend whose module or
framework is absent is not listed, but a listed backend is never skipped.
"""

from __future__ import annotations

import importlib.util
import os

# Triton must see TRITON_INTERPRET before anything imports it: without a GPU its kernels run in
# the interpreter on CPU torch tensors.
_CUDA = False
if importlib.util.find_spec("torch") is not None:
    import torch

    _CUDA = bool(torch.cuda.is_available())
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# MindSpore's C++ logging (glog) reads GLOG_v when it is imported: 3 = errors only.
os.environ.setdefault("GLOG_v", "3")
if importlib.util.find_spec("mindspore") is not None:
    import mindspore

    # Synchronous PyNative execution, before any MindSpore operator runs: on a few CPU cores the
    # asynchronous dispatch threads cost far more than they save (MindSpore tests ~8x faster).
    mindspore.runtime.launch_blocking()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

from sampling import Sampler, backends  # noqa: E402
from sampling.testing import strategies as sst  # noqa: E402

# "ci" is deterministic (derandomize) so that CI never fails on a fresh random draw; "thorough"
# explores new examples on every run (HYPOTHESIS_PROFILE=thorough), for local bug hunting.
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=400,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class Harness:
    """One backend (and device) under test: converts numpy inputs in, results out.

    ``max_rows`` / ``max_vocab`` bound the shapes the strategies draw for it (the Triton
    interpreter runs each program in Python, so it gets small shapes); ``scale(n)`` scales an
    example budget the same way.
    """

    def __init__(self, name: str, device: str = "cpu"):
        self.name = name
        self.device = device
        self.impl = backends.load(name)
        self.interpreted = name == "triton" and device == "cpu"
        # Budgets keep the whole suite within minutes on 2 CPU cores: the Triton interpreter runs
        # every program in Python, and MindSpore's eager mode has a high cost per call.
        if self.interpreted:
            self.max_rows, self.max_vocab, self.budget = 3, 48, 0.3
        elif name == "mindspore":
            self.max_rows, self.max_vocab, self.budget = 5, 151936, 0.6
        else:
            self.max_rows, self.max_vocab, self.budget = 6, 151936, 1.0

    def __repr__(self) -> str:
        return f"{self.name}:{self.device}"

    @property
    def gpu(self) -> bool:
        return self.device != "cpu"

    def scale(self, examples: int) -> int:
        return max(3, int(round(examples * self.budget)))

    def settings(self, examples: int) -> settings:
        """Hypothesis settings for a test of ``examples`` examples (scaled to this backend)."""
        if self.interpreted:
            # Shrinking replays a failure hundreds of times: minutes through the interpreter. A
            # failure is reported as found (reproducible with the printed blob) instead.
            return settings(max_examples=self.scale(examples), phases=[Phase.explicit, Phase.reuse, Phase.generate])
        return settings(max_examples=self.scale(examples))

    def cases(self, **kwargs):
        """:func:`sampling.testing.strategies.cases` within this backend's shape limits."""
        kwargs.setdefault("max_rows", self.max_rows)
        kwargs["max_rows"] = min(kwargs["max_rows"], self.max_rows)
        kwargs["max_vocab"] = min(kwargs.get("max_vocab", self.max_vocab), self.max_vocab)
        return sst.cases(**kwargs)

    # --- conversion -------------------------------------------------------------------------

    def tensor(self, a: np.ndarray, dtype: str | None = None):
        """A numpy array as this backend's tensor; ``dtype="bfloat16"`` converts float32 values."""
        a = np.asarray(a)
        bf16 = dtype == "bfloat16" or a.dtype.name == "bfloat16"
        if self.name == "numpy":
            return a
        if self.name in ("torch", "triton"):
            if bf16:
                if a.dtype.name == "bfloat16":
                    t = torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
                else:
                    t = torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16)
            else:
                t = torch.from_numpy(np.ascontiguousarray(a))
            return t.to(self.device)
        if self.name == "mindspore":
            import mindspore

            if bf16:
                return mindspore.Tensor(np.asarray(a, np.float32)).astype(mindspore.bfloat16)
            return mindspore.Tensor(np.ascontiguousarray(a))
        raise AssertionError(f"no converter for backend {self.name}")

    def numpy(self, x):
        if x is None or isinstance(x, np.ndarray):
            return x
        if hasattr(x, "detach"):
            return x.detach().cpu().numpy()
        if hasattr(x, "asnumpy"):
            return x.asnumpy()
        raise AssertionError(f"unexpected output type {type(x).__name__} from {self.name}")

    def logits(self, case: sst.Case):
        return self.tensor(case.logits, case.dtype)

    # --- running ------------------------------------------------------------------------------

    def run(self, case: sst.Case, *, seed: int = 0, mode: str = "sampling", num_logprobs: int = 0,
            convert: bool = False, check_logits=None, sampler: Sampler | None = None):
        """Run ``case`` through a fresh sampler (or ``sampler``); numpy ``(lp, tokens, top_ids, top_lp)``.

        ``convert=True`` passes the backend's converter as ``to_tensor`` to ``from_numpy``
        (otherwise the sampler converts the host arrays itself).
        """
        to_tensor = self.tensor if convert else None
        if sampler is None:
            sampler = Sampler(backend=self.name, seed=seed, logprobs_mode=mode, num_logprobs=num_logprobs,
                              check_logits=check_logits)
        x = self.logits(case)
        out = sampler(x, case.sampling_data(to_tensor), case.sampling_param(to_tensor))
        lp, tokens = out
        assert self.impl.owns(tokens) and self.impl.owns(lp), f"{self.name} returned {type(tokens).__name__}"
        lp, tokens = self.numpy(lp), self.numpy(tokens)
        assert tokens.dtype == np.int64 and tokens.shape == (case.rows,), (tokens.dtype, tokens.shape)
        assert lp.dtype == np.float32 and lp.shape == (case.rows,), (lp.dtype, lp.shape)
        return lp, tokens, self.numpy(out.top_ids), self.numpy(out.top_logprobs)


def _harnesses():
    out = []
    for name in backends.available():
        if name == "triton":
            out.append(Harness(name, "cuda" if _CUDA else "cpu"))
            continue
        out.append(Harness(name))
        if name == "torch" and _CUDA:
            out.append(Harness(name, "cuda"))
    return out


HARNESSES = _harnesses()


@pytest.fixture(scope="session", params=HARNESSES, ids=repr)
def backend(request) -> Harness:
    """Each available backend (and torch on CUDA when there is a GPU)."""
    return request.param


def pytest_report_header(config):
    names = ", ".join(repr(h) for h in HARNESSES)
    return f"sampling backends under test: {names} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')})"
