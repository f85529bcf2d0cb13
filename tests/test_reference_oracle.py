"""The numpy reference against an independent implementation: Hugging Face's logits processors.

transformers' RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper and MinPLogitsWarper implement the same stages one scalar parameter at a time,
in float32 torch. Where the definitions agree they must give the same numbers; where they differ
the difference is documented and pinned by a test below:

1. Top-p ties. HF sorts, takes a cumulative sum and cuts, so tokens tied in value at the boundary
   are split by sort order (some kept, some dropped). We keep or drop a tie group as a whole: a
   token is kept iff the mass strictly above it is < p. Agreement is checked away from ties.
2. Top-p precision. HF sums float32 probabilities in ascending order and compares with 1 - p; we
   sum float64 in descending order and compare with p. Same rule in exact arithmetic; agreement is
   checked where no token's mass is within 1e-5 of the boundary.
3. Zero-probability tokens. HF's top-p (even p = 1) drops tokens whose float32 probability is 0;
   ours with p = 1 is off. Such tokens can never be drawn, so only finite-probability tokens are
   compared.
4. Off values and greedy. HF rejects top_k <= 0 and temperature 0 (greedy is a separate mode);
   we read k = 0 / -1 as "off" and T = 0 as greedy.
5. Padding. HF's repetition penalty drops ids >= vocab_size but indexes with negative ids; we
   ignore any id outside [0, V). Negative padding is stripped before calling HF.
6. Frequency and presence penalties have no HF processor; a plain Python loop is the oracle.
7. Min-p. HF compares float32 probabilities with min_p * p_max; we compare exp(z - z_max) with
   min_p in float64. Agreement is checked away from the boundary (relative margin 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sampling.kernels import reference
from sampling.params import normalised
from sampling.testing import strategies as sst

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")
RepetitionPenalty = logits_process.RepetitionPenaltyLogitsProcessor
Temperature = logits_process.TemperatureLogitsWarper
TopK = logits_process.TopKLogitsWarper
TopP = logits_process.TopPLogitsWarper
MinP = logits_process.MinPLogitsWarper

#: Row kinds without exact ties in value (ties are difference 1 above, tested on their own).
UNTIED = ("normal", "peaked", "masked", "large")
MARGIN = 1e-5


def params(**fields) -> dict:
    """Normalised one-row parameter arrays with ``fields`` set (the reference's input)."""
    given = {k: np.array([v], np.int64 if k == "top_k" else np.float32) for k, v in fields.items()}
    return normalised(1, given)


@st.composite
def rows(draw, kinds=UNTIED, max_vocab=48):
    vocab = draw(st.integers(2, max_vocab))
    return draw(sst.logits_rows(vocab, kinds))


def f32(name: str, vocab: int = 8, **kw):
    """A float32-exact value of one parameter (HF takes Python floats)."""
    return sst.field_values(name, vocab, greedy="none", **kw).map(lambda v: float(np.float32(v)))


def hf(processor, scores: np.ndarray, ids=None) -> np.ndarray:
    ids = torch.zeros((1, 0), dtype=torch.long) if ids is None else torch.from_numpy(np.asarray(ids, np.int64))[None]
    return processor(ids, torch.from_numpy(scores[None].copy()))[0].numpy()


# --- penalties and temperature: bitwise ------------------------------------------------------------


@settings(max_examples=60)
@given(row=rows(kinds=sst.ROW_KINDS), r=f32("repetition_penalty"), data=st.data())
def test_repetition_penalty_matches_hf(row, r, data):
    vocab = row.size
    ids = np.array(data.draw(st.lists(st.integers(-1, vocab + 2), max_size=12)), np.int64)
    ours = reference.penalize(row[None], params(repetition_penalty=r), rep_ids=ids[None])[0]
    # HF drops ids >= V itself but cannot take negative ids (difference 5).
    theirs = hf(RepetitionPenalty(r), row, ids[ids >= 0])
    np.testing.assert_array_equal(ours, theirs)


@settings(max_examples=40)
@given(row=rows(kinds=sst.ROW_KINDS), t=f32("temperature"))
def test_temperature_matches_hf(row, t):
    ours = reference.scale(row[None], params(temperature=t))[0]
    np.testing.assert_array_equal(ours, hf(Temperature(t), row))


@settings(max_examples=40)
@given(row=rows(kinds=sst.ROW_KINDS), f=f32("frequency_penalty"), p=f32("presence_penalty"), data=st.data())
def test_frequency_presence_match_a_plain_loop(row, f, p, data):
    """No HF processor exists (difference 6): each step written out token by token."""
    vocab = row.size
    ids = data.draw(st.lists(st.integers(-1, vocab + 2), max_size=12))
    a = params(frequency_penalty=f, presence_penalty=p)
    ours = reference.penalize(row[None], a, out_ids=np.array([ids], np.int64))[0]
    expected = row.copy()
    for t in range(vocab):
        count = sum(1 for i in ids if i == t)
        if count:
            expected[t] = np.float32(expected[t] - np.float32(f) * np.float32(count))
            expected[t] = np.float32(expected[t] - np.float32(p))
    np.testing.assert_array_equal(ours, expected)


# --- truncation: the same kept sets where the definitions agree --------------------------------------


def _kept(scores: np.ndarray) -> np.ndarray:
    return np.isfinite(scores)


@settings(max_examples=60)
@given(row=rows(kinds=sst.ROW_KINDS), data=st.data())
def test_top_k_matches_hf(row, data):
    """Ties with the k-th value are kept by both."""
    k = data.draw(st.integers(1, row.size + 2))
    ours = reference.truncate(row[None], params(top_k=k))[0]
    finite = np.isfinite(row)
    np.testing.assert_array_equal(ours & finite, _kept(hf(TopK(k), row)) & finite)


def _top_p_agrees(z: np.ndarray, p: float) -> bool:
    """No finite token within MARGIN of the top-p boundary, and no tie group across it."""
    z64 = z.astype(np.float64)
    w = np.exp(z64 - z64.max())
    total = w.sum()
    for t in np.flatnonzero(np.isfinite(z)):
        above = w[z64 > z64[t]].sum() / total
        group = w[z64 == z64[t]].sum() / total
        # HF keeps the group's members in sort order; the last one sees the most mass above.
        last = above + group - w[t] / total
        if abs(above - p) < MARGIN or abs(last - p) < MARGIN or (above < p <= last):
            return False
    return True


@settings(max_examples=80)
@given(row=rows(), k=st.integers(1, 12), p=f32("top_p"))
def test_top_k_then_top_p_matches_hf(row, k, p):
    """HF's TopK then TopP renormalises over the top-k survivors, as we do."""
    k = min(k, row.size)
    after_k = hf(TopK(k), row)
    assume(_top_p_agrees(after_k, p))
    ours = reference.truncate(row[None], params(top_k=k, top_p=p))[0]
    theirs = _kept(hf(TopP(p), after_k))
    positive = _positive(after_k)
    np.testing.assert_array_equal(ours[positive], theirs[positive])


def _positive(scores: np.ndarray) -> np.ndarray:
    """Tokens of nonzero float32 probability (difference 3: only those are compared)."""
    t = torch.from_numpy(scores.copy())
    return (torch.softmax(t, -1) > 0).numpy()


@settings(max_examples=60)
@given(row=rows(), m=st.one_of(st.just(0.0), f32("min_p").filter(lambda v: v >= 1e-4)))
def test_min_p_matches_hf(row, m):
    z64 = row.astype(np.float64)
    ratio = np.exp(z64 - z64.max())
    # Away from the boundary, and not where float32 probabilities underflow (difference 7).
    near = np.abs(ratio - m) <= 1e-4 * max(m, 1e-30)
    assume(not near[np.isfinite(row)].any())
    ours = reference.truncate(row[None], params(min_p=m))[0]
    theirs = _kept(hf(MinP(m), row))
    positive = _positive(row)
    np.testing.assert_array_equal(ours[positive], theirs[positive])


@settings(max_examples=80)
@given(
    row=rows(),
    r=f32("repetition_penalty"),
    t=f32("temperature"),
    k=st.integers(1, 12),
    p=f32("top_p"),
    m=st.one_of(st.just(0.0), f32("min_p").filter(lambda v: v >= 1e-4)),
    data=st.data(),
)
def test_whole_chain_matches_hf(row, r, t, k, p, m, data):
    """Repetition -> temperature -> top-k -> top-p -> min-p: same logits, kept set, distribution."""
    vocab = row.size
    k = min(k, vocab)
    ids = np.array(data.draw(st.lists(st.integers(0, vocab - 1), max_size=8)), np.int64)
    hf_z = hf(RepetitionPenalty(r), row, ids)
    hf_z = hf(Temperature(t), hf_z)
    hf_k = hf(TopK(k), hf_z)
    assume(_top_p_agrees(hf_k, p))
    hf_p = hf(TopP(p), hf_k)
    z64 = np.where(np.isfinite(hf_p), hf_p, -np.inf).astype(np.float64)
    ratio = np.exp(z64 - z64.max())
    assume(not (np.abs(ratio - m) <= 1e-4 * max(m, 1e-30))[np.isfinite(hf_p)].any())
    hf_m = hf(MinP(m), hf_p)

    a = params(repetition_penalty=r, temperature=t, top_k=k, top_p=p, min_p=m)
    zt = reference.scale(reference.penalize(row[None], a, rep_ids=ids[None]), a)
    np.testing.assert_array_equal(zt[0], hf_z)
    keep = reference.truncate(zt, a)[0]
    positive = _positive(hf_k)
    np.testing.assert_array_equal(keep[positive], _kept(hf_m)[positive])
    ours = np.exp(reference.log_softmax(zt, keep[None])[0])
    theirs = torch.softmax(torch.from_numpy(hf_m.astype(np.float64)), -1).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-12)


# --- the documented differences, pinned ------------------------------------------------------------------


def test_difference_top_p_tie_at_the_boundary():
    """Difference 1: logits [1, 1, 0], p = 0.4. The mass above either tied token is 0 < 0.4, so we
    keep both; HF's sorted cumulative sum keeps exactly one of them."""
    row = np.array([1.0, 1.0, 0.0], np.float32)
    ours = reference.truncate(row[None], params(top_p=0.4))[0]
    theirs = _kept(hf(TopP(0.4), row))
    assert ours.tolist() == [True, True, False]
    assert theirs[:2].sum() == 1 and not theirs[2]


def test_difference_zero_probability_tokens_under_top_p_one():
    """Difference 3: p = 1 is off for us; HF still drops -inf (zero-probability) tokens."""
    row = np.array([0.0, -np.inf, 1.0], np.float32)
    assert reference.truncate(row[None], params(top_p=1.0))[0].all()
    assert _kept(hf(TopP(1.0), row)).tolist() == [True, False, True]


def test_difference_off_and_greedy_values():
    """Difference 4: HF rejects top_k = 0 and temperature = 0; for us they mean off and greedy."""
    with pytest.raises(ValueError):
        TopK(0)
    with pytest.raises(ValueError):
        Temperature(0.0)
    row = np.array([[0.0, 2.0, 1.0]], np.float32)
    assert reference.truncate(row, params(top_k=0))[0].all()
    a = normalised(1, {"greedy": np.array([True])})
    assert reference.sample(row, a)[1].tolist() == [1]
