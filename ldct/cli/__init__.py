"""Command-line front ends: ``ldct <group> <command>`` and ``ldct-best``.

Thin: a parser (``ldct.cli.parsers``), one call into the pipeline per command
(``ldct.cli.<group>``), printing. The handler's module is imported only when its command runs,
so ``ldct --help`` and the data commands start fast (Ray, MLflow and timm take seconds to
import). A user-facing error (:class:`ldct.errors.LdctError`, or a builtin error raised by ldct)
prints as one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from ldct.cli.common import EXIT_ERROR, EXIT_OK, debug_enabled
from ldct.cli.parsers import build_best_parser, build_parser
from ldct.errors import LdctError

__all__ = ["main", "best_main"]

# Set on import, before any command module loads torch (libgomp reads it when it loads): passive
# OpenMP waiting, see ldct.cluster.cpu_thread_env for the measurement behind it. Every entry
# point (`ldct`, `ldct-best`, studies/*.py) imports this package first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _handler(spec: str) -> Callable[[argparse.Namespace], int]:
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    # `ldct study` hands everything after it to the study's own parser (ldct.cli.study.main).
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.passthrough_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "debug", False):
        # Through the environment, so code below the CLI (ldct train's own error line) sees it too.
        os.environ["LDCT_DEBUG"] = "1"
    try:
        return int(_handler(args.handler)(args) or EXIT_OK)
    except (LdctError, ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as exc:
        # Expected user errors (every LdctError, missing files, a bad value): one clear line, no
        # trace. A RuntimeError from outside ldct is a bug and keeps its traceback.
        if (
            isinstance(exc, RuntimeError)
            and not isinstance(exc, LdctError)
            and not type(exc).__module__.startswith("ldct")
        ):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if debug_enabled():
            traceback.print_exc(file=sys.stderr)
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """``ldct`` console script."""
    return _run(build_parser(), argv)


def best_main(argv: Sequence[str] | None = None) -> int:
    """``ldct-best``: the registered model: show, validate (throughput) + promote, export, denoise, listen (DICOM node)."""
    return _run(build_best_parser(), argv)
