"""Writing a benchmark's tables into its docs page (each script's ``--write-docs``), so no number is copied by hand.

A page marks each table it takes from a script as

    <!-- table:SCRIPT:TABLE -->
    | ... the table ... |
    <!-- /table -->

and ``write_table`` replaces what lies between the two markers with the table the script measured, followed by
a line naming the command and the date. The pages are ``docs/benchmarks/SCRIPT.md``, and ``README.md`` for the
``digits_dtda:headline`` table.
"""

from __future__ import annotations

import datetime
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
END = "<!-- /table -->"
# Tables that live outside docs/benchmarks/: (script, table) -> page.
PAGES = {("digits_dtda", "headline"): ROOT / "README.md"}


def start_marker(script: str, table: str) -> str:
    return f"<!-- table:{script}:{table} -->"


def replace_between_markers(text: str, script: str, table: str, markdown: str) -> str:
    """``text`` with what lies between ``<!-- table:{script}:{table} -->`` and the next ``<!-- /table -->``
    replaced by ``markdown`` (on its own lines; the markers are kept).

    Raises:
        ValueError: If the opening marker is missing or occurs more than once, if no closing marker follows
            it, or if another table's opening marker comes first (its own closing marker is missing).
    """
    start = start_marker(script, table)
    count = text.count(start)
    if count != 1:
        raise ValueError(f"expected the marker {start} once, found it {count} times")
    begin = text.index(start) + len(start)
    end = text.find(END, begin)
    if end < 0:
        raise ValueError(f"no {END} after {start}")
    if "<!-- table:" in text[begin:end]:
        raise ValueError(f"another table's marker comes between {start} and the next {END}")
    return text[:begin] + "\n" + markdown.strip("\n") + "\n" + text[end:]


def invocation() -> str:
    """The command line that is running, as ``python benchmarks/SCRIPT.py ARGS`` (for the line under a table)."""
    return shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def write_table(script: str, table: str, markdown: str, page: Path | None = None, command: str | None = None) -> None:
    """Replace table ``table`` of ``script`` in ``page`` by ``markdown`` and a line saying what wrote it and when.

    Args:
        page: Default ``docs/benchmarks/{script}.md`` (``README.md`` for ``digits_dtda:headline``).
        command: What to name as the writer; default ``python benchmarks/{script}.py --write-docs``.

    Raises:
        ValueError: If the page lacks the table's markers (see ``replace_between_markers``).
    """
    page = page or PAGES.get((script, table), ROOT / "docs" / "benchmarks" / f"{script}.md")
    command = command or f"python benchmarks/{script}.py --write-docs"
    stamp = f"Written by `{command}` on {datetime.date.today().isoformat()}."
    text = page.read_text()
    try:
        new = replace_between_markers(text, script, table, f"{markdown.strip()}\n\n{stamp}")
    except ValueError as err:
        raise ValueError(f"{page}: {err}; cannot write table {script}:{table}") from None
    page.write_text(new)
    print(f"wrote table {script}:{table} in {page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}")


def scientific(value: float, digits: int = 1) -> str:
    """``value`` in scientific notation with a short exponent: ``1.1e-6``, ``1.05e-2``."""
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1).replace("+", "") + m.group(2), f"{value:.{digits}e}")
