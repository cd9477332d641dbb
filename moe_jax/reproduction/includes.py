"""Numbers in README and docs/ come from generated files, never by hand: include blocks.

    <!-- include results/reproduce/RESULTS.md "## Main job: before / after pruning (experiments/prune.py)" table -->
    ...the section's first table, as generated...
    <!-- end include -->

A block names a generated markdown file (relative to the repository), a heading in it, and
optionally `table` (only the section's first table, for pages that link the rest). `stale(page)`
lists the blocks whose text no longer matches their source, and `hand_tables(page)` the rows of
tables written by hand that hold a measured-looking number (tests/test_docs.py fails on either);
`python -m moe_jax.reproduction.includes README.md docs/*.md` rewrites the blocks after a
reproduction.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from moe_jax.reporting import atomic_write

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r'(<!-- include (\S+) "([^"]+)"( table)? -->\n)(.*?)(<!-- end include -->)', re.S)


# A table cell that is a number, optionally with a unit: what a measurement looks like.
NUMBER_CELL = re.compile(r"[~+-]?\d[\d,]*(\.\d+)?\s*(%|×|x|ms|s|GiB|MiB|GB|MB)?")


class IncludeError(ValueError):
    """An include block whose source file or heading does not exist."""


def section(text: str, heading: str, *, table_only: bool = False, source: str = "") -> str:
    """The lines under `heading` up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    if heading not in lines:
        raise IncludeError(f"{source}: no heading {heading!r}")
    start = lines.index(heading) + 1
    level = len(heading) - len(heading.lstrip("#"))
    end = next((i for i in range(start, len(lines))
                if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level), len(lines))
    body = lines[start:end]
    if table_only:
        first = next((i for i, line in enumerate(body) if line.startswith("|")), None)
        if first is None:
            raise IncludeError(f"{source}: section {heading!r} holds no table")
        last = next((i for i in range(first, len(body)) if not body[i].startswith("|")), len(body))
        body = body[first:last]
    return "\n".join(body).strip("\n") + "\n"


def _expected(match: re.Match, root: Path) -> str:
    source = root / match.group(2)
    if not source.is_file():
        raise IncludeError(f"include names {match.group(2)!r}, which does not exist")
    return section(source.read_text(), match.group(3), table_only=bool(match.group(4)), source=match.group(2))


def stale(page: Path, root: Path = REPO) -> list[str]:
    """The blocks of `page` whose text differs from their source now, described."""
    text = page.read_text()
    return [f"{page.name}: {m.group(2)} {m.group(3)!r}" for m in BLOCK.finditer(text)
            if m.group(5) != _expected(m, root)]


def _numeric(cell: str) -> bool:
    """A number, or numbers joined by ", ", "/" or "->" (`0.996, 0.922`; `8, 2, 2, 4`)."""
    return bool(cell) and all(NUMBER_CELL.fullmatch(part) for part in re.split(r",\s+|\s*/\s*|\s*->\s*", cell))


def hand_tables(page: Path) -> list[str]:
    """Table rows of `page` outside include blocks and code fences with a cell that is a number:
    a measured number copied by hand, which belongs in a generated file and an include block."""
    text = BLOCK.sub(lambda m: m.group(1) + "\n" * m.group(5).count("\n") + m.group(6), page.read_text())
    rows, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        fenced ^= line.startswith("```")
        cells = [c.strip(" *_") for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if not fenced and any(_numeric(c) for c in cells):
            rows.append(f"{page.name}:{number}: {line.strip()}")
    return rows


def refresh(page: Path, root: Path = REPO) -> bool:
    """Rewrite `page`'s blocks from their sources; True if anything changed."""
    text = page.read_text()
    new = BLOCK.sub(lambda m: m.group(1) + _expected(m, root) + m.group(6), text)
    if new != text:
        atomic_write(page, new)
    return new != text


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"{name}: {'refreshed' if refresh(Path(name)) else 'up to date'}")
