"""examples/flask is examples/flask/stock plus the lines README's "Use it in your own app" counts, no more.

The same rules as tests/unit/test_foreign_lines.py (a changed line counts
once and may only gain text), file by file, the app package included.
"""

from __future__ import annotations

from pathlib import Path

from tests.procset import ROOT
from tests.unit.test_foreign_lines import adopted_lines

#: What README "Use it in your own app" says a Flask-pattern app adds or changes (blank lines not counted).
LINES_ADDED = 6
#: No blank line: ``import stopright`` joins the first-party import block.
BLANK_LINES_ADDED = 0

STOCK = ROOT / "examples" / "flask" / "stock"
ADOPTED = ROOT / "examples" / "flask"
#: Not the app: its prose, and how it installs (tests/unit/test_distribution.py checks that file).
DOCS = {"README.md", "requirements.txt"}


def app_files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")
            if p.is_file() and p.name not in DOCS and p.suffix != ".pyc" and "__pycache__" not in p.parts
            and p.relative_to(directory).parts[0] != "stock"}


def test_the_adopted_app_has_the_stock_files_and_no_other() -> None:
    assert app_files(ADOPTED) == app_files(STOCK) == {
        "Procfile", "make_celery.py", "jobapp/__init__.py", "jobapp/models.py", "jobapp/tasks.py",
        "jobapp/views.py"}
    assert (ADOPTED / "README.md").exists()


def test_the_adopted_app_adds_exactly_the_lines_the_readme_counts() -> None:
    lines, blank = adopted_lines(STOCK, ADOPTED, app_files(STOCK))
    assert len(blank) == BLANK_LINES_ADDED, blank
    # Each line is one of stopright's, or the app context its register() line needs (Flask-SQLAlchemy's
    # db.engine is per app).
    assert all("stopright" in line for line in lines if "app.app_context()" not in line), lines
    assert len(lines) == LINES_ADDED, lines


def test_the_tasks_views_and_models_are_untouched() -> None:
    for name in ("jobapp/tasks.py", "jobapp/views.py", "jobapp/models.py", "make_celery.py"):
        assert (ADOPTED / name).read_text() == (STOCK / name).read_text(), name
