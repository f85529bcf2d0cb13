"""The request cache: cached decode steps equal the stateless path, under random interleavings."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sampling import Sampler, SamplingData, SamplingParam, SamplingInputError, backends

V = 40
PARAM_CHOICES = dict(
    temperature=(0.0, 0.8, 1.3),
    top_k=(0, 1, 5),
    top_p=(1.0, 0.7),
    repetition_penalty=(1.0, 1.4),
    frequency_penalty=(0.0, 0.6, -0.3),
    presence_penalty=(0.0, 0.25),
)


def converter(name):
    if name == "numpy":
        return lambda a: a, np.asarray
    if name == "mindspore":
        import mindspore

        return mindspore.Tensor, lambda t: t.asnumpy()
    import torch

    dev = "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"
    return (lambda a: torch.from_numpy(a).to(dev)), (lambda t: t.cpu().numpy())


class CacheMachine(RuleBasedStateMachine):
    """Drives one cached sampler and one stateless twin with the same logits and histories."""

    backend = "numpy"
    max_cached = None

    @initialize(seed=st.integers(0, 2**32 - 1))
    def setup(self, seed):
        self.rng = np.random.default_rng(seed)
        self.to_dev, self.to_host = converter(self.backend)
        self.cached = Sampler(self.backend, seed=11, max_cached_requests=self.max_cached)
        self.stateless = Sampler(self.backend, seed=11)
        self.prompt, self.out, self.params = {}, {}, {}
        self.batch: list = []
        self.next_id = 0

    def _new_params(self):
        return {k: self.rng.choice(v) for k, v in PARAM_CHOICES.items()} | {"seed": int(self.rng.integers(0, 2**63 - 1))}

    def _arrays(self, batch):
        rows = len(batch)
        width = max(len(self.prompt[r]) + len(self.out[r]) for r in batch) + 2
        owidth = max(max(len(self.out[r]) for r in batch), 1) + 1
        all_ids = np.full((rows, width), -1, np.int64)
        out_ids = np.full((rows, owidth), V, np.int64)  # the other padding convention
        for i, r in enumerate(batch):
            h = self.prompt[r] + self.out[r]
            all_ids[i, : len(h)] = h
            out_ids[i, : len(self.out[r])] = self.out[r]
        params = {k: np.array([self.params[r][k] for r in batch]) for k in PARAM_CHOICES}
        params["seed"] = np.array([self.params[r]["seed"] for r in batch], np.int64)
        return all_ids, out_ids, SamplingParam.from_numpy(**params)

    def _step(self, batch, data_kwargs, pass_param=True):
        all_ids, out_ids, param = self._arrays(batch)
        logits = (self.rng.standard_normal((len(batch), V)) * 2).astype(np.float32)
        want = self.stateless(self.to_dev(logits), SamplingData.from_numpy(all_input_ids=all_ids, output_ids=out_ids), param)
        data = SamplingData.from_numpy(request_ids=np.array(batch), **{k: (all_ids if v == "all" else out_ids) for k, v in data_kwargs.items() if k != "is_prefill"}, is_prefill=data_kwargs.get("is_prefill", False))
        got = self.cached(self.to_dev(logits), data, param if pass_param else None)
        lp, tok = self.to_host(got[0]), self.to_host(got[1])
        np.testing.assert_array_equal(tok, self.to_host(want[1]))
        np.testing.assert_allclose(lp, self.to_host(want[0]), rtol=1e-6)
        for i, r in enumerate(batch):
            self.out[r].append(int(tok[i]))
        self.batch = list(batch)

    @rule(n=st.integers(1, 3))
    def prefill(self, n):
        ids = []
        for _ in range(n):
            rid = self.next_id
            self.next_id += 1
            self.prompt[rid] = [int(t) for t in self.rng.integers(0, V, size=int(self.rng.integers(1, 12)))]
            self.out[rid] = []
            self.params[rid] = self._new_params()
            ids.append(rid)
        self._step(ids, {"all_input_ids": "all", "output_ids": "out", "is_prefill": True})

    @precondition(lambda self: self.batch)
    @rule()
    def decode_from_previous_tokens(self):
        self._step(self.batch, {}, pass_param=False)

    @precondition(lambda self: self.batch)
    @rule()
    def decode_with_output_ids(self):
        self._step(self.batch, {"output_ids": "out"})

    @precondition(lambda self: self.batch)
    @rule(data=st.data())
    def reorder_shrink_grow(self, data):
        known = [r for r in self.prompt if r in self.cached.cache]
        batch = data.draw(st.lists(st.sampled_from(known), min_size=1, max_size=6, unique=True)) if known else []
        if batch:
            # Rows that were absent from the last call have no "previous tokens" from it: give output_ids.
            self._step(batch, {"output_ids": "out"})

    @precondition(lambda self: self.batch)
    @rule()
    def re_prefill(self):
        rid = self.batch[0]
        self.params[rid] = self._new_params()
        self._step(self.batch, {"all_input_ids": "all", "output_ids": "out", "is_prefill": True})

    @precondition(lambda self: self.batch)
    @rule()
    def clear_one_then_rebuild_from_history(self):
        rid = self.batch[-1]
        self.cached.clear_cache([rid])
        assert rid not in self.cached.cache
        with pytest.raises(SamplingInputError, match=str(rid)):
            self.cached(self.to_dev(np.zeros((len(self.batch), V), np.float32)), SamplingData.from_numpy(is_prefill=False, request_ids=np.array(self.batch)), None)
        self._step(self.batch, {"all_input_ids": "all", "output_ids": "out"})

    @invariant()
    def rows_sorted(self):
        # The Triton backend takes an id's column as its rank: each row holds its distinct ids
        # in ascending order, then only -1 padding.
        table = getattr(getattr(self, "cached", None), "cache", None)
        table = table.table if table is not None else None
        if table is None:
            return
        ids = self.to_host(table.ids) if table.ops.kind == "torch" else np.asarray(table.ids)
        for row in ids:
            n = int((row >= 0).sum())
            assert (row[n:] == -1).all() and (np.diff(row[:n]) > 0).all(), row

    @invariant()
    def bounded(self):
        if self.max_cached is not None and hasattr(self, "cached"):
            assert len(self.cached.cache) <= self.max_cached


def _machine(backend, max_cached=None):
    return type(f"Cache_{backend}_{max_cached}", (CacheMachine,), {"backend": backend, "max_cached": max_cached})


BACKENDS = [b for b in backends.available()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_cached", [None, 4])
def test_cached_equals_stateless(backend, max_cached):
    # The triton interpreter is slow on the CPU: fewer, shorter runs there.
    slow = backend == "triton"
    machine = _machine(backend, max_cached)
    machine.TestCase.settings = settings(
        max_examples=4 if slow else 25, stateful_step_count=8 if slow else 20, deadline=None, derandomize=True
    )
    machine.TestCase().runTest()


def test_unknown_request_without_history_names_the_id():
    s = Sampler("numpy")
    with pytest.raises(SamplingInputError, match="request 42 is not cached"):
        s(np.zeros((1, 5), np.float32), SamplingData.from_numpy(is_prefill=False, request_ids=np.array([42])), None)


def test_duplicate_request_ids_rejected():
    with pytest.raises(SamplingInputError, match="appears more than once"):
        SamplingData.from_numpy(request_ids=np.array([3, 4, 3]))


def test_lru_eviction_drops_least_recently_used():
    s = Sampler("numpy", max_cached_requests=2)
    logits = np.zeros((1, 5), np.float32)
    for rid in (1, 2):
        s(logits, SamplingData.from_numpy(all_input_ids=np.array([[1]]), request_ids=np.array([rid])), None)
    s(logits, SamplingData.from_numpy(is_prefill=False, request_ids=np.array([1])), None)  # 1 is now newest
    s(logits, SamplingData.from_numpy(all_input_ids=np.array([[1]]), request_ids=np.array([3])), None)
    assert 2 not in s.cache and 1 in s.cache and 3 in s.cache


def test_batch_larger_than_cache_bound_is_an_error():
    s = Sampler("numpy", max_cached_requests=1)
    with pytest.raises(SamplingInputError, match="max_cached_requests"):
        s(np.zeros((2, 5), np.float32), SamplingData.from_numpy(request_ids=np.array([1, 2])), None)


def test_output_ids_shorter_than_cache_is_an_error():
    s = Sampler("numpy")
    logits = np.zeros((1, 5), np.float32)
    s(logits, SamplingData.from_numpy(output_ids=np.array([[1, 2]]), request_ids=np.array([7])), None)
    with pytest.raises(SamplingInputError, match="fewer than"):
        s(logits, SamplingData.from_numpy(output_ids=np.array([[1]]), is_prefill=False, request_ids=np.array([7])), None)


def test_failed_call_forgets_the_batch_instead_of_half_applying():
    s = Sampler("numpy")
    ok = np.zeros((1, 5), np.float32)
    s(ok, SamplingData.from_numpy(all_input_ids=np.array([[1]]), request_ids=np.array([5])), None)
    bad = np.full((1, 5), np.nan, np.float32)
    with pytest.raises(ValueError):
        s(bad, SamplingData.from_numpy(is_prefill=False, request_ids=np.array([5])), None)
    assert 5 not in s.cache


def test_state_grows_with_distinct_tokens_not_history_length():
    s = Sampler("numpy")
    long_repetitive = np.tile(np.arange(10), 1000)[None, :]  # 10,000 ids, 10 distinct
    s(np.zeros((1, 50), np.float32), SamplingData.from_numpy(all_input_ids=long_repetitive, request_ids=np.array([1])), None)
    assert s.cache.table.width == 16
