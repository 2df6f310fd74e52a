"""Long preparation steps (building bundles, exporting, packing, starting a server) under one progress bar."""
from __future__ import annotations

from typing import Callable


def run_steps(steps: list[tuple[str, Callable[[], object]]], desc: str, progress: bool = True) -> None:
    """Run `steps` ((name, call) pairs) in order, the bar naming the step that runs; nothing shown for none."""
    from tqdm import tqdm

    with tqdm(total=len(steps), desc=desc, unit="step", disable=not progress or not steps) as bar:
        for name, step in steps:
            bar.set_postfix_str(name)
            step()
            bar.update()
