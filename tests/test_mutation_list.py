"""scripts/mutation.py's mutants stay true to the code: each one's text occurs exactly once in its file, and
the bug it plants differs from it (a mutant that no longer applies would be an error in the run, found late)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("mutation", ROOT / "scripts" / "mutation.py")
mutation = sys.modules["mutation"] = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up there
spec.loader.exec_module(mutation)


@pytest.mark.parametrize("mutant", mutation.MUTANTS, ids=lambda m: m.name)
def test_every_mutant_applies_once(mutant):
    assert (ROOT / mutant.file).read_text().count(mutant.old) == 1
    assert mutant.new != mutant.old
