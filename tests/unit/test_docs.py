"""The docs a newcomer reads: a short README with a fixed outline, links that resolve, nothing internal.

README.md is the page people arrive at ("Ctrl+C doesn't stop my Flask Celery
app"): at most :data:`MAX_README_LINES`, its sections in :data:`OUTLINE`, a
table of contents at the top, short table cells; the rest lives in docs/.
Every relative link in README.md, docs/*.md and stopright/README.md must name
a file of the repository, and an anchor of it that GitHub would make. No doc
links outside the repository (local examples aside), and none names an
internal issue number; nor does any Python source outside tests/.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MAX_README_LINES = 250
MAX_README_CELL = 200
#: The README's sections (its ``##`` headings), in this order.
OUTLINE = ["Quick start", "What Ctrl+C does", "Why the stock wiring fails", "Use it in your own app",
           "Settings", "Docs"]
#: A docs page longer than this has a table of contents linking each of its sections.
CONTENTS_FROM_LINES = 60

README = ROOT / "README.md"
LINKED_DOCS = [README, ROOT / "stopright" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_DIRS = {"var", "__pycache__", "node_modules", "tests"}

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
URL = re.compile(r"https?://[^\s)>\]`'\"]*", re.I)
LOCAL_URL = re.compile(r"https?://(127\.0\.0\.1|localhost|\[::1\])([:/]|$)", re.I)
ISSUE = re.compile(r"\bissues?\s*#?\d+|\(#\d+\)", re.I)


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans (where links and headings are not)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lower-cased, punctuation dropped, spaces as hyphens."""
    text = INLINE_LINK.sub(r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(text: str, level: int | None = None) -> list[str]:
    return [title for marks, title in HEADING.findall(FENCE.sub("", text))
            if level is None or len(marks) == level]


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for ``path``'s headings (a repeated one gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for title in headings(path.read_text()):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[str]:
    body = prose(text)
    return [target for _, target in INLINE_LINK.findall(body)] + REFERENCE_LINK.findall(body)


def broken_links(path: Path) -> list[str]:
    """The links of ``path`` that leave the repository, name no file, or name no anchor of it."""
    bad = []
    for target in links(path.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
            if not LOCAL_URL.match(target):
                bad.append(f"{target}: outside the repository")
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(ROOT):
            bad.append(f"{target}: outside the repository")
        elif not resolved.exists():
            bad.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            bad.append(f"{target}: no such anchor in {resolved.relative_to(ROOT)}")
    return bad


def docs_and_sources() -> list[Path]:
    """Every Markdown file, and every Python file outside tests/, of the repository."""
    found = []
    for directory, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS]
        found += [Path(directory, f) for f in files if f.endswith((".md", ".py"))]
    return sorted(found)


def contents(text: str) -> list[str]:
    """The link targets of the list that follows a line "Contents" before the first section."""
    head = text.split("\n## ", 1)[0]
    if "\nContents\n" not in head:
        return []
    items = head.split("\nContents\n", 1)[1].strip("\n").split("\n\n", 1)[0]
    return [target for _, target in INLINE_LINK.findall(items)]


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_the_readme_has_the_outline_and_a_table_of_contents_first() -> None:
    text = README.read_text()
    assert headings(text, 2) == OUTLINE
    assert contents(text) == ["#" + slug(title) for title in OUTLINE]


def test_the_readme_tables_have_short_cells() -> None:
    rows = [line for line in FENCE.sub("", README.read_text()).splitlines() if line.startswith("|")]
    assert rows, "the README has its settings table"
    cells = [cell.strip() for row in rows for cell in row.strip("|").split("|")]
    long = [cell for cell in cells if len(cell) > MAX_README_CELL]
    assert not long, long


def test_the_quick_start_names_the_two_commands_and_they_exist() -> None:
    quick = section(README.read_text(), "Quick start")
    for command in ("scripts/start", "scripts/test"):
        assert re.search(rf"^{command}\b", quick, re.M), f"Quick start does not run {command}"
        assert os.access(ROOT / command, os.X_OK), f"{command} is not an executable file"


def test_the_readme_links_every_docs_page() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README.read_text())}
    pages = set((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has pages"
    assert not pages - linked, sorted(str(p.relative_to(ROOT)) for p in pages - linked)


@pytest.mark.parametrize("path", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(path: Path) -> None:
    assert path.exists(), path
    assert not broken_links(path)


@pytest.mark.parametrize("path", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_a_long_docs_page_has_a_table_of_contents(path: Path) -> None:
    text = path.read_text()
    sections = headings(text, 2)
    if len(text.splitlines()) <= CONTENTS_FROM_LINES or len(sections) < 2:
        return
    missing = [title for title in sections if "#" + slug(title) not in contents(text)]
    assert not missing, f"{path.name}: sections not in its contents: {missing}"


def test_no_doc_links_outside_the_repository() -> None:
    outside = [f"{path.relative_to(ROOT)}: {url}" for path in docs_and_sources() if path.suffix == ".md"
               for url in URL.findall(path.read_text()) if not LOCAL_URL.match(url)]
    assert not outside, outside


def test_no_doc_or_source_names_an_internal_issue() -> None:
    named = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in docs_and_sources()
             for n, line in enumerate(path.read_text().splitlines(), 1) if ISSUE.search(line)]
    assert not named, "\n".join(named)


@pytest.mark.parametrize(("heading", "anchor"), [
    ("What Ctrl+C does", "what-ctrlc-does"),
    ("1. honcho (systemd, Heroku) signals the group", "1-honcho-systemd-heroku-signals-the-group"),
    ("Checking a stop: `scripts/shutdown-report`", "checking-a-stop-scriptsshutdown-report"),
    ("The Flask docs' pattern: six lines", "the-flask-docs-pattern-six-lines"),
    ("STOPRIGHT_SPOOL_DIR and -P", "stopright_spool_dir-and--p"),
])
def test_anchors_follow_githubs_rule(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor
