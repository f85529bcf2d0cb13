"""Host side of the Triton pipeline: flags, workspaces, grids and the launch sequence.

Everything here reads host-side flags (``step.host``) and tensor shapes only; nothing reads
device memory, so a whole call can be captured in a CUDA graph (unless ``raise_invalid`` asks
for the one synchronising check).
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional

import torch
import triton

from sampling import stream
from sampling.errors import InvalidLogitsError, SamplingInputError

from . import pipeline as K


@dataclass(frozen=True)
class Config:
    """Tuning knobs (sizes of tiles and buffers). Correctness never depends on them."""

    #: Elements per scan program per loop step (the scan runs one warp per program, so its
    #: per-tile reductions are shuffles without block barriers).
    tile: int = 256
    scan_warps: int = 1
    #: Pipeline stages of the scan's tile loop (tl.range's software pipeline: cp.async copies
    #: stages - 1 tiles ahead into shared memory, holding no registers; 1: no prefetch). 3 against
    #: the former prefetch of one tile into registers by hand: S2 113 -> 105 us at B = 256,
    #: 393 -> 362 us at B = 1024 (bench/NOTES.md, v11); 4 against 3 (v19, two runs): bf16 at
    #: B = 256 -1.4 (S1) to -3.9 us (S4), S3c 108.0 -> 104.8; fp32 -0.4 to -2.6 us at 256 and
    #: 1024; bf16 at 1024 S1 -3.6, S4 -4.3, S2 -1.2, but S3 +3.0 and S3c +1.1; 5 was slower (v15).
    scan_stages: int = 4
    #: Tile and warps of the top-n keys kernel.
    row_tile: int = 1024
    row_warps: int = 4
    #: Sampled values per row for the pivot (a power of two, runs of 8 neighbours), and the
    #: margin J0 of its rank: the pivot is the (ceil(k * sample / V) + J0)-th largest sampled
    #: value, so a row holds about (that rank) * V / sample candidates; the chance of fewer
    #: than k is about P(Gamma(J0) < 1), ~1e-10 for J0 = 12 (bench/NOTES.md, v6).
    sample: int = 4096
    pivot_j0: int = 12
    #: Candidate slots per row; more candidates send the row to the fallback.
    cap: int = 2048
    #: Private candidate slots of a scan work item: each of the ``tile`` positions of its tiles
    #: appends to its own column of emit_depth slots (no prefix sums in the loop); a position
    #: that finds more sends its row to the fallback. 16 keeps that below ~1e-10 per call for
    #: randn-like rows at every batch size (bench/NOTES.md, v7). Memory: 8 bytes per slot,
    #: ~69 MB for one wave of 2112 work items (an H100 at 16 programs per SM).
    emit_depth: int = 16
    #: Scan work items per row for the penalised tokens' slots (pipeline._pen_chunk), each over
    #: an equal share of the slots; they run before the chunks, delaying the chunks of the
    #: programs that take them by their serial tiles. 8 against one item at B >= 128 (the former
    #: rule): S4's scan -4 to -6 us at B = 256 (bench/NOTES.md, v13); 4 against 8: bf16 S3c
    #: -1.8 us, S3 -1.3 us at B = 256, -0.4 to -1.5 us at B = 1024 (v18).
    pen_items: int = 4
    #: Persistent scan programs per SM (the scan grid is SMs x this, or the work items).
    programs_per_sm: int = 16
    #: Scan programs per SM for 2-byte logits (half the bytes of a tile in flight per warp) when
    #: the batch has more than 3 rows per SM (0: programs_per_sm). bf16 at B = 1024, 24 against
    #: 16 (3 stages): S2 / S3 / S3c -6 to -9 us, S4 -10 us, S1 -1 to -2 us (three runs); at
    #: B = 256 S1 +7 us and the others within 1 us, fp32 no gain at either size; 20 between, 28
    #: and 32 slower (bench/NOTES.md, v19). The private candidate slots grow with the work items
    #: (~100 MB at B = 1024).
    programs_per_sm_2byte: int = 24
    #: A chunk spans >= min_chunk_tiles tiles.
    min_chunk_tiles: int = 4
    #: The finish (one program per row): up to finish_regs candidates held in registers, more
    #: read finish_tile slots at a time; top-p over <= finish_pairs top-k survivors compares
    #: all pairs instead of bisecting. 4 warps: 9.8 us at B = 1 against 17.8 us with one warp,
    #: whose ~5000 dependent instructions were latency-bound (bench/NOTES.md, v6).
    #: finish_regs = cap keeps every row on the register path: with 1024, the ~0.1% of rows
    #: with more candidates (their count is ~37 x Gamma(14) at k = 50) took the chunked path,
    #: and at B = 256 one such row set the kernel's time (S2 finish 24.5 -> 14.9 us, v7).
    #: Rows with <= finish_regs_low candidates (nearly all: ~520 on average) use arrays of that
    #: size (0: one tier): finish 15.9 -> 14.9 us fp32, 18.0 -> 16.0 bf16 at B = 256 (v14).
    finish_tile: int = 128
    finish_regs: int = 2048
    finish_regs_low: int = 1024
    finish_pairs: int = 64
    finish_warps: int = 4
    #: Finish programs resident per SM (registers capped to fit; 0: no cap) when the batch has
    #: more rows than 3 per SM, the residency of the uncapped finish (~168 registers): at B = 1024
    #: two waves instead of three, S2 / S3 / S3c -5 to -7 us; at B = 256 (one wave either way) the
    #: cap measured 0.3-1 us slower, 6 or 8 per SM no faster than 3 (bench/NOTES.md, v18).
    finish_programs_per_sm: int = 4
    #: Tile of the exact fallback, which runs in the finish's program (16 digit bins per
    #: element: keep the tile modest).
    fallback_tile: int = 256
    #: The prep kernel (one program per row): history ids handled per loop step, warps
    #: (1024 / 8: S3 prep 68 -> 62 us at B = 256, v7).
    prep_block: int = 1024
    prep_warps: int = 8
    #: Prep programs resident per SM (their registers capped to fit). 4 per SM (of 8 or 4 warps)
    #: shortened the prep kernel under the profiler at B = 1024 but made the calls 18-35 us
    #: slower in graphs; 3 of 8 warps too (bench/NOTES.md, v18).
    prep_programs_per_sm: int = 2
    #: Bitmask words (and raw-table slots) per loop step of the prep's zeroing and word prefix
    #: (8192, one step at V = 151936: S3 and S4 +5 us at B = 256, bench/NOTES.md v18).
    prep_words: int = 1024
    #: Batches of up to small_rows rows, every row truncated with top-k (k <= the chunks per row)
    #: and no penalties, run as one launch (pipeline._small_kernel): chunks of small_chunk values,
    #: doubled until small_per_sm programs of small_warps warps per SM hold the grid (registers
    #: capped to fit), two waits for values the others publish, the pivot from the chunks' maxima
    #: (0: off). B = 1 S2 against the three kernels, same run: fp32 24.0 -> 16.2 us, bf16 25.9 ->
    #: 17.5 (NOTES v22); 13.7 / 15.0 since the waits need no fence (v23); bf16 13.9 once the
    #: finish's k-th search stops at tied keys (v24).
    small_rows: int = 2
    small_chunk: int = 1024
    small_warps: int = 8
    small_per_sm: int = 2
    #: The finish's low register tier in the one-launch path, whose pivot leaves ~60 candidates
    #: per row at k = 50 (a probe: 22.2 -> 20.7 us against 1024 slots, bench/NOTES.md v22).
    small_regs_low: int = 128
    #: Batches whose rows all truncate, need no row sums and have penalties that only lower
    #: values apply the penalties to the candidates in the finish (pipeline._cand_penalties):
    #: the prep builds only the bitmask, the scan reads the raw logits (0: off).
    cand: int = 1
    #: ... and compare a row's penalised candidates with its history ids while that takes at most
    #: cand_compares compares (a few candidates: the tokens the model favours are rarely the
    #: penalised ones); more build the row's whole penalty table in the finish instead.
    cand_compares: int = 65536
    #: Launch prep, scan and finish with programmatic dependent launch where the GPU (sm_90+)
    #: and Triton support it: each waits for the one before at entry, and is launched as soon
    #: as every program of the one before has reached its end (pipeline._gdc_wait / _gdc_done).
    pdl: int = 1


GPU_CONFIG = Config()
#: Small shapes under TRITON_INTERPRET=1, so that CPU tests visit every code path.
INTERPRET_CONFIG = Config(tile=32, prep_block=16, row_tile=32, row_warps=1, sample=64, pivot_j0=2, cap=64,
                          programs_per_sm=2, programs_per_sm_2byte=3, min_chunk_tiles=1, emit_depth=4,
                          finish_tile=16, finish_regs=32, finish_regs_low=16, finish_pairs=8, fallback_tile=32,
                          prep_words=16, small_chunk=16, small_warps=1, small_regs_low=4)

_override: Optional[Config] = None
#: Tests set this to a dict to receive a copy of each row's status after the call
#: (0 finished by the plain pass or the candidate path, 1 invalid, 2 finished by the fallback).
DEBUG: Optional[dict] = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def config() -> Config:
    if _override is not None:
        return _override
    return INTERPRET_CONFIG if interpreting() else GPU_CONFIG


@contextmanager
def use_config(**changes):
    """Temporarily change :class:`Config` fields (tests use it to force code paths)."""
    global _override
    old = _override
    _override = replace(config(), **changes)
    try:
        yield _override
    finally:
        _override = old


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _chunking(rows: int, vocab: int, cfg: Config, nprog: int):
    # At most one wave of work items when rows fit (no partial second wave), else whole rows.
    tiles = triton.cdiv(vocab, cfg.tile)
    chunks = max(1, min(nprog // rows, tiles // cfg.min_chunk_tiles))
    per = triton.cdiv(tiles, chunks)
    length = per * cfg.tile
    return triton.cdiv(vocab, length), length


def _vec(x, tile: int) -> int:
    """Elements per lane per 16-byte load of a one-warp scan tile (the layout that
    pipeline._lane_max reads its lanes' maxima from)."""
    return max(1, min(16 // x.element_size(), tile // 32))


def _tie_gap(x) -> int:
    """pipeline._key_search's GAP for the finish's exact k-th search: distinct values of 2-byte
    logits (divided by one temperature) lie at least ~2**15 (bfloat16, 8 significant bits) or
    ~2**12 (float16, 11 bits) float32 keys apart, so ties at the k-th value are common there
    and a range that narrow holds about one distinct key; float32 logits rarely tie (0: off).
    Penalised values lie off that grid; the search's result does not depend on GAP, only its
    number of steps."""
    return {torch.bfloat16: 1 << 15, torch.float16: 1 << 12}.get(x.dtype, 0)


def _regs(warps_per_sm: int) -> int:
    """Registers per thread that let ``warps_per_sm`` warps share an SM's 64K."""
    return min(255, 65536 // (32 * warps_per_sm)) // 8 * 8


def _pdl(device, cfg: Config) -> bool:
    """Programmatic dependent launch for this call's kernels (pipeline._gdc_wait, _gdc_done)."""
    if not cfg.pdl or device.type != "cuda" or interpreting():
        return False
    return _pdl_supported(torch.cuda.get_device_capability(device)[0])


@functools.lru_cache(maxsize=None)
def _pdl_supported(major: int) -> bool:
    """sm_90+ and a Triton whose launcher takes ``launch_pdl`` (3.4 and later)."""
    from triton.backends.nvidia.compiler import CUDAOptions

    return major >= 9 and "launch_pdl" in CUDAOptions.__dataclass_fields__


def _sms(device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _workspace(state: Dict[str, Any], device, rows: int, chunks: int, stats: int, cfg: Config, trunc: bool,
               scan: bool = True):
    """Per-shape scratch buffers, kept in the sampler's state so graph replays reuse them
    (``stats`` per-chunk statistics per row: the scan's chunks, then its penalised-token items;
    the scan's private candidate slots unless ``scan`` is False: the one-launch path)."""
    key = ("ws", device, rows, chunks, stats, cfg.cap, cfg.tile * cfg.emit_depth, trunc, scan)
    ws = state.get(key)
    if ws is None:
        n = rows * stats
        slots = rows * chunks * cfg.tile * cfg.emit_depth if trunc and scan else 1
        cands = rows * cfg.cap if trunc else 1

        def e(size, dtype):
            return torch.empty(size, dtype=dtype, device=device)

        ws = dict(
            cm=e(n, torch.float32), cs=e(n, torch.float64), crm=e(n, torch.float32), crs=e(n, torch.float64),
            cflag=e(n, torch.int32), ckey=e(n, torch.float32), cid=e(n, torch.int32),
            theta=e(rows, torch.float32), ythr=e(rows, torch.float32),
            ncand=torch.zeros(rows, dtype=torch.int32, device=device),  # (the one-launch path resets it after use)
            pc=e(slots, torch.int64),
            cval=e(cands, torch.float32), cidx=e(cands, torch.int32), cw=e(cands, torch.int64),
            rowkey=e(rows, torch.int64), status=e(rows, torch.int32), tau=e(rows, torch.float32),
            lse=e(rows, torch.float64),
        )
        state[key] = ws
    return ws


def _small_chunking(rows: int, vocab: int, cfg: Config, sms: int):
    """(chunks per row, chunk length) of the one-launch path, as :func:`_chunking` gives them
    for the scan: every program resident at once."""
    length = cfg.small_chunk
    while rows * triton.cdiv(vocab, length) > cfg.small_per_sm * sms:
        length *= 2
    return triton.cdiv(vocab, length), length


def _sync(state: Dict[str, Any], device, rows: int, chunks: int):
    """The one-launch path's words (per row: pivot flag, finished chunks; a ticket; per row and
    chunk: the chunk's max key), zero between calls: the kernel empties what it used."""
    key = ("sync", device, rows, chunks)
    if key not in state:
        state[key] = torch.zeros(2 * rows + 1 + rows * chunks, dtype=torch.int32, device=device)
    return state[key]


def _call_counter(state: Dict[str, Any], device, call: int):
    """A device copy of the sampler's call counter, advanced by the finish kernel.

    Eager calls keep it equal to ``step.call``; inside a CUDA graph ``step.call`` is a constant
    baked at capture, so unseeded rows read this counter instead and each replay advances it.
    """
    key = ("call", device)
    counter = state.get(key)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if counter is None:
        counter = torch.full((1,), call, dtype=torch.int64, device=device)
        state[key] = counter
    elif state.get(("call_next", device)) != call and not capturing:
        counter.fill_(call)
    state[("call_next", device)] = call + 1
    return counter


def _ids(t, rows):
    """(tensor, row stride, length) of an optional [B, L] id / count tensor."""
    if t is None:
        return None, 0, 0
    if t.dim() != 2 or t.shape[0] != rows:
        raise SamplingInputError(f"history ids must be [B, L] with B = {rows}, got {tuple(t.shape)}")
    if t.shape[1] > 0 and t.stride(1) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.shape[1]


def _per_row(t):
    """A [B] per-row tensor as the kernels read it, row b's value at element b: a strided view
    (a column of a [B, n] tensor, what a user's ``to_tensor`` returned) is copied."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def run(step):
    """The whole pipeline for one :class:`sampling.step.Step` of torch tensors.

    Returns ``(logprobs f32 [B], tokens i64 [B], top_ids i64 [B, n] | None, top_logprobs | None)``.
    Invalid rows get token -1 and a NaN log-probability unless ``step.raise_invalid``.
    """
    cfg = config()
    x = step.logits
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, vocab = x.shape
    dev = x.device
    host = step.host.arrays
    prm = {name: _per_row(t) for name, t in step.params.items()}
    greedy = host["greedy"]
    k = host["top_k"]
    active_k = (k > 0) & (k < vocab)
    two_level = stream.two_level_rows(host, vocab)
    trunc = ~greedy & ~two_level
    any_trunc = bool(trunc.any())
    any_plain = bool((~trunc).any())
    any_gumbel = bool(two_level.any())
    has_temp = bool((host["temperature"] != 1).any())
    mode = K.MODES[step.logprobs_mode]
    table = step.table_ids is not None
    if table:
        # The cache's table: ids (as the repetition list) and their states (as the counts)
        rep, rep_stride, R = _ids(step.table_ids, rows)
        cnt, cnt_stride, _ = _ids(step.table_flags, rows)
        out, out_stride, O = None, 0, 0
    else:
        rep, rep_stride, R = _ids(step.rep_ids, rows)
        out, out_stride, O = _ids(step.out_ids, rows)
        cnt, cnt_stride, _ = _ids(step.out_counts, rows) if out is not None else (None, 0, 0)
    pen_rep = rep is not None and R > 0 and bool((host["repetition_penalty"] != 1).any())
    pen_out = (table or out is not None) and max(R, O) > 0 and bool(
        ((host["frequency_penalty"] != 0) | (host["presence_penalty"] != 0)).any()
    )
    pen = pen_rep or pen_out
    # row sums: for "processed" log-probabilities, plain rows, and the total mass of top-p
    # rows without top-k (the finish checks that their candidates hold the nucleus)
    need_s = mode == 1 or any_plain or bool((trunc & ~active_k & (host["top_p"] < 1)).any())
    need_raw = mode == 2
    # Penalties on the candidates (pipeline._cand_penalties): the candidates of the raw logits
    # then hold every token whose penalised value passes, since no penalty raises a value.
    lowers = bool(((host["repetition_penalty"] >= 1) & (host["frequency_penalty"] >= 0)
                   & (host["presence_penalty"] >= 0)).all())
    cand = bool(cfg.cand) and pen and lowers and not any_plain and not need_s and not step.num_logprobs

    fast = dev.type == "cuda" and bool(
        ((host["temperature"] >= 2.0**-20) & (host["temperature"] <= 2.0**20)).all()
    )
    sms = _sms(dev)
    # One launch for small batches of top-k rows without penalties (pipeline._small_kernel):
    # its pivot, the k-th largest chunk max, needs k <= the chunks per row.
    small = None
    if (cfg.small_rows and rows <= cfg.small_rows and not pen and not table and bool(trunc.all())
            and bool(active_k.all())):
        small = _small_chunking(rows, vocab, cfg, sms)
        if int(k.max()) > small[0]:
            small = None
    # more than 3 rows per SM: the scan's grid for 2-byte logits, the finish's register cap
    busy = rows > 3 * sms
    pps = cfg.programs_per_sm
    if cfg.programs_per_sm_2byte and x.element_size() == 2 and busy:
        pps = cfg.programs_per_sm_2byte
    nprog = pps * sms
    pdl = _pdl(dev, cfg)
    chunks, chunk_len = _chunking(rows, vocab, cfg, nprog) if small is None else small
    # With penalties (unless the finish penalises the candidates: cand) the scan's chunks mask
    # the penalised tokens, and cfg.pen_items more items per row take the penalty table's slots
    # (pipeline._pen_chunk). A constant (the chunks depend on the batch size alone): a growing
    # history changes no workspace shape and no kernel variant.
    slots = (R if table else R + O) if pen and not cand else 0
    pen_items = cfg.pen_items if pen and not cand else 0
    span = triton.cdiv(triton.cdiv(slots, max(pen_items, 1)), cfg.tile) * cfg.tile
    nitems = rows * (chunks + pen_items)
    nprog = min(nitems, nprog)
    stats = chunks + pen_items  # per-row chunk statistics
    ws = _workspace(step.state, dev, rows, chunks, stats, cfg, any_trunc, scan=small is None)
    counter = _call_counter(step.state, dev, step.call)
    dummy = ws["status"]
    positions = _per_row(step.positions)
    seed = int(step.sampler_seed)
    words = triton.cdiv(vocab, 32)
    # the penalty table, per row: bitmask, its word prefix, R + O value, state and id slots, or R
    # values from the cache's table (pipeline._prep_kernel); sized by this call's history, so
    # allocated per call
    rs = (2 * words + (R if table else 3 * (R + O))) if pen else 0
    pen_tab = torch.empty(max(rows * rs, 1), dtype=torch.int32, device=dev)
    tok = torch.empty(rows, dtype=torch.int64, device=dev)
    lp = torch.empty(rows, dtype=torch.float32, device=dev)
    P = prm

    hist = (
        out if out is not None else dummy, out_stride, O,
        cnt if cnt is not None else dummy, cnt_stride,
        positions if positions is not None else dummy,
    )
    seeds = (P["has_seed"], P["seed_lo"], P["seed_hi"], seed & 0xFFFFFFFF, seed >> 32, counter)
    hflags = dict(HAS_OUT=out is not None, HAS_COUNTS=out is not None and cnt is not None,
                  HAS_POS=positions is not None)
    common = (P["temperature"], P["greedy"], P["top_k"], P["top_p"], P["min_p"])
    if small is not None:
        args = (
            x, x.stride(0), vocab, chunk_len, chunks, rows,
            *common, ws["rowkey"],
            *hist, *seeds,
            ws["cm"], ws["cs"], ws["crm"], ws["crs"], ws["cflag"], ws["ckey"], ws["cid"],
            ws["theta"], ws["ncand"], ws["cval"], ws["cidx"], ws["cw"], cfg.cap,
            tok, lp, ws["status"], ws["tau"], ws["lse"], _sync(step.state, dev, rows, chunks),
        )
        kw = dict(MODE=mode, **hflags, HAS_TEMP=has_temp, FAST=fast, NEED_S=need_s, NEED_RAW=need_raw,
                  CT=_p2(chunk_len), CP=_p2(chunks), FT=cfg.finish_tile,
                  FRL=min(cfg.small_regs_low or cfg.finish_regs, cfg.finish_regs), FR=cfg.finish_regs,
                  NKP=cfg.finish_pairs, TILE=cfg.fallback_tile, GAP=_tie_gap(x), num_warps=cfg.small_warps,
                  enable_fp_fusion=False)
        if interpreting():
            # programs run one after another: the waits become launch boundaries
            for phase in (1, 2, 3):
                K._small_kernel[(chunks, rows)](*args, PHASE=phase, **kw)
        else:
            # cooperative: CUDA refuses a grid that cannot be resident at once (the waits would
            # last forever for programs not yet started)
            K._small_kernel[(chunks, rows)](*args, PHASE=0, launch_cooperative_grid=True,
                                            maxnreg=_regs(cfg.small_per_sm * cfg.small_warps), **kw)
    else:
        # the prep adds the cache's pending tokens to its table (Step.table_new), so it runs
        new = _per_row(step.table_new) if table else None
        prep = pen or any_trunc or new is not None
        # With the cache's table and the penalties on the candidates, the bitmask of each row's
        # ids (and its groups' counts) is kept with the table (Step.table_aux) across calls: the
        # prep builds it for a table it has not seen, then keeps it as it adds the pending tokens
        # (pipeline._table_aux_build). A call that adds them without keeping it drops it. (A
        # table given without a place to keep it gets one for this call.)
        aux, aux_w, kept = pen_tab, 0, False
        if table and cand:
            keep = step.table_aux if step.table_aux is not None else {}
            aux_w = words + triton.cdiv(words, 8) + 1
            aux = keep.get("triton_aux")
            kept = aux is not None and tuple(aux.shape) == (rows, aux_w) and aux.device == dev
            if not kept:
                aux = keep["triton_aux"] = torch.empty((rows, aux_w), dtype=torch.int32, device=dev)
        elif table and new is not None and step.table_aux is not None:
            step.table_aux.pop("triton_aux", None)
        if prep:
            K._prep_kernel[(rows,)](
                x, x.stride(0), vocab, words,
                rep if rep is not None else dummy, rep_stride, R,
                *hist,
                P["repetition_penalty"], P["frequency_penalty"], P["presence_penalty"],
                *seeds,
                pen_tab, rs, aux, aux_w,
                ws["rowkey"], ws["ncand"], new if new is not None else dummy,
                *common, ws["theta"], ws["ythr"], cfg.cap,
                HAS_REP=rep is not None, PEN_REP=pen_rep, PEN_OUT=pen_out, TABLE=table, HAS_NEW=new is not None,
                **hflags,
                PIVOT=any_trunc, CAND=cand, AUX=aux_w > 0, KEPT=kept, HAS_TEMP=has_temp, FAST=fast, NS=cfg.sample,
                J0=cfg.pivot_j0, BL=cfg.prep_block, BW=cfg.prep_words,
                PDL=pdl, launch_pdl=pdl, num_warps=cfg.prep_warps, enable_fp_fusion=False,
                # prep_programs_per_sm programs per SM (2: B = 256 on 132 SMs in one wave); uncapped,
                # Triton 3.6 gave the penalised prep 161 registers, one program per SM
                maxnreg=_regs(cfg.prep_programs_per_sm * cfg.prep_warps),
            )
        K._scan_kernel[(nprog,)](
            x, x.stride(0), vocab, chunk_len, chunks, stats, rows, rows * chunks, rows * pen_items, span,
            rep if rep is not None else dummy, rep_stride, R,
            *common, ws["rowkey"],
            pen_tab, words, rs,
            ws["cm"], ws["cs"], ws["crm"], ws["crs"], ws["cflag"], ws["ckey"], ws["cid"],
            *hist, *seeds, ws["ythr"], ws["ncand"], ws["pc"], ws["cval"], ws["cidx"], cfg.cap,
            PREP=prep, **hflags,
            HAS_PEN=pen and not cand, HAS_TEMP=has_temp, FAST=fast, ANY_PLAIN=any_plain, ANY_GUMBEL=any_gumbel,
            ANY_TRUNC=any_trunc,
            NEED_S=need_s, NEED_RAW=need_raw, TILE=cfg.tile, VEC=_vec(x, cfg.tile),
            D=cfg.emit_depth, TABLE=table, NS=cfg.scan_stages, PDL=pdl, launch_pdl=pdl, num_warps=cfg.scan_warps, enable_fp_fusion=False,
            # every persistent program must be resident at once: cap the registers so that
            # pps of them fit in the SM's 64K (a 16th program left over to a second wave doubled
            # S3's scan: bench/NOTES.md, v7; at 24, 80 registers, no spill under Triton 3.6)
            maxnreg=_regs(pps * cfg.scan_warps),
        )
        K._finish_kernel[(rows,)](
            x, x.stride(0), vocab, stats,
            *common, ws["rowkey"],
            pen_tab, words, rs, aux, aux_w,
            rep if rep is not None else dummy, rep_stride, R, *hist[:5],
            P["repetition_penalty"], P["frequency_penalty"], P["presence_penalty"],
            ws["cm"], ws["cs"], ws["crm"], ws["crs"], ws["cflag"], ws["ckey"], ws["cid"],
            ws["theta"], ws["ncand"], ws["cval"], ws["cidx"], ws["cw"], cfg.cap,
            tok, lp, ws["status"], ws["tau"], ws["lse"], counter,
            MODE=mode, HAS_PEN=pen, CAND=cand, TABLE=table, PEN_REP=pen_rep, PEN_OUT=pen_out,
            HAS_COUNTS=hflags["HAS_COUNTS"], BL=cfg.prep_block, BW=cfg.prep_words, HLIM=cfg.cand_compares,
            HAS_TEMP=has_temp, FAST=fast, ANY_PLAIN=any_plain, ANY_TRUNC=any_trunc,
            NEED_S=need_s, NEED_RAW=need_raw, CP=_p2(stats), FT=cfg.finish_tile,
            FRL=min(cfg.finish_regs_low or cfg.finish_regs, cfg.finish_regs), FR=cfg.finish_regs,
            NKP=cfg.finish_pairs, TILE=cfg.fallback_tile, GAP=_tie_gap(x),
            PDL=pdl, launch_pdl=pdl, num_warps=cfg.finish_warps, enable_fp_fusion=False,
            **({"maxnreg": _regs(cfg.finish_programs_per_sm * cfg.finish_warps)}
               if cfg.finish_programs_per_sm and busy else {}),
        )
    if DEBUG is not None:
        DEBUG["small"] = small is not None
        DEBUG["cand"] = cand
        DEBUG["status"] = ws["status"].clone()
        DEBUG["ncand"] = ws["ncand"].clone()
        DEBUG["theta"] = ws["theta"].clone()
    status = ws["status"]
    if step.raise_invalid:
        bad = status == K.STATUS_INVALID
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise InvalidLogitsError(
                f"logits row {row} has NaN or +inf (after penalties and temperature) or no finite value"
            )
    top_ids = top_lp = None
    n = int(step.num_logprobs)
    if n:
        keys = torch.empty((rows, vocab), dtype=torch.int64, device=dev)
        K._topn_keys_kernel[(rows, chunks)](
            x, x.stride(0), vocab, chunk_len,
            *common,
            pen_tab, words, rs, ws["tau"], keys,
            MODE=mode, HAS_PEN=pen, HAS_TEMP=has_temp, FAST=fast, TILE=cfg.row_tile,
            num_warps=cfg.row_warps, enable_fp_fusion=False,
        )
        best = torch.topk(keys, n, dim=1).values
        ids = 2147483647 - (best & 0xFFFFFFFF)
        k32 = (best >> 32).to(torch.int32)
        vals = (k32 ^ ((k32 >> 31) & 0x7FFFFFFF)).view(torch.float32)
        bad = (status == K.STATUS_INVALID)[:, None]
        top_ids = torch.where(bad, torch.full_like(ids, -1), ids)
        top_lp = (vals.to(torch.float64) - ws["lse"][:, None]).to(torch.float32)
        top_lp = torch.where(bad, torch.full_like(top_lp, float("nan")), top_lp)
    return lp, tok, top_ids, top_lp
