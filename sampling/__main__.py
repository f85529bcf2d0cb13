"""Command line: ``python -m sampling demo PROMPT [options]`` (see :mod:`sampling.demo`)."""

from __future__ import annotations

import sys

USAGE = """usage: python -m sampling <command> [options]

commands:
  demo PROMPT   generate text with a real small model, one sampler call per decode step
                (python -m sampling demo --help)
  --version     print the version
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from sampling import __version__

        sys.stdout.write(f"sampling {__version__}\n")
        return 0
    if argv[0] == "demo":
        from sampling.demo import main as demo_main

        return demo_main(argv[1:])
    sys.stderr.write(f"unknown command {argv[0]!r}\n\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
