"""Benchmark tables in the docs are rewritten between their markers by the scripts that measure them
(``--write-docs``); the replacement keeps everything else and refuses a page whose markers are broken."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "benchmarks" / "docs_tables.py")
docs_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs_tables)


def test_a_table_is_replaced_between_its_markers_only():
    page = "intro\n<!-- table:speed:main -->\n| old |\n<!-- /table -->\nmiddle\n<!-- table:speed:other -->\nx\n<!-- /table -->\n"
    new = docs_tables.replace_between_markers(page, "speed", "main", "| new |\n| --- |")
    assert new == page.replace("| old |", "| new |\n| --- |")


@pytest.mark.parametrize(
    "page, why",
    [
        ("no markers", "once, found it 0"),
        ("<!-- table:speed:main -->\n<!-- /table -->\n<!-- table:speed:main -->\n<!-- /table -->", "once, found it 2"),
        ("<!-- table:speed:main -->\n| old |\n", "no <!-- /table -->"),
        ("<!-- table:speed:main -->\n<!-- table:speed:b -->\n<!-- /table -->", "another table's marker"),
    ],
)
def test_broken_markers_are_refused(page, why):
    with pytest.raises(ValueError, match=why):
        docs_tables.replace_between_markers(page, "speed", "main", "| new |")


def test_every_table_a_script_writes_has_its_markers_in_the_docs():
    """Each ``write_table("script", "table", ...)`` call in the benchmarks names markers that exist."""
    import re

    pages = {p: p.read_text() for p in [*(ROOT / "docs" / "benchmarks").glob("*.md"), ROOT / "README.md"]}
    written = {
        (script, table)
        for path in (ROOT / "benchmarks").glob("*.py")
        for script, table in re.findall(r'write_table\(\s*"(\w+)",\s*(?:f?"(\w+)")', path.read_text())
    }
    assert len(written) >= 8
    for script, table in written:
        marker = docs_tables.start_marker(script, table)
        assert sum(text.count(marker) for text in pages.values()) == 1, marker
