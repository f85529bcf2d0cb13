"""The Triton backend: fused GPU kernels (:mod:`sampling.kernels.triton`) on torch CUDA tensors.

CPU tensors are accepted only under ``TRITON_INTERPRET=1`` (Triton's interpreter, used by CI);
the variable must be set before the first call, since the kernels are compiled or interpreted
from the moment their module is imported.

Invalid rows (NaN / +inf after penalties and temperature, or no finite value) get token -1
and a NaN log-probability on CUDA unless the sampler was built with ``check_logits=True``,
which raises :class:`~sampling.errors.InvalidLogitsError` at the cost of one device sync.

Unseeded rows draw from a device-side copy of the sampler's call counter that the call
itself advances, so a captured CUDA graph draws fresh numbers on each replay (the host
counter ``Sampler.calls`` does not move during replays).
"""

from __future__ import annotations

import os

import torch

from sampling.errors import SamplingInputError
from sampling.step import Step

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend:
    name = "triton"
    reads_cache_table = True

    def owns(self, x) -> bool:
        return isinstance(x, torch.Tensor)

    def dtype_name(self, logits) -> str:
        return _DTYPES.get(logits.dtype, str(logits.dtype).replace("torch.", ""))

    def asarray(self, host, like, given=None):
        if given is not None:
            if not isinstance(given, torch.Tensor):
                raise SamplingInputError(
                    f"to_tensor produced {type(given).__name__}, but the triton backend needs torch tensors"
                )
            return given if given.device == like.device else given.to(like.device)
        t = torch.from_numpy(host)
        return t if like.device.type == "cpu" else t.to(like.device, non_blocking=True)

    def default_raise_invalid(self, logits) -> bool:
        return not logits.is_cuda

    def run(self, step: Step):
        x = step.logits
        if not x.is_cuda and not _interpreting():
            raise SamplingInputError(
                "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                f"logits are on {x.device}"
            )
        from sampling.kernels.triton import launch

        return launch.run(step)
