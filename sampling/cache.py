"""Penalty history for one call: from the ids arrays (stateless) or from the per-request cache.

The cache keeps, for each request, the distinct token ids of its history (prompt + output), a
"seen by the repetition penalty" flag and an output count per id, its stream position and its
parameters. A decode step hands the backend that state in the table form of
:class:`~sampling.step.Step` (``rep_ids`` / ``out_ids`` with ``out_counts`` / ``positions``),
which gives exactly the penalties of the stateless path, since the repetition penalty applies once
per distinct id and the frequency penalty multiplies the count.

Layout: the requests of the last batch live in one table per field, [B, W] on the logits' device
(W a power of two covering every row's distinct-id bound). Each row holds its distinct ids in
ascending order, then -1 padding, so an id's column is its rank among the row's ids (the Triton
backend indexes its penalised values by that rank). A decode step of the same batch adds each
row's new token in place: a compare against the row, and for a new id a shift of the larger ids
by one column; no history read, and host-to-device traffic of O(B) (nothing at all when the
tokens come from the previous step). When
the batch changes, rows are gathered from the previous table; requests that leave the batch are
parked as their own trimmed rows. Host memory per request is O(1); device memory is 8 bytes per
table entry: ids (int64) plus an int32 holding ``2 * output_count + seen``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from .data import SamplingData
from .errors import SamplingInputError
from .params import SamplingParam


@dataclass
class History:
    """What the penalties and the random stream need, in backend tensors (see :class:`~sampling.step.Step`)."""

    param: Optional[SamplingParam]
    rep_ids: Optional[Any] = None
    out_ids: Optional[Any] = None
    out_counts: Optional[Any] = None
    positions: Optional[Any] = None
    #: The table form (cached path, backends with ``reads_cache_table``) instead of the id lists.
    table_ids: Optional[Any] = None
    table_flags: Optional[Any] = None
    table_new: Optional[Any] = None
    #: The cached batch this call used (set by the cache; None on the stateless path).
    table: Optional["_Table"] = None


class _Ops:
    """The few array operations the cache needs, for numpy tables and torch tables."""

    def __init__(self, kind: str, device=None):
        self.kind = kind
        self.device = device
        if kind == "torch":
            import torch

            self.torch = torch

    def from_host(self, a: np.ndarray):
        if self.kind == "numpy":
            return a
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)

    def full(self, shape, value, dtype: str):
        if self.kind == "numpy":
            return np.full(shape, value, dtype=dtype)
        return self.torch.full(shape, value, dtype=getattr(self.torch, dtype), device=self.device)

    def shift_right(self, x):
        """Each row moved one column to the right (the first column repeated, the last dropped)."""
        if self.kind == "numpy":
            return np.concatenate([x[:, :1], x[:, :-1]], axis=1)
        return self.torch.cat([x[:, :1], x[:, :-1]], dim=1)

    def where(self, cond, a, b):
        return np.where(cond, a, b) if self.kind == "numpy" else self.torch.where(cond, a, b)

    def arange(self, n):
        return np.arange(n) if self.kind == "numpy" else self.torch.arange(n, device=self.device)

    def copy(self, x):
        return x.copy() if self.kind == "numpy" else x.clone()


@dataclass
class _Table:
    """Per-field tables of one batch, in row order of ``request_ids``."""

    ops: _Ops
    request_ids: np.ndarray
    ids: Any  # [B, W] int64, -1 = empty
    flags: Any  # [B, W] int32: 2 * output count + seen-by-repetition
    positions: Any  # [B] int64
    #: Host bound on the number of used entries of each row.
    bound: np.ndarray
    #: The tokens this sampler returned for these rows at the last call (None before it).
    last: Any = None
    #: What a backend derives from the table and keeps with it (``Step.table_aux``); emptied
    #: whenever the cache changes the table itself (a new table has a new one).
    aux: Dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])


@dataclass
class _Parked:
    ids: Any  # [bound] row slices
    flags: Any
    position: Any  # [1]
    last: Any  # [1] or None
    bound: int


@dataclass
class _Entry:
    vocab: int
    param: SamplingParam  # one row
    #: Number of valid output ids absorbed (the host's copy of the stream position).
    out_len: int
    parked: Optional[_Parked] = None


def _width(bound: int) -> int:
    return max(16, 1 << int(max(bound, 1) - 1).bit_length())


class RequestCache:
    """Per-request penalty state keyed by ``request_id``; see the module docstring.

    ``max_requests`` bounds the number of cached requests: when exceeded after a call, the least
    recently used requests (those used in the fewest recent calls, oldest first) are dropped.
    """

    def __init__(self, max_requests: Optional[int] = None):
        if max_requests is not None and (not isinstance(max_requests, int) or max_requests < 1):
            raise SamplingInputError(f"max_cached_requests must be a positive integer or None, got {max_requests!r}")
        self.max_requests = max_requests
        self.entries: "OrderedDict[int, _Entry]" = OrderedDict()
        self.table: Optional[_Table] = None

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, request_id) -> bool:
        return int(request_id) in self.entries

    # --- the stateless path ---------------------------------------------------------------------

    @staticmethod
    def _stateless(be, logits, data: Optional[SamplingData], param) -> History:
        if data is None:
            return History(param)

        def dev(name):
            host = getattr(data, name)
            return None if host is None else be.asarray(host, logits, data.tensors.get(name))

        return History(param, rep_ids=dev("all_input_ids"), out_ids=dev("output_ids"))

    # --- the cached path ------------------------------------------------------------------------

    def resolve(self, be, logits, data: Optional[SamplingData], param: Optional[SamplingParam]) -> History:
        if data is None or data.request_ids is None:
            return self._stateless(be, logits, data, param)
        rids = data.request_ids
        rows, vocab = int(logits.shape[0]), int(logits.shape[1])
        if self.max_requests is not None and rows > self.max_requests:
            raise SamplingInputError(
                f"the batch has {rows} requests but max_cached_requests is {self.max_requests}"
            )
        ops = _Ops("torch", logits.device) if be.name in ("torch", "triton") else _Ops("numpy")
        has_history = data.all_input_ids is not None or data.output_ids is not None
        fresh = []  # rows built from the history arrays
        for b, rid in enumerate(rids.tolist()):
            entry = self.entries.get(rid)
            if data.is_prefill or entry is None:
                if entry is None and not data.is_prefill and not has_history:
                    raise SamplingInputError(
                        f"request_ids: request {rid} is not cached (never prefilled, cleared or evicted) "
                        "and no all_input_ids / output_ids were given to rebuild it"
                    )
                fresh.append(b)
            elif entry.vocab != vocab:
                raise SamplingInputError(f"request {rid} was cached with V = {entry.vocab}, now V = {vocab}")
        for b in fresh:
            row_param = param.take([b], convert=False) if param is not None else SamplingParam.all_greedy(1)
            self.entries[int(rids[b])] = _Entry(vocab=vocab, param=row_param, out_len=0)
        new_bound = self._new_count_bound(rids, fresh, data, vocab)
        table = self._assemble(ops, rids, fresh, data, vocab, new_bound)
        pending = self._append_new_tokens(ops, table, rids, fresh, data, vocab, defer=be.reads_cache_table)
        for rid in rids.tolist():
            self.entries.move_to_end(rid)
        if param is None:
            param = SamplingParam.concat([self.entries[r].param for r in rids.tolist()])
        else:
            for b, rid in enumerate(rids.tolist()):
                if b not in fresh:
                    self.entries[rid].param = param.take([b], convert=False)
        self.table = table
        if be.reads_cache_table:
            return History(param, positions=table.positions, table_ids=table.ids, table_flags=table.flags,
                           table_new=pending, table=table)
        flags = table.flags
        seen = (flags & 1) == 1
        hist = History(
            param,
            rep_ids=ops.where(seen, table.ids, -1),
            out_ids=table.ids,
            out_counts=flags >> 1,
            positions=table.positions,
            table=table,
        )
        if ops.kind == "numpy":
            hist.rep_ids, hist.out_ids, hist.out_counts, hist.positions = (
                be.asarray(np.ascontiguousarray(a), logits) for a in (hist.rep_ids, hist.out_ids, hist.out_counts, hist.positions)
            )
        return hist

    def _assemble(self, ops: _Ops, rids: np.ndarray, fresh: List[int], data: SamplingData, vocab: int, new_bound) -> _Table:
        """The table for this batch: reuse, gather from the last table, unpark, or build."""
        prev = self.table
        if prev is not None and (prev.ops.kind != ops.kind or prev.ops.device != ops.device):
            # State lives in one framework on one device; moving it is not worth a code path.
            # The requests become unknown: the caller prefills them again or passes histories.
            raise SamplingInputError(
                "this sampler's request cache holds state for another backend or device; "
                "call clear_cache() before switching, or use one Sampler per backend"
            )
        same = prev is not None and not fresh and np.array_equal(prev.request_ids, rids)
        if same and int((prev.bound + new_bound).max()) <= prev.width:
            return prev
        built = {b: self._build_row(data, b, vocab) for b in fresh}
        prev_row = {} if prev is None else {int(r): i for i, r in enumerate(prev.request_ids.tolist())}
        bound = np.zeros(len(rids), np.int64)
        for b, rid in enumerate(rids.tolist()):
            if b in built:
                bound[b] = len(built[b][0])
            elif rid in prev_row:
                bound[b] = prev.bound[prev_row[rid]]
            else:
                bound[b] = self.entries[rid].parked.bound
        # Room for this step's new tokens: at most one entry per new output id.
        width = _width(int((bound + new_bound).max()))
        ids = ops.full((len(rids), width), -1, "int64")
        flags = ops.full((len(rids), width), 0, "int32")
        positions = ops.full((len(rids),), 0, "int64")
        last = None if prev is None or prev.last is None else ops.full((len(rids),), -1, "int64")
        src = [(b, prev_row[rid]) for b, rid in enumerate(rids.tolist()) if b not in built and rid in prev_row]
        if src:
            dst_idx = ops.from_host(np.array([d for d, _ in src]))
            src_idx = ops.from_host(np.array([s for _, s in src]))
            w = min(width, prev.width)
            ids[dst_idx, :w] = prev.ids[src_idx, :w]
            flags[dst_idx, :w] = prev.flags[src_idx, :w]
            positions[dst_idx] = prev.positions[src_idx]
            if last is not None:
                last[dst_idx] = prev.last[src_idx]
        for b, rid in enumerate(rids.tolist()):
            if b in built or rid in prev_row:
                continue
            parked = self.entries[rid].parked
            n = parked.bound
            ids[b, :n] = parked.ids
            flags[b, :n] = parked.flags
            positions[b : b + 1] = parked.position
            if parked.last is not None:
                if last is None:
                    last = ops.full((len(rids),), -1, "int64")
                last[b : b + 1] = parked.last
            self.entries[rid].parked = None
        if built:
            rows = sorted(built)
            host_ids = np.full((len(rows), width), -1, np.int64)
            host_flags = np.zeros((len(rows), width), np.int32)
            for i, b in enumerate(rows):
                u, f = built[b]
                host_ids[i, : len(u)] = u
                host_flags[i, : len(f)] = f
            idx = ops.from_host(np.array(rows))
            ids[idx] = ops.from_host(host_ids)
            flags[idx] = ops.from_host(host_flags)
            pos = np.array([self.entries[int(rids[b])].out_len for b in rows], np.int64)
            positions[idx] = ops.from_host(pos)
        if prev is not None:
            self._park_all(prev, keep=set(rids.tolist()))
        return _Table(ops, rids.copy(), ids, flags, positions, bound, last)

    def _build_row(self, data: SamplingData, b: int, vocab: int):
        """Distinct ids and flags of row ``b`` from the history arrays (a prefill)."""
        def valid(a):
            if a is None:
                return np.zeros(0, np.int64)
            r = a[b]
            return r[(r >= 0) & (r < vocab)]

        seen = valid(data.all_input_ids)
        out = valid(data.output_ids)
        ids, inverse = np.unique(np.concatenate([seen, out]), return_inverse=True)
        counts = np.bincount(inverse[len(seen):], minlength=len(ids)) if len(ids) else np.zeros(0, np.int64)
        is_seen = np.isin(ids, seen)
        self.entries[int(data.request_ids[b])].out_len = len(out)
        return ids, (2 * counts + is_seen).astype(np.int32)

    def _new_count_bound(self, rids, fresh, data: SamplingData, vocab: int) -> np.ndarray:
        """Per row, how many tokens this call may append (decode rows only)."""
        out = np.zeros(len(rids), np.int64)
        for b, rid in enumerate(rids.tolist()):
            if b in fresh:
                continue
            if data.output_ids is None:
                out[b] = 1
            else:
                r = data.output_ids[b]
                out[b] = max(int(((r >= 0) & (r < vocab)).sum()) - self.entries[rid].out_len, 0)
        return out

    def _append_new_tokens(self, ops: _Ops, table: _Table, rids, fresh, data: SamplingData, vocab: int, defer: bool):
        """Add decode rows' new tokens: the output_ids beyond the cache, or the last sampled ones.

        With ``defer`` the last new token of each row is not added but returned ([B], -1 for
        none): the backend adds it by the rule of :meth:`_append` as it reads the table, which
        saves a decode step the ~25 small array operations of an append."""
        decode = [b for b in range(len(rids)) if b not in fresh]
        if not decode:
            return None
        if data.output_ids is None:
            if table.last is None:
                raise SamplingInputError(
                    "a decode step without output_ids appends the tokens this sampler returned at the "
                    "previous step, but it has not sampled these requests yet"
                )
            new = table.last[:, None]
            mask = np.zeros(len(rids), bool)
            mask[decode] = True
            if not mask.all():  # (a whole decode batch copies nothing from the host)
                new = ops.where(ops.from_host(mask)[:, None], new, -1)
            counts = mask.astype(np.int64)
        else:
            tails = []
            for b in range(len(rids)):
                if b in fresh:
                    tails.append(np.zeros(0, np.int64))
                    continue
                entry = self.entries[int(rids[b])]
                r = data.output_ids[b]
                r = r[(r >= 0) & (r < vocab)]
                if len(r) < entry.out_len:
                    raise SamplingInputError(
                        f"output_ids of request {int(rids[b])} has {len(r)} valid ids, fewer than the "
                        f"{entry.out_len} already cached: re-prefill it to replace its history"
                    )
                tails.append(r[entry.out_len :])
            counts = np.array([len(t) for t in tails], np.int64)
            host_new = np.full((len(rids), max(1, int(counts.max()))), -1, np.int64)
            for b, t in enumerate(tails):
                host_new[b, : len(t)] = t
            new = ops.from_host(host_new)
        cols = int(new.shape[1])
        for j in range(cols - 1 if defer else cols):
            self._append(ops, table, new[:, j], vocab)
        for b in decode:
            self.entries[int(rids[b])].out_len += int(counts[b])
        table.bound = table.bound + counts
        return new[:, cols - 1] if defer else None

    @staticmethod
    def _append(ops: _Ops, table: _Table, tok, vocab: int) -> None:
        """One new output token per row (-1: none): count it, mark it seen, advance the stream.

        The row stays sorted: a known id is at column ``rank`` (the number of smaller ids); a new
        one is inserted there, the larger ids moving one column right (the width leaves room)."""
        table.aux.clear()
        ok = (tok >= 0) & (tok < vocab)
        t = tok[:, None]
        ids, flags = table.ids, table.flags
        rank = ((ids >= 0) & (ids < t)).sum(1)[:, None]
        cols = ops.arange(table.width)[None, :]
        at = ok[:, None] & (cols == rank)
        new = ok[:, None] & ~(ids == t).any(1)[:, None]
        shift = new & (cols > rank)
        table.ids[...] = ops.where(at, t, ops.where(shift, ops.shift_right(ids), ids))
        table.flags[...] = ops.where(
            at, ops.where(new, 3, (flags | 1) + 2), ops.where(shift, ops.shift_right(flags), flags)
        )
        table.positions += ok

    def _park_all(self, table: _Table, keep=frozenset()) -> None:
        """Move rows of requests that left the batch into their own trimmed copies."""
        for i, rid in enumerate(table.request_ids.tolist()):
            if rid in keep or rid not in self.entries:
                continue
            n = int(table.bound[i])
            self.entries[rid].parked = _Parked(
                ids=table.ops.copy(table.ids[i, :n]),
                flags=table.ops.copy(table.flags[i, :n]),
                position=table.positions[i : i + 1] + 0,
                last=None if table.last is None else table.last[i : i + 1] + 0,
                bound=n,
            )

    # --- after the call -------------------------------------------------------------------------

    def record(self, history: History, tokens) -> None:
        """Remember the tokens just returned (they are appended at the next decode step)."""
        table = history.table
        if table is None:
            return
        if table.ops.kind == "numpy":
            tokens = tokens.asnumpy() if hasattr(tokens, "asnumpy") else np.asarray(tokens)
        table.last = tokens.to(table.ids.device) if table.ops.kind == "torch" else np.asarray(tokens, np.int64)
        self._evict()

    def _evict(self) -> None:
        if self.max_requests is None:
            return
        current = set() if self.table is None else set(self.table.request_ids.tolist())
        while len(self.entries) > self.max_requests:
            rid = next(r for r in self.entries if r not in current)
            del self.entries[rid]

    def discard(self, history: History) -> None:
        """A call failed after its state was updated: forget that batch's requests entirely.

        They are then unknown: the next call must prefill them or pass their histories."""
        if history.table is None:
            return
        for rid in history.table.request_ids.tolist():
            self.entries.pop(rid, None)
        if self.table is history.table:
            self.table = None

    def clear(self, request_ids=None) -> None:
        """Drop the given requests' state (all when None)."""
        if request_ids is None:
            self.entries.clear()
            self.table = None
            return
        for rid in np.asarray(request_ids).reshape(-1).tolist():
            self.entries.pop(int(rid), None)
