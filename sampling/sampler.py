"""The Sampler: chooses a backend once, normalises a call's inputs and runs the pipeline."""

from __future__ import annotations

import logging
import secrets
from typing import Any, Optional

from .backends import detect as detect_backend, load as load_backend
from .cache import RequestCache
from .data import SamplingData
from .errors import SamplingInputError
from .params import SamplingParam
from .step import Step

log = logging.getLogger(__name__)

LOGPROBS_MODES = ("sampling", "processed", "raw")
LOGITS_DTYPES = ("float32", "float16", "bfloat16")


class SampleOutput(tuple):
    """``(logprobs, next_tokens)``, with the top-n log-probabilities as attributes.

    ``logprobs`` float32 [B] and ``next_tokens`` int64 [B] are in the logits' framework and on its
    device. ``top_ids`` int64 [B, n] and ``top_logprobs`` float32 [B, n] are set when the sampler
    was built with ``num_logprobs=n`` (otherwise None).
    """

    def __new__(cls, logprobs, next_tokens, top_ids=None, top_logprobs=None):
        self = super().__new__(cls, (logprobs, next_tokens))
        self.top_ids = top_ids
        self.top_logprobs = top_logprobs
        return self

    @property
    def logprobs(self):
        return self[0]

    @property
    def next_tokens(self):
        return self[1]


class Sampler:
    """Turns a batch of logits into next tokens, each row with its own parameters.

    Pipeline for each row (see README "Semantics"): repetition -> frequency -> presence penalties
    -> temperature -> top-k -> top-p -> min-p -> choose (greedy argmax, or Gumbel-max with the
    counter-based stream of :mod:`sampling.stream`) -> log-probability of the chosen token.

    Parameters
    ----------
    backend : {"auto", "numpy", "torch", "triton", "mindspore"}
        "auto" picks one from the logits' type and device on each call.
    seed : int, optional
        Seed of the sampler's own stream, used by rows without a seed. Random when None.
    logprobs_mode : {"sampling", "processed", "raw"}
        Which distribution the returned log-probabilities come from.
    num_logprobs : int
        Also return the top-n ids and log-probabilities per row (``out.top_ids``, ``out.top_logprobs``).
    check_logits : bool, optional
        True raises :class:`~sampling.errors.InvalidLogitsError` for a row with NaN / +inf or no
        finite value (a device sync on GPUs); False flags such rows with token -1 and a NaN
        logprob. Default: raise on CPU backends, flag on GPUs.

    Examples
    --------
    >>> import numpy as np
    >>> from sampling import Sampler, SamplingParam
    >>> logits = np.array([[0.0, 3.0, 1.0]], np.float32)
    >>> logprobs, tokens = Sampler(backend="numpy")(logits, None, None)
    >>> tokens.tolist()
    [1]
    """

    def __init__(
        self,
        backend: str = "auto",
        *,
        seed: Optional[int] = None,
        logprobs_mode: str = "sampling",
        num_logprobs: int = 0,
        check_logits: Optional[bool] = None,
        max_cached_requests: Optional[int] = None,
    ):
        if backend != "auto":
            load_backend(backend)  # fail early, with the extra to install
        if logprobs_mode not in LOGPROBS_MODES:
            raise SamplingInputError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        if not isinstance(num_logprobs, int) or num_logprobs < 0:
            raise SamplingInputError(f"num_logprobs must be an integer >= 0, got {num_logprobs!r}")
        if seed is None:
            seed = secrets.randbits(64)
        if not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise SamplingInputError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self.backend = backend
        self.seed = seed
        self.logprobs_mode = logprobs_mode
        self.num_logprobs = num_logprobs
        self.check_logits = check_logits
        self.calls = 0
        self._state: dict = {}
        self.cache = RequestCache(max_cached_requests)

    def __call__(self, logits, data: Optional[SamplingData] = None, param: Optional[SamplingParam] = None) -> SampleOutput:
        """Sample one token per row. Returns ``(logprobs, next_tokens)`` (a :class:`SampleOutput`)."""
        be = load_backend(detect_backend(logits) if self.backend == "auto" else self.backend)
        if not be.owns(logits):
            raise SamplingInputError(f"the {be.name} backend cannot take logits of type {type(logits).__name__}")
        shape = tuple(logits.shape)
        if len(shape) != 2:
            raise SamplingInputError(f"logits must be 2-D [B, V], got shape {shape}")
        rows, vocab = shape
        if rows == 0 or vocab == 0:
            raise SamplingInputError(f"logits must have at least one row and one column, got shape {shape}")
        if be.dtype_name(logits) not in LOGITS_DTYPES:
            raise SamplingInputError(f"logits dtype must be one of {LOGITS_DTYPES}, got {be.dtype_name(logits)}")
        if self.num_logprobs > vocab:
            raise SamplingInputError(f"num_logprobs = {self.num_logprobs} exceeds the vocabulary size {vocab}")
        if data is not None and not isinstance(data, SamplingData):
            raise SamplingInputError(f"data must be a SamplingData or None, got {type(data).__name__}")
        if param is not None and not isinstance(param, SamplingParam):
            raise SamplingInputError(f"param must be a SamplingParam or None, got {type(param).__name__}")
        if data is not None and data.rows is not None and data.rows != rows:
            raise SamplingInputError(f"data has {data.rows} rows but logits have {rows}")
        if param is not None and param.rows != rows:
            raise SamplingInputError(f"param has {param.rows} rows but logits have {rows}")

        history = self.cache.resolve(be, logits, data, param)
        param = history.param if history.param is not None else SamplingParam.all_greedy(rows)

        def dev(host, given=None):
            return None if host is None else be.asarray(host, logits, given)

        tensors = param.tensors
        step = Step(
            logits=logits,
            params={k: dev(v, tensors.get(k)) for k, v in param.arrays.items()},
            host=param,
            rep_ids=history.rep_ids,
            out_ids=history.out_ids,
            out_counts=history.out_counts,
            positions=history.positions,
            table_ids=history.table_ids,
            table_flags=history.table_flags,
            table_new=history.table_new,
            table_aux=None if history.table_ids is None else history.table.aux,
            sampler_seed=self.seed,
            call=self.calls,
            logprobs_mode=self.logprobs_mode,
            num_logprobs=self.num_logprobs,
            raise_invalid=be.default_raise_invalid(logits) if self.check_logits is None else self.check_logits,
            state=self._state.setdefault(be.name, {}),
        )
        try:
            logprobs, tokens, top_ids, top_lp = be.run(step)
        except Exception:
            self.cache.discard(history)
            raise
        self.calls += 1
        self.cache.record(history, tokens)
        return SampleOutput(logprobs, tokens, top_ids, top_lp)

    def sample(self, logits, data: Optional[SamplingData] = None, param: Optional[SamplingParam] = None):
        """Only the next tokens: int64 [B]."""
        return self(logits, data, param)[1]

    def clear_cache(self, request_ids=None) -> None:
        """Drop the cached state of ``request_ids`` (all requests when None)."""
        self.cache.clear(request_ids)
