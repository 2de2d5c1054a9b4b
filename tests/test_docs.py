"""The documentation: README.md and docs/*.md link each other, every relative link resolves, no text twice."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# An inline link [text](target); the target ends at whitespace or ")" (no page uses a title or parentheses).
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code removed (links in code are not links)."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            lines.append(re.sub(r"`[^`]*`", "``", line))
    return lines


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: its rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown page, numbered as GitHub numbers repeats (x, x-1, x-2)."""
    seen: Counter[str] = Counter()
    out = set()
    fence = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        match = HEADING.match(line) if not fence else None
        if match:
            slug = github_anchor(match.group(2))
            out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return out


def links(path: Path) -> list[str]:
    """The relative link targets of a page (external URLs left out)."""
    return [target for line in prose(path.read_text()) for target in LINK.findall(line) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_github_anchor_follows_githubs_rules() -> None:
    """The slug rule this test relies on, on headings of the shape the pages use."""
    assert github_anchor("Exit codes of `gbx run` (and `gbx complete`)") == "exit-codes-of-gbx-run-and-gbx-complete"
    assert github_anchor("Design decisions (where the contract is silent)") == "design-decisions-where-the-contract-is-silent"
    assert github_anchor("Resume, retries and pending seals") == "resume-retries-and-pending-seals"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    """Each relative link names a file that exists, and its #anchor a heading of that file."""
    broken = []
    for target in links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, broken


def test_readme_is_short_and_points_to_the_docs() -> None:
    """README.md is at most 250 lines, shows the two commands first, and links at least three docs/ pages."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert text.index("make run") < text.index("## A five-minute walk")
    assert text.index("make test") < text.index("## A five-minute walk")
    linked = {t.partition("#")[0] for t in links(REPO / "README.md") if t.startswith("docs/")}
    assert len(linked) >= 3, linked


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: p.relative_to(REPO).as_posix())
def test_each_page_says_who_it_is_for_and_links_the_others(page: Path) -> None:
    """A docs page opens with its title and one line for its reader, which links every other page."""
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2].startswith("For ")
    targets = {t.partition("#")[0] for t in links(page) if t in LINK.findall(lines[2])}
    others = {("../README.md" if p.name == "README.md" else p.name) for p in PAGES if p != page}
    assert targets == others


def test_no_text_is_written_twice() -> None:
    """No sentence-long line of prose appears on two pages (the split moved text; it did not copy it)."""
    where: dict[str, set[str]] = {}
    for page in PAGES:
        for line in prose(page.read_text()):
            line = line.strip()
            if len(line) >= 60 and not line.startswith(("|", "For ")):
                where.setdefault(line, set()).add(page.name)
    twice = {line: names for line, names in where.items() if len(names) > 1}
    assert not twice, twice
