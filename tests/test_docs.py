"""Numbers in README.md and docs/ are generated includes (moe_jax.reproduction.includes): each block
must equal the section of the generated file it names, so a regenerated result that changes a
number fails here until `python -m moe_jax.reproduction.includes README.md docs/*.md` is run; no
page holds a table of numbers written by hand; and RESULTS.md, which most blocks quote, is what
its results.json renders to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_jax.reproduction import includes, results_page

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_include_block_matches_its_generated_source():
    blocks = sum(len(includes.BLOCK.findall(p.read_text())) for p in PAGES)
    assert blocks >= 5  # the README's main-job table and the topic pages' headline tables
    assert [s for page in PAGES for s in includes.stale(page)] == []


def test_no_page_holds_a_hand_written_table_of_numbers():
    assert [row for page in PAGES for row in includes.hand_tables(page)] == []


def test_results_md_is_what_results_json_renders():
    """The chain page -> RESULTS.md -> results.json: a number quoted from RESULTS.md is results.json's."""
    reproduce = REPO / "results" / "reproduce"
    rendered = results_page.render(json.loads((reproduce / "results.json").read_text()))
    assert rendered == (reproduce / "RESULTS.md").read_text()


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


def test_a_hand_written_table_of_numbers_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('| loader | works |\n|---|---|\n| stock | yes, float32 |\n'  # words: fine
                    '<!-- include results.md "## A" table -->\n| x |\n|---|\n| 1.0 |\n<!-- end include -->\n'
                    '```\n| 3.5 |\n```\n')  # generated, or code: fine
    assert includes.hand_tables(page) == []
    for row in ("| blocked | 1,099 | 105% |", "| pathfinder | **0.996**, 0.922 | 8, 2, 2, 4 |", "| H100 | 18.6 ms |"):
        page.write_text(f"text\n\n| method | value |\n|---|---|\n{row}\n")
        assert includes.hand_tables(page) == [f"page.md:5: {row}"], row
