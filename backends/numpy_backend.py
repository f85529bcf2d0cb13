"""The numpy backend: the reference pipeline of :mod:`sampling.kernels.reference`, as a backend."""

from __future__ import annotations

import numpy as np

from sampling.errors import SamplingInputError

from sampling.kernels import reference
from sampling.step import Step


class NumpyBackend:
    name = "numpy"
    reads_cache_table = False

    def owns(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def dtype_name(self, logits) -> str:
        return str(logits.dtype)

    def asarray(self, host, like, given=None):
        if given is not None:
            if not isinstance(given, np.ndarray):
                raise SamplingInputError(
                    f"to_tensor produced {type(given).__name__}, but the numpy backend needs numpy arrays"
                )
            return given
        return host

    def default_raise_invalid(self, logits) -> bool:
        return True

    def run(self, step: Step):
        return reference.sample(
            step.logits,
            step.params,
            rep_ids=step.rep_ids,
            out_ids=step.out_ids,
            out_counts=step.out_counts,
            pos=step.positions,
            sampler_seed=step.sampler_seed,
            call=step.call,
            logprobs_mode=step.logprobs_mode,
            num_logprobs=step.num_logprobs,
            raise_invalid=step.raise_invalid,
        )
