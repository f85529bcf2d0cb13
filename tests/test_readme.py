"""Every ```python block of README.md runs, so the README's examples never rot.

Each block runs on its own, in a fresh namespace (as ``__main__`` would see it) and in an empty
temporary working directory: a reader can copy any single block and run it, so every block must
carry its own imports. Blocks meant only to be read (shell commands, printed output, code for
hardware CI does not have) use another info string, such as ```text, ```console or ```bash.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# An opening fence whose info string is exactly "python", up to the next closing fence.
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list:
    """``(line, code)`` of every ```python block, ``line`` being the 1-based line of the fence."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def _blocks():
    return python_blocks(README.read_text(encoding="utf-8")) if README.is_file() else []


def run_block(code: str, name: str) -> dict:
    """Run one block in a fresh namespace; return the namespace it leaves."""
    namespace = {"__name__": "__main__", "__file__": name}
    exec(compile(code, name, "exec"), namespace)
    return namespace


def test_readme_has_python_examples():
    assert README.is_file(), f"{README} is missing"
    assert _blocks(), "README.md has no ```python block: the set-up example must be runnable"


def test_block_extraction():
    text = "intro\n```python\nx = 1\n```\n```text\nnot run\n```\n\n```python  \ny = 2\n\nz = 3\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n"), (9, "y = 2\n\nz = 3\n")]


def test_a_failing_block_fails():
    with pytest.raises(ZeroDivisionError):
        run_block("1 / 0\n", "README.md:1")


@pytest.mark.parametrize("line, code", [pytest.param(n, c, id=f"line{n}") for n, c in _blocks()])
def test_readme_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Line numbers in a traceback point into README.md.
    run_block("\n" * line + code, str(README))
