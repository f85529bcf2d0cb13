"""The torch backend: the reference pipeline, vectorised over the batch, on CPU or CUDA.

No device-to-host synchronisation on the CUDA path (fast paths are chosen from the host-side
parameter flags, never from device values), so a call can be captured in a CUDA graph. No sort
when no row truncates; top-k alone and top-k + top-p sort only the ``max k`` largest values.
Penalties gather and scatter over the history ids (O(B*L)); no [B, V] count tensor is built.
"""

from __future__ import annotations

import numpy as np
import torch

from sampling import stream
from sampling.errors import InvalidLogitsError, SamplingInputError
from sampling.step import Step


class TorchBackend:
    name = "torch"
    reads_cache_table = False

    def owns(self, x) -> bool:
        return isinstance(x, torch.Tensor)

    def dtype_name(self, logits) -> str:
        return str(logits.dtype).replace("torch.", "")

    def asarray(self, host, like, given=None):
        if given is not None:
            if not isinstance(given, torch.Tensor):
                raise SamplingInputError(
                    f"to_tensor produced {type(given).__name__}, but the {self.name} backend needs torch tensors"
                )
            return given if given.device == like.device else given.to(like.device, non_blocking=True)
        return torch.from_numpy(np.ascontiguousarray(host)).to(like.device, non_blocking=True)

    def default_raise_invalid(self, logits) -> bool:
        # Raising needs the device's answer; on a GPU that is a sync, so flag instead by default.
        return logits.device.type == "cpu"

    def run(self, step: Step):
        return run_pipeline(step)


# --- stages -------------------------------------------------------------------------------------


def _widened(z: torch.Tensor, ids: torch.Tensor):
    """Ids with padding mapped to a scratch column V, and a copy of z with that column appended.

    Scattering into the scratch column keeps padding entries from racing with real ones.
    """
    rows, vocab = z.shape
    valid = (ids >= 0) & (ids < vocab)
    safe = torch.where(valid, ids, torch.full_like(ids, vocab))
    wide = torch.empty(rows, vocab + 1, dtype=z.dtype, device=z.device)
    wide[:, :vocab] = z
    wide[:, vocab] = 0
    return wide, safe, valid


def repetition(z: torch.Tensor, ids: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """z / r if z > 0 else z * r at every distinct valid id (duplicates write the same value)."""
    wide, safe, _ = _widened(z, ids)
    vals = wide.gather(1, safe)
    r = r[:, None]
    wide.scatter_(1, safe, torch.where(vals > 0, vals / r, vals * r))
    return wide[:, : z.shape[1]]


def occurrences(ids: torch.Tensor, vocab: int):
    """Sorted ids (padding mapped to V) and, per entry, the number of times its id occurs in the row."""
    valid = (ids >= 0) & (ids < vocab)
    safe = torch.where(valid, ids, torch.full_like(ids, vocab))
    w = valid.to(torch.int64)
    sorted_ids, order = torch.sort(safe, dim=1)
    csum = torch.nn.functional.pad(torch.cumsum(w.gather(1, order), dim=1), (1, 0))
    left = torch.searchsorted(sorted_ids, sorted_ids, side="left")
    right = torch.searchsorted(sorted_ids, sorted_ids, side="right")
    return sorted_ids, csum.gather(1, right) - csum.gather(1, left)


def frequency_presence(z, ids, counts, f, p) -> torch.Tensor:
    """z - f * count, then - p, at every id counted at least once."""
    rows, vocab = z.shape
    if counts is None:
        sorted_ids, cnt = occurrences(ids, vocab)
    else:
        # The cache's table: distinct ids with their counts, so nothing to sort or sum.
        sorted_ids = torch.where((ids >= 0) & (ids < vocab), ids, torch.full_like(ids, vocab))
        cnt = counts.to(torch.int64)
    hit = (sorted_ids < vocab) & (cnt > 0)
    target = torch.where(hit, sorted_ids, torch.full_like(sorted_ids, vocab))
    wide, _, _ = _widened(z, target)
    vals = wide.gather(1, target)
    # Two separately rounded float32 steps, as the reference defines them.
    vals = vals - f[:, None] * cnt.to(torch.float32)
    vals = vals - p[:, None]
    wide.scatter_(1, target, vals)
    return wide[:, :vocab]


def positions(step: Step) -> torch.Tensor:
    dev = step.logits.device
    if step.positions is not None:
        return step.positions.to(torch.int64)
    if step.out_ids is None:
        return torch.zeros(step.rows, dtype=torch.int64, device=dev)
    ids = step.out_ids
    valid = (ids >= 0) & (ids < step.vocab)
    w = 1 if step.out_counts is None else step.out_counts.to(torch.int64)
    return (valid * w).sum(dim=1).to(torch.int64)


def row_keys(step: Step, pos: torch.Tensor, calls: torch.Tensor) -> torch.Tensor:
    """Per-row stream keys: :func:`sampling.stream.row_keys` and ``unseeded_keys``, in int64."""
    P = step.params
    seeded = stream.row_keys(P["seed_lo"], P["seed_hi"], pos)
    if step.host.arrays["has_seed"].all():
        return seeded
    lo, hi = stream.split_seed(step.sampler_seed)
    base = stream.row_keys(torch.full_like(calls, lo), torch.full_like(calls, hi), calls)
    rows = torch.arange(step.rows, dtype=torch.int64, device=pos.device)
    free = stream.mix32(base ^ (rows ^ stream.UNSEEDED))
    return torch.where(P["has_seed"], seeded, free)


def _call_counter(step: Step) -> torch.Tensor:
    """The sampler's call counter as a device scalar, advanced in place by every call.

    Starting from the sampler's host counter and advancing on the device keeps rows without a
    seed drawing fresh numbers when a captured CUDA graph is replayed.
    """
    key = ("calls", str(step.logits.device))
    ctr = step.state.get(key)
    if ctr is None:
        ctr = torch.tensor([step.call], dtype=torch.int64, device=step.logits.device)
        step.state[key] = ctr
    current = ctr.clone()
    ctr.add_(1)
    return current


def _int32_words(x: torch.Tensor) -> torch.Tensor:
    """32-bit words held in int64 as int32 with the same bits (two's complement)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _token_words(step: Step) -> torch.Tensor:
    """``t * GOLDEN mod 2**32`` for every token id (int32 bits), cached per V and device."""
    key = ("token_words", step.vocab, str(step.logits.device))
    words = step.state.get(key)
    if words is None:
        t = torch.arange(step.vocab, dtype=torch.int64, device=step.logits.device)
        words = _int32_words((t * stream.GOLDEN) & stream.MASK32)
        step.state[key] = words
    return words


def gumbel(keys: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """float64 Gumbel noise of :mod:`sampling.stream` for ``keys`` [B, 1] (int64 words) and
    token ``words`` (int32 bits from :func:`_token_words`).

    ``stream.mix32`` in int32: products wrap modulo 2**32 like uint32 ones (the low 32 bits of a
    product do not depend on signedness) and each arithmetic shift is masked to a logical one.
    int32 multiplies vectorise on CPUs where int64 ones do not, which makes this 3x faster; the
    bits are tested equal to the int64 definition.
    """
    x = _int32_words(keys) ^ words
    tmp = torch.empty_like(x)
    for shift, mul in ((16, stream.MUL1), (15, stream.MUL2)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x.bitwise_xor_(tmp.bitwise_and_(0xFFFFFFFF >> shift)).mul_(mul)
    torch.bitwise_right_shift(x, 15, out=tmp)
    x.bitwise_xor_(tmp.bitwise_and_(0xFFFFFFFF >> 15))
    x.bitwise_right_shift_(9).bitwise_and_(0x7FFFFF)
    u = x.to(torch.float64).mul_(2).add_(1).mul_(stream.U_SCALE)
    return u.log_().neg_().log_().neg_()


def choose(zt: torch.Tensor, keep: torch.Tensor, keys: torch.Tensor, step: Step) -> torch.Tensor:
    """Gumbel-max over survivors (lowest id on ties); rows without truncation in two levels
    (:func:`two_level`).

    On the CPU, when every row's survivors lie inside its top-k window, only that window is
    hashed: the check reads the device, which is free there and a sync on a GPU.
    """
    host = step.host.arrays
    plain = stream.two_level_rows(host, step.vocab)
    if plain.any():
        two = two_level(zt, keys, step)
        if plain[~host["greedy"]].all():  # greedy rows take their argmax elsewhere
            return two
        one = choose_survivors(zt, keep, keys, step)
        # the same rows from the device's copy of the parameters (no host-to-device copy)
        return torch.where(stream.two_level_rows(step.params, step.vocab), two, one)
    return choose_survivors(zt, keep, keys, step)


def choose_survivors(zt: torch.Tensor, keep: torch.Tensor, keys: torch.Tensor, step: Step) -> torch.Tensor:
    """The one-level Gumbel-max of truncated rows."""
    host = step.host.arrays
    k_host = np.where((host["top_k"] > 0) & (host["top_k"] < step.vocab), host["top_k"], 0)
    window = int(k_host.max())
    if zt.device.type == "cpu" and (k_host[~host["greedy"]] > 0).all() and 0 < window * 8 < step.vocab:
        vals, idx = torch.topk(zt, window, dim=1, sorted=True)
        inside = keep.gather(1, idx)
        if bool((inside.sum(1) == keep.sum(1)).all()):
            noise = gumbel(keys[:, None], _token_words(step)[idx])
            scores = torch.where(inside, vals.to(torch.float64) + noise, torch.full_like(noise, -torch.inf))
            # topk orders ties arbitrarily: among equal scores take the lowest token id.
            best = scores.max(dim=1, keepdim=True).values
            ids = torch.where(scores == best, idx, torch.full_like(idx, step.vocab))
            return ids.min(dim=1).values
    noise = gumbel(keys[:, None], _token_words(step)[None, :])
    scores = torch.where(keep, zt.to(torch.float64) + noise, torch.full_like(noise, -torch.inf))
    return torch.argmax(scores, dim=1)


def two_level(zt: torch.Tensor, keys: torch.Tensor, step: Step) -> torch.Tensor:
    """The two-level choice of :mod:`sampling.stream` for every row: a block of ``BLOCK`` ids by
    Gumbel-max over the blocks' float64 log-masses, then a token in it by its own Gumbel-max
    (the reference's formula, :func:`sampling.kernels.reference._two_level`)."""
    rows, vocab = zt.shape
    nb = -(-vocab // stream.BLOCK)
    z64 = zt.to(torch.float64)
    zb = torch.nn.functional.pad(z64, (0, nb * stream.BLOCK - vocab), value=-torch.inf)
    zb = zb.view(rows, nb, stream.BLOCK)
    top = zb.amax(dim=2)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mass = top + torch.exp(zb - safe[:, :, None]).sum(dim=2).log()
    words = _token_words(step)
    bkeys = stream.block_keys(keys)
    J = torch.argmax(mass + gumbel(bkeys[:, None], words[None, :nb]), dim=1)
    cols = J[:, None] * stream.BLOCK + torch.arange(stream.BLOCK, device=zt.device)[None, :]
    inside = cols < vocab
    cols = cols.clamp(max=vocab - 1)
    tkey = z64.gather(1, cols) + gumbel(keys[:, None], words[cols])
    tkey = torch.where(inside, tkey, torch.full_like(tkey, -torch.inf))
    return cols.gather(1, torch.argmax(tkey, dim=1, keepdim=True))[:, 0]


def invalid_rows(zt: torch.Tensor) -> torch.Tensor:
    return torch.isnan(zt).any(1) | torch.isposinf(zt).any(1) | ~torch.isfinite(zt).any(1)


def truncation_threshold(zt: torch.Tensor, step: Step) -> torch.Tensor:
    """Per-row value threshold from top-k, then top-p on the top-k survivors: [B] float32.

    Survivors of both are exactly ``zt >= threshold``. Sorts only the ``max k`` largest values
    when every top-p row also has a top-k; a row with top-p and no top-k needs a full sort. The
    sort width comes from the host arrays; everything per row is computed on the device.
    """
    host = step.host.arrays
    P = step.params
    rows, vocab = zt.shape
    k_host = np.where((host["top_k"] > 0) & (host["top_k"] < vocab), host["top_k"], 0)
    p_host = ~host["greedy"] & (host["top_p"] < 1)
    k_used = ~host["greedy"] & (k_host > 0)
    neg_inf = torch.full((rows,), -torch.inf, dtype=zt.dtype, device=zt.device)
    if not (p_host.any() or k_used.any()):
        return neg_inf
    width = vocab if (p_host & (k_host == 0)).any() else int(k_host[k_used | p_host].max())
    if width == vocab:
        vals = torch.sort(zt, dim=1, descending=True).values
    else:
        vals = torch.topk(zt, width, dim=1, sorted=True).values
    k = torch.where((P["top_k"] > 0) & (P["top_k"] < vocab), P["top_k"], torch.zeros_like(P["top_k"]))
    kth = vals.gather(1, (k - 1).clamp(min=0, max=width - 1)[:, None])[:, 0]
    thr_k = torch.where(k > 0, kth, neg_inf)
    if not p_host.any():
        return thr_k
    # Top-p over the top-k survivors, summed in descending order in float64 like the reference.
    survivor = vals >= thr_k[:, None]
    v64 = vals.to(torch.float64)
    top = v64[:, :1]
    w = torch.where(survivor, torch.exp(v64 - top), torch.zeros_like(v64))
    csum = torch.cumsum(w, dim=1)
    # Survivors tied with the k-th value beyond the sorted window come last in descending order.
    beyond = (zt >= thr_k[:, None]).sum(1) - survivor.sum(1)
    total = csum[:, -1] + beyond.to(torch.float64) * torch.exp(thr_k.to(torch.float64) - top[:, 0])
    exclusive = torch.nn.functional.pad(csum[:, :-1], (1, 0))
    neg = -vals
    first = torch.searchsorted(neg, neg, side="left")
    above = exclusive.gather(1, first) / total[:, None]
    p = P["top_p"].to(torch.float64)[:, None]
    n_kept = ((above < p) & survivor).sum(1).clamp(min=1)
    thr_p = vals.gather(1, (n_kept - 1)[:, None])[:, 0]
    p_rows = ~P["greedy"] & (P["top_p"] < 1)
    return torch.where(p_rows, torch.maximum(thr_p, thr_k), thr_k)


def log_softmax(x64: torch.Tensor, keep=None) -> torch.Tensor:
    if keep is not None:
        x64 = torch.where(keep, x64, torch.full_like(x64, -torch.inf))
    return x64 - torch.logsumexp(x64, dim=1, keepdim=True)


def run_pipeline(step: Step):
    P = step.params
    host = step.host
    calls = _call_counter(step)
    x = step.logits.to(torch.float32)
    rows, vocab = x.shape
    z = x
    if step.rep_ids is not None and host.any("repetition_penalty"):
        z = repetition(z, step.rep_ids, P["repetition_penalty"])
    if step.out_ids is not None and (host.any("frequency_penalty") or host.any("presence_penalty")):
        z = frequency_presence(z, step.out_ids, step.out_counts, P["frequency_penalty"], P["presence_penalty"])
    zt = z / P["temperature"][:, None] if host.any("temperature") else z
    bad = invalid_rows(zt)
    if step.raise_invalid:
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise InvalidLogitsError(
                f"logits row {row} has NaN or +inf (after penalties and temperature) or no finite value"
            )
    else:
        # Keep flagged rows from poisoning the arithmetic; their outputs are overwritten below.
        zt = torch.where(bad[:, None], torch.zeros_like(zt), zt)
    greedy = P["greedy"]
    tokens = torch.argmax(zt, dim=1)
    keep = None
    if host.any("sampling"):
        thr = truncation_threshold(zt, step)
        keep = zt >= thr[:, None]
        if host.any("min_p"):
            zt64 = zt.to(torch.float64)
            ratio = torch.exp(zt64 - zt64.max(dim=1, keepdim=True).values)
            keep &= ratio >= P["min_p"].to(torch.float64)[:, None]
        keep |= greedy[:, None]
        sampled = choose(zt, keep, row_keys(step, positions(step), calls), step)
        tokens = torch.where(greedy, tokens, sampled)
    source = x if step.logprobs_mode == "raw" else zt
    lp = log_softmax(source.to(torch.float64), keep if step.logprobs_mode == "sampling" else None)
    logprobs = lp.gather(1, tokens.clamp(min=0)[:, None])[:, 0].to(torch.float32)
    top_ids = top_lp = None
    if step.num_logprobs:
        order = torch.sort(lp, dim=1, descending=True, stable=True)
        top_ids = order.indices[:, : step.num_logprobs]
        top_lp = order.values[:, : step.num_logprobs].to(torch.float32)
    if not step.raise_invalid:
        tokens = torch.where(bad, torch.full_like(tokens, -1), tokens)
        logprobs = torch.where(bad, torch.full_like(logprobs, torch.nan), logprobs)
        if top_ids is not None:
            top_ids = torch.where(bad[:, None], torch.full_like(top_ids, -1), top_ids)
            top_lp = torch.where(bad[:, None], torch.full_like(top_lp, torch.nan), top_lp)
    return logprobs, tokens, top_ids, top_lp
