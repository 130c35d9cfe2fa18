"""Command-line progress bars: on for a terminal, off for logs and pipes and with -q."""

from __future__ import annotations

import io
import sys

from dao._progress import show_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert show_progress(True) and not show_progress(False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file or a pipe
    assert not show_progress(True)
