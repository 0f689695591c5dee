#!/usr/bin/env python
"""Repeats of a configuration: seeds (mean ± std, paired test against the paper's λ's at the tuned
lr) or leave-one-real-slice-out (``--protocol loso``: the confirmatory protocol, 95 % CI over slices).

    python studies/repeat.py --study quick --seeds 3 --also paper-matched
    python studies/repeat.py --study quick --protocol loso --also paper-matched,l1 --realizations 4
    ray submit cluster/cluster.yaml studies/repeat.py --alias candidate --seeds 10 --also paper-matched

A thin caller of ``ldct.cli.repeat.main`` (also ``ldct repeat``); `ray submit` copies only this file.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ldct.cli.repeat import main as repeat_main

    return repeat_main(argv, prog="repeat.py")


if __name__ == "__main__":
    sys.exit(main())
