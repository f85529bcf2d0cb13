"""Hypothesis strategies for every input the sampling API takes.

Each strategy builds valid ``from_numpy`` arguments: logits batches (float32, float16, bfloat16),
per-row :class:`~sampling.SamplingParam` keyword arrays with the edge values of every field, and
token histories padded with -1 or ``vocab_size``. :func:`cases` bundles them into a :class:`Case`
that can build the API objects and run the numpy reference on itself.

Shrinking is steered towards readable counter-examples: every element strategy lists the value
that turns its field off first, logits shrink towards small vocabularies, few rows and the
"grid" row kind (small exact values with ties), and optional fields shrink towards absent.

Example
-------
>>> from hypothesis import given
>>> from sampling.testing import strategies as sst
>>> @given(sst.cases(max_rows=3, max_vocab=16))
... def test_runs(case):
...     logprobs, tokens, _, _ = case.reference()
...     assert ((tokens >= 0) & (tokens < case.vocab)).all()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import numpy as np

from sampling.testing import require

require("hypothesis")

from hypothesis import strategies as st  # noqa: E402

from sampling.data import SamplingData  # noqa: E402
from sampling.params import SamplingParam  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")
PARAM_FIELDS = (
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "do_sample",
)
HISTORY_FIELDS = ("all_input_ids", "output_ids")
#: How a logits row is built. "grid" (first, the shrink target) draws each value from a small set
#: of exact numbers, so rows are full of ties and easy to read.
ROW_KINDS = ("grid", "normal", "peaked", "flat", "near_ties", "masked", "large")
#: Vocabulary sizes of real models (odd on purpose: no power-of-two assumptions).
REAL_VOCABS = (111, 989, 32000, 151936)
GRID = (0.0, 1.0, -1.0, 2.0, 0.5, -2.0, 4.0, -np.inf)
#: Largest |logit| generated: finite in float16 (max 65504).
LARGE = 3.0e4


def bfloat16_dtype():
    """numpy's bfloat16 (from ``ml_dtypes``), or None when ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), still as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    finite = np.isfinite(x)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    out = np.where(finite, rounded, bits & 0xFFFF0000).astype(np.uint32)
    return out.view(np.float32)


def as_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``values`` in the logits dtype ``dtype``.

    bfloat16 gives an ``ml_dtypes.bfloat16`` array when ml_dtypes is installed; otherwise a
    float32 array whose values are exactly representable in bfloat16 (frameworks then convert it
    to their own bfloat16 without changing a value).
    """
    values = np.asarray(values, dtype=np.float32)
    if dtype == "float32":
        return values.copy()
    if dtype == "float16":
        return values.astype(np.float16)
    if dtype == "bfloat16":
        bf16 = bfloat16_dtype()
        rounded = round_to_bfloat16(values)
        return rounded.astype(bf16) if bf16 is not None else rounded
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


# --- logits -------------------------------------------------------------------------------------


def _row_from_rng(kind: str, vocab: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    if kind == "grid":
        row = rng.choice(np.array(GRID, np.float32), size=vocab)
    elif kind == "normal":
        row = rng.standard_normal(vocab) * scale
    elif kind == "peaked":
        row = rng.standard_normal(vocab)
        row[rng.integers(vocab)] += 10.0 * scale + 20.0
    elif kind == "flat":
        row = np.full(vocab, scale - 3.0)
    elif kind == "near_ties":
        # A few distinct values, each nudged by one float32 ulp up or down at random places.
        base = rng.choice(rng.standard_normal(3) * scale, size=vocab).astype(np.float32)
        nudge = rng.integers(-1, 2, size=vocab)
        row = np.where(nudge > 0, np.nextafter(base, np.float32(np.inf)), base)
        row = np.where(nudge < 0, np.nextafter(base, np.float32(-np.inf)), row)
    elif kind == "masked":
        row = rng.standard_normal(vocab) * scale
        row[rng.random(vocab) < rng.choice([0.5, 0.9, 0.99])] = -np.inf
    elif kind == "large":
        row = rng.uniform(-LARGE, LARGE, size=vocab)
    else:
        raise ValueError(f"unknown row kind {kind!r}")
    row = np.asarray(row, np.float32)
    if not np.isfinite(row).any():
        row[rng.integers(vocab)] = 0.0  # a valid row has at least one finite logit
    return row


@st.composite
def logits_rows(draw, vocab: int, kinds: Sequence[str] = ROW_KINDS) -> np.ndarray:
    """One float32 logits row of length ``vocab`` (at least one finite value, no NaN, no +inf)."""
    kind = draw(st.sampled_from(tuple(kinds)))
    if kind == "grid" and vocab <= 64:
        # Drawn value by value so that hypothesis can shrink the row itself.
        values = draw(st.lists(st.sampled_from(GRID), min_size=vocab, max_size=vocab))
        row = np.array(values, np.float32)
        if not np.isfinite(row).any():
            row[0] = 0.0
        return row
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from((1.0, 3.0, 0.3, 10.0)))
    return _row_from_rng(kind, vocab, np.random.default_rng(seed), scale)


@st.composite
def logits(draw, rows: int, vocab: int, dtype: str = "float32", kinds: Sequence[str] = ROW_KINDS) -> np.ndarray:
    """A valid [rows, vocab] logits batch in ``dtype`` (see :func:`as_dtype` for bfloat16).

    Rows mix the kinds of :data:`ROW_KINDS`: exact ties, one-ulp near-ties, very peaked and very
    flat rows, ``-inf`` masked entries and large magnitudes (finite in float16).
    """
    values = np.stack([draw(logits_rows(vocab, kinds)) for _ in range(rows)])
    return as_dtype(values, dtype)


def vocab_sizes(max_vocab: int = 64, min_vocab: int = 2, realistic: bool = True):
    """Vocabulary sizes: mostly small, sometimes the odd sizes of :data:`REAL_VOCABS`."""
    small = st.integers(min_vocab, max(min_vocab, min(max_vocab, 128)))
    big = [v for v in REAL_VOCABS if min_vocab <= v <= max_vocab]
    if not realistic or not big:
        return small

    @st.composite
    def pick(draw):
        # The selector shrinks to 0, which means "small": minimal examples stay small.
        return draw(st.sampled_from(big)) if draw(st.integers(0, 7)) == 7 else draw(small)

    return pick()


# --- parameters ---------------------------------------------------------------------------------


def _floats(lo: float, hi: float):
    # Bounds rounded inwards to float32, as hypothesis requires for width=32.
    lo32, hi32 = np.float32(lo), np.float32(hi)
    if lo32 < lo:
        lo32 = np.nextafter(lo32, np.float32(np.inf))
    if hi32 > hi:
        hi32 = np.nextafter(hi32, np.float32(-np.inf))
    return st.floats(float(lo32), float(hi32), width=32, allow_nan=False, allow_infinity=False)


def field_values(name: str, vocab: int, greedy: str = "mixed", seeded: str = "mixed"):
    """Values of one parameter field for one row; the first listed edge value is "off"."""
    if name == "temperature":
        edges = [1.0, 0.0, 0.5, 2.0, 0.05] if greedy != "none" else [1.0, 0.5, 2.0, 0.05]
        if greedy == "all":
            return st.just(0.0)
        return st.one_of(st.sampled_from(edges), _floats(0.05, 5.0))
    if name == "top_k":
        # Small k cut into the bulk of the distribution, where top-k and top-p interact.
        small = st.integers(1, max(1, min(vocab - 1, 8)))
        return st.one_of(st.sampled_from([-1, 0, 1, 2, vocab, vocab + 1]), small, st.integers(1, vocab))
    if name == "top_p":
        edges = st.sampled_from([1.0, 0.5, 0.9, 1e-6, 1e-30])
        return st.one_of(edges, _floats(0.3, 0.95), _floats(1e-6, 1.0))
    if name == "min_p":
        return st.one_of(st.sampled_from([0.0, 1.0, 0.1, 0.5]), _floats(0.01, 0.3), _floats(0.0, 1.0))
    if name == "repetition_penalty":
        return st.one_of(st.sampled_from([1.0, 1.5, 0.5, 2.0]), _floats(0.1, 10.0))
    if name in ("frequency_penalty", "presence_penalty"):
        return st.one_of(st.sampled_from([0.0, 0.5, -0.5, 1.0]), _floats(-2.0, 2.0))
    if name == "seed":
        some = st.one_of(st.sampled_from([0, 1, 2**63 - 1]), st.integers(0, 2**63 - 1))
        return st.one_of(st.just(-1), some) if seeded == "mixed" else some
    if name == "do_sample":
        if greedy == "all":
            return st.just(False)
        return st.just(True) if greedy == "none" else st.booleans()
    raise ValueError(f"unknown parameter field {name!r}")


def _param_plan(draw, fields, required, greedy: str, seeded: str, wide_seeds: bool = True) -> Dict[str, Any]:
    """Batch-level choices: which fields are given, and each one's array dtype."""
    fields = [f for f in fields if not (f == "seed" and seeded == "none")]
    required = set(required) | ({"seed"} if seeded == "all" else set())
    if greedy == "all" and not {"temperature", "do_sample"} & required:
        either = [f for f in ("temperature", "do_sample") if f in fields] or ["temperature"]
        required.add(draw(st.sampled_from(either)))
    plan: Dict[str, Any] = {}
    for name in fields:
        if name not in required and not draw(st.booleans()):
            continue
        if name == "seed":
            # -1 ("no seed") needs a signed array; seeds above 2**63 - 1 need uint64.
            wide = wide_seeds and not (seeded == "mixed" and draw(st.booleans()))
            plan[name] = draw(st.sampled_from([np.int64, np.uint64])) if wide else np.int64
        elif name == "top_k":
            plan[name] = draw(st.sampled_from([np.int64, np.int32]))
        elif name == "do_sample":
            plan[name] = bool
        else:
            plan[name] = draw(st.sampled_from([np.float32, np.float64]))
    return plan


def _param_row(draw, plan, vocab: int, greedy: str, seeded: str) -> Dict[str, Any]:
    row = {}
    for name, dtype in plan.items():
        row[name] = draw(field_values(name, vocab, greedy, seeded if dtype is not np.uint64 else "all"))
        if name == "seed" and dtype is np.uint64:
            row[name] |= draw(st.integers(0, 1)) << 63  # seeds above 2**63 - 1 need a uint64 array
    return row


def _param_arrays(plan, rows) -> Dict[str, np.ndarray]:
    return {name: np.array([r[name] for r in rows], dtype) for name, dtype in plan.items()}


@st.composite
def sampling_params(
    draw,
    rows: int,
    vocab: int,
    *,
    fields: Sequence[str] = PARAM_FIELDS,
    required: Sequence[str] = (),
    greedy: str = "mixed",
    seeded: str = "mixed",
    wide_seeds: bool = True,
) -> Dict[str, np.ndarray]:
    """Keyword arguments for :meth:`SamplingParam.from_numpy` (only the fields given).

    Parameters
    ----------
    rows, vocab : int
        Batch size and vocabulary size (top-k edge values are 1, ``vocab`` and ``vocab + 1``).
    fields : names of :data:`PARAM_FIELDS`
        Fields that may appear; each is present or absent at random, unless in ``required``.
    greedy : {"mixed", "none", "all"}
        "none": every row samples (temperature > 0, ``do_sample`` True); "all": every row is
        greedy (temperature 0 and / or ``do_sample`` False); "mixed": anything.
    seeded : {"mixed", "all", "none"}
        "all": every row has a seed >= 0; "none": no seed field; "mixed": some rows may have -1.
    wide_seeds : bool
        Seeds may be uint64 arrays with values up to 2**64 - 1 (False: int64 in [-1, 2**63)).

    The result may be empty (no field drawn): pass ``param=None`` then.
    """
    plan = _param_plan(draw, fields, required, greedy, seeded, wide_seeds)
    return _param_arrays(plan, [_param_row(draw, plan, vocab, greedy, seeded) for _ in range(rows)])


# --- histories ----------------------------------------------------------------------------------


def _history_plan(draw, fields, required, max_len: int) -> Dict[str, tuple]:
    """Batch-level choices: which history arrays are given, their length and dtype."""
    plan = {}
    for name in fields:
        if name in required or draw(st.booleans()):
            plan[name] = (draw(st.integers(0, max_len)), draw(st.sampled_from([np.int64, np.int32])))
    return plan


def _history_row(draw, plan, vocab: int, pad: Sequence, likely: Sequence[int] = ()) -> Dict[str, list]:
    pads = [vocab if p == "vocab" else int(p) for p in pad]
    ids = st.integers(0, vocab - 1)
    if len(likely):
        # Models repeat their likely tokens; penalising those is also what changes the outcome.
        ids = st.one_of(ids, st.sampled_from(sorted(int(t) for t in likely)))
    row = {}
    for name, (length, _) in plan.items():
        n_valid = draw(st.integers(0, length))
        # A small pool per row makes repeated ids (counts > 1) common.
        pool = draw(st.lists(ids, min_size=1, max_size=4))
        valid = draw(st.lists(st.sampled_from(pool), min_size=n_valid, max_size=n_valid))
        padding = draw(st.lists(st.sampled_from(pads), min_size=length - n_valid, max_size=length - n_valid))
        row[name] = valid + padding
    return row


def _history_arrays(plan, rows) -> Dict[str, np.ndarray]:
    return {
        name: np.array([r[name] for r in rows], np.int64).reshape(len(rows), length).astype(dtype)
        for name, (length, dtype) in plan.items()
    }


@st.composite
def token_ids(draw, rows: int, vocab: int, max_len: int = 8, pad: Sequence = (-1, "vocab")) -> np.ndarray:
    """A right-padded [rows, L] id array: valid ids (with repeats), then padding.

    ``pad`` lists the padding values; "vocab" stands for ``vocab_size``. L may be 0.
    """
    plan = _history_plan(draw, ["ids"], ["ids"], max_len)
    return _history_arrays(plan, [_history_row(draw, plan, vocab, pad) for _ in range(rows)])["ids"]


@st.composite
def histories(
    draw,
    rows: int,
    vocab: int,
    *,
    fields: Sequence[str] = HISTORY_FIELDS,
    required: Sequence[str] = (),
    max_len: int = 8,
    pad: Sequence = (-1, "vocab"),
) -> Dict[str, np.ndarray]:
    """Keyword arguments for :meth:`SamplingData.from_numpy` (``all_input_ids``, ``output_ids``)."""
    plan = _history_plan(draw, fields, required, max_len)
    return _history_arrays(plan, [_history_row(draw, plan, vocab, pad) for _ in range(rows)])


# --- whole cases --------------------------------------------------------------------------------


@dataclass
class Case:
    """One sampler call: logits, parameter and history keyword arguments.

    ``logits`` is in ``dtype`` (bfloat16 without ml_dtypes: float32 holding bfloat16 values, see
    :func:`as_dtype`). ``param`` and ``data`` are ``from_numpy`` keyword arguments; an empty
    ``param`` means ``param=None`` (greedy, no penalties), an empty ``data`` means ``data=None``.
    """

    logits: np.ndarray
    dtype: str = "float32"
    param: Dict[str, np.ndarray] = field(default_factory=dict)
    data: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.logits.shape[0])

    @property
    def vocab(self) -> int:
        return int(self.logits.shape[1])

    @property
    def logits32(self) -> np.ndarray:
        return np.asarray(self.logits).astype(np.float32)

    def sampling_param(self, to_tensor=None) -> Optional[SamplingParam]:
        return SamplingParam.from_numpy(**self.param, to_tensor=to_tensor) if self.param else None

    def sampling_data(self, to_tensor=None) -> Optional[SamplingData]:
        return SamplingData.from_numpy(**self.data, to_tensor=to_tensor) if self.data else None

    def arrays(self) -> Dict[str, np.ndarray]:
        """The normalised parameter arrays every backend receives."""
        p = self.sampling_param()
        return dict((p or SamplingParam.all_greedy(self.rows)).arrays)

    def take(self, index) -> "Case":
        """The rows ``index`` (a permutation, a slice, a subset), in that order."""
        index = np.arange(self.rows)[index]
        return Case(
            logits=self.logits[index],
            dtype=self.dtype,
            param={k: v[index] for k, v in self.param.items()},
            data={k: v[index] for k, v in self.data.items()},
        )

    def reference(
        self, *, sampler_seed: int = 0, call: int = 0, logprobs_mode: str = "sampling", num_logprobs: int = 0
    ):
        """``(logprobs, tokens, top_ids, top_logprobs)`` of :func:`sampling.kernels.reference.sample`."""
        from sampling.kernels import reference

        return reference.sample(
            self.logits32,
            self.arrays(),
            rep_ids=self.data.get("all_input_ids"),
            out_ids=self.data.get("output_ids"),
            sampler_seed=sampler_seed,
            call=call,
            logprobs_mode=logprobs_mode,
            num_logprobs=num_logprobs,
        )

    def __repr__(self) -> str:
        with np.printoptions(precision=9, threshold=64, edgeitems=4, linewidth=120):
            parts = [f"Case(dtype={self.dtype!r}, shape={self.logits.shape}", f"  logits={self.logits32!r}"]
            parts += [f"  {k}={v!r}" for k, v in self.param.items()]
            parts += [f"  {k}={v!r}" for k, v in self.data.items()]
        return "\n".join(parts) + ")"


@st.composite
def cases(
    draw,
    *,
    max_rows: int = 4,
    max_vocab: int = 64,
    rows: Optional[int] = None,
    vocab: Optional[int] = None,
    dtypes: Sequence[str] = DTYPES,
    kinds: Sequence[str] = ROW_KINDS,
    fields: Sequence[str] = PARAM_FIELDS,
    required: Sequence[str] = (),
    greedy: str = "mixed",
    seeded: str = "mixed",
    history: Sequence[str] = HISTORY_FIELDS,
    required_history: Sequence[str] = (),
    max_history: int = 8,
    pad: Sequence = (-1, "vocab"),
    realistic: bool = True,
    wide_seeds: bool = True,
) -> Case:
    """A whole sampler call as a :class:`Case` (valid logits, parameters and histories).

    ``max_rows`` / ``max_vocab`` bound the shape (``rows`` / ``vocab`` fix it); ``realistic``
    lets the vocabulary be one of :data:`REAL_VOCABS` when it fits. ``fields``, ``required``,
    ``greedy``, ``seeded`` and ``wide_seeds`` are as in :func:`sampling_params`; ``history`` lists the history
    fields that may appear (``()`` for none) and ``required_history`` those that must, ``pad`` the
    padding values (see :func:`token_ids`).

    Rows are drawn as a list (logits row, parameter values, history ids), so hypothesis can
    shrink a failing batch by deleting the rows that do not matter.
    """
    v = vocab if vocab is not None else draw(vocab_sizes(max_vocab, realistic=realistic))
    dtype = draw(st.sampled_from(tuple(dtypes)))
    plan = _param_plan(draw, fields, required, greedy, seeded, wide_seeds)
    hist = _history_plan(draw, history, required_history, max_history) if history else {}

    @st.composite
    def one_row(draw):
        x = draw(logits_rows(v, kinds))
        likely = np.argsort(-x, kind="stable")[:3]
        return x, _param_row(draw, plan, v, greedy, seeded), _history_row(draw, hist, v, pad, likely)

    lo, hi = (rows, rows) if rows is not None else (1, max_rows)
    drawn = draw(st.lists(one_row(), min_size=lo, max_size=hi))
    param = _param_arrays(plan, [r[1] for r in drawn])
    if greedy == "none" and not param:
        param = {"temperature": np.ones(len(drawn), np.float32)}
    x = as_dtype(np.stack([r[0] for r in drawn]), dtype)
    return Case(logits=x, dtype=dtype, param=param, data=_history_arrays(hist, [r[2] for r in drawn]))


@st.composite
def invalid_cases(draw, **kwargs) -> tuple:
    """A :class:`Case` in which some rows are invalid, and the sorted list of those rows.

    Each bad row gets a NaN, a +inf, or nothing finite (all ``-inf``); penalties and temperature
    keep every such row invalid. ``kwargs`` go to :func:`cases`.
    """
    case = draw(cases(**kwargs))
    bad = sorted(set(draw(st.lists(st.integers(0, case.rows - 1), min_size=1, max_size=case.rows))))
    x = case.logits32
    for row in bad:
        how = draw(st.sampled_from(["nan", "posinf", "all_neginf"]))
        if how == "all_neginf":
            x[row] = -np.inf
        else:
            x[row, draw(st.integers(0, case.vocab - 1))] = np.nan if how == "nan" else np.inf
    return Case(logits=as_dtype(x, case.dtype), dtype=case.dtype, param=case.param, data=case.data), bad
