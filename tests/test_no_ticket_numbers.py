"""No tracked code or doc refers to a ticket: a reader of the tree has no tracker, so "issue 18", "#18" and
"the issue's probe" say nothing. A citation of another project's tracker names it (`pytorch/serve#2158`)."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT = re.compile(r"(\.(py|md|toml|ya?ml|sh|cfg|ini|txt|properties)|Makefile|Dockerfile)$")
TICKET = re.compile(
    r"\bissues?\s+\d+"  # "issue 12", "Issues 3", "issue" at a line's end and "20" on the next
    r"|(?<![\w/&\"'])#\d+\b(?![\w-])"  # "#12", "(#12)"; not "owner/repo#12", "&#39;", a quoted colour "#333"
    r"|(?<![a-z])the[\s_]+issue",  # "the probe", test_the_issue_cases
    re.IGNORECASE)


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / name for name in listed.splitlines()  # this file's examples excepted
            if TEXT.search(name) and (ROOT / name).is_file() and ROOT / name != Path(__file__).resolve()]


def ticket_references(text: str) -> list[str]:
    """'line: the line' for each reference; the text is searched whole, so a reference wrapped over two lines counts."""
    lines = text.splitlines()
    return [f"{number}: {lines[number - 1].strip()[:120]}"
            for number in sorted({text.count("\n", 0, match.start()) + 1 for match in TICKET.finditer(text)})]


@pytest.mark.parametrize("text, found", [
    ("# Export fixtures (issue 4): each bundle", True),
    ('"""Issue 18: temperature', True),
    ("the fix, #3341, was never merged", True),
    ("(see #12)", True),
    ("the issue's probe kept 20", True),
    ("def test_the_issue_cases():", True),
    ("(pytorch/serve#2158)", False),
    ("#!/usr/bin/env bash", False),
    ("# 1. the archive", False),
    ('color="#333"', False),
    ("## Results", False),
    ("&#39; an escaped quote", False),
    ("an issue with the cache", False),
    ("the ISA issue\n20 was filed on", True),
    ("what the\nissue's probe sent", True),
])
def test_the_pattern_tells_tickets_from_the_rest(text, found):
    assert bool(ticket_references(text)) is found


def test_the_scan_sees_the_tree():
    names = {path.relative_to(ROOT).as_posix() for path in tracked_text_files()}
    assert {"README.md", "Makefile", "pyproject.toml", "clipcap/cli.py", "tests/conftest.py"} <= names


def test_no_tracked_text_file_refers_to_a_ticket():
    found = [f"{path.relative_to(ROOT)}:{hit}" for path in tracked_text_files()
             for hit in ticket_references(path.read_text(encoding="utf-8", errors="replace"))]
    assert not found, "ticket references (say what was found, not where it was filed):\n  " + "\n  ".join(found)
