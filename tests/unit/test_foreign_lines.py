"""examples/foreign is tools/bench/reference plus the lines README's "Use it in your own app" counts, no more.

The README states :data:`LINES_ADDED`: this test keeps it true. Lines are
compared with difflib, file by file (the app's files; each README is prose
about its own directory). A changed line counts once, and may only gain
text: the stock line must still be in it, in order (nothing taken out).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from tests.procset import ROOT

#: What README "Use it in your own app" says a user adds or changes (blank lines not counted).
LINES_ADDED = 5
#: And the blank line the import sorter (ruff's isort) asks for around ``import stopright``.
BLANK_LINES_ADDED = 1

REFERENCE = ROOT / "tools" / "bench" / "reference"
FOREIGN = ROOT / "examples" / "foreign"
#: Not the app: its prose, and how it installs (tests/unit/test_distribution.py checks that file).
DOCS = {"README.md", "requirements.txt"}


def app_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.is_file() and p.name not in DOCS and p.suffix != ".pyc"}


def is_subsequence(old: str, new: str) -> bool:
    """Every character of ``old``, in order, is in ``new``: the line only gained text."""
    rest = iter(new)
    return all(char in rest for char in old)


def line_changes(stock: Path, adopted: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(added lines, (old, new) pairs of changed lines) of one file, stock -> adopted."""
    name = adopted.name
    before = stock.read_text().splitlines()
    after = adopted.read_text().splitlines()
    added: list[str] = []
    changed: list[tuple[str, str]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, before, after, autojunk=False).get_opcodes():
        if tag == "insert":
            added += after[j1:j2]
        elif tag == "replace":
            old, new = before[i1:i2], after[j1:j2]
            assert len(new) >= len(old), (name, old, new)
            changed += list(zip(old, new[: len(old)], strict=True))
            added += new[len(old):]
        elif tag == "delete":
            raise AssertionError(f"{name}: stock lines removed: {before[i1:i2]}")
    return added, changed


def adopted_lines(stock: Path, adopted: Path, names: set[str]) -> tuple[list[str], list[str]]:
    """(lines added or changed, blank lines added) over the app's files, stock -> adopted;
    a changed line must keep every character of its stock line, in order."""
    added: list[str] = []
    changed: list[tuple[str, str]] = []
    for name in sorted(names):
        file_added, file_changed = line_changes(stock / name, adopted / name)
        added += file_added
        changed += file_changed
    for old, new in changed:
        assert is_subsequence(old, new), f"a stock line lost text:\n  {old}\n  {new}"
    blank = [line for line in added if not line.strip()]
    return [line for line in added if line.strip()] + [new for _, new in changed], blank


def test_the_foreign_app_has_the_reference_files_and_no_other() -> None:
    assert app_files(FOREIGN) == app_files(REFERENCE) == {"Procfile", "refapp.py", "reftasks.py"}
    assert (FOREIGN / "README.md").exists()


def test_the_foreign_app_adds_exactly_the_lines_the_readme_counts() -> None:
    lines, blank = adopted_lines(REFERENCE, FOREIGN, app_files(REFERENCE))
    assert len(lines) == LINES_ADDED, lines
    assert len(blank) == BLANK_LINES_ADDED, blank
    assert all("stopright" in line for line in lines), lines  # each line is one of stopright's


def test_the_web_app_module_is_untouched() -> None:
    assert (FOREIGN / "refapp.py").read_text() == (REFERENCE / "refapp.py").read_text()
