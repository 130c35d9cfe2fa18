"""When the command-line tools show progress bars."""

from __future__ import annotations

import sys


def show_progress(wanted: bool = True) -> bool:
    """True when a bar was not switched off (``-q``) and stderr is a terminal: bars
    written to a log file or a pipe are only carriage-return noise. The Python API
    shows bars whenever its ``progress`` argument is true."""
    return bool(wanted) and sys.stderr.isatty()
