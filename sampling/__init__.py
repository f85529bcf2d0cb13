"""sampling: turn a batch of LLM logits into next tokens, with the same semantics on every backend.

>>> import numpy as np
>>> from sampling import Sampler, SamplingData, SamplingParam
>>> logits = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
>>> param = SamplingParam.from_numpy(temperature=np.array([0.7, 0.0]), seed=np.array([1, 2]))
>>> logprobs, next_tokens = Sampler()(logits, None, param)

Importing this package imports no framework (torch, MindSpore, Triton) and no hypothesis.
"""

from .data import SamplingData
from .errors import BackendUnavailableError, InvalidLogitsError, SamplingInputError
from .params import SamplingParam
from .sampler import SampleOutput, Sampler

__version__ = "0.2.0"

__all__ = [
    "Sampler",
    "SampleOutput",
    "SamplingData",
    "SamplingParam",
    "SamplingInputError",
    "InvalidLogitsError",
    "BackendUnavailableError",
    "__version__",
]
