"""What every command module of the CLI shares: exit codes and the debug switch."""

from __future__ import annotations

import os

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def debug_enabled() -> bool:
    """``--debug`` given (it sets LDCT_DEBUG) or LDCT_DEBUG set to anything but empty/0."""
    return os.environ.get("LDCT_DEBUG", "") not in ("", "0")
