"""Builds the ledger: pure Python, unless ``LEDGER_COMPILE=1`` asks for the hot pure modules
compiled with mypyc (docs/performance.md, "Compiled rules").

    pip install -e '.[test]'              # pure Python, no C compiler (README, .ci/run)
    LEDGER_COMPILE=1 pip install .        # ledger/domain.py and ledger/money.py compiled
    LEDGER_COMPILE=1 pip wheel --no-deps -w dist .

mypyc is imported only when compiling; the build backend (tools/build_backend.py) then adds
mypy to the build's requirements, so nobody else needs it to build. A compiled module replaces
its ``.py`` at import; the ``.py`` stays in the wheel as the source of truth, and every other
module is Python as always. ``ledger version`` says which modules run compiled.

The wheel also carries ``schema.sql`` and ``migrations/`` (in ``ledger/sql/``), which
``ledger migrate`` and the embedded start apply: an install from a wheel has no checkout
around it to find them in.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

COMPILED = ["ledger/domain.py", "ledger/money.py"]
"""The rules and amounts, measured faster compiled (docs/performance.md). Not
``ledger/events.py``: eventsourcing's mapper reads an event's ``__dict__``, which a compiled
(native) class has not."""

HERE = Path(__file__).resolve().parent


def compiling() -> bool:
    return os.environ.get("LEDGER_COMPILE", "") not in ("", "0")


class BuildPy(build_py):
    """Copies ``schema.sql`` and ``migrations/*.sql`` into the built package (``ledger/sql``)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads them from the checkout
            return
        target = Path(self.build_lib) / "ledger" / "sql"
        (target / "migrations").mkdir(parents=True, exist_ok=True)
        shutil.copy2(HERE / "schema.sql", target / "schema.sql")
        for path in sorted((HERE / "migrations").glob("*.sql")):
            shutil.copy2(path, target / "migrations" / path.name)


def extensions() -> list[Any]:
    if not compiling():
        return []
    from mypyc.build import mypycify

    # No config file: the project's (pyproject.toml) loads the pydantic plugin, which the build
    # environment does not have; these modules need none of it. Imports outside the project
    # (orjson, eventsourcing) are not in the build environment either: typed as Any.
    return mypycify(
        ["--config-file=", "--ignore-missing-imports", *COMPILED],
        opt_level="3",
        target_dir="build/mypyc",  # the generated C
    )


setup(
    cmdclass={"build_py": BuildPy},
    ext_modules=extensions(),
    # Each kind of build in a directory of its own: setuptools never empties build/lib, so a
    # pure build after a compiled one would otherwise ship the compiled modules it left there.
    options={"build": {"build_base": "build/compiled" if compiling() else "build/pure"}},
)
