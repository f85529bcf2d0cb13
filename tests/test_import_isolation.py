"""`import sampling` stays light: no framework and no test dependency until one is used.

Each check runs in a fresh interpreter (a subprocess), since this test session itself has imported
everything already.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "mindspore", "triton", "hypothesis", "scipy", "transformers")


def run(code: str) -> subprocess.CompletedProcess:
    prelude = f"import sys\nHEAVY = {HEAVY!r}\n"
    prelude += "def loaded():\n    return sorted(m for m in HEAVY if m in sys.modules)\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def check(code: str) -> str:
    proc = run(code)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_sampling_imports_no_framework():
    check(
        """
        import numpy as np
        import sampling
        from sampling import Sampler, SamplingData, SamplingParam, backends
        assert loaded() == [], loaded()
        backends.available()  # finds frameworks without importing them
        param = SamplingParam.from_numpy(temperature=np.array([0.5]), seed=np.array([1]))
        Sampler(backend="numpy", seed=0)(np.zeros((1, 4), np.float32), None, param)
        assert loaded() == [], loaded()
        """
    )


def test_sampling_testing_imports_hypothesis_only_when_used():
    out = check(
        """
        import sampling.testing
        assert loaded() == [], loaded()
        print("check_sampler" in dir(sampling.testing))
        sampling.testing.check_sampler
        assert "hypothesis" in loaded(), loaded()
        assert not {"torch", "mindspore", "triton"} & set(loaded()), loaded()
        """
    )
    assert out.strip() == "True"


@pytest.mark.parametrize(
    "use",
    [
        "from sampling.testing import strategies",
        "from sampling.testing import check_sampler",
        "import sampling.testing.conformance",
    ],
)
def test_missing_hypothesis_names_the_extra(use):
    check(
        f"""
        sys.modules["hypothesis"] = None  # as if hypothesis were not installed
        from sampling.errors import BackendUnavailableError
        from sampling.testing import TestExtraMissingError
        try:
            {use}
        except TestExtraMissingError as exc:
            assert isinstance(exc, ImportError) and isinstance(exc, BackendUnavailableError)
            assert "pip install 'sampling[test]'" in str(exc), str(exc)
        else:
            raise AssertionError("no error without hypothesis")
        """
    )


def test_missing_scipy_names_the_extra():
    """The frequencies rule needs scipy's chi-square distribution; without it, the same message."""
    check(
        """
        import numpy as np
        sys.modules["scipy"] = None
        from sampling.testing import TestExtraMissingError, chi_square
        try:
            chi_square(np.array([5, 5]), np.array([0.5, 0.5]))
        except TestExtraMissingError as exc:
            assert "pip install 'sampling[test]'" in str(exc)
        else:
            raise AssertionError("no error without scipy")
        """
    )
