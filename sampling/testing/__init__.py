"""Test tools for samplers: hypothesis strategies and a conformance check.

``sampling.testing.strategies`` generates every input the API takes (logits batches, per-row
parameters, token histories) as valid ``from_numpy`` arguments; :func:`check_sampler` runs a
foreign sampler (an engine's own kernel, a fused path) against the numpy reference, rule by rule.

Importing this package is cheap: hypothesis (and scipy, for the statistical rule) are imported
only when a strategy or :func:`check_sampler` is first used. Without them that use raises
:class:`TestExtraMissingError` naming the extra to install, ``pip install 'sampling[test]'``.

>>> from sampling.testing import check_sampler            # doctest: +SKIP
>>> report = check_sampler(my_sampler, to_tensor=torch.from_numpy)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

from sampling.errors import BackendUnavailableError


class TestExtraMissingError(BackendUnavailableError):
    """hypothesis or scipy is missing; the message names the extra to install."""

    __test__ = False  # not a pytest test class despite the name


_LAZY = {
    "strategies": ("sampling.testing.strategies", None),
    "conformance": ("sampling.testing.conformance", None),
    "check_sampler": ("sampling.testing.conformance", "check_sampler"),
    "ConformanceError": ("sampling.testing.conformance", "ConformanceError"),
    "ConformanceReport": ("sampling.testing.conformance", "ConformanceReport"),
    "RULES": ("sampling.testing.conformance", "RULES"),
    "chi_square": ("sampling.testing.conformance", "chi_square"),
    "Case": ("sampling.testing.strategies", "Case"),
}

__all__ = [
    "check_sampler",
    "chi_square",
    "ConformanceError",
    "ConformanceReport",
    "RULES",
    "Case",
    "strategies",
    "TestExtraMissingError",
]


def require(module: str):
    """Import a test-only dependency, or raise :class:`TestExtraMissingError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TestExtraMissingError(
            f"sampling.testing needs {module.split('.')[0]}: pip install 'sampling[test]'"
        ) from exc


def __getattr__(name: str):
    # PEP 562: the strategies and the conformance kit (and with them hypothesis) load on first use.
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
