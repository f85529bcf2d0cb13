"""sampling.testing itself: the README example, each rule catching its kind of mistake, the strategies."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from sampling import InvalidLogitsError, Sampler, SamplingData, SamplingParam
from sampling.kernels import reference
from sampling.testing import ConformanceError, check_sampler, chi_square
from sampling.testing import strategies as sst
from sampling.testing.conformance import FEATURES, foreign_inputs

torch = pytest.importorskip("torch")

# --- the README example ---------------------------------------------------------------------------------


def my_sampler(logits, params):
    """temperature -> top-p -> top-k -> Gumbel-max: top-p sees the full distribution (the mistake)."""
    t = params["temperature"]
    z = logits / torch.where(t == 0, 1.0, t)[:, None]
    sorted_z, order = z.sort(-1, descending=True)
    sorted_p = sorted_z.softmax(-1)
    keep = (sorted_p.cumsum(-1) - sorted_p) < params["top_p"][:, None]
    z = z.masked_fill(~keep.scatter(-1, order, keep), -torch.inf)
    kth = z.sort(-1, descending=True).values.gather(-1, params["top_k"][:, None] - 1)
    z = z.masked_fill(z < kth, -torch.inf)
    noise = -torch.log(-torch.log(torch.rand_like(z)))
    return torch.where(t == 0, logits.argmax(-1), (z + noise).argmax(-1))


def my_sampler_fixed(logits, params):
    """temperature -> top-k -> top-p on the top-k survivors (ties share their mass) -> Gumbel-max."""
    t = params["temperature"]
    z = logits / torch.where(t == 0, 1.0, t)[:, None]
    kth = z.sort(-1, descending=True).values.gather(-1, params["top_k"][:, None] - 1)
    z = z.masked_fill(z < kth, -torch.inf)
    sorted_z, order = z.sort(-1, descending=True)
    sorted_p = sorted_z.softmax(-1)
    above = (sorted_p.cumsum(-1) - sorted_p).gather(-1, torch.searchsorted(-sorted_z, -sorted_z))
    keep = above < params["top_p"][:, None]
    z = z.masked_fill(~keep.scatter(-1, order, keep), -torch.inf)
    noise = -torch.log(-torch.log(torch.rand_like(z)))
    return torch.where(t == 0, logits.argmax(-1), (z + noise).argmax(-1))


SUPPORTS = ("temperature", "top_k", "top_p")


def test_readme_example_catches_top_p_before_top_k():
    torch.manual_seed(0)
    with pytest.raises(ConformanceError) as info:
        check_sampler(my_sampler, to_tensor=torch.from_numpy, supports=SUPPORTS)
    err = info.value
    assert err.rule == "kept set"
    message = str(err)
    assert 'rule "kept set" is broken' in message
    assert "outside the kept set" in message and "Minimal failing input" in message
    assert "top_k = " in message and "top_p = " in message
    assert "Rules passed before it: greedy." in message
    # Shrunk: a single row, a handful of tokens.
    assert err.case.rows == 1 and err.case.vocab <= 8, err.case
    # The shrunk case really separates the two orders: an extra token survives top-p on the full
    # distribution but not top-p on the top-k survivors.
    a = err.case.arrays()
    zt = reference.scale(err.case.logits32, a)
    keep = reference.truncate(zt, a)[0]
    k = int(a["top_k"][0]) if 0 < a["top_k"][0] < err.case.vocab else err.case.vocab
    full_p = reference.truncate(zt, {**a, "top_k": np.zeros(1, np.int64)})[0]
    top_k = reference.truncate(zt, {**a, "top_p": np.ones(1, np.float32)})[0]
    assert k < err.case.vocab and (full_p & top_k & ~keep).any()


def test_readme_example_fixed_version_passes():
    torch.manual_seed(0)
    report = check_sampler(my_sampler_fixed, to_tensor=torch.from_numpy, supports=SUPPORTS)
    assert report.ok
    status = {r.rule: r.status for r in report.results}
    assert status == {"greedy": "passed", "penalties": "skipped", "kept set": "passed",
                      "frequencies": "passed", "batch invariance": "passed"}
    assert "frequencies" in str(report)


# --- our own backends pass the kit ------------------------------------------------------------------------


def _our_sampler(backend_name):
    sampler = Sampler(backend=backend_name, seed=0)

    def fn(logits, params):
        p = {k: v for k, v in params.items() if k in FEATURES or k == "seed"}
        data = SamplingData.from_numpy(all_input_ids=params.get("all_input_ids"), output_ids=params.get("output_ids"))
        x = torch.from_numpy(logits) if backend_name == "torch" else logits
        tokens = sampler.sample(x, data, SamplingParam.from_numpy(**p))
        return tokens

    return fn


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_our_backends_pass_every_rule(name):
    report = check_sampler(_our_sampler(name), seeded=True, max_examples=25, frequency_examples=4, draws=2000)
    assert report.ok and all(r.status == "passed" for r in report.results), str(report)


# --- each rule catches its kind of mistake ----------------------------------------------------------------


def _fails(fn, rule, **kw):
    kw.setdefault("max_examples", 60)
    report = check_sampler(fn, to_tensor=torch.from_numpy, raise_on_failure=False, **kw)
    failed = [r for r in report.results if r.status == "failed"]
    assert failed and failed[0].rule == rule, str(report)
    assert f'rule "{rule}" is broken' in report.failure
    return report


def test_greedy_rule_catches_highest_id_on_ties():
    def last_argmax(logits, params):
        return logits.shape[1] - 1 - logits.flip(-1).argmax(-1)

    _fails(last_argmax, "greedy", supports=("temperature",), rules=("greedy",))


def test_penalties_rule_catches_the_sign_mistake():
    def divides_every_seen_logit(logits, params):
        ids = params["all_input_ids"]
        valid = (ids >= 0) & (ids < logits.shape[1])
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, torch.where(valid, ids, 0), valid)
        # The classic mistake: z / r for negative z too, which raises a seen negative logit.
        z = torch.where(seen, logits / params["repetition_penalty"][:, None], logits)
        return z.argmax(-1)

    report = _fails(divides_every_seen_logit, "penalties", supports=("temperature", "repetition_penalty"),
                    rules=("greedy", "penalties"))
    assert "all_input_ids = " in report.failure and "repetition_penalty = " in report.failure


def test_frequencies_rule_catches_a_wrong_distribution():
    def uniform_over_kept(logits, params):
        kth = logits.sort(-1, descending=True).values.gather(-1, params["top_k"][:, None] - 1)
        z = torch.where(logits < kth, -torch.inf, 0.0)  # right kept set, wrong weights
        noise = -torch.log(-torch.log(torch.rand_like(z)))
        return torch.where(params["temperature"] == 0, logits.argmax(-1), (z + noise).argmax(-1))

    torch.manual_seed(1)
    report = _fails(uniform_over_kept, "frequencies", supports=("temperature", "top_k"))
    assert "chi-square" in report.failure


def test_batch_invariance_rule_catches_seeds_tied_to_batch_slots():
    def slot_seeded(logits, params):
        out = []
        for i in range(logits.shape[0]):
            g = torch.Generator().manual_seed(int(params["seed"][i]) + i)  # the mistake: "+ i"
            noise = -torch.log(-torch.log(torch.rand(logits.shape[1], generator=g)))
            t = params["temperature"][i]
            out.append(logits[i].argmax() if t == 0 else (logits[i] / t + noise).argmax())
        return torch.stack(out)

    _fails(slot_seeded, "batch invariance", supports=("temperature",), seeded=True,
           rules=("greedy", "batch invariance"))


def test_crashes_and_bad_outputs_are_reported():
    def crashes_on_small_vocab(logits, params):
        if logits.shape[1] < 3:
            raise RuntimeError("vocabulary too small")
        return logits.argmax(-1)

    report = _fails(crashes_on_small_vocab, "greedy", supports=("temperature",), rules=("greedy",))
    assert "RuntimeError: vocabulary too small" in report.failure
    report = _fails(lambda logits, params: logits.argmax(-1) + logits.shape[1], "greedy",
                    supports=("temperature",), rules=("greedy",))
    assert "outside [0, " in report.failure


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        check_sampler(my_sampler, supports=("top_k",))
    with pytest.raises(ValueError, match="unknown rules"):
        check_sampler(my_sampler, rules=("speed",))


def test_foreign_inputs_conventions():
    case = sst.Case(
        np.zeros((3, 5), np.float32),
        param={"top_k": np.array([-1, 7, 2]), "temperature": np.array([0.0, 0.5, 1.0]), "seed": np.array([1, 2, 3])},
        data={"all_input_ids": np.array([[1, -1], [5, 2], [0, 0]])},
    )
    p = foreign_inputs(case, FEATURES, seeded=True)
    assert p["top_k"].tolist() == [5, 5, 2] and p["top_k"].dtype == np.int64
    assert p["temperature"].tolist() == [0.0, 0.5, 1.0]
    assert p["top_p"].tolist() == [1, 1, 1] and p["min_p"].tolist() == [0, 0, 0]
    assert p["seed"].tolist() == [1, 2, 3]
    assert p["all_input_ids"].tolist() == [[1, -1], [5, 2], [0, 0]]
    assert p["output_ids"].shape == (3, 0)


def test_chi_square_matches_scipy():
    from scipy import stats

    counts, probs = np.array([30, 50, 20]), np.array([0.3, 0.4, 0.3])
    stat, dof, p = chi_square(counts, probs)
    ref = stats.chisquare(counts, probs * 100)
    assert dof == 2 and np.isclose(stat, ref.statistic) and np.isclose(p, ref.pvalue)
    # Thin bins are pooled: expected [50, 45, 3, 2] -> [50, 45, 5].
    stat, dof, _ = chi_square(np.array([50, 40, 6, 4]), np.array([0.5, 0.45, 0.03, 0.02]))
    assert dof == 2 and np.isclose(stat, 0 + 25 / 45 + 25 / 5)


# --- the strategies ---------------------------------------------------------------------------------------


@settings(max_examples=150)
@given(case=sst.cases(max_rows=5, max_vocab=151936))
def test_cases_are_valid_api_arguments(case):
    param = SamplingParam.from_numpy(**case.param) if case.param else None
    data = SamplingData.from_numpy(**case.data) if case.data else None
    assert case.logits.ndim == 2 and case.dtype in sst.DTYPES
    bf16 = "bfloat16" if sst.bfloat16_dtype() is not None else "float32"  # see sst.as_dtype
    assert case.logits.dtype.name == {"float32": "float32", "float16": "float16", "bfloat16": bf16}[case.dtype]
    if case.dtype == "bfloat16":
        x = case.logits32
        np.testing.assert_array_equal(sst.round_to_bfloat16(x), x)
    if param is not None:
        assert param.rows == case.rows
    if data is not None:
        assert data.rows == case.rows
    lp, tokens, _, _ = case.reference(num_logprobs=1)  # valid: no InvalidLogitsError
    assert ((tokens >= 0) & (tokens < case.vocab)).all() and np.isfinite(lp).all()


EDGES = {
    "k = 1": lambda a, c: "top_k" in c.param and (c.param["top_k"] == 1).any(),
    "k = V": lambda a, c: "top_k" in c.param and (c.param["top_k"] == c.vocab).any(),
    "k = -1": lambda a, c: "top_k" in c.param and (c.param["top_k"] == -1).any(),
    "k = 0": lambda a, c: "top_k" in c.param and (c.param["top_k"] == 0).any(),
    "p = 1": lambda a, c: "top_p" in c.param and (c.param["top_p"] == 1).any(),
    "tiny p": lambda a, c: "top_p" in c.param and (c.param["top_p"] < 1e-5).any(),
    "T = 0": lambda a, c: "temperature" in c.param and (c.param["temperature"] == 0).any(),
    "min_p = 1": lambda a, c: "min_p" in c.param and (c.param["min_p"] == 1).any(),
    "repetition 1": lambda a, c: "repetition_penalty" in c.param and (c.param["repetition_penalty"] == 1).any(),
    "presence 0": lambda a, c: "presence_penalty" in c.param and (c.param["presence_penalty"] == 0).any(),
    "negative frequency": lambda a, c: (a["frequency_penalty"] < 0).any(),
    "seed -1": lambda a, c: "seed" in c.param and (c.param["seed"].astype(np.int64) == -1).any(),
    "seed >= 2**63": lambda a, c: "seed" in c.param and c.param["seed"].dtype == np.uint64
    and (c.param["seed"] >= 2**63).any(),
    "do_sample False": lambda a, c: "do_sample" in c.param and (~c.param["do_sample"]).any(),
    "-inf logits": lambda a, c: np.isneginf(c.logits32).any(),
    "exact ties": lambda a, c: any(len(np.unique(r)) < len(r) for r in c.logits32),
    "-1 padding": lambda a, c: any((v == -1).any() for v in c.data.values()),
    "vocab_size padding": lambda a, c: any((v == c.vocab).any() for v in c.data.values()),
    "repeated ids": lambda a, c: any(
        len(set(r[(r >= 0) & (r < c.vocab)])) < ((r >= 0) & (r < c.vocab)).sum() for v in c.data.values() for r in v
    ),
    "bfloat16": lambda a, c: c.dtype == "bfloat16",
    "float16": lambda a, c: c.dtype == "float16",
}


def test_strategies_reach_every_edge_value():
    """Within the CI profile's fixed examples, :func:`cases` draws every edge value of the issue."""
    missing = set(EDGES)

    @settings(max_examples=600)
    @given(case=sst.cases(max_rows=3, max_vocab=40, realistic=False))
    def collect(case):
        a = case.arrays()
        for name in list(missing):
            if EDGES[name](a, case):
                missing.discard(name)

    collect()
    assert not missing, f"edge values never drawn: {sorted(missing)}"


def test_strategies_reach_a_realistic_vocabulary():
    find(sst.vocab_sizes(151936), lambda v: v == 151936, settings=settings(max_examples=2000, database=None))


@settings(max_examples=60)
@given(drawn=sst.invalid_cases(max_rows=4, max_vocab=32))
def test_invalid_cases_are_exactly_the_flagged_rows(drawn):
    case, bad = drawn
    a = case.arrays()
    z = reference.penalize(case.logits32, a, case.data.get("all_input_ids"), case.data.get("output_ids"))
    zt = reference.scale(z, a)
    assert np.flatnonzero(reference.invalid_rows(zt)).tolist() == bad
    with pytest.raises(InvalidLogitsError):
        case.reference()


@settings(max_examples=200)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=50))
def test_bfloat16_rounding_matches_torch(values):
    x = np.array(values, np.float32)
    expected = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(sst.round_to_bfloat16(x), expected)


@settings(max_examples=40)
@given(case=sst.cases(max_rows=5, max_vocab=30, seeded="all"), data=st.data())
def test_take_selects_rows(case, data):
    index = np.array(data.draw(st.permutations(range(case.rows))))
    part = case.take(index)
    np.testing.assert_array_equal(part.logits32, case.logits32[index])
    np.testing.assert_array_equal(part.reference()[1], case.reference()[1][index])
