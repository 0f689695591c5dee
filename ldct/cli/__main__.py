"""``python -m ldct.cli``: the ``ldct`` console script."""

import sys

from ldct.cli import main

sys.exit(main())
