#!/usr/bin/env python
"""The loss-weight study's `ray submit` entry point: a thin caller of ``ldct.cli.study`` (``ldct study``).

    python studies/loss_weights.py --profile quick                                 # one machine
    ray submit cluster/local.yaml studies/loss_weights.py -- --profile paper       # a cluster
    ray job submit --working-dir . -- python studies/loss_weights.py --profile paper

`ray submit` copies only this file to the head node; the `ldct` package is installed there by the
cluster's setup commands. Profile choice: ``ldct.cli.study.choose_profile`` (--profile, else
LDCT_PROFILE, else quick; required where a Ray cluster is running).
"""

from __future__ import annotations

import sys

from ldct.cli.study import choose_profile
from ldct.cli.study import main as study_main

__all__ = ["choose_profile", "main"]


def main(argv: list[str] | None = None) -> int:
    return study_main(argv, prog="loss_weights")


if __name__ == "__main__":
    sys.exit(main())
