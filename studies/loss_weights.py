#!/usr/bin/env python
"""The loss-weight study: Optuna (TPE) over λ₂ (L1), λ₃ (perceptual), λ_gp and the learning rate.

    python studies/loss_weights.py --profile quick            # one machine, built-in data
    ray submit cluster/cluster.yaml studies/loss_weights.py   # the cluster (paper profile)

`ray submit` copies only this file to the head node; the `ldct` package is installed there by the
cluster's setup commands. On a cluster head (the launcher leaves ~/ray_bootstrap_config.yaml
there) the default profile is `paper`; elsewhere it is `quick`.
"""

from __future__ import annotations

import sys
from pathlib import Path


def default_profile() -> str:
    return "paper" if (Path.home() / "ray_bootstrap_config.yaml").is_file() else "quick"


def main(argv: list[str] | None = None) -> int:
    # The study itself lives in the package (`ldct study`); this file stays the `ray submit` entry.
    from ldct.study import main as study_main

    return study_main(argv, default_profile=default_profile(), prog="loss_weights.py")


if __name__ == "__main__":
    sys.exit(main())
