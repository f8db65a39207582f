"""The build backend (pyproject.toml): setuptools', which also asks for mypy when
``LEDGER_COMPILE=1`` asks for compiled modules (setup.py), and only then.

A static ``[build-system] requires`` cannot say "mypy if compiling": listing it there would make
every install, editable ones included, download and install mypy to build a pure-Python
package. PEP 517 lets a backend name its requirements per build; this is that, and a clear
refusal of a compiled editable install.
"""

from __future__ import annotations

import os
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the hooks this module does not change)

MYPY = "mypy>=2.4.1,<3"
"""mypyc ships with mypy: the version measured (docs/performance.md), up to its next major."""


def _compiling() -> bool:
    return os.environ.get("LEDGER_COMPILE", "") not in ("", "0")


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    if not _compiling():
        return list(_setuptools.get_requires_for_build_wheel(config_settings))
    # setuptools runs setup.py to find its requirements, which would import mypyc before it
    # is installed: ask it as for a pure build, then add mypy.
    given = os.environ["LEDGER_COMPILE"]
    os.environ["LEDGER_COMPILE"] = "0"
    try:
        return [*_setuptools.get_requires_for_build_wheel(config_settings), MYPY]
    finally:
        os.environ["LEDGER_COMPILE"] = given


def _refuse_in_place() -> None:
    """Compiled modules built for an editable install would sit beside the sources in the
    checkout, and shadow every later edit of them."""
    if _compiling():
        raise RuntimeError(
            "LEDGER_COMPILE=1 builds a wheel (pip install . or pip wheel .), not an editable"
            " install; unset it for pip install -e"
        )


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    _refuse_in_place()
    return list(_setuptools.get_requires_for_build_editable(config_settings))


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    _refuse_in_place()
    return str(_setuptools.build_editable(wheel_directory, config_settings, metadata_directory))
