"""What the sampler hands a backend for one call: everything normalised, already on the device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .params import SamplingParam


@dataclass
class Step:
    """One sampler call, in the backend's own tensors.

    ``params`` maps each name of :data:`sampling.params.ARRAY_FIELDS` to a [B] tensor on the
    logits' device; ``host`` is the same parameters as numpy (for flags such as
    ``host.any("top_p")``, decided without reading device memory).

    Penalty inputs: ``rep_ids`` [B, R] are the ids the repetition penalty sees; ``out_ids`` [B, O]
    those the frequency / presence penalties count, each entry counting ``out_counts`` times
    (1 when None). With ``out_counts`` the valid ids of a row are distinct (the cache's table).
    Ids outside [0, V) are padding. ``positions`` [B] is the stream position; when None it is
    the (weighted) number of valid ``out_ids``.

    A backend with ``reads_cache_table`` gets cached rows as the cache's own table instead of
    the lists: ``table_ids`` [B, W] int64, each row's distinct ids in ascending order followed
    by -1 padding, and ``table_flags`` [B, W] int32, ``2 * output count + seen`` (seen: the
    repetition penalty applies); ``rep_ids`` / ``out_ids`` / ``out_counts`` are then None.
    ``table_new`` [B] int64 (or None) is one output token per row (-1: none) that the backend
    adds to the table (in place, before reading it) by the rule of the cache's ``_append``:
    count it and mark it seen, insert a new id at its rank, advance ``positions``.
    ``table_aux`` is a dict kept with the table, for what a backend derives from it and keeps
    up to date itself (the Triton backend's bitmask of each row's ids): it lasts while only the
    backend changes the table; the cache empties it whenever it changes the table itself.
    """

    logits: Any
    params: Dict[str, Any]
    host: SamplingParam
    rep_ids: Optional[Any] = None
    out_ids: Optional[Any] = None
    out_counts: Optional[Any] = None
    positions: Optional[Any] = None
    table_ids: Optional[Any] = None
    table_flags: Optional[Any] = None
    table_new: Optional[Any] = None
    table_aux: Optional[Dict[str, Any]] = None
    #: The sampler's own seed and call counter, for rows without a seed.
    sampler_seed: int = 0
    call: int = 0
    logprobs_mode: str = "sampling"
    num_logprobs: int = 0
    #: True: raise on invalid rows (a device sync on GPUs). False: flag them (token -1, NaN logprob).
    raise_invalid: bool = True
    #: Per-sampler, per-backend scratch (device counters, workspaces) that persists across calls.
    state: Dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.logits.shape[0])

    @property
    def vocab(self) -> int:
        return int(self.logits.shape[1])
