#!/usr/bin/env python
"""Seed repeats of a configuration (mean ± std over seeds, paired test against the paper's λ's).

    python studies/repeat.py --study quick --seeds 3 --also paper
    ray submit cluster/cluster.yaml studies/repeat.py --alias candidate --seeds 10 --also paper

A thin caller of ``ldct.cli.repeat.main`` (also ``ldct repeat``); `ray submit` copies only this file.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ldct.cli.repeat import main as repeat_main

    return repeat_main(argv, prog="repeat.py")


if __name__ == "__main__":
    sys.exit(main())
