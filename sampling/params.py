"""Per-row sampling parameters: validation and normalisation, done once on the host."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .errors import SamplingInputError, first_bad_row
from .stream import MASK32, MAX_SEED

#: Field order of the normalised arrays every backend receives.
FLOAT_FIELDS = (
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "temperature",
    "top_p",
    "min_p",
)
ARRAY_FIELDS = FLOAT_FIELDS + ("top_k", "greedy", "has_seed", "seed_lo", "seed_hi")

#: The value that turns each user-facing field off.
OFF = {
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "min_p": 0.0,
}


def _vector(name: str, value: Any, rows: Optional[int]) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise SamplingInputError(f"{name} must be a 1-D array with one value per row, got shape {arr.shape}")
    if rows is not None and arr.shape[0] != rows:
        raise SamplingInputError(f"{name} has {arr.shape[0]} rows, expected {rows} (the batch size)")
    if arr.dtype == object:
        raise SamplingInputError(f"{name} must be numeric, got an object array")
    return arr


def _float_field(name: str, value: Any, rows: Optional[int]) -> np.ndarray:
    arr = _vector(name, value, rows)
    if arr.dtype.kind not in "fiu":
        raise SamplingInputError(f"{name} must be a float array, got dtype {arr.dtype}")
    wide = arr.astype(np.float64)
    bad = ~np.isfinite(wide)
    if bad.any():
        row = first_bad_row(bad)
        raise SamplingInputError(f"{name}[{row}] = {wide[row]} is not finite")
    return wide


def _check(name: str, values: np.ndarray, ok: np.ndarray, rule: str) -> None:
    if not ok.all():
        row = first_bad_row(~ok)
        raise SamplingInputError(f"{name}[{row}] = {values[row].item()!r} is invalid: {rule}")


def _int_field(name: str, value: Any, rows: Optional[int]) -> np.ndarray:
    arr = _vector(name, value, rows)
    if arr.dtype.kind == "f":
        wide = arr.astype(np.float64)
        ok = np.isfinite(wide) & (wide == np.round(wide))
        _check(name, wide, ok, "must be an integer")
        return wide.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise SamplingInputError(f"{name} must be an integer array, got dtype {arr.dtype}")
    return arr


def _seed_field(value: Any, rows: Optional[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arr = _vector("seed", value, rows)
    if arr.dtype.kind == "u":
        seeds = arr.astype(np.uint64)
        has = np.ones(seeds.shape, bool)
    elif arr.dtype.kind == "i":
        wide = arr.astype(np.int64)
        _check("seed", wide, wide >= -1, f"a seed is an integer in [0, {MAX_SEED}], or -1 for no seed")
        has = wide >= 0
        seeds = np.where(has, wide, 0).astype(np.uint64)
    else:
        raise SamplingInputError(f"seed must be an integer array, got dtype {arr.dtype}")
    lo = (seeds & np.uint64(MASK32)).astype(np.int64)
    hi = (seeds >> np.uint64(32)).astype(np.int64)
    return has, lo, hi


@dataclass(frozen=True)
class SamplingParam:
    """Per-row sampling parameters for a batch of ``rows`` requests.

    Build it with :meth:`from_numpy`. The arrays are validated and normalised on the host once,
    so backends receive a fixed set of float32 / int64 / bool arrays with "off" values filled in:

    ``repetition_penalty`` (1 = off), ``frequency_penalty`` / ``presence_penalty`` (0 = off),
    ``temperature`` (1 for greedy rows), ``greedy`` (bool), ``top_k`` (0 = off),
    ``top_p`` (1 = off), ``min_p`` (0 = off), ``has_seed`` and the seed's 32-bit words
    ``seed_lo`` / ``seed_hi``.
    """

    rows: int
    arrays: Mapping[str, np.ndarray]
    #: The fields the caller gave (the rest are off).
    given: frozenset
    to_tensor: Optional[Callable] = None
    #: Arrays converted by ``to_tensor`` at construction (the caller's choice of device).
    tensors: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_numpy(
        cls,
        repetition_penalty=None,
        frequency_penalty=None,
        presence_penalty=None,
        temperature=None,
        top_k=None,
        top_p=None,
        min_p=None,
        seed=None,
        do_sample=None,
        to_tensor: Optional[Callable] = None,
    ) -> "SamplingParam":
        """Validate per-row parameter arrays and build a :class:`SamplingParam`.

        Parameters
        ----------
        repetition_penalty : float array [B], > 0 (1 = off)
            Divides positive / multiplies negative logits of tokens seen in ``all_input_ids``.
        frequency_penalty, presence_penalty : float array [B] (0 = off, negative allowed)
            Subtracted per occurrence / once for tokens in ``output_ids``.
        temperature : float array [B], >= 0
            0 makes the row greedy.
        top_k : int array [B], >= -1
            -1 or 0 (or >= V) is off; ties at the k-th value are kept.
        top_p : float array [B], in (0, 1] (1 = off)
        min_p : float array [B], in [0, 1] (0 = off)
        seed : int array [B]
            In [0, 2**64) (uint64 arrays for seeds above 2**63 - 1); -1 means no seed for that row.
        do_sample : bool array [B]
            False makes the row greedy. ``None`` samples every row unless ``temperature`` is 0.
        to_tensor : callable, optional
            Converts each normalised numpy array to a backend tensor now (for example
            ``lambda a: torch.from_numpy(a).cuda()``); otherwise the sampler converts on first use.

        Any field left ``None`` is off for the whole batch.

        Examples
        --------
        >>> p = SamplingParam.from_numpy(temperature=np.array([0.7, 0.0]), top_k=np.array([50, -1]))
        >>> p.arrays["greedy"].tolist()
        [False, True]
        """
        raw = dict(
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
            do_sample=do_sample,
        )
        given = frozenset(k for k, v in raw.items() if v is not None)
        if not given:
            raise SamplingInputError("SamplingParam.from_numpy needs at least one field; pass param=None for greedy decoding")
        rows = None
        for name in raw:
            if raw[name] is not None:
                rows = np.asarray(raw[name]).shape[0] if np.ndim(raw[name]) == 1 else None
                break
        out: dict[str, np.ndarray] = {}
        for name in FLOAT_FIELDS:
            if raw[name] is None:
                continue
            wide = _float_field(name, raw[name], rows)
            rows = wide.shape[0]
            narrow = wide.astype(np.float32)
            if name == "repetition_penalty":
                _check(name, wide, (wide > 0) & (narrow > 0), "must be > 0 (1 = off)")
            elif name == "temperature":
                _check(name, wide, wide >= 0, "must be >= 0 (0 = greedy)")
                _check(name, wide, (wide == 0) | (narrow > 0), "is positive but underflows float32")
            elif name == "top_p":
                _check(name, wide, (wide > 0) & (wide <= 1) & (narrow > 0), "must be in (0, 1] (1 = off)")
            elif name == "min_p":
                _check(name, wide, (wide >= 0) & (wide <= 1), "must be in [0, 1] (0 = off)")
            out[name] = narrow
        if raw["top_k"] is not None:
            k = _int_field("top_k", raw["top_k"], rows)
            rows = k.shape[0]
            _check("top_k", k, k >= -1, "must be >= -1 (-1 or 0 = off)")
            out["top_k"] = np.maximum(k.astype(np.int64), 0)
        if raw["seed"] is not None:
            has, lo, hi = _seed_field(raw["seed"], rows)
            rows = has.shape[0]
            out.update(has_seed=has, seed_lo=lo, seed_hi=hi)
        greedy = None
        if raw["do_sample"] is not None:
            ds = _vector("do_sample", raw["do_sample"], rows)
            if ds.dtype.kind not in "biu" or (ds.dtype.kind != "b" and not np.isin(ds, (0, 1)).all()):
                raise SamplingInputError(f"do_sample must be a bool array, got dtype {ds.dtype}")
            rows = ds.shape[0]
            greedy = ~ds.astype(bool)
        assert rows is not None
        if greedy is None:
            greedy = np.zeros(rows, bool)
        if "temperature" in out:
            greedy = greedy | (out["temperature"] == 0)
            # Greedy rows are never divided by their temperature ("processed" logprobs use T = 1).
            out["temperature"] = np.where(greedy, np.float32(1), out["temperature"]).astype(np.float32)
        out["greedy"] = greedy
        arrays = normalised(rows, out)
        tensors = {k: to_tensor(v) for k, v in arrays.items()} if to_tensor is not None else {}
        return cls(rows=rows, arrays=arrays, given=given, to_tensor=to_tensor, tensors=tensors)

    @classmethod
    def all_greedy(cls, rows: int) -> "SamplingParam":
        """Greedy decoding with no penalties (what ``param=None`` means)."""
        return cls(rows=rows, arrays=normalised(rows, {"greedy": np.ones(rows, bool)}), given=frozenset())

    # Flags computed once, so that backends choose their fast paths without looking at device data.
    def any(self, name: str) -> bool:
        """True if any row uses the named stage (a field name, or "seed" / "sampling")."""
        a = self.arrays
        if name == "sampling":
            return not bool(a["greedy"].all())
        if name == "seed":
            return bool(a["has_seed"].any())
        if name == "top_k":
            return bool((a["top_k"] > 0).any())
        return bool((a[name] != OFF[name]).any())

    def take(self, rows, convert: bool = True) -> "SamplingParam":
        """The parameters of the given rows, in that order (converted with ``to_tensor`` if
        ``convert`` and one was given; otherwise host arrays, converted on use)."""
        rows = np.asarray(rows)
        arrays = {k: v[rows] for k, v in self.arrays.items()}
        tensors = {k: self.to_tensor(v) for k, v in arrays.items()} if convert and self.to_tensor is not None else {}
        return SamplingParam(rows=len(rows), arrays=arrays, given=self.given, to_tensor=self.to_tensor, tensors=tensors)

    @staticmethod
    def concat(parts: "list[SamplingParam]") -> "SamplingParam":
        """Rows of several parameter sets stacked in order."""
        arrays = {k: np.concatenate([p.arrays[k] for p in parts]) for k in ARRAY_FIELDS}
        given = frozenset().union(*(p.given for p in parts))
        return SamplingParam(rows=int(arrays["greedy"].shape[0]), arrays=arrays, given=given)


def normalised(rows: int, given: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fill every field that was not given with its "off" value, in the canonical dtypes."""
    out: dict[str, np.ndarray] = {}
    for name in FLOAT_FIELDS:
        out[name] = np.ascontiguousarray(given.get(name, np.full(rows, OFF[name], np.float32)), dtype=np.float32)
    out["top_k"] = np.ascontiguousarray(given.get("top_k", np.zeros(rows, np.int64)), dtype=np.int64)
    out["greedy"] = np.ascontiguousarray(given.get("greedy", np.zeros(rows, bool)), dtype=bool)
    out["has_seed"] = np.ascontiguousarray(given.get("has_seed", np.zeros(rows, bool)), dtype=bool)
    out["seed_lo"] = np.ascontiguousarray(given.get("seed_lo", np.zeros(rows, np.int64)), dtype=np.int64)
    out["seed_hi"] = np.ascontiguousarray(given.get("seed_hi", np.zeros(rows, np.int64)), dtype=np.int64)
    return out
