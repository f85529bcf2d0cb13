"""A conformance check for foreign samplers: our semantics, rule by rule, as a yardstick.

An engine's own sampler (a custom CUDA kernel, a fused path) is wrapped in a small adapter and
run by :func:`check_sampler` on inputs drawn by hypothesis; each rule of the README's semantics is
checked against the numpy reference in turn, and the first broken rule is reported with the
smallest input hypothesis can shrink it to.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from sampling.testing import require

require("hypothesis")

import hypothesis  # noqa: E402
from hypothesis import HealthCheck, Verbosity, given, settings  # noqa: E402

from sampling.kernels import reference  # noqa: E402
from sampling.testing import strategies as sst  # noqa: E402

#: The rules, in the order they are checked (a later rule assumes the earlier ones hold).
RULES = ("greedy", "penalties", "kept set", "frequencies", "batch invariance")
#: Parameters a foreign sampler may support; "temperature" (0 = greedy) is required.
FEATURES = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)
PENALTIES = ("repetition_penalty", "frequency_penalty", "presence_penalty")

_DESCRIPTIONS = {
    "greedy": "Rows with temperature 0 return the argmax of the logits, lowest id on exact ties.",
    "penalties": (
        "Greedy rows return the argmax of the penalised logits: repetition z/r if z > 0 else z*r on "
        "each distinct id of all_input_ids, then z - f*count and z - p (count > 0) over output_ids, "
        "each step rounded to float32; ids outside [0, V) are padding."
    ),
    "kept set": (
        "Every sampled id is in the exact kept set: top-k (ties with the k-th value kept), then top-p "
        "on the distribution renormalised over the top-k survivors (keep t iff the mass strictly above "
        "t is < p), then min-p (keep t iff p_t >= min_p * p_max), after penalties and temperature."
    ),
    "frequencies": (
        "Sampled frequencies follow the exact renormalised distribution over the kept set "
        "(chi-square goodness of fit)."
    ),
    "batch invariance": (
        "A row's result does not depend on the other rows: permuting or slicing the batch changes no "
        "greedy id (nor a seeded id), and every sampled id stays in its own row's kept set."
    ),
}


class ConformanceError(AssertionError):
    """A rule of the semantics is broken; ``rule``, ``case`` and ``report`` say which and where."""

    def __init__(self, message: str, rule: str, case: Optional[sst.Case], report: "ConformanceReport"):
        super().__init__(message)
        self.rule = rule
        self.case = case
        self.report = report


@dataclass
class RuleResult:
    rule: str
    status: str  # "passed", "skipped" or "failed"
    detail: str = ""


@dataclass
class ConformanceReport:
    """Outcome of each rule, in order; ``ok`` is True when none failed."""

    results: List[RuleResult] = field(default_factory=list)
    #: The message of the broken rule (with ``raise_on_failure=False``), else "".
    failure: str = ""

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.results)

    def __str__(self) -> str:
        lines = [f"check_sampler: {'all rules hold' if self.ok else 'a rule is broken'}"]
        for r in self.results:
            lines.append(f"  {r.status:7s} {r.rule}" + (f": {r.detail}" if r.detail else ""))
        return "\n".join(lines)


class _Broken(Exception):
    """Raised inside a hypothesis test; hypothesis shrinks the case that raises it."""

    def __init__(self, detail: str, case: sst.Case, row: Optional[int] = None):
        super().__init__(detail)
        self.detail = detail
        self.case = case
        self.row = row  # the one row at fault, when the rule is about a single row


# --- the foreign sampler's view of a case ------------------------------------------------------


def foreign_inputs(case: sst.Case, features: Sequence[str], seeded: bool) -> Dict[str, np.ndarray]:
    """The per-row parameters handed to the foreign sampler, in plain conventions.

    ``temperature`` float32 (0 = greedy), ``top_k`` int64 in [1, V] (V = off), ``top_p`` float32 in
    (0, 1] (1 = off), ``min_p`` float32 in [0, 1] (0 = off), ``repetition_penalty`` float32 > 0
    (1 = off), ``frequency_penalty`` / ``presence_penalty`` float32 (0 = off), histories
    ``all_input_ids`` / ``output_ids`` int64 [B, L] right-padded with ids outside [0, V), and
    ``seed`` int64 >= 0 when the sampler is seeded. Only supported features are present.
    """
    a = case.arrays()
    vocab = case.vocab
    out: Dict[str, np.ndarray] = {}
    for name in features:
        if name == "temperature":
            out[name] = np.where(a["greedy"], np.float32(0), a["temperature"]).astype(np.float32)
        elif name == "top_k":
            k = a["top_k"]
            out[name] = np.where((k > 0) & (k < vocab), k, vocab).astype(np.int64)
        else:
            out[name] = a[name].astype(np.float32)
    if seeded:
        # check_sampler draws seeds below 2**63 (wide_seeds=False), so int64 holds them.
        out["seed"] = (a["seed_lo"] | (a["seed_hi"] << 32)).astype(np.int64)
    if "repetition_penalty" in features:
        out["all_input_ids"] = _ids(case, "all_input_ids")
    if "frequency_penalty" in features or "presence_penalty" in features:
        out["output_ids"] = _ids(case, "output_ids")
    return out


def _ids(case: sst.Case, name: str) -> np.ndarray:
    ids = case.data.get(name)
    return np.full((case.rows, 0), -1, np.int64) if ids is None else np.asarray(ids, np.int64)


def _copies(case: sst.Case, copies: int) -> sst.Case:
    """Each row repeated ``copies`` times in a row; seeded copies get distinct seeds (independent draws)."""
    big = case.take(np.repeat(np.arange(case.rows), copies))
    if "seed" in big.param:
        seeds = big.param["seed"].astype(np.int64)
        copy = np.tile(np.arange(copies, dtype=np.int64), case.rows)
        spread = (seeds * np.int64(1_000_003) + copy) & np.int64(2**62 - 1)
        big.param["seed"] = np.where(seeds >= 0, spread, seeds)
    return big


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    if hasattr(x, "asnumpy"):  # MindSpore
        return x.asnumpy()
    return np.asarray(x)


@dataclass
class _Exact:
    """What the reference says about a case: tempered logits, kept sets, distribution, greedy ids."""

    zt: np.ndarray
    greedy: np.ndarray
    greedy_ids: np.ndarray
    keep: np.ndarray
    loose: np.ndarray
    probs: np.ndarray
    arrays: Dict[str, np.ndarray]


def _exact(case: sst.Case, tolerance: float) -> _Exact:
    a = case.arrays()
    z = reference.penalize(case.logits32, a, case.data.get("all_input_ids"), case.data.get("output_ids"))
    zt = reference.scale(z, a)
    keep = reference.truncate(zt, a)
    loose = _tolerant_truncate(zt, a, tolerance) | keep
    keep[a["greedy"]] = loose[a["greedy"]] = True
    lp = reference.log_softmax(zt, keep)
    return _Exact(zt, a["greedy"], zt.argmax(axis=1), keep, loose, np.exp(lp), a)


def _why(ex: _Exact, row: int, token: int) -> str:
    """Which stage drops ``token`` from ``row``'s kept set, with the numbers."""
    a, z = ex.arrays, ex.zt[row].astype(np.float64)
    vocab = z.size
    k = int(a["top_k"][row])
    in_k = np.ones(vocab, bool)
    if 0 < k < vocab:
        kth = -np.partition(-z, k - 1)[k - 1]
        in_k = z >= kth
        if not in_k[token]:
            return f"top-k = {k} keeps {_fmt(np.flatnonzero(in_k))}; token {token} is below the k-th value {kth:.6g}"
    p = float(a["top_p"][row])
    w = np.where(in_k, np.exp(z - z[in_k].max()), 0.0)
    above = w[z > z[token]].sum() / w.sum()
    if p < 1 and above >= p:
        return (f"renormalised over the top-k survivors {_fmt(np.flatnonzero(in_k))}, the tokens above token {token} "
                f"hold {above:.6g} of the mass, not < top_p = {p:.6g}")
    ratio = np.exp(z[token] - z.max())
    return f"p_t / p_max = {ratio:.6g} for token {token}, below min_p = {float(a['min_p'][row]):.6g}"


def _tolerant_truncate(zt: np.ndarray, a, tol: float) -> np.ndarray:
    """The kept sets with every boundary moved outwards by ``tol``.

    A float32 implementation may round a top-k, top-p or min-p boundary differently from the float64
    reference; a token kept only thanks to such rounding is not a violation. Logit thresholds move
    by ``tol`` relative (at least ``tol`` absolute), probability thresholds by ``tol`` absolute.
    """
    rows, vocab = zt.shape
    keep = np.ones(zt.shape, bool)
    for i in range(rows):
        z = zt[i].astype(np.float64)
        top = z.max()
        k = int(a["top_k"][i])
        if 0 < k < vocab:
            kth = float(-np.partition(-z, k - 1)[k - 1])
            keep[i] = z >= kth - tol * max(abs(kth), 1.0)
        p = float(a["top_p"][i])
        if p < 1:
            w = np.where(keep[i], np.exp(z - top), 0.0)
            order = np.argsort(-z, kind="stable")
            csum = np.concatenate(([0.0], np.cumsum(w[order])))
            margin = np.where(np.isfinite(z), tol * np.maximum(np.abs(z), 1.0), 0.0)
            # Survivors counted "above" t only when larger than z_t by more than the margin.
            n_above = np.searchsorted(-z[order], -(z + margin), side="left")
            keep[i] &= csum[n_above] / csum[-1] < p + tol
        keep[i] &= np.exp(z - top) >= float(a["min_p"][i]) - tol
    return keep


# --- the checker ---------------------------------------------------------------------------------


@dataclass
class _Kit:
    fn: Callable
    to_tensor: Callable
    to_numpy: Callable
    features: tuple
    seeded: bool
    tolerance: float

    def call(self, case: sst.Case) -> np.ndarray:
        """Run the foreign sampler on ``case``; its ids as int64 [B] (shape and range checked)."""
        inputs = foreign_inputs(case, self.features, self.seeded)
        try:
            out = self.fn(self.to_tensor(case.logits32), {k: self.to_tensor(v) for k, v in inputs.items()})
            ids = self.to_numpy(out)
        except Exception as exc:  # a crash is a finding too: hypothesis shrinks it like the rest
            raise _Broken(f"the sampler raised {type(exc).__name__}: {exc}", case) from exc
        ids = np.asarray(ids)
        if ids.shape != (case.rows,) or ids.dtype.kind not in "iu":
            raise _Broken(
                f"the sampler returned {ids.dtype} ids of shape {ids.shape}, expected integers of shape ({case.rows},)",
                case,
            )
        ids = ids.astype(np.int64)
        bad = np.flatnonzero((ids < 0) | (ids >= case.vocab))
        if bad.size:
            raise _Broken(f"row {bad[0]}: the sampler returned id {ids[bad[0]]}, outside [0, {case.vocab})", case)
        return ids


def _expect_greedy(case: sst.Case, ids: np.ndarray, ex: _Exact, rows=None) -> None:
    rows = np.flatnonzero(ex.greedy) if rows is None else rows
    for i in rows:
        if ids[i] != ex.greedy_ids[i]:
            z = ex.zt[i]
            raise _Broken(
                f"row {i}: the sampler returned token {ids[i]} (value {z[ids[i]]!r}), the argmax is token "
                f"{ex.greedy_ids[i]} (value {z[ex.greedy_ids[i]]!r}); penalised logits {_fmt(z)}",
                case,
                int(i),
            )


def _expect_kept(case: sst.Case, row: int, ids: np.ndarray, ex: _Exact, context: str = "") -> None:
    """Every id in ``ids`` (draws for ``row``) lies in the row's kept set, up to the tolerance."""
    outside = ids[~ex.loose[row, ids]]
    if outside.size:
        kept = np.flatnonzero(ex.keep[row])
        raise _Broken(
            f"row {row}{context}: the sampler returned token {outside[0]}, outside the kept set {_fmt(kept)} "
            f"(reference probabilities {_fmt(ex.probs[row, kept])}): {_why(ex, row, int(outside[0]))}. "
            f"Processed logits {_fmt(ex.zt[row])}.",
            case,
            int(row),
        )


def _fmt(x) -> str:
    with np.printoptions(precision=6, threshold=24, edgeitems=6, linewidth=1000):
        return np.array2string(np.asarray(x), separator=", ")


def chi_square(counts, probs) -> tuple:
    """Pearson's goodness-of-fit test of ``counts`` against probabilities ``probs``.

    Bins expected to hold fewer than 5 draws are pooled (the chi-square approximation needs
    about 5 per bin). Returns ``(statistic, degrees_of_freedom, p_value)``; ``p_value`` is the
    probability that a sampler drawing exactly from ``probs`` scores at least ``statistic``.

    >>> chi_square(np.array([48, 52]), np.array([0.5, 0.5]))[2] > 0.5
    True
    """
    stats = require("scipy.stats")
    counts = np.asarray(counts, np.float64)
    probs = np.asarray(probs, np.float64)
    draws = counts.sum()
    expected = probs / probs.sum() * draws
    small = expected < 5
    obs = list(counts[~small])
    exp = list(expected[~small])
    if small.any():
        obs.append(counts[small].sum())
        exp.append(expected[small].sum())
    obs, exp = np.array(obs), np.array(exp)
    if len(exp) > 1 and exp[-1] < 5:  # a pooled bin still too thin joins the smallest regular one
        j = int(np.argmin(exp[:-1]))
        exp[j] += exp[-1]
        obs[j] += obs[-1]
        obs, exp = obs[:-1], exp[:-1]
    dof = len(exp) - 1
    if dof == 0:
        return 0.0, 0, 1.0
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat, dof, float(stats.chi2.sf(stat, dof))


def check_sampler(
    fn: Callable[[Any, Dict[str, Any]], Any],
    *,
    to_tensor: Optional[Callable[[np.ndarray], Any]] = None,
    to_numpy: Optional[Callable[[Any], np.ndarray]] = None,
    supports: Sequence[str] = FEATURES,
    seeded: bool = False,
    rules: Sequence[str] = RULES,
    max_rows: int = 4,
    max_vocab: int = 32,
    max_examples: int = 100,
    copies: int = 64,
    frequency_examples: int = 8,
    draws: int = 4000,
    alpha: float = 1e-4,
    tolerance: float = 1e-5,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> ConformanceReport:
    """Check a foreign sampler against the semantics, rule by rule (see :data:`RULES`).

    Parameters
    ----------
    fn : callable ``fn(logits, params) -> ids``
        The sampler behind a small adapter. ``logits`` is ``to_tensor`` of a float32 [B, V]
        array; ``params`` maps names to ``to_tensor`` of per-row arrays, in the plain conventions of
        :func:`foreign_inputs` (temperature 0 = greedy, top_k = V when off, top_p 1 and min_p 0 off,
        histories padded with ids outside [0, V)). It returns B integer ids (any array or tensor).
    to_tensor : callable, optional
        numpy -> the sampler's tensors (``torch.from_numpy``, ``lambda a: torch.from_numpy(a).cuda()``).
        Default: numpy arrays are passed as they are.
    to_numpy : callable, optional
        The result back to numpy. Default: torch (``.cpu()``), MindSpore (``.asnumpy()``), array-likes.
    supports : names from :data:`FEATURES`
        The parameters the sampler implements; the others are never set. "temperature" is required.
    seeded : bool
        The sampler honours ``params["seed"]`` (int64 [B]): the same seed must give the same id in
        any batch order or slice (checked by "batch invariance").
    rules : names from :data:`RULES`
        Which rules to check (in the order of :data:`RULES`).
    max_rows, max_vocab : int
        Largest distinct-row batch and vocabulary drawn (frequencies use at most 2 rows, V <= 16).
    max_examples : int
        Hypothesis examples per deterministic rule (greedy, penalties, kept set, batch invariance).
    copies : int
        Each distinct row is repeated ``copies`` times in the kept-set rule, so a token the sampler
        keeps by mistake is drawn with high probability.
    frequency_examples, draws : int
        Cases in the frequencies rule, and draws per row for each (rows repeated ``draws`` times).
    alpha : float
        False-alarm rate of the frequencies rule: a correct sampler fails it with probability at
        most ``alpha`` (Bonferroni over ``frequency_examples * 2`` chi-square tests, each at level
        ``alpha / (2 * frequency_examples)``; bins with fewer than 5 expected draws are pooled).
        The other rules never fail a correct sampler.
    tolerance : float
        How far float32 arithmetic may move a truncation boundary (relative on logits, absolute on
        probabilities) before a token just outside the exact kept set counts as a violation. Rows
        whose kept set changes within it are left out of the frequencies rule.
    seed : int
        Seed of hypothesis' search (the check is reproducible for a deterministic sampler).
    raise_on_failure : bool
        Raise :class:`ConformanceError` on the first broken rule (default), or return the report.

    Returns
    -------
    ConformanceReport
        One entry per rule: passed, skipped (feature not supported) or failed.

    Raises
    ------
    ConformanceError
        Naming the rule, the row, what the reference expected and the minimal failing input.

    Examples
    --------
    >>> import torch
    >>> def my_sampler(logits, params):  # greedy only
    ...     return logits.argmax(dim=-1)
    >>> check_sampler(my_sampler, to_tensor=torch.from_numpy, supports=("temperature",),
    ...               rules=("greedy",))  # doctest: +ELLIPSIS
    ConformanceReport(...)
    """
    features = tuple(f for f in FEATURES if f in supports)
    unknown = set(supports) - set(FEATURES)
    if unknown or "temperature" not in features:
        raise ValueError(f"supports must include 'temperature' and only names of {FEATURES}; got {tuple(supports)}")
    bad_rules = set(rules) - set(RULES)
    if bad_rules:
        raise ValueError(f"unknown rules {sorted(bad_rules)}; choose from {RULES}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    kit = _Kit(fn, to_tensor or (lambda a: a), to_numpy or _to_numpy, features, seeded, tolerance)
    penalties = tuple(f for f in PENALTIES if f in features)
    sampling = tuple(f for f in features if f not in PENALTIES)
    history = tuple(
        h for h, on in (("all_input_ids", "repetition_penalty" in features),
                        ("output_ids", bool({"frequency_penalty", "presence_penalty"} & set(features)))) if on
    )
    seed_field = ("seed",) if seeded else ()
    report = ConformanceReport()

    def run_rule(rule, strategy, body, examples):
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=False,
            report_multiple_bugs=False,
            verbosity=Verbosity.quiet,
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.seed(seed)
        @given(strategy)
        def test(case):
            body(case)

        try:
            test()
        except _Broken as exc:
            broken = exc
        except hypothesis.errors.Flaky as exc:
            # A random sampler can fail an example and pass it on replay; the first failure stands.
            inner = [e for e in getattr(exc, "exceptions", ()) if isinstance(e, _Broken)]
            if not inner:
                raise
            broken = inner[0]
        else:
            return None
        return _alone(broken, body) if rule != "batch invariance" else broken

    def cases(**kw):
        kw.setdefault("max_rows", max_rows)
        kw.setdefault("max_vocab", max_vocab)
        return sst.cases(dtypes=("float32",), realistic=False, wide_seeds=False, **kw)

    # --- the rules -------------------------------------------------------------------------

    def greedy_body(case):
        _expect_greedy(case, kit.call(case), _exact(case, tolerance))

    def kept_body(case):
        ex = _exact(case, tolerance)
        try:
            ids = kit.call(_copies(case, copies))
        except _Broken as exc:
            raise _Broken(exc.detail, case) from None  # report the distinct rows, not the copies
        sampled = ids.reshape(case.rows, copies)
        for i in np.flatnonzero(~ex.greedy):
            _expect_kept(case, i, sampled[i], ex, f" (repeated {copies} times in the batch)")

    rows_per_freq = 2
    level = alpha / (rows_per_freq * frequency_examples)
    freq_log: List[float] = []

    def freq_body(case):
        ex = _exact(case, tolerance)
        try:
            ids = kit.call(_copies(case, draws)).reshape(case.rows, draws)
        except _Broken as exc:
            raise _Broken(exc.detail, case) from None
        for i in range(case.rows):
            if not np.array_equal(ex.keep[i], ex.loose[i]):
                continue  # the kept set is within float rounding of changing: no exact distribution
            counts = np.bincount(ids[i], minlength=case.vocab)
            outside = counts[~ex.keep[i]].sum()
            if outside:
                bad = np.flatnonzero(counts * ~ex.keep[i])
                raise _Broken(
                    f"row {i}: {outside} of {draws} draws fell outside the kept set (ids {_fmt(bad)})", case, i
                )
            kept = np.flatnonzero(ex.keep[i])
            chi2, _, pvalue = chi_square(counts[kept], ex.probs[i, kept])
            freq_log.append(pvalue)
            if pvalue < level:
                raise _Broken(
                    f"row {i}: chi-square = {chi2:.1f} over {draws} draws, p = {pvalue:.2e} < {level:.1e} "
                    f"(alpha {alpha} over {rows_per_freq * frequency_examples} tests); kept ids {_fmt(kept)}, "
                    f"expected frequencies {_fmt(ex.probs[i, kept])}, observed {_fmt(counts[kept] / draws)}",
                    case,
                    i,
                )

    def invariance_body(case):
        ex = _exact(case, tolerance)
        full = kit.call(case)
        perm = np.random.default_rng(case.rows * 7919 + case.vocab).permutation(case.rows)[::-1].copy()
        arrangements = [("the batch reversed and shuffled", perm)]
        arrangements += [(f"row {i} alone", np.array([i])) for i in range(case.rows)]
        arrangements += [("rows 1.. (first row sliced off)", np.arange(1, case.rows))] if case.rows > 1 else []
        _expect_greedy(case, full, ex)
        for i in np.flatnonzero(~ex.greedy):
            _expect_kept(case, i, full[i : i + 1], ex)
        for what, index in arrangements:
            ids = kit.call(case.take(index))
            for j, i in enumerate(index):
                if ex.greedy[i] and ids[j] != full[i]:
                    raise _Broken(f"row {i}: greedy id {full[i]} in the full batch but {ids[j]} with {what}", case)
                if not ex.greedy[i]:
                    _expect_kept(case, i, ids[j : j + 1], ex, f" (with {what})")
                if seeded and not ex.greedy[i] and ids[j] != full[i]:
                    raise _Broken(
                        f"row {i} (seed {case.param['seed'][i]}): id {full[i]} in the full batch but {ids[j]} "
                        f"with {what}",
                        case,
                    )

    plan = {
        "greedy": (cases(fields=("temperature",), greedy="all", history=()), greedy_body, max_examples, None),
        "penalties": (
            cases(fields=("temperature",) + penalties, required=("temperature",) + penalties, greedy="all",
                  history=history, required_history=history),
            greedy_body,
            max_examples,
            None if penalties else "the sampler supports no penalty",
        ),
        "kept set": (
            cases(fields=features + seed_field, required=features, greedy="none", seeded="all" if seeded else "none",
                  history=history),
            kept_body,
            max_examples,
            None if set(sampling) - {"temperature"} or penalties else "temperature only: nothing is truncated",
        ),
        "frequencies": (
            cases(fields=features + seed_field, required=features, greedy="none", seeded="all" if seeded else "none",
                  history=history, max_rows=rows_per_freq, max_vocab=min(max_vocab, 16)),
            freq_body,
            frequency_examples,
            None,
        ),
        "batch invariance": (
            cases(fields=features + seed_field, required=features, seeded="all" if seeded else "none",
                  history=history),
            invariance_body,
            max(1, max_examples // 2),
            None,
        ),
    }
    for rule in RULES:
        if rule not in rules:
            continue
        strategy, body, examples, skip = plan[rule]
        if skip:
            report.results.append(RuleResult(rule, "skipped", skip))
            continue
        broken = run_rule(rule, strategy, body, examples)
        if broken is None:
            detail = f"{examples} examples"
            if rule == "frequencies" and freq_log:
                detail += f", {len(freq_log)} chi-square tests, smallest p = {min(freq_log):.2e}"
            report.results.append(RuleResult(rule, "passed", detail))
            continue
        report.results.append(RuleResult(rule, "failed", broken.detail))
        message = _message(rule, broken, report)
        if raise_on_failure:
            raise ConformanceError(message, rule, broken.case, report)
        report.failure = message
        return report
    return report


def _alone(broken: _Broken, body, tries: int = 3) -> _Broken:
    """The failing row on its own, when it still fails alone (a smaller example than shrinking's).

    Shrinking replays a random sampler, which can pass a replay by chance and so keep rows that do
    not matter; a rule about one row is retried on that row alone a few times.
    """
    if broken.row is None or broken.case.rows == 1:
        return broken
    single = broken.case.take(np.array([broken.row]))
    for _ in range(tries):
        try:
            body(single)
        except _Broken as exc:
            return exc
    return broken


def _message(rule: str, broken: _Broken, report: ConformanceReport) -> str:
    case = broken.case
    passed = [r.rule for r in report.results if r.status == "passed"]
    lines = [
        f'check_sampler: rule "{rule}" is broken.',
        textwrap.fill(_DESCRIPTIONS[rule], width=100, initial_indent="  ", subsequent_indent="  "),
        textwrap.fill(broken.detail, width=100, initial_indent="  ", subsequent_indent="    "),
        f"  Minimal failing input (shrunk by hypothesis): {case.rows} row(s) x {case.vocab} tokens",
    ]
    with np.printoptions(precision=9, threshold=64, edgeitems=8, linewidth=100):
        lines.append(f"    logits = {np.array2string(case.logits32, separator=', ', prefix='    logits = ')}")
        arrays = case.arrays()
        for name in FEATURES:
            if name in case.param or (name == "temperature" and "do_sample" in case.param):
                shown = arrays[name]
                if name == "temperature":
                    shown = np.where(arrays["greedy"], 0, shown)
                lines.append(f"    {name} = {np.array2string(np.asarray(shown), separator=', ')}")
        if "seed" in case.param:
            lines.append(f"    seed = {np.array2string(case.param['seed'], separator=', ')}")
        for name, ids in case.data.items():
            prefix = f"    {name} = "
            lines.append(prefix + np.array2string(np.asarray(ids), separator=", ", prefix=prefix))
    lines.append(f"  Rules passed before it: {', '.join(passed) if passed else 'none'}.")
    return "\n".join(lines)
