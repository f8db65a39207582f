"""The documents agree with the code: generated pages are current, examples run."""

from __future__ import annotations

import re
from pathlib import Path

from ledger import errors, events, limits

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_error_page_is_the_current_rendering_of_the_error_module() -> None:
    assert (DOCS / "errors.md").read_text() == errors.render_markdown(), (
        "run: python -m ledger.errors > docs/errors.md"
    )


def test_every_error_code_is_documented_once_in_checking_order() -> None:
    text = (DOCS / "errors.md").read_text()
    codes = [c.code for c in errors.all_error_classes()]
    found = re.findall(r"^\| `([a-z_]+)` \| (\d+) \|", text, re.M)
    documented = [code for code, _ in found if code in codes]
    assert documented == list(dict.fromkeys(codes)) or documented == codes


def test_every_limit_is_in_the_api_reference() -> None:
    text = (DOCS / "api.md").read_text()
    names = [
        n for n, v in vars(limits).items() if not n.startswith("_") and isinstance(v, int | float)
    ]
    assert names and all(f"`{n}`" in text for n in names), [
        n for n in names if f"`{n}`" not in text
    ]


def test_every_event_class_is_in_the_events_reference() -> None:
    text = (DOCS / "events.md").read_text()
    assert all(f"`{cls.__name__}`" in text for cls in events.EVENT_CLASSES)


def test_the_python_examples_in_the_docs_run() -> None:
    ran = 0
    for page in sorted(DOCS.rglob("*.md")):
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            exec(compile(block, str(page), "exec"), {})
            ran += 1
    assert ran >= 1
