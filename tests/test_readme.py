"""The README stays short, and every relative link in it and in docs/ leads somewhere that exists."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 160
OPTIONS_HEADER = "| option | default | meaning |"

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`[^`]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    lines, in_code = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: dict[str, int] = {}
    result = set()
    for line in _prose_lines(path):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = found.get(base, 0)
        found[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def relative_links(path: Path) -> list[str]:
    links = []
    for line in _prose_lines(path):
        links += [t for t in _LINK.findall(_INLINE_CODE.sub("", line)) if not re.match(r"[a-z]+:", t)]
    return links


def test_slug_and_link_parsing():
    assert slug("What `make export` gives (measured on a 2-core CPU machine, no GPU)") == (
        "what-make-export-gives-measured-on-a-2-core-cpu-machine-no-gpu"
    )
    assert slug("How it works, and what it costs") == "how-it-works-and-what-it-costs"
    assert "docs/method.md" in relative_links(README)
    assert all(not link.startswith("http") for link in relative_links(README))


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, (
        f"README.md has {n} lines; move detail into docs/ (limit {MAX_README_LINES})"
    )


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    broken = []
    for link in relative_links(path):
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(f"{link}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{link}: no heading with anchor #{anchor} in {file.name}")
    assert not broken, f"broken links in {path.name}:\n" + "\n".join(broken)


def test_every_docs_file_is_linked_from_the_readme():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in relative_links(README)}
    unlinked = [p.name for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f"docs files the README does not link: {unlinked}"
    assert (ROOT / "docs" / "compute.md").resolve() in linked


def _options_table(text: str) -> tuple[int, int]:
    """The first and one-past-last line of the README's table of prune options."""
    lines = text.splitlines()
    first = lines.index(OPTIONS_HEADER)
    last = first
    while last < len(lines) and lines[last].startswith("|"):
        last += 1
    return first, last


def test_options_table_is_generated_from_the_declarations():
    """Set RMEXPORT_WRITE_README=1 to rewrite the table from ``PruneOptions``."""
    from rmexport.config import RUN_PRUNE_DEFAULTS
    from rmexport.options import markdown_table
    from rmexport.prune import PruneOptions

    expected = markdown_table(PruneOptions, {"run": RUN_PRUNE_DEFAULTS}).splitlines()
    text = README.read_text(encoding="utf-8")
    first, last = _options_table(text)
    lines = text.splitlines()
    if os.environ.get("RMEXPORT_WRITE_README") and lines[first:last] != expected:
        README.write_text("\n".join(lines[:first] + expected + lines[last:]) + "\n", encoding="utf-8")
        text = README.read_text(encoding="utf-8")
        first, last = _options_table(text)
        lines = text.splitlines()
    assert lines[first:last] == expected, (
        "README's options table differs from PruneOptions' declarations; "
        "rewrite it with RMEXPORT_WRITE_README=1 pytest tests/test_readme.py"
    )
