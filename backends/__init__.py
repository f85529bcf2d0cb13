"""Compute backends, one module each, imported lazily.

Every backend is a class with the same small surface:

``name``
    "numpy", "torch", "triton" or "mindspore".
``owns(x) -> bool``
    Whether ``x`` is this framework's tensor (decides ``Sampler(backend="auto")``).
``dtype_name(logits) -> str``
    "float32", "float16", "bfloat16" or the framework's own name for anything else.
``asarray(host, like, given=None)``
    ``host`` (numpy) as a tensor on ``like``'s device; ``given`` is the caller's own
    ``to_tensor`` result, moved to that device if needed.
``default_raise_invalid(logits) -> bool``
    Whether invalid rows raise by default (CPU) or are flagged without a sync (GPU).
``reads_cache_table``
    True when ``run`` takes cached rows in the cache's table form (``Step.table_ids`` /
    ``table_flags``) rather than as id lists (``Step.rep_ids`` / ``out_ids`` / ``out_counts``).
``run(step) -> (logprobs, tokens, top_ids, top_logprobs)``
    The pipeline of :mod:`sampling.kernels.reference` on :class:`sampling.step.Step`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Dict

from sampling.errors import BackendUnavailableError, SamplingInputError

#: backend name -> (module, class, framework module, pip extra)
_REGISTRY = {
    "numpy": ("numpy_backend", "NumpyBackend", "numpy", None),
    "torch": ("torch_backend", "TorchBackend", "torch", "torch"),
    "triton": ("triton_backend", "TritonBackend", "triton", "triton"),
    "mindspore": ("mindspore_backend", "MindSporeBackend", "mindspore", "mindspore"),
}
NAMES = tuple(_REGISTRY)
_loaded: Dict[str, Any] = {}


def load(name: str):
    """The backend instance called ``name`` (imports its framework on first use)."""
    if name not in _REGISTRY:
        raise SamplingInputError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)} or 'auto'")
    if name not in _loaded:
        module, cls, framework, extra = _REGISTRY[name]
        if importlib.util.find_spec(framework) is None:
            raise BackendUnavailableError(
                f"the {name} backend needs {framework}: pip install 'sampling[{extra}]'"
            )
        mod = importlib.import_module(f"{__name__}.{module}")
        _loaded[name] = getattr(mod, cls)()
    return _loaded[name]


def available() -> list:
    """Backends whose framework is installed (without importing any of them)."""
    out = []
    for name, (module, _, framework, _) in _REGISTRY.items():
        if importlib.util.find_spec(framework) is None:
            continue
        if importlib.util.find_spec(f"{__name__}.{module}") is None:
            continue
        out.append(name)
    return out


def detect(logits) -> str:
    """Pick a backend from the logits' type, without importing any framework that isn't loaded."""
    root = type(logits).__module__.split(".")[0]
    if root == "numpy":
        return "numpy"
    if root == "torch":
        if getattr(logits, "is_cuda", False) and "triton" in available():
            return "triton"
        return "torch"
    if root == "mindspore":
        return "mindspore"
    raise SamplingInputError(
        f"logits must be a numpy array, torch.Tensor or mindspore.Tensor, got {type(logits).__name__}"
    )
