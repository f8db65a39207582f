"""An event-sourced double-entry ledger on PostgreSQL: the write side and the domain."""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path


def compiled_modules() -> list[str]:
    """The modules of this package that run compiled (mypyc, ``LEDGER_COMPILE=1`` in setup.py):
    Python imports an extension module in preference to the ``.py`` beside it. Empty when
    everything is pure Python, as an editable install always is."""
    here = Path(__file__).resolve().parent
    found = {
        path.name.removesuffix(suffix)
        for suffix in EXTENSION_SUFFIXES
        for path in here.glob(f"*{suffix}")
        if (here / (path.name.removesuffix(suffix) + ".py")).is_file()
    }
    return [f"ledger.{name}" for name in sorted(found)]


def build() -> str:
    """``compiled (ledger.domain, ledger.money)`` or ``pure``: ``ledger version`` and the log
    line at the server's start say it."""
    compiled = compiled_modules()
    return f"compiled ({', '.join(compiled)})" if compiled else "pure"
