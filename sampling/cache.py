"""Penalty history for one call: read from the ids arrays (stateless) or from the request cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .data import SamplingData
from .params import SamplingParam


@dataclass
class History:
    """What the penalties and the random stream need, in backend tensors (see :class:`~sampling.step.Step`)."""

    param: Optional[SamplingParam]
    rep_ids: Optional[Any] = None
    out_ids: Optional[Any] = None
    out_counts: Optional[Any] = None
    positions: Optional[Any] = None
    request_ids: Optional[np.ndarray] = None


class RequestCache:
    """Per-request state keyed by ``request_id`` (stateless until requests are cached)."""

    def __init__(self, max_requests: Optional[int] = None):
        self.max_requests = max_requests

    def resolve(self, be, logits, data: Optional[SamplingData], param: Optional[SamplingParam]) -> History:
        if data is None:
            return History(param)

        def dev(name):
            host = getattr(data, name)
            return None if host is None else be.asarray(host, logits, data.tensors.get(name))

        return History(param, rep_ids=dev("all_input_ids"), out_ids=dev("output_ids"))

    def record(self, history: History, tokens) -> None:
        pass

    def clear(self, request_ids=None) -> None:
        pass
