"""Every relative link in the READMEs and docs/ points at a file that exists (results move, links follow)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted({ROOT / "README.md", *ROOT.glob("*/README.md"), *(ROOT / "docs").rglob("*.md")})
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    missing = [target for target in LINK.findall(doc.read_text()) if "://" not in target
               and not (doc.parent / target).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


def test_the_link_pattern_sees_links():
    assert LINK.findall("see [a](results/x.md#top) and [b](https://x.org)") == ["results/x.md", "https://x.org"]


def test_the_decisions_index_lists_every_decision():
    decisions = ROOT / "docs" / "decisions"
    index = (decisions / "README.md").read_text()
    names = sorted(path.name for path in decisions.glob("*.md") if path.name != "README.md")
    assert names and [name for name in names if f"]({name})" not in index] == []
