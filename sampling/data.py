"""Per-batch metadata: token histories and request ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .errors import SamplingInputError


def _ids(name: str, value: Any) -> Optional[np.ndarray]:
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise SamplingInputError(f"{name} must be a 2-D integer array [B, L], got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise SamplingInputError(f"{name} must be a 2-D integer array, got dtype {arr.dtype}")
    if arr.dtype == np.uint64:
        # Ids above 2**63 - 1 are padding either way; wrap them to negative (still padding).
        arr = arr.view(np.int64)
    return np.ascontiguousarray(arr, dtype=np.int64)


@dataclass(frozen=True)
class SamplingData:
    """Token histories of a batch, and the request ids that key the per-request cache.

    ``all_input_ids`` [B, L] (prompt + output ids) drives the repetition penalty;
    ``output_ids`` [B, Lo] drives the frequency and presence penalties and the random stream's
    position. Both are right-padded: any id < 0 or >= V is padding and ignored.
    """

    all_input_ids: Optional[np.ndarray] = None
    output_ids: Optional[np.ndarray] = None
    is_prefill: bool = True
    request_ids: Optional[np.ndarray] = None
    to_tensor: Optional[Callable] = None
    tensors: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_numpy(
        cls,
        all_input_ids=None,
        output_ids=None,
        to_tensor: Optional[Callable] = None,
        is_prefill: bool = True,
        request_ids=None,
    ) -> "SamplingData":
        """Validate histories and build a :class:`SamplingData`.

        Parameters
        ----------
        all_input_ids : int array [B, L], optional
            Prompt and output token ids per row, right-padded (-1 or vocab_size).
        output_ids : int array [B, Lo], optional
            Output token ids per row, right-padded.
        to_tensor : callable, optional
            Converts the id arrays to backend tensors now; otherwise the sampler converts on use.
        is_prefill : bool
            With ``request_ids``: build (True) or reuse (False) each request's cached state.
        request_ids : int array [B], optional
            Unique id per row; turns on the per-request cache.

        Examples
        --------
        >>> d = SamplingData.from_numpy(output_ids=np.array([[5, 7, -1]]))
        >>> d.rows
        1
        """
        a = _ids("all_input_ids", all_input_ids)
        o = _ids("output_ids", output_ids)
        if a is not None and o is not None and a.shape[0] != o.shape[0]:
            raise SamplingInputError(f"all_input_ids has {a.shape[0]} rows but output_ids has {o.shape[0]}")
        if not isinstance(is_prefill, (bool, np.bool_)):
            raise SamplingInputError(f"is_prefill must be a bool, got {type(is_prefill).__name__}")
        rid = None
        if request_ids is not None:
            rid = np.asarray(request_ids)
            if rid.ndim != 1 or rid.dtype.kind not in "iu":
                raise SamplingInputError(f"request_ids must be a 1-D integer array, got shape {rid.shape} dtype {rid.dtype}")
            rows = next((x.shape[0] for x in (a, o) if x is not None), rid.shape[0])
            if rid.shape[0] != rows:
                raise SamplingInputError(f"request_ids has {rid.shape[0]} rows, expected {rows}")
            _, first, counts = np.unique(rid, return_index=True, return_counts=True)
            if (counts > 1).any():
                dup = rid[first[counts > 1][0]]
                raise SamplingInputError(f"request_ids: id {dup} appears more than once in the batch")
            rid = rid.astype(np.int64)
        tensors = {}
        if to_tensor is not None:
            tensors = {k: to_tensor(v) for k, v in (("all_input_ids", a), ("output_ids", o)) if v is not None}
        return cls(all_input_ids=a, output_ids=o, is_prefill=bool(is_prefill), request_ids=rid, to_tensor=to_tensor, tensors=tensors)

    @property
    def rows(self) -> Optional[int]:
        """Batch size implied by the arrays, or None when no array was given."""
        for x in (self.all_input_ids, self.output_ids, self.request_ids):
            if x is not None:
                return int(x.shape[0])
        return None
