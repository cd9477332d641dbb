"""Numbers in README.md and docs/ are generated includes (moe_jax.reproduction.includes): each block
must equal the section of the generated file it names, so a regenerated result that changes a
number fails here until `python -m moe_jax.reproduction.includes README.md docs/*.md` is run."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_jax.reproduction import includes

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_include_block_matches_its_generated_source():
    blocks = sum(len(includes.BLOCK.findall(p.read_text())) for p in PAGES)
    assert blocks >= 5  # the README's main-job table and the topic pages' headline tables
    assert [s for page in PAGES for s in includes.stale(page)] == []


def test_a_changed_source_is_caught_and_refreshed(tmp_path):
    (tmp_path / "results.md").write_text("# R\n\n## A\n\ntext\n\n| x |\n|---|\n| 1.0 |\n\n## B\n\n| y |\n")
    page = tmp_path / "page.md"
    page.write_text('intro\n<!-- include results.md "## A" table -->\n| x |\n|---|\n| 1.0 |\n'
                    '<!-- end include -->\nend\n')
    assert includes.stale(page, tmp_path) == []
    (tmp_path / "results.md").write_text("# R\n\n## A\n\n| x |\n|---|\n| 2.0 |\n")
    assert includes.stale(page, tmp_path) == ["page.md: results.md '## A'"]
    assert includes.refresh(page, tmp_path) and "| 2.0 |" in page.read_text() and not includes.stale(page, tmp_path)
    page.write_text('<!-- include results.md "## C" -->\n<!-- end include -->\n')
    with pytest.raises(includes.IncludeError, match="no heading '## C'"):
        includes.stale(page, tmp_path)
