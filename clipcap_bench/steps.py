"""Long preparation steps (building bundles, exporting, packing, starting a server) under one progress bar."""
from __future__ import annotations

from typing import Any, Callable


def run_steps(steps: list[tuple[str, Callable[[], Any]]], desc: str, progress: bool = True) -> list[Any]:
    """Run `steps` ((name, call) pairs) in order, the bar naming the step that runs (nothing shown for no step);
    returns what each call returned."""
    from tqdm import tqdm

    results = []
    with tqdm(total=len(steps), desc=desc, unit="step", disable=not progress or not steps) as bar:
        for name, step in steps:
            bar.set_postfix_str(name)
            results.append(step())
            bar.update()
    return results
